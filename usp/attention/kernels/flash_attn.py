"""The flash-attn package's kernels: FlashAttention-2 (``flash_attn``) and FlashAttention-3
(``flash_attn3``, the Hopper build's ``flash_attn_interface``), imported lazily.

Their private ``_flash_attn_forward`` / ``_flash_attn_backward`` (the only entry points that return
the lse and take a given out/lse in the backward) change between releases: positional order,
``window_size`` as one tuple or two ints, ``softcap`` added, the forward's return tuple, and since
flash-attn 2.7 they are ``torch.library`` custom ops whose Python signature reads ``(*args,
**kwargs)``. So usp calls them **by parameter name**, reading the names from the function the
custom op wraps (or from the op schema), and passes ``None`` to the parameters that mean "not
used" (variable-length, paged and rotary inputs). Arguments map by meaning to whatever the
version calls them (FlashAttention-3's backward renamed ``causal`` to ``is_causal``, first
required, later defaulting to False, which a call by the old name would silently drop). A required
name usp does not know, or a value usp needs that the version has no parameter for, is a clear
error naming the version's parameters — at the kernel's probe, never a wrong call.

Window rules differ too: flash-attn 2.x rewrites windows like torch's bundled FlashAttention-2
(``glue.flash2_runs``), FlashAttention-3 keeps their meaning (``glue.flash3_runs``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch

from usp.attention.kernels.glue import (HALF, OpAdapter, OpMask, cuda_kernel, flash2_runs,
                                       flash3_runs)

Tensor = torch.Tensor

FLASH_ATTN_2_MODULES = ("flash_attn.flash_attn_interface",)
FLASH_ATTN_3_MODULES = ("flash_attn_interface", "flash_attn_3.flash_attn_interface")
# parameters that take None when a dense, dropout-free, non-paged call leaves them unused; a
# value usp passes wins (the backward's ``out`` is the forward output, FA3's forward ``out`` an
# optional buffer to write into)
UNUSED_WHEN_NONE = frozenset({
    "out", "out_", "alibi_slopes", "rng_state", "k_new", "v_new", "qv", "cu_seqlens_q", "cu_seqlens_k",
    "cu_seqlens_k_new", "seqused_q", "seqused_k", "sequed_q", "sequed_k", "max_seqlen_q",
    "max_seqlen_k", "page_table", "kv_batch_idx", "leftpad_k", "rotary_cos", "rotary_sin",
    "seqlens_rotary", "q_descale", "k_descale", "v_descale", "block_mask", "scheduler_metadata",
})


def import_interface(module_names: tuple[str, ...], kernel: str):
    """The first importable module of ``module_names``; ValueError naming the install otherwise."""
    errors = []
    for name in module_names:
        try:
            return importlib.import_module(name)
        except ImportError as exc:  # a missing package, or a built extension that fails to load
            errors.append(f"{name}: {exc}")
    raise ValueError(
        f"kernel={kernel!r} needs the flash-attn package (FlashAttention-2: pip install flash-attn;"
        f" FlashAttention-3: the hopper/ build of flash-attn); importing it failed: "
        + "; ".join(errors)
    )


def parameters(fn: Callable) -> dict[str, bool]:
    """``{name: has_default}`` of a flash-attn function, a custom op wrapping one, or an op."""
    wrapped = getattr(fn, "_init_fn", None)  # torch.library.custom_op keeps the decorated function
    if wrapped is not None:
        fn = wrapped
    schema = getattr(fn, "_schema", None) or getattr(getattr(fn, "default", None), "_schema", None)
    if schema is not None:  # an OpOverload / OpOverloadPacket
        return {arg.name: arg.has_default_value() for arg in schema.arguments}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    found = {
        name: p.default is not inspect.Parameter.empty
        for name, p in inspect.signature(fn).parameters.items() if p.kind in kinds
    }
    if not found:
        raise ValueError(f"cannot read the parameters of {fn!r} (flash-attn version unknown to usp)")
    return found


# usp's meaning -> the names flash-attn releases give it (FlashAttention-3's backward renamed
# ``causal`` to ``is_causal``; its forward's optional output buffer is ``out`` or ``out_``)
ALIASES = {"causal": ("causal", "is_causal")}
# meanings a release may lack when usp passes this value (the feature is off)
OFF_VALUES = {"dropout_p": 0.0, "softcap": 0.0, "return_softmax": False, "deterministic": False,
              "window_size": (-1, -1)}


def _bind(params: dict[str, bool], meaning: str, value, arguments: dict) -> bool:
    """Put ``value`` under the parameter that means ``meaning``; False when there is none."""
    if meaning == "window_size" and "window_size" not in params:
        if {"window_size_left", "window_size_right"} <= params.keys():
            arguments["window_size_left"], arguments["window_size_right"] = value
            return True
        return False
    name = next((n for n in ALIASES.get(meaning, (meaning,)) if n in params), None)
    if name is not None:
        arguments[name] = value
    return name is not None


def call_by_name(fn: Callable, values: dict):
    """Call ``fn`` with ``values`` (keyed by meaning) under the names its version uses, None for
    the unused inputs it requires. A value whose meaning the version has no parameter for is a
    ValueError (never dropped silently), unless it only turns off a feature the version lacks."""
    params = parameters(fn)
    arguments: dict = {}
    name = getattr(fn, "__name__", repr(fn))
    for meaning, value in values.items():
        if not _bind(params, meaning, value, arguments) and OFF_VALUES.get(meaning, ...) != value:
            raise ValueError(
                f"unsupported flash-attn version: {name!r} has no parameter for {meaning!r} "
                f"(usp passes {value!r}; its parameters: {list(params)})"
            )
    missing = [param for param, has_default in params.items()
               if not has_default and param not in arguments and param not in UNUSED_WHEN_NONE]
    if missing:
        raise ValueError(
            f"unsupported flash-attn version: {name!r} needs {missing} (its parameters: "
            f"{list(params)})"
        )
    for param, has_default in params.items():
        if param not in arguments and param in UNUSED_WHEN_NONE and not has_default:
            arguments[param] = None
    return fn(**arguments)


def first_lse(result) -> Tensor:
    """The lse in a forward's return tuple: (out, lse, ...) or (out, q, k, v, out_padded, lse, ...)."""
    return next(t for t in result[1:]
                if isinstance(t, Tensor) and t.dtype == torch.float32 and t.dim() == 3)


