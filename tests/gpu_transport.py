"""A test-only transport: gloo ranks that share one GPU, with CUDA tensors staged through host.

One GPU cannot host several NCCL ranks, yet the multi-rank path must run on CUDA tensors. Spawned
gloo ranks all use ``cuda:0``; gloo's send/recv read host memory only, so inside
:func:`host_staged_collectives` the three collectives usp's comm layer calls
(``batch_isend_irecv``, ``all_to_all_single``, the all-gather) copy CUDA tensors to the host, run
gloo on the copies and copy the results back. usp's own code runs unchanged; only the bytes take
a detour. NCCL itself is not exercised (docs/gpu.md lists what that leaves unexecuted).

``stage_all=True`` stages CPU tensors too (through clones), so CPU tests check this wrapper.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class _StagedWork:
    """The works of one staged batch; ``wait`` also copies the received host buffers back."""

    def __init__(self, works, copies: list[tuple[Tensor, Tensor]]) -> None:
        self.works, self.copies = works, copies

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        for host, target in self.copies:
            target.copy_(host)
        return True


@contextlib.contextmanager
def host_staged_collectives(stage_all: bool = False):
    originals = {name: getattr(dist, name) for name in
                 ("batch_isend_irecv", "all_to_all_single", "all_gather_single",
                  "all_gather_into_tensor") if hasattr(dist, name)}

    def staged(t: Tensor) -> bool:
        return stage_all or t.device.type != "cpu"

    def host(t: Tensor) -> Tensor:
        return t.detach().to("cpu", copy=True).contiguous()

    def batch_isend_irecv(ops):
        host_ops, copies = [], []
        for op in ops:
            if not staged(op.tensor):
                host_ops.append(op)
                continue
            buffer = host(op.tensor)
            if op.op is dist.irecv:
                copies.append((buffer, op.tensor))
            host_ops.append(dist.P2POp(op.op, buffer, op.peer, op.group, op.tag))
        return [_StagedWork(originals["batch_isend_irecv"](host_ops), copies)]

    def output_input(name):
        def call(output, input, *args, **kwargs):
            if not staged(input):
                return originals[name](output, input, *args, **kwargs)
            host_output = host(output)
            work = originals[name](host_output, host(input), *args, **kwargs)
            if kwargs.get("async_op"):  # posted: the copy back happens at wait()
                return _StagedWork([work], [(host_output, output)])
            output.copy_(host_output)
            return work

        return call

    try:
        dist.batch_isend_irecv = batch_isend_irecv
        for name in originals:
            if name != "batch_isend_irecv":
                setattr(dist, name, output_input(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
