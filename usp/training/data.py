"""Training data: byte-level tokens, a deterministic resumable batcher, and the batch sharding.

Tokens are the UTF-8 bytes of the text (ids 0-255) with documents joined by an end-of-text token
``EOT = 256``, so 257 ids in all. Three sources:

- :func:`stdlib_documents`: the ``.py`` files of this Python's standard library, a corpus every
  machine with Python has (the default);
- :func:`text_file_documents`: the user's own text files (or folders of them), one document
  each; structured data (JSONL, Parquet, Arrow, CSV ...) is refused, never read as text;
- :func:`synthetic_tokens`: seeded uniformly random tokens (throughput runs; nothing to learn).

Documents are packed back to back into fixed windows. :func:`documents_of_windows` tells each
window's tokens their document (an ``EOT`` closes the document it ends), so with packing on
(``usp train``'s default) attention, labels and RoPE positions stay inside each document.

:func:`usp.batch.shard_batch` turns a global batch into one rank's inputs, labels and positions.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch


EOT = 256
BYTE_VOCAB_SIZE = 257
DEFAULT_STDLIB_BYTES = 8 * 2**20


def encode(text: str) -> list[int]:
    """Byte-level token ids (0-255) of ``text``'s UTF-8 encoding."""
    return list(text.encode("utf-8"))


def decode(tokens: Sequence[int]) -> str:
    """Text of byte-level ids; ``EOT`` becomes ``<|endoftext|>``, broken UTF-8 becomes U+FFFD."""
    pieces, current = [], bytearray()
    for token in tokens:
        token = int(token)
        if token == EOT:
            pieces.append(current.decode("utf-8", errors="replace") + "<|endoftext|>")
            current = bytearray()
        elif 0 <= token < 256:
            current.append(token)
        else:
            raise ValueError(f"token id {token} is not a byte-level id (0-255, or EOT={EOT})")
    pieces.append(current.decode("utf-8", errors="replace"))
    return "".join(pieces)


