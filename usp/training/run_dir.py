"""The run directory of ``usp train``: its name, its saved settings, its lock, and its writability.

A run lives in one directory (``--out``, by default ``runs/MODEL-rR-uU-tT-sS-TIME``) holding
``config.json`` (the run spec, ``usp.spec.RunSpec``, in its nested form: a table per section;
rewritten on every resume), ``metrics.jsonl``, ``loss.png`` and ``checkpoints/``. ``--resume`` accepts that directory, a checkpoint inside it, or nothing (the
newest run of the same configuration under ``runs/``); :func:`resolve_settings` turns the flags
the user gave into a full set of settings, the run's saved ones with the given flags on top.

While a run trains, the process that launched it holds an exclusive ``fcntl.flock`` on
``OUT/.lock`` (released by the kernel however that process ends, ``kill -9`` included), so a second
run into the same directory is refused at once instead of interleaving its files.

Every file of the directory is read and written through ``usp.inputs.safe_files`` (no link is
followed, no FIFO opened), and :func:`check_run_directory` refuses, before anything starts, a run
directory that is itself a link or holds a link, FIFO or device under a name usp uses. The
directory's parents may be links (``runs/`` on another disk is the user's own layout, typed on the
command line); from the run directory down, every entry is one that usp made.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from usp.inputs import safe_files
from usp.inputs.folders import CHECKPOINTS, CONFIG, METRICS
from usp.spec import SECTION_OF, SECTIONS, RunSpec, flatten
from usp.training.wandb_log import ID_FILE as WANDB_ID

LOCK = ".lock"
PLOT = "loss.png"
RUNS = Path("runs")
# every file name usp writes in a run directory (a replaced file goes through NAME.tmp)
RUN_FILES = (CONFIG, CONFIG + ".tmp", METRICS, METRICS + ".tmp", PLOT, PLOT + ".tmp", LOCK,
             WANDB_ID)
SETTINGS_LIMIT = 1 << 20  # bytes: a config.json is a few hundred
# Settings that say where a run is, not what it trains: never taken from a saved config.json.
NOT_INHERITED = ("out", "resume")
# A flag given on resume replaces the saved setting that excludes it (then validation compares).
REPLACES = {"data": ("synthetic", False), "synthetic": ("data", []), "model": ("hf_config", None)}
# The layout's degrees go together: a resume that gives any of them takes the others not from
# the run's config.json but from their defaults, so "--resume RUN --ulysses 4" on a ring 2 run
# means ulysses 4 (ring 1), not ring 2 x ulysses 4.
LAYOUT_DEGREES = ("ring", "ulysses", "tp", "pp", "dp", "microbatches")
# What the model is: a run started --init-from another takes them from that run unless given.
MODEL_SETTINGS = ("model", "hf_config", "hf_model", "tokenizer", "lora_rank", "lora_alpha",
                  "lora_targets")


def run_prefix(model: str, hf_config: str | None, ring: int, ulysses: int, tp: int,
               seq_len: int) -> str:
    name = Path(hf_config).stem if hf_config else model
    return f"{name}-r{ring}-u{ulysses}-t{tp}-s{seq_len}"


def new_run_dir(prefix: str) -> Path:
    """``runs/PREFIX-TIME``, a directory that does not exist yet (the time sorts by start)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = RUNS / f"{prefix}-{stamp}", 1
    while candidate.exists():
        n += 1
        candidate = RUNS / f"{prefix}-{stamp}-{n}"
    return candidate


def latest_run(prefix: str) -> Path | None:
    """The newest ``runs/PREFIX-*`` directory that holds a ``config.json``."""
    runs = [p for p in RUNS.glob(f"{prefix}-*") if os.path.lexists(p / CONFIG)]
    return max(runs, key=lambda p: p.name) if runs else None


