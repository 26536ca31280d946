"""Atomic, layout-independent training checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a directory ``ROOT/step_000005`` holding

- the DCP shards of ``{"model": ..., "optim": ...}`` from ``get_state_dict``: keys are full
  parameter names and DTensor shards carry their global shape, so a checkpoint written under one
  layout (ring 2 x ulysses 2, FSDP over 4) loads under another (ulysses 4, or one process);
- ``trainer.pt``: step, scheduler and data-batcher state (identical on every rank, written once);
- ``rng_rank00000.pt`` ...: each rank's RNG states;
- ``meta.json``: model config, run shape and topology, checked before anything is loaded;
- ``manifest.json``: size and SHA-256 of every other file (``usp.training.integrity``), verified before
  anything is loaded; everything is read through loaders that cannot run code.

Atomicity: every rank writes into ``step_000005.tmp``; after a barrier the ranks hash their share
of the files, rank 0 writes the manifest, renames the directory to ``step_000005`` (``rename`` is
atomic on POSIX) and then points ``ROOT/latest`` at it by writing a temporary file and
``os.replace``-ing it. A ``step_*`` directory is therefore complete by construction; ``latest`` is
a convenience for people and is only consulted for a warning. A stale ``.tmp`` directory is only
ever a partial save and is cleared by the next save of that step. A complete checkpoint is never
overwritten or deleted; one found corrupt when resuming is renamed ``step_000005.corrupt``
(``usp.training.resume``).

Nothing is written or read through a link (``usp.inputs.safe_files``): ``ROOT``, the ``step_*``
directories and their files must be real directories and regular files (:func:`check_root`, before
anything starts), and the step and state a checkpoint records are checked before they are used.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

from usp.inputs import safe_files
from usp.training import integrity
from usp.training.checkpoint_record import (
    FORMAT_VERSION, META, TRAINER, load_small, read_metadata, read_trainer_state,
)

logger = logging.getLogger(__name__)

LATEST = "latest"

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it "assumes" a single process even when told so; one process is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _all_gather(value) -> list:
    if not _distributed():
        return [value]
    gathered = [None] * _world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def steps_saved(root: Path, after: int = -1) -> list[int]:
    """Steps of the complete checkpoints under ``root`` later than ``after`` (``.tmp`` and
    ``.corrupt`` excluded: only a finished save is renamed to ``step_NNNNNN``; a link is no
    checkpoint: :func:`check_root` refuses it)."""
    root = Path(root)
    if not root.is_dir() or root.is_symlink():
        return []
    suffixes = [p.name[len("step_"):] for p in root.glob("step_*")
                if p.is_dir() and not p.is_symlink()]
    steps = [int(suffix) for suffix in suffixes if suffix.isdigit()]
    return sorted(s for s in steps if s > after)


def check_root(root: Path) -> None:
    """Refuse a checkpoints directory whose ``latest`` (or its ``.tmp``) is not a regular file,
    or whose ``step_*`` entries are not real directories (a link would make a resume read, or a
    save write, somewhere else)."""
    root = Path(root)
    safe_files.check_directory_or_absent(root)
    if not root.is_dir():
        return
    for name in (LATEST, LATEST + ".tmp"):
        safe_files.check_file_or_absent(root / name)
    for entry in sorted(root.glob("step_*")):
        safe_files.check_directory_or_absent(entry)


# ---------------------------------------------------------------------------- saving
def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    metadata: dict,
) -> Path:
    """Save atomically on every rank (a collective); returns the final directory."""
    root = Path(root)
    final = step_dir(root, step)
    if os.path.lexists(final):
        raise ValueError(f"checkpoint {final} exists already; refusing to overwrite it")
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.parent.mkdir(parents=True, exist_ok=True)  # the run directory: the user's path
        safe_files.make_directory(root)
        _remove_partial_save(tmp)
        os.mkdir(tmp)  # fresh and ours: the files below are created in it
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.save(
                {"model": model_state, "optim": optim_state},
                checkpoint_id=tmp, no_dist=not _distributed(),
            )
    except dcp.CheckpointException as exc:  # a BaseException: make it an error that reports
        raise OSError(f"saving checkpoint {final} failed: {_causes(exc)}") from exc
    _save_new(_rng_state(), tmp / f"rng_rank{_rank():05d}.pt")
    if _rank() == 0:
        _save_new(trainer_state, tmp / TRAINER)
        meta = {"format": FORMAT_VERSION, "step": step, **metadata}
        safe_files.write_new(tmp / META, json.dumps(meta, indent=2).encode())
    _barrier()
    _write_manifest(tmp)
    _publish(tmp, final)
    if _rank() == 0:
        logger.info("saved checkpoint %s", final)
    return final


def _remove_partial_save(tmp: Path) -> None:
    """A ``step_N.tmp`` left by a save of this step that crashed (incomplete by construction):
    a real directory is removed with its files, a link only as a link (never what it names)."""
    if os.path.islink(tmp) or os.path.isfile(tmp):
        os.unlink(tmp)
    elif os.path.lexists(tmp):
        safe_files.check_directory_or_absent(tmp)
        shutil.rmtree(tmp)


def _save_new(value, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    safe_files.write_new(path, buffer.getvalue())


def _write_manifest(tmp: Path) -> None:
    """Every rank hashes a share of the files (rank 0's listing, so all agree on it); rank 0
    writes the manifest."""
    names = [sorted(p.name for p in tmp.iterdir() if p.is_file())] if _rank() == 0 else [None]
    if _distributed():
        dist.broadcast_object_list(names, src=0)
    shares = _all_gather(integrity.describe_files(tmp, names[0][_rank()::_world_size()]))
    if _rank() == 0:
        integrity.write_manifest(tmp, {k: v for share in shares for k, v in share.items()})


def _publish(tmp: Path, final: Path) -> None:
    """Every rank's shards and the manifest are in ``tmp``: rank 0 renames it, then moves the
    pointer (each step atomic), and the others wait for it."""
    if _rank() == 0:
        os.rename(tmp, final)
        safe_files.replace(final.parent / LATEST, (final.name + "\n").encode())
    _barrier()


# ---------------------------------------------------------------------------- loading
def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int
) -> dict:
    """Load model and optimizer in place (any layout); restore RNG; return the trainer state.

    ``path`` has been verified against its manifest (``usp.training.resume.choose_intact``); every file is
    read by a loader that cannot run code (``usp.training.integrity``).
    """
    path = Path(path)
    saved = read_metadata(path)
    trainer_state = read_trainer_state(path, saved)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    _read(path, state)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    _restore_rng(path, saved, seed, trainer_state["step"])
    if _rank() == 0:
        logger.info("resumed from %s at step %d", path, trainer_state["step"])
    return trainer_state


def load_model_weights(path: Path, model: torch.nn.Module) -> int:
    """Load only the model's weights from a checkpoint, in place (any layout: DCP reshards, as
    for a resume); the optimizer, schedule and RNG are left alone. Returns the checkpoint's
    step. ``path`` has been verified against its manifest, like :func:`load_checkpoint`'s."""
    path = Path(path)
    state = {"model": get_model_state_dict(model)}
    _read(path, state)
    set_model_state_dict(model, state["model"])
    return read_metadata(path)["step"]


