"""Every format gives the tokens the text path gives for the same documents, byte-level and with a
local tokenizer; folders; the default data; the number of processes changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data_helpers import (save_to_disk, save_tokenizer, write_arrow_file,
                                write_arrow_stream, write_jsonl, write_parquet)
from usp.data import DataSpec, find_sources, prepare
from usp.data.stdlib import stdlib_documents
from usp.training.data import document_tokens

DOCUMENTS = ["hello world", "how are you\nfine thanks", "", "déjà vu — 東京\r\n",
             "one two three"]


def _tokens(prepared) -> tuple[np.ndarray, np.ndarray]:
    store = prepared.store
    return store.read_tokens(0, store.num_tokens), np.asarray(store.offsets)


def _text_folder(root, documents):
    folder = root / "texts"
    folder.mkdir()
    for number, document in enumerate(documents):
        (folder / f"{number:02d}.txt").write_bytes(document.encode("utf-8"))
    return folder


def _every_format(root, documents) -> dict:
    records = [{"text": document, "id": number} for number, document in enumerate(documents)]
    (root / "array.json").write_text(__import__("json").dumps(records))
    return {
        "text folder": _text_folder(root, documents),
        "jsonl": write_jsonl(root / "data.jsonl", records),
        "json array": root / "array.json",
        "parquet": write_parquet(root / "data.parquet", records),
        "arrow stream": write_arrow_stream(root / "stream.arrow", records),
        "arrow file": write_arrow_file(root / "file.arrow", records),
        "save_to_disk": save_to_disk(root / "saved", records),
    }


@pytest.mark.parametrize("tokenizer", [False, True], ids=["bytes", "tokenizer"])
def test_every_format_gives_the_text_paths_tokens(tmp_path, tokenizer):
    directory = str(save_tokenizer(tmp_path / "tok")) if tokenizer else None
    paths = _every_format(tmp_path, DOCUMENTS)
    results = {name: _tokens(prepare(DataSpec(paths=(str(path),), tokenizer=directory,
                                              cache=str(tmp_path / "cache"))))
               for name, path in paths.items()}
    if tokenizer:  # the tokenizer's ids of each document, then its EOS
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        ids = [loaded(d, add_special_tokens=False)["input_ids"] + [loaded.eos_token_id]
               for d in DOCUMENTS]
    else:  # what usp train always made of text documents: bytes, then EOT
        ids = [document_tokens([d]).tolist() for d in DOCUMENTS]
    expected = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])
    expected_offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])])
    for name, (tokens, offsets) in results.items():
        assert np.array_equal(tokens, expected), name
        assert np.array_equal(offsets, expected_offsets), name


def test_a_folder_reads_each_file_by_its_kind_in_sorted_order(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b" / "deeper").mkdir(parents=True)
    (corpus / "z.txt").write_text("last")
    (corpus / "b" / "deeper" / "two.md").write_text("second")
    (corpus / "b" / "a.py").write_text("first")
    write_jsonl(corpus / "b" / "c.jsonl", [{"text": "record one"}, {"text": "record two"}])
    (corpus / ".git").mkdir()  # hidden: not data
    (corpus / ".git" / "index").write_bytes(b"\x00\x01binary")
    kinds = [(source.kind, [f.name for f in source.files]) for source in find_sources([corpus])]
    assert kinds == [("text", ["a.py"]), ("json", ["c.jsonl"]), ("text", ["two.md", "z.txt"])]
    tokens, offsets = _tokens(prepare(DataSpec(paths=(str(corpus),),
                                               cache=str(tmp_path / "cache"))))
    expected = document_tokens(["first", "record one", "record two", "second", "last"])
    assert np.array_equal(tokens, expected.numpy())
    assert len(offsets) == 6


def test_the_default_data_is_the_standard_library_as_before(tmp_path):
    prepared = prepare(DataSpec(cache=str(tmp_path / "cache")))
    tokens, offsets = _tokens(prepared)
    documents = stdlib_documents()
    assert np.array_equal(tokens, document_tokens(documents).numpy())
    assert prepared.documents == len(documents) == len(offsets) - 1


def test_processes_do_not_change_the_tokens(tmp_path):
    records = [{"text": f"document {n} " * (n % 7 + 1)} for n in range(3000)]
    path = str(write_jsonl(tmp_path / "many.jsonl", records))
    one = prepare(DataSpec(paths=(path,), cache=str(tmp_path / "one"), num_proc=1))
    two = prepare(DataSpec(paths=(path,), cache=str(tmp_path / "two"), num_proc=2))
    assert (one.processes, two.processes) == (1, 2)
    for got, want in zip(_tokens(two), _tokens(one)):
        assert np.array_equal(got, want)
    assert one.documents == 3000
