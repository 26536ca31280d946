"""Greedy generation of a :class:`usp.models.Llama` over a sharded KV cache, timed.

One :func:`prefill` of the prompt, then one :func:`decode_step` per further token. Every rank
computes the same logits and so picks the same token; nothing is broadcast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from usp.attention.kernels import Kernel
from usp.infer.cache import ShardedKVCache
from usp.infer.engine import decode_step, prefill
from usp.topology import Topology

Tensor = torch.Tensor


@dataclass
class Generation:
    """``tokens [B, n]`` generated after the prompt, ``logits [B, n, vocab]`` each was chosen
    from, the prefill's wall time and each decode step's (seconds, this rank's clock)."""

    tokens: Tensor
    logits: Tensor
    prefill_seconds: float
    token_seconds: list[float]


def _now(device: torch.device) -> float:
    if device.type == "cuda":  # the kernels run asynchronously: time their end, not their launch
        torch.cuda.synchronize(device)
    return time.perf_counter()


def generate(model, prompt: Tensor, topology: Topology, *, max_new_tokens: int,
             layout: str = "zigzag", cache: ShardedKVCache | None = None,
             ring_pass: str = "auto", kernel: "str | Kernel" = "auto") -> Generation:
    """Greedy ``max_new_tokens`` after ``prompt [B, S]`` (the same on every rank).

    ``cache``: default a new one for ``S + max_new_tokens`` tokens in the model's dtype; a given
    cache may hold earlier turns (the prompt then continues them, through ``ring_pass``).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if prompt.dim() != 2:
        raise ValueError(f"prompt {tuple(prompt.shape)} must be [batch, tokens]")
    weight = next(model.parameters())
    if cache is None:
        cache = ShardedKVCache.for_model(model.config, topology, layout,
                                         prompt.shape[1] + max_new_tokens,
                                         batch=prompt.shape[0], dtype=weight.dtype,
                                         device=weight.device)
    start = _now(weight.device)
    logits = prefill(model, cache, prompt, topology, ring_pass=ring_pass, kernel=kernel)
    token = logits.argmax(dim=-1)  # [B]
    prefill_seconds = _now(weight.device) - start
    tokens, all_logits, token_seconds = [token], [logits], []
    for _ in range(max_new_tokens - 1):
        start = _now(weight.device)
        logits = decode_step(model, cache, token, topology, kernel=kernel)
        token = logits.argmax(dim=-1)
        token_seconds.append(_now(weight.device) - start)
        tokens.append(token)
        all_logits.append(logits)
    return Generation(torch.stack(tokens, dim=1), torch.stack(all_logits, dim=1),
                      prefill_seconds, token_seconds)
