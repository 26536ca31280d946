"""The planner searches the memory features usp train has (checkpointing kinds, the chunked and
vocabulary-parallel losses, the tiled MLP), charges their recompute, keeps a stated headroom, and
lets --fix name every field of a configuration."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

import pytest

from usp.cli import plan as plan_cli
from usp.plan.config import ParallelConfig, check_config
from usp.plan.cost import estimate
from usp.plan.planner import plan
from usp.plan.presets import get_cluster, get_model
from usp.plan.specs import GIB, Workload, parse_count

TWO_H100_NODES = get_cluster("h100x8", nodes=2)
TWO_A800_NODES = get_cluster("a800x8", nodes=2)
LLAMA3_8B = get_model("llama3-8b")


def test_one_million_tokens_on_16_h100_fit_with_memory_features():
    result = plan(Workload(LLAMA3_8B, parse_count("1m"), 1), TWO_H100_NODES)
    best = result.best  # before the features were searched: "nothing fits ... add GPUs"
    assert best.fits and best.memory_total <= TWO_H100_NODES.usable_bytes
    assert best.config.loss == "chunked"  # 1M tokens of fp32 logits alone exceed the budget
    assert check_config(result.workload, TWO_H100_NODES, best.config) == []


def test_without_need_no_feature_is_used():
    best = plan(Workload(LLAMA3_8B, parse_count("32k"), 1), TWO_A800_NODES).best
    assert best.config.memory_features == ()


@pytest.mark.parametrize("feature", [dict(loss="chunked"), dict(tiled_mlp=4096),
                                     dict(ac="selective"), dict(ac="attention")])
def test_each_feature_costs_time_and_saves_memory(feature):
    # 208K tokens: compute-bound, so no recompute hides under exposed communication
    workload = Workload(LLAMA3_8B, parse_count("208k"), 1)
    plain = ParallelConfig(ring=2, ulysses=8, zero=3)
    with_feature = replace(plain, **feature)
    base, cost = (estimate(workload, TWO_A800_NODES, c) for c in (plain, with_feature))
    assert cost.step_time > base.step_time  # the recompute is charged
    assert cost.memory_total < base.memory_total


def test_equal_times_prefer_fewer_features():
    # the vocabulary-parallel loss recomputes nothing: at tp 2 it ties the full loss in time
    workload = Workload(LLAMA3_8B, parse_count("32k"), 1)
    result = plan(workload, TWO_A800_NODES, fixed={
        "tp": 2, "ring": 2, "ulysses": 4, "zero": 3, "ac": "none", "tiled_mlp": 0,
        "placement": "head-first", "tp_sequence_parallel": True})
    first, second = result.ranked[:2]
    assert first.step_time == pytest.approx(second.step_time)
    assert first.config.loss == "full" and second.config.loss == "vocab_parallel"


CASES = [
    (Workload(LLAMA3_8B, parse_count("208k"), 1), TWO_A800_NODES),
    (Workload(LLAMA3_8B, parse_count("1m"), 1), TWO_H100_NODES),
    (Workload(get_model("llama3-70b"), parse_count("128k"), 1), get_cluster("h100x8", nodes=4)),
    (Workload(get_model("qwen2.5-7b"), parse_count("64k"), 4), get_cluster("l20x8", nodes=2)),
]


@pytest.mark.parametrize("workload, cluster", CASES,
                         ids=["8b-208k-a800x16", "8b-1m-h100x16", "70b-128k-h100x32",
                              "qwen7b-64k-l20x16"])
def test_no_plan_exceeds_memory_minus_reserve_and_headroom(workload, cluster):
    result = plan(workload, cluster)
    budget = (cluster.memory_gib - cluster.reserved_gib - cluster.headroom * cluster.memory_gib)
    assert cluster.headroom >= 0.1 and budget * GIB == pytest.approx(cluster.usable_bytes)
    assert result.ranked
    assert all(cost.memory_total <= budget * GIB for cost in result.ranked)
    assert all(cost.memory_total > budget * GIB for cost in result.too_big)


def test_the_headroom_rejects_a_plan_that_only_fits_the_bare_memory():
    # the selective-checkpointing plan with full fp32 logits at 208K needs 75.4 GiB: it fits
    # 80 GiB minus the 4 reserved, not the budget that keeps 10 % of the memory free
    workload = Workload(LLAMA3_8B, parse_count("208k"), 1)
    config = ParallelConfig(ring=2, ulysses=8, zero=3, ac="selective")
    cost = estimate(workload, TWO_A800_NODES, config)
    assert 68 * GIB < cost.memory_total <= 76 * GIB and not cost.fits
    assert get_cluster("a800x8", headroom=0.0).usable_bytes == 76 * GIB
    assert plan(workload, TWO_A800_NODES).best.memory_total <= 68 * GIB
    with pytest.raises(ValueError, match="headroom=1.5"):
        get_cluster("a800x8", headroom=1.5)


SAMPLE_VALUES = {
    "dp": 1, "tp": 1, "pp": 1, "ring": 2, "ulysses": 8, "zero": 3,
    "tp_sequence_parallel": True, "microbatches": 1, "grad_accum": 1, "ac": "full",
    "placement": "head-first", "pp_schedule": "gpipe", "loss": "chunked",
    "loss_chunk_tokens": 2048, "tiled_mlp": 2048, "layout": "stripe", "ring_layout": "zigzag",
}


def test_every_field_can_be_fixed():
    assert set(SAMPLE_VALUES) == {f.name for f in fields(ParallelConfig)}
    workload = Workload(LLAMA3_8B, parse_count("1m"), 1)
    for name, value in SAMPLE_VALUES.items():
        result = plan(workload, TWO_H100_NODES, fixed={name: value})
        assert result.ranked, f"--fix {name}={value}"
        assert all(getattr(c.config, name) == value for c in result.ranked), name


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="usp")
    plan_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_fix_loss_chunked_and_usp_train_names_on_the_command_line(capsys):
    common = ["plan", "--model", "llama3-8b", "--seq-len", "1m", "--cluster", "h100x8",
              "--nodes", "2", "--top", "3"]
    assert _run([*common, "--fix", "loss=chunked"]) == 0
    out = capsys.readouterr().out
    assert "loss-chunked1024" in out.split("best:")[1].splitlines()[0]
    assert "memory budget per GPU: 80 GiB - 4 reserved - 8.0 headroom (10%) = 68.0 GiB" in out
    # usp train's names: --loss vocab_parallel, --tiled-mlp, --ac full
    common[common.index("1m")] = "208k"
    assert _run([*common, "--fix", "loss=vocab_parallel,tiled_mlp=2048,ac=full,tp=2"]) == 0
    best = capsys.readouterr().out.split("best:")[1].splitlines()[0]
    assert "loss-vocab_parallel" in best and "tiled-mlp2048" in best and " ac-full " in best
    with pytest.raises(ValueError, match="loss='logits'"):
        _run([*common, "--fix", "loss=logits"])
    with pytest.raises(ValueError, match="unknown field 'ckpt'.* the fields are dp, tp, pp"):
        _run([*common, "--fix", "ckpt=full"])


def test_runtime_refusals_are_invalid_configurations():
    workload = Workload(LLAMA3_8B, parse_count("64k"), 1)
    for config, rule in ((ParallelConfig(ring=2, ulysses=8, loss="vocab_parallel"), "tp=1"),
                         (ParallelConfig(tp=2, ring=2, ulysses=4, loss="chunked"), "tp=2"),
                         (ParallelConfig(ring=2, ulysses=8, tiled_mlp=4096, ac="selective"),
                          "recompute the MLP twice")):
        problems = check_config(workload, TWO_A800_NODES, config)
        assert any(rule in p for p in problems), problems
