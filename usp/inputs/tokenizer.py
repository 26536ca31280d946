"""A local Hugging Face tokenizer for ``usp train --tokenizer DIR``: loaded, checked, recorded.

Without ``--tokenizer`` the training text is byte-level (``usp.inputs.byte_tokens``). With it, each
text document becomes the tokenizer's ids (no special tokens added) followed by the tokenizer's
EOS id, which ends the document as the byte level's end-of-text token does; conversations are
rendered with its chat template (``usp.data`` tokenizes both).
The tokenizer is read from ``DIR`` only (``local_files_only``, ``trust_remote_code=False``, and a
folder asking for custom code is refused before transformers sees it); its largest id must index
the model's embedding, which is checked before any rank starts, with the numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from usp.inputs import folders


def load_tokenizer(directory: str, flag: str = "--tokenizer", need_eos: bool = True):
    """``AutoTokenizer.from_pretrained(directory, local_files_only=True,
    trust_remote_code=False)``; ValueError when ``directory`` is no tokenizer folder, asks for
    custom code (``usp.inputs.folders``), cannot be loaded, or (``need_eos``) has no EOS token
    to end documents with."""
    from transformers import AutoTokenizer

    folders.expect_tokenizer_folder(Path(directory), flag)
    folders.check_tokenizer_code(Path(directory), flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                                  trust_remote_code=False)
    except Exception as exc:  # tokenizers and transformers raise many types for a bad folder
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"{flag} {directory!r}: transformers cannot load a tokenizer from it ({reason})"
        ) from exc
    if need_eos and tokenizer.eos_token_id is None:
        raise ValueError(
            f"{flag} {directory!r} has no EOS token; usp ends every document with it, so "
            "set eos_token in its tokenizer_config.json"
        )
    return tokenizer


def largest_id(tokenizer) -> int:
    """The largest id the tokenizer can produce: of its vocabulary, added and special tokens
    (ids need not be contiguous, so ``len(tokenizer) - 1`` is not it)."""
    ids = list(tokenizer.get_vocab().values()) + list(tokenizer.all_special_ids)
    return max(i for i in ids if i is not None)


def check_vocab(tokenizer, directory: str, vocab_size: int, model: str,
                flag: str = "--tokenizer") -> None:
    """The tokenizer's ids must index the model's embedding: every id below ``vocab_size``."""
    top = largest_id(tokenizer)
    if top >= vocab_size:
        raise ValueError(
            f"{flag} {directory!r} has {len(tokenizer)} tokens (ids up to {top}), but the model "
            f"{model} has vocab_size={vocab_size}; use the model's own tokenizer or a model with "
            "a larger vocabulary"
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
