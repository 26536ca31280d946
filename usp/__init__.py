"""usp: Unified Sequence Parallelism (Ulysses x Ring attention) for PyTorch.

Importing usp has no side effects: no process group, no kernel import, no environment reads, and
no torch until a name that needs it is used (``usp --help`` imports no torch; ``usp.lazy``).
"""

from usp.lazy import lazy_exports

_EXPORTS = {
    "AttentionMask": "usp.mask",
    "LAYOUTS": "usp.choices",
    "CommStats": "usp.comm",
    "Topology": "usp.topology",
    "USPAttention": "usp.attention",
    "joint_attention": "usp.attention",
    "parallelize": "usp.parallel",
    "ring_attention": "usp.attention",
    "sequence_positions": "usp.layout",
    "shard_sequence": "usp.layout",
    "ulysses_attention": "usp.attention",
    "unshard_sequence": "usp.layout",
    "usp_attention": "usp.attention",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
