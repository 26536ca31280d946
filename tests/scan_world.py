"""Everything tests/test_scan.py checks on several ranks, in one spawned 4-rank world."""

from __future__ import annotations

from unittest import mock

import torch

from tests import mamba_ssm_standin as standin
from tests.distributed import collect_failures
from tests.scan_cases import (check_low_precision, grid, run_case, skipped_state_error,
                              state_bytes)
from usp.scan import causal_conv, gated_delta_scan, selective_scan, ssd_scan
from usp.topology import Topology

FP64, FP32 = torch.float64, torch.float32
GRIDS = ((2, 2), (4, 1), (1, 4))  # ring x ulysses
PACKED = [("ssd", 22, 4, 2, 2), ("delta", 22, 4, 2, 2), ("conv", 22, 4, 2, 2)]


def _ssd_args(batch=1, length=6, heads=4, groups=2, **changes):
    args = {"x": torch.zeros(batch, length, heads, 3, dtype=FP64),
            "dt": torch.zeros(batch, length, heads, dtype=FP64),
            "A": -torch.ones(heads, dtype=FP64),
            "B": torch.zeros(batch, length, groups, 4, dtype=FP64),
            "C": torch.zeros(batch, length, groups, 4, dtype=FP64)}
    args.update(changes)
    return args


def bad_inputs(rank: int) -> list[tuple[str, str]]:
    """(what was wrong, the message raised) for each bad call; every rank must raise the same."""
    ring2 = Topology.build(ring=2, ulysses=2)
    ring4 = Topology.build(ring=4)
    zeros = lambda *shape: torch.zeros(*shape, dtype=FP64)  # noqa: E731
    delta = {"q": zeros(1, 6, 2, 4), "k": zeros(1, 6, 2, 4), "v": zeros(1, 6, 4, 3),
             "g": zeros(1, 6, 4), "beta": zeros(1, 6, 4)}
    calls = {
        "interleaving layout": lambda: ssd_scan(**_ssd_args(), topology=ring2, layout="zigzag"),
        "x not 4-D": lambda: ssd_scan(**_ssd_args(x=zeros(1, 6, 12)), topology=ring2),
        "dt shape": lambda: ssd_scan(**_ssd_args(dt=zeros(1, 6, 3)), topology=ring2),
        "heads not a multiple of groups": lambda: ssd_scan(
            **_ssd_args(groups=3), topology=ring2),
        "A shape": lambda: ssd_scan(**_ssd_args(A=zeros(3)), topology=ring2),
        "g shape": lambda: gated_delta_scan(**{**delta, "g": zeros(1, 6, 2)}, topology=ring2),
        "value heads not a multiple of key heads": lambda: gated_delta_scan(
            **{**delta, "v": zeros(1, 6, 3, 3), "g": zeros(1, 6, 3), "beta": zeros(1, 6, 3)},
            topology=ring2),
        "delta layout": lambda: gated_delta_scan(**delta, topology=ring4, layout="stripe"),
        "conv channels": lambda: causal_conv(zeros(1, 5, 6), zeros(4, 4), None, ring2),
        "conv halo longer than a shard": lambda: causal_conv(zeros(1, 5, 2), zeros(5, 4), None,
                                                             ring4),
        "documents rows": lambda: ssd_scan(**_ssd_args(batch=2), topology=ring2,
                                           documents=torch.zeros(3, 24, dtype=torch.long)),
        "seq_len beyond the slots": lambda: ssd_scan(**_ssd_args(), topology=ring2, seq_len=30),
        "one rank's documents differ": lambda: causal_conv(
            zeros(1, 5, 6), zeros(5, 4), None, ring2,
            documents=torch.tensor([0] * 12 + [1] * 12) if rank != 2 else None),
        "one rank's length differs": lambda: ssd_scan(
            **_ssd_args(length=6 if rank != 1 else 5), topology=ring2),
        "unknown split over ulysses": lambda: gated_delta_scan(**delta, topology=ring2,
                                                               ulysses="tokens"),
        "selective A shape": lambda: selective_scan(
            zeros(1, 4, 6), zeros(1, 4, 6), zeros(3, 2), zeros(1, 2, 6), zeros(1, 2, 6), ring2),
    }
    messages = []
    for what, call in calls.items():
        try:
            call()
        except ValueError as error:
            messages.append((what, str(error)))
        else:
            messages.append((what, "no error"))
    # the ranks are still usable: a good call after the bad ones
    ssd_scan(**_ssd_args(), topology=ring2)
    return messages


def _exact(topology: Topology):
    def check(case):
        error = run_case(case, topology)
        assert error <= 1e-10, f"error {error:.3g} > 1e-10"
    return check


def scan_world(rank: int, world_size: int) -> dict:
    failures, skipped, sent = [], {}, {}
    one_process = Topology.build(ring=1, ulysses=1)  # dp 4: each rank alone
    for ring, ulysses in GRIDS:
        topology = Topology.build(ring=ring, ulysses=ulysses)
        failures += [f"ring={ring} ulysses={ulysses} {line}"
                     for line in collect_failures(grid(), _exact(topology))]
        failures += [f"fp32 ring={ring} ulysses={ulysses} {line}" for line in collect_failures(
            PACKED, lambda case: check_low_precision(case, topology, one_process, FP32, 1e-6))]
        # the cases whose state (or halo) crosses ranks on this grid: "heads" scans pass it along
        # the ring only; "state" scans and the convolution along every shard
        chained = ("ssd", "conv", "delta state", "selective") + (
            ("delta", "ssd heads") if ring > 1 else ())
        for name in chained:
            skipped[(ring, ulysses, name)] = skipped_state_error((name, 22, 4, 2, 0), topology)
        sent[(ring, ulysses)] = state_bytes(topology)
    # SSD's first phase by mamba_ssm's fused kernel (as on CUDA where it is installed), here
    # its CPU stand-in: the composition around it (transition, entering state, chain) is exact
    fused = [("ssd", 24, 4, 2, 0), ("ssd", 22, 4, 2, 2), ("ssd heads", 22, 3, 1, 1)]
    with mock.patch("usp.scan.ssd.fused_chunk_scan", lambda x: standin.mamba_chunk_scan_combined):
        for ring, ulysses in GRIDS:
            topology = Topology.build(ring=ring, ulysses=ulysses)
            failures += [f"fused ring={ring} ulysses={ulysses} {line}"
                         for line in collect_failures(fused, _exact(topology))]
    # context-first placement: the sequence group's order differs from its shards' order
    topology = Topology.build(ring=2, ulysses=2, placement="context-first")
    failures += [f"context-first {line}" for line in collect_failures(
        PACKED + [("delta state", 22, 4, 2, 2)], _exact(topology))]
    return {"failures": failures, "skipped": skipped, "bytes": sent,
            "errors": bad_inputs(rank)}
