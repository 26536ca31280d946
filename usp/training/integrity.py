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

**Paths stay inside.** Every name the manifest lists is a plain file name of the checkpoint's own
folder, and every entry of the folder must be a regular file (a link, FIFO or device is named as a
problem). ``.metadata`` tells DCP which file and byte range holds each tensor: before DCP reads
anything, :func:`check_storage` requires each of those to be a plain name listed in the manifest,
a regular file, and a range inside it. Files are opened without following links
(``usp.inputs.safe_files``), so nothing outside the folder is read, and nothing blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import stat
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from usp.inputs import safe_files

MANIFEST = "manifest.json"
MANIFEST_LIMIT = 64 << 20  # bytes: a line per file
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------- integrity
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with os.fdopen(safe_files.open_regular(path, os.O_RDONLY), "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_plain_name(name) -> bool:
    """A file name of the folder itself: no directory part, not ``.`` or ``..``."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\0" not in name)


def describe_files(directory: Path, names: list[str]) -> dict[str, dict]:
    """Size and SHA-256 of ``names`` inside ``directory`` (one rank's share of a save)."""
    return {
        name: {"bytes": (Path(directory) / name).stat().st_size,
               "sha256": sha256_of(Path(directory) / name)}
        for name in names
    }


def write_manifest(directory: Path, files: dict[str, dict]) -> None:
    manifest = {"algorithm": "sha256", "files": dict(sorted(files.items()))}
    text = json.dumps(manifest, indent=1) + "\n"
    safe_files.write_new(Path(directory) / MANIFEST, text.encode())


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest's ``{name: {"bytes", "sha256"}}``; a ValueError naming it when unreadable.
    The checkpoint's folder must be a real directory (never a link) before anything in it is read."""
    safe_files.check_directory_or_absent(Path(directory))
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(safe_files.read_text(path, MANIFEST_LIMIT))
        files = manifest["files"]
        if manifest["algorithm"] != "sha256" or not all(
            isinstance(entry["bytes"], int) and isinstance(entry["sha256"], str)
            for entry in files.values()
        ):
            raise ValueError("unknown algorithm or malformed entry")
        foreign = [name for name in files if not is_plain_name(name) or name == MANIFEST]
        if foreign:
            raise ValueError(f"it lists {foreign[0][:200]!r}, which is no file name of the "
                             "checkpoint's own folder")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"checkpoint {directory} is corrupt: its checksum file {path} is unreadable ({exc})"
        ) from exc
    return files


def check_listing(directory: Path) -> list[str]:
    """Problems visible without reading the data: a file missing, unlisted or of another size."""
    directory = Path(directory)
    files = read_manifest(directory)  # the folder itself checked first
    present, problems = set(), []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file(follow_symlinks=False):
            present.add(entry.name)
        elif not entry.is_dir(follow_symlinks=False):  # a link, FIFO, device or socket
            problems.append(str(safe_files.refusal(Path(entry.path),
                                                   safe_files.describe(Path(entry.path)))))
    present -= {MANIFEST}
    problems += [f"{directory / name} is missing" for name in sorted(files.keys() - present)]
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


def check_storage(directory: Path, metadata: Metadata, index_path: Path) -> None:
    """Refuse an index whose entries read anything but byte ranges of the regular files that
    the manifest lists in ``directory`` (DCP would open any path it names: ``../../x``, a FIFO)."""
    listed = read_manifest(directory)
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        entry = f"{index_path} entry {getattr(index, 'fqn', index)!r}"
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not is_plain_name(name):
            shown = name[:200] if isinstance(name, str) else name
            raise UnsafeCheckpointError(
                f"{entry} names {shown!r}, which is no file name of the checkpoint's own folder "
                "(an index names only files beside it)")
        if name not in listed:
            raise UnsafeCheckpointError(f"{entry} names {name!r}, which {MANIFEST} does not list")
        if name not in sizes:
            try:
                status = os.lstat(directory / name)
            except FileNotFoundError:
                raise UnsafeCheckpointError(f"{entry} names {name!r}, which is missing") from None
            if not stat.S_ISREG(status.st_mode):
                what = safe_files.describe(directory / name)
                raise UnsafeCheckpointError(f"{entry} names {name!r}, which is {what}, not a "
                                            "regular file")
            sizes[name] = status.st_size
        offset, length = info.offset, info.length
        if not all(isinstance(n, int) and n >= 0 for n in (offset, length)) \
                or offset + length > sizes[name]:
            raise UnsafeCheckpointError(
                f"{entry} reads bytes {offset!r}+{length!r} of {name!r}, which holds "
                f"{sizes[name]} bytes")
        if info.transform_descriptors:
            raise UnsafeCheckpointError(
                f"{entry} asks for the stream transforms {list(info.transform_descriptors)!r}, "
                "which usp checkpoints never use")


class _NoFollowFileSystem(FileSystem):
    """DCP's file system, opening files for reading only if they are regular files reached
    without a link (``usp.inputs.safe_files``)."""

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if mode != "rb":
            raise UnsafeCheckpointError(f"a checkpoint is only read here, not opened {mode!r}")
        with os.fdopen(safe_files.open_regular(Path(path), os.O_RDONLY), "rb") as stream:
            yield stream


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read by the restricted unpickler and its storage
    entries checked (:func:`check_storage`), every file opened without following links."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.fs = _NoFollowFileSystem()

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = load_dcp_metadata(stream)
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(f"{path} {exc}") from None
        except safe_files.UnsafePathError as exc:  # a link or a FIFO in place of the index
            raise UnsafeCheckpointError(str(exc)) from None
        try:
            check_storage(Path(self.path), metadata, Path(path))
        except ValueError as exc:  # an unreadable manifest as well
            raise UnsafeCheckpointError(str(exc)) from None
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
