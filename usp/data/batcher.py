"""Global batches of packed windows from a token store, in a seeded order, resumable anywhere.

The store's token stream (every document back to back) is cut into windows of ``seq_len + 1``
tokens that overlap by one, so every token but the first is a label exactly once per epoch
(the semantics ``usp.training.data.TokenBatcher`` always had). Each epoch visits the windows in
the order ``torch.randperm`` draws from ``(seed, epoch)``. A window comes with

- ``targets``: its tokens, with ``IGNORE_INDEX`` where the loss mask says a token is not a target
  (the mask is applied here, before ``usp.batch.shard_batch`` shifts the labels by one and
  shards them, so each label is its own token's verdict);
- ``documents``: the store's document of each token (renumbered from 0 per row), so attention,
  RoPE positions and labels stay inside each document (``shard_batch``'s ``documents``).

The position is global, the same on every rank (each rank takes its part of the global batch):
``(epoch, index)`` of the next unseen window. :meth:`PackedBatcher.state_dict` is a small dict of
numbers that a checkpoint keeps, and :meth:`~PackedBatcher.load_state_dict` continues with the
next unseen window under any world size or layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from usp.data.store import TokenStore

IGNORE_INDEX = -100  # usp.batch.IGNORE_INDEX, without importing the core here


@dataclass
class PackedBatch:
    """``tokens``, ``targets`` and ``documents``: ``LongTensor [global_batch, seq_len + 1]``."""

    tokens: torch.Tensor
    targets: torch.Tensor
    documents: torch.Tensor


class TokenRange:
    """Tokens ``[start, stop)`` of a store: the training part or the held-out part."""

    def __init__(self, store: TokenStore, start: int = 0, stop: int | None = None) -> None:
        self.store, self.start = store, start
        self.stop = store.num_tokens if stop is None else stop

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start

    def window(self, first: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, targets and document ids of ``length`` tokens from token ``first`` of the
        range."""
        start, stop = self.start + first, self.start + first + length
        tokens = self.store.read_tokens(start, stop)
        mask = self.store.read_mask(start, stop)
        targets = tokens if mask is None else np.where(mask, tokens, IGNORE_INDEX)
        documents = self.store.document_ids(start, stop)
        return tokens, targets, documents - documents[0]


def _stack(windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> PackedBatch:
    tokens, targets, documents = (torch.from_numpy(np.stack(parts)) for parts in zip(*windows))
    return PackedBatch(tokens, targets, documents)


class PackedBatcher:
    """Global batches ``[global_batch, seq_len + 1]`` from ``data`` (a store or a range of one)."""

    def __init__(self, data: TokenStore | TokenRange, global_batch: int, seq_len: int,
                 seed: int = 0, render: dict | None = None) -> None:
        self.data = data if isinstance(data, TokenRange) else TokenRange(data)
        if global_batch < 1 or seq_len < 1:
            raise ValueError(f"global_batch={global_batch} and seq_len={seq_len} must be >= 1")
        self.global_batch, self.seq_len, self.seed = global_batch, seq_len, seed
        self.render = render  # how the records became tokens: a resume must not change it
        self.num_windows = (self.data.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"the data has {self.data.num_tokens} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}; add data or lower seq_len"
            )
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    @property
    def num_tokens(self) -> int:
        return self.data.num_tokens

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 2**31 + epoch)
        return torch.randperm(self.num_windows, generator=generator)

    def next_batch(self) -> PackedBatch:
        """The next global batch; the position moves past its windows."""
        windows = []
        for _ in range(self.global_batch):
            if self.index == self.num_windows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            first = int(self._order[self.index]) * self.seq_len
            windows.append(self.data.window(first, self.seq_len + 1))
            self.index += 1
        return _stack(windows)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                 "seq_len": self.seq_len, "num_tokens": self.num_tokens}
        if self.render is not None:
            state["render"] = dict(self.render)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position; refuse one saved over other data or settings."""
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len),
                          ("num_tokens", self.num_tokens)):
            if state[key] != mine:
                raise ValueError(
                    f"data state was saved with {key}={state[key]} but this run has {key}={mine}; "
                    "resume with the same data, seq_len and seed"
                )
        saved_render = state.get("render")  # absent: saved before conversations were read
        if saved_render is not None and self.render is not None and saved_render != self.render:
            raise ValueError(f"data state was saved reading the data as {saved_render} but this "
                             f"run reads it as {self.render}; resume with the same --text-field, "
                             "--chat-field, --loss-on and chat template")
        if not 0 <= state["index"] <= self.num_windows:
            raise ValueError(f"data state index {state['index']} is outside 0..{self.num_windows}")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order(self.epoch)


class HeldOutBatches:
    """``batches`` global batches cut in order from a range of the store (the held-out loss)."""

    def __init__(self, data: TokenRange, global_batch: int, seq_len: int, batches: int) -> None:
        self.data, self.global_batch, self.seq_len, self.num_batches = (
            data, global_batch, seq_len, batches)

    @property
    def num_tokens(self) -> int:
        return self.data.num_tokens

    def batches(self):
        for index in range(self.num_batches):
            yield _stack([self.data.window(window * self.seq_len, self.seq_len + 1)
                          for window in range(index * self.global_batch,
                                              (index + 1) * self.global_batch)])


def hold_out(store: TokenStore, global_batch: int, seq_len: int,
             batches: int) -> tuple[TokenRange, HeldOutBatches]:
    """``(training range, held-out batches)``: the stream's last ``batches x global_batch``
    windows of ``seq_len + 1`` tokens are held out (the stream is split between two tokens, so
    no token is a label on both sides); ValueError if training would keep less than one global
    batch of windows."""
    windows = batches * global_batch
    held_tokens = windows * seq_len + 1
    training_windows = (store.num_tokens - held_tokens - 1) // seq_len
    if batches < 1 or training_windows < global_batch:
        raise ValueError(
            f"--eval-batches={batches} holds out {windows} windows of {seq_len + 1} tokens from "
            f"the data's {store.num_tokens} tokens, which leaves {max(training_windows, 0)} "
            f"windows to train on, fewer than --global-batch={global_batch}; hold out fewer "
            "batches or add data"
        )
    cut = store.num_tokens - held_tokens
    return (TokenRange(store, 0, cut),
            HeldOutBatches(TokenRange(store, cut), global_batch, seq_len, batches))
