"""`usp train`: the elastic launcher end to end against one process, bad input, schedule, metrics.

The launcher test is the only one that starts ``usp train`` as a subprocess (two ranks through
torchrun's elastic launcher); the in-process single-rank run on the same data is its reference.
The multi-rank training loop itself is exercised in one spawned world by ``test_checkpoint.py``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from usp import cli, metrics
from usp.models.llama import Llama, get_config
from usp.train import train
from usp.train_setup import TrainConfig, lr_at_step

REPO = Path(__file__).resolve().parents[1]
CORPUS = inspect.getsourcefile(argparse)
# Two ranks sum attention blocks and gradient shards in another order than one process: the
# measured relative loss difference over 3 steps is ~1e-7; 1e-5 still catches any real error.
RTOL = 1e-5


def test_lr_schedule_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    warmup, total, min_ratio = 4, 20, 0.1
    got = [lr_at_step(step, warmup, total, min_ratio) for step in range(total + 1)]
    assert got[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert got[warmup] == pytest.approx(1.0)
    middle = warmup + (total - warmup) // 2
    assert got[middle] == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)
    assert got[total] == pytest.approx(min_ratio)
    assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1 :]))


def test_usp_train_on_two_ranks_matches_one_process(tmp_path):
    reference_dir = tmp_path / "one-process"
    settings = dict(model="tiny", seq_len=64, global_batch=2, steps=3, warmup=1, data=[CORPUS])
    reference = train(
        TrainConfig(**settings, out=str(reference_dir), progress=False, peak_tflops=1.0)
    )
    out = tmp_path / "two-ranks"
    command = [
        sys.executable, "-m", "usp", "train", "--nproc", "2", "--ring", "2", "--model", "tiny",
        "--seq-len", "64", "--global-batch", "2", "--steps", "3", "--warmup", "1",
        "--data", CORPUS, "--out", str(out), "--ckpt-every", "3", "--no-progress",
        "--peak-tflops", "1", "--reference-metrics", str(reference_dir / "metrics.jsonl"),
    ]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": path},
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "trained steps 1-3" in done.stdout

    records = metrics.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for mine, expected in zip(records, reference, strict=True):
        assert math.isclose(mine["loss"], expected["loss"], rel_tol=RTOL), (mine, expected)
        assert math.isclose(mine["grad_norm"], expected["grad_norm"], rel_tol=1e-4)
        assert mine["lr"] == pytest.approx(expected["lr"])
    flops_per_token = Llama(get_config("tiny")).flops_per_token(64)
    for record in records:
        assert record["tokens"] == 2 * 64
        assert len(record["peak_memory_bytes"]) == 2 and min(record["peak_memory_bytes"]) > 0
        assert record["step_time_s"] > 0
        assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["step_time_s"])
        # MFU against the given peak of 1 TFLOP/s per device, over 2 devices
        assert record["mfu"] == pytest.approx(
            record["tokens_per_s"] * flops_per_token / (2 * 1e12)
        )
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000003"


def _snapshot(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


BAD_INPUT = {
    "sequence the layout cannot split": (
        ["--nproc", "4", "--ring", "2", "--ulysses", "2", "--seq-len", "102"],
        "sequence length 102 cannot be split by layout 'zigzag' over ring=2 x ulysses=2",
    ),
    "heads ulysses cannot divide": (
        ["--nproc", "3", "--ulysses", "3", "--seq-len", "96"],
        "n_heads=8 is not divisible by tp=1 x ulysses=3",
    ),
    "heads tp cannot divide": (
        ["--nproc", "3", "--tp", "3", "--seq-len", "96"], "n_heads=8 is not divisible by tp=3"
    ),
    "global batch dp cannot divide": (
        ["--nproc", "2", "--global-batch", "3"],
        "--global-batch=3 is not divisible by dp=2",
    ),
    "missing data path": (
        ["--data", "/nonexistent/corpus.txt"],
        "data path '/nonexistent/corpus.txt' does not exist",
    ),
    "resume without a checkpoint": (["--resume"], "has no checkpoint"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gets_a_clear_message_and_writes_nothing(case, tmp_path, capsys):
    arguments, message = BAD_INPUT[case]
    out = tmp_path / "run"
    rc = cli.main(["train", "--seq-len", "64", "--steps", "2", "--out", str(out), *arguments])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_previous_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = _snapshot(out)
    rc = cli.main(["train", "--seq-len", "64", "--steps", "2", "--out", str(out)])
    assert rc == 2
    assert "holds a previous run" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_cpu_peak_memory_sees_a_step_allocation_and_resets():
    device = torch.device("cpu")
    metrics.release_freed_memory(device)
    metrics.reset_peak_memory(device)
    before = metrics.current_memory_bytes(device)
    block = torch.ones(16 * 2**20)  # 64 MiB, touched so it is resident
    peak = metrics.peak_memory_bytes(device)
    assert peak - before >= 60 * 2**20
    del block
    metrics.release_freed_memory(device)
    metrics.reset_peak_memory(device)
    assert metrics.peak_memory_bytes(device) - before < 32 * 2**20
