"""The files a run's ``--data`` names, what kind each is, and each read as a ``datasets.Dataset``.

Local files only: a path that does not exist is refused, and one that looks like a Hugging Face
Hub id (``owner/name``) or a URL (``hf://``, ``https://``, ``s3://``...) is refused as such, so
nothing is ever fetched. Nothing read runs code: JSON Lines, JSON, Parquet and Arrow are parsed
by pyarrow through ``datasets``' packaged readers (no loading scripts, no ``trust_remote_code``),
and text files are read as bytes.

Kinds, by suffix:

- ``.jsonl`` / ``.ndjson`` / ``.json``: records (one JSON object per line, or a JSON array);
- ``.parquet``: records;
- ``.arrow``: records, in Arrow's stream format (what ``datasets`` writes) or its file format;
- a folder holding ``dataset_info.json`` / ``state.json``: a ``datasets.save_to_disk`` folder;
- any other file: text, one document per file (as in earlier versions); a file of JSON or
  Parquet content under a text suffix, or with NUL bytes, is refused, never trained on as text.

A folder that is not a ``save_to_disk`` folder contributes every file under it (recursively, in
sorted path order, hidden names skipped), each by its own kind.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from usp.data.stdlib import stdlib_fingerprint
from usp.inputs.fingerprint import file_fingerprint

RECORD_SUFFIXES = {".jsonl": "json", ".ndjson": "json", ".json": "json",
                   ".parquet": "parquet", ".arrow": "arrow"}
REFUSED_SUFFIXES = {".csv": "a CSV file", ".tsv": "a TSV file", ".feather": "a Feather file",
                    ".pickle": "a pickle", ".pkl": "a pickle"}
SAVED_MARKERS = ("dataset_info.json", "state.json")
SNIFF_BYTES = 8192
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FORMATS = ("text files (one document each), JSON Lines, JSON, Parquet, Arrow, or "
           "datasets.save_to_disk folders")


@dataclass(frozen=True)
class Source:
    """One readable unit of the data: ``kind`` (text, json, parquet, arrow, saved, or stdlib:
    the default data), the path named, and the files whose content it is (what the cache's
    fingerprint covers)."""

    kind: str
    path: Path
    files: tuple[Path, ...]

    def describe(self) -> str:
        return STDLIB_NAME if self.kind == "stdlib" else str(self.path)


STDLIB_NAME = "the Python standard library's source"
STDLIB = Source("stdlib", Path("stdlib"), ())  # the default data: one document per .py file


def _remote_reason(text: str) -> str | None:
    """Why ``text`` (a path that does not exist) names something remote, or None."""
    if "://" in text or text.startswith("hf:"):
        return "a URL"
    if HUB_ID.match(text) and not text.startswith(("./", "../")):
        return "a Hugging Face Hub id"
    return None


def _structured_content(head: bytes) -> str | None:
    """What structured format a text-suffixed file holds, by its first bytes; None for text."""
    if head.startswith(b"PAR1"):
        return "Parquet"
    if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return "Arrow"
    first_line = head.split(b"\n", 1)[0].strip()
    if first_line.startswith(b"{") and first_line.endswith(b"}"):
        try:
            if isinstance(json.loads(first_line), dict):
                return "JSON Lines (its first line is a JSON object)"
        except ValueError:
            pass
    if re.match(rb"\s*[\[{]\s*\"", head):
        return "JSON (it starts like a JSON object or array)"
    return None


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in REFUSED_SUFFIXES:
        raise ValueError(f"data file {str(path)!r} is {REFUSED_SUFFIXES[suffix]}, which usp does "
                         f"not read; usp reads {FORMATS}")
    if suffix in RECORD_SUFFIXES:
        return RECORD_SUFFIXES[suffix]
    try:
        with open(path, "rb") as file:
            head = file.read(SNIFF_BYTES)
    except OSError as exc:
        raise ValueError(f"data path {str(path)!r} cannot be read: {exc}") from exc
    content = _structured_content(head)
    if content is not None:
        raise ValueError(
            f"data file {str(path)!r} holds {content} but its name does not say so, so it is "
            f"not trained on as text; name it .jsonl, .json, .parquet or .arrow to read its "
            "records")
    if b"\x00" in head:
        raise ValueError(f"data file {str(path)!r} is binary (it holds NUL bytes), not text; "
                         f"usp reads {FORMATS}")
    return "text"


def _folder_files(folder: Path) -> list[Path]:
    found = sorted((p for p in folder.rglob("*") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not found:
        raise ValueError(f"data folder {str(folder)!r} holds no files; usp reads {FORMATS}")
    return found


def find_sources(paths: Sequence[str | os.PathLike]) -> list[Source]:
    """The sources ``paths`` name, in order; ValueError naming the path for anything missing,
    remote, unreadable, of a refused kind, or an empty folder. Consecutive text files form one
    source (they are tokenized together)."""
    if not paths:
        raise ValueError(f"no data paths given; pass one or more of: {FORMATS}")
    sources: list[Source] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            reason = _remote_reason(str(given))
            if reason is not None:
                raise ValueError(f"data path {str(given)!r} does not exist here and looks like "
                                 f"{reason}; usp reads local files only (download it first, "
                                 "e.g. with datasets' save_to_disk, and pass the folder)")
            raise ValueError(f"data path {str(given)!r} does not exist")
        if path.is_dir():
            if any((path / name).is_file() for name in SAVED_MARKERS):
                sources.append(Source("saved", path, tuple(_folder_files(path))))
                continue
            if (path / "dataset_dict.json").is_file():
                splits = sorted(p.name for p in path.iterdir() if p.is_dir())
                raise ValueError(
                    f"data folder {str(path)!r} is a datasets.DatasetDict with splits "
                    f"{', '.join(splits)}; pass the split to train on, e.g. "
                    f"{str(path / 'train')!r}")
            files = _folder_files(path)
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(f"data path {str(path)!r} is neither a file nor a folder")
        for file in files:
            kind = _file_kind(file)
            if kind == "text" and sources and sources[-1].kind == "text":
                previous = sources.pop()
                sources.append(Source("text", previous.path, (*previous.files, file)))
            else:
                sources.append(Source(kind, file, (file,)))
    return sources


# ---------------------------------------------------------------------------- reading
@contextmanager
def quiet_datasets() -> Iterator[None]:
    """``datasets`` without its progress bars (the caller reports progress), restored after."""
    import datasets

    were_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_enabled:
            datasets.enable_progress_bars()


def load_records(source: Source, scratch: Path):
    """``source`` as a ``datasets.Dataset`` (memory-mapped Arrow; ``datasets`` writes its Arrow
    copy of JSON under ``scratch``). A text source is a dataset of file paths: the tokenizer
    reads each file. ValueError naming the file (and line) for anything unreadable."""
    import datasets

    if source.kind == "text":
        return datasets.Dataset.from_dict({"path": [str(f) for f in source.files]})
    if source.kind == "json" and not _has_content(source.path):
        return datasets.Dataset.from_dict({})  # an empty file holds no records
    try:
        if source.kind == "json":
            return datasets.Dataset.from_json(str(source.path), cache_dir=str(scratch))
        if source.kind == "parquet":
            return datasets.Dataset.from_parquet(str(source.path), cache_dir=str(scratch))
        if source.kind == "arrow":
            return _arrow_file(source.path)
        return datasets.load_from_disk(str(source.path))
    except Exception as exc:  # pyarrow and datasets raise many types (some ValueErrors)
        if source.kind == "json":
            located = json_lines_problem(source.path)
            if located is not None:
                raise ValueError(located) from exc
        cause = exc.__cause__ or exc
        raise ValueError(f"data file {str(source.path)!r} cannot be read as "
                         f"{source.kind}: {type(cause).__name__}: {cause}") from exc


def _has_content(path: Path) -> bool:
    with open(path, "rb") as file:
        while chunk := file.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _arrow_file(path: Path):
    """An ``.arrow`` file in the stream format (``datasets``') or the file format (pyarrow's
    ``ARROW1``), memory-mapped either way."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    with open(path, "rb") as file:
        magic = file.read(6)
    if magic != b"ARROW1":
        return datasets.Dataset.from_file(str(path))
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return datasets.Dataset(InMemoryTable(table))


