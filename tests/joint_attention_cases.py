"""Joint attention (text replicated, image sharded) inside one spawned world: every case against a
single-process fp64 attention over the concatenated [text; image] or [image; text], forward and
the gradients of image q/k/v and text q/k/v under the documented contract."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

import usp
from tests.attention_cases import ATOL, DTYPES, max_error, reference, single_process_kernel
from tests.attention_cases_errors import _expect_value_error
from tests.distributed import collect_failures
from usp.attention.joint import joint_attention

BATCH, HEAD_DIM, IMAGE_PER_RANK = 2, 8, 3
HEADS = [(4, 4), (4, 2), (4, 1), (6, 3)]  # query heads, kv heads (6/3 pads heads over Ulysses)
TEXT_LENGTHS = [1, 5, 8]  # 1 and 5 split over no ring of 2 or 4
NAMES, TEXT_NAMES = ("out", "dq", "dk", "dv"), ("out_text", "text_dq", "text_dk", "text_dv")


@dataclass(frozen=True)
class JointCase:
    n_heads: int
    n_kv_heads: int
    text_len: int
    text_first: bool
    dtype: str = "fp64"


def _tensors(case: JointCase, image_len: int, ranks: int):
    """Seeded global tensors (the same on every rank): image q/k/v/dout, text q/k/v/dout, and a
    split of the text's dout into one random part per rank (the contract: they sum to it)."""
    g = torch.Generator().manual_seed(case.text_len * 100 + case.n_kv_heads)
    make = lambda s, h: torch.randn(BATCH, s, h, HEAD_DIM, generator=g,  # noqa: E731
                                    dtype=torch.float64)
    image = [make(image_len, h) for h in (case.n_heads, case.n_kv_heads, case.n_kv_heads)]
    text = [make(case.text_len, h) for h in (case.n_heads, case.n_kv_heads, case.n_kv_heads)]
    dout, dout_text = make(image_len, case.n_heads), make(case.text_len, case.n_heads)
    parts = [make(case.text_len, case.n_heads) for _ in range(ranks - 1)]
    parts.append(dout_text - sum(parts, torch.zeros_like(dout_text)))
    return image, text, dout, dout_text, parts


