"""Training data: byte-level token streams, a deterministic resumable batcher, and the batch
sharding.

Tokens are the UTF-8 bytes of the text (ids 0-255) with documents joined by an end-of-text token
``EOT = 256`` (``usp.inputs.byte_tokens``). Three sources:

- the ``.py`` files of this Python's standard library (``usp.data.stdlib``), a corpus every
  machine with Python has (the default);
- the user's own data (text files, JSON Lines, Parquet, Arrow, ``datasets`` folders, chat
  conversations) goes through ``usp.data``, which tokenizes it into a cache on disk;
- ``usp.data.run.synthetic_tokens``: seeded uniformly random tokens (throughput runs; nothing to learn).

Documents are packed back to back into fixed windows. :func:`documents_of_windows` tells each
window's tokens their document (an ``EOT`` closes the document it ends), so with packing on
(``usp train``'s default) attention, labels and RoPE positions stay inside each document.
:class:`TokenBatcher` cuts the windows of a token stream in a seeded order
(``usp.data.PackedBatcher``'s, which ``usp train`` uses with document boundaries and loss masks).

:func:`usp.batch.shard_batch` turns a global batch into one rank's inputs, labels and positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from usp.inputs.byte_tokens import EOT


def data_summary(documents: int | None, training: int, held_out: int, steps: int,
                 global_batch: int, seq_len: int) -> str:
    """How much data a run has and how often it sees it, for its log: documents (None:
    synthetic tokens), tokens, and epochs = tokens the run will see / tokens it trains on."""
    seen = steps * global_batch * seq_len
    what = "synthetic tokens" if documents is None else f"{documents:,} documents"
    held = f" (and {held_out:,} held out for the eval loss)" if held_out else ""
    return (f"data: {what}, {training:,} tokens to train on{held}; {steps} steps x "
            f"{global_batch} x {seq_len} tokens = {seen:,} tokens, {seen / training:.2f} epochs")


def documents_of_windows(tokens: torch.Tensor, end_of_document: int = EOT) -> torch.Tensor:
    """``[B, S + 1]`` document ids of each window's tokens: a new document starts after every
    ``end_of_document`` token (``EOT``, or a tokenizer's EOS), which belongs to the document it
    ends."""
    is_end = (tokens == end_of_document).long()
    return torch.cumsum(is_end, dim=1) - is_end


def document_tokens(documents: Sequence[str]) -> torch.Tensor:
    """One token stream: each document's bytes followed by ``EOT``. ``-> LongTensor [N]``."""
    encoded = [document.encode("utf-8") for document in documents]
    joined = bytearray(b"".join(encoded))
    # one conversion of all bytes at once: a tensor per document costs seconds on 8 MB
    text = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0)
    stream = torch.full((len(joined) + len(encoded),), EOT, dtype=torch.long)
    is_text = torch.ones(stream.numel(), dtype=torch.bool)
    is_text[torch.tensor([len(e) + 1 for e in encoded], dtype=torch.long).cumsum(0) - 1] = False
    stream[is_text] = text.long()
    return stream


class TokenBatcher:
    """Global batches ``[global_batch, seq_len + 1]`` of windows cut from one token stream.

    The stream is cut into windows of ``seq_len + 1`` tokens that overlap by one, so every token
    but the first is a label exactly once per epoch. Each epoch visits the windows in a random
    order drawn from ``(seed, epoch)``; the position (epoch, index) is the whole state, so
    :meth:`load_state_dict` resumes exactly. The windows and their order are
    ``usp.data.PackedBatcher``'s over the stream; this class hands out their tokens only.
    """

    def __init__(
        self,
        documents_or_tokens: Sequence[str] | torch.Tensor,
        global_batch: int,
        seq_len: int,
        seed: int = 0,
    ) -> None:
        from usp.data.batcher import PackedBatcher
        from usp.data.store import TokenStore

        if isinstance(documents_or_tokens, torch.Tensor):
            self.tokens = documents_or_tokens.reshape(-1).long()
        else:
            self.tokens = document_tokens(documents_or_tokens)
        self._packed = PackedBatcher(TokenStore.in_memory(self.tokens.numpy()), global_batch,
                                     seq_len, seed)
        self.global_batch, self.seq_len, self.seed = global_batch, seq_len, seed
        self.num_windows = self._packed.num_windows

    @property
    def epoch(self) -> int:
        return self._packed.epoch

    @property
    def index(self) -> int:
        return self._packed.index

    def next_batch(self) -> torch.Tensor:
        """The next global batch, ``LongTensor [global_batch, seq_len + 1]``."""
        return self._packed.next_batch().tokens

    def state_dict(self) -> dict:
        return self._packed.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; refuse a state saved over other data or settings."""
        self._packed.load_state_dict(state)
