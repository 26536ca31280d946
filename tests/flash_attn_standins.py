"""CPU stand-ins for the FlashAttention ops usp calls, with those libraries' own mask rules.

Each stand-in has the calling convention of one op or release and computes in float64 on the CPU,
applying ``causal`` and the window **as the library's C++ does**, rewrites included:

- FlashAttention-2 (torch's bundled ``aten::_flash_attention_forward/backward`` and flash-attn
  2.5-2.8's ``mha_fwd``/``mha_bwd``, :func:`fa2_visible`): the forward turns a window side
  ``>= seqlen_k`` into -1, drops ``causal`` for one query row, and sets the right side to 0 when
  causal; the backward only does the last; then both (``set_params_fprop``) make a -1 left side
  next to a bounded right one ``seqlen_k`` and a -1 right side next to a bounded left one
  ``seqlen_k``, and mask key ``j`` of row ``i`` outside
  ``[i + n_k - n_q - left, i + 1 + n_k - n_q + right)`` (``mask.h``). A row left with no key gets
  output 0 and lse = +inf (``softmax.h``).
- FlashAttention-3 (``hopper/flash_api.cpp``, :func:`fa3_visible`): a left side ``>= seqlen_k - 1``
  and a right side ``>= seqlen_q - 1`` become -1, causal sets the right side to 0, and a -1 side
  becomes ``seqlen_k - 1`` / ``seqlen_q - 1``.

Calling conventions (the private entry points usp uses):

- ``v27``: flash-attn >= 2.7, ``torch.library`` custom ops (``inspect.signature`` reads
  ``(*args, **kwargs)``), window as two ints, softcap, returns (out, lse, S_dmask, rng_state);
- ``v25``: flash-attn 2.5, plain functions, window as one tuple, no softcap, returns the 8-tuple
  (out, q, k, v, out_padded, lse, S_dmask, rng_state);
- ``v3``: FlashAttention-3 until mid-2025, plain functions with many required parameters that mean
  "unused" when None, ``causal`` in both directions, window as one tuple;
- ``v3_ops``: FlashAttention-3 as custom ops: the backward's flag is ``is_causal`` (required),
  windows as two ints;
- ``v3_head``: today's FlashAttention-3: every optional parameter defaulted, the backward's
  ``is_causal`` defaulting to False (a call passing ``causal=`` would silently get a non-causal
  backward), the forward's output buffer named ``out_``.

Each asserts that the unused parameters arrive as None and the features usp does not use are off.
"""

from __future__ import annotations

import types
from typing import Optional

import torch

Tensor = torch.Tensor


# ------------------------------------------------------------------------------- the mask rules
def _visible(n_q, n_k, has_left, left, right, kind) -> Tensor:
    rows = torch.arange(n_q)[:, None]
    cols = torch.arange(n_k)[None, :]
    if kind == "none":
        return torch.ones(n_q, n_k, dtype=torch.bool)
    limit_right = torch.clamp(rows + 1 + n_k - n_q + right, max=n_k)  # exclusive
    visible = cols < limit_right
    if has_left:
        visible &= cols >= torch.clamp(rows + n_k - n_q - left, min=0)
    return visible


def fa2_visible(n_q: int, n_k: int, is_causal: bool, left: int, right: int,
                backward: bool = False) -> Tensor:
    """The ``[n_q, n_k]`` mask FlashAttention-2 applies (see the module docstring)."""
    if not backward:
        if left >= n_k:
            left = -1
        if right >= n_k:
            right = -1
        if n_q == 1:
            is_causal = False
    if is_causal:
        right = 0
    causal = left < 0 and right == 0  # set_params_fprop
    if left < 0 and right >= 0:
        left = n_k
    if left >= 0 and right < 0:
        right = n_k
    local = (left >= 0 or right >= 0) and not causal
    if causal:
        return _visible(n_q, n_k, False, 0, 0, "edges")
    return _visible(n_q, n_k, True, left, right, "edges" if local else "none")


def fa3_visible(n_q: int, n_k: int, is_causal: bool, left: int, right: int) -> Tensor:
    """The ``[n_q, n_k]`` mask FlashAttention-3 applies (forward and backward alike)."""
    if left >= n_k - 1:
        left = -1
    if right >= n_q - 1:
        right = -1
    if is_causal:
        right = 0
    causal = left < 0 and right == 0
    local = (left >= 0 or right >= 0) and not causal
    if left < 0:
        left = n_k - 1
    if right < 0:
        right = n_q - 1
    if causal:
        return _visible(n_q, n_k, False, 0, 0, "edges")
    return _visible(n_q, n_k, True, left, right, "edges" if local else "none")


