"""Conversations rendered with the tokenizer's own chat template, and which tokens are the
assistant's.

A conversation is a list of ``{"role": ..., "content": ...}`` messages (the OpenAI / Hugging Face
form). It becomes exactly the tokens ``tokenizer.apply_chat_template(messages, tokenize=True)``
gives (no EOS is added: the template ends each turn as the model was trained to), and a loss mask:

- a template with ``{% generation %}`` blocks marks the assistant's text itself; transformers
  returns the mask (``return_assistant_tokens_mask=True``);
- any other template: the conversation is rendered once per assistant turn, up to the turn
  before it with the generation prompt and up to the turn itself; the assistant's text is what
  the second adds to the first. Each rendering must be a prefix of the whole conversation's
  (checked: a template that renders earlier turns differently once later turns follow, such as
  one that drops earlier reasoning, is refused for that conversation, never guessed), and the
  tokens whose text starts inside those spans are the assistant's (the fast tokenizer's
  offsets map characters to tokens: a token whose text overlaps a span counts, as transformers
  counts the tokens holding a generation block's first and last characters).

Arrow stores a list of messages as structs with one column per key of any message, so a message
read back holds every key, ``None`` where it had none; those ``None`` keys are dropped before
rendering (a template testing ``message.tool_calls is defined`` must not see one).
"""

from __future__ import annotations

import re

GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


class ChatError(ValueError):
    """A conversation the template cannot render (the caller adds where it is)."""


def chat_template(tokenizer, directory: str) -> str:
    """The tokenizer's chat template; ValueError naming the folder when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    if not template:
        raise ValueError(
            f"--tokenizer {directory!r} has no chat template (neither chat_template.jinja nor a "
            "chat_template in tokenizer_config.json), which --chat-field needs to render "
            "conversations; use the model's own tokenizer, or read the data as text with "
            "--text-field")
    return template


def has_generation_blocks(template: str) -> bool:
    return GENERATION_BLOCK.search(template) is not None


def clean_messages(messages) -> list[dict]:
    """The messages with Arrow's ``None`` fill dropped; ChatError unless they are a list of
    objects with a string role."""
    if not isinstance(messages, (list, tuple)):
        raise ChatError(f"the conversation is {type(messages).__name__}, not a list of messages")
    cleaned = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"message {number} is {type(message).__name__}, not an object with "
                            "role and content")
        message = {key: value for key, value in message.items() if value is not None}
        if not isinstance(message.get("role"), str):
            raise ChatError(f"message {number} has no role (its keys: "
                            f"{', '.join(sorted(message)) or 'none'})")
        cleaned.append(message)
    return cleaned


def _render(tokenizer, messages: list[dict], **options):
    try:
        return tokenizer.apply_chat_template(messages, **options)
    except Exception as exc:  # jinja2's TemplateError, or what the template raises
        raise ChatError(f"the chat template refused it: {type(exc).__name__}: {exc}") from exc


def render_conversation(tokenizer, messages, loss_on: str,
                        generation_blocks: bool) -> tuple[list[int], list[int]] | None:
    """``(token ids, loss mask)`` of one conversation; None when it carries no loss (empty, or
    no assistant turn with ``loss_on="assistant"``): the caller skips and counts it."""
    messages = clean_messages(messages)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not messages or (loss_on == "assistant" and not assistant_turns):
        return None
    if loss_on == "all":
        ids = list(_render(tokenizer, messages, tokenize=True, return_dict=True)["input_ids"])
        return (ids, [1] * len(ids)) if ids else None
    if generation_blocks:
        out = _render(tokenizer, messages, tokenize=True, return_dict=True,
                      return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = _by_rendered_prefixes(tokenizer, messages, assistant_turns)
    return (ids, mask) if any(mask) else None


def _by_rendered_prefixes(tokenizer, messages: list[dict],
                          assistant_turns: list[int]) -> tuple[list[int], list[int]]:
    """The assistant mask of a template without generation blocks, from prefix renderings."""
    whole = _render(tokenizer, messages, tokenize=False)
    spans = []
    for turn in assistant_turns:
        before = _render(tokenizer, messages[:turn], tokenize=False, add_generation_prompt=True)
        through = _render(tokenizer, messages[:turn + 1], tokenize=False)
        if not (whole.startswith(before) and whole.startswith(through)
                and len(before) <= len(through)):
            raise ChatError(
                f"the chat template renders the conversation up to message {turn} differently "
                "once later messages follow, so the assistant's tokens cannot be found by "
                "rendering prefixes; use a template that marks them with {% generation %}")
        spans.append((len(before), len(through)))
    try:
        encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True,
                            verbose=False)
    except NotImplementedError as exc:  # a slow (Python) tokenizer has no offsets
        raise ChatError("finding the assistant's tokens of a template without {% generation %} "
                        "needs a fast tokenizer (tokenizer.json)") from exc
    ids = list(encoded["input_ids"])
    # a token is the assistant's if its text overlaps a span (transformers' rule for generation
    # blocks: the tokens holding a span's first and last characters count)
    mask = [int(any(first < end and max(last, first + 1) > start for start, end in spans))
            for first, last in encoded["offset_mapping"]]
    return ids, mask
