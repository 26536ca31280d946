"""Training data in the formats users hold: local text, JSON Lines, Parquet, Arrow and
``datasets.save_to_disk`` folders; chat conversations rendered with the tokenizer's template, the
loss on the assistant's tokens; a token cache on disk; packed, resumable global batches.

    spec = DataSpec(paths=("chats.jsonl",), chat_field="messages", tokenizer="models/qwen3")
    prepared = prepare(spec)                  # tokenizes once; later runs hit the cache
    batcher = PackedBatcher(prepared.store, global_batch=8, seq_len=8192, seed=0,
                            render=spec.render())
    batch = batcher.next_batch()              # tokens, targets (loss mask applied), documents
    usp.batch.shard_batch(batch.tokens, topology, "stripe", targets=batch.targets,
                          documents=batch.documents)

Importing this package loads nothing heavy: ``usp.data.spec`` is what the command line reads.
"""

from usp.lazy import lazy_exports

_EXPORTS = {
    "DataSpec": "usp.data.spec", "LOSS_ON": "usp.data.spec", "check_spec": "usp.data.spec",
    "default_cache_dir": "usp.data.spec",
    "Prepared": "usp.data.cache", "prepare": "usp.data.cache",
    "find_sources": "usp.data.sources",
    "TokenStore": "usp.data.store", "CorruptStore": "usp.data.store",
    "PackedBatch": "usp.data.batcher", "PackedBatcher": "usp.data.batcher",
    "TokenRange": "usp.data.batcher", "hold_out": "usp.data.batcher",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
