"""Cross-entropy without full logits: in chunks (``chunked``) or split over tp (``vocab_parallel``).

:class:`LossHead` picks one and keeps ``usp.loss``'s exact global-mean semantics for each.
"""

from usp.losses.chunked import chunked_cross_entropy_sum
from usp.losses.head import DEFAULT_CHUNK_TOKENS, LOSSES, LossHead, check_loss
from usp.losses.vocab_parallel import vocab_parallel_cross_entropy_sum

__all__ = [
    "DEFAULT_CHUNK_TOKENS", "LOSSES", "LossHead", "check_loss", "chunked_cross_entropy_sum",
    "vocab_parallel_cross_entropy_sum",
]
