"""Byte-level tokens, what ``usp train`` trains on without ``--tokenizer``: the UTF-8 bytes of
the text (ids 0-255), documents ended by an end-of-text token ``EOT = 256``, so 257 ids in all.
Any text is valid input; an id outside them is refused when decoded."""

from __future__ import annotations

from collections.abc import Sequence

EOT = 256
BYTE_VOCAB_SIZE = 257


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
