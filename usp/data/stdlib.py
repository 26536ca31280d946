"""The default corpus: the ``.py`` files of this Python's standard library, which every machine
with Python has, and its fingerprint (one entry: a hash over the documents as read)."""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

DEFAULT_STDLIB_BYTES = 8 * 2**20


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


@functools.lru_cache(maxsize=1)
def stdlib_fingerprint() -> dict:
    """The fingerprint entry of the default corpus (``usp.inputs.fingerprint``'s form)."""
    digest, total = hashlib.blake2b(digest_size=16), 0
    for document in stdlib_documents():
        data = document.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
        total += len(data)
    version = ".".join(map(str, sys.version_info[:3]))
    return {"file": f"the standard library of Python {version}", "bytes": total,
            "modified": None, "blake2b": digest.hexdigest(), "hashed": "whole"}
