"""The settings of a training run, torch-free: ``usp train``'s flags map one to one onto
:class:`TrainConfig` (``--seq-len`` -> ``seq_len``), and its ``--help`` shows these defaults
without importing torch. ``usp.training.setup`` validates them and builds the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from usp.choices import DEFAULT_CHUNK_TOKENS

# Checkpoint every 50 steps and at the last: a crash loses at most 50 steps, and the README's
# 30-step job still ends with one. 0 turns checkpoints off (benchmarks).
DEFAULT_CHECKPOINT_EVERY = 50


@dataclass
class TrainConfig:
    """Every setting of a run; the CLI flags map one to one (``--seq-len`` -> ``seq_len``)."""

    model: str = "tiny"
    hf_config: str | None = None
    hf_model: str | None = None  # a local Hugging Face directory: config.json + safetensors
    tokenizer: str | None = None  # a local Hugging Face tokenizer directory; None: bytes
    seq_len: int = 1024
    global_batch: int = 0  # 0: one row per micro-batch of each dp rank (with_default_batch)
    steps: int = 20
    lr: float = 3e-3
    warmup: int = 5
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "auto"  # bf16 on CUDA, fp32 on CPU (usp.training.setup.with_device_dtype)
    seed: int = 0
    ring: int = 1
    ulysses: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = -1
    microbatches: int = 0  # pipeline micro-batches per step; 0: one per stage
    pp_schedule: str = "1f1b"
    layout: str = "stripe"  # balanced for dense causal and for packed documents alike
    kernel: str = "auto"
    ac: str = "none"  # a preset or checkpointing kinds (usp.memory.checkpointing)
    tiled_mlp: int = 0  # tokens per tile of the MLP; 0: untiled
    loss: str = "full"  # usp.losses.LOSSES
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    offload_activations: bool = False
    grad_accum: int = 1  # micro-steps per optimizer step
    eval_every: int = 0  # held-out loss every N steps; 0: no held-out split
    eval_batches: int = 4  # global batches held out
    zero2: bool = False
    data: list[str] = field(default_factory=list)
    text_field: str = "text"  # the field of a record that holds its text (usp.data)
    chat_field: str | None = None  # or the field that holds a conversation
    loss_on: str | None = None  # chat: "assistant" (None) or "all"; text trains on every token
    data_cache: str | None = None  # token caches; None: usp.data.spec.default_cache_dir()
    synthetic: bool = False
    pack: bool = True
    out: str = "runs/tiny"
    ckpt_every: int = DEFAULT_CHECKPOINT_EVERY
    resume: str | None = None
    init_from: str | None = None  # a run or checkpoint whose weights start this new run
    reference_metrics: str | None = None
    peak_tflops: float | None = None
    device: str = "auto"
    nproc: int = 1
    progress: bool = True
