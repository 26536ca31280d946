"""The token cache: hit the second time (nothing tokenized), missed when the data, the
tokenizer or the rendering changes, rebuilt (with a warning) when damaged, never read as
something it is not, and built once when two processes ask for it together."""

from __future__ import annotations

import logging
import multiprocessing
import os

import numpy as np
import pytest

from tests.data_helpers import (CONVERSATIONS, PLAIN_TEMPLATE, save_tokenizer, write_jsonl)
from usp.data import CorruptStore, DataSpec, TokenStore, prepare
from usp.data import encode
from usp.inputs import fingerprint


@pytest.fixture
def encoder_calls(monkeypatch) -> list:
    """Every call of the tokenizing function in this process (the data here is small enough
    to be tokenized in-process)."""
    calls, original = [], encode.Encoder.__call__

    def counted(self, batch, indices):
        calls.append(len(indices))
        return original(self, batch, indices)

    monkeypatch.setattr(encode.Encoder, "__call__", counted)
    return calls


def _spec(tmp_path, path, **options) -> DataSpec:
    return DataSpec(paths=(str(path),), cache=str(tmp_path / "cache"), **options)


def _tokens(prepared) -> np.ndarray:
    return prepared.store.read_tokens(0, prepared.store.num_tokens)


def test_the_second_preparation_reads_the_cache_without_tokenizing(tmp_path, encoder_calls):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": f"record {n}"} for n in range(50)])
    first = prepare(_spec(tmp_path, path))
    assert not first.cache_hit and sum(encoder_calls) == 50
    second = prepare(_spec(tmp_path, path))
    assert second.cache_hit and sum(encoder_calls) == 50  # not called again
    assert second.store.name == first.store.name
    assert np.array_equal(_tokens(second), _tokens(first))
    assert "cache hit" in second.summary() and "tokenized in" in first.summary()


def test_changed_data_tokenizer_or_rendering_misses_the_cache(tmp_path, encoder_calls):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "hello world", "body": "how are"}])
    stores = {prepare(_spec(tmp_path, path)).store.name}
    os.utime(path, ns=(1, 1))  # the same content, another modification time
    stores.add(prepare(_spec(tmp_path, path)).store.name)
    path.write_text(path.read_text().replace("hello", "jello"))  # same size, other content
    os.utime(path, ns=(1, 1))  # ... and the same time as before: the content hash tells
    fingerprint._cached.cache_clear()  # (as in a new process: one process hashes a file once)
    changed = prepare(_spec(tmp_path, path))
    stores.add(changed.store.name)
    assert bytes(_tokens(changed)[:5].astype(np.uint8)) == b"jello"
    stores.add(prepare(_spec(tmp_path, path, text_field="body")).store.name)
    tokenizer = save_tokenizer(tmp_path / "tok")
    stores.add(prepare(_spec(tmp_path, path, tokenizer=str(tokenizer))).store.name)
    (tokenizer / "tokenizer.json").write_text(
        (tokenizer / "tokenizer.json").read_text().replace('"hello"', '"hullo"'))
    stores.add(prepare(_spec(tmp_path, path, tokenizer=str(tokenizer))).store.name)
    assert len(stores) == 6 and len(encoder_calls) == 6  # every change tokenized again


def test_changed_chat_template_or_loss_on_misses_the_cache(tmp_path, encoder_calls):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    tokenizer = save_tokenizer(tmp_path / "tok")
    chat = dict(chat_field="messages", tokenizer=str(tokenizer))
    names = {prepare(_spec(tmp_path, data, **chat)).store.name,
             prepare(_spec(tmp_path, data, loss_on="all", **chat)).store.name}
    save_tokenizer(tmp_path / "tok", PLAIN_TEMPLATE)  # the same vocabulary, another template
    names.add(prepare(_spec(tmp_path, data, **chat)).store.name)
    assert len(names) == 3 and len(encoder_calls) == 3


def _damage_tokens_in_place(directory):
    tokens = directory / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[3] ^= 0xFF
    tokens.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated tokens", "flipped byte", "garbage manifest",
                                    "missing mask", "another key"])
def test_a_damaged_store_is_rebuilt_with_a_warning(tmp_path, caplog, encoder_calls, damage):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    spec = _spec(tmp_path, data, chat_field="messages",
                 tokenizer=str(save_tokenizer(tmp_path / "tok")))
    first = prepare(spec)
    expected, directory = _tokens(first), first.store.directory
    del first
    if damage == "truncated tokens":
        os.truncate(directory / "tokens.bin", 10)
    elif damage == "flipped byte":
        _damage_tokens_in_place(directory)
    elif damage == "garbage manifest":
        (directory / "manifest.json").write_text("{not json")
    elif damage == "missing mask":
        (directory / "loss_mask.bin").unlink()
    else:
        manifest = (directory / "manifest.json").read_text()
        (directory / "manifest.json").write_text(manifest.replace('"key": "', '"key": "0'))
    with caplog.at_level(logging.WARNING, logger="usp.data.cache"):
        again = prepare(spec)
    assert not again.cache_hit and len(encoder_calls) == 2
    assert f"token cache {directory} is damaged and is rebuilt" in caplog.text
    assert np.array_equal(_tokens(again), expected)
    assert sorted(p.name for p in directory.parent.iterdir() if not p.name.endswith(".lock")) \
        == [directory.name]  # the damaged copy is gone, nothing half-built is left


def test_a_window_changed_after_opening_is_refused_not_trained_on(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "hello world"}])
    store = prepare(_spec(tmp_path, path)).store
    assert store.max_token_id == 256  # EOT
    tokens = store.directory / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[0:2] = (300).to_bytes(2, "little")  # an id the store never held
    tokens.write_bytes(bytes(data))
    with pytest.raises(CorruptStore, match="hold id 300, above the largest id written"):
        store.read_tokens(0, 4)
    with pytest.raises(CorruptStore, match="changed after it was written"):
        TokenStore.open(store.directory)


def _prepare_in_a_process(spec: DataSpec, results) -> None:
    prepared = prepare(spec)
    results.put((prepared.cache_hit, prepared.built_alongside, prepared.store.name))


def test_two_processes_asking_for_one_store_build_it_once(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": f"record {n}"} for n in range(2000)])
    spec = _spec(tmp_path, path)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_prepare_in_a_process, args=(spec, results))
                 for _ in range(2)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    # one built it; the other waited for it (or, started late, found it): never both
    built = [name for hit, alongside, name in outcomes if not hit and not alongside]
    assert len(built) == 1 and outcomes[0][2] == outcomes[1][2]
    stores = [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert [p.name for p in stores] == [os.path.basename(built[0])]
