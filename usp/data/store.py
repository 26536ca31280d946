"""Tokens on disk: flat arrays written once, checked when opened, read a window at a time.

A store is a folder of

- ``tokens.bin``: every document's token ids back to back (``uint16`` when the vocabulary fits,
  else ``uint32``);
- ``offsets.bin``: ``int64 [documents + 1]``, where each document starts (and the total);
- ``loss_mask.bin``: ``uint8 [tokens]``, 1 where a token is a target of the loss (only when some
  tokens are not: chat data trained on the assistant's tokens);
- ``manifest.json``: the counts, the dtype, the largest token id, and the size and BLAKE2b
  (``usp.inputs.fingerprint``: whole up to 256 MiB, sampled blocks beyond) of each file.

:meth:`TokenStore.open` trusts none of it blindly: the manifest must parse and agree with itself,
each file must have exactly the size its counts give and the hash recorded, and the offsets must
start at 0, rise strictly and end at the token count; anything else is a :class:`CorruptStore`.
Every window read is checked again (ids up to the largest recorded, mask values 0 or 1), so a
flipped bit in a large file that the sampled hash missed fails loudly instead of training.

Windows of tokens and mask are read with ``pread`` into fresh arrays, never through a memory map
of the whole file, so the process holds only the windows in use however large the corpus (the
page cache, shared and reclaimable, is the kernel's); the offsets are memory-mapped, and a
window's binary search touches a few of their pages.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

FORMAT, VERSION = "usp-token-store", 1
TOKENS, OFFSETS, MASK, MANIFEST = "tokens.bin", "offsets.bin", "loss_mask.bin", "manifest.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_CHECK_CHUNK = 1 << 20  # offsets checked a million at a time


class CorruptStore(ValueError):
    """A store folder that is not what its manifest says (the cache rebuilds it)."""


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _file_record(path: Path) -> dict:
    from usp.inputs.fingerprint import file_fingerprint

    record = file_fingerprint(path)
    return {key: record[key] for key in ("bytes", "blake2b", "hashed")}


class StoreWriter:
    """Appends documents to a new store folder; :meth:`finish` writes the manifest last. As a
    context manager it removes the unfinished folder when its block fails."""

    def __init__(self, directory: Path, vocab_size: int, with_mask: bool) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=False)
        self.dtype = token_dtype(vocab_size)
        self.with_mask = with_mask
        self.tokens, self.documents, self.loss_tokens, self.max_token_id = 0, 0, 0, -1
        self._files = {TOKENS: open(self.directory / TOKENS, "wb"),
                       OFFSETS: open(self.directory / OFFSETS, "wb")}
        if with_mask:
            self._files[MASK] = open(self.directory / MASK, "wb")
        self._files[OFFSETS].write(np.zeros(1, np.int64).tobytes())

    def append(self, ids: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None) -> None:
        """Documents of ``lengths`` tokens whose ids lie back to back in ``ids`` (and their
        0/1 ``mask``, when the store has one). Every length must be at least 1."""
        if len(lengths) == 0:
            return
        if ids.size and (ids.min() < 0 or ids.max() >= np.iinfo(DTYPES[self.dtype]).max + 1):
            raise ValueError(f"token id {int(ids.max())} does not fit the store's {self.dtype}")
        ends = self.tokens + np.cumsum(lengths, dtype=np.int64)
        self._files[TOKENS].write(ids.astype(DTYPES[self.dtype]).tobytes())
        self._files[OFFSETS].write(ends.tobytes())
        if self.with_mask:
            self._files[MASK].write(mask.astype(np.uint8).tobytes())
            self.loss_tokens += int(mask.sum())
        else:
            self.loss_tokens += int(ids.size)
        self.tokens, self.documents = int(ends[-1]), self.documents + len(lengths)
        if ids.size:
            self.max_token_id = max(self.max_token_id, int(ids.max()))

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:  # any failure, an interrupt included
            self.discard()

    def discard(self) -> None:
        """Close the files and remove the unfinished folder."""
        for file in self._files.values():
            file.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def finish(self, **extra) -> dict:
        """Flush and sync every file, then write ``manifest.json``; returns the manifest."""
        for file in self._files.values():
            file.flush()
            os.fsync(file.fileno())
            file.close()
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": self.dtype, "tokens": self.tokens,
            "documents": self.documents, "loss_tokens": self.loss_tokens,
            "max_token_id": self.max_token_id, "has_mask": self.with_mask,
            "files": {name: _file_record(self.directory / name) for name in self._files},
            **extra,
        }
        with open(self.directory / MANIFEST, "w") as file:
            json.dump(manifest, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        return manifest


class _FileArray:
    """A flat array in a file, read by ``pread`` (no memory map held)."""

    def __init__(self, path: Path, dtype) -> None:
        self.path, self.dtype = path, np.dtype(dtype)
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, self.dtype)
        view, offset = memoryview(out).cast("B"), start * self.dtype.itemsize
        while view.nbytes:
            count = os.preadv(self.fd, [view], offset)
            if count == 0:
                raise CorruptStore(f"{self.path} ended before element {stop} (it was truncated)")
            view, offset = view[count:], offset + count
        return out

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


class _MemoryArray:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


class TokenStore:
    """Read access to a store's windows: tokens, loss mask and document ids of ``[start, stop)``.

    ``name`` says where it is in messages (``directory``: the folder, for a store on disk).
    Build one with :meth:`open` (a folder) or :meth:`in_memory` (arrays: synthetic tokens, a
    tensor stream).
    """

    def __init__(self, tokens, offsets: np.ndarray, mask, max_token_id: int, name: str,
                 manifest: dict | None = None, directory: Path | None = None) -> None:
        self._tokens, self._mask, self.offsets, self.directory = tokens, mask, offsets, directory
        self.max_token_id, self.name, self.manifest = max_token_id, name, manifest or {}
        self.num_tokens, self.num_documents = int(offsets[-1]), len(offsets) - 1

    @classmethod
    def in_memory(cls, tokens: np.ndarray, offsets: np.ndarray | None = None,
                  mask: np.ndarray | None = None, name: str = "tokens in memory") -> "TokenStore":
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        offsets = np.array([0, tokens.size], np.int64) if offsets is None else offsets
        return cls(_MemoryArray(tokens), offsets, None if mask is None else _MemoryArray(mask),
                   int(tokens.max(initial=-1)), name)

    @classmethod
    def open(cls, directory: Path) -> "TokenStore":
        """The store in ``directory``, checked (module docstring); CorruptStore otherwise."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        _check_offsets(_FileArray(directory / OFFSETS, np.int64), manifest["documents"],
                       manifest["tokens"])
        # binary searches touch a few pages of it per window
        offsets = np.memmap(directory / OFFSETS, dtype=np.int64, mode="r")
        tokens = _FileArray(directory / TOKENS, DTYPES[manifest["dtype"]])
        mask = _FileArray(directory / MASK, np.uint8) if manifest["has_mask"] else None
        return cls(tokens, offsets, mask, manifest["max_token_id"], str(directory), manifest,
                   directory)

    @property
    def has_mask(self) -> bool:
        return self._mask is not None

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        tokens = self._tokens.read(start, stop).astype(np.int64)
        if tokens.size and (tokens.max() > self.max_token_id or tokens.min() < 0):
            raise CorruptStore(f"{self.name}: tokens {start}..{stop} hold id {int(tokens.max())}, "
                               f"above the largest id written ({self.max_token_id}): the file "
                               "changed after it was written; delete it to tokenize again")
        return tokens

    def read_mask(self, start: int, stop: int) -> np.ndarray | None:
        if self._mask is None:
            return None
        mask = self._mask.read(start, stop)
        if mask.size and mask.max() > 1:
            raise CorruptStore(f"{self.name}: loss mask {start}..{stop} holds {int(mask.max())}, "
                               "not 0 or 1: the file changed after it was written")
        return mask.astype(bool)

    def document_ids(self, start: int, stop: int) -> np.ndarray:
        """The index of the document each token of ``[start, stop)`` belongs to."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop - 1, side="right")) - 1
        starts = np.asarray(self.offsets[first:last + 1])  # the window's documents only
        positions = np.arange(start, stop, dtype=np.int64)
        return first + np.searchsorted(starts, positions, side="right") - 1


def read_manifest(directory: Path) -> dict:
    """``manifest.json``, checked against itself and the files' sizes and hashes."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptStore(f"{path} cannot be read: {exc}") from exc
    counts = ("tokens", "documents", "loss_tokens", "max_token_id")
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and manifest.get("version") == VERSION and manifest.get("dtype") in DTYPES
            and all(isinstance(manifest.get(key), int) and manifest[key] >= -1 for key in counts)
            and isinstance(manifest.get("has_mask"), bool)
            and isinstance(manifest.get("files"), dict)):
        raise CorruptStore(f"{path} is not a {FORMAT} manifest of version {VERSION}")
    sizes = {TOKENS: manifest["tokens"] * np.dtype(DTYPES[manifest["dtype"]]).itemsize,
             OFFSETS: (manifest["documents"] + 1) * 8}
    if manifest["has_mask"]:
        sizes[MASK] = manifest["tokens"]
    if set(manifest["files"]) != set(sizes):
        raise CorruptStore(f"{path} lists {sorted(manifest['files'])}, expected {sorted(sizes)}")
    for name, size in sizes.items():
        file = Path(directory) / name
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            raise CorruptStore(f"{file} holds {actual} bytes, but its manifest's counts give "
                               f"{size}")
        if _file_record(file) != manifest["files"][name]:
            raise CorruptStore(f"{file} changed after it was written (its BLAKE2b differs from "
                               "the manifest's)")
    return manifest


def _check_offsets(offsets: _FileArray, documents: int, tokens: int) -> None:
    """The offsets start at 0, rise strictly (no empty document) and end at ``tokens``; read a
    chunk at a time."""
    first, last = offsets.read(0, 1)[0], offsets.read(documents, documents + 1)[0]
    if first != 0 or last != tokens:
        raise CorruptStore(f"{offsets.path} runs from {int(first)} to {int(last)}, not from 0 "
                           f"to the {tokens} tokens")
    for start in range(0, documents, _CHECK_CHUNK):
        piece = offsets.read(start, min(start + _CHECK_CHUNK, documents) + 1)
        if not np.all(piece[1:] > piece[:-1]):
            raise CorruptStore(f"{offsets.path}: document offsets do not rise (an empty or "
                               "reversed document)")
