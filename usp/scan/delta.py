"""gated_delta_scan: the gated delta rule (Qwen3-Next's linear attention) over a sequence split
on ring × Ulysses ranks.

The path is SSD's (:mod:`usp.scan.ssd`): Ulysses hands each rank every token of its ring block
for its value heads and the key heads they read (``ulysses="heads"``; with ``"state"`` the
block is the rank's own shard, every head); the block is prepared without the entering state
(:func:`usp.scan.delta_local.prepare`, the bulk of the work); the block's affine map
``S_out = M S_in + N`` — here ``M`` is a ``Dk x Dk`` matrix per head, built only on the blocks
between the first and the last — carries the state along the chain; the chunks are then
walked from the real entering state and the outputs travel back. One ``[B, Hv_U, Dk, Dv]``
state (``[B, Hv, Dk, Dv]`` under ``"state"``) per rank and direction.
"""

from __future__ import annotations

import torch

from usp.choices import scan_ulysses
from usp.scan.calls import (check_groups, check_positive_int, check_same, check_scale,
                            check_scan_layout, check_tensor, check_ulysses_mode, describe, digest,
                            scan_block, sequence_segments)
from usp.scan.chain import StateChain, chain_of, pass_along
from usp.scan.delta_local import outputs, prepare, run_states, transition
from usp.scan.segments import block_segments
from usp.scan.slots import from_rank_heads, rank_heads_of, to_rank_heads
from usp.topology import Topology

Tensor = torch.Tensor


def _check(q, k, v, g, beta, chunk_size, scale, topology, layout, ulysses) -> None:
    check_scan_layout(layout, topology)
    check_ulysses_mode(ulysses)
    check_tensor("q", q, 4, "[B, S_local, Hk, Dk]")
    check_tensor("k", k, 4, "[B, S_local, Hk, Dk]")
    check_tensor("v", v, 4, "[B, S_local, Hv, Dv]")
    check_tensor("g", g, 3, "[B, S_local, Hv]")
    check_tensor("beta", beta, 3, "[B, S_local, Hv]")
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have one shape "
                         f"[B, S_local, Hk, Dk]")
    batch, length, value_heads, _ = v.shape
    if tuple(k.shape[:2]) != (batch, length):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on batch and "
                         f"local sequence length")
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != (batch, length, value_heads):
            raise ValueError(f"{name} {tuple(t.shape)} must be [B, S_local, Hv] = "
                             f"{(batch, length, value_heads)} (v is {tuple(v.shape)})")
    check_groups(value_heads, k.shape[2], "v and q/k")
    for name, t in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        check_same(name, t, q, "q")
    check_positive_int("chunk_size", chunk_size)
    check_scale(scale)


def _walk_and_map(block, chain: StateChain):
    """Before waiting for the entering state: ``(walk, N, M)``. The first rank's block starts
    from zero, so its one walk gives its outputs and ``N`` (``M`` multiplies a zero state);
    a middle rank walks once from zero for ``N`` and builds ``M``; the last needs neither."""
    if chain.first:
        walk = run_states(block, None)
        return walk, walk[2], None
    if chain.last:
        return None, None, None
    return None, run_states(block, None)[2], transition(block)


def gated_delta_scan(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                     topology: Topology, *, chunk_size: int = 64, use_qk_l2norm: bool = False,
                     scale: float | None = None, layout: str = "contiguous", documents=None,
                     cu_seqlens=None, seq_len: int | None = None,
                     ulysses: str = "auto") -> Tensor:
    """The gated delta rule over a sequence split over ring × ulysses ranks, exact.

    Shapes and meaning are those of transformers' ``torch_chunk_gated_delta_rule`` (Qwen3-Next)
    on this rank's contiguous shard: q/k ``[B, S_RU, Hk, Dk]``, v ``[B, S_RU, Hv, Dv]`` (value
    head ``h`` reads key head ``h // (Hv/Hk)``), g ``[B, S_RU, Hv]`` (log decay, <= 0), beta
    ``[B, S_RU, Hv]``. With ``q, k`` L2-normalised when ``use_qk_l2norm``, ``q`` scaled by
    ``scale`` (default ``Dk^-1/2``) and the state ``S`` ``[Dk, Dv]``::

        S_t = exp(g_t) (I - β_t k_t k_t^T) S_{t-1} + β_t k_t v_t^T        o_t = S_t^T q_t

    Returns o ``[B, S_RU, Hv, Dv]`` in q's dtype, accumulated in fp32 (fp64 for fp64 inputs).
    Documents, layout, head padding, errors and gradients as :func:`usp.scan.ssd_scan`.
    ``ulysses`` as there, but ``"auto"`` picks ``"state"`` only when the sequence spans two
    ranks: here ``M`` is a ``Dk x Dk`` matrix per head that every block between the first and
    the last builds (about doubling its work), so with more ranks ``"heads"`` keeps the chain to
    the ring and each rank building ``M`` for its slice of the heads.
    """
    error, segments = None, None
    try:
        _check(q, k, v, g, beta, chunk_size, scale, topology, layout, ulysses)
        segments = sequence_segments(
            v.shape[1], v.shape[0], topology, layout, documents=documents,
            cu_seqlens=cu_seqlens, seq_len=seq_len)
    except Exception as exc:  # any failure before a collective reaches every rank, as one error
        error = exc
    description = describe({"q": q, "k": k, "v": v, "g": g, "beta": beta}, layout=layout,
                           chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, scale=scale,
                           documents=digest(segments), ulysses=ulysses)
    topology.agree_on_call(description, error)

    ulysses = scan_ulysses(ulysses, topology.sequence_size, matrix_transition=True)
    place = rank_heads_of(v.shape[2], k.shape[2], topology, split=ulysses == "heads")
    # [B, S_RU, H, ..] -> [B, S_block, slots, ..]: this rank's block, its value heads
    # (q and k stay one per group: never copied to the value heads that read them)
    (v_slots, g_slots, beta_slots), (q_slots, k_slots) = to_rank_heads(
        place, [v, g[..., None], beta[..., None]], [q, k])
    block = prepare(q_slots, k_slots, v_slots, g_slots[..., 0], beta_slots[..., 0],
                    block_segments(segments, *scan_block(topology, ulysses)), chunk_size,
                    scale=q.shape[-1] ** -0.5 if scale is None else scale,
                    normalise_qk=use_qk_l2norm)
    chain = chain_of(topology, over_ulysses=ulysses == "state")
    walk, leaving_from_zero, matrix = _walk_and_map(block, chain)

    def leaving(entering: Tensor | None) -> Tensor:  # S_out = M S_in + N
        return leaving_from_zero if entering is None else matrix @ entering + leaving_from_zero

    like = block.new_values.new_empty(block.gamma.shape[:2] + (k.shape[-1], v.shape[-1]))
    entering, token = pass_along(chain, leaving, like, anchor=block.new_values)
    starts, values, _ = walk if walk is not None else run_states(block, entering)
    o = outputs(block, starts, values)  # [B, S_R, slots, Dv]
    if token is not None:
        o = o + token
    chain.finish()
    return from_rank_heads(place, o).to(q.dtype)  # [B, S_RU, Hv, Dv]
