"""A local Hugging Face tokenizer for ``usp train --tokenizer DIR``: loaded, checked, recorded.

Without ``--tokenizer`` the training text is byte-level (``usp.training.data``). With it, each
text document becomes the tokenizer's ids (no special tokens added) followed by the tokenizer's
EOS id, which ends the document as the byte level's end-of-text token does; conversations are
rendered with its chat template (``usp.data`` applies it).
The tokenizer is read from ``DIR`` only (``local_files_only``, no remote code); its vocabulary
must fit the model's embedding, which is checked before any rank starts, with the numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def load_tokenizer(directory: str):
    """``AutoTokenizer.from_pretrained(directory, local_files_only=True)``; ValueError when it
    cannot be loaded or has no EOS token to end documents with."""
    from transformers import AutoTokenizer

    if not Path(directory).is_dir():
        raise ValueError(f"--tokenizer {directory!r} is not a directory holding a tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"--tokenizer {directory!r}: transformers cannot load a tokenizer from it ({exc})"
        ) from exc
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"--tokenizer {directory!r} has no EOS token; usp ends every document with it, so "
            "set eos_token in its tokenizer_config.json"
        )
    return tokenizer


def check_vocab(tokenizer, directory: str, vocab_size: int, model: str) -> None:
    """The tokenizer's ids must index the model's embedding: ``len(tokenizer) <= vocab_size``."""
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"--tokenizer {directory!r} has {len(tokenizer)} tokens (ids up to "
            f"{len(tokenizer) - 1}), but the model {model} has vocab_size={vocab_size}; use the "
            "model's own tokenizer or a model with a larger vocabulary"
        )


def tokenizer_record(tokenizer) -> dict:
    """What a checkpoint records of the tokenizer: a resume must tokenize the same way (wherever
    the tokenizer lies now: its path is in the run's config.json, not here).

    The fingerprint is the SHA-256 of the fast tokenizer's whole serialisation (vocabulary,
    merges, normaliser, pre-tokeniser), or of the sorted vocabulary for a slow one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = backend.to_str()
    else:
        serialised = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "tokens": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "sha256": hashlib.sha256(serialised.encode()).hexdigest(),
    }