# ------------------------------------------------------------------------------- the arithmetic
def _heads_first(t: Tensor, n_heads: int) -> Tensor:
    # [B, S, Hkv, D] -> [B, H, S, D] in float64, kv heads repeated for GQA
    t = t.transpose(1, 2).double()
    return t.repeat_interleave(n_heads // t.shape[1], dim=1)


def masked_forward(q, k, v, visible: Tensor, scale: float):
    """``(out [B, S, H, D] in q's dtype, lse [B, H, S] fp32)``; a row with no key: 0 and +inf."""
    heads = q.shape[2]
    qh, kh, vh = _heads_first(q, heads), _heads_first(k, heads), _heads_first(v, heads)
    scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - lse.masked_fill(empty, 0)[..., None])
    out = (probs @ vh).transpose(1, 2).to(q.dtype)
    return out, lse.masked_fill(empty, float("inf")).float()


def masked_backward(dout, q, k, v, out, lse, visible: Tensor, scale: float):
    """What a flash backward computes from the given (global) out and lse."""
    heads, kv_heads = q.shape[2], k.shape[2]
    qh, kh, vh = _heads_first(q, heads), _heads_first(k, heads), _heads_first(v, heads)
    doh, oh = _heads_first(dout, heads), _heads_first(out, heads)
    scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    lse = lse.double()
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    probs = probs.masked_fill(torch.isinf(lse)[..., None], 0)
    dvh = probs.transpose(-1, -2) @ doh
    dscores = probs * (doh @ vh.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True)) * scale
    dqh, dkh = dscores @ kh, dscores.transpose(-1, -2) @ qh

    def back(t, n, like):  # [B, H, S, D] -> [B, S, n, D], summing the repeated kv heads
        t = t.unflatten(1, (n, heads // n)).sum(2)
        return t.transpose(1, 2).to(like.dtype)

    return back(dqh, heads, q), back(dkh, kv_heads, k), back(dvh, kv_heads, v)


# ------------------------------------------------------------------------------- torch's FA2
def aten_flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                       is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                       window_size_right=None):
    """``aten::_flash_attention_forward`` on the CPU with FlashAttention-2's rules."""
    assert cum_seq_q is None and cum_seq_k is None and dropout_p == 0 and not return_debug_mask
    assert (max_q, max_k) == (query.shape[1], key.shape[1])
    left = -1 if window_size_left is None else window_size_left
    right = -1 if window_size_right is None else window_size_right
    visible = fa2_visible(query.shape[1], key.shape[1], is_causal, left, right)
    out, lse = masked_forward(query, key, value, visible, scale)
    unused = torch.zeros((), dtype=torch.uint64)
    return out, lse, torch.zeros(2, dtype=torch.uint64), unused, torch.empty(0)


def aten_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                        max_k, dropout_p, is_causal, rng_state, unused, *, scale=None,
                        window_size_left=None, window_size_right=None):
    assert cum_seq_q is None and cum_seq_k is None and dropout_p == 0
    left = -1 if window_size_left is None else window_size_left
    right = -1 if window_size_right is None else window_size_right
    visible = fa2_visible(query.shape[1], key.shape[1], is_causal, left, right, backward=True)
    return masked_backward(grad_out, query, key, value, out, logsumexp, visible, scale)


ATEN_FLASH = types.SimpleNamespace(_flash_attention_forward=aten_flash_forward,
                                   _flash_attention_backward=aten_flash_backward)


# --------------------------------------------- torch's memory-efficient and cuDNN attention
def _square_or_full(q, k, attn_bias, is_causal, dropout_p):
    """These ops have no window: usp may hand them full blocks and causal squares only (their
    causal mask is top-left, which on a square is the only causal mask)."""
    assert attn_bias is None and dropout_p == 0
    assert q.shape[1] == k.shape[1], "these ops take no GQA: kv heads arrive expanded"
    n_q, n_k = q.shape[2], k.shape[2]
    assert not is_causal or n_q == n_k, f"a causal {n_q} x {n_k} block reached an op with no window"
    return torch.ones(n_q, n_k, dtype=torch.bool).tril() if is_causal else torch.ones(
        n_q, n_k, dtype=torch.bool)


def _bshd(t):
    return t.transpose(1, 2)


def efficient_forward(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0,
                      is_causal=False, *, scale=None):
    visible = _square_or_full(query, key, attn_bias, is_causal, dropout_p)
    out, lse = masked_forward(_bshd(query), _bshd(key), _bshd(value), visible, scale)
    lse = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32))  # rows padded to 32
    return _bshd(out), lse, torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)