def flash_attn_adapter(module_names: tuple[str, ...], kernel: str, window_rule) -> OpAdapter:
    def forward(q, k, v, mask: OpMask, scale: float):
        interface = import_interface(module_names, kernel)
        result = call_by_name(interface._flash_attn_forward, dict(
            q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=mask.causal,
            window_size=mask.window, softcap=0.0, return_softmax=False,
        ))
        return result[0], first_lse(result)

    def backward(dout, q, k, v, out, lse, mask: OpMask, scale: float):
        interface = import_interface(module_names, kernel)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        call_by_name(interface._flash_attn_backward, dict(
            dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
            dropout_p=0.0, softmax_scale=scale, causal=mask.causal, window_size=mask.window,
            softcap=0.0, deterministic=False,
        ))
        return dq, dk, dv

    return OpAdapter(forward, backward, native_gqa=True, max_head_dim=256,
                     window_rule=window_rule)


def _flash_attn_kernel(name: str, module_names: tuple[str, ...], window_rule):
    def load() -> None:
        import_interface(module_names, name)

    return cuda_kernel(name, HALF, flash_attn_adapter(module_names, name, window_rule), load=load)


FLASH_ATTN = _flash_attn_kernel("flash_attn", FLASH_ATTN_2_MODULES, flash2_runs)
FLASH_ATTN_3 = _flash_attn_kernel("flash_attn3", FLASH_ATTN_3_MODULES, flash3_runs)
