"""The names usp's options take, in a module that imports nothing.

The command line offers them as choices, and ``usp --help`` imports no torch, so they live here;
the modules that implement them (``usp.layout``, ``usp.topology``, ``usp.pipeline``,
``usp.losses``, ``usp.infer``, ``usp.scan``) and the planner import them from here, with the rule
an ``"auto"`` follows where both need it.
"""

LAYOUTS = ("contiguous", "zigzag", "stripe")  # usp.layout
# usp.topology and the planner: the mesh axes of each placement, outermost first (ranks are laid
# row-major, so the last axes hold adjacent ranks, a node's fast links). "head-first" puts Ulysses
# inside the ring's rows (its all-to-all stays in a node), "context-first" the ring.
MESH_ORDERS = {
    "head-first": ("pp", "dp", "ring", "ulysses", "tp"),
    "context-first": ("pp", "dp", "ulysses", "ring", "tp"),
}
PLACEMENTS = tuple(MESH_ORDERS)
PIPELINE_SCHEDULES = ("1f1b", "gpipe")  # usp.pipeline
LOSSES = ("full", "chunked", "vocab_parallel")  # usp.losses.head
# 1024 tokens of fp32 logits over a 128k vocabulary are 0.5 GiB: small next to a long sequence's
# activations, large enough for the projection to run as one efficient matmul
DEFAULT_CHUNK_TOKENS = 1024
LOSS_ON = ("assistant", "all")  # usp.data: chat data trains on the assistant's tokens, or all
RING_PASSES = ("auto", "kv", "q")  # usp.infer: which ring a prompt continuing a cache uses
WANDB_MODES = ("online", "offline")  # usp.training.wandb_log: W&B with or without a network
# usp.scan: what a scan splits over the Ulysses ranks (docs/hybrid.md). "state": each rank scans
# its own shard of the sequence, every head, and the state passes along all ring x ulysses shards
# in sequence order (no all-to-all); "heads": an all-to-all hands each rank every token of its
# ring block for a slice of the heads, and the state passes along the ring only; "auto": below
SCAN_ULYSSES = ("auto", "state", "heads")


def scan_ulysses(mode: str, sequence_size: int, matrix_transition: bool) -> str:
    """``mode``, with "auto" made "state" unless the block's transition is a matrix that the
    blocks between the first and the last must build for every head (the delta rule's) and the
    chain along every one of the ``sequence_size`` (ring x ulysses) shards would have such
    blocks (more than two shards): then "heads"."""
    if mode != "auto":
        return mode
    return "heads" if matrix_transition and sequence_size > 2 else "state"
