"""Grid of attention cases run inside one spawned world; compared against single-process references.

Tolerances (docs/testing.md): fp64 error <= 1e-10; fp32 / bf16 error vs an fp64 reference <= 2x the
error of the single-process kernel of the same dtype vs that reference, plus a tiny atol.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

import usp
from usp.attention.kernels import default_scale, math_backward, math_forward, resolve_kernel
from usp.attention.ring import local_attention
from tests.distributed import collect_failures

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
ATOL = {"fp32": 1e-6, "bf16": 1e-3, "fp16": 1e-4}


@dataclass(frozen=True)
class Case:
    ring: int
    ulysses: int
    layout: str
    causal: bool
    n_kv_heads: int
    dtype: str
    placement: str = "head-first"
    head_chunks: int = 1


def global_tensors(case: Case, n_heads: int, seq_len: int, batch: int = 2, dim: int = 8, seed: int = 0):
    """Seeded global q, k, v, dout in fp64 (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, n_heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seq_len, case.n_kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq_len, case.n_kv_heads, dim, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, seq_len, n_heads, dim, generator=g, dtype=torch.float64)
    return q, k, v, dout


def reference(q, k, v, dout, causal: bool):
    """fp64 math attention and its exact gradients, single process, full sequence."""
    scale = default_scale(q.shape[-1], None)
    out, lse = math_forward(q, k, v, causal, scale)
    return (out, *math_backward(dout, q, k, v, out, lse, causal, scale))


def single_process_kernel(q, k, v, dout, causal: bool, dtype: torch.dtype, device: str = "cpu"):
    """The same-dtype single-process kernel (what one device would compute) and its gradients."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    kernel = resolve_kernel("auto", leaves[0])
    out = local_attention(*leaves, causal, default_scale(q.shape[-1], None), kernel)
    out.backward(dout.to(device=device, dtype=dtype))
    return (out, *(t.grad for t in leaves))


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


def check_case(case: Case, topology, n_heads: int, seq_len: int, device: str = "cpu",
               head_dim: int = 8) -> dict[str, float]:
    """Run usp_attention forward+backward on this rank's shard; assert against the references
    (fp64 math on CPU; for other dtypes, the bound comes from the same device's single kernel)."""
    q, k, v, dout = global_tensors(case, n_heads, seq_len, dim=head_dim)
    expected = reference(q, k, v, dout, case.causal)
    dtype = DTYPES[case.dtype]
    shard = lambda t: usp.shard_sequence(t, topology, case.layout)  # noqa: E731
    leaves = [shard(t).to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    out = usp.usp_attention(*leaves, topology, causal=case.causal, layout=case.layout,
                            head_chunks=case.head_chunks)
    out.backward(shard(dout).to(device=device, dtype=dtype))
    got = (out, *(t.grad for t in leaves))
    if case.dtype == "fp64":
        bounds = [1e-10] * 4
    else:
        single = single_process_kernel(q, k, v, dout, case.causal, dtype, device)
        bounds = [2 * max_error(s, e) + ATOL[case.dtype] for s, e in zip(single, expected)]
    errors = {}
    for name, g, e, bound in zip(("out", "dq", "dk", "dv"), got, expected, bounds):
        if g.dtype != dtype:
            raise AssertionError(f"{name} came back as {g.dtype}, expected {dtype}")
        errors[name] = max_error(g, shard(e))
        if not errors[name] <= bound:
            raise AssertionError(f"{name} error {errors[name]:.3e} > bound {bound:.3e}")
    return errors


def factorisations(sequence_size: int):
    return [(r, sequence_size // r) for r in range(1, sequence_size + 1) if sequence_size % r == 0]


def run_grid(rank: int, world_size: int, sp_sizes: list[int], n_heads: int, seq_len: int,
             dtypes: list[str], placements: list[str], device: str = "cpu",
             head_dim: int = 8) -> list[str]:
    """Every (ring, ulysses) factorisation of each SP size (dp = world / sp) x layouts x causal x
    kv heads x dtypes, and with Ulysses, causal zigzag in head chunks x kv heads x dtypes.
    Returns the failures (an empty list on success)."""
    torch.manual_seed(0)
    failures = []
    for sp, placement in itertools.product(sp_sizes, placements):
        for ring, ulysses in factorisations(sp):
            topology = usp.Topology.build(ring=ring, ulysses=ulysses, placement=placement)
            cases = [
                Case(ring, ulysses, layout, causal, hkv, dtype, placement)
                for layout in usp.LAYOUTS
                for causal in (True, False)
                for hkv in sorted({n_heads, n_heads // 2, 1}, reverse=True)
                for dtype in dtypes
            ]
            if ulysses > 1:  # Ulysses' overlapped head chunks: kv heads split, and shared
                cases += [Case(ring, ulysses, "zigzag", True, hkv, dtype, placement, n_heads)
                          for hkv in sorted({n_heads, n_heads // 2, 1}, reverse=True)
                          for dtype in dtypes]
            dp = world_size // sp
            failures += [
                f"rank {rank} dp={dp} {f}"
                for f in collect_failures(
                    cases, lambda c: check_case(c, topology, n_heads, seq_len, device, head_dim))
            ]
    return failures


def ring_error_growth(rank: int, world_size: int, seq_len: int, device: str = "cpu",
                      n_heads: int = 4, head_dim: int = 8) -> dict[int, float]:
    """bf16 forward+backward error of zigzag causal attention for each pure ring size."""
    errors = {}
    for ring in (r for r in (1, 2, 4, 8) if r <= world_size and world_size % r == 0):
        topology = usp.Topology.build(ring=ring, ulysses=1)
        case = Case(ring, 1, "zigzag", True, 2, "bf16")
        errors[ring] = max(check_case(case, topology, n_heads, seq_len, device,
                                      head_dim).values())
    return errors
