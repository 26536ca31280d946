"""Local attention kernels that return ``(out, lse)`` and have a matching backward.

Every kernel works on ``[B, S, H, D]`` tensors (heads third, the flash-attn convention) and
returns the output in the input dtype and the log-sum-exp of each query row as fp32 (fp64 for fp64
inputs) ``[B, H, S]``. ``causal=True`` aligns the mask top-left: query ``i`` sees keys ``j <= i``.
The backward takes the *final* output and lse of the whole attention (not this block's), so a ring
can call it on every block and get exact partial gradients.

GQA: ``k``/``v`` may have fewer heads than ``q`` (``Hq % Hkv == 0``); query head ``j`` reads kv head
``j // (Hq // Hkv)``. The CPU flash kernel does this natively; the others expand locally (never
before communication) and sum the gradients back.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


def _expand_kv(kv: Tensor, n_q_heads: int) -> Tensor:
    # [B, S, Hkv, D] -> [B, S, Hq, D]
    repeats = n_q_heads // kv.shape[2]
    return kv if repeats == 1 else kv.repeat_interleave(repeats, dim=2)


def _reduce_kv_grad(grad: Tensor, n_kv_heads: int) -> Tensor:
    # [B, S, Hq, D] -> [B, S, Hkv, D]: sum over the query heads that shared each kv head
    batch, seq, n_q_heads, dim = grad.shape
    if n_q_heads == n_kv_heads:
        return grad
    return grad.view(batch, seq, n_kv_heads, n_q_heads // n_kv_heads, dim).sum(dim=3)


# ---------------------------------------------------------------------------------------- math
def math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):
    """Explicit softmax in fp32 (fp64 for fp64): the reference every other kernel is tested against."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = _expand_kv(k, q.shape[2]), _expand_kv(v, q.shape[2])
    qh, kh, vh = (t.transpose(1, 2).to(compute) for t in (q, k, v))  # [B, H, S, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
    if causal:
        sq, sk = scores.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
    # rows with no visible key have lse = -inf; give them zero output, not NaN
    probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0).unsqueeze(-1))
    out = torch.matmul(probs, vh).transpose(1, 2)  # [B, Sq, H, D]
    return out.to(q.dtype), lse


def math_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_kv = k.shape[2]
    k, v = _expand_kv(k, q.shape[2]), _expand_kv(v, q.shape[2])
    qh, kh, vh, doh, oh = (t.transpose(1, 2).to(compute) for t in (q, k, v, dout, out))
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.exp(scores - lse.to(compute).masked_fill(torch.isneginf(lse), 0).unsqueeze(-1))
    dv = torch.matmul(probs.transpose(-1, -2), doh)
    dprobs = torch.matmul(doh, vh.transpose(-1, -2))
    delta = (doh * oh).sum(-1, keepdim=True)  # rowsum(dO ∘ O) of the *final* output
    dscores = probs * (dprobs - delta) * scale
    dq = torch.matmul(dscores, kh)
    dk = torch.matmul(dscores.transpose(-1, -2), qh)
    dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))
    return dq, _reduce_kv_grad(dk, n_kv), _reduce_kv_grad(dv, n_kv)


# ------------------------------------------------------------------------------------ CPU flash
def cpu_flash_forward(q, k, v, causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale
    )
    return out.transpose(1, 2), lse


def cpu_flash_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2),
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        out.transpose(1, 2),
        lse,
        0.0,
        causal,
        scale=scale,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ------------------------------------------------------------------------------------ CUDA SDPA
def _bhsd(*tensors):
    return [t.transpose(1, 2) for t in tensors]


def cuda_flash_forward(q, k, v, causal: bool, scale: float):
    k, v = _expand_kv(k, q.shape[2]), _expand_kv(v, q.shape[2])
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        *_bhsd(q, k, v), 0.0, causal, False, scale=scale
    )
    return out.transpose(1, 2), lse


def cuda_flash_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    n_kv = k.shape[2]
    k, v = _expand_kv(k, q.shape[2]), _expand_kv(v, q.shape[2])
    empty = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        *_bhsd(dout, q, k, v, out), lse.contiguous(), empty, empty,
        q.shape[1], k.shape[1], 0.0, causal, empty, empty, scale=scale,
    )
    dq, dk, dv = _bhsd(dq, dk, dv)
    return dq, _reduce_kv_grad(dk, n_kv), _reduce_kv_grad(dv, n_kv)


def cuda_efficient_forward(q, k, v, causal: bool, scale: float):
    k, v = _expand_kv(k, q.shape[2]), _expand_kv(v, q.shape[2])
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        *_bhsd(q, k, v), None, True, 0.0, causal, scale=scale
    )
    # the efficient kernel pads lse's sequence dim up to a multiple of 32
    return out.transpose(1, 2), lse[..., : q.shape[1]]


def cuda_efficient_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    n_kv = k.shape[2]
    k, v = _expand_kv(k, q.shape[2]), _expand_kv(v, q.shape[2])
    empty = torch.empty(0, device=q.device)
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        *_bhsd(dout, q, k, v), empty, out.transpose(1, 2), lse.contiguous(),
        seed, seed, 0.0, [True, True, True, False], causal, scale=scale,
    )
    dq, dk, dv = _bhsd(dq, dk, dv)
    return dq, _reduce_kv_grad(dk, n_kv), _reduce_kv_grad(dv, n_kv)


