"""usp: Unified Sequence Parallelism (Ulysses x Ring attention) for PyTorch.

Importing usp has no side effects: no process group, no kernel import, no environment reads.
"""

from usp.attention import (
    USPAttention,
    joint_attention,
    ring_attention,
    ulysses_attention,
    usp_attention,
)
from usp.comm import CommStats
from usp.layout import LAYOUTS, sequence_positions, shard_sequence, unshard_sequence
from usp.parallel import parallelize
from usp.topology import Topology

__all__ = [
    "LAYOUTS",
    "CommStats",
    "Topology",
    "USPAttention",
    "joint_attention",
    "parallelize",
    "ring_attention",
    "sequence_positions",
    "shard_sequence",
    "ulysses_attention",
    "unshard_sequence",
    "usp_attention",
]
__version__ = "0.1.0"
