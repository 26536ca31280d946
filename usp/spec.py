"""The run spec: every setting of a training run, typed, in sections.

One spec is what ``usp train`` runs: its flags are made from the fields below (name, type,
default and help text: :mod:`usp.cli.spec_flags`), ``usp train --config run.toml`` reads one
(flags given beside it override), a run directory's ``config.json`` is one, and ``usp plan
--emit run.toml`` writes one. Each section is checked once, by the module that owns what it
describes (:func:`usp.training.setup.validate` calls them in turn): ``parallel`` by
:func:`usp.topology.mesh_sizes`, the rules :meth:`usp.topology.Topology.build` lays its mesh by,
``model`` by its model family, ``data`` by :func:`usp.data.run.check_data`, ``optim`` by
:mod:`usp.training.optim`, ``memory`` by :mod:`usp.parallel`, :mod:`usp.memory` and
:mod:`usp.losses`, ``checkpoint`` by the run directory, ``logging`` by the metrics.

Every field name is unique across the sections, and is the flag's name (``seq_len`` ->
``--seq-len``): :meth:`RunSpec.flat` and :meth:`RunSpec.from_flat` convert between the sectioned
spec and the flat settings a command line gives (and the flat ``config.json`` of runs written
before sections existed, which still resume). This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from usp.choices import (DEFAULT_CHUNK_TOKENS, LAYOUTS, LOSS_ON, LOSSES, PIPELINE_SCHEDULES,
                         PLACEMENTS, WANDB_MODES)

# Checkpoint every 50 steps and at the last: a crash loses at most 50 steps, and the README's
# 30-step job still ends with one. 0 turns checkpoints off (benchmarks).
DEFAULT_CHECKPOINT_EVERY = 50


def setting(default, help: str, **flag):
    """A field with its command-line help and argparse options (``choices``, ``metavar``,
    ``flag`` for a name other than ``--field-name``, ``group`` for mutually exclusive flags)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **flag})
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class Parallel:
    """How the ranks split the work: the five mesh axes, where they sit, the token layout."""

    ring: int = setting(1, "ring-attention degree")
    ulysses: int = setting(1, "Ulysses degree")
    tp: int = setting(1, "tensor-parallel degree")
    pp: int = setting(1, "pipeline stages")
    dp: int = setting(-1, "data-parallel degree (-1: the rest of the world)")
    placement: str = setting("head-first", "which sequence axis sits on adjacent ranks: "
                             "head-first (Ulysses inside a node) or context-first (the ring)",
                             choices=PLACEMENTS)
    layout: str = setting("stripe", "token layout over sequence ranks", choices=LAYOUTS)
    ring_layout: str | None = setting(
        None, "the layout ring attention runs on when not --layout's: around each attention its "
        "ring blocks are re-laid across the ring and back, so a hybrid's --layout contiguous "
        "(its scans need it) meets causal attention balanced with zigzag or stripe (default: "
        "none, --layout's)", choices=LAYOUTS)
    microbatches: int = setting(0, "pipeline micro-batches per step; the global batch must be a "
                                "multiple of dp x microbatches (0: one per stage)")
    pp_schedule: str = setting("1f1b", "pipeline schedule", choices=PIPELINE_SCHEDULES)
    kernel: str = setting("auto", "local attention kernel: auto or a name of "
                          "usp.attention.kernels.KERNELS")
    zero: int = setting(3, "ZeRO stage of FSDP over dp x ring x ulysses: 3 reshards each "
                        "block's parameters after its forward, 2 keeps them gathered until its "
                        "backward (ignored when that product is 1)", choices=(2, 3))


