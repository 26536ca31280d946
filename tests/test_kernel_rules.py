"""Every kernel gets only masks it applies as meant, over every block a real ring schedule makes.

The CUDA ops are replaced by CPU stand-ins that apply FlashAttention-2's and FlashAttention-3's own
window rules (``tests/flash_attn_standins.py``), and memory-efficient / cuDNN attention by
stand-ins that refuse anything but full blocks and causal squares. Blocks come from the ring
schedules of packed documents, sliding windows, padding and their mixes on every layout.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import usp
from tests import flash_attn_standins as standins
from tests.attention_cases import max_error
from tests.attention_mask_cases import masked_reference
from tests.distributed import collect_failures, run_on_ranks
from usp.attention.kernels import KERNELS, Kernel, math_backward, math_forward, registry
from usp.attention.kernels.bands import split_band
from usp.attention.kernels.glue import flash2_runs, flash3_runs, op_mask
from usp.mask import AttentionMask, Band
from usp.schedule import RingSchedule


# ------------------------------------------------------------------------------- the cut
def _part_mask(part, rule) -> torch.Tensor:
    """What the op does with one part, under the op's own rules (the stand-ins' emulation)."""
    n_q, n_k = part.r1 - part.r0, part.c1 - part.c0
    if part.mask is False:
        return torch.ones(n_q, n_k, dtype=torch.bool)
    if part.mask is True:
        assert n_q == n_k, "a causal part must be square"
        square = torch.ones(n_q, n_k, dtype=torch.bool).tril()
        return square.flip(0).flip(1) if part.flipped else square
    call = op_mask(part.mask, n_q, n_k)
    if rule is flash2_runs:
        forward = standins.fa2_visible(n_q, n_k, call.causal, *call.window)
        backward = standins.fa2_visible(n_q, n_k, call.causal, *call.window, backward=True)
        assert torch.equal(forward, backward), "the forward and backward masks differ"
        return forward
    return standins.fa3_visible(n_q, n_k, call.causal, *call.window)


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 48), st.integers(1, 48), st.none() | st.integers(-60, 60),
       st.none() | st.integers(-60, 60), st.sampled_from(["none", "flash2", "flash3"]))
def test_split_band_covers_every_visible_pair_once_under_each_ops_rules(n_q, n_k, lo, hi, rule):
    rule = {"none": None, "flash2": flash2_runs, "flash3": flash3_runs}[rule]
    band = Band(lo, hi)
    covered = torch.zeros(n_q, n_k, dtype=torch.int64)
    for part in split_band(band, n_q, n_k, rule):
        assert rule is not None or isinstance(part.mask, bool), "a band reached an op with none"
        covered[part.r0:part.r1, part.c0:part.c1] += _part_mask(part, rule).long()
    assert torch.equal(covered, band.visible(n_q, n_k).long())


# ------------------------------------------------------------------------ real schedules
def _kernels(monkeypatch) -> dict[str, Kernel]:
    from usp.attention.kernels import sdpa

    aten = type("Aten", (), {})()
    for ops in (standins.ATEN_FLASH, standins.ATEN_NO_WINDOW):
        for name, op in vars(ops).items():
            setattr(aten, name, op)
    monkeypatch.setattr(sdpa, "aten", aten)
    kernels = {"cuda_flash": KERNELS["cuda_flash"], "cuda_efficient": KERNELS["cuda_efficient"]}
    # flash-attn 2.x follows torch's FlashAttention-2 rules (test_cuda_paths runs its calls)
    for generation, name in (("v3_head", "flash_attn3"),):
        forward, backward, version_3 = standins.GENERATIONS[generation]
        module = "flash_attn_interface" if version_3 else "flash_attn.flash_attn_interface"
        monkeypatch.setitem(sys.modules, module, standins.module(module, forward, backward))
        kernels[name] = KERNELS[name]
    return kernels


MASKS = {  # on 48-72 tokens: windows narrower and wider than a ring block, documents of 1 token,
    # short ones and one longer than a block (FlashAttention-2's rules break the wide windows
    # on blocks with more query rows than keys)
    "causal window": dict(causal=True, window=(17, 0)),
    "wide causal window": dict(causal=True, window=(30, 0)),
    "window": dict(window=(4, 3)),
    "wide window": dict(window=(13, 20)),
    "documents": dict(causal=True, cu_seqlens=[0, 1, 5, 27, 28, 45, 61]),
    "documents + causal window": dict(causal=True, window=(20, 0), cu_seqlens=[0, 1, 5, 27, 61]),
    "documents + window": dict(window=(3, 9), cu_seqlens=[0, 2, 30, 31, 61]),
    "documents + wide window": dict(window=(14, 25), cu_seqlens=[0, 2, 40, 41, 61]),
    "padding + causal": dict(causal=True, padding_mask=9),  # the last 9 positions: padding
}


def _sweep_cases():
    for (kind, keywords), layout, ring in itertools.product(
            MASKS.items(), ("contiguous", "zigzag", "stripe"), (2, 3, 4)):
        yield kind, keywords, layout, ring


def test_every_piece_of_real_schedules_is_exact_on_every_kernel(monkeypatch):
    """Each (rank, source) piece of each schedule, forward and backward, through each CUDA
    kernel's glue and its library's rules, against the math reference (fp64 in, the ops' fp32
    lse out)."""
    kernels = _kernels(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    wrong, blocks, seen = [], 0, set()
    for kind, keywords, layout, ring in _sweep_cases():
        seq_len = 64 if layout != "zigzag" else 2 * ring * 12
        keywords = dict(keywords)
        if "padding_mask" in keywords:
            keywords["padding_mask"] = torch.arange(seq_len)[None] < seq_len - keywords[
                "padding_mask"]
        if "cu_seqlens" in keywords:
            keywords["cu_seqlens"] = [c for c in keywords["cu_seqlens"] if c < seq_len] + [seq_len]
        schedule = RingSchedule(AttentionMask.build(seq_len, **keywords), layout, ring)
        block = seq_len // ring
        for rank, source in itertools.product(range(ring), range(ring)):
            for piece in schedule.pieces(rank, source):
                n_q, n_k = piece.q_end - piece.q_start, piece.k_end - piece.k_start
                if (n_q, n_k, piece.band) in seen:  # a block like one checked already
                    continue
                seen.add((n_q, n_k, piece.band))
                make = lambda n, h: torch.randn(1, n, h, 16, generator=generator,  # noqa: E731
                                                dtype=torch.float64)
                q, k, v, dout = make(n_q, 4), make(n_k, 2), make(n_k, 2), make(n_q, 4)
                mask = piece.band if piece.band is not None else False
                ref_out, ref_lse = math_forward(q, k, v, mask, 0.25)
                ref_grads = math_backward(dout, q, k, v, ref_out, ref_lse, mask, 0.25)
                blocks += 1
                for name, kernel in kernels.items():
                    out, lse = kernel.forward(q, k, v, mask, 0.25)
                    grads = kernel.backward(dout, q, k, v, out, lse, mask, 0.25)
                    errors = [max_error(out, ref_out)] + [max_error(g, r) for g, r in
                                                         zip(grads, ref_grads)]
                    same_empty = torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
                    if not (same_empty and max(errors) < 1e-5):
                        wrong.append(f"{name}: {kind}, {layout}, ring {ring}, rank {rank} <- "
                                     f"{source}, {n_q} x {n_k} block of {block}, {piece.band}: "
                                     f"errors {['%.2g' % e for e in errors]}")
    assert blocks > 100
    assert not wrong, f"{len(wrong)} wrong blocks:\n" + "\n".join(wrong[:20])


# ------------------------------------------------------------------------ on spawned ranks
def _refuses_bands(q, k, v, mask, scale):
    if not isinstance(mask, bool) or (mask and q.shape[1] != k.shape[1]):
        raise ValueError(f"this kernel runs full blocks and causal squares only, got {mask}")
    return math_forward(q, k, v, mask, scale)


def _refuses_bands_backward(dout, q, k, v, out, lse, mask, scale):
    _refuses_bands(q, k, v, mask, scale)
    return math_backward(dout, q, k, v, out, lse, mask, scale)


FULL_AND_CAUSAL_ONLY = Kernel("full_and_causal_only", "cpu", (torch.float64,), _refuses_bands,
                              _refuses_bands_backward, bands=False)


def _masked_case(topology, layout, keywords, kernel, seq_len=48):
    g = torch.Generator().manual_seed(1)
    make = lambda h: torch.randn(2, seq_len, h, 8, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, dout = make(4), make(2), make(2), make(4)
    visible = AttentionMask.build(seq_len, **keywords).visible()[None]
    expected = masked_reference(q, k, v, dout, visible)
    shard = lambda t: usp.shard_sequence(t, topology, layout)  # noqa: E731
    leaves = [shard(t).requires_grad_() for t in (q, k, v)]
    out = usp.usp_attention(*leaves, topology, layout=layout, kernel=kernel, **keywords)
    out.backward(shard(dout))
    got = (out, *(t.grad for t in leaves))
    return max(max_error(g_, shard(e)) for g_, e in zip(got, expected))


def _on_four_ranks(rank, world_size):
    from usp.attention.kernels import sdpa

    sdpa.aten = standins.ATEN_FLASH  # this spawned process's own module
    flash2_on_cpu = dataclasses.replace(KERNELS["cuda_flash"], device_type="cpu",
                                        dtypes=(torch.float64,))
    KERNELS[FULL_AND_CAUSAL_ONLY.name] = FULL_AND_CAUSAL_ONLY
    registry.AUTO_ORDER["cpu"] = (FULL_AND_CAUSAL_ONLY.name,)  # auto's only kernel refuses bands
    cases = [
        (2, 2, "zigzag", dict(causal=True, window=(17, 0)), flash2_on_cpu),
        (2, 2, "zigzag", dict(window=(13, 20), cu_seqlens=torch.tensor([0, 3, 40, 48])),
         flash2_on_cpu),
        (4, 1, "zigzag", dict(causal=True, window=(20, 0), cu_seqlens=torch.tensor([0, 5, 48])),
         flash2_on_cpu),
        (4, 1, "stripe", dict(causal=True, cu_seqlens=torch.tensor([0, 5, 47, 48])), "auto"),
        (2, 2, "contiguous", dict(window=(4, 4), padding_mask=torch.arange(48)[None] < 41),
         "auto"),
        (4, 1, "zigzag", dict(causal=True, window=(6, 0)), FULL_AND_CAUSAL_ONLY),
    ]

    def check(case):
        ring, ulysses, layout, keywords, kernel = case
        topology = usp.Topology.build(ring=ring, ulysses=ulysses)
        error = _masked_case(topology, layout, keywords, kernel)
        bound = 1e-6 if kernel is flash2_on_cpu else 1e-10  # the op's lse is fp32
        assert error <= bound, f"error {error:.3g}"

    return collect_failures(cases, check)


def test_flash2_rules_and_a_kernel_that_refuses_bands_are_exact_on_four_ranks():
    """usp_attention on ring x ulysses grids with FlashAttention-2's real window rules, and with
    ``auto`` whose only kernel refuses every band: exact, no rank raising mid-ring."""
    failures = [line for rank in run_on_ranks(_on_four_ranks, 4, timeout_s=120) for line in rank]
    assert not failures, "\n".join(failures)
