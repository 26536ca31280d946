"""``usp bench trainer``: what a usp trainer adds per step, against usp's own loop.

On N spawned CPU ranks, the same tiny Llama is trained on the same batches twice, in alternating
rounds within one run: by the loop of docs/transformers.md (``USPContext.shard``, the model in
DDP, ``USPContext.loss``, SGD) and by ``with_usp(Trainer)`` with the same model, layout, DDP and
SGD. The step time of each is the median over the timed steps of every round (a step's time: from
the end of one optimizer step to the end of the next, the batch's loading and sharding
included); the ratio of the two is the integration's overhead (Trainer bookkeeping, the sharding
of the collator's batch, the agreements and the loss's reductions).

Neither clips gradients and DDP searches no unused parameters in either: those are options of
the Trainer, not costs of the integration.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from usp.launch import launch_ranks


@dataclass(frozen=True)
class TrainerBench:
    nproc: int = 4
    ring: int = 2
    ulysses: int = 2
    layout: str = "zigzag"
    seq_len: int = 2048
    batch: int = 1  # sequences per dp rank and step
    steps: int = 6  # timed steps per round
    warmup: int = 2
    rounds: int = 2
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 2048
    threads: int = 1

    def check(self) -> None:
        if self.nproc % (self.ring * self.ulysses) != 0:
            raise ValueError(f"ring={self.ring} x ulysses={self.ulysses} does not divide "
                             f"--nproc {self.nproc}")
        for name in ("steps", "rounds", "batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")


def _model(bench: TrainerBench):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=bench.vocab, hidden_size=bench.hidden,
                         intermediate_size=4 * bench.hidden, num_hidden_layers=bench.layers,
                         num_attention_heads=bench.heads, num_key_value_heads=bench.kv_heads,
                         max_position_embeddings=bench.seq_len)
    return LlamaForCausalLM(config)


def _samples(bench: TrainerBench, dp: int) -> list[dict]:
    count = (bench.warmup + bench.steps) * bench.batch * dp
    tokens = torch.randint(0, bench.vocab, (count, bench.seq_len),
                           generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in tokens]


def _loop_steps(bench: TrainerBench, samples: list[dict]) -> list[float]:
    """docs/transformers.md's loop: the whole global batch on every rank, rows split by shard."""
    from usp import Topology
    from usp.integrations.transformers import USPContext

    context = USPContext(Topology.build(ring=bench.ring, ulysses=bench.ulysses),
                         layout=bench.layout)
    model = torch.nn.parallel.DistributedDataParallel(context.prepare(_model(bench)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    rows = bench.batch * context.topology.size("dp")
    ends = [time.perf_counter()]
    for start in range(0, len(samples), rows):
        tokens = torch.stack([sample["input_ids"] for sample in samples[start:start + rows]])
        inputs = context.shard(tokens, tokens)
        labels = inputs.pop("labels")
        logits = model(**inputs, usp_context=context, use_cache=False).logits
        # the gradient is this rank's share; DDP averages the shares of every rank
        (context.loss(logits, labels) * dist.get_world_size()).backward()
        optimizer.step()
        optimizer.zero_grad()
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends, ends[1:])][bench.warmup:]


def _trainer_steps(bench: TrainerBench, samples: list[dict], output_dir: str) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from usp.integrations.trainer import USPArguments, with_usp

    ends = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=output_dir, max_steps=bench.warmup + bench.steps, optim="sgd",
        learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=0.0,
        per_device_train_batch_size=bench.batch, logging_steps=10**6, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    usp = USPArguments(ring=bench.ring, ulysses=bench.ulysses, layout=bench.layout)
    trainer = with_usp(Trainer)(model=_model(bench), args=args, train_dataset=samples, usp=usp,
                                callbacks=[StepEnds()])
    trainer.remove_callback(PrinterCallback)  # the benchmark prints its own summary
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])][bench.warmup:]


def _rank_main(bench: TrainerBench) -> dict:
    """One rank (``usp.launch`` started it, with torchrun's environment and the process group):
    the step times of both, in alternating rounds."""
    torch.set_num_threads(bench.threads)
    samples = _samples(bench, bench.nproc // (bench.ring * bench.ulysses))
    loop, trainer = [], []
    with tempfile.TemporaryDirectory() as output_dir:
        for round_index in range(bench.rounds):  # ABBA..., so order and drift hit both
            if round_index % 2 == 0:
                loop += _loop_steps(bench, samples)
            trainer += _trainer_steps(bench, samples, output_dir)
            if round_index % 2 == 1:
                loop += _loop_steps(bench, samples)
    return {"loop": loop, "trainer": trainer}


def run_benchmark(bench: TrainerBench) -> dict:
    """Median step seconds of usp's loop and of the usp trainer, and their ratio."""
    bench.check()
    steps = launch_ranks(bench.nproc, _rank_main, bench, name="usp-bench-trainer")[0]
    loop, trainer = statistics.median(steps["loop"]), statistics.median(steps["trainer"])
    return {"bench": asdict(bench), "loop_step_s": loop, "trainer_step_s": trainer,
            "ratio": trainer / loop, "loop_steps_s": steps["loop"],
            "trainer_steps_s": steps["trainer"]}


def format_result(result: dict, load: tuple[float, float, float]) -> str:
    bench = result["bench"]
    lines = [
        f"usp bench trainer: {bench['nproc']} CPU ranks (gloo, {bench['threads']} thread each), "
        f"ring={bench['ring']} x ulysses={bench['ulysses']}, layout {bench['layout']}, "
        f"S={bench['seq_len']}, {bench['batch']} sequence(s) per dp rank, Llama hidden "
        f"{bench['hidden']} x {bench['layers']} layers, fp32, {bench['rounds']} rounds x "
        f"{bench['steps']} timed steps",
        f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        "(timings need an idle machine)",
        f"  usp loop (docs/transformers.md) {result['loop_step_s'] * 1e3:9.1f} ms/step, median",
        f"  with_usp(Trainer)               {result['trainer_step_s'] * 1e3:9.1f} ms/step, median",
        f"  ratio trainer / loop            {result['ratio']:9.3f}",
    ]
    return "\n".join(lines)
