"""Generative inference over a sharded KV cache: prefill (pass-KV or pass-Q rings), decode.

An application layer on usp's core: it imports attention, comm, layout, schedule and topology;
nothing in the core imports it. See docs/inference.md. The exports below are imported on first
use (``usp.lazy``), so ``usp generate --help`` reads ``usp.infer.config`` without torch.
"""

from usp.lazy import lazy_exports

_EXPORTS = {
    "Generation": "usp.infer.generate",
    "ShardedKVCache": "usp.infer.cache",
    "choose_ring_pass": "usp.infer.attention",
    "decode_step": "usp.infer.engine",
    "generate": "usp.infer.generate",
    "prefill": "usp.infer.engine",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
