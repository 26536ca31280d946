"""One Hugging Face Trainer script, two kinds of Ulysses sequence parallelism, side by side:
usp's ``with_usp(Trainer)`` and DeepSpeed's ALST (accelerate's ``ParallelismConfig(sp_backend=
"deepspeed")`` with the DeepSpeed engine), on the same tiny Llama, the same batches, the same
optimizer, fp32, on CPU ranks with gloo.

    # one run: every rank trains, rank 0 prints one JSON line
    torchrun --nproc-per-node 2 scripts/trainer_vs_alst.py --backend usp --sp 2
    torchrun --nproc-per-node 2 scripts/trainer_vs_alst.py --backend alst --sp 2

    # both, in alternating rounds (usp alst usp alst ...), for each --sp; prints the ratio
    python scripts/trainer_vs_alst.py --compare --sp 2 4 --rounds 2

The ALST backend needs ``deepspeed`` (``DS_BUILD_OPS=0 pip install deepspeed``); on a CPU the
script sets ``DS_ACCELERATOR=cpu``, which makes DeepSpeed use gloo. ZeRO stage 0 by default
(``--zero-stage``) and torch's AdamW: DeepSpeed's fused optimizers are not built. Both backends
see the batches in the same order (sequential sampling), so their losses should agree step by
step with each other and with ``--backend plain`` (the Trainer alone, one process). They do
with ``--max-grad-norm 0``; with clipping, ALST's gradients are sp times the one-process
gradient (DeepSpeed sums over the sequence ranks the gradients of a loss that every rank
already holds whole), so clipping scales its steps differently (docs/transformers.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["usp", "alst", "plain"], default="usp",
                        help="plain: the Trainer alone, one process (the reference losses)")
    parser.add_argument("--sp", type=int, nargs="+", default=[2],
                        help="Ulysses degree (= ranks); several with --compare")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per optimizer step")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="gradient clipping (0: none)")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=0,
                        help="DeepSpeed ZeRO stage of the alst backend")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--compare", action="store_true",
                        help="run both backends in alternating rounds, print the ratio")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per backend (--compare)")
    parser.add_argument("--reference", action="store_true",
                        help="with --compare: also train once on one process without sequence "
                             "parallelism and report each backend's loss difference from it")
    return parser.parse_args()


def build_model(seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=seq_len, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"  # ALST wraps the model's own attention, sdpa here
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


class RandomTokens(torch.utils.data.Dataset):
    """Seeded random rows; ``position_ids`` given, since ALST's data adapter requires them."""

    def __init__(self, rows: int, seq_len: int) -> None:
        self.tokens = torch.randint(0, VOCAB, (rows, seq_len),
                                    generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        row = self.tokens[index]
        return {"input_ids": row, "labels": row.clone(),
                "position_ids": torch.arange(len(row))}


def training_arguments(args: argparse.Namespace, sp: int, output_dir: str):
    from transformers import TrainingArguments

    common = dict(
        output_dir=output_dir, max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch, optim="adamw_torch", learning_rate=args.lr,
        weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=args.max_grad_norm,
        train_sampling_strategy="sequential", logging_steps=10**6, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, bf16=False, fp16=False, seed=0,
    )
    if args.backend in ("usp", "plain"):
        return TrainingArguments(**common)
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    deepspeed_config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": args.zero_stage},
        # torch's AdamW is the client optimizer (no compiled DeepSpeed ops on this machine)
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
    }
    parallelism = ParallelismConfig(
        sp_backend="deepspeed", sp_size=sp,
        sp_handler=DeepSpeedSequenceParallelConfig(sp_attn_implementation="sdpa"),
    )
    return TrainingArguments(**common, deepspeed=deepspeed_config,
                             parallelism_config=parallelism)


