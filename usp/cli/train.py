"""``usp train``: the command line of the training job (``usp.training.launcher`` and
``usp.training.loop`` do the work)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

from usp.choices import LAYOUTS, LOSSES
from usp.cli.help import add_parser
from usp.models.llama.presets import CONFIGS
from usp.training import run_dir
from usp.training.config import DEFAULT_CHECKPOINT_EVERY, TrainConfig

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "train",
        help="train a Llama with sequence parallelism",
        description=(
            "Train a Llama-style model with sequence parallelism (ring x ulysses), FSDP2 and "
            "tensor parallelism. --nproc N launches N ranks through torchrun's elastic launcher; "
            "under an external torchrun the same command runs one rank. See docs/training.md."
        ),
        # only the flags typed reach the namespace: a resume reads the rest from config.json
        argument_default=argparse.SUPPRESS,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def add_arguments(parser) -> None:
    """The flags of ``usp train``. They carry no argparse defaults (the parser is built with
    ``argument_default=SUPPRESS``): the namespace holds only what the user typed, so a resumed
    run can take the rest from its config.json; :class:`TrainConfig` holds the defaults."""
    d = TrainConfig()
    a = parser.add_argument
    a("--nproc", type=int,
      help=f"rank processes to launch on this machine (default {d.nproc}); ignored under an "
      "external torchrun, whose world size counts")
    a("--device", choices=("auto", "cpu", "cuda"),
      help=f"gloo on cpu, nccl on cuda; auto picks cuda when present (default {d.device})")
    a("--model", choices=sorted(CONFIGS),
      help=f"Llama preset of usp.models, random init (default {d.model})")
    a("--hf-config", metavar="PATH_OR_PRESET",
      help="train a Hugging Face causal LM instead of --model: a config.json (or its directory) "
      "or a preset (tiny-llama, tiny-qwen2, tiny-qwen3, tiny-mistral, tiny-gemma); random init "
      "(default: none, --model)")
    a("--hf-model", metavar="DIR",
      help="fine-tune a local Hugging Face model: DIR holds config.json and safetensors weights "
      "(model.safetensors, or shards with model.safetensors.index.json); each rank reads only "
      "its shards (default: none)")
    a("--tokenizer", metavar="DIR",
      help="tokenize the training text with the local Hugging Face tokenizer in DIR (documents "
      "end with its EOS) (default: byte-level tokens)")
    a("--seq-len", type=int, help=f"global tokens per sample (default {d.seq_len})")
    a("--global-batch", type=int,
      help=f"samples per step over all dp ranks (default {d.global_batch}: dp x microbatches x "
      "grad-accum, one row per micro-batch)")
    a("--steps", type=int, help=f"total optimizer steps of the run (default {d.steps})")
    a("--lr", type=float, help=f"peak learning rate of AdamW (default {d.lr})")
    a("--warmup", type=int, help=f"linear warm-up steps before the cosine (default {d.warmup})")
    a("--min-lr", type=float, help=f"learning rate at the end of the cosine (default {d.min_lr})")
    a("--weight-decay", type=float,
      help=f"AdamW decay of matrices and embeddings (default {d.weight_decay})")
    a("--grad-clip", type=float,
      help=f"maximum global gradient norm, 0: off (default {d.grad_clip})")
    a("--dtype", choices=("auto", "fp32", "bf16"),
      help=f"auto: bf16 on CUDA, fp32 on CPU. bf16: the forward under autocast; fp32 master "
      "weights and optimizer, and on CUDA FSDP2 gathers bf16 parameters and reduces gradients "
      f"in fp32. fp32 on CUDA runs its matmuls as TF32 (default {d.dtype})")
    a("--seed", type=int, help=f"model initialisation and data order (default {d.seed})")
    a("--ring", type=int, help=f"ring-attention degree (default {d.ring})")
    a("--ulysses", type=int, help=f"Ulysses degree (default {d.ulysses})")
    a("--tp", type=int, help=f"tensor-parallel degree (default {d.tp})")
    a("--pp", type=int, help=f"pipeline stages (default {d.pp})")
    a("--microbatches", type=int,
      help=f"pipeline micro-batches per step; the global batch must be a multiple of dp x "
      f"microbatches (default {d.microbatches}: one per stage)")
    a("--pp-schedule", choices=("1f1b", "gpipe"),
      help=f"pipeline schedule (default {d.pp_schedule})")
    a("--dp", type=int, help=f"data-parallel degree (default {d.dp}: the rest of the world)")
    a("--layout", choices=LAYOUTS, help=f"token layout over sequence ranks (default {d.layout})")
    a("--kernel",
      help=f"local attention kernel: auto or a name of usp.attention.kernels.KERNELS "
      f"(default {d.kernel})")
    a("--ac", metavar="KINDS",
      help="activation checkpointing: none, full (each block), selective (each MLP), or kinds "
      f"joined by commas: attention, mlp, block (default {d.ac})")
    a("--tiled-mlp", type=int, metavar="TOKENS",
      help="run each MLP over tiles of TOKENS tokens, recomputed in the backward "
      f"(default {d.tiled_mlp}: off)")
    a("--loss", choices=LOSSES,
      help="full logits, chunked (tp=1: the output projection and loss over token chunks, "
      "recomputed in the backward) or vocab_parallel (tp>1: logits stay split over tp) "
      f"(default {d.loss})")
    a("--loss-chunk-tokens", type=int,
      help=f"tokens per chunk of --loss chunked (default {d.loss_chunk_tokens})")
    a("--offload-activations", action="store_true",
      help="CUDA: keep saved activations in pinned host memory until the backward (default off)")
    a("--grad-accum", type=int, metavar="K",
      help="micro-steps per optimizer step, the global batch split K ways; gradients synced in "
      f"the last (default {d.grad_accum})")
    a("--eval-every", type=int, metavar="N",
      help=f"held-out loss every N steps and at the last (default {d.eval_every}: off, nothing "
      "held out)")
    a("--eval-batches", type=int, metavar="M",
      help=f"global batches held out from the data for the eval loss (default {d.eval_batches})")
    a("--zero2", action="store_true",
      help="FSDP keeps gathered parameters between forward and backward (ZeRO-2; default off)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", nargs="+", metavar="PATH",
                        help="text files to train on, one document each (default: the Python "
                        "standard library's source)")
    source.add_argument("--synthetic", action="store_true",
                        help="seeded random tokens instead of text, for throughput runs "
                        "(default off)")
    a("--no-pack", dest="pack", action="store_false",
      help="let attention, labels and RoPE positions run across document boundaries (EOT) "
      "(default: each packed document is its own sequence)")
    a("--out",
      help="run directory, new for each run (default runs/MODEL-rRING-uULYSSES-tTP-sSEQ-TIME)")
    a("--ckpt-every", type=int,
      help=f"checkpoint every N steps and at the last, 0: never (default "
      f"{DEFAULT_CHECKPOINT_EVERY})")
    a("--resume", nargs="?", const="latest", metavar="RUN_DIR|CKPT",
      help="continue a run: its directory (settings come from its config.json, flags given again "
      "override them), one of its checkpoints, or with no value the newest run of this "
      "configuration under runs/ (or --out's) (default: a new run)")
    a("--init-from", metavar="RUN_DIR|CKPT",
      help="start a new run from the model weights of a run's newest checkpoint (or the one "
      "given), on any layout, with a fresh optimizer, schedule and step count (to train longer "
      "than a run's --steps); the model flags default to that run's (default: none)")
    a("--reference-metrics", metavar="JSONL",
      help="another run's metrics.jsonl, drawn dashed beside this run's loss curve "
      "(default: none)")
    a("--peak-tflops", type=float,
      help="per-device peak for MFU (default: a known GPU's datasheet value; none on CPU)")
    a("--no-progress", dest="progress", action="store_false",
      help="no progress bar and no per-step lines; metrics.jsonl is still written (default: "
      "progress shown)")


def config_from_args(args) -> TrainConfig:
    """The run's settings: the flags given, over the resumed run's config.json or the defaults."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    defaults = dataclasses.asdict(TrainConfig(out=None))
    return TrainConfig(**run_dir.resolve_settings(given, defaults))


