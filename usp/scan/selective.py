"""selective_scan: Mamba-1's selective scan (Jamba's Mamba layers) over a sequence split on
ring × Ulysses ranks.

Per channel ``d`` and state entry ``n`` (``A`` ``[D, N]``, input-dependent ``Δ``, ``B``, ``C``)::

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t        y_t = C_t · h_t + D x_t   (× silu(z_t))

The transition is diagonal, so a block is the affine map ``S_out = exp(Σ_t Δ_t A) ⊙ S_in +
H_end`` of the state entering it, ``H`` the block's states from a zero start: each rank scans its
own shard for every channel from zero, the state passes along every ring × ulysses shard in
sequence order (:mod:`usp.scan.chain`: one ``[B, D, N]`` state per rank and direction, no
all-to-all), and the entering state then adds ``C_t · (exp(Σ_{s<=t} Δ_s A) ⊙ S_in)`` to each of
the block's outputs. Packed documents and padding restart the state at every segment
(:mod:`usp.scan.segments`). The block is scanned one token at a time, as transformers' PyTorch
path does (no fused kernel here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usp.scan.calls import (check_positive_int, check_same, check_scan_layout, check_tensor,
                            describe, digest, sequence_segments)
from usp.scan.chain import chain_of, pass_along
from usp.scan.segments import BlockSegments, block_segments
from usp.scan.ssd_local import compute_dtype
from usp.topology import Topology

Tensor = torch.Tensor


def _check(x, dt, a, b, c, d, z, dt_bias, topology, layout) -> None:
    check_scan_layout(layout, topology)
    check_tensor("x", x, 3, "[B, D, S_local]")
    check_tensor("dt", dt, 3, "[B, D, S_local]")
    check_tensor("A", a, 2, "[D, N]")
    check_tensor("B", b, 3, "[B, N, S_local]")
    check_tensor("C", c, 3, "[B, N, S_local]")
    batch, channels, length = x.shape
    for name, value in (("dt", dt), ("z", z)):
        if value is not None and tuple(value.shape) != tuple(x.shape):
            raise ValueError(f"{name} {tuple(value.shape)} must be [B, D, S_local] = "
                             f"{tuple(x.shape)} as x")
    states = a.shape[1]
    if a.shape[0] != channels:
        raise ValueError(f"A {tuple(a.shape)} must be [D, N] with D = {channels} as x")
    for name, value in (("B", b), ("C", c)):
        if tuple(value.shape) != (batch, states, length):
            raise ValueError(f"{name} {tuple(value.shape)} must be [B, N, S_local] = "
                             f"{(batch, states, length)}")
    for name, value in (("D", d), ("dt_bias", dt_bias)):
        if value is None:
            continue
        check_tensor(name, value, 1, "[D]")
        if value.shape[0] != channels:
            raise ValueError(f"{name} {tuple(value.shape)} must be [D] = [{channels}]")
    for name, value in (("dt", dt), ("A", a), ("B", b), ("C", c), ("D", d), ("z", z),
                        ("dt_bias", dt_bias)):
        if value is not None:
            check_same(name, value, x, "x")
    check_positive_int("local sequence length", length)


def carried(segments: BlockSegments | None, length: int) -> Tensor | None:
    """``[rows, L]`` 1 where the state reaches token ``t`` from the token before it (the same
    segment; for the block's first token, the segment of the token before the block), else 0;
    None: everywhere (one run of tokens)."""
    if segments is None:
        return None
    ids = segments.ids
    before = torch.cat([segments.entry[:, None], ids[:, :-1]], dim=1)
    return (ids == before)[:, :length]


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, topology: Topology,
                   *, D: Tensor | None = None, z: Tensor | None = None,
                   dt_bias: Tensor | None = None, dt_softplus: bool = False,
                   layout: str = "contiguous", documents=None, cu_seqlens=None,
                   seq_len: int | None = None) -> Tensor:
    """Mamba-1's selective scan of a sequence split over ring × ulysses ranks, exact.

    Shapes and meaning are those of transformers' ``mamba_selective_scan`` (Jamba) on this
    rank's contiguous shard, channels first: x, dt and z ``[B, D, S_RU]``, A ``[D, N]``
    (negative), B/C ``[B, N, S_RU]``, D and dt_bias ``[D]``; ``dt + dt_bias``, then softplus
    when ``dt_softplus``. Returns y ``[B, D, S_RU]`` in x's dtype (times ``silu(z)`` when z is
    given), accumulated in fp32 (fp64 for fp64 inputs). ``documents`` / ``cu_seqlens`` /
    ``seq_len`` describe the global sequence as for :func:`usp.usp_attention`: the state
    restarts from zero at every document (and padding slot). With ring > 1 the layout must be
    ``contiguous``. Bad input raises the same ValueError on every rank of the sequence group
    before any collective. Differentiable in every tensor argument.
    """
    error, segments = None, None
    try:
        _check(x, dt, A, B, C, D, z, dt_bias, topology, layout)
        segments = sequence_segments(
            x.shape[-1], x.shape[0], topology, layout, documents=documents,
            cu_seqlens=cu_seqlens, seq_len=seq_len)
    except Exception as exc:  # any failure before a collective reaches every rank, as one error
        error = exc
    description = describe({"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z,
                            "dt_bias": dt_bias}, layout=layout, dt_softplus=dt_softplus,
                           documents=digest(segments))
    topology.agree_on_call(description, error)

    dtype, length = compute_dtype(x.dtype), x.shape[-1]
    step = dt.to(dtype)
    if dt_bias is not None:
        step = step + dt_bias.to(dtype)[:, None]
    if dt_softplus:
        step = F.softplus(step)
    log_decay = A.to(dtype)[None, :, None, :] * step[..., None]  # [B, D, L, N]
    inputs = step[..., None] * B.to(dtype).transpose(1, 2)[:, None] * x.to(dtype)[..., None]
    keep = carried(block_segments(segments, topology.sequence_size, topology.sequence_rank),
                   length)
    decay = log_decay.exp()
    # the entering state's reach: exp(Σ_{s<=t} Δ_s A) while the block's entry segment lasts
    reach = log_decay.cumsum(dim=2).exp()
    if keep is not None:
        keep = keep.to(device=x.device, dtype=dtype)[:, None, :, None]  # [rows, 1, L, 1]
        decay = decay * keep
        reach = reach * keep.cumprod(dim=2)
    state = inputs.new_zeros(inputs.shape[0], inputs.shape[1], inputs.shape[3])
    states = []
    for index in range(length):  # sequential: each token needs the state the previous one left
        state = decay[:, :, index] * state + inputs[:, :, index]
        states.append(state)
    states = torch.stack(states, dim=2)  # [B, D, L, N], from a zero start

    chain = chain_of(topology, over_ulysses=True)

    def leaving(entering: Tensor | None) -> Tensor:  # S_out = exp(Σ Δ A) ⊙ S_in + H_end
        return state if entering is None else reach[:, :, -1] * entering + state

    entering, token = pass_along(chain, leaving, state, anchor=inputs)
    if entering is not None:
        states = states + reach * entering[:, :, None, :]
    y = (states * C.to(dtype).transpose(1, 2)[:, None]).sum(dim=-1)  # [B, D, L]
    if D is not None:
        y = y + D.to(dtype)[:, None] * x.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    if token is not None:
        y = y + token
    chain.finish()
    return y.to(x.dtype)
