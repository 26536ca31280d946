"""Generative inference over a sharded KV cache: prefill (pass-KV or pass-Q rings), decode.

An application layer on usp's core: it imports attention, comm, layout, schedule and topology;
nothing in the core imports it. See docs/inference.md.
"""

from usp.infer.attention import choose_ring_pass
from usp.infer.cache import ShardedKVCache
from usp.infer.engine import decode_step, prefill
from usp.infer.generate import Generation, generate

__all__ = ["Generation", "ShardedKVCache", "choose_ring_pass", "decode_step", "generate",
           "prefill"]
