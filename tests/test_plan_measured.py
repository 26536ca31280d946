"""Measured vs modelled: the bytes usp_attention sends equal the cost model's prediction exactly.

One world of 4 gloo ranks runs a grid of (ring, ulysses, layout, heads, dtype, placement) cases;
each rank records its traffic with ``usp.comm.CommStats`` during one forward + backward and compares
it, kind by kind, with :func:`usp.plan.collectives.attention_traffic`. Each case also checks the
attention itself against a single-process reference, so the bytes counted are those of a correct
run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.distributed import collect_failures, run_on_ranks
from usp import CommStats, Topology, shard_sequence, usp_attention
from usp.plan.collectives import attention_traffic

WORLD = 4
BATCH, SEQ, HEAD_DIM = 2, 32, 8
# (ring, ulysses, layout, q_heads, kv_heads, dtype, placement); dp fills the rest of the world.
CASES = [
    (1, 4, "zigzag", 8, 4, torch.float32, "head-first"),  # kv heads split over Ulysses
    (1, 4, "contiguous", 8, 2, torch.bfloat16, "head-first"),  # kv heads replicated 2x
    (4, 1, "zigzag", 4, 2, torch.float32, "head-first"),
    (4, 1, "stripe", 4, 1, torch.bfloat16, "head-first"),  # MQA on the ring: no expansion
    (2, 2, "zigzag", 8, 2, torch.float32, "head-first"),
    (2, 2, "contiguous", 4, 1, torch.float32, "context-first"),  # replicated kv, then the ring
    (2, 1, "zigzag", 4, 4, torch.bfloat16, "head-first"),  # dp = 2
    (1, 2, "stripe", 4, 1, torch.float32, "head-first"),  # dp = 2, MQA replicated 2x
]


def _reference(q, k, v, grad_out):
    """Single-process causal GQA attention: output and input gradients."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    # [B, S, H, D] -> [B, H, S, D] for SDPA and back
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=True,
                                         enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def _check_case(numbered_case) -> None:
    seed, (ring, ulysses, layout, q_heads, kv_heads, dtype, placement) = numbered_case
    topology = Topology.build(ring=ring, ulysses=ulysses, placement=placement)
    generator = torch.Generator().manual_seed(seed)  # the same global tensors on every rank
    q = torch.randn(BATCH, SEQ, q_heads, HEAD_DIM, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(BATCH, SEQ, kv_heads, HEAD_DIM, generator=generator, dtype=torch.float64)
            for _ in range(2))
    grad_out = torch.randn(BATCH, SEQ, q_heads, HEAD_DIM, generator=generator, dtype=torch.float64)

    local = [shard_sequence(t.to(dtype), topology, layout).requires_grad_(True) for t in (q, k, v)]
    local_grad_out = shard_sequence(grad_out.to(dtype), topology, layout)
    with CommStats() as stats:
        out = usp_attention(*local, topology, causal=True, layout=layout)
        out.backward(local_grad_out)
    measured = [out.detach()] + [t.grad for t in local]

    modelled = attention_traffic(BATCH, SEQ, q_heads, kv_heads, HEAD_DIM,
                                 torch.finfo(dtype).bits // 8, ring, ulysses)
    assert dict(stats.calls) == modelled.calls(), (
        f"recorded calls {dict(stats.calls)} != modelled {modelled.calls()}")
    assert dict(stats.bytes) == modelled.bytes(), (
        f"recorded {dict(stats.bytes)} != modelled {modelled.bytes()}"
    )

    exact = [shard_sequence(t, topology, layout) for t in _reference(q, k, v, grad_out)]
    same_dtype = [shard_sequence(t.double(), topology, layout)
                  for t in _reference(q.to(dtype), k.to(dtype), v.to(dtype), grad_out.to(dtype))]
    for name, got, ref, kernel in zip(("out", "dq", "dk", "dv"), measured, exact, same_dtype):
        error = (got.double() - ref).abs().max().item()
        kernel_error = (kernel - ref).abs().max().item()
        assert error <= 2 * kernel_error + 1e-5, (
            f"{name}: error {error:.2e} vs the single-process kernel's {kernel_error:.2e}"
        )


def _measure_grid(rank: int, world_size: int, cases) -> list[str]:
    return collect_failures(cases, _check_case)


def test_recorded_bytes_equal_the_cost_model_exactly():
    per_rank = run_on_ranks(_measure_grid, WORLD, list(enumerate(CASES)))
    failures = [f"rank {rank}: {line}" for rank, lines in enumerate(per_rank) for line in lines]
    assert not failures, "\n".join(failures)


def test_the_model_predicts_what_each_case_should_send():
    # The model side of the comparison, spelled out for two cases from the contract's formulas.
    uly = attention_traffic(BATCH, SEQ, 8, 2, HEAD_DIM, 2, ring=1, ulysses=4)
    tokens = SEQ // 4
    # kv heads replicated to 4: (U-1)/U * B*S_l*D*e * (4*Hq + 4*4)
    assert uly.bytes()["all_to_all"] == 3 * BATCH * tokens * HEAD_DIM * 2 * (4 * 8 + 4 * 4) // 4
    assert uly.bytes()["p2p"] == 0
    ring = attention_traffic(BATCH, SEQ, 4, 1, HEAD_DIM, 4, ring=4, ulysses=1)
    block = BATCH * (SEQ // 4) * 1 * HEAD_DIM  # one kv head, never expanded by the ring
    assert ring.bytes()["p2p"] == 3 * 2 * block * 4 * 2 + 4 * 2 * block * 4
    assert ring.bytes()["all_to_all"] == 0
