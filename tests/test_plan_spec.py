"""The planner speaks the run spec: ``usp plan --emit`` writes its pick as a spec ``usp train
--config`` runs, ``usp plan --config run.toml`` costs a spec, and every configuration the search
offers is one usp train runs (usp.plan.spec_io)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from usp.choices import MESH_ORDERS
from usp.cli import plan as plan_cli
from usp.plan import config as plan_config
from usp.plan.config import ParallelConfig, check_config
from usp.plan.cost import estimate
from usp.plan.planner import enumerate_configs, plan
from usp.plan.presets import get_cluster, get_model
from usp.plan.spec_io import from_run_spec, model_settings, to_run_spec
from usp.plan.specs import Workload
from usp.spec import RunSpec, read_toml, to_toml

REPOSITORY = Path(__file__).resolve().parents[1]
CPU4 = get_cluster("cpu", gpus_per_node=4)
TINY = ["--model", "tiny", "--seq-len", "1024", "--cluster", "cpu", "--gpus-per-node", "4"]


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="usp")
    plan_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _written(path: Path) -> RunSpec:
    return RunSpec.from_flat(read_toml(path))


def test_emit_writes_the_pick_as_a_run_spec(tmp_path, capsys):
    path = tmp_path / "run.toml"
    assert _run(["plan", *TINY, "--emit", str(path)]) == 0
    out = capsys.readouterr().out
    # what the planner meant: its pick for the same workload, as a spec
    workload = Workload(get_model("tiny"), 1024, 1, dtype="fp32")  # CPU ranks train in fp32
    best = plan(workload, CPU4).best
    meant = to_run_spec(best.config, workload, CPU4, model_settings("tiny"))
    assert _written(path) == meant
    assert f"best: {best.config.label()}" in out
    # the header says what was planned
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert re.match(r"# usp plan, \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC: tiny \(", header[0])
    assert "1,024 tokens x 1 per step, fp32" in header[0]
    assert "cluster cpu: 1 x 4 CPU ranks" in header[1]
    assert f"configuration: {best.config.label()}" in header[2]
    assert (f"predicted: {best.step_time:.3f} s per step" in header[3]
            and f"MFU {100 * best.mfu:.1f}%" in header[3] and "GiB per GPU" in header[3])
    # the sections usp train reads, with the pick's values
    spec = _written(path)
    assert (spec.parallel.ring, spec.parallel.ulysses, spec.parallel.tp, spec.parallel.pp,
            spec.parallel.dp) == (best.config.ring, best.config.ulysses, best.config.tp,
                                  best.config.pp, best.config.dp)
    assert spec.parallel.zero == (best.config.zero if best.config.shard_size > 1 else 3)
    assert (spec.model.model, spec.model.hf_config, spec.model.dtype) == ("tiny", None, "fp32")
    assert (spec.data.seq_len, spec.data.global_batch) == (1024, 1)
    assert (spec.nproc, spec.device) == (4, "cpu")
    assert spec.memory.ac == best.config.ac and spec.optim.grad_accum == best.config.grad_accum
    # and the commands that run it
    assert f"usp train --config {path}" in out
    assert f"torchrun --nnodes 1 --nproc-per-node 4 -m usp train --config {path}" in out


def test_emit_names_torchrun_for_several_nodes(tmp_path, capsys):
    path = tmp_path / "run.toml"
    assert _run(["plan", "--model", "llama3-8b", "--seq-len", "208k", "--cluster", "a800x8",
                 "--nodes", "2", "--top", "1", "--emit", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint "
            f"HOST:29500 -m usp train --config {path}") in out
    spec = _written(path)
    assert spec.nproc == 8 and spec.device == "cuda" and spec.model.dtype == "bf16"
    assert spec.parallel.ring * spec.parallel.ulysses * spec.parallel.dp == 16
    assert "cluster a800x8: 2 x 8 GPUs" in path.read_text()


def test_every_searched_configuration_is_runnable_and_a_spec_round_trip():
    workload = Workload(get_model("tiny"), 1024, 4, dtype="fp32")
    cluster = get_cluster("cpu", gpus_per_node=8)
    configs = enumerate_configs(workload, cluster)
    assert configs
    for config in configs:
        # what usp train runs: FSDP (ZeRO 2 or 3) when anything is sharded, TP-sp, 1F1B only
        # with a micro-batch per stage, accumulation only without a pipeline
        assert config.zero in ((2, 3) if config.shard_size > 1 else (0,)), config
        assert config.tp_sequence_parallel, config
        assert config.pp_schedule == "1f1b" or config.microbatches < config.pp, config
        assert config.grad_accum == 1 or config.pp == 1, config
        if check_config(workload, cluster, config):
            continue
        spec = to_run_spec(config, workload, cluster, model_settings("tiny"))
        assert from_run_spec(spec, cluster) == (config, workload), config.label()
    searched = {(c.zero, c.pp_schedule) for c in configs}
    assert {(2, "1f1b"), (3, "1f1b"), (0, "1f1b"), (2, "gpipe")} <= searched


def test_fixing_what_usp_train_cannot_run_says_why():
    workload = Workload(get_model("tiny"), 1024, 1, dtype="fp32")
    for fixed in ({"zero": 1}, {"tp": 2, "tp_sequence_parallel": False}):
        with pytest.raises(ValueError, match="offers what usp train runs: zero 2 or 3"):
            plan(workload, CPU4, fixed).best


def test_a_spec_survives_toml(tmp_path):
    config = ParallelConfig(dp=2, tp=2, pp=2, microbatches=4, zero=2, ac="attention",
                            loss="vocab_parallel", tiled_mlp=512, layout="stripe")
    workload = Workload(get_model("tiny"), 2048, 8, dtype="fp32")
    cluster = get_cluster("cpu", gpus_per_node=8)
    spec = to_run_spec(config, workload, cluster, model_settings("tiny"))
    (tmp_path / "run.toml").write_text(to_toml(spec, "a header"))
    assert _written(tmp_path / "run.toml") == spec
    assert from_run_spec(spec, cluster) == (config, workload)


def test_config_costs_a_run_spec_and_flags_beside_it_override(tmp_path, capsys):
    # what a user writes: dp, microbatches, global batch and dtype left to usp train's defaults
    spec = RunSpec().replace(ulysses=2, pp=2, ac="selective", seq_len=2048, device="cpu",
                             zero=2)
    path = tmp_path / "run.toml"
    path.write_text(to_toml(spec))
    assert _run(["plan", "--config", str(path), "--cluster", "cpu", "--gpus-per-node", "4",
                 "--json"]) == 0
    costed = json.loads(capsys.readouterr().out)
    # dp fills the cluster, one micro-batch per stage, one row per micro-batch of each dp rank
    expected = ParallelConfig(ulysses=2, pp=2, microbatches=2, zero=2, ac="selective",
                              layout="stripe")
    workload = Workload(get_model("tiny"), 2048, 2, dtype="fp32")
    assert costed["config"] == dataclasses.asdict(expected)
    assert costed["step_time_s"] == pytest.approx(estimate(workload, CPU4, expected).step_time)
    assert _run(["plan", "--config", str(path), "--cluster", "cpu", "--gpus-per-node", "4",
                 "--seq-len", "4096", "--global-batch", "4"]) == 0
    assert "tiny, 4,096 tokens x 4 (fp32)" in capsys.readouterr().out
    # the costed spec can be written back with its other settings kept
    again = tmp_path / "again.toml"
    assert _run(["plan", "--config", str(path), "--cluster", "cpu", "--gpus-per-node", "4",
                 "--emit", str(again)]) == 0
    assert _written(again) == spec.replace(dp=1, microbatches=2, global_batch=2,
                                           dtype="fp32", nproc=4)


def test_config_refuses_what_the_planner_cannot_cost(tmp_path):
    for ac, message in (("attention,mlp", "lists of kinds such as 'attention,mlp' are not "
                                          "costed"),
                        ("block", "'block' is 'full'")):
        path = tmp_path / "run.toml"
        path.write_text(to_toml(RunSpec().replace(ulysses=4, ac=ac, seq_len=1024)))
        with pytest.raises(ValueError, match=re.escape(message)):
            _run(["plan", "--config", str(path), "--cluster", "cpu", "--gpus-per-node", "4"])
    path.write_text(to_toml(RunSpec().replace(ulysses=4, seq_len=1024, hf_config="tiny-qwen2")))
    with pytest.raises(ValueError, match="reads a model's shapes from a config.json"):
        _run(["plan", "--config", str(path), "--cluster", "cpu", "--gpus-per-node", "4"])


def test_emit_refuses_a_model_usp_train_does_not_build(tmp_path):
    path = tmp_path / "run.toml"
    with pytest.raises(ValueError, match="usp train does not build 'llama2-7b'.*--model "
                                         "PATH/config.json.*hf_config = PATH"):
        _run(["plan", "--model", "llama2-7b", "--seq-len", "32k", "--emit", str(path)])
    assert not path.exists()
    with pytest.raises(ValueError, match="causal language models"):
        _run(["plan", *TINY, "--non-causal", "--emit", str(path)])
    with pytest.raises(ValueError, match="is invalid: zero=1 with dp x ring x ulysses = 4: usp "
                                         "train shards"):
        _run(["plan", *TINY, "--config", "ulysses=4,zero=1", "--emit", str(path)])
    with pytest.raises(ValueError, match="does not fit .* no run spec written"):
        _run(["plan", *TINY, "--memory-gib", "1.01", "--reserved-gib", "1", "--headroom", "0",
              "--config", "ulysses=4,zero=3", "--emit", str(path)])
    assert not path.exists()


def test_emit_names_a_hugging_face_config(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
        "model_type": "llama"}))
    path = tmp_path / "run.toml"
    assert _run(["plan", "--model", str(folder), "--seq-len", "1024", "--cluster", "cpu",
                 "--gpus-per-node", "2", "--emit", str(path)]) == 0
    spec = _written(path)
    assert spec.model.hf_config == str(folder.resolve()) and spec.model.hf_model is None
    config, workload = from_run_spec(spec, get_cluster("cpu", gpus_per_node=2))
    assert workload.model == get_model(str(folder))
    capsys.readouterr()


def test_one_mesh_order_for_the_planner_and_the_topology():
    from usp.topology import _mesh_axis_order

    assert plan_config.MESH_ORDERS is MESH_ORDERS
    for placement, order in MESH_ORDERS.items():
        assert _mesh_axis_order(placement) == order


def test_the_emitted_spec_passes_usp_trains_checks(tmp_path, capsys):
    """usp train validates the emitted settings (no ranks started) for picks of several shapes:
    ZeRO 2 and 3, a pipeline, tensor parallelism with the vocabulary-parallel loss."""
    from usp.training.setup import validate

    for fix in ("", "pp=2", "tp=2,loss=vocab_parallel", "zero=3,ulysses=2"):
        path = tmp_path / "run.toml"
        assert _run(["plan", *TINY, "--global-batch", "4", "--fix", fix,
                     "--emit", str(path)]) == 0
        spec = _written(path)
        validate(spec.replace(out=str(tmp_path / "run")), spec.nproc)
    capsys.readouterr()


def test_plan_emit_then_usp_train_config_runs_on_four_cpu_ranks(tmp_path):
    path, out = tmp_path / "run.toml", tmp_path / "run"
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}

    def usp(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "usp", *argv], cwd=tmp_path,
                              env=environment, capture_output=True, text=True, timeout=600)

    planned = usp("plan", *TINY, "--emit", str(path))
    assert planned.returncode == 0, planned.stderr
    trained = usp("train", "--config", str(path), "--nproc", "4", "--steps", "2",
                  "--out", str(out))
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r][-1] == 2
    config = json.loads((out / "config.json").read_text())
    spec = _written(path)
    for name in ("ring", "ulysses", "tp", "pp", "ac", "loss", "seq_len"):
        assert RunSpec.from_nested(config).flat()[name] == spec.flat()[name], name