def run_cli(args) -> int:
    config = config_from_args(args)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("importing torch and checking the settings")
    # torch and the trainer load here, not at import: `usp train --help` stays instant
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from usp.training.launcher import describe_failure, launch, resume_hint

    try:
        records = launch(config)
    except ChildFailedError as exc:
        print(f"usp train: a rank failed\n{describe_failure(exc, Path(config.out))}",
              file=sys.stderr)
        return 1
    except SignalException as exc:  # the launcher was told to stop; it stopped its ranks
        print(f"usp train: stopped by {signal.Signals(exc.sigval).name} (and so were its ranks)\n"
              f"{resume_hint(Path(config.out))}", file=sys.stderr)
        return 128 + int(exc.sigval)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summarize(records, config) if records else (
            f"nothing to train: {config.out} has finished its {config.steps} steps; to train "
            f"longer, start a new run from its weights: usp train --init-from {config.out} "
            "--steps N"))
    return 0


LOSS_MEAN_STEPS = 10  # the summary's mean loss is over this many last steps


def summarize(records: list[dict], config: TrainConfig) -> str:
    steady = records[1:] or records  # the first step pays for warm-up and allocation
    tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    step_time = sum(r["step_time_s"] for r in steady) / len(steady)
    if all("mfu" in r for r in steady):
        mfu = f", MFU {sum(r['mfu'] for r in steady) / len(steady):.2%}"
    elif any("mfu_above_peak" in r for r in steady):
        mfu = ", MFU not reported (above 100% of the stated --peak-tflops: the peak is wrong)"
    else:
        mfu = ""  # no stated peak (CPU, or a GPU without a datasheet entry): no MFU
    peak = max(max(r["peak_memory_bytes"]) for r in records)
    out = Path(config.out)
    # one step's loss is one batch's: the mean of the last steps says where the run stands
    last = records[-LOSS_MEAN_STEPS:]
    mean = sum(r["loss"] for r in last) / len(last)
    lines = [
        f"trained steps {records[0]['step']}-{records[-1]['step']}: loss "
        f"{records[0]['loss']:.4f} -> {records[-1]['loss']:.4f} (last step; mean of the last "
        f"{len(last)} steps {mean:.4f}), {tokens_per_s:.0f} tok/s, "
        f"{step_time:.2f} s/step{mfu}, peak memory per rank {peak / 2**30:.2f} GiB",
        f"metrics:     {out / 'metrics.jsonl'}",
        f"plot:        {out / 'loss.png'}",
    ]
    if (out / "checkpoints").is_dir():
        lines.append(f"checkpoints: {out / 'checkpoints'} (resume: usp train --resume {out})")
    return "\n".join(lines)
