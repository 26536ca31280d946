"""What a folder handed to usp is, and whether its Hugging Face files can be read without running
code from it.

The flags ``--hf-model``, ``--hf-config``, ``--tokenizer`` and ``--resume`` each expect one kind
of folder; given another (a run directory to ``--hf-model``, a model folder to ``--resume``, a
folder without tokenizer files to ``--tokenizer``) usp says in one line what the folder is and
what the flag expects, instead of letting transformers misread it (a run's ``config.json`` is not
a model config).

**No code from a folder runs.** transformers can import Python modules that a folder's
``config.json`` or ``tokenizer_config.json`` names in ``auto_map`` (custom architectures and
tokenizers), after asking on the terminal for 15 seconds. usp passes ``trust_remote_code=False``
to every loader, and before that refuses a folder that asks for custom code (``auto_map``, or a
``model_type`` transformers does not ship) with that reason, so no prompt ever appears.
"""

from __future__ import annotations

import json
from pathlib import Path

from usp.inputs import safe_files

CONFIG = "config.json"
# entries of a usp run directory besides its config.json (usp.training.run_dir writes them)
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TOKENIZER_CONFIG = "tokenizer_config.json"
JSON_LIMIT = 64 << 20  # bytes: a config or tokenizer_config.json is far smaller
# files from which transformers builds a tokenizer (one suffices)
TOKENIZER_MARKERS = ("tokenizer.json", TOKENIZER_CONFIG, "vocab.json", "vocab.txt",
                     "tokenizer.model", "spiece.model")
# keys of usp train's own config.json that no model config has: sections of its run spec, or
# (runs written before the spec had sections) these settings
RUN_SECTIONS = {"parallel", "optim", "checkpoint"}
RUN_SETTINGS_KEYS = {"seq_len", "global_batch", "ckpt_every"}


def read_json(path: Path, flag: str):
    """A small JSON file of a folder handed to usp (links followed, FIFOs refused)."""
    try:
        return json.loads(safe_files.read_text(path, JSON_LIMIT, follow_links=True))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{flag}: cannot read {path} ({exc})") from None


def folder_kind(path: Path) -> str | None:
    """What ``path`` holds, in words, when usp can tell: a usp run directory or checkpoint, a
    Hugging Face model or tokenizer folder; None otherwise."""
    path = Path(path)
    if not path.is_dir():
        return None
    # a checkpoint's record and manifest (usp.training.checkpoint_record, .integrity)
    if (path / "meta.json").is_file() and (path / "manifest.json").is_file():
        return "a usp checkpoint"
    if (path / CONFIG).is_file():
        try:
            values = json.loads(safe_files.read_text(path / CONFIG, JSON_LIMIT,
                                                     follow_links=True))
        except (OSError, ValueError):
            values = None
        if isinstance(values, dict) and "model_type" in values:
            return "a Hugging Face model folder"
        if isinstance(values, dict) and (RUN_SECTIONS <= values.keys()
                                         or RUN_SETTINGS_KEYS <= values.keys()):
            return "a usp run directory"
    if (path / CHECKPOINTS).is_dir() or (path / METRICS).is_file():
        return "a usp run directory"
    if any((path / name).is_file() for name in TOKENIZER_MARKERS):
        return "a Hugging Face tokenizer folder"
    return None


def _what_instead(path: Path, kind: str | None) -> str:
    """A hint for a folder of the wrong kind: what its kind is used for."""
    if kind == "a usp run directory":
        return (f"; continue training it with usp train --resume {path}, generate with usp "
                f"generate --checkpoint {path}, or write a Hugging Face folder with usp export "
                f"{path} --out DIR")
    if kind == "a usp checkpoint":
        return (f"; resume training from it with usp train --resume {path}, or generate with "
                f"usp generate --checkpoint {path}")
    if kind == "a Hugging Face model folder":
        return f"; fine-tune it with usp train --hf-model {path} --tokenizer {path}"
    return ""


def expect_model_folder(path: Path, flag: str) -> Path:
    """``path/config.json`` of a Hugging Face model folder; a ValueError saying what ``path``
    is otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{flag} {path} is not a directory (a local Hugging Face model folder: "
                         "config.json and safetensors weights; nothing is downloaded)")
    kind = folder_kind(path)
    if kind not in (None, "a Hugging Face model folder"):
        raise ValueError(f"{flag} {path} is {kind}, not a Hugging Face model folder (a "
                         f"config.json with a model_type, and safetensors weights)"
                         + _what_instead(path, kind))
    if not (path / CONFIG).is_file():
        raise ValueError(f"{flag} {path} holds no config.json; a Hugging Face model folder has "
                         "one beside its weights")
    return path / CONFIG


def expect_tokenizer_folder(path: Path, flag: str) -> None:
    """A folder holding a Hugging Face tokenizer's files; a ValueError saying what it is
    otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is not a directory holding a tokenizer")
    kind = folder_kind(path)
    if not any((path / name).is_file() for name in TOKENIZER_MARKERS):
        what = f"is {kind}, which" if kind else "holds no tokenizer files:"
        raise ValueError(f"{flag} {path} {what} has none of {', '.join(TOKENIZER_MARKERS)}; "
                         "pass the folder a tokenizer was saved to (save_pretrained)"
                         + _what_instead(path, kind))


def refuse_custom_code(values: dict, path: Path, flag: str, known_model_types) -> None:
    """Refuse a config (``config.json`` or ``tokenizer_config.json`` values) that asks for code
    from its folder: an ``auto_map``, or a ``model_type`` transformers does not ship."""
    auto_map = values.get("auto_map")
    if auto_map:
        classes = sorted(auto_map) if isinstance(auto_map, dict) else auto_map
        raise ValueError(
            f"{flag}: {path} asks for custom code (auto_map {classes!r}): loading it would run "
            f"Python modules from {path.parent}, which usp never does; use a model and "
            "tokenizer that transformers implements itself"
        )
    model_type = values.get("model_type")
    if model_type is not None and model_type not in known_model_types:
        raise ValueError(
            f"{flag}: {path} has model_type={model_type!r}, which transformers does not "
            "implement; such a model needs code from its folder, which usp never runs"
        )


def check_tokenizer_code(directory: Path, flag: str) -> None:
    """Refuse a tokenizer folder whose configs ask for custom code (before transformers is
    asked to load it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for name in (TOKENIZER_CONFIG, CONFIG):
        path = Path(directory) / name
        if path.is_file():
            values = read_json(path, flag)
            if isinstance(values, dict):
                refuse_custom_code(values, path, flag, CONFIG_MAPPING)
