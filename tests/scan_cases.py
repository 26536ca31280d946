"""The scan primitives' cases, run inside one spawned world (tests/test_scan.py).

Each case draws seeded global fp64 tensors, runs the one-process reference on the whole
sequence (usp.scan.reference; transformers' ``causal_conv1d_fn`` for the convolution, each
document alone), shards the inputs contiguously (padding slots for an uneven length), runs the
primitive, backpropagates the same random cotangent and compares this rank's outputs (its real
tokens) and input gradients (zero in padding slots) with the reference's shard, and the
parameters' gradients summed over the sequence group with the reference's.
"""

from __future__ import annotations

import zlib
from functools import partial
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.models.bamba.modeling_bamba import causal_conv1d_fn

from usp.comm import CommStats
from usp.layout import sequence_positions, shard_sequence
from usp.scan import causal_conv, gated_delta_scan, selective_scan, ssd_scan
from usp.scan.chain import StateChain
from usp.scan.reference import gated_delta_recurrence, selective_recurrence, ssd_recurrence
from usp.topology import Topology

FP64 = torch.float64
CHUNK = 4  # several chunks per block, the last one partial


def documents_for(length: int, rows: int) -> torch.Tensor:
    """Packed documents of the real length: one of a single token, one boundary at a ring block
    start of the 24-slot sequences at ring 4; ``rows`` 2: a different packing per batch row."""
    first = torch.repeat_interleave(torch.arange(4), torch.tensor([6, 5, 1, length - 12]))
    if rows == 1:
        return first
    second = torch.repeat_interleave(torch.arange(3), torch.tensor([3, 10, length - 13]))
    return torch.stack([first, second])


def _draw(generator, *shape, low=None):
    t = torch.randn(*shape, generator=generator, dtype=FP64)
    return t if low is None else -(torch.rand(*shape, generator=generator, dtype=FP64) + low)


def ssd_problem(generator, length, heads, groups, documents, ulysses="auto"):
    batch, head_dim, state = 2, 3, 4
    inputs = {"x": _draw(generator, batch, length, heads, head_dim),
              "dt": _draw(generator, batch, length, heads),
              "B": _draw(generator, batch, length, groups, state),
              "C": _draw(generator, batch, length, groups, state)}
    params = {"A": _draw(generator, heads, low=0.2), "D": _draw(generator, heads),
              "dt_bias": _draw(generator, heads)}

    def reference(t, p):
        step = F.softplus(t["dt"] + p["dt_bias"]).clamp(max=2.5)
        return ssd_recurrence(t["x"], step, p["A"], t["B"], t["C"], p["D"],
                              documents=documents)[0]

    def distributed(t, p, topology):
        return ssd_scan(t["x"], t["dt"], p["A"], t["B"], t["C"], topology, chunk_size=CHUNK,
                        D=p["D"], dt_bias=p["dt_bias"], dt_softplus=True, dt_limit=(0.0, 2.5),
                        documents=documents, seq_len=length, ulysses=ulysses)

    return inputs, params, reference, distributed, 1


def delta_problem(generator, length, heads, groups, documents, ulysses="auto"):
    batch, key_dim, value_dim = 2, 4, 3
    inputs = {"q": _draw(generator, batch, length, groups, key_dim),
              "k": _draw(generator, batch, length, groups, key_dim),
              "v": _draw(generator, batch, length, heads, value_dim),
              "g": _draw(generator, batch, length, heads, low=0.05),
              "beta": torch.rand(batch, length, heads, generator=generator, dtype=FP64)}

    def reference(t, p):
        return gated_delta_recurrence(t["q"], t["k"], t["v"], t["g"], t["beta"],
                                      normalise_qk=True, documents=documents)[0]

    def distributed(t, p, topology):
        return gated_delta_scan(t["q"], t["k"], t["v"], t["g"], t["beta"], topology,
                                chunk_size=CHUNK, use_qk_l2norm=True, documents=documents,
                                seq_len=length, ulysses=ulysses)

    return inputs, {}, reference, distributed, 1


def selective_problem(generator, length, heads, groups, documents):
    batch, state = 2, 3  # heads channels
    inputs = {name: _draw(generator, batch, heads, length) for name in ("x", "dt", "z")}
    inputs.update({name: _draw(generator, batch, state, length) for name in ("B", "C")})
    params = {"A": _draw(generator, heads, state, low=0.2), "D": _draw(generator, heads),
              "dt_bias": _draw(generator, heads)}

    def reference(t, p):
        step = F.softplus(t["dt"] + p["dt_bias"][:, None])
        return selective_recurrence(t["x"], step, p["A"], t["B"], t["C"], p["D"], t["z"],
                                    documents=documents)[0]

    def distributed(t, p, topology):
        return selective_scan(t["x"], t["dt"], p["A"], t["B"], t["C"], topology, D=p["D"],
                              z=t["z"], dt_bias=p["dt_bias"], dt_softplus=True,
                              documents=documents, seq_len=length)

    return inputs, params, reference, distributed, 2


def conv_alone(x, weight, bias, documents):
    """transformers' convolution on the whole sequence, or on each document alone."""
    if documents is None:
        return causal_conv1d_fn(x, weight, bias, activation="silu")
    rows = documents.reshape(-1, x.shape[-1]).expand(x.shape[0], -1)
    out = []
    for row, ids in zip(x, rows):
        pieces = [causal_conv1d_fn(row[None, :, ids == i], weight, bias, activation="silu")
                  for i in torch.unique_consecutive(ids)]
        out.append(torch.cat(pieces, dim=-1))
    return torch.cat(out)