def efficient_backward(grad_out, query, key, value, attn_bias, out, logsumexp, philox_seed,
                       philox_offset, dropout_p, grad_input_mask, is_causal=False, *, scale=None):
    visible = _square_or_full(query, key, attn_bias, is_causal, dropout_p)
    assert logsumexp.shape[-1] % 32 == 0  # the kernel reads lse in tiles of 32 rows
    lse = logsumexp[..., :query.shape[2]]
    grads = masked_backward(_bshd(grad_out), _bshd(query), _bshd(key), _bshd(value), _bshd(out),
                            lse, visible, scale)
    return (*(_bshd(g) for g in grads), None)


def cudnn_forward(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0,
                  is_causal=False, return_debug_mask=False, *, scale=None):
    visible = _square_or_full(query, key, attn_bias, is_causal, dropout_p)
    out, lse = masked_forward(_bshd(query), _bshd(key), _bshd(value), visible, scale)
    return (_bshd(out), lse.unsqueeze(-1), None, None, query.shape[2], key.shape[2], None, None,
            None)


def cudnn_backward(grad_out, query, key, value, out, logsumexp, philox_seed, philox_offset,
                   attn_bias, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, *,
                   scale=None):
    assert cum_seq_q is None and cum_seq_k is None
    visible = _square_or_full(query, key, attn_bias, is_causal, dropout_p)
    grads = masked_backward(_bshd(grad_out), _bshd(query), _bshd(key), _bshd(value), _bshd(out),
                            logsumexp.squeeze(-1), visible, scale)
    return tuple(_bshd(g) for g in grads)


ATEN_NO_WINDOW = types.SimpleNamespace(
    _scaled_dot_product_efficient_attention=efficient_forward,
    _scaled_dot_product_efficient_attention_backward=efficient_backward,
    _scaled_dot_product_cudnn_attention=cudnn_forward,
    _scaled_dot_product_cudnn_attention_backward=cudnn_backward,
)


def _fill(buffers, grads):
    for buffer, grad in zip(buffers, grads):
        buffer.copy_(grad)
    return torch.zeros(1, dtype=torch.float32)  # softmax_d


# ------------------------------------------------------------------------------------- 2.7
@torch.library.custom_op("usp_standin::fa27_forward", mutates_args=(), device_types="cpu")
def fa27_forward(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float,
                 causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                 alibi_slopes: Optional[Tensor], return_softmax: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    assert dropout_p == 0 and softcap == 0 and alibi_slopes is None and not return_softmax
    visible = fa2_visible(q.shape[1], k.shape[1], causal, window_size_left, window_size_right)
    out, lse = masked_forward(q, k, v, visible, softmax_scale)
    return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)


@torch.library.custom_op("usp_standin::fa27_backward", mutates_args=("dq", "dk", "dv"),
                         device_types="cpu")
def fa27_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                  dq: Optional[Tensor], dk: Optional[Tensor], dv: Optional[Tensor],
                  dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int,
                  window_size_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                  deterministic: bool, rng_state: Optional[Tensor] = None) -> Tensor:
    assert dropout_p == 0 and softcap == 0 and alibi_slopes is None
    visible = fa2_visible(q.shape[1], k.shape[1], causal, window_size_left, window_size_right,
                          backward=True)
    return _fill((dq, dk, dv), masked_backward(dout, q, k, v, out, softmax_lse, visible,
                                               softmax_scale))


# ------------------------------------------------------------------------------------- 2.5
def fa25_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                 return_softmax):
    assert dropout_p == 0 and alibi_slopes is None
    out, lse = masked_forward(q, k, v, fa2_visible(q.shape[1], k.shape[1], causal, *window_size),
                              softmax_scale)
    return out, q, k, v, out, lse, None, torch.zeros(2, dtype=torch.int64)


def fa25_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                  window_size, alibi_slopes, deterministic, rng_state=None):
    assert dropout_p == 0 and alibi_slopes is None
    visible = fa2_visible(q.shape[1], k.shape[1], causal, *window_size, backward=True)
    softmax_d = _fill((dq, dk, dv), masked_backward(dout, q, k, v, out, softmax_lse, visible,
                                                    softmax_scale))
    return dq, dk, dv, softmax_d


# ------------------------------------------------------------------------------------- 3
FA3_FORWARD_UNUSED = ("k_new", "v_new", "qv", "cu_seqlens_q", "cu_seqlens_k", "cu_seqlens_k_new",
                      "seqused_q", "seqused_k", "max_seqlen_q", "max_seqlen_k", "page_table",
                      "kv_batch_idx", "leftpad_k", "rotary_cos", "rotary_sin", "seqlens_rotary",
                      "q_descale", "k_descale", "v_descale")


