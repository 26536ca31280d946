"""Trusting a checkpoint on disk: its bytes are the ones saved, and reading it runs no code.

**Integrity.** A save ends with ``manifest.json`` beside the files: the size and SHA-256 of each.
:func:`check_listing` compares names and sizes (cheap: a torn or missing file, before any rank
starts); :func:`verify` hashes the files (each rank hashes its share before loading). A file that
differs is named in a ``ValueError``. The manifest detects corruption (a bad disk, a torn copy, a
half-finished rsync), not tampering: whoever can rewrite a file can rewrite the manifest.

**Safe loading.** Against tampering, nothing in a checkpoint is unpickled by a loader that can
run code. DCP reads three kinds of file (torch 2.13):

- ``.metadata`` (its index) with plain ``pickle.load``: :class:`SafeFileSystemReader` reads it with
  :class:`_MetadataUnpickler`, which resolves only DCP's metadata classes, ``torch.Size``, dtypes
  and the two path classes DCP records, and refuses every other global;
- tensor data with ``torch.load(weights_only=True)``: already safe;
- non-tensor values (the optimizer's ``param_groups``) with ``torch.load(weights_only=False)`` in
  ``DefaultLoadPlanner.load_bytes``: :class:`SafeLoadPlanner` first loads each with
  ``weights_only=True`` and refuses it if that fails.

Our own files (``trainer.pt``, ``rng_rank*.pt``) are read with ``weights_only=True`` and
``meta.json`` / ``manifest.json`` are JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------- integrity
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, dict]:
    """Size and SHA-256 of ``names`` inside ``directory`` (one rank's share of a save)."""
    return {
        name: {"bytes": (Path(directory) / name).stat().st_size,
               "sha256": sha256_of(Path(directory) / name)}
        for name in names
    }


def write_manifest(directory: Path, files: dict[str, dict]) -> None:
    manifest = {"algorithm": "sha256", "files": dict(sorted(files.items()))}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest's ``{name: {"bytes", "sha256"}}``; a ValueError naming it when unreadable."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest["algorithm"] != "sha256" or not all(
            isinstance(entry["bytes"], int) and isinstance(entry["sha256"], str)
            for entry in files.values()
        ):
            raise ValueError("unknown algorithm or malformed entry")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"checkpoint {directory} is corrupt: its checksum file {path} is unreadable ({exc})"
        ) from exc
    return files


def check_listing(directory: Path) -> list[str]:
    """Problems visible without reading the data: a file missing, unlisted or of another size."""
    directory = Path(directory)
    files = read_manifest(directory)
    present = {p.name for p in directory.iterdir() if p.is_file()} - {MANIFEST}
    problems = [f"{directory / name} is missing" for name in sorted(files.keys() - present)]
    problems += [
        f"{directory / name} is not listed in {MANIFEST}" for name in sorted(present - files.keys())
    ]
    for name in sorted(files.keys() & present):
        size = (directory / name).stat().st_size
        if size != files[name]["bytes"]:
            problems.append(
                f"{directory / name} has {size} bytes, {MANIFEST} recorded {files[name]['bytes']}"
            )
    return problems


def verify(directory: Path, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems of the listing plus every SHA-256 mismatch among the files of this rank's share
    (``share = (rank, world_size)``: file i is hashed by rank ``i % world_size``)."""
    directory = Path(directory)
    problems = check_listing(directory)
    if problems:
        return problems
    files = read_manifest(directory)
    rank, world_size = share
    for name in sorted(files)[rank::world_size]:
        actual = sha256_of(directory / name)
        if actual != files[name]["sha256"]:
            problems.append(
                f"{directory / name} has SHA-256 {actual[:16]}..., {MANIFEST} recorded "
                f"{files[name]['sha256'][:16]}... (the file changed after it was saved)"
            )
    return problems


# ---------------------------------------------------------------------------- safe loading
class UnsafeCheckpointError(ValueError):
    """A checkpoint file asked the unpickler for something a checkpoint never holds."""


def _dcp_metadata_globals() -> dict[tuple[str, str], object]:
    import collections
    import pathlib

    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    import torch.distributed.checkpoint.metadata as dcp_metadata

    allowed = {
        ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
        for name in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
                     "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta",
                     "_MEM_FORMAT_ENCODING")
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = (
        dcp_filesystem._StorageInfo
    )
    allowed[("torch", "Size")] = torch.Size
    # a layout by its name ("torch.strided"); torch's own weights-only loader allows it too
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath
    allowed[("pathlib", "PurePosixPath")] = pathlib.PurePosixPath
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``.metadata`` file is made of."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _dcp_metadata_globals()
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refers to {module}.{name}, which a checkpoint index never holds; it was not loaded "
            "(a checkpoint from elsewhere may try to run code)"
        )


def load_dcp_metadata(stream) -> Metadata:
    metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read by the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = load_dcp_metadata(stream)
            except UnsafeCheckpointError as exc:
                raise UnsafeCheckpointError(f"{path} {exc}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, refusing non-tensor values that need more than a weights-only load."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"value {read_item.dest_index.fqn!r} is not plain data and was not loaded: {exc}"
            ) from None
        value.seek(0)  # the same bytes, now known to hold only allowed types
        super().load_bytes(read_item, value)