def cuda_cudnn_forward(q, k, v, causal: bool, scale: float):
    k, v = _expand_kv(k, q.shape[2]), _expand_kv(v, q.shape[2])
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        *_bhsd(q, k, v), None, True, 0.0, causal, False, scale=scale
    )
    return out.transpose(1, 2), lse.reshape(q.shape[0], q.shape[2], q.shape[1]).float()


def cuda_cudnn_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    n_kv = k.shape[2]
    k, v = _expand_kv(k, q.shape[2]), _expand_kv(v, q.shape[2])
    empty = torch.empty(0, device=q.device)
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        *_bhsd(dout, q, k, v, out), lse.unsqueeze(-1).contiguous(), seed, seed, empty,
        empty, empty, q.shape[1], k.shape[1], 0.0, causal, scale=scale,
    )
    dq, dk, dv = _bhsd(dq, dk, dv)
    return dq, _reduce_kv_grad(dk, n_kv), _reduce_kv_grad(dv, n_kv)


# ---------------------------------------------------------------------------------- flash-attn 2
def _flash_attn_interface():
    try:
        return importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError as exc:
        raise ValueError(
            "kernel='flash_attn' needs the flash-attn package (pip install flash-attn); "
            f"importing it failed: {exc}"
        ) from exc


def _call_by_name(fn: Callable, values: dict):
    """Call a flash-attn private function across its API versions by matching parameter names."""
    params = inspect.signature(fn).parameters
    if "window_size" in values and "window_size" not in params:
        left, right = values.pop("window_size")
        values["window_size_left"], values["window_size_right"] = left, right
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in values]
    if missing:
        raise ValueError(f"unsupported flash-attn version: {fn.__name__} needs {missing}")
    return fn(**{n: v for n, v in values.items() if n in params})


def flash_attn_forward(q, k, v, causal: bool, scale: float):
    interface = _flash_attn_interface()
    result = _call_by_name(
        interface._flash_attn_forward,
        dict(q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal,
             window_size=(-1, -1), softcap=0.0, alibi_slopes=None, return_softmax=False),
    )
    # versions return (out, lse, S_dmask, rng_state) or an 8-tuple beginning out, q, k, v, out_padded, lse
    out = result[0]
    lse = next(t for t in result[1:] if t.dim() == 3 and t.dtype == torch.float32)
    return out, lse


def flash_attn_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    interface = _flash_attn_interface()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call_by_name(
        interface._flash_attn_backward,
        dict(dout=dout.contiguous(), q=q, k=k, v=v, out=out, softmax_lse=lse.contiguous(),
             dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
             window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
             rng_state=None),
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Kernel:
    name: str
    device_type: str
    dtypes: tuple[torch.dtype, ...]
    forward: Callable
    backward: Callable

    def check(self, q: Tensor) -> None:
        if q.device.type != self.device_type:
            raise ValueError(
                f"kernel {self.name!r} runs on {self.device_type}, the tensors are on {q.device}"
            )
        if q.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            raise ValueError(
                f"kernel {self.name!r} supports {names}, not {q.dtype}; use kernel='math' for it"
            )


_HALF = (torch.float16, torch.bfloat16)
KERNELS = {
    k.name: k
    for k in (
        Kernel("math", "any", (torch.float64, torch.float32) + _HALF, math_forward, math_backward),
        Kernel("cpu_flash", "cpu", (torch.float64, torch.float32) + _HALF,
               cpu_flash_forward, cpu_flash_backward),
        Kernel("cuda_flash", "cuda", _HALF, cuda_flash_forward, cuda_flash_backward),
        Kernel("cuda_efficient", "cuda", (torch.float32,) + _HALF,
               cuda_efficient_forward, cuda_efficient_backward),
        Kernel("cuda_cudnn", "cuda", _HALF, cuda_cudnn_forward, cuda_cudnn_backward),
        Kernel("flash_attn", "cuda", _HALF, flash_attn_forward, flash_attn_backward),
    )
}


def resolve_kernel(name: "str | Kernel", q: Tensor) -> Kernel:
    """The kernel called ``name`` for tensors like ``q``; ``"auto"`` picks the best one.

    auto: CPU -> cpu_flash (every float dtype); CUDA -> flash-attn 2 if importable, else SDPA flash
    for fp16/bf16, SDPA efficient for fp32, math for fp64. A :class:`Kernel` instance (your own
    kernel, or a wrapped one) is checked against q and used as it is.
    """
    if isinstance(name, Kernel):
        if name.device_type != "any":
            name.check(q)
        return name
    if name == "auto":
        if q.device.type == "cpu":
            name = "cpu_flash"
        elif q.device.type == "cuda":
            if q.dtype in _HALF:
                name = "flash_attn" if importlib.util.find_spec("flash_attn") else "cuda_flash"
            else:
                name = "cuda_efficient" if q.dtype == torch.float32 else "math"
        else:
            name = "math"
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; choose 'auto' or one of {sorted(KERNELS)}")
    kernel = KERNELS[name]
    if kernel.device_type != "any":
        kernel.check(q)
    elif q.dtype not in kernel.dtypes:
        raise ValueError(f"kernel 'math' does not support {q.dtype}")
    if name == "flash_attn":
        _flash_attn_interface()
    return kernel


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
