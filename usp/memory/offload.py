"""Activation offload: the tensors autograd saves for the backward wait in pinned host memory.

Between a block's forward and its backward the saved activations are the bulk of a long
sequence's GPU memory. :class:`ActivationOffload` copies each saved plain CUDA tensor to pinned
host memory when it is saved and back to the GPU when the backward needs it, as
``torch.autograd.graph.save_on_cpu(pin_memory=True)`` does — both copies queued on the current
stream without the host waiting for them — with two differences:

- parameters and their views stay where they are (a linear layer saves its weight, transposed;
  copying it out and back every step would move the whole model over PCIe for nothing);
- tensor subclasses (DTensor under tensor parallelism, the collectives' async wrappers) stay on
  the GPU: ``save_on_cpu`` would copy them as plain tensors of their global shape.

On a CPU the activations already live in host memory: there is nothing to offload, and asking
for it is a ValueError rather than a silent no-op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def check_offload(device: torch.device) -> None:
    """ValueError unless ``device`` is a CUDA device (what offload moves activations off)."""
    if device.type != "cuda":
        raise ValueError(
            f"activation offload moves saved activations from the GPU to host memory, and this "
            f"run's device is {device.type!r}, whose activations are in host memory already: "
            "there is nothing to offload; drop the offload option or train on CUDA"
        )


def is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter, or a view of one (a linear layer saves its weight transposed)."""
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: tensors saved inside it wait in pinned host memory until the backward.

    ``on_device(tensor)`` is called for every saved tensor that stays on the GPU (parameters,
    subclasses): what a memory counter such as ``usp.training.metrics.SavedActivations`` counts.
    """

    def __init__(self, device: torch.device,
                 on_device: Callable[[torch.Tensor], None] | None = None) -> None:
        check_offload(device)
        self._on_device = on_device
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if (tensor.device.type != "cuda" or is_parameter(tensor)
                or is_traceable_wrapper_subclass(tensor)):
            if self._on_device is not None:
                self._on_device(tensor)
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                           pin_memory=True)
        # queued on the current stream, no wait for the host: the caching allocator hands the
        # device tensor's memory only to work queued after this copy on the same stream, and
        # the copy back in the backward is queued after it too
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)  # pinned: ordered on the current stream
