"""What data a run trains on and how it becomes tokens, torch-free: the command line reads its
defaults here (``usp data prepare --help`` and ``usp train --help`` import no torch).

A :class:`DataSpec` names the local paths, the field of each record to read (a text field, or a
chat field of role/content messages), which tokens carry the loss, the tokenizer, and the token
cache. :func:`check_spec` refuses settings that cannot work before anything is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from usp.choices import LOSS_ON

DEFAULT_TEXT_FIELD = "text"


def default_cache_dir() -> str:
    """Where token caches live unless ``--data-cache`` says otherwise: ``~/.cache/usp/tokens``
    (``$XDG_CACHE_HOME/usp/tokens`` where that is set, as other tools' caches do)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "usp", "tokens")


@dataclass(frozen=True)
class DataSpec:
    """The data of a run and how it is tokenized (every field is part of the cache key except
    ``cache`` and ``num_proc``).

    ``paths``: files or folders (empty: the Python standard library's source, one document per
    file). ``text_field``: the field of a record that holds its text. ``chat_field``: the field
    that holds a conversation instead (a list of ``{"role", "content"}``), rendered with the
    tokenizer's chat template. ``loss_on``: for chat data, ``"assistant"`` (the default) or
    ``"all"``; text trains on every token. ``tokenizer``: a local Hugging Face tokenizer folder,
    or None for byte-level tokens. ``num_proc``: tokenizing processes (0: chosen from the data
    size and the cores).
    """

    paths: tuple[str, ...] = ()
    text_field: str = DEFAULT_TEXT_FIELD
    chat_field: str | None = None
    loss_on: str | None = None
    tokenizer: str | None = None
    cache: str = ""
    num_proc: int = 0

    @property
    def is_chat(self) -> bool:
        return self.chat_field is not None

    @property
    def effective_loss_on(self) -> str:
        """``loss_on`` as trained: chat data defaults to the assistant's tokens, text to all."""
        if self.loss_on is not None:
            return self.loss_on
        return "assistant" if self.is_chat else "all"

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache or default_cache_dir()).expanduser()

    def render(self) -> dict:
        """How records become documents: what the cache key and a resumed run compare."""
        field = self.chat_field if self.is_chat else self.text_field
        return {"kind": "chat" if self.is_chat else "text", "field": field,
                "loss_on": self.effective_loss_on}


def check_spec(spec: DataSpec) -> None:
    """ValueError, naming the setting, for settings that cannot work together (files are checked
    when they are read: ``usp.data.sources``)."""
    if spec.loss_on is not None and spec.loss_on not in LOSS_ON:
        raise ValueError(f"--loss-on {spec.loss_on!r} is not one of {', '.join(LOSS_ON)}")
    if spec.loss_on == "assistant" and not spec.is_chat:
        raise ValueError("--loss-on assistant needs conversations: name their field with "
                         "--chat-field (text documents train on every token)")
    for flag, value in (("--text-field", spec.text_field), ("--chat-field", spec.chat_field)):
        if value is not None and not value.strip():
            raise ValueError(f"{flag} must name a field, got {value!r}")
    if spec.is_chat and spec.text_field != DEFAULT_TEXT_FIELD:
        raise ValueError(f"--text-field {spec.text_field!r} and --chat-field "
                         f"{spec.chat_field!r}: a record is read as text or as a conversation, "
                         "give one of them")
    if spec.is_chat and spec.tokenizer is None:
        raise ValueError("--chat-field needs --tokenizer DIR: conversations are rendered with the "
                         "tokenizer's chat template, and byte-level tokens have none")
    if spec.num_proc < 0:
        raise ValueError(f"--num-proc={spec.num_proc} must be >= 0 (0: chosen automatically)")
