"""The optimizer section of a run (``usp.spec.Optim``): its check, AdamW and the learning-rate
schedule, a linear warm-up then a cosine to ``min_lr``.

Matrices and embeddings decay (``weight_decay``); norms and biases do not, since decay would
fight the scale they learn. The schedule's multiplier of step ``s`` depends on ``(s, warmup,
steps, min_lr / lr)`` only, which is why a resumed run must keep those (``usp.training.
checkpoint_record``).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from usp.spec import Optim


def check_optim(optim: Optim) -> None:
    """ValueError, naming the setting and its value, for a schedule that cannot run."""
    if optim.steps < 1:
        raise ValueError(f"--steps={optim.steps} must be >= 1")
    if optim.warmup < 0 or optim.grad_clip < 0:
        raise ValueError(f"--warmup={optim.warmup} and --grad-clip={optim.grad_clip} must be "
                         ">= 0")
    if not 0 <= optim.min_lr <= optim.lr:
        raise ValueError(f"--min-lr={optim.min_lr} must lie in [0, --lr={optim.lr}]")
    if optim.grad_accum < 1:
        raise ValueError(f"--grad-accum={optim.grad_accum} must be >= 1")


def lr_at_step(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier of step ``step`` (0-based): linear warm-up, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, optim: Optim):
    """``(AdamW, its LambdaLR schedule)`` over the trainable parameters ``model`` holds (with
    LoRA, the adapters' factors: the frozen base weights get neither moments nor decay)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # norms: decay would fight their scale
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    schedule = partial(lr_at_step, warmup=optim.warmup, total=optim.steps,
                       min_ratio=optim.min_lr / optim.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
