"""Content fingerprints of a run's inputs, so that a resume notices data or a tokenizer edited in
place.

A checkpoint records, for each input file, its size, its modification time and a BLAKE2b hash of
its content (``run.inputs`` in ``meta.json``); a resume recomputes them and refuses, naming the
file, when a size or a hash differs: the token stream would no longer be the one the run trained
on, and the resumed losses would differ without a word.

- Files up to :data:`FULL_HASH_LIMIT` (256 MiB) are hashed whole: BLAKE2b runs at about 1 GB/s,
  so the README's 8 MB of standard-library source costs milliseconds.
- Larger files are hashed by :data:`SAMPLE_BLOCKS` blocks of :data:`BLOCK` bytes at evenly spaced
  offsets (the first and the last included) plus the size: a bounded cost for corpora of any
  size, which catches truncation, appends and edits that touch a sampled block, but not every
  edit between blocks. The record says ``"hashed": "sampled"`` and the modification time is then
  compared too (a warning, not a refusal: a copy to another machine changes it).
- The standard library (the default data) is one entry: a hash over the documents as read
  (``usp.data.stdlib``); :func:`usp.data.sources.data_fingerprint` gathers a run's data entries.
- A tokenizer folder: each file that defines the tokenization (``tokenizer.json``, vocabularies,
  merges, SentencePiece models, their configs), by name inside the folder, so the folder may move.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

from usp.inputs import safe_files

logger = logging.getLogger(__name__)

FULL_HASH_LIMIT = 256 << 20
SAMPLE_BLOCKS = 64
BLOCK = 64 << 10
_CHUNK = 1 << 20
# the files a Hugging Face tokenizer is read from (weights and model configs are not)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")
TOKENIZER_SUFFIXES = (".model", ".tiktoken", ".spm")


def _digest(file, size: int) -> tuple[str, str]:
    digest = hashlib.blake2b(digest_size=16)
    if size <= FULL_HASH_LIMIT:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
        return digest.hexdigest(), "whole"
    digest.update(size.to_bytes(8, "little"))
    for block in range(SAMPLE_BLOCKS):
        file.seek((size - BLOCK) * block // (SAMPLE_BLOCKS - 1))
        digest.update(file.read(BLOCK))
    return digest.hexdigest(), "sampled"


@functools.lru_cache(maxsize=4096)
def _cached(path: str, size: int, mtime_ns: int, inode: int) -> tuple[str, str]:
    """A process hashes a file once per (size, mtime, inode): validation before launch, the
    checks on each rank and the checkpoint's record all ask for it."""
    fd = safe_files.open_regular(Path(path), os.O_RDONLY, follow_links=True)
    with os.fdopen(fd, "rb") as file:
        return _digest(file, size)


def file_fingerprint(path: Path, name: str | None = None) -> dict:
    """``{"file", "bytes", "modified", "blake2b", "hashed"}`` of the regular file ``path``."""
    status = os.stat(path)
    digest, hashed = _cached(str(Path(path).resolve()), status.st_size, status.st_mtime_ns,
                             status.st_ino)
    modified = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.st_mtime))
    return {"file": name or str(Path(path).resolve()), "bytes": status.st_size,
            "modified": modified, "blake2b": digest, "hashed": hashed}


def tokenizer_fingerprint(directory: str) -> list[dict]:
    """The fingerprints of the files of a tokenizer folder that define its tokenization."""
    names = sorted(entry.name for entry in os.scandir(directory)
                   if entry.is_file() and (entry.name in TOKENIZER_FILES
                                           or entry.name.endswith(TOKENIZER_SUFFIXES)))
    return [file_fingerprint(Path(directory) / name, name) for name in names]


def _describe(entry: dict) -> str:
    when = f", modified {entry['modified']}" if entry.get("modified") else ""
    return f"{entry['bytes']} bytes, BLAKE2b {entry['blake2b'][:16]}...{when}"


def changes(saved: list[dict], current: list[dict], what: str) -> list[str]:
    """What differs between the fingerprints a checkpoint recorded and the inputs now, a sentence
    per file (``what``: "data file", "tokenizer file"); warns of a sampled file whose hash held
    but whose modification time moved."""
    before = {entry["file"]: entry for entry in saved}
    now = {entry["file"]: entry for entry in current}
    problems = [f"{what} {name} is gone (it was {_describe(before[name])})"
                for name in before if name not in now]
    problems += [f"{what} {name} is new (the run did not train on it)"
                 for name in now if name not in before]
    for name in before.keys() & now.keys():
        old, new = before[name], now[name]
        if (old["bytes"], old["blake2b"]) != (new["bytes"], new["blake2b"]):
            problems.append(f"{what} {name} changed since the checkpoint was saved (then "
                            f"{_describe(old)}; now {_describe(new)})")
        elif new["hashed"] == "sampled" and old.get("modified") != new.get("modified"):
            logger.warning("%s %s was modified since the checkpoint was saved (%s, now %s); its "
                           "size and sampled blocks are unchanged, so the resume goes on",
                           what, name, old.get("modified"), new.get("modified"))
    return sorted(problems)
