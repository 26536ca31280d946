"""The recurrences token by token, in one process: the definitions the tests and the docs
hold every chunked and sequence-parallel path to (slow; any dtype; differentiable).

``documents`` ``[S]`` or ``[B, S]``: ids per token; the state restarts from zero wherever the id
changes (each packed document as if it ran alone; runs of ``-1`` padding are their own runs).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _restarts(documents: Tensor | None, batch: int, length: int) -> Tensor:
    """``[B, S]`` booleans: the state restarts before token ``t``."""
    restart = torch.zeros(batch, length, dtype=torch.bool)
    restart[:, 0] = True
    if documents is not None:
        ids = documents.reshape(-1, length).expand(batch, -1).cpu()
        restart[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return restart


def ssd_recurrence(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor,
                   d: Tensor | None = None,
                   documents: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mamba-2: x ``[B, S, H, P]``, dt ``[B, S, H]``, a ``[H]``, b/c ``[B, S, G, N]`` (head
    ``h`` reads group ``h // (H/G)``), d ``[H]``; returns y ``[B, S, H, P]`` and the final state
    ``[B, H, P, N]``::

        S_t = exp(dt_t a) S_{t-1} + (dt_t x_t) B_t^T        y_t = S_t C_t + d x_t
    """
    batch, length, heads, _ = x.shape
    repeat = heads // b.shape[2]
    b, c = b.repeat_interleave(repeat, dim=2), c.repeat_interleave(repeat, dim=2)
    restart = _restarts(documents, batch, length)
    state = x.new_zeros(batch, heads, x.shape[3], b.shape[3])
    outputs = []
    for t in range(length):
        keep = (~restart[:, t]).to(x.dtype)[:, None, None, None].to(x.device)
        decay = torch.exp(dt[:, t] * a)[..., None, None]  # [B, H, 1, 1]
        state = decay * state * keep + (dt[:, t, :, None] * x[:, t])[..., None] * b[:, t, :, None]
        y = (state * c[:, t, :, None]).sum(-1)  # [B, H, P]
        if d is not None:
            y = y + d[:, None] * x[:, t]
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


def l2_normalised(t: Tensor, eps: float = 1e-6) -> Tensor:
    """``t / sqrt(Σ t² + eps)`` over the last dim (the gated delta rule's q/k normalisation, as
    Qwen3-Next and flash-linear-attention compute it)."""
    return t * torch.rsqrt((t * t).sum(dim=-1, keepdim=True) + eps)


def gated_delta_recurrence(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                           scale: float | None = None, normalise_qk: bool = True,
                           documents: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule: q/k ``[B, S, Hk, Dk]``, v ``[B, S, Hv, Dv]`` (value head ``h``
    reads key head ``h // (Hv/Hk)``), g ``[B, S, Hv]`` (log decay), beta ``[B, S, Hv]``; returns
    o ``[B, S, Hv, Dv]`` and the final state ``[B, Hv, Dk, Dv]``. With ``S`` ``[Dk, Dv]``::

        S_t = exp(g_t) (I - β_t k_t k_t^T) S_{t-1} + β_t k_t v_t^T        o_t = S_t^T q_t

    after ``q, k`` are L2-normalised (``normalise_qk``) and ``q`` scaled by ``scale``
    (default ``Dk^-1/2``): transformers' Qwen3-Next convention.
    """
    batch, length, heads, value_dim = v.shape
    repeat = heads // k.shape[2]
    if normalise_qk:
        q, k = l2_normalised(q), l2_normalised(k)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    q, k = q.repeat_interleave(repeat, dim=2), k.repeat_interleave(repeat, dim=2)
    restart = _restarts(documents, batch, length)
    state = v.new_zeros(batch, heads, k.shape[-1], value_dim)
    outputs = []
    for t in range(length):
        keep = (~restart[:, t]).to(v.dtype)[:, None, None, None].to(v.device)
        state = state * keep * torch.exp(g[:, t])[..., None, None]
        k_t, v_t = k[:, t], v[:, t]  # [B, H, Dk], [B, H, Dv]
        remembered = (state * k_t[..., None]).sum(dim=-2)  # S^T k: [B, H, Dv]
        state = state + k_t[..., None] * (beta[:, t, :, None] * (v_t - remembered))[..., None, :]
        outputs.append((state * q[:, t, :, :, None]).sum(dim=-2))
    return torch.stack(outputs, dim=1), state


def selective_recurrence(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor,
                         d: Tensor | None = None, z: Tensor | None = None,
                         documents: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mamba-1's selective scan, channels first: x, dt, z ``[B, D, S]`` (dt already
    discretised: bias and softplus applied), a ``[D, N]``, b/c ``[B, N, S]``, d ``[D]``; returns
    y ``[B, D, S]`` and the final state ``[B, D, N]``::

        h_t = exp(dt_t a) ⊙ h_{t-1} + dt_t x_t b_t        y_t = h_t c_t + d x_t   (× silu(z_t))
    """
    batch, channels, length = x.shape
    restart = _restarts(documents, batch, length)
    state = x.new_zeros(batch, channels, a.shape[1])
    outputs = []
    for t in range(length):
        keep = (~restart[:, t]).to(x.dtype)[:, None, None].to(x.device)
        decay = torch.exp(dt[:, :, t, None] * a)  # [B, D, N]
        state = decay * state * keep + (dt[:, :, t] * x[:, :, t])[..., None] * b[:, None, :, t]
        y = (state * c[:, None, :, t]).sum(-1)  # [B, D]
        if d is not None:
            y = y + d * x[:, :, t]
        if z is not None:
            y = y * torch.nn.functional.silu(z[:, :, t])
        outputs.append(y)
    return torch.stack(outputs, dim=-1), state