def conv_problem(generator, length, heads, groups, documents):
    channels, taps = 5, 4
    inputs = {"x": _draw(generator, 2, channels, length)}
    params = {"weight": _draw(generator, channels, taps), "bias": _draw(generator, channels)}

    def reference(t, p):
        return conv_alone(t["x"], p["weight"], p["bias"], documents)

    def distributed(t, p, topology):
        return causal_conv(t["x"], p["weight"], p["bias"], topology, activation="silu",
                           documents=documents, seq_len=length)

    return inputs, params, reference, distributed, 2


# each scan as "auto" splits it over the Ulysses ranks (on 4 ranks: SSD "state", the delta rule
# "heads"), and with the other split
PROBLEMS = {"ssd": ssd_problem, "delta": delta_problem, "conv": conv_problem,
            "selective": selective_problem,
            "ssd heads": partial(ssd_problem, ulysses="heads"),
            "delta state": partial(delta_problem, ulysses="state")}
DEFAULTS = ("ssd", "delta", "conv")


def case_errors(case, topology: Topology, dtype: torch.dtype = FP64) -> tuple[list, list]:
    """``(errors, magnitudes)``: per compared tensor (the output, each input's gradient, each
    parameter's), the largest error of the primitive run in ``dtype`` against the fp64
    reference, and the reference's largest magnitude."""
    name, length, heads, groups, rows = case
    documents = None if rows == 0 else documents_for(length, rows)
    generator = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    inputs, params, reference, distributed, seq_dim = PROBLEMS[name](
        generator, length, heads, groups, documents)
    out_shape = reference(inputs, params).shape
    cotangent = torch.randn(out_shape, generator=generator, dtype=FP64)
    ref_inputs = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    ref_params = {n: t.clone().requires_grad_() for n, t in params.items()}
    expected = reference(ref_inputs, ref_params)
    (expected * cotangent).sum().backward()

    def shard(t):
        return shard_sequence(t, topology, "contiguous", dim=seq_dim)

    local = {n: shard(t).to(dtype).requires_grad_() for n, t in inputs.items()}
    local_params = {n: t.to(dtype).requires_grad_() for n, t in params.items()}
    out = distributed(local, local_params, topology)
    (out * shard(cotangent).to(dtype)).sum().backward()
    real = sequence_positions(length, topology, "contiguous") < length
    index = [slice(None)] * out.dim()
    index[seq_dim] = real
    pairs = [(out.double()[tuple(index)], shard(expected.detach())[tuple(index)])]
    pairs += [(local[n].grad.double(), shard(ref_inputs[n].grad)) for n in inputs]
    for n in params:  # each rank's part of a parameter's gradient: they sum over the ranks
        grad = local_params[n].grad.double()
        if topology.sequence_size > 1:
            dist.all_reduce(grad, group=topology.sequence_group)
        pairs.append((grad, ref_params[n].grad))
    return ([float((got - want).abs().max().detach()) for got, want in pairs],
            [float(want.abs().max().detach()) for _, want in pairs])


def run_case(case, topology: Topology) -> float:
    """The largest error of the case's outputs and gradients against the reference (fp64)."""
    return max(case_errors(case, topology)[0])


def check_low_precision(case, topology: Topology, one_process: Topology,
                        dtype: torch.dtype, atol: float) -> None:
    """docs/testing.md's rule: each error within 2x the one-process error in ``dtype`` plus
    ``atol`` times the reference's magnitude."""
    errors, magnitudes = case_errors(case, topology, dtype)
    single, _ = case_errors(case, one_process, dtype)
    for error, alone, magnitude in zip(errors, single, magnitudes):
        assert error <= 2 * alone + atol * magnitude, (errors, single)


def grid() -> list[tuple]:
    """(primitive, real length, heads, groups, document rows): even and uneven lengths, no
    documents / one packing / one per batch row, and head counts Ulysses 4 must pad."""
    cases = []
    for name in DEFAULTS:
        for length in (24, 22):
            for rows in (0, 1, 2):
                cases.append((name, length, 4, 2, rows))
    cases += [("ssd", 22, 3, 1, 1), ("delta", 22, 3, 1, 1), ("delta", 24, 2, 1, 0)]
    # Mamba-1 (token by token, the slowest): even and uneven, each kind of documents
    cases += [("selective", 24, 4, 2, 0), ("selective", 22, 4, 2, 1), ("selective", 22, 3, 1, 2)]
    for name in ("ssd heads", "delta state"):  # the other split: fewer cases
        cases += [(name, 24, 4, 2, 0), (name, 22, 4, 2, 2), (name, 22, 3, 1, 1)]
    return cases


def skipped_state_error(case, topology: Topology) -> float:
    """The case's error when every rank starts from a zero state (and the convolution from a
    zero halo): the ring passes nothing."""
    zero_state = lambda self, shape, dtype, device, anchor: torch.zeros(  # noqa: E731
        shape, dtype=dtype, device=device)
    zero_halo = lambda tail, neighbours: torch.zeros_like(tail)  # noqa: E731
    with mock.patch.object(StateChain, "receive", zero_state), \
            mock.patch.object(StateChain, "send", lambda self, state: state.new_zeros(())), \
            mock.patch("usp.scan.conv._Halo.apply", zero_halo):
        return run_case(case, topology)


def state_bytes(topology: Topology) -> dict:
    """The p2p bytes this rank sends in one forward + backward of each primitive (gloo, fp64)."""
    case_bytes = {}
    for name in PROBLEMS:
        heads, groups = 4, 2
        with CommStats() as stats:
            run_case((name, 24, heads, groups, 0), topology)
        case_bytes[name] = stats.bytes["p2p"]
    return case_bytes