def train_one(args: argparse.Namespace) -> None:
    """One rank of one run (started by torchrun)."""
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback
    from transformers import logging as transformers_logging
    from transformers.trainer_callback import PrinterCallback

    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    (sp,) = args.sp
    step_ends, losses = [], []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            step_ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    class RecordingTrainer(Trainer):
        def training_step(self, *step_args, **step_kwargs):
            loss = super().training_step(*step_args, **step_kwargs)
            losses.append(loss.item())  # both backends: the step's mean over every label
            return loss

    trainer_class = RecordingTrainer
    extra = {}
    if args.backend == "usp":
        from usp.integrations.trainer import USPArguments, with_usp

        trainer_class = with_usp(RecordingTrainer)
        extra["usp"] = USPArguments(ulysses=sp)
    total_steps = args.warmup + args.steps
    # ALST spreads each group of sp batches over the ranks: keep whole groups of them
    rows = (total_steps + sp) * args.batch
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = trainer_class(model=build_model(args.seq_len),
                                args=training_arguments(args, sp, output_dir),
                                train_dataset=RandomTokens(rows, args.seq_len),
                                callbacks=[StepClock()], **extra)
        trainer.remove_callback(PrinterCallback)
        rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        trainer.train()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dist.get_world_size() != sp:
        raise ValueError(f"--sp {sp} needs {sp} ranks, torchrun started {dist.get_world_size()}")
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (rss_before_kib, peak_kib))
    times = [end - start for start, end in zip(step_ends, step_ends[1:])][args.warmup:]
    if dist.get_rank() == 0:
        step_s = statistics.median(times)
        print(json.dumps({
            "backend": args.backend, "sp": sp, "seq_len": args.seq_len, "batch": args.batch,
            "threads": args.threads, "step_s_median": step_s,
            "tokens_per_s": args.batch * args.seq_len / step_s,
            "max_rss_mib_per_rank": [round(peak / 1024, 1) for _, peak in every],
            "rss_before_train_mib_per_rank": [round(before / 1024, 1) for before, _ in every],
            "step_s": times, "losses": losses,
        }), flush=True)
    # gloo's threads, left running at interpreter exit, sometimes abort a rank ("terminate
    # called without an active exception") after its work is done
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args: argparse.Namespace, backend: str, sp: int) -> dict:
    """One torchrun run of this script; its JSON line, with the load average around it."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={sp}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__,
               "--backend", backend, "--sp", str(sp), "--seq-len", str(args.seq_len),
               "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--lr", str(args.lr), "--max-grad-norm", str(args.max_grad_norm),
               "--zero-stage", str(args.zero_stage)]
    root = str(Path(__file__).resolve().parents[1])
    environment = dict(os.environ, OMP_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu",
                       PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get(
                           "PYTHONPATH")])))
    load_before = os.getloadavg()[0]
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"backend"')]
    if not lines:
        raise RuntimeError(f"{backend} sp={sp} failed (exit {done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    result = json.loads(lines[-1])
    if done.returncode != 0:  # rank 0 printed its line: every step was done, the exit failed
        print(f"{backend} sp={sp}: exit {done.returncode} after the steps:\n"
              f"{done.stderr[-2000:]}", file=sys.stderr, flush=True)
    result["exit_code"] = done.returncode
    result["load_average"] = [load_before, os.getloadavg()[0]]
    return result


def largest_difference(runs: list[dict], others: list[dict]) -> float:
    return max(abs(a - b) for run in runs for other in others
               for a, b in zip(run["losses"], other["losses"], strict=True))


def compare(args: argparse.Namespace) -> None:
    reference = None
    if args.reference:
        reference = launch(args, "plain", 1)
        print(json.dumps(reference), flush=True)
    for sp in args.sp:
        runs = {"usp": [], "alst": []}
        for _ in range(args.rounds):
            for backend in ("usp", "alst"):
                runs[backend].append(launch(args, backend, sp))
                print(json.dumps(runs[backend][-1]), flush=True)
        summary = {"sp": sp, "seq_len": args.seq_len}
        for backend, results in runs.items():
            step_s = statistics.median(t for result in results for t in result["step_s"])
            summary[backend] = {
                "step_s_median": step_s, "tokens_per_s": args.batch * args.seq_len / step_s,
                "max_rss_mib": max(max(r["max_rss_mib_per_rank"]) for r in results),
                "rss_before_train_mib": max(max(r["rss_before_train_mib_per_rank"])
                                            for r in results),
            }
        summary["tokens_per_s_usp_over_alst"] = (summary["usp"]["tokens_per_s"]
                                                 / summary["alst"]["tokens_per_s"])
        # each round's pair ran back to back, under about the same load
        summary["each_round_usp_over_alst"] = [
            alst["step_s_median"] / usp["step_s_median"]
            for usp, alst in zip(runs["usp"], runs["alst"], strict=True)]
        summary["max_loss_difference_usp_alst"] = largest_difference(runs["usp"], runs["alst"])
        if reference is not None:
            for backend, results in runs.items():
                summary[f"max_loss_difference_{backend}_one_process"] = largest_difference(
                    results, [reference])
        loads = [x for results in runs.values() for r in results for x in r["load_average"]]
        summary["load_average_range"] = [min(loads), max(loads)]
        summary["exit_codes"] = [r["exit_code"] for results in runs.values() for r in results]
        print("SUMMARY " + json.dumps(summary), flush=True)


def main() -> None:
    args = parse_args()
    if args.compare:
        compare(args)
        return
    if len(args.sp) != 1:
        raise ValueError(f"--sp takes one degree without --compare, got {args.sp}")
    if args.backend == "plain" and args.sp != [1]:
        raise ValueError(f"--backend plain runs on one process: --sp 1, got --sp {args.sp[0]}")
    if args.backend == "alst":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
        import deepspeed

        # with use_cpu=True accelerate starts gloo but not deepspeed.comm, which ALST's groups
        # need; without use_cpu accelerate finds no device backend and counts one process,
        # so every rank would read every batch
        deepspeed.init_distributed(dist_backend="gloo")
    train_one(args)


if __name__ == "__main__":
    main()