def _fa3_forward(q, k, v, unused, softmax_scale, causal, left, right, softcap):
    assert all(x is None for x in unused) and softcap == 0
    out, lse = masked_forward(q, k, v, fa3_visible(q.shape[1], k.shape[1], causal, left, right),
                              softmax_scale)
    return out, lse, None, None


def _fa3_backward(dout, q, k, v, out, softmax_lse, unused, dq, dk, dv, softmax_scale, causal,
                  left, right, softcap):
    assert all(x is None for x in unused) and softcap == 0
    visible = fa3_visible(q.shape[1], k.shape[1], causal, left, right)
    return _fill((dq, dk, dv), masked_backward(dout, q, k, v, out, softmax_lse, visible,
                                               softmax_scale))


def fa3_forward(q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new,
                seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx,
                leftpad_k, rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale,
                v_descale, softmax_scale, causal, window_size=(-1, -1), attention_chunk=0,
                softcap=0.0, rotary_interleaved=True, scheduler_metadata=None, num_splits=1,
                pack_gqa=None, sm_margin=0):
    unused = (k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q,
              seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k,
              rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale)
    return _fa3_forward(q, k, v, unused, softmax_scale, causal, *window_size, softcap)


def fa3_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
                 max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal,
                 window_size=(-1, -1), softcap=0.0, deterministic=False, sm_margin=0):
    unused = (cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k, max_seqlen_q, max_seqlen_k)
    softmax_d = _fa3_backward(dout, q, k, v, out, softmax_lse, unused, dq, dk, dv, softmax_scale,
                              causal, *window_size, softcap)
    return dq, dk, dv, softmax_d


# --------------------------------------------------------------- 3 as custom ops (is_causal)
def fa3_ops_forward(q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new,
                    seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx,
                    leftpad_k, rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale,
                    v_descale, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                    attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                    scheduler_metadata=None, num_splits=1, pack_gqa=None, sm_margin=0):
    unused = (k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q,
              seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k,
              rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale)
    return _fa3_forward(q, k, v, unused, softmax_scale, causal, window_size_left,
                        window_size_right, softcap)


def fa3_ops_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q,
                     sequed_k, max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, is_causal,
                     window_size_left=-1, window_size_right=-1, softcap=0.0,
                     deterministic=False, sm_margin=0):
    unused = (cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k, max_seqlen_q, max_seqlen_k)
    return _fa3_backward(dout, q, k, v, out, softmax_lse, unused, dq, dk, dv, softmax_scale,
                         is_causal, window_size_left, window_size_right, softcap)


# ------------------------------------------------------------- 3 today (defaults everywhere)
def fa3_head_forward(q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None,
                     cu_seqlens_k=None, cu_seqlens_k_new=None, seqused_q=None, seqused_k=None,
                     max_seqlen_q=None, max_seqlen_k=None, page_table=None, kv_batch_idx=None,
                     leftpad_k=None, rotary_cos=None, rotary_sin=None, seqlens_rotary=None,
                     q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
                     causal=False, window_size_left=-1, window_size_right=-1, attention_chunk=0,
                     softcap=0.0, rotary_interleaved=True, scheduler_metadata=None, num_splits=1,
                     pack_gqa=None, sm_margin=0):
    unused = (k_new, v_new, qv, out_, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q,
              seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k,
              rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale)
    return _fa3_forward(q, k, v, unused, softmax_scale, causal, window_size_left,
                        window_size_right, softcap)


def fa3_head_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None,
                      sequed_q=None, sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None,
                      dk=None, dv=None, softmax_scale=None, is_causal=False, window_size_left=-1,
                      window_size_right=-1, softcap=0.0, deterministic=False, sm_margin=0):
    unused = (cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k, max_seqlen_q, max_seqlen_k)
    return _fa3_backward(dout, q, k, v, out, softmax_lse, unused, dq, dk, dv, softmax_scale,
                         is_causal, window_size_left, window_size_right, softcap)


def module(name: str, forward, backward) -> types.ModuleType:
    interface = types.ModuleType(name)
    interface._flash_attn_forward, interface._flash_attn_backward = forward, backward
    return interface


# generation -> (forward, backward, FlashAttention-3?)
GENERATIONS = {
    "v27": (fa27_forward, fa27_backward, False),
    "v25": (fa25_forward, fa25_backward, False),
    "v3": (fa3_forward, fa3_backward, True),
    "v3_ops": (fa3_ops_forward, fa3_ops_backward, True),
    "v3_head": (fa3_head_forward, fa3_head_backward, True),
}