@dataclass
class Model:
    """What is trained: a usp Llama preset or a Hugging Face model, its tokenizer, precision,
    and whether only LoRA adapters are trained."""

    model: str = setting("tiny", "Llama preset of usp.models, random init", choices_from="models")
    hf_config: str | None = setting(
        None, "train a Hugging Face causal LM instead of --model: a config.json (or its "
        "directory) or a preset (tiny-llama, tiny-qwen2, tiny-qwen3, tiny-mistral, tiny-gemma); "
        "random init (default: none, --model)", metavar="PATH_OR_PRESET")
    hf_model: str | None = setting(
        None, "fine-tune a local Hugging Face model: DIR holds config.json and safetensors "
        "weights (model.safetensors, or shards with model.safetensors.index.json); each rank "
        "reads only its shards (default: none)", metavar="DIR")
    tokenizer: str | None = setting(
        None, "tokenize the training text with the local Hugging Face tokenizer in DIR "
        "(documents end with its EOS) (default: byte-level tokens)", metavar="DIR")
    dtype: str = setting(
        "auto", "auto: bf16 on CUDA, fp32 on CPU. bf16: the forward under autocast; fp32 master "
        "weights and optimizer, and on CUDA FSDP2 gathers bf16 parameters and reduces gradients "
        "in fp32. fp32 on CUDA runs its matmuls as TF32", choices=("auto", "fp32", "bf16"))
    lora_rank: int = setting(
        0, "train LoRA adapters of this rank on a Hugging Face model (--hf-model or "
        "--hf-config) through PEFT, every base weight frozen (0: off, every weight trained)",
        metavar="R")
    lora_alpha: float = setting(
        0.0, "LoRA scaling numerator: adapters add alpha/rank x B A to each weight (0: 2 x "
        "--lora-rank)", metavar="ALPHA")
    lora_targets: list[str] = setting(
        ["all-linear"], "the linear layers that get adapters, named as PEFT's target_modules "
        "takes them (a module's name or its last parts, e.g. q_proj v_proj); all-linear: "
        "every linear layer of the decoder, the output head excepted", nargs="+",
        metavar="NAME")


@dataclass
class Data:
    """What the model reads: the text, how it is cut into samples, what is held out."""

    data: list[str] = setting([], "local files or folders to train on: text files (one document "
                              "each), JSON Lines, JSON, Parquet, Arrow, datasets.save_to_disk "
                              "folders (default: the Python standard library's source)",
                              nargs="+", metavar="PATH", group="source")
    synthetic: bool = setting(False, "seeded random tokens instead of text, for throughput runs",
                              group="source")
    text_field: str = setting("text", "the field of each record that holds its text",
                              metavar="NAME")
    chat_field: str | None = setting(
        None, "read each record's NAME field as a conversation (a list of role/content messages) "
        "rendered with the tokenizer's chat template (default: none, records are text)",
        metavar="NAME")
    loss_on: str | None = setting(
        None, "with --chat-field, which tokens carry the loss: the assistant's or all (default: "
        "assistant for conversations; text trains on every token)", choices=LOSS_ON)
    data_cache: str | None = setting(
        None, "where tokenized data is cached, so a second run does not tokenize again (default: "
        "~/.cache/usp/tokens, or $XDG_CACHE_HOME/usp/tokens)", metavar="DIR")
    pack: bool = setting(True, "let attention, labels and RoPE positions run across document "
                         "boundaries (EOT) (default: each packed document is its own sequence)",
                         flag="--no-pack")
    seq_len: int = setting(1024, "global tokens per sample")
    global_batch: int = setting(0, "samples per step over all dp ranks (0: dp x microbatches x "
                                "grad-accum, one row per micro-batch)")
    eval_every: int = setting(0, "held-out loss every N steps and at the last (0: off, nothing "
                              "held out)", metavar="N")
    eval_batches: int = setting(4, "global batches held out from the data for the eval loss",
                                metavar="M")


@dataclass
class Optim:
    """AdamW and its schedule: linear warm-up, then a cosine to the minimum."""

    steps: int = setting(20, "total optimizer steps of the run")
    lr: float = setting(3e-3, "peak learning rate of AdamW")
    warmup: int = setting(5, "linear warm-up steps before the cosine")
    min_lr: float = setting(3e-4, "learning rate at the end of the cosine")
    weight_decay: float = setting(0.1, "AdamW decay of matrices and embeddings")
    grad_clip: float = setting(1.0, "maximum global gradient norm, 0: off")
    grad_accum: int = setting(1, "micro-steps per optimizer step, the global batch split K ways; "
                              "gradients synced in the last", metavar="K")