def json_lines_problem(path: Path) -> str | None:
    """``FILE:LINE: what is wrong`` for the first line of a JSON Lines file that is not a JSON
    object; None when every line is one (the file's problem lies elsewhere)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line.rstrip("\r\n"))
                except ValueError as exc:
                    if number == 1 and line.lstrip().startswith("["):
                        return None  # a JSON array file, not JSON Lines
                    return f"{path}:{number}: not valid JSON ({exc})"
                if not isinstance(value, dict):
                    return (f"{path}:{number}: a JSON Lines record must be a JSON object, got "
                            f"{type(value).__name__}")
    except OSError as exc:
        return f"data file {str(path)!r} cannot be read: {exc}"
    return None


def record_location(source: Source, index: int) -> str:
    """Where record ``index`` (0-based) of ``source`` is, in words: ``data.jsonl:7 (record 6)``
    for JSON Lines, ``data.parquet, record 6`` otherwise."""
    if source.kind == "json" and source.path.suffix.lower() in (".jsonl", ".ndjson"):
        line = _line_of_record(source.path, index)
        if line is not None:
            return f"{source.path}:{line} (record {index})"
    return f"{source.path}, record {index}"


def _line_of_record(path: Path, index: int) -> int | None:
    """The line number of JSON Lines record ``index`` (blank lines hold no record)."""
    seen = -1
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return number
    return None


def data_fingerprint(data: list[str], synthetic: bool) -> list[dict]:
    """The content fingerprints (``usp.inputs.fingerprint``) of a run's data: one per file
    ``--data`` names (a folder's files each), one for the standard library, none for synthetic
    tokens (a function of the seed)."""
    if synthetic:
        return []
    if not data:
        return [dict(stdlib_fingerprint())]
    return [file_fingerprint(file) for source in find_sources(data) for file in source.files]