def read_settings(run: Path) -> dict:
    """The saved settings of ``run``, flat (``{setting: value}``): its ``config.json``, read
    without following a link, in the spec's nested form or the flat form runs wrote before the
    spec had sections (where ``zero2: true/false`` is ``zero: 2/3``). A name that is no setting
    is a ValueError naming the file and the names."""
    path = Path(run) / CONFIG
    try:
        settings = json.loads(safe_files.read_text(path, SETTINGS_LIMIT))
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
    except safe_files.UnsafePathError as exc:
        raise ValueError(f"cannot read the settings of run {run}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the settings of run {run}: {path}: {exc}") from exc
    if "model_type" in settings:
        raise ValueError(
            f"{run} is a Hugging Face model folder (its config.json has a model_type), not a usp "
            f"run directory; to fine-tune it: usp train --hf-model {run} --tokenizer {run}"
        )
    if not any(isinstance(settings.get(section), dict) for section in SECTIONS):
        settings = _older_flat(settings)  # a run written before the spec had sections
    settings = flatten(settings, str(path))
    unknown = sorted(set(settings) - set(SECTION_OF))
    if unknown:
        raise ValueError(
            f"{path} holds settings this usp does not know: {unknown}; remove them from the "
            f"file to resume the run (its checkpoints are unchanged), or start a new run"
        )
    return settings


def _older_flat(settings: dict) -> dict:
    """The flat config.json of an older run in today's names: its ZeRO-2 switch is ``zero``."""
    settings = dict(settings)
    if "zero2" in settings:
        zero2 = settings.pop("zero2")
        if not isinstance(zero2, bool):
            raise ValueError(f"zero2={zero2!r} in an older run's config.json is not true or "
                             "false")
        settings.setdefault("zero", 2 if zero2 else 3)
    return settings


def write_settings(out: Path, spec: RunSpec) -> None:
    """``OUT/config.json`` (atomically, never through a link): the spec in its nested form, with
    paths made absolute so a resume from elsewhere finds them; what ``--resume OUT`` reads."""
    checkpoint, logging = spec.checkpoint, spec.logging
    absolute = {"data": [str(Path(p).resolve()) for p in spec.data.data], "resume": None}
    if checkpoint.init_from:
        absolute["init_from"] = str(Path(checkpoint.init_from).resolve())
    if logging.reference_metrics:
        absolute["reference_metrics"] = str(Path(logging.reference_metrics).resolve())
    text = json.dumps(spec.replace(**absolute).nested(), indent=2) + "\n"
    safe_files.replace(Path(out) / CONFIG, text.encode())


def resolve_settings(given: dict, defaults: dict) -> dict:
    """Full flat settings from those the user ``given`` (name -> value: the flags typed over a
    ``--config`` file's): a fresh run takes ``defaults`` below them; a resumed run takes its
    saved config.json below them (``validate`` then refuses the ones a checkpoint cannot
    change)."""
    resume = given.get("resume")
    if resume is not None and given.get("init_from") is not None:
        raise ValueError(
            f"--init-from {given['init_from']} starts a new run from a checkpoint's weights and "
            f"--resume {resume} continues a run; pass one of them"
        )
    if given.get("init_from") is not None and not any(k in given for k in MODEL_SETTINGS):
        given = {**_source_model(Path(given["init_from"]), defaults), **given}
    if resume is None:
        settings = {**defaults, **given}
        if settings.get("out") is None:
            settings["out"] = str(new_run_dir(_prefix({**defaults, **given})))
        return settings
    run, out = _resume_target(resume, given, defaults)
    saved = {k: v for k, v in read_settings(run).items() if k in defaults} if run else {}
    saved = {k: v for k, v in saved.items() if k not in NOT_INHERITED}
    for flag, (other, cleared) in REPLACES.items():
        if flag in given and other not in given:
            saved[other] = cleared
    if any(degree in given for degree in LAYOUT_DEGREES):
        saved = {k: v for k, v in saved.items() if k not in LAYOUT_DEGREES}
    return {**defaults, **saved, **given, "out": str(out),
            "resume": "latest" if resume == "latest" or out == Path(resume) else resume}


def _source_model(init_from: Path, defaults: dict) -> dict:
    """The model settings of the run ``--init-from`` names (a run directory or one of its
    checkpoints), from its config.json; {} when there is none to read."""
    for run in (init_from, init_from.parent.parent):
        if (run / CONFIG).is_file():
            saved = read_settings(run)
            return {k: saved[k] for k in MODEL_SETTINGS if k in saved and k in defaults}
    return {}


