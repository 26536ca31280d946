"""Conversations: the chat template's tokens, the assistant mask against one computed by hand
(templates with and without ``{% generation %}``), loss on all tokens, skipped conversations,
every format, and the refusals a conversation or a template can earn."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data_helpers import (CONVERSATIONS, GENERATION_TEMPLATE, PLAIN_TEMPLATE,
                                expected_chat, save_to_disk, save_tokenizer, write_jsonl,
                                write_parquet)
from usp.data import DataSpec, prepare
from usp.data.run import check_data

WITH_ASSISTANT = [c for c in CONVERSATIONS if any(m["role"] == "assistant" for m in c)]


def _spec(tmp_path, data, tokenizer, **options) -> DataSpec:
    return DataSpec(paths=(str(data),), chat_field="messages", tokenizer=str(tokenizer),
                    cache=str(tmp_path / "cache"), **options)


def _store_arrays(prepared):
    store = prepared.store
    return (store.read_tokens(0, store.num_tokens), store.read_mask(0, store.num_tokens),
            np.asarray(store.offsets))


@pytest.mark.parametrize("template", [GENERATION_TEMPLATE, PLAIN_TEMPLATE],
                         ids=["generation-blocks", "rendered-prefixes"])
def test_the_loss_mask_is_exactly_the_assistants_tokens(tmp_path, template):
    tokenizer = save_tokenizer(tmp_path / "tok", template)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    prepared = prepare(_spec(tmp_path, data, tokenizer))
    tokens, mask, offsets = _store_arrays(prepared)
    expected = [expected_chat(c) for c in WITH_ASSISTANT]
    assert tokens.tolist() == sum((ids for ids, _ in expected), [])
    assert mask.astype(int).tolist() == sum((marks for _, marks in expected), [])
    assert offsets.tolist() == np.cumsum([0] + [len(ids) for ids, _ in expected]).tolist()
    assert (prepared.documents, prepared.skipped) == (3, 1)  # the one without an assistant
    assert prepared.loss_tokens == sum(sum(marks) for _, marks in expected)


def test_loss_on_all_keeps_every_conversation_and_token(tmp_path):
    tokenizer = save_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    prepared = prepare(_spec(tmp_path, data, tokenizer, loss_on="all"))
    tokens, mask, _ = _store_arrays(prepared)
    assert mask is None and not prepared.store.has_mask
    assert tokens.tolist() == sum((expected_chat(c)[0] for c in CONVERSATIONS), [])
    assert prepared.skipped == 0 and prepared.loss_tokens == prepared.tokens


def test_parquet_and_saved_conversations_match_json_lines(tmp_path):
    tokenizer = save_tokenizer(tmp_path / "tok")
    records = [{"messages": c} for c in CONVERSATIONS]
    results = [_store_arrays(prepare(_spec(tmp_path, path, tokenizer))) for path in (
        write_jsonl(tmp_path / "chat.jsonl", records),
        write_parquet(tmp_path / "chat.parquet", records),
        save_to_disk(tmp_path / "saved", records))]
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert np.array_equal(got, want)


def test_keys_arrow_fills_with_none_are_not_seen_by_the_template(tmp_path):
    """Arrow gives every message every key of any message (None where absent); a template
    that tests ``is defined`` must see only the keys a message had."""
    named_marker = "{{ m['role'] }} {% if m.name is defined %}one {% endif %}"
    template = GENERATION_TEMPLATE.replace("{{ m['role'] }} ", named_marker)
    tokenizer = save_tokenizer(tmp_path / "tok", template)
    named = [{"role": "user", "content": "hello", "name": "two"},
             {"role": "assistant", "content": "yes"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": named}])
    tokens, _, _ = _store_arrays(prepare(_spec(tmp_path, data, tokenizer)))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    one = loaded.convert_tokens_to_ids("one")
    assert tokens.tolist().count(one) == 1  # the user's message only


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path):
    tokenizer = save_tokenizer(tmp_path / "tok", template=None)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    for check in (check_data, prepare):
        with pytest.raises(ValueError, match=r"has no chat template .* --chat-field needs"):
            check(_spec(tmp_path, data, tokenizer))
    assert not any((tmp_path / "cache").glob("*/manifest.json"))


def test_a_role_the_template_refuses_names_the_record(tmp_path):
    tokenizer = save_tokenizer(tmp_path / "tok")
    tool = [{"role": "user", "content": "hello"}, {"role": "tool", "content": "rain"},
            {"role": "assistant", "content": "yes"}]
    data = write_jsonl(tmp_path / "chat.jsonl",
                       [{"messages": CONVERSATIONS[0]}, {"messages": tool}])
    (tmp_path / "chat.jsonl").write_text("\n" + (tmp_path / "chat.jsonl").read_text())
    with pytest.raises(ValueError) as refused:
        prepare(_spec(tmp_path, data, tokenizer))
    assert str(refused.value).startswith(f"{data}:3 (record 1): the chat template refused it: "
                                         "TemplateError: Unexpected role: tool")
    assert not any((tmp_path / "cache").glob("*/manifest.json"))  # nothing half-built kept


def test_a_template_that_rewrites_earlier_turns_is_refused_without_generation_blocks(tmp_path):
    # drops every assistant turn but the last once later messages follow (as templates that
    # strip earlier reasoning do): the prefixes do not line up, so no mask can be derived
    template = PLAIN_TEMPLATE.replace("{{ m['content'] }}",
                                      "{% if m['role'] != 'assistant' or loop.last %}"
                                      "{{ m['content'] }}{% endif %}")
    tokenizer = save_tokenizer(tmp_path / "tok", template)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(ValueError, match=r"chat.jsonl:1 \(record 0\): the chat template renders "
                                         r"the conversation up to message 2 differently"):
        prepare(_spec(tmp_path, data, tokenizer))


@pytest.mark.parametrize("messages, message", [
    ("hello", "the conversation is str, not a list of messages"),
    ([{"content": "hello"}], "message 0 has no role (its keys: content)"),
    ([["user", "hello"]], "message 0 is list, not an object with role and content"),
])
def test_malformed_conversations_name_the_record(tmp_path, messages, message):
    tokenizer = save_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "chat.jsonl",
                       [{"messages": CONVERSATIONS[2]}, {"messages": messages}])
    with pytest.raises(ValueError) as refused:
        prepare(_spec(tmp_path, data, tokenizer))
    assert str(refused.value) == f"{data}:2 (record 1): {message}"


def test_settings_that_cannot_work_together(tmp_path):
    data = str(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}]))
    with pytest.raises(ValueError, match="--chat-field needs --tokenizer DIR"):
        check_data(DataSpec(paths=(data,), chat_field="messages"))
    with pytest.raises(ValueError, match="--loss-on assistant needs conversations"):
        check_data(DataSpec(paths=(data,), loss_on="assistant"))
    with pytest.raises(ValueError, match="a record is read as text or as a conversation"):
        check_data(DataSpec(paths=(data,), text_field="body", chat_field="messages",
                            tokenizer=str(save_tokenizer(tmp_path / "tok"))))
    with pytest.raises(ValueError, match="--loss-on 'some' is not one of assistant, all"):
        check_data(DataSpec(paths=(data,), loss_on="some"))
