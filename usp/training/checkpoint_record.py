"""What a checkpoint records about its run, and where that run stopped: written from the
settings, read back and checked before anything is loaded.

- :func:`run_metadata`: ``meta.json``'s record of a run (model config, data, schedule, degrees,
  the tokenizer, and the content fingerprints of the data and tokenizer files);
- :func:`read_metadata`: ``meta.json`` read back (no link followed), of this format, with a step
  that is a whole number within the run;
- :func:`check_compatible`: the run resumed must be the run saved (the model, the data and the
  schedule; the layout may differ) and its inputs unchanged (``usp.inputs.fingerprint``);
- :func:`read_trainer_state`: ``trainer.pt`` (weights-only), its step within ``[0, steps]`` and
  agreeing with ``meta.json`` and the scheduler, its data position whole numbers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from usp.data.sources import data_fingerprint
from usp.inputs import fingerprint, safe_files
from usp.inputs.model import (
    lora_metadata, model_metadata, pretrained_source, tokenizer_metadata,
)

FORMAT_VERSION = 2  # 2: manifest.json with SHA-256 of every file
META = "meta.json"
TRAINER = "trainer.pt"
# Fields of meta.json's "run" that must match on resume for training to continue exactly. The
# schedule's fields are among them: the LR of every step is a function of (step, steps, lr,
# min_lr, warmup), and AdamW's param_groups (lr, weight_decay) come back from the checkpoint.
# "lora": the adapters' rank, alpha and targets (None: none; a record written before adapters
# existed has none either, so it compares equal to a run without them).
RUN_FIELDS_THAT_MUST_MATCH = (
    "seq_len", "global_batch", "data", "seed", "steps", "lr", "min_lr", "warmup", "weight_decay",
    "pack", "tokenizer", "lora",
)
META_LIMIT = 64 << 20  # bytes: a meta.json holds a model config, a few KiB
STATE_LIMIT = 64 << 20  # bytes: trainer.pt and rng_rank*.pt hold a few small tensors


def run_metadata(spec, world_size: int) -> dict:
    """What a checkpoint records about its run (``spec``: a ``usp.spec.RunSpec`` whose global
    batch is resolved, ``usp.training.setup.with_default_batch``), JSON-normalised as
    :func:`check_compatible` reads it. The names are the settings' (``seq_len``, ``lr``...), so
    checkpoints of runs written before the spec had sections compare the same."""
    data, optim, parallel, model = spec.data, spec.optim, spec.parallel, spec.model
    paths = [str(Path(p).resolve()) for p in data.data] or "stdlib"
    if data.synthetic:
        paths = "synthetic"
    model_name, model_record = model_metadata(model)
    pretrained = pretrained_source(model)
    init_from = spec.checkpoint.init_from
    metadata = {
        "model_name": model_name,
        "model": model_record,
        "run": {
            "seq_len": data.seq_len,
            "global_batch": data.global_batch,
            "data": paths,
            "seed": spec.seed,
            "steps": optim.steps,
            "lr": optim.lr,
            "min_lr": optim.min_lr,
            "warmup": optim.warmup,
            "weight_decay": optim.weight_decay,
            "pack": data.pack and not data.synthetic,
            "tokenizer": tokenizer_metadata(model),
            "lora": lora_metadata(model),
            # content fingerprints: a resume refuses data or a tokenizer edited in place
            "inputs": {
                "data": data_fingerprint(data.data, data.synthetic),
                "tokenizer": (fingerprint.tokenizer_fingerprint(model.tokenizer)
                              if model.tokenizer else []),
            },
            "pretrained": str(Path(pretrained).resolve()) if pretrained else None,
            "init_from": str(Path(init_from).resolve()) if init_from else None,
            "world_size": world_size,
            "degrees": {"pp": parallel.pp, "ring": parallel.ring, "ulysses": parallel.ulysses,
                        "tp": parallel.tp},
            "layout": parallel.layout,
            "dtype": model.dtype,
        },
    }
    return json.loads(json.dumps(metadata))


def read_metadata(path: Path) -> dict:
    """meta.json of a checkpoint; a clear ValueError when it is missing or unreadable."""
    meta_path = Path(path) / META
    try:
        metadata = json.loads(safe_files.read_text(meta_path, META_LIMIT))
    except safe_files.UnsafePathError as exc:
        raise ValueError(f"checkpoint {path} was refused, nothing was loaded: {exc}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"checkpoint {path} is unreadable ({meta_path}: {exc}); pass --resume with a "
            f"complete checkpoint directory (one with {META}, {TRAINER} and .distcp files)"
        ) from exc
    required = {"format", "step", "model", "run"}
    if not isinstance(metadata, dict) or not required <= metadata.keys():
        raise ValueError(
            f"checkpoint {path} is unreadable: {meta_path} is not a usp checkpoint record "
            f"(it needs the keys {sorted(required)})"
        )
    if metadata["format"] != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format {metadata['format']!r}, this usp reads "
            f"format {FORMAT_VERSION} (checksummed)"
        )
    step, run = metadata["step"], metadata["run"]
    if not _is_count(step) or not isinstance(run, dict) or not _is_count(run.get("steps")) \
            or step > run["steps"] or not isinstance(metadata["model"], dict):
        raise ValueError(
            f"checkpoint {path} is unreadable: {meta_path} records step {step!r} of a run of "
            f"{run.get('steps') if isinstance(run, dict) else None!r} steps (a step is a whole "
            "number from 0 to the run's steps)"
        )
    return metadata


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_compatible(path: Path, saved: dict, current: dict) -> None:
    """Refuse to resume a checkpoint written for another model or another run shape.

    The parallel layout (ring, ulysses, tp, dp) may differ: DCP reshards on load.
    """
    problems = [
        f"model.{key}={saved['model'].get(key)!r} in the checkpoint but {value!r} now"
        for key, value in current["model"].items()
        if saved["model"].get(key) != value
    ]
    problems += [
        f"{key}={saved['run'].get(key)!r} in the checkpoint but {current['run'][key]!r} now"
        for key in RUN_FIELDS_THAT_MUST_MATCH
        if saved["run"].get(key) != current["run"][key]
    ]
    # a checkpoint saved before inputs were fingerprinted has no record to compare
    if not problems and isinstance(saved["run"].get("inputs"), dict):
        _check_inputs(path, saved["run"]["inputs"], current["run"]["inputs"])
    if problems:
        steps_note = (
            " (--steps is fixed for a run: the learning-rate schedule spans it and the "
            "optimizer's moments were shaped by it, so a changed horizon would splice two "
            f"schedules; to train longer, start a new run from this one's weights with a fresh "
            f"optimizer and schedule: usp train --init-from {path} --steps N)"
            if any(p.startswith("steps=") for p in problems) else ""
        )
        raise ValueError(
            f"checkpoint {path} does not match this run: " + "; ".join(problems) + steps_note
            + ". Resume with the checkpoint's settings, or start a new run in another --out"
        )


def _check_inputs(path: Path, saved: dict, current: dict) -> None:
    """Refuse to resume on data or a tokenizer whose content changed since the save."""
    changed = []
    for kind, what in (("data", "data file"), ("tokenizer", "tokenizer file")):
        try:
            changed += fingerprint.changes(saved.get(kind) or [], current[kind], what)
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"checkpoint {path} is unreadable: the {kind} fingerprints of its "
                             f"{META} are malformed") from None
    if changed:
        raise ValueError(
            f"checkpoint {path} cannot continue on these inputs: " + "; ".join(changed)
            + ". Resuming would train on other tokens than the run did; restore the files as "
            "they were, or start a new run in another --out"
        )


def load_small(path: Path):
    """One of our own small files (trainer.pt, rng_rank*.pt): weights-only, not through a link."""
    return torch.load(io.BytesIO(safe_files.read_bytes(path, STATE_LIMIT)), weights_only=True)


def read_trainer_state(path: Path, saved: dict) -> dict:
    """``trainer.pt``, checked before anything is loaded: a step from 0 to the run's steps that
    agrees with ``meta.json`` and the scheduler, and a data position of whole numbers. (A step
    of -3 would have made the resume drop every record of ``metrics.jsonl``.)"""
    file = Path(path) / TRAINER
    try:
        state = load_small(file)
    except safe_files.UnsafePathError as exc:
        raise ValueError(f"checkpoint {path} was refused, nothing was loaded: {exc}") from None
    except Exception as exc:  # torch.load raises many types for a torn or foreign file
        raise ValueError(f"checkpoint {path} is unreadable: {file}: {exc}") from exc
    step, steps = (state.get("step") if isinstance(state, dict) else None), saved["run"]["steps"]
    problem = None
    if not isinstance(state, dict) or not {"step", "scheduler", "data"} <= state.keys():
        problem = "it holds no step, scheduler and data state"
    elif not _is_count(step) or step > steps:
        problem = f"step {step!r} is not a step of this run (0 to --steps={steps})"
    elif step != saved["step"]:
        problem = f"step {step} but {META} says {saved['step']}"
    elif not isinstance(state["scheduler"], dict) or state["scheduler"].get("last_epoch") != step:
        problem = f"step {step} but its learning-rate schedule is at another step"
    elif not isinstance(state["data"], dict) or not all(
            _is_count(state["data"].get(key)) for key in ("epoch", "index", "seq_len",
                                                          "num_tokens")):
        problem = "its data position is not made of whole numbers (epoch, index, ...)"
    if problem is not None:
        raise ValueError(f"checkpoint {path} was refused, nothing was loaded: {file}: {problem}")
    return state
