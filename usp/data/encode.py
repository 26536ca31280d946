"""Records to tokens: the run's tokenizer, what identifies it, and the function ``datasets.map``
runs over each batch of records (in parallel processes).

Text documents become exactly what ``usp train`` always made of them: the UTF-8 bytes followed by
``EOT`` (byte-level), or the tokenizer's ids without special tokens followed by its EOS
(``usp.inputs.tokenizer``). Conversations become their chat-template
rendering and loss mask (``usp.data.chat``). Each record's document is its own packed document.
"""

from __future__ import annotations

import hashlib

import numpy as np

from usp.data.chat import ChatError, chat_template, has_generation_blocks, render_conversation
from usp.data.sources import Source, record_location
from usp.data.spec import DataSpec

BYTE_LEVEL = {"kind": "byte-level", "tokens": 257, "eos_token_id": 256}


def load_tokenizer(spec: DataSpec):
    """The run's Hugging Face tokenizer (local files, no remote code), or None for bytes."""
    if spec.tokenizer is None:
        return None
    from usp.inputs.tokenizer import load_tokenizer as load

    return load(spec.tokenizer)


def tokenizer_identity(tokenizer, spec: DataSpec) -> dict:
    """What the cache key records of the tokenizer: its content (``tokenizer_record``: class,
    size, EOS, the SHA-256 of its serialisation) and, for chat data, the template's SHA-256."""
    if tokenizer is None:
        return dict(BYTE_LEVEL)
    from usp.inputs.tokenizer import tokenizer_record

    template = chat_template(tokenizer, spec.tokenizer) if spec.is_chat else None
    identity = tokenizer_record(tokenizer)
    if template is not None:
        identity["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()
    return identity


def vocabulary_size(tokenizer) -> int:
    return BYTE_LEVEL["tokens"] if tokenizer is None else len(tokenizer)


class Encoder:
    """``datasets.map``'s function for one source: a batch of records (with their indices) ->
    ``input_ids``, ``skipped`` and, when only the assistant's tokens carry the loss,
    ``loss_mask``. A bad record raises ValueError naming its file and line or index."""

    def __init__(self, source: Source, spec: DataSpec, tokenizer) -> None:
        self.source, self.tokenizer = source, tokenizer
        self.chat, self.loss_on = spec.is_chat, spec.effective_loss_on
        self.field = spec.chat_field if spec.is_chat else spec.text_field
        self.with_mask = self.loss_on == "assistant"
        self.generation_blocks = (spec.is_chat and has_generation_blocks(
            chat_template(tokenizer, spec.tokenizer)))

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        if self.source.kind == "text":
            return self._documents([self._read_text_file(path) for path in batch["path"]])
        if self.source.kind == "stdlib":
            return self._documents(batch["document"])
        values = [self._value(batch, row, index) for row, index in enumerate(indices)]
        if not self.chat:
            return self._documents(values)
        ids, masks, skipped = [], [], []
        for messages, index in zip(values, indices):
            try:
                rendered = render_conversation(self.tokenizer, messages, self.loss_on,
                                               self.generation_blocks)
            except ChatError as exc:
                raise ValueError(f"{record_location(self.source, index)}: {exc}") from None
            skipped.append(rendered is None)
            ids.append(rendered[0] if rendered else [])
            masks.append(rendered[1] if rendered else [])
        out = {"input_ids": ids, "skipped": skipped}
        if self.with_mask:
            out["loss_mask"] = masks
        return out

    def _documents(self, texts: list[str]) -> dict:
        """Text documents: every token carries the loss; none is skipped."""
        if self.tokenizer is None:
            eot = BYTE_LEVEL["eos_token_id"]
            ids = [np.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64),
                             eot) for text in texts]
        else:
            # verbose=False: documents longer than model_max_length are expected (windows cut them)
            encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            ids = [[*document, self.tokenizer.eos_token_id] for document in encoded]
        return {"input_ids": ids, "skipped": [False] * len(texts)}

    def _value(self, batch: dict, row: int, index: int):
        value = batch[self.field][row]
        if value is None:
            present = sorted(key for key, column in batch.items() if column[row] is not None)
            flag = "--chat-field" if self.chat else "--text-field"
            raise ValueError(f"{record_location(self.source, index)}: the record has no field "
                             f"{self.field!r} (its fields: {', '.join(present) or 'none'}); "
                             f"name the field to read with {flag}")
        if not self.chat and not isinstance(value, str):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(f"{record_location(self.source, index)}: field {self.field!r} is "
                             f"{type(value).__name__} ({shown}), not a string")
        return value

    @staticmethod
    def _read_text_file(path: str) -> str:
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise ValueError(f"data path {path!r} cannot be read: {exc}") from exc
        if b"\x00" in data:
            raise ValueError(f"data file {path!r} is binary (it holds NUL bytes), not text")
        return data.decode("utf-8", errors="replace")


def check_field(source: Source, columns: list[str], spec: DataSpec) -> None:
    """ValueError naming the file and its fields when no record of ``source`` has the field."""
    if source.kind in ("text", "stdlib"):
        return
    field = spec.chat_field if spec.is_chat else spec.text_field
    if field not in columns:
        flag = "--chat-field" if spec.is_chat else "--text-field"
        raise ValueError(f"data {str(source.path)!r} has no field {field!r} in any record (its "
                         f"fields: {', '.join(columns) or 'none'}); name the field to read with "
                         f"{flag}")
