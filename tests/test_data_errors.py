"""Bad data gets one clear line naming the file and the line or record, and leaves nothing in the
cache; paths that are not local data are refused before anything is read."""

from __future__ import annotations

import re

import pytest

from tests.data_helpers import CONVERSATIONS, save_tokenizer, write_jsonl
from usp.data import DataSpec, find_sources, prepare


def _prepare(tmp_path, path, **options):
    return prepare(DataSpec(paths=(str(path),), cache=str(tmp_path / "cache"), **options))


def _assert_nothing_cached(tmp_path):
    """Only the cache's lock files (one per key, empty) may be there: no store, nothing half
    built."""
    cache = tmp_path / "cache"
    assert not cache.exists() or all(p.suffix == ".lock" for p in cache.iterdir())


def test_a_malformed_json_lines_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(ValueError, match=rf"^{path}:3: not valid JSON \(Expecting ',' "):
        _prepare(tmp_path, path)
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: a JSON Lines record must be a JSON "
                                         "object, got list"):
        _prepare(tmp_path, path)
    _assert_nothing_cached(tmp_path)


def test_a_missing_field_names_the_record_and_the_fields_it_has(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl",
                       [{"text": "a", "id": 0}, {"text": "b", "id": 1}, {"body": "c", "id": 2}])
    with pytest.raises(ValueError) as refused:
        _prepare(tmp_path, path)
    assert str(refused.value) == (f"{path}:3 (record 2): the record has no field 'text' (its "
                                  "fields: body, id); name the field to read with --text-field")
    with pytest.raises(ValueError, match=r"has no field 'content' in any record \(its fields: "
                                         r"text, id, body\); name the field to read with "
                                         "--text-field"):
        _prepare(tmp_path, path, text_field="content")
    _assert_nothing_cached(tmp_path)


def test_a_text_that_is_not_a_string_is_named(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": 5}])
    with pytest.raises(ValueError, match=rf"^{path}:2 \(record 1\): field 'text' is int \(5\), "
                                         "not a string$"):
        _prepare(tmp_path, path)
    import pyarrow as pa
    import pyarrow.parquet as parquet

    table = tmp_path / "data.parquet"
    parquet.write_table(pa.table({"text": [["a", "list"]]}), str(table))
    with pytest.raises(ValueError, match=rf"^{table}, record 0: field 'text' is list "
                                         r"\(\['a', 'list'\]\), not a string$"):
        _prepare(tmp_path, table)


def test_an_empty_dataset_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="the data holds no documents to train on: "):
        _prepare(tmp_path, empty)
    tokenizer = save_tokenizer(tmp_path / "tok")
    no_assistant = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[1]}] * 2)
    with pytest.raises(ValueError, match=r"the data holds no documents to train on \(2 of 2 "
                                         r"conversations skipped: none has an assistant turn\)"):
        _prepare(tmp_path, no_assistant, chat_field="messages", tokenizer=str(tokenizer))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="data folder .*nothing' holds no files"):
        _prepare(tmp_path, tmp_path / "nothing")
    _assert_nothing_cached(tmp_path)


@pytest.mark.parametrize("given, reason", [
    ("HuggingFaceH4/ultrachat_200k", "a Hugging Face Hub id"),
    ("hf://datasets/org/name", "a URL"),
    ("https://example.com/data.jsonl", "a URL"),
    ("s3://bucket/data.parquet", "a URL"),
])
def test_hub_ids_and_urls_are_refused(tmp_path, monkeypatch, given, reason):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"looks like {reason}; usp reads local files only"):
        find_sources([given])
    with pytest.raises(ValueError, match=r"data path '.*nope.jsonl' does not exist$"):
        find_sources([tmp_path / "nope.jsonl"])


@pytest.mark.parametrize("name, content, message", [
    ("train.csv", b"text\nhello\n", "is a CSV file, which usp does not read"),
    ("records.txt", b'{"text": "hello"}\n', r"holds JSON Lines \(its first line is a JSON "
     r"object\) but its name does not say so"),
    ("table.bin", b"PAR1\x00\x00", "holds Parquet but its name does not say so"),
    ("pretty.txt", b'{\n  "text": "hello"\n}\n', r"holds JSON \(it starts like a JSON object"),
    ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00", r"is binary \(it holds NUL bytes\), not text"),
])
def test_files_of_other_kinds_are_refused_never_read_as_text(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"data file '{path}' ") + message):
        find_sources([path])
    folder = tmp_path / "folder"  # inside a folder too
    folder.mkdir()
    path.rename(folder / name)
    with pytest.raises(ValueError, match=name):
        find_sources([folder])


def test_unreadable_structured_files_and_dataset_dicts(tmp_path):
    import datasets

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=f"data file '{broken}' cannot be read as parquet: "):
        _prepare(tmp_path, broken)
    splits = tmp_path / "splits"
    table = datasets.Dataset.from_dict({"text": ["a"]})
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(splits))
    with pytest.raises(ValueError, match=r"is a datasets.DatasetDict with splits test, train; "
                                         f"pass the split to train on, e.g. '{splits}/train'"):
        find_sources([splits])
    assert [s.kind for s in find_sources([splits / "train"])] == ["saved"]


def test_usp_train_reports_bad_data_as_its_error(tmp_path, capsys):
    from usp import cli

    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    code = cli.main(["train", "--data", str(path), "--seq-len", "16", "--steps", "1",
                     "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                     "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"usp train: error: {path}:2: not valid JSON")