def _joined(case: JointCase, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return torch.cat([text, image] if case.text_first else [image, text], dim=1)


def _split(case: JointCase, joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A joint-sequence tensor -> (image part, text part)."""
    if case.text_first:
        return joint[:, case.text_len:], joint[:, :case.text_len]
    return joint[:, :-case.text_len], joint[:, -case.text_len:]


def check_joint_case(case: JointCase, topology) -> None:
    ranks = topology.sequence_size
    image, text, dout, dout_text, parts = _tensors(case, IMAGE_PER_RANK * ranks, ranks)
    joint = [_joined(case, i, t) for i, t in zip(image, text)]
    expected = reference(*joint, _joined(case, dout, dout_text), causal=False)
    dtype = DTYPES[case.dtype]
    start = topology.sequence_rank * IMAGE_PER_RANK
    shard = lambda t: t[:, start:start + IMAGE_PER_RANK]  # noqa: E731
    image_leaves = [shard(t).to(dtype).requires_grad_() for t in image]
    text_leaves = [t.to(dtype).requires_grad_() for t in text]
    out, out_text = joint_attention(*image_leaves, *text_leaves, topology)
    torch.autograd.backward([out, out_text],
                            [shard(dout).to(dtype), parts[topology.sequence_rank].to(dtype)])
    text_grads = [t.grad.clone() for t in text_leaves]
    if ranks > 1:  # every collective before the first assertion: a failing case cannot hang
        for grad in text_grads:
            dist.all_reduce(grad, group=topology.sequence_group)
    got = dict(zip(NAMES + TEXT_NAMES, (out, *(t.grad for t in image_leaves), out_text,
                                         *text_grads)))
    want, bounds = {}, {}
    for name, text_name, value in zip(NAMES, TEXT_NAMES, expected):
        image_part, want[text_name] = _split(case, value)
        want[name] = shard(image_part)
    if case.dtype == "fp64":
        bounds = dict.fromkeys(want, 1e-10)
    else:  # 2x the single-process kernel's error on the joint sequence, plus a tiny atol
        single = single_process_kernel(*joint, _joined(case, dout, dout_text), False, dtype)
        for name, text_name, one, value in zip(NAMES, TEXT_NAMES, single, expected):
            (one_image, one_text), (image_part, text_part) = _split(case, one), _split(case, value)
            bounds[name] = 2 * max_error(one_image, image_part) + ATOL[case.dtype]
            bounds[text_name] = 2 * max_error(one_text, text_part) + ATOL[case.dtype]
    for name, value in got.items():
        if value.dtype != dtype:
            raise AssertionError(f"{name} came back as {value.dtype}, expected {dtype}")
        error = max_error(value, want[name])
        if not error <= bounds[name]:
            raise AssertionError(f"{name} error {error:.3e} > bound {bounds[name]:.3e}")


TOPOLOGIES = {1: [(1, 1, "head-first")],
              2: [(2, 1, "head-first"), (1, 2, "head-first")],
              4: [(2, 2, "head-first"), (2, 2, "context-first"), (4, 1, "head-first"),
                  (1, 4, "head-first")]}


def run_joint_grid(rank: int, world_size: int) -> list[str]:
    """Every topology of the world x head counts x text lengths x text first/last in fp64, and
    one fp32 case per topology. Returns the failures."""
    failures = []
    for ring, ulysses, placement in TOPOLOGIES[world_size]:
        if world_size == 1:
            topology = usp.Topology(sizes={"dp": 1, "ring": 1, "ulysses": 1, "tp": 1},
                                    ranks={"dp": 0, "ring": 0, "ulysses": 0, "tp": 0})
        else:
            topology = usp.Topology.build(ring=ring, ulysses=ulysses, placement=placement)
        cases = [JointCase(hq, hkv, text_len, text_first)
                 for (hq, hkv), text_len, text_first in itertools.product(
                     HEADS, TEXT_LENGTHS, (True, False))]
        cases.append(JointCase(4, 2, 5, True, "fp32"))
        failures += [f"rank {rank} ring={ring} ulysses={ulysses} {placement} {f}" for f in
                     collect_failures(cases, lambda c: check_joint_case(c, topology))]
    return failures


def joint_bad_inputs(rank: int, world_size: int) -> list[str]:
    """Bad input on 4 ranks (ring 2 x ulysses 2): the same ValueError, naming the numbers, on
    every rank; then a real call still works (the ranks stayed in step)."""
    topology = usp.Topology.build(ring=2, ulysses=2)
    x = lambda s, h=4: torch.zeros(1, s, h, 8)  # noqa: E731
    first = rank == 0
    messages = [
        _expect_value_error(lambda: joint_attention(x(3), x(3), x(3), x(5 if first else 6),
                                                    x(5 if first else 6), x(5 if first else 6),
                                                    topology),
                            "disagree", "text shapes", "(1, 5, 4, 8)", "on ranks [0]",
                            "(1, 6, 4, 8)", "on ranks [1, 2, 3]"),
        _expect_value_error(lambda: joint_attention(*[x(4 if rank == 1 else 3)] * 3,
                                                    x(5), x(5), x(5), topology),
                            "disagree", "image shapes", "(1, 4, 4, 8)", "on ranks [1]"),
        _expect_value_error(lambda: joint_attention(x(3), x(3), x(3), x(5, 2), x(5), x(5),
                                                    topology), "text_q (1, 5, 2, 8)", "Hq=4"),
        _expect_value_error(lambda: joint_attention(x(3), x(3, 2), x(3, 2), x(5), x(5), x(5),
                                                    topology), "text_k/text_v (1, 5, 4, 8)",
                            "Hkv=2"),
        _expect_value_error(lambda: joint_attention(x(3), x(3), x(3), x(5), x(5), x(6),
                                                    topology), "text_k and text_v"),
        _expect_value_error(lambda: joint_attention(x(3), x(3, 3), x(3, 3), x(5), x(5, 3),
                                                    x(5, 3), topology),
                            "n_q_heads=4", "n_kv_heads=3"),
        _expect_value_error(lambda: joint_attention(x(3), x(3), x(3), x(5).double(), x(5),
                                                    x(5), topology), "float64"),
    ]
    out, out_text = joint_attention(x(3), x(3), x(3), x(5), x(5), x(5), topology)
    assert out.shape == (1, 3, 4, 8) and out_text.shape == (1, 5, 4, 8)
    return messages