@dataclass
class Memory:
    """Features that trade compute for memory."""

    ac: str = setting("none", "activation checkpointing: none, full (each block), selective "
                      "(each MLP), or kinds joined by commas: attention, mlp, block",
                      metavar="KINDS")
    tiled_mlp: int = setting(0, "run each MLP over tiles of TOKENS tokens, recomputed in the "
                             "backward (0: off)", metavar="TOKENS")
    loss: str = setting("full", "full logits, chunked (tp=1: the output projection and loss over "
                        "token chunks, recomputed in the backward) or vocab_parallel (tp>1: "
                        "logits stay split over tp)", choices=LOSSES)
    loss_chunk_tokens: int = setting(DEFAULT_CHUNK_TOKENS, "tokens per chunk of --loss chunked")
    offload_activations: bool = setting(False, "CUDA: keep saved activations in pinned host "
                                        "memory until the backward")


@dataclass
class Checkpoint:
    """Where the run lives, how often it is saved, what it starts from."""

    out: str | None = setting(None, "run directory, new for each run (default "
                              "runs/MODEL-rRING-uULYSSES-tTP-sSEQ-TIME)")
    ckpt_every: int = setting(DEFAULT_CHECKPOINT_EVERY, "checkpoint every N steps and at the "
                              "last, 0: never")
    resume: str | None = setting(
        None, "continue a run: its directory (settings come from its config.json, flags given "
        "again override them), one of its checkpoints, or with no value the newest run of this "
        "configuration under runs/ (or --out's) (default: a new run)", nargs="?",
        const="latest", metavar="RUN_DIR|CKPT")
    init_from: str | None = setting(
        None, "start a new run from the model weights of a run's newest checkpoint (or the one "
        "given), on any layout, with a fresh optimizer, schedule and step count (to train "
        "longer than a run's --steps); the model flags default to that run's (default: none)",
        metavar="RUN_DIR|CKPT")


@dataclass
class Logging:
    """What the run reports."""

    progress: bool = setting(True, "no progress bar and no per-step lines; metrics.jsonl is "
                             "still written (default: progress shown)", flag="--no-progress")
    reference_metrics: str | None = setting(
        None, "another run's metrics.jsonl, drawn dashed beside this run's loss curve (default: "
        "none)", metavar="JSONL")
    peak_tflops: float | None = setting(
        None, "per-device peak for MFU (default: a known GPU's datasheet value; none on CPU)")
    tensorboard: bool = setting(False, "also write each step's metrics as TensorBoard scalars "
                                "in OUT/tensorboard (needs the tensorboard package)")
    wandb: str | None = setting(
        None, "also log each step's metrics to the Weights & Biases project PROJECT, its files "
        "in OUT/wandb; a resume continues the same W&B run (needs the wandb package) (default: "
        "none)", metavar="PROJECT")
    wandb_mode: str | None = setting(
        None, "with --wandb: online, or offline (no network or account; upload later with "
        "wandb sync) (default: W&B's own, $WANDB_MODE or online)", choices=WANDB_MODES)


SECTIONS = {"parallel": Parallel, "model": Model, "data": Data, "optim": Optim,
            "memory": Memory, "checkpoint": Checkpoint, "logging": Logging}


@dataclass
class RunSpec:
    """A whole run: the sections, and how it is launched."""

    parallel: Parallel = field(default_factory=Parallel)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    optim: Optim = field(default_factory=Optim)
    memory: Memory = field(default_factory=Memory)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    logging: Logging = field(default_factory=Logging)
    seed: int = setting(0, "model initialisation and data order")
    nproc: int = setting(1, "rank processes to launch on this machine; ignored under an "
                         "external torchrun, whose world size counts")
    device: str = setting("auto", "gloo on cpu, nccl on cuda; auto picks cuda when present",
                          choices=("auto", "cpu", "cuda"))

    # ------------------------------------------------------------------ flat names
    def flat(self) -> dict:
        """``{field: value}`` over every section (the names are unique)."""
        values = {name: getattr(self, name) for name in TOP_LEVEL}
        for section in SECTIONS:
            values.update(dataclasses.asdict(getattr(self, section)))
        return values

    @classmethod
    def from_flat(cls, values: dict) -> "RunSpec":
        """The spec of flat settings (``{field: value}``); an unknown name, or a value of another
        type than its field's (:func:`check_types`), is a ValueError."""
        unknown = sorted(set(values) - set(SECTION_OF))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; the settings are {sorted(SECTION_OF)}")
        sections = {name: kind(**{k: v for k, v in values.items() if SECTION_OF[k] == name})
                    for name, kind in SECTIONS.items()}
        spec = cls(**sections, **{k: v for k, v in values.items() if k in TOP_LEVEL})
        check_types(spec)  # a spec never holds a value of another type than its field's
        return spec

    # ------------------------------------------------------------------ nested form
    def nested(self) -> dict:
        """``{section: {field: value}}`` plus the top-level fields: config.json and TOML."""
        return {**{name: getattr(self, name) for name in TOP_LEVEL},
                **{section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}}

    @classmethod
    def from_nested(cls, values: dict, where: str = "the spec") -> "RunSpec":
        """The spec of :meth:`nested`'s form (also the flat form of older run directories)."""
        return cls.from_flat(flatten(values, where))

    def replace(self, **changes) -> "RunSpec":
        """A copy with flat fields changed (``spec.replace(seq_len=4096)``)."""
        return RunSpec.from_flat({**self.flat(), **changes})


