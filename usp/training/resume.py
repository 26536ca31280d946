"""What ``--resume`` continues from: the checkpoints to try, newest first, and why.

:func:`plan_resume` is pure (it reads, never writes), so the launcher runs it before any rank
starts and every rank runs it again with the same answer:

- ``--resume STEP_DIR``: that checkpoint only. A file missing, unlisted or of the wrong size, an
  unreadable ``meta.json`` or settings that do not match are refused here, before launch; a
  checksum mismatch is found when the ranks hash the files, and refused there (naming the file).
- ``--resume`` of a run directory: its complete checkpoints, newest first. ``latest`` is only
  compared against them: when it is missing or holds garbage the plan says so and takes the
  newest ``step_*``. The ranks load the first one whose checksums hold (``load_checkpoint``).
  Without any checkpoint, and without a ``latest`` that names one, the run starts again from
  step 0 in the same directory (a run that failed before its first save is restartable).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from usp.inputs import safe_files
from usp.training import checkpoint, checkpoint_record, integrity
from usp.training.run_dir import CONFIG

logger = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"
POINTER_LIMIT = 4096  # bytes: latest holds a directory name


@dataclass
class ResumePlan:
    candidates: list[Path]  # newest first; empty: start again from step 0
    notes: list[str] = field(default_factory=list)  # what the user should know, said once


def plan_resume(out: Path, resume: str, current: dict) -> ResumePlan:
    """The checkpoints ``--resume`` may load into the run in ``out``; ValueError if none may."""
    out = Path(out)
    checkpoint.check_root(out / "checkpoints")
    if resume != "latest":
        return _explicit(out, Path(resume), current)
    root = out / "checkpoints"
    steps = checkpoint.steps_saved(root)
    notes = _pointer_notes(root, steps)
    if not steps:
        if os.path.lexists(root / checkpoint.LATEST):
            raise ValueError(
                f"--resume: {root} has no complete checkpoint left ({notes[0]}); pass --resume "
                "with a checkpoint directory of this run, or start a new run"
            )
        if not os.path.lexists(out / CONFIG):
            raise ValueError(
                f"--resume: {out} is not a run directory (it has no {CONFIG} and no checkpoint); "
                "train without --resume, or pass the run directory to resume"
            )
        return ResumePlan([], [f"{out} has no checkpoint: training it again from step 1"])
    candidates = [checkpoint.step_dir(root, step) for step in reversed(steps)]
    newest_readable = _first_readable(candidates)
    checkpoint_record.check_compatible(
        newest_readable, checkpoint_record.read_metadata(newest_readable), current
    )
    return ResumePlan(candidates, notes)


def finished_checkpoint(out: Path, resume: str, current: dict, steps: int) -> Path | None:
    """The intact checkpoint at step ``steps`` that ``--resume`` would load (the run has nothing
    left to train: said before any rank starts), or None. A newest checkpoint that fails its
    checksums is left to the ranks, which fall back to an older one and train from there."""
    plan = plan_resume(out, resume, current)
    if not plan.candidates:
        return None
    newest = plan.candidates[0]
    if checkpoint.read_metadata(newest)["step"] < steps or integrity.verify(newest):
        return None
    try:  # its index is checked as a load would check it: a planted one is no finished run
        integrity.SafeFileSystemReader(newest).read_metadata()
    except integrity.UnsafeCheckpointError as exc:
        raise ValueError(f"checkpoint {newest} was refused, nothing was loaded: {exc}") from None
    return newest


def _explicit(out: Path, path: Path, current: dict) -> ResumePlan:
    safe_files.check_directory_or_absent(path)
    if not path.is_dir():
        raise ValueError(f"--resume {path}: no such checkpoint directory")
    saved = checkpoint_record.read_metadata(path)
    problems = integrity.check_listing(path)
    if problems:
        raise ValueError(
            f"checkpoint {path} is corrupt, nothing was loaded: " + "; ".join(problems)
        )
    checkpoint_record.check_compatible(path, saved, current)
    later = checkpoint.steps_saved(out / "checkpoints", after=saved["step"])
    if later:
        raise ValueError(
            f"--out {out} already holds checkpoints of steps {later}, beyond step {saved['step']} "
            f"of {path}; resume into another --out so they are not overwritten"
        )
    return ResumePlan([path])


def _first_readable(candidates: list[Path]) -> Path:
    """The newest candidate whose meta.json and file listing are whole (cheap: no hashing); the
    ranks skip the broken ones before it, with a warning."""
    problems = []
    for path in candidates:
        try:
            checkpoint_record.read_metadata(path)
            listing = integrity.check_listing(path)
        except ValueError as exc:
            listing = [str(exc)]
        if not listing:
            return path
        problems.append(f"{path}: {'; '.join(listing)}")
    raise ValueError("no intact checkpoint to resume from: " + " | ".join(problems))


def _pointer_notes(root: Path, steps: list[int]) -> list[str]:
    """A warning when ``latest`` does not name the newest complete checkpoint."""
    pointer = root / checkpoint.LATEST
    newest = checkpoint.step_dir(root, steps[-1]).name if steps else None
    fallback = f"resuming from {newest}, the newest checkpoint" if newest else "no checkpoint"
    if not os.path.lexists(pointer):
        return [f"checkpoint pointer {pointer} is missing; {fallback}"] if steps else []
    try:  # never through a link: check_root refused one already
        name = safe_files.read_text(pointer, POINTER_LIMIT).strip()
    except (OSError, ValueError) as exc:
        return [f"checkpoint pointer {pointer} is unreadable ({exc}); {fallback}"]
    if name == newest:
        return []
    complete = name.startswith("step_") and name[len("step_"):].isdigit() and (root / name).is_dir()
    if not complete:
        return [f"checkpoint pointer {pointer} holds {name[:40]!r}, not a complete checkpoint of "
                f"this run; {fallback}"]
    return [f"checkpoint pointer {pointer} names {name}, but {newest} is newer and complete; "
            f"{fallback}"]


# ---------------------------------------------------------------------------- --init-from
def init_source(init_from: str) -> Path:
    """The checkpoint ``--init-from`` names: that checkpoint directory, or a run directory's
    newest complete checkpoint."""
    path = Path(init_from)
    if (path / checkpoint.META).is_file():
        return path
    steps = checkpoint.steps_saved(path / "checkpoints")
    if not steps:
        raise ValueError(
            f"--init-from {path}: neither a checkpoint directory (no {checkpoint.META}) nor a run "
            "directory with a complete checkpoint under checkpoints/"
        )
    return checkpoint.step_dir(path / "checkpoints", steps[-1])


def check_init_source(init_from: str, current: dict) -> Path:
    """The checkpoint a new run takes its weights from, checked before any rank starts: whole
    (files listed, sizes), of this format, and of the same model (config and tokenizer: the
    weights' shapes and what their ids mean). ValueError naming what differs."""
    path = init_source(init_from)
    saved = checkpoint.read_metadata(path)
    problems = integrity.check_listing(path)
    if problems:
        raise ValueError(f"--init-from: checkpoint {path} is corrupt: " + "; ".join(problems))
    differences = [
        f"model.{key}={saved['model'].get(key)!r} in the checkpoint but {value!r} now"
        for key, value in current["model"].items() if saved["model"].get(key) != value
    ]
    if saved["run"].get("tokenizer") != current["run"]["tokenizer"]:
        differences.append(f"tokenizer {saved['run'].get('tokenizer')!r} in the checkpoint but "
                           f"{current['run']['tokenizer']!r} now")
    if saved["run"].get("lora") != current["run"]["lora"]:  # the tensors differ with adapters
        differences.append(f"LoRA adapters {saved['run'].get('lora')!r} in the checkpoint but "
                           f"{current['run']['lora']!r} now")
    if differences:
        raise ValueError(
            f"--init-from {path}: this run's model is not the checkpoint's: "
            + "; ".join(differences) + " (leave out --model, --hf-config, --hf-model, "
            "--tokenizer and --lora-* to take them from the source run, or give the ones it "
            "used)"
        )
    return path


def verify_on_every_rank(path: Path) -> None:
    """ValueError naming the file unless ``path`` matches its manifest (a collective: each rank
    hashes its share of the files and all agree)."""
    problems = _problems(path)
    if problems:
        raise ValueError(f"checkpoint {path} is corrupt, nothing was loaded: " + "; ".join(problems))


# ---------------------------------------------------------------------------- on the ranks
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _problems(path: Path) -> list[str]:
    """What is corrupt in ``path``, agreed by every rank (each hashes its share of the files)."""
    try:
        problems = integrity.verify(path, (_rank(), _world_size()))
        if not problems:
            checkpoint_record.read_metadata(path)  # hashed, but perhaps not a usp checkpoint record
    except ValueError as exc:
        problems = [str(exc)]
    return sorted({p for rank_problems in _all_gather(problems) for p in rank_problems})


def choose_intact(candidates: list[Path], current: dict) -> Path:
    """The first of ``candidates`` whose files match their manifest, on every rank (a collective:
    each rank hashes its share and all agree). With one candidate (``--resume STEP_DIR``) a corrupt
    checkpoint is a ValueError naming the file; with several, a corrupt one is renamed
    ``step_N.corrupt`` and the next is tried, with a warning that says so."""
    corrupt = []
    # the one checkpoint named by --resume STEP_DIR: the older ones beside it, if it is corrupt
    hint = _older_hint(candidates[0]) if len(candidates) == 1 else ""
    for path in candidates:
        problems = _problems(path)
        if not problems:
            break
        if len(candidates) == 1:
            raise ValueError(f"checkpoint {path} is corrupt, nothing was loaded: "
                             + "; ".join(problems) + hint)
        corrupt.append((path, problems))
    else:
        raise ValueError(
            "no intact checkpoint to resume from: "
            + " | ".join(f"{p}: {'; '.join(problems)}" for p, problems in corrupt)
        )
    # a mismatch is the user's settings, not corruption: refused, never moved aside
    checkpoint_record.check_compatible(path, checkpoint_record.read_metadata(path), current)
    if _rank() == 0:
        for bad, problems in corrupt:
            moved = _free_name(bad.with_name(bad.name + CORRUPT_SUFFIX))
            os.rename(bad, moved)
            logger.warning(
                "checkpoint %s is corrupt (%s); moved it to %s and resumed from %s, the newest "
                "intact checkpoint", bad, "; ".join(problems), moved.name, path.name,
            )
    if dist.is_initialized():
        dist.barrier()
    return path


def _older_hint(path: Path) -> str:
    older = [checkpoint.step_dir(path.parent, step) for step in checkpoint.steps_saved(path.parent)]
    older = [p for p in older if p.name < path.name]
    if not older:
        return ""
    return (f"; older checkpoints beside it: {', '.join(p.name for p in older)} (--resume "
            f"{older[-1]}, or --resume with the run directory to take the newest intact one)")


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}{n}")
    return candidate