def _prefix(settings: dict) -> str:
    return run_prefix(settings["model"], settings.get("hf_model") or settings.get("hf_config"),
                      settings["ring"], settings["ulysses"], settings["tp"], settings["seq_len"])


def _resume_target(resume: str, given: dict, defaults: dict) -> tuple[Path | None, Path]:
    """(the run whose settings to read back, the run directory to train in) for ``--resume``."""
    if resume == "latest":
        if given.get("out") is not None:
            out = Path(given["out"])
            return (out if os.path.lexists(out / CONFIG) else None), out
        prefix = _prefix({**defaults, **given})
        run = latest_run(prefix)
        if run is None:
            raise ValueError(
                f"--resume: no run of this configuration in {RUNS}/ ({RUNS / prefix}-*); pass "
                "the run directory: --resume RUN_DIR"
            )
        return run, run
    path = Path(resume)
    safe_files.check_directory_or_absent(path)
    if os.path.lexists(path / CONFIG):  # a run directory (read_settings says if it is not)
        if given.get("out") is not None and Path(given["out"]) != path:
            raise ValueError(
                f"--resume {path} continues that run in place; to branch it into --out "
                f"{given['out']}, pass one of its checkpoints: --resume {path}/checkpoints/step_N"
            )
        return path, path
    if not path.is_dir():
        raise ValueError(f"--resume {path}: no such run directory or checkpoint")
    run = path.parent.parent  # RUN/checkpoints/step_N
    run = run if os.path.lexists(run / CONFIG) else None
    if given.get("out") is None and run is None:
        raise ValueError(f"--resume {path}: not inside a run directory; pass --out for the run")
    return run, Path(given["out"]) if given.get("out") is not None else run


# ---------------------------------------------------------------------------- the directory
PREVIOUS_RUN_FILES = (CONFIG, METRICS, CHECKPOINTS)


def check_run_directory(out: Path) -> None:
    """Refuse a run directory that is a link, or that holds a link, FIFO, device or directory
    under a file name usp writes (or a non-directory as ``checkpoints``): usp would write
    through it, or read it, before the run could notice."""
    out = Path(out)
    safe_files.check_directory_or_absent(out)
    for name in RUN_FILES:
        safe_files.check_file_or_absent(out / name)
    safe_files.check_directory_or_absent(out / CHECKPOINTS)


def check_fresh(out: Path) -> None:
    """A run without ``--resume`` starts in a directory that holds no run."""
    previous = [name for name in PREVIOUS_RUN_FILES if os.path.lexists(Path(out) / name)]
    if previous:
        raise ValueError(
            f"--out {out} holds a previous run ({', '.join(previous)}); pass --resume {out} to "
            "continue it or choose another --out (nothing was overwritten)"
        )


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` that cannot be created or written, before anything starts."""
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ValueError(f"--out {out} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} is not writable: no write permission on {existing} "
                         "(or a read-only file system)")


def _in_use(out: Path, holder: str) -> ValueError:
    return ValueError(
        f"--out {out} is in use by another usp train run ({holder or 'unknown'}); wait for it "
        "to finish or choose another --out (nothing was written)"
    )


def check_not_in_use(out: Path) -> None:
    """Refuse an ``--out`` whose lock another process holds, naming it (pid, host, start), before
    anything else is said about the directory: a run in progress has written its config.json
    and checkpoints, but it is not "a previous run" to resume. Call it only where this process
    does not hold the lock itself."""
    path = Path(out) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or an unreadable one: taking the lock reports it)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(Path(out), os.read(fd, 4096).decode(errors="replace").strip()) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on a run directory for as long as this process trains in it."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        path = self.out / LOCK
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            safe_files.make_directory(self.out)
            fd = safe_files.open_regular(path, os.O_RDWR | os.O_CREAT)
        except safe_files.UnsafePathError:
            raise
        except OSError as exc:
            raise ValueError(f"--out {self.out} cannot be written: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise _in_use(self.out, holder) from None
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
        os.write(fd, holder.encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
