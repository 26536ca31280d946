"""Masked attention inside one spawned world: documents, sliding windows, both, padding, uneven
lengths; every (ring, ulysses) factorisation, every layout, causal and not, GQA; forward and
dQ/dK/dV against a single-process fp64 reference with the same dense mask."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

import usp
from tests.attention_cases import DTYPES, max_error
from tests.distributed import collect_failures
from usp.mask import AttentionMask

BATCH, HEADS, HEAD_DIM = 2, 4, 8
ATOL = {"fp32": 1e-5, "bf16": 2e-2}


@dataclass(frozen=True)
class MaskCase:
    ring: int
    ulysses: int
    layout: str
    causal: bool
    n_kv_heads: int
    kind: str  # documents | window | documents+window | padding | uneven
    dtype: str = "fp64"
    ring_layout: str | None = None  # the ring re-lays the blocks into this layout and back


def mask_arguments(kind: str, seq_len: int, causal: bool) -> dict:
    """usp_attention's mask keywords for a global sequence of ``seq_len`` tokens."""
    # a document of 1 token, short ones, one longer than a rank's shard, and a last one
    cuts = [0, 1, 5, seq_len // 2 + 3, seq_len // 2 + 4, seq_len]
    window = (5, 0) if causal else (4, 3)
    if kind == "documents":
        return {"cu_seqlens": torch.tensor(cuts)}
    if kind == "window":
        return {"window": window}
    if kind == "documents+window":
        return {"cu_seqlens": torch.tensor(cuts), "window": window}
    if kind == "padding":  # right padding, different per batch row
        lengths = torch.tensor([seq_len - 7, seq_len])
        return {"padding_mask": torch.arange(seq_len)[None, :] < lengths[:, None]}
    raise ValueError(kind)


def masked_reference(q, k, v, dout, visible):
    """fp64 attention under a dense mask ``[B or 1, S, S]`` and its gradients (autograd);
    rows that see no key give output 0 and no gradient."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    groups = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in leaves)
    kh, vh = kh.repeat_interleave(groups, 1), vh.repeat_interleave(groups, 1)
    scores = (qh @ kh.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (probs @ vh).transpose(1, 2)
    out.backward(dout)
    return (out.detach(), *(t.grad for t in leaves))


def check_mask_case(case: MaskCase, topology, seq_len: int) -> None:
    if case.kind == "uneven":  # a length no layout splits evenly: shards are padded
        seq_len, options = seq_len - 5, {}
    else:
        options = mask_arguments(case.kind, seq_len, case.causal)
    g = torch.Generator().manual_seed(7)
    make = lambda h: torch.randn(BATCH, seq_len, h, HEAD_DIM, generator=g,  # noqa: E731
                                 dtype=torch.float64)
    q, k, v, dout = make(HEADS), make(case.n_kv_heads), make(case.n_kv_heads), make(HEADS)
    mask = AttentionMask.build(seq_len, causal=case.causal, **options)
    visible = torch.stack([mask.visible(row) for row in range(mask.batch_rows)])
    expected = masked_reference(q, k, v, dout, visible)
    dtype = DTYPES[case.dtype]
    shard = lambda t: usp.shard_sequence(t, topology, case.layout)  # noqa: E731
    leaves = [shard(t).to(dtype).requires_grad_() for t in (q, k, v)]
    out = usp.usp_attention(*leaves, topology, causal=case.causal, layout=case.layout,
                            seq_len=seq_len, ring_layout=case.ring_layout, **options)
    out.backward(shard(dout).to(dtype))
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in leaves)),
                               expected):
        got = usp.unshard_sequence(got.detach(), topology, case.layout, seq_len=seq_len)
        error = max_error(got, want)
        bound = 1e-10 if case.dtype == "fp64" else ATOL[case.dtype] * max(1.0, want.abs().max())
        if not error <= bound:
            raise AssertionError(f"{name} error {error:.3e} > {bound:.3e}")


def run_mask_grid(rank: int, world_size: int, seq_len: int, kinds: list[str],
                  low_precision: bool = True, kv_heads: tuple[int, ...] | None = None) -> list[str]:
    """Every factorisation of the world x layouts x causal x kv heads (``kv_heads``, default
    Hq, Hq/2 and 1) x mask kinds (fp64), and one layout of each in fp32 and bf16
    (``low_precision``). Returns the failures."""
    kv_heads = kv_heads or (HEADS, HEADS // 2, 1)
    failures = []
    for ring in (r for r in range(1, world_size + 1) if world_size % r == 0):
        ulysses = world_size // ring
        topology = usp.Topology.build(ring=ring, ulysses=ulysses)
        cases = [MaskCase(ring, ulysses, layout, causal, hkv, kind)
                 for layout, causal, hkv, kind in itertools.product(
                     usp.LAYOUTS, (True, False), kv_heads, kinds)]
        if low_precision:
            cases += [MaskCase(ring, ulysses, "zigzag", True, HEADS // 2, kind, dtype)
                      for kind in kinds for dtype in ("fp32", "bf16")]
        if ring > 1 and low_precision:  # contiguous shards, the ring on a balanced layout
            cases += [MaskCase(ring, ulysses, "contiguous", causal, HEADS // 2, kind,
                               ring_layout="zigzag")
                      for causal, kind in itertools.product((True, False), kinds)
                      if kind != "uneven"]
            cases += [MaskCase(ring, ulysses, "contiguous", True, HEADS // 2, kind,
                               ring_layout="stripe") for kind in ("documents", "uneven")]
        failures += [f"rank {rank} {f}" for f in
                     collect_failures(cases, lambda c: check_mask_case(c, topology, seq_len))]
    return failures


HEAD_COUNTS = [(14, 14), (14, 2), (12, 6), (6, 6), (6, 3)]  # query heads, kv heads


def check_uneven_heads(topology, n_heads: int, n_kv_heads: int, layout: str, causal: bool,
                       dtype: str, seq_len: int) -> None:
    g = torch.Generator().manual_seed(11)
    make = lambda h: torch.randn(BATCH, seq_len, h, HEAD_DIM, generator=g,  # noqa: E731
                                 dtype=torch.float64)
    q, k, v, dout = make(n_heads), make(n_kv_heads), make(n_kv_heads), make(n_heads)
    visible = AttentionMask.build(seq_len, causal=causal).visible()[None]
    expected = masked_reference(q, k, v, dout, visible)
    shard = lambda t: usp.shard_sequence(t, topology, layout)  # noqa: E731
    leaves = [shard(t).to(DTYPES[dtype]).requires_grad_() for t in (q, k, v)]
    out = usp.usp_attention(*leaves, topology, causal=causal, layout=layout)
    out.backward(shard(dout).to(DTYPES[dtype]))
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in leaves)),
                               expected):
        error = max_error(got, shard(want))
        bound = 1e-10 if dtype == "fp64" else ATOL[dtype] * max(1.0, want.abs().max())
        if not error <= bound:
            raise AssertionError(f"{name} error {error:.3e} > {bound:.3e}")


def run_uneven_heads(rank: int, world_size: int, seq_len: int) -> list[str]:
    """Head counts Ulysses cannot split evenly, at every factorisation with ulysses > 1."""
    failures = []
    for ring in (r for r in range(1, world_size) if world_size % r == 0):
        topology = usp.Topology.build(ring=ring, ulysses=world_size // ring)
        cases = [(hq, hkv, layout, causal, "fp64")
                 for (hq, hkv), layout, causal in itertools.product(
                     HEAD_COUNTS, ("zigzag", "stripe"), (True, False))]
        cases += [(14, 2, "zigzag", True, "bf16")]
        failures += [f"rank {rank} ring={ring} {f}" for f in collect_failures(
            cases, lambda c: check_uneven_heads(topology, *c, seq_len=seq_len))]
    return failures


def window_skips_steps(rank: int, world_size: int) -> dict[str, int]:
    """P2P bytes of one forward+backward on a contiguous ring of 4: dense causal vs a window
    that reaches one block back (the ring stops after step 1)."""
    topology = usp.Topology.build(ring=world_size, ulysses=1)
    sent = {}
    for name, window in (("dense", None), ("window", (5, 0))):
        x = torch.randn(1, 12, 2, 8, requires_grad=True)
        with usp.CommStats() as stats:
            usp.usp_attention(x, x, x, topology, causal=True, layout="contiguous",
                              window=window).sum().backward()
        sent[name] = stats.bytes["p2p"]
    return sent