TOP_LEVEL = ("seed", "nproc", "device")
# the section of each setting (the names "model" and "data" are settings of the sections of the
# same names)
SECTION_OF = {name: section for section, kind in SECTIONS.items()
              for name in (f.name for f in dataclasses.fields(kind))}
SECTION_OF.update({name: None for name in TOP_LEVEL})


def flatten(values: dict, where: str = "the spec") -> dict:
    """Flat settings from the nested form (sections as tables), or from a flat dict as it is;
    a section name that is not a table, or a field in the wrong section, is a ValueError."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a table of settings, got {type(values).__name__}")
    flat = {}
    for key, value in values.items():
        # "model" and "data" are both sections and settings: a table is the section
        if key in SECTIONS and (isinstance(value, dict) or key not in SECTION_OF):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: [{key}] must be a table of settings")
            misplaced = sorted(k for k in value if SECTION_OF.get(k, key) != key)
            if misplaced:
                raise ValueError(f"{where}: {misplaced} belong in other sections than [{key}] "
                                 f"({', '.join(f'{k}: [{SECTION_OF[k]}]' for k in misplaced)})")
            flat.update(value)
        else:
            flat[key] = value
    return flat


def field_types() -> dict[str, object]:
    """``{field: its type hint}`` over every section and the top level."""
    hints = {}
    for kind in SECTIONS.values():
        hints.update(typing.get_type_hints(kind))
    top = typing.get_type_hints(RunSpec)
    hints.update({name: top[name] for name in TOP_LEVEL})
    return hints


def check_types(spec: RunSpec, where: str = "the command line, a --config file, or the "
                "config.json of the run being resumed") -> None:
    """ValueError unless every setting has the type its field declares: flags are parsed to it,
    but a --config file or a resumed run's config.json may hold anything."""
    values, hints = spec.flat(), field_types()
    for name, hint in hints.items():
        if not _has_type(values[name], hint):
            expected = getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint)
            raise ValueError(f"setting {name}={values[name]!r} is not of type {expected} "
                             f"(from {where})")


def _has_type(value, hint) -> bool:
    arguments = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_has_type(value, argument) for argument in arguments)
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_has_type(v, arguments[0]) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool) and hint is not bool:
        return False
    return isinstance(value, (int, float) if hint is float else hint)


# ---------------------------------------------------------------------------- TOML
def read_toml(path) -> dict:
    """The flat settings a TOML file gives (sections as tables; a flat file works too).
    ValueError naming the file for a file that is not TOML or a name that is no setting."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from pathlib import Path

    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not TOML ({exc})") from None
    flat = flatten(values, f"--config {path}")
    unknown = sorted(set(flat) - set(SECTION_OF))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}")
    return flat


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise ValueError(f"cannot write {value!r} as TOML")


def to_toml(spec: RunSpec, header: str = "") -> str:
    """``spec`` as TOML, a table per section (unset optional fields left out: TOML has no
    null); :func:`read_toml` reads it back to the same spec."""
    lines = [f"# {line}" for line in header.splitlines()]
    nested = spec.nested()
    lines += [f"{name} = {_toml_value(nested[name])}" for name in TOP_LEVEL]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        lines += [f"{name} = {_toml_value(value)}" for name, value in nested[section].items()
                  if value is not None]
    return "\n".join(lines) + "\n"
