"""One rank's part of ``usp check``: run the drawn cases in lockstep and gather the verdicts.

Every rank draws the same cases (:func:`usp.check.cases.draw_cases`) and runs each one with the
others, because ``usp_attention`` is a collective. Each case:

1. draws its global tensors (each dp replica its own) and computes the fp64 reference on this
   rank's device; the ranks then agree that every one of them is ready (a rank whose reference
   failed would otherwise leave the others waiting inside the attention);
2. per dtype, runs ``usp_attention`` forward and backward on this rank's shards with the kernel a
   real run picks, and compares out, dq, dk, dv with the reference's shards; the bound comes from
   the same dtype on one device: ``usp_attention`` over the whole sequence on this device and the
   textbook attention (:func:`usp.check.reference.bounds`); the single-device kernel is itself
   held to the textbook attention, so a wrong kernel cannot widen the bound;
3. gathers every rank's errors; all ranks merge them alike, and rank 0's clock, seen by all,
   decides whether the next case still fits the time budget (the ranks never disagree on how many
   cases run).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import usp
from usp.attention.kernels import KERNELS, resolve_kernel
from usp.check.cases import MASKS, CheckCase, draw_cases
from usp.check.reference import (GRADIENTS, bounds, dense_attention, dense_visible,
                                 kernel_bounds, magnitudes, max_error)
from usp.check.report import CheckReport, merge_rows
from usp.topology import Topology

logger = logging.getLogger(__name__)
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}
MOST_CASES = 1000
NAMES = ("out", *GRADIENTS)


@dataclass(frozen=True)
class CheckSettings:
    """What ``usp check`` runs: a time budget (seconds; new cases start only while the budget
    holds), the seed of the cases, the device type (``cpu`` or ``cuda``), dtypes (None: the
    device's defaults), the kernel (``auto``: what a real run picks), at most ``max_cases``
    cases, and the mask kinds to draw from."""

    seconds: float = 120.0
    seed: int = 0
    device: str = "cpu"
    dtypes: tuple[str, ...] | None = None
    kernel: str = "auto"
    max_cases: int = MOST_CASES
    masks: tuple[str, ...] = MASKS

    def dtype_names(self) -> tuple[str, ...]:
        return tuple(self.dtypes or DEFAULT_DTYPES[self.device])

    def validate(self) -> None:
        """Raise ValueError, naming the value, for settings no rank could run."""
        if self.device not in DEFAULT_DTYPES:
            raise ValueError(f"device {self.device!r}: choose cpu or cuda")
        unknown = [name for name in self.dtype_names() if name not in DTYPES]
        if unknown:
            raise ValueError(f"dtypes {unknown}: choose from {sorted(DTYPES)}")
        unknown = sorted(set(self.masks) - set(MASKS))
        if unknown or not self.masks:
            raise ValueError(f"masks {unknown or list(self.masks)}: choose from {list(MASKS)}")
        if self.kernel != "auto" and self.kernel not in KERNELS:
            raise ValueError(f"kernel {self.kernel!r}: choose auto or one of {sorted(KERNELS)}")
        if not self.seconds > 0:
            raise ValueError(f"the time budget {self.seconds} s must be positive")
        if self.max_cases < 1:
            raise ValueError(f"at most {self.max_cases} cases: give at least 1")


def run_check(settings: CheckSettings) -> CheckReport:
    """Run the check on this rank (every rank of the initialised world calls it; without a
    process group, one rank alone). Returns the same report on every rank."""
    settings.validate()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = (torch.device("cuda", torch.cuda.current_device()) if settings.device == "cuda"
              else torch.device("cpu"))
    dtype_names = settings.dtype_names()
    cases = draw_cases(settings.max_cases, world_size, device.type, settings.seed,
                       settings.masks)
    topologies: dict[tuple, Topology] = {}
    single_device = Topology(sizes={}, ranks={})  # the whole sequence on this rank alone
    start = time.monotonic()
    rows: list[dict] = []
    for done, case in enumerate(cases, start=1):
        key = (case.ring, case.ulysses, case.placement)
        if key not in topologies:  # a collective: every rank builds the same one, in order
            topologies[key] = Topology.build(ring=case.ring, ulysses=case.ulysses,
                                             placement=case.placement)
        mine = run_case(case, topologies[key], single_device, device, dtype_names,
                        settings.kernel)
        gathered = _all_gather({"rows": mine, "elapsed": time.monotonic() - start})
        rows += merge_rows(case, dtype_names, [g["rows"] for g in gathered])
        for row in rows[-len(dtype_names):]:
            logger.debug("%s %s: %s", case, row["dtype"], "ok" if row["ok"] else row["problem"])
        elapsed = gathered[0]["elapsed"]  # rank 0's clock decides for every rank
        if elapsed + elapsed / done > settings.seconds:
            break
    backend = str(dist.get_backend()) if dist.is_initialized() else "none"
    return CheckReport(rows=rows, world_size=world_size, device=device.type, backend=backend,
                       seconds=time.monotonic() - start)


def _all_gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def run_case(case: CheckCase, topology: Topology, single_device: Topology, device: torch.device,
             dtype_names: tuple[str, ...], kernel: str) -> list[dict]:
    """This rank's errors for ``case`` in each dtype: a dict per dtype (see :func:`_run_dtype`)."""
    problem = None
    try:
        dp_rank = topology.rank("dp")
        generator = torch.Generator().manual_seed(case.seed + 7919 * dp_rank)
        make = lambda heads: torch.randn(  # noqa: E731
            case.batch, case.seq_len, heads, case.head_dim, generator=generator,
            dtype=torch.float64).to(device)
        tensors = [make(case.heads), make(case.kv_heads), make(case.kv_heads), make(case.heads)]
        visible = dense_visible(case.token_ids().to(device), case.causal, case.window)
        expected = dense_attention(*tensors, visible)
        sizes = magnitudes(*tensors, expected[0], visible)  # (per tensor, lse)
    except Exception as exc:  # reported as the case's failure; the ranks agree below
        problem = f"the reference failed: {type(exc).__name__}: {exc}"
    problems = [p for p in _all_gather(problem) if p is not None]
    if problems:
        return [{"problem": problems[0]} for _ in dtype_names]
    return [_run_dtype(case, topology, single_device, tensors, visible, expected, sizes,
                       DTYPES[name], kernel) for name in dtype_names]


def _attention(q, k, v, dout, topology, layout, case: CheckCase, kernel: str):
    """usp_attention forward and backward: ``(out, dq, dk, dv)``."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = usp.usp_attention(*leaves, topology, causal=case.causal, layout=layout, kernel=kernel,
                            **case.mask_arguments())
    out.backward(dout)
    return [out.detach(), *(t.grad for t in leaves)]


def _run_dtype(case, topology, single_device, tensors, visible, expected, sizes, dtype,
               kernel) -> dict:
    """``{"kernel", "usp": [(error, bound)] * 4, "single": [(error, bound)] * 4}`` for out, dq,
    dk, dv, or ``{"problem": why}``."""
    shard = lambda t: usp.shard_sequence(t, topology, case.layout)  # noqa: E731
    try:
        local = [shard(t).to(dtype) for t in tensors]
        got = _attention(*local, topology, case.layout, case, kernel)
    except Exception as exc:  # a rejected or failed case is a failing row, not a crash
        return {"problem": f"usp_attention raised {type(exc).__name__}: {exc}"}
    try:
        wrong_dtype = [name for name, t in zip(NAMES, got) if t is None or t.dtype != dtype]
        if wrong_dtype:
            return {"problem": f"{wrong_dtype} came back missing or not in {dtype}"}
        usp_errors = [max_error(g, shard(e)) for g, e in zip(got, expected)]
        # the same choice usp_attention makes for these tensors
        chosen = resolve_kernel(kernel, local[0]).name
        if dtype == torch.float64:
            fp64_bounds = bounds(dtype, usp_errors, usp_errors, *sizes)
            return {"kernel": chosen, "usp": list(zip(usp_errors, fp64_bounds)), "single": None}
        low = [t.to(dtype) for t in tensors]
        textbook = dense_attention(*low, visible)
        textbook_errors = [max_error(t, e) for t, e in zip(textbook, expected)]
        single = _attention(*low, single_device, "contiguous", case, kernel)
        single_errors = [max_error(s, e) for s, e in zip(single, expected)]
        usp_bounds = bounds(dtype, single_errors, textbook_errors, *sizes)
        single_bounds = kernel_bounds(dtype, textbook_errors, *sizes)
        return {"kernel": chosen, "usp": list(zip(usp_errors, usp_bounds)),
                "single": list(zip(single_errors, single_bounds))}
    except Exception as exc:
        return {"problem": f"the comparison failed: {type(exc).__name__}: {exc}"}
