"""usp trainers (usp.integrations.trainer) vs one plain process training the same data.

The parent runs each case as a plain transformers ``Trainer`` / TRL ``SFTTrainer`` in one process
(fp64, SDPA attention, the Trainer's own count of loss tokens); one spawned 4-rank gloo world then
runs every case as a usp trainer, plus the refusals. Each case compares every logged step loss,
the evaluation loss and every updated weight: fp64 within 1e-10 (docs/testing.md; the logged step
losses pass through the Trainer's fp32 accumulator in both runs, so they agree to fp32's
rounding). Training uses SGD without clipping (tests/trainer_cases.py), so a gradient of the
wrong scale or from the wrong tokens changes the weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate import ParallelismConfig
from transformers import (
    AutoConfig, AutoModelForCausalLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast,
    Trainer, TrainingArguments,
)

from tests.distributed import collect_failures, run_on_ranks
from tests.trainer_cases import (
    Case, build_model, documents, save_tokenizer, set_rank_environment, train,
)

WORLD = 4
CASES = [  # padding, packing and gradient accumulation 2 on ring 2 x ulysses 2 and ulysses 4
    Case("llama", 2, 2, "padding", grad_acc=2),
    Case("llama", 2, 2, "packing", layout="contiguous", ring_layout="zigzag"),
    Case("llama", 1, 4, "packing-cu", layout="stripe"),
    Case("qwen3", 2, 2, "packing", grad_acc=2, fsdp=True),
    Case("qwen3", 1, 4, "padding", grad_acc=2, layout="contiguous"),
    Case("llama", 1, 2, "padding", grad_acc=2),  # dp 2 x ulysses 2
    Case("llama", 2, 2, "sft"),
    Case("qwen3", 1, 4, "sft", grad_acc=2),
    Case("qwen3-moe", 2, 2, "packing", grad_acc=2),  # the router loss joins the loss
]
SAVED = CASES[0]  # its trained model is saved and loaded back in one process


def _dp(case: Case) -> int:
    return WORLD // (case.ring * case.ulysses)


def _usp(case: Case):
    from usp.integrations.trainer import USPArguments

    return USPArguments(ring=case.ring, ulysses=case.ulysses, layout=case.layout,
                        ring_layout=case.ring_layout)


def _recurrent_gemma():
    """A hybrid whose recurrent block usp does not split."""
    config = AutoConfig.for_model(
        "recurrent_gemma", vocab_size=96, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, lru_width=32,
        block_types=["recurrent", "attention"], head_dim=8)
    return AutoModelForCausalLM.from_config(config)


def _refusals(root: Path, tokenizer: Path) -> dict[str, str | None]:
    """Each refusal's message on this rank (None: nothing was raised)."""
    from usp import Topology
    from usp.integrations.trainer import USPArguments, with_usp
    from usp.integrations.trainer_batch import shard_batches
    from usp.integrations.transformers import USPContext

    padding = DataCollatorForLanguageModeling(
        PreTrainedTokenizerFast.from_pretrained(tokenizer), mlm=False)

    def with_token_types(rows):
        batch = padding(rows)
        return {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])}

    case, usp = Case("llama", 2, 2, "padding"), USPArguments(ring=2, ulysses=2)
    args = TrainingArguments(output_dir=str(root / "refused"), use_cpu=True, report_to=[])
    runs = {
        # a key usp cannot split: passed unsplit it would mean something else
        "token_type_ids": lambda: train(case, root / "keys", tokenizer, usp=usp,
                                        collator=with_token_types),
        # accelerate's own context parallelism would split the batch a second time
        "cp_size=2": lambda: train(case, root / "cp", tokenizer, usp=usp,
                                   parallelism_config=ParallelismConfig(cp_size=2)),
        "dispatch_batches=True": lambda: train(case, root / "dispatch", tokenizer, usp=usp,
                                               accelerator_config={"dispatch_batches": True}),
        "compute_metrics": lambda: with_usp(Trainer)(
            model=build_model("llama"), args=args, usp=usp, compute_metrics=lambda p: {}),
        # a state-space layer usp cannot split: swapping the attention alone would be wrong
        "model.layers.0.temporal_block (RecurrentGemmaRecurrentBlock)": lambda: with_usp(
            Trainer)(model=_recurrent_gemma(), args=args, usp=usp),
        # predict() would need the full logits in global order
        "evaluates the loss only": lambda: train(case, root / "predict", tokenizer, usp=usp)[
            "trainer"].predict(documents(3, 2)),
    }
    # a loader that gives each rank of a sequence group its own samples
    context = USPContext(Topology.build(ring=2, ulysses=2))
    runs["read different batches"] = lambda: shard_batches(
        context, [padding(documents(10 + dist.get_rank(), 2).to_list())])
    messages = {}
    for needle, run in runs.items():
        try:
            run()
            messages[needle] = None
        except ValueError as error:
            messages[needle] = str(error)
    return messages