def stdlib_documents(max_bytes: int = DEFAULT_STDLIB_BYTES) -> list[str]:
    """The standard library's ``.py`` files, in sorted path order, until ``max_bytes`` are read.

    ``site-packages`` is skipped: it differs between machines. The same Python version gives the
    same documents everywhere.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(
            d for d in subdirectories if d not in ("site-packages", "__pycache__")
        )
        paths.extend(Path(directory, f) for f in files if f.endswith(".py"))
    documents, total = [], 0
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        if total >= max_bytes:
            break
        data = path.read_bytes()
        documents.append(data.decode("utf-8", errors="replace"))
        total += len(data)
    if not documents:
        raise ValueError(f"no .py files found under the standard library directory {root}")
    return documents


# structured data, which a later version reads through `datasets`; today it would be trained on
# as its raw JSON/CSV text (or bytes), one document per file
STRUCTURED_SUFFIXES = {".jsonl": "a JSON Lines file", ".ndjson": "a JSON Lines file",
                       ".json": "a JSON file", ".parquet": "a Parquet file",
                       ".arrow": "an Arrow file", ".feather": "an Arrow file",
                       ".csv": "a CSV file", ".tsv": "a TSV file"}
DATASETS_FOLDER_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
ACCEPTED = ("usp train reads plain text today: text files, or folders of them (each file one "
            "document); structured data (JSONL, JSON, Parquet, Arrow, CSV, datasets folders) is "
            "not read yet: write its text field to .txt files")
SNIFF_BYTES = 8192


def _structured_kind(path: Path, head: bytes) -> str | None:
    """What structured format a file is, by its extension or its first bytes; None for text."""
    kind = STRUCTURED_SUFFIXES.get(path.suffix.lower())
    if kind is not None:
        return kind
    if head.startswith(b"PAR1"):
        return "a Parquet file (by its first bytes)"
    if head.startswith(b"ARROW1"):
        return "an Arrow file (by its first bytes)"
    first_line = head.split(b"\n", 1)[0].strip()
    if first_line.startswith(b"{") and first_line.endswith(b"}"):
        try:
            if isinstance(json.loads(first_line), dict):
                return "JSON Lines (its first line is a JSON object)"
        except ValueError:
            pass
    if re.match(rb"\s*[\[{]\s*\"", head):
        return "JSON (it starts like a JSON object or array)"
    return None


def _check_text_file(path: Path) -> None:
    """ValueError unless ``path`` is a readable file of text (not structured, not binary)."""
    try:
        with open(path, "rb") as file:
            head = file.read(SNIFF_BYTES)
    except OSError as exc:
        raise ValueError(f"data path {str(path)!r} cannot be read: {exc}") from exc
    kind = _structured_kind(path, head)
    if kind is not None:
        raise ValueError(f"data file {str(path)!r} is {kind}; {ACCEPTED}")
    if b"\x00" in head:
        raise ValueError(f"data file {str(path)!r} is binary (it holds NUL bytes), not text; "
                         f"{ACCEPTED}")


def data_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The text files ``--data`` names: each file given, and every regular file under each
    folder given (recursively, in sorted path order; hidden names, starting with ".", skipped).
    ValueError, naming the path, for anything missing, structured, binary or empty."""
    if not paths:
        raise ValueError("no data paths given; pass one or more text files or folders")
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"data path {str(path)!r} does not exist")
        if path.is_dir():
            marker = next((name for name in DATASETS_FOLDER_FILES if (path / name).is_file()),
                          None)
            if marker is not None:
                raise ValueError(f"data folder {str(path)!r} is a `datasets` folder (it holds "
                                 f"{marker}: datasets.save_to_disk); {ACCEPTED}")
            found = sorted(
                (p for p in path.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                key=lambda p: p.relative_to(path).as_posix())
            if not found:
                raise ValueError(f"data folder {str(path)!r} holds no files; {ACCEPTED}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data path {str(path)!r} is neither a file nor a folder")
    for file in files:
        _check_text_file(file)
    return files


def text_file_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One document per text file (folders: every file in them, :func:`data_files`); a
    missing, structured, binary or unreadable path raises ValueError naming it."""
    documents = []
    for path in data_files(paths):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"data path {str(path)!r} cannot be read: {exc}") from exc
        if b"\x00" in data:
            raise ValueError(f"data file {str(path)!r} is binary (it holds NUL bytes), not "
                             f"text; {ACCEPTED}")
        documents.append(data.decode("utf-8", errors="replace"))
    return documents


def data_summary(documents: int | None, training: int, held_out: int, steps: int,
                 global_batch: int, seq_len: int) -> str:
    """How much data a run has and how often it sees it, for its log: documents (None:
    synthetic tokens), tokens, and epochs = tokens the run will see / tokens it trains on."""
    seen = steps * global_batch * seq_len
    what = "synthetic tokens" if documents is None else f"{documents:,} documents"
    held = f" (and {held_out:,} held out for the eval loss)" if held_out else ""
    return (f"data: {what}, {training:,} tokens to train on{held}; {steps} steps x "
            f"{global_batch} x {seq_len} tokens = {seen:,} tokens, {seen / training:.2f} epochs")


def synthetic_tokens(num_tokens: int, vocab_size: int = 256, seed: int = 0) -> torch.Tensor:
    """``num_tokens`` uniformly random ids in ``[0, vocab_size)`` drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_tokens,), generator=generator)


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
    :meth:`load_state_dict` resumes exactly.
    """

    def __init__(
        self,
        documents_or_tokens: Sequence[str] | torch.Tensor,
        global_batch: int,
        seq_len: int,
        seed: int = 0,
    ) -> None:
        if isinstance(documents_or_tokens, torch.Tensor):
            self.tokens = documents_or_tokens.reshape(-1).long()
        else:
            self.tokens = document_tokens(documents_or_tokens)
        if global_batch < 1 or seq_len < 1:
            raise ValueError(f"global_batch={global_batch} and seq_len={seq_len} must be >= 1")
        self.global_batch, self.seq_len, self.seed = global_batch, seq_len, seed
        self.num_windows = (self.tokens.numel() - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"the data has {self.tokens.numel()} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}; add data or lower seq_len"
            )
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 2**31 + epoch)
        return torch.randperm(self.num_windows, generator=generator)

    def next_batch(self) -> torch.Tensor:
        """The next global batch, ``LongTensor [global_batch, seq_len + 1]``."""
        rows = []
        for _ in range(self.global_batch):
            if self.index == self.num_windows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            start = int(self._order[self.index]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
            self.index += 1
        return torch.stack(rows)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_tokens": self.tokens.numel(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; refuse a state saved over other data or settings."""
        for key, mine in (
            ("seed", self.seed), ("seq_len", self.seq_len), ("num_tokens", self.tokens.numel())
        ):
            if state[key] != mine:
                raise ValueError(
                    f"data state was saved with {key}={state[key]} but this run has {key}={mine}; "
                    "resume with the same data, seq_len and seed"
                )
        if not 0 <= state["index"] <= self.num_windows:
            raise ValueError(f"data state index {state['index']} is outside 0..{self.num_windows}")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order(self.epoch)
