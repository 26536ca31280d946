"""Attention sinks (GPT-OSS's ``s_aux``) in ring, Ulysses and USP attention, against one process.

The reference is fp64 attention on the whole sequence with one extra logit per head in each
row's softmax (the sink, a key with value 0), its gradients by autograd. Every grid runs in one
world of 4 ranks: ring 4, Ulysses 4, ring 2 x Ulysses 2; causal or not; packed documents, a
window and padding; GQA with head counts Ulysses must pad; Ulysses' head chunks. The sinks'
gradient is each rank's part, summed over the ranks here as FSDP sums it.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

import usp
from tests.distributed import collect_failures, run_on_ranks
from usp.mask import AttentionMask

SEQ, BATCH, DIM = 36, 2, 8


def reference(q, k, v, dout, sinks, visible):
    """fp64 outputs and gradients (q, k, v, sinks) of attention with sinks under ``visible``."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in leaves[:3])
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    scores = (qh @ kh.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    sink = leaves[3].view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = (probs @ vh).transpose(1, 2)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def _case(case, rank):
    ring, ulysses, layout, causal, mask_kind, heads, kv_heads, chunks = case
    topology = usp.Topology.build(ring=ring, ulysses=ulysses)
    g = torch.Generator().manual_seed(11)
    make = lambda h: torch.randn(BATCH, SEQ, h, DIM, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, dout = make(heads), make(kv_heads), make(kv_heads), make(heads)
    sinks = torch.randn(heads, generator=g, dtype=torch.float64) * 2
    keywords = {"causal": causal, **{
        "none": {},
        "documents": {"cu_seqlens": torch.tensor([0, 5, 6, 30, SEQ])},
        "window": {"window": (7, 0) if causal else (5, 4)},
        "padding": {"padding_mask": torch.arange(SEQ)[None].expand(BATCH, SEQ) < torch.tensor(
            [[SEQ - 9], [SEQ]])},
    }[mask_kind]}
    mask = AttentionMask.build(SEQ, **keywords)
    visible = torch.stack([mask.visible(row if mask.batch_rows > 1 else 0)
                           for row in range(BATCH)])
    expected = reference(q, k, v, dout, sinks, visible)
    shard = lambda t: usp.shard_sequence(t, topology, layout)  # noqa: E731
    leaves = [shard(t).requires_grad_() for t in (q, k, v)]
    local_sinks = sinks.clone().requires_grad_()
    out = usp.usp_attention(*leaves, topology, layout=layout, sinks=local_sinks,
                            head_chunks=chunks, seq_len=SEQ, **keywords)
    out.backward(shard(dout))
    grad_sinks = local_sinks.grad.clone()
    dist.all_reduce(grad_sinks)  # each rank's rows' part; the parts sum
    got = [out, *(t.grad for t in leaves)]
    errors = [(got_t - shard(want)).abs().max().item() for got_t, want in zip(got, expected)]
    errors.append((grad_sinks - expected[4]).abs().max().item())
    assert max(errors) <= 1e-10, f"errors (out, dq, dk, dv, dsinks): {errors}"


def _grid(rank: int, world_size: int) -> list[str]:
    cases = []
    for (ring, ulysses), layout, causal, mask_kind in itertools.product(
            ((4, 1), (1, 4), (2, 2)), ("zigzag", "stripe"), (True, False),
            ("none", "documents", "window", "padding")):
        heads, kv_heads = (6, 2) if ulysses > 1 else (4, 2)  # 6/2 over Ulysses 4 runs padded
        cases.append((ring, ulysses, layout, causal, mask_kind, heads, kv_heads, 1))
    cases += [(1, 4, "zigzag", True, "documents", 8, 4, 2), (2, 2, "stripe", False, "none",
                                                              8, 2, 2)]  # head chunks
    return collect_failures(cases, lambda case: _case(case, rank))


def test_sinks_are_exact_on_every_grid():
    failures = [line for rank in run_on_ranks(_grid, 4, timeout_s=300) for line in rank]
    assert not failures, "\n".join(failures)


def test_sinks_in_one_process_and_bad_sinks():
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 20, 4, 8, generator=g, dtype=torch.float64) for _ in range(4))
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    expected = reference(q, k, v, dout, sinks, torch.ones(1, 20, 20, dtype=torch.bool).tril())
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = usp.usp_attention(*leaves[:3], usp.Topology.build(), causal=True, sinks=leaves[3])
    out.backward(dout)
    for got, want in zip([out, *(t.grad for t in leaves)], expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    import pytest

    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=torch.int64), [0.0] * 4):
        with pytest.raises(ValueError, match="sinks"):
            usp.usp_attention(q, k, v, usp.Topology.build(), sinks=bad)
