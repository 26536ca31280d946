"""Sequence-parallel attention: local kernels, the ring, Ulysses and their union."""

from usp.attention.joint import joint_attention
from usp.attention.kernels import KERNELS, resolve_kernel
from usp.attention.usp import USPAttention, ring_attention, ulysses_attention, usp_attention

__all__ = ["KERNELS", "USPAttention", "joint_attention", "resolve_kernel", "ring_attention",
           "ulysses_attention", "usp_attention"]
