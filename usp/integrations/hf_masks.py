"""The ``"usp"`` mask function: what a Hugging Face model asks of its attention, as a small object.

transformers asks each attention implementation's mask function to build the mask the model
wants. usp builds none (nothing ``S x S`` is ever allocated): :func:`usp_mask` returns a
:class:`MaskRequest` saying causal or bidirectional, or why usp cannot run it exactly (padding,
a sliding or chunked window, a KV cache, a custom overlay such as image-token blocks). The
attention function then agrees the request over all ranks and refuses or runs it.

Under zigzag or stripe layouts a rank's ``position_ids`` are not contiguous, so transformers
takes them for packed documents and wraps the causal mask in its packed-sequence mask.
:func:`is_packed_causal` recognises exactly that wrapper around the plain causal mask; it is
accepted because the attention function then requires the positions to be this rank's global
positions under the layout, which leaves no room for real document boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from transformers import masking_utils
from transformers.masking_utils import (
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    packed_sequence_mask_function,
)

ATTENTION_NAME = "usp"
# tested with 5.4.0, 5.5.4, 5.16.1 and 5.23.0; 5.3 and earlier call mask functions differently
MIN_TRANSFORMERS = "5.4"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"usp's transformers integration needs transformers>={MIN_TRANSFORMERS}, found "
        f"{transformers.__version__}; pip install 'usp[hf]'"
    )
WINDOW_SETTINGS = ("sliding_window", "attention_chunk_size")


@dataclass(eq=False)
class MaskRequest:
    """The mask a model asked for, as the ``"usp"`` mask function saw it (never a dense tensor).

    ``agreed`` turns true once every rank has checked this forward's request, so the layers after
    the first (and activation-checkpoint recomputation) skip the all-reduce.
    """

    causal: bool
    refusal: str | None = None
    agreed: bool = False


def window_refusal(config, size: int) -> str:
    """The refusal of attention limited to windows of ``size`` tokens, naming the config setting."""
    setting = next(
        (s for s in WINDOW_SETTINGS if getattr(config, s, None) == size), WINDOW_SETTINGS[0]
    )
    return (
        f"{type(config).__name__}.{setting}={size} asks for attention limited to windows of {size} "
        f"tokens, which usp does not support yet; set {setting}=None for full causal attention "
        f"(the same model for sequences of at most {size} tokens), or do not use "
        f'attn_implementation="{ATTENTION_NAME}"'
    )


def _closure_values(function) -> dict:
    cells = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


# code objects of the functions transformers builds for packed sequences: and(...) of "same
# document" with "causal", where 5.23 remaps causal to the positions inside each document
_AND_CODE = and_masks(causal_mask_function).__code__
_SAME_DOCUMENT_CODE = packed_sequence_mask_function(None).__code__
_remap = getattr(masking_utils, "remap_positions_for_packed_sequence", None)  # 5.23, not 5.0
_REMAP_CODE = _remap(causal_mask_function, None).__code__ if _remap is not None else None


def is_packed_causal(mask_function) -> bool:
    """True for transformers' packed-sequence wrapper around the plain causal mask, only that."""
    if getattr(mask_function, "__code__", None) is not _AND_CODE:
        return False
    parts = _closure_values(mask_function).get("mask_functions", ())
    codes = [getattr(part, "__code__", None) for part in parts]
    if len(parts) != 2 or codes.count(_SAME_DOCUMENT_CODE) != 1:
        return False
    causal = parts[1 - codes.index(_SAME_DOCUMENT_CODE)]
    if causal is causal_mask_function:
        return True
    return (
        _REMAP_CODE is not None
        and getattr(causal, "__code__", None) is _REMAP_CODE
        and _closure_values(causal).get("mask_function") is causal_mask_function
    )


def usp_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    config=None,
    **backend_options,  # dtype, device, use_vmap, allow_*_skip: for backends that build tensors
) -> MaskRequest:
    """transformers' mask hook for ``"usp"``; the arguments are those of ``sdpa_mask``."""
    causal = mask_function is not bidirectional_mask_function
    name = type(config).__name__ if config is not None else "the model"
    if local_size is not None:
        return MaskRequest(causal, window_refusal(config, local_size))
    if attention_mask is not None and not bool(attention_mask.all()):
        padded = int((~attention_mask.bool()).sum())
        return MaskRequest(causal, (
            f"attention_mask has {padded} zeros (padding) in this rank's [{batch_size}, "
            f"{attention_mask.shape[-1]}] shard; usp supports no padding mask yet. A causal model "
            "needs none for right padding (no token attends to later ones): pad on the right, "
            "set those labels to -100 and pass no attention_mask"
        ))
    if q_offset != 0 or kv_offset != 0 or kv_length != q_length:
        return MaskRequest(causal, (
            f"{name} attends {q_length} queries to {kv_length} keys (a KV cache, an offset or "
            "cross-attention); usp runs self-attention over the whole sequence only: pass "
            "use_cache=False and no past_key_values"
        ))
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        return MaskRequest(causal)
    if is_packed_causal(mask_function):  # the attention function checks the positions
        return MaskRequest(True)
    overlay = getattr(mask_function, "__qualname__", repr(mask_function))
    return MaskRequest(causal, (
        f"{name} asks for a custom attention mask ({overlay}: packed documents, image-token "
        "blocks or another overlay); usp supports plain causal and unmasked attention only"
    ))