def _world(rank: int, world_size: int, tokenizer: Path, saved_dir: Path) -> dict:
    set_rank_environment(rank, world_size)
    root = Path(tempfile.mkdtemp())
    results, failures = {}, []

    def run(case: Case) -> None:
        result = train(case, root / str(case), tokenizer, usp=_usp(case), dp=_dp(case))
        if case == SAVED:
            result["trainer"].save_model(str(saved_dir))
        weights = result.pop("weights")
        result.pop("trainer")
        # every rank must hold the same weights: the digest of each
        result["digest"] = float(sum(value.double().abs().sum() for value in weights.values()))
        if rank == 0:
            result["weights"] = weights
        results[str(case)] = result

    failures += collect_failures(CASES, run)
    return {"results": results, "failures": failures, "refusals": _refusals(root, tokenizer)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trainer")
    tokenizer = save_tokenizer(root / "tokenizer")
    references = {}
    for case in CASES:
        result = train(case, root / f"reference-{case}", tokenizer, dp=_dp(case))
        result.pop("trainer")
        references[str(case)] = result
    ranks = run_on_ranks(_world, WORLD, tokenizer, root / "saved", timeout_s=900)
    return {"references": references, "ranks": ranks, "saved": root / "saved"}


def test_usp_trainers_train_and_evaluate_like_one_process(runs):
    failures = []
    for rank, outcome in enumerate(runs["ranks"]):
        failures += [f"rank {rank}: {failure}" for failure in outcome["failures"]]
    for case in CASES:
        name, reference = str(case), runs["references"][str(case)]
        got = [outcome["results"].get(name) for outcome in runs["ranks"]]
        if any(result is None for result in got):
            continue  # its failure is reported above
        problems = []
        if len({result["digest"] for result in got}) != 1:
            problems.append(f"ranks hold different weights: {[r['digest'] for r in got]}")
        losses = torch.tensor(got[0]["losses"], dtype=torch.float64)
        expected = torch.tensor(reference["losses"], dtype=torch.float64)
        if losses.shape != expected.shape or not torch.allclose(losses, expected, rtol=1e-6,
                                                                atol=0):
            problems.append(f"step losses {losses.tolist()} != {expected.tolist()}")
        if abs(got[0]["eval_loss"] - reference["eval_loss"]) > 1e-10:
            problems.append(f"eval loss {got[0]['eval_loss']} != {reference['eval_loss']}")
        weight_error = max((got[0]["weights"][key] - value).abs().max().item()
                           for key, value in reference["weights"].items())
        if weight_error > 1e-10:
            problems.append(f"weights differ by {weight_error:.3g}")
        failures += [f"{name}: {problem}" for problem in problems]
    assert not failures, "\n".join(failures)


def test_the_saved_model_is_an_ordinary_folder_that_loads_in_one_process(runs):
    config = json.loads((runs["saved"] / "config.json").read_text())
    assert "usp" not in json.dumps(config), config
    model = AutoModelForCausalLM.from_pretrained(runs["saved"], dtype=torch.float64)
    assert model.config._attn_implementation != "usp"
    trained = runs["ranks"][0]["results"][str(SAVED)]["weights"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    logits = model(torch.arange(6, 20)[None]).logits
    assert torch.isfinite(logits).all()


def test_what_usp_cannot_run_exactly_is_refused_on_every_rank(runs):
    failures = []
    for needle in runs["ranks"][0]["refusals"]:
        for rank, outcome in enumerate(runs["ranks"]):
            message = outcome["refusals"][needle]
            if message is None or needle not in message:
                failures.append(f"rank {rank}, {needle}: {message}")
    assert not failures, "\n".join(failures)