def read_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``tensors`` (model parameter names -> tensors of their global shape) from the
    checkpoint in this process, whatever layout wrote it (``usp export``); ``path`` has been
    verified against its manifest."""
    _read(Path(path), {"model": tensors})


def _read(path: Path, state: dict) -> None:
    """Fill ``state``'s tensors from the checkpoint through loaders that cannot run code. Any
    failure is a ValueError naming the checkpoint."""
    try:
        reader = integrity.SafeFileSystemReader(path)
        # read the index once here: DCP would catch a refusal and try other files, blurring it
        reader.read_metadata()
        with _single_process_quiet():
            dcp.load(state, storage_reader=reader, planner=integrity.SafeLoadPlanner(),
                     no_dist=not _distributed())
    # DCP raises several types for torn or foreign files; CheckpointException is a BaseException
    except (Exception, dcp.CheckpointException) as exc:
        causes = exc.failures.values() if isinstance(exc, dcp.CheckpointException) else [(exc,)]
        unsafe = [c[0] for c in causes if isinstance(c[0], integrity.UnsafeCheckpointError)]
        if unsafe:
            raise ValueError(f"checkpoint {path} was refused, nothing was loaded: {unsafe[0]}") \
                from exc
        raise ValueError(f"checkpoint {path} is unreadable: {_causes(exc)}") from exc


def _causes(exc: BaseException) -> str:
    """The exceptions behind a DCP failure (each rank's), without its traceback dump."""
    if isinstance(exc, dcp.CheckpointException):
        causes = {f"{type(e).__name__}: {e}" for e, _ in exc.failures.values()}
        return "; ".join(sorted(causes))
    return f"{type(exc).__name__}: {exc}"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(path: Path, saved: dict, seed: int, step: int) -> None:
    """Same world size: each rank gets its own saved RNG back. Another world size: the saved
    streams belong to ranks that no longer exist, so every rank reseeds from (seed, step, rank)."""
    rng_path = path / f"rng_rank{_rank():05d}.pt"
    if saved["run"]["world_size"] == _world_size() and rng_path.exists():
        state = load_small(rng_path)
        generator = state.get("torch") if isinstance(state, dict) else None
        current = torch.get_rng_state()
        if not isinstance(generator, torch.Tensor) or generator.dtype != current.dtype \
                or generator.shape != current.shape:
            raise ValueError(f"checkpoint {path} is unreadable: {rng_path} holds no CPU "
                             "generator state")
        torch.set_rng_state(generator)
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        return
    generator_seed = (seed * 1_000_003 + step) * 65_537 + _rank()
    torch.manual_seed(generator_seed)
    if _rank() == 0:
        logger.info("world size changed: every rank reseeded its RNG from (seed, step, rank)")
