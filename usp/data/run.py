"""What ``usp train`` asks of the data: a check before any rank starts, the tokens on every rank,
and the batches (training and held out).

:func:`check_data` reads nothing but names and the first bytes of files (it runs before launch
and again on every rank). :func:`prepare_on_every_rank` opens the cache, tokenizing first if no
store has the key (one process at a time per key: the others wait on the cache's lock, then
open what it built), and makes the ranks agree: a rank that fails raises the same ValueError on
every rank before any other collective.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from usp.data.batcher import HeldOutBatches, PackedBatcher, hold_out
from usp.data.cache import Prepared, prepare
from usp.data.chat import chat_template
from usp.data.encode import load_tokenizer
from usp.data.sources import find_sources
from usp.data.spec import DataSpec, check_spec
from usp.data.store import TokenStore

logger = logging.getLogger(__name__)


def check_data(spec: DataSpec) -> None:
    """ValueError, naming the setting or the path, for data that cannot be read as asked: the
    settings, every path (local, of a readable kind), and the chat template conversations need.
    Records are checked when they are tokenized (:func:`usp.data.prepare`)."""
    check_spec(spec)
    if spec.paths:
        find_sources(spec.paths)
    if spec.is_chat:
        chat_template(load_tokenizer(spec), spec.tokenizer)


def prepare_on_every_rank(spec: DataSpec) -> Prepared:
    """:func:`usp.data.prepare` on this rank, agreed with every rank; rank 0 logs the counts."""
    from usp.comm import agree

    prepared, error = None, None
    try:
        prepared = prepare(spec)
    except ValueError as exc:
        error = str(exc)
    except OSError as exc:  # a full disk while writing the cache: every rank stops, saying why
        error = f"preparing the data failed: {type(exc).__name__}: {exc}"
    agree(dist.group.WORLD if dist.is_initialized() else None, {}, error)
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info("tokens: %s", prepared.summary())
    return prepared


@dataclass
class RunData:
    """The batches of a run and what its log says of them."""

    batcher: PackedBatcher
    held_out: HeldOutBatches | None
    documents: int | None  # None: synthetic tokens

    @property
    def held_out_tokens(self) -> int:
        return 0 if self.held_out is None else self.held_out.num_tokens


def run_data(store: TokenStore, global_batch: int, seq_len: int, seed: int,
             eval_batches: int = 0, render: dict | None = None,
             documents: int | None = None) -> RunData:
    """The run's batcher over ``store`` (its last ``eval_batches`` global batches held out for
    the held-out loss when ``eval_batches`` > 0)."""
    data, held_out = store, None
    if eval_batches:
        data, held_out = hold_out(store, global_batch, seq_len, eval_batches)
    return RunData(PackedBatcher(data, global_batch, seq_len, seed, render), held_out, documents)


def synthetic_tokens(num_tokens: int, vocab_size: int = 256, seed: int = 0) -> torch.Tensor:
    """``num_tokens`` uniformly random ids in ``[0, vocab_size)`` drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_tokens,), generator=generator)


def synthetic_store(num_tokens: int, seed: int) -> TokenStore:
    """``num_tokens`` seeded random byte-level tokens as one document (runs on synthetic data
    pack nothing)."""
    tokens = synthetic_tokens(num_tokens, seed=seed)
    return TokenStore.in_memory(tokens.numpy().astype(np.int64), name="synthetic tokens")
