"""Where one call's time goes: usp's profiler labels, summed over one call of each kind.

The library marks its work with ``torch.profiler.record_function`` labels (``usp::...``): the
local kernel (``usp::kernel``, added by :class:`usp.bench.kernel_clock.KernelClock`), the
all-to-all's packing (Ulysses' kv-head replication included), exchange (including the wait for
the slowest rank) and unpacking, the ring's posting of transfers, waits, K/V packing, merges,
gradient accumulation and dtype casts, and the agreement before a call. Whatever no label covers
(autograd, Python, allocation) is ``other``.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from usp.comm import CommStats

CATEGORIES = {
    "usp::kernel": "kernel",
    "usp::all_to_all.pack": "a2a pack",
    "usp::all_to_all.exchange": "a2a",
    "usp::all_to_all.unpack": "a2a unpack",
    "usp::ring.post": "p2p post",
    "usp::ring.wait": "p2p wait",
    "usp::ring.pack": "kv pack",
    "usp::ring.merge": "merge",
    "usp::ring.accumulate": "grad acc",
    "usp::ring.cast": "casts",
    "usp::agree": "agree",
}
COLUMNS = list(dict.fromkeys(CATEGORIES.values())) + ["other", "total"]


def profile_ms(step) -> dict[str, float]:
    """Milliseconds of one ``step()`` by category (labels never nest, so they add up)."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        step()
        total = (time.perf_counter() - start) * 1e3
    spent = defaultdict(float)
    for event in profiler.events():
        if event.name in CATEGORIES:
            spent[CATEGORIES[event.name]] += event.cpu_time_total / 1e3
    result = {column: spent.get(column, 0.0) for column in COLUMNS[:-2]}
    result["other"] = total - sum(result.values())
    result["total"] = total
    return result


def bytes_of_one_step(call, tensors) -> int:
    """Bytes this rank sends in one forward+backward of ``call`` (CommStats)."""
    q, k, v, dout = tensors
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with CommStats() as stats:
        call(*leaves).backward(dout)
    return stats.total()


def breakdown_of_calls(call, tensors) -> dict[str, dict[str, float]]:
    """This rank's profile of one forward and one forward+backward (every rank runs them)."""
    q, k, v, dout = tensors
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    result = {}
    for kind, step in (("fwd", lambda: call(q, k, v)),
                       ("fwd+bwd", lambda: call(*leaves).backward(dout))):
        dist.barrier()
        if kind == "fwd":
            with torch.no_grad():
                result[kind] = profile_ms(step)
        else:
            result[kind] = profile_ms(step)
    return result
