"""The gated delta rule on one rank's block, chunk by chunk, in pieces the ring can order.

Per value head, with the state ``S`` ``[Dk, Dv]`` and ``G_t = exp(Σ g)`` inside a chunk::

    S_t = exp(g_t) (I - β_t k_t k_t^T) S_{t-1} + β_t k_t v_t^T        o_t = S_t^T q_t

and ``S_{t-1} = 0`` at the first token of every segment. In a chunk of ``Q`` tokens that starts
from ``S_0`` the WY form of the delta rule gives (``T = I + strictly_lower(β_t k_t·k_s G_t/G_s)``,
pairs of one segment only)::

    U = T⁻¹ (β v)        W = T⁻¹ (β k G e)          new values: V = U - W S_0
    o = (q G e) S_0 + [(q k^T) ⊙ G_t/G_s ⊙ same segment, s <= t] V
    S_Q = γ S_0 + K_d^T V,      K_d = k G_Q/G f,    γ = G_Q e_Q

where ``e_t`` says token ``t`` is still in the chunk's entry segment and ``f_s`` that token ``s``
is in the segment of the chunk's last token. So a chunk is an affine map of the state,
``S ↦ (γ I - K_d^T W) S + K_d^T U``, and so is a block: ``S_out = M S_in + N``.

- :func:`prepare` computes everything that does not depend on the entering state (the bulk:
  the triangular solves and the chunk-local products);
- :func:`run_states` walks the chunks from a given entering state (each chunk's start state and
  new values) and returns the leaving state;
- :func:`outputs` turns those into ``o``; :func:`transition` builds ``M`` (``Dk x Dk`` per head,
  two low-rank products per chunk) for ranks in the middle of the ring.

All arithmetic runs in fp32 (fp64 for fp64 inputs); tensors are laid out ``[B, H, c, Q, ..]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from usp.scan.reference import l2_normalised
from usp.scan.segments import BlockSegments, chunk_masks
from usp.scan.ssd_local import compute_dtype, decay_matrix, from_chunks, to_chunks

Tensor = torch.Tensor


@dataclass
class DeltaBlock:
    """What the chunks of one block need, none of it depending on the entering state."""

    length: int
    new_values: Tensor  # U [B, H, c, Q, Dv]
    reads_state: Tensor  # W [B, H, c, Q, Dk]
    scores: Tensor  # [B, H, c, Q, Q]: (q k^T) ⊙ decay, causal, one segment
    queries: Tensor  # q G e [B, H, c, Q, Dk]
    keys_to_end: Tensor  # K_d [B, H, c, Q, Dk]
    gamma: Tensor  # [B, H, c]


def prepare(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
            segments: BlockSegments | None, chunk: int, *, scale: float,
            normalise_qk: bool) -> DeltaBlock:
    """q/k ``[B, L, G, Dk]`` (one per group of value heads: value head ``h`` reads group
    ``h // (H/G)``), v ``[B, L, H, Dv]``, g/beta ``[B, L, H]``. The group's q and k are never
    copied to its heads: their products with each other are taken once per group, and what
    each head adds (its decay and β) is a broadcast product beside them."""
    dtype, length, groups = compute_dtype(v.dtype), v.shape[1], q.shape[2]
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    if normalise_qk:
        q, k = l2_normalised(q), l2_normalised(k)
    q = q * scale
    q, k = (to_chunks(t, chunk)[:, :, None] for t in (q, k))  # [B, G, 1, c, Q, Dk]
    v = to_chunks(v, chunk)  # [B, H, c, Q, Dv]
    g, beta = to_chunks(g, chunk), to_chunks(beta, chunk)  # [B, H, c, Q]
    cum = g.cumsum(dim=-1)
    decay = decay_matrix(g)  # [t, s]: G_t / G_s for s <= t
    reach = cum.exp()  # G_t: from the chunk's start to t
    to_end = (cum[..., -1:] - cum).exp()  # G_Q / G_s
    gamma = cum[..., -1].exp()
    if segments is not None:
        masks = chunk_masks(segments, chunk, dtype, v.device)
        decay = decay * masks.same[:, None]
        reach = reach * masks.from_entry[:, None]
        to_end = to_end * masks.to_end[:, None]
        gamma = gamma * masks.through[:, None]

    def by_group(t: Tensor) -> Tensor:  # [B, H, ..] -> [B, G, H/G, ..] (a view)
        return t.unflatten(1, (groups, -1))

    # T's off-diagonal β_t k_t·k_s G_t/G_s (its diagonal is ignored: T has ones there)
    system = (k @ k.transpose(-1, -2)) * by_group(beta[..., None] * decay)
    solve = lambda rhs: torch.linalg.solve_triangular(  # noqa: E731
        system, rhs, upper=False, unitriangular=True)
    block = dict(
        new_values=solve(by_group(v * beta[..., None])),
        reads_state=solve(k * by_group(beta * reach)[..., None]),
        scores=(q @ k.transpose(-1, -2)) * by_group(decay),
        queries=q * by_group(reach)[..., None],
        keys_to_end=k * by_group(to_end)[..., None],
    )
    # [B, G, H/G, c, Q, ..] -> [B, H, c, Q, ..]
    return DeltaBlock(length=length, gamma=gamma,
                      **{name: t.flatten(1, 2) for name, t in block.items()})


def run_states(block: DeltaBlock, entering: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Walk the chunks from ``entering`` ``[B, H, Dk, Dv]`` (None: zero): each chunk's start
    state ``[B, H, c, Dk, Dv]``, its new values ``V`` ``[B, H, c, Q, Dv]`` and the leaving state."""
    batch, heads, chunks = block.gamma.shape
    state = (block.new_values.new_zeros(batch, heads, block.reads_state.shape[-1],
                                        block.new_values.shape[-1])
             if entering is None else entering)
    starts, values = [], []
    for index in range(chunks):  # sequential: each chunk needs the state the previous one left
        starts.append(state)
        value = block.new_values[:, :, index] - block.reads_state[:, :, index] @ state
        values.append(value)
        state = (block.gamma[:, :, index, None, None] * state
                 + block.keys_to_end[:, :, index].transpose(-1, -2) @ value)
    return torch.stack(starts, dim=2), torch.stack(values, dim=2), state


def outputs(block: DeltaBlock, starts: Tensor, values: Tensor) -> Tensor:
    """o ``[B, L, H, Dv]`` (compute dtype) from :func:`run_states`' start states and values."""
    o = block.queries @ starts + block.scores @ values  # [B, H, c, Q, Dv]
    return from_chunks(o, block.length)


def transition(block: DeltaBlock) -> Tensor:
    """``M`` ``[B, H, Dk, Dk]``: the block's linear part, ``S_out = M S_in + N``; each chunk
    multiplies it by ``γ I - K_d^T W`` as two products of rank ``Q``."""
    batch, heads, chunks = block.gamma.shape
    size = block.reads_state.shape[-1]
    matrix = torch.eye(size, dtype=block.gamma.dtype, device=block.gamma.device)
    matrix = matrix.expand(batch, heads, size, size)
    for index in range(chunks):
        reads = block.reads_state[:, :, index] @ matrix  # [B, H, Q, Dk]
        matrix = (block.gamma[:, :, index, None, None] * matrix
                  - block.keys_to_end[:, :, index].transpose(-1, -2) @ reads)
    return matrix
