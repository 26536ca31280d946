"""The ``"usp"`` mask function: what a Hugging Face model asks of its attention, as a small object.

transformers asks each attention implementation's mask function to build the mask the model
wants. usp builds none (nothing ``S x S`` is ever allocated): :func:`usp_mask` returns a
:class:`MaskRequest` — causal or bidirectional, the sliding window if any, this rank's padding
mask if any, how many cached tokens precede the queries — or says why usp cannot run it
exactly (a chunked window, a sliding cache, a custom overlay such as image-token blocks). The
attention function turns the request, with the batch's documents, into a
:class:`usp.AttentionMask` of the global sequence.

The request is read off transformers' mask functions: :func:`mask_components` takes apart the
``and_masks`` composition transformers builds (causal, bidirectional, sliding-window overlays)
and strips its packed-sequence wrapper, which transformers adds whenever a rank's positions are
not contiguous (zigzag and stripe layouts, packed documents). usp knows the documents from the
batch itself, so that wrapper carries nothing it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version
from transformers import masking_utils
from transformers.masking_utils import (
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    packed_sequence_mask_function,
    sliding_window_overlay,
)

from usp.integrations.hf_mixers import config_sequence_mixers

ATTENTION_NAME = "usp"
# tested with 5.4.0, 5.5.4, 5.16.1 and 5.23.0; 5.3 and earlier call mask functions differently
MIN_TRANSFORMERS = "5.4"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"usp's transformers integration needs transformers>={MIN_TRANSFORMERS}, found "
        f"{transformers.__version__}; pip install 'usp[hf]'"
    )


@dataclass(eq=False)
class MaskRequest:
    """The mask a model asked for, as the ``"usp"`` mask function saw it (never a dense tensor).

    ``window``: ``(left, right)`` in :class:`usp.AttentionMask`'s convention. ``padding``: this
    rank's ``[B, S_local]`` padding mask (True: a token), or None when it has no zero.
    ``cached``: tokens of a KV cache before the queries (the sequence-parallel attention refuses
    them; ``usp.infer.hf``'s generation runs them). ``agreed`` turns true once every rank has
    checked this forward's request, so the layers after the first (and activation-checkpoint
    recomputation) skip the agreement; ``mask`` keeps the global mask built by the first layer.
    """

    causal: bool
    window: tuple[int, int] | None = None
    padding: torch.Tensor | None = None
    padded: bool = False
    refusal: str | None = None
    cached: int = 0
    agreed: bool = False
    mask: object = field(default=None, repr=False)
    sequence_mixers: tuple = ()  # the config's layers that are not softmax attention
    # of those, the ones usp neither splits nor keeps states for (a generation runs the rest)
    unknown_mixers: tuple = ()


def _closure_values(function) -> dict:
    cells = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


_AND_CODE = and_masks(causal_mask_function).__code__
_SAME_DOCUMENT_CODE = packed_sequence_mask_function(None).__code__
_SLIDING_CODE = sliding_window_overlay(1).__code__
_bidirectional_overlay = getattr(masking_utils, "sliding_window_bidirectional_overlay", None)
_SLIDING_BIDIRECTIONAL_CODE = (_bidirectional_overlay(1).__code__
                               if _bidirectional_overlay is not None else None)
_remap = getattr(masking_utils, "remap_positions_for_packed_sequence", None)  # 5.23, not 5.4
_REMAP_CODE = _remap(causal_mask_function, None).__code__ if _remap is not None else None


def mask_components(function) -> dict | None:
    """What a transformers mask function is made of: ``{"causal": bool, "window": (l, r) or
    None}``, or None if it holds anything else (a custom overlay). Packed-sequence wrappers are
    dropped (usp takes documents from the batch)."""
    if function is causal_mask_function:
        return {"causal": True, "window": None}
    if function is bidirectional_mask_function:
        return {"causal": False, "window": None}
    code = getattr(function, "__code__", None)
    closure = _closure_values(function) if code is not None else {}
    if code is _SLIDING_CODE:  # key > query - W: W keys up to and including the query
        return {"causal": None, "window": (closure["sliding_window"] - 1, -1)}
    if code is not None and code is _SLIDING_BIDIRECTIONAL_CODE:  # |query - key| <= W
        window = closure["sliding_window"]
        return {"causal": None, "window": (window, window)}
    if code is _SAME_DOCUMENT_CODE:
        return {"causal": None, "window": None}
    if code is not None and code is _REMAP_CODE:
        return mask_components(closure["mask_function"])
    if code is _AND_CODE:
        parts = [mask_components(part) for part in closure.get("mask_functions", ())]
        if not parts or any(part is None for part in parts):
            return None
        causal = [p["causal"] for p in parts if p["causal"] is not None]
        windows = [p["window"] for p in parts if p["window"] is not None]
        if len(set(causal)) > 1 or len(windows) > 1:
            return None
        return {"causal": causal[0] if causal else None, "window": windows[0] if windows else None}
    return None


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
    request = _request(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                       config)
    # a model used without USPContext.prepare: its layer types travel to the attention, which
    # refuses them when the sequence is split (prepare refuses before any layer runs)
    if config is not None:
        request.sequence_mixers = tuple(config_sequence_mixers(config))
        request.unknown_mixers = tuple(config_sequence_mixers(config, scans=True))
    return request


def _request(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
             config) -> MaskRequest:
    name = type(config).__name__ if config is not None else "the model"
    components = mask_components(mask_function)
    causal = bool(components and components["causal"] is not False)
    if kv_offset != 0 or kv_length != q_offset + q_length:
        return MaskRequest(causal, refusal=(
            f"{name} attends {q_length} queries to {kv_length} keys from offset {kv_offset} (a "
            "sliding cache, an offset or cross-attention); usp runs self-attention over the "
            "whole sequence, or generation with usp.infer.hf.USPCache"
        ))
    if components is None or components["causal"] is None:
        overlay = getattr(mask_function, "__qualname__", repr(mask_function))
        chunk = getattr(config, "attention_chunk_size", None)
        what = (f"chunked attention (attention_chunk_size={chunk})" if chunk else
                f"a custom attention mask ({overlay}: image-token blocks or another overlay)")
        return MaskRequest(causal, refusal=(
            f"{name} asks for {what}; usp runs causal or bidirectional attention with sliding "
            "windows, packed documents and padding"
        ))
    padding = None
    if attention_mask is not None:
        padding = attention_mask.bool()
        padding = None if bool(padding.all()) else padding
    return MaskRequest(causal, components["window"], padding, attention_mask is not None,
                       cached=int(q_offset))
