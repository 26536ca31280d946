"""`usp train`: the elastic launcher end to end against one process, bad input, schedule, metrics.

The launcher test is the only one that starts ``usp train`` as a subprocess (two ranks through
torchrun's elastic launcher); the in-process single-rank run on the same data is its reference.
The multi-rank training loop itself is exercised in one spawned world by ``test_checkpoint.py``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import usp.training.loop
from usp import cli
from usp.training import metrics
from usp.cli.train import summarize
from usp.models.llama import Llama, get_config
from usp.training.loop import train
from usp.training.optim import lr_at_step
from tests.specs import run_spec

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


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> dict:
    """``usp train --nproc 2 --ring 2`` (3 steps, a checkpoint at the last) and the same run in
    this process: the only subprocess launch of this file."""
    tmp_path = tmp_path_factory.mktemp("two-ranks")
    reference_dir = tmp_path / "one-process"
    settings = dict(model="tiny", seq_len=64, global_batch=2, steps=3, warmup=1, data=[CORPUS])
    reference = train(
        run_spec(**settings, out=str(reference_dir), progress=False, peak_tflops=1.0)
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
        capture_output=True, text=True, timeout=600,  # a hang, not a slow machine
    )
    return {"done": done, "out": out, "reference": reference}


def test_usp_train_on_two_ranks_matches_one_process(two_rank_run):
    done, out, reference = (two_rank_run[k] for k in ("done", "out", "reference"))
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
    "slots tp cannot split": (
        ["--nproc", "2", "--tp", "2", "--seq-len", "63"],
        "leaves 63 slots per sequence rank, which tp=2 cannot split",
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
    "resume without a run": (["--resume"], "is not a run directory"),
    "unknown kernel": (["--kernel", "nope"], "--kernel 'nope' is unknown; choose 'auto' or one of"),
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


def _no_ranks(monkeypatch) -> None:
    """Any attempt to start rank processes fails the test."""
    import usp.training.launcher

    def launched(*args, **kwargs):
        raise AssertionError("ranks were started")

    monkeypatch.setattr(usp.training.launcher, "launch_elastic", launched)


def test_an_out_under_a_file_is_refused_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    _no_ranks(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc = cli.main(["train", "--nproc", "2", "--ring", "2", "--seq-len", "64", "--steps", "2",
                   "--synthetic", "--out", str(blocker / "run")])
    assert rc == 2
    message = f"--out {blocker / 'run'} cannot be created: {blocker} is a file"
    assert message in capsys.readouterr().err


def test_a_read_only_out_is_refused_before_any_rank_starts(tmp_path, capsys):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        rc = cli.main(["train", "--nproc", "2", "--ring", "2", "--seq-len", "64", "--steps", "2",
                       "--synthetic", "--out", str(read_only / "run")])
    finally:
        subprocess.run(["umount", str(read_only)], capture_output=True)
    assert rc == 2
    assert f"--out {read_only / 'run'} is not writable" in capsys.readouterr().err


FLAGS = ["--seq-len", "64", "--synthetic", "--no-progress"]


class SimulatedCrash(RuntimeError):
    """Stands for a kill of an in-process run."""


def _crash_in_step(monkeypatch, crash_step: int) -> None:
    original = usp.training.loop.train_step

    def crashing(run, step):
        if step == crash_step:
            raise SimulatedCrash(f"killed in step {step}")
        return original(run, step)

    monkeypatch.setattr(usp.training.loop, "train_step", crashing)


def _losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics.read_metrics(path / "metrics.jsonl")]


def test_the_default_run_writes_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *FLAGS, "--steps", "3"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("tiny-r1-u1-t1-s64-")
    assert (run / "checkpoints/latest").read_text().strip() == "step_000003"


def test_plain_resume_finds_the_timestamped_run_and_reads_its_settings(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.chdir(tmp_path)
    settings = ["--steps", "6", "--ckpt-every", "2", "--lr", "1e-3"]
    assert cli.main(["train", *FLAGS, *settings, "--out", "straight"]) == 0
    with monkeypatch.context() as patch:
        _crash_in_step(patch, 5)
        with pytest.raises(SimulatedCrash):
            cli.main(["train", *FLAGS, *settings])
    # no --out, no --steps, --lr or --ckpt-every: the newest run of "tiny, s64" and its settings
    assert cli.main(["train", "--resume", "--seq-len", "64"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert _losses(run) == _losses(tmp_path / "straight"), "not the same run, step for step"
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 1e-3
    # a flag that would change the schedule is refused, naming both values
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--steps", "8"]) == 2
    refusal = capsys.readouterr().err
    assert "steps=6 in the checkpoint but 8 now" in refusal
    # and it says how to train longer, and why a resume cannot
    assert "the learning-rate schedule spans it" in refusal
    assert "to train longer, start a new run from this one's weights with a fresh optimizer " \
           "and schedule: usp train --init-from" in refusal


def test_a_run_that_failed_before_its_first_checkpoint_restarts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        _crash_in_step(patch, 2)
        with pytest.raises(SimulatedCrash):
            cli.main(["train", *FLAGS, "--steps", "3", "--out", "early"])
    assert cli.main(["train", *FLAGS, "--steps", "3", "--out", "early"]) == 2
    assert "pass --resume early to continue it" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "early"]) == 0
    assert [step for step, _ in _losses(tmp_path / "early")] == [1, 2, 3]
    assert (tmp_path / "early/checkpoints/latest").read_text().strip() == "step_000003"


def test_mfu_only_against_a_stated_peak_and_never_above_100_percent(tmp_path, caplog):
    config = run_spec(model="tiny", seq_len=64, steps=2, synthetic=True, ckpt_every=0,
                         out=str(tmp_path / "no-peak"), progress=False)
    records = train(config)
    assert not any("mfu" in r or "mfu_above_peak" in r for r in records), "a CPU has no peak"
    assert "MFU" not in summarize(records, config.checkpoint.out)
    assert "MFU" not in metrics.format_record(records[0])
    config = config.replace(out=str(tmp_path / "low-peak"), peak_tflops=1e-9)
    with caplog.at_level("WARNING"):
        records = train(config)
    assert all("mfu" not in r and r["mfu_above_peak"] > 1 for r in records)
    assert "of the stated peak of 1e-09 TFLOP/s per device, which is impossible" in caplog.text
    assert "MFU not reported" in summarize(records, config.checkpoint.out)
    assert "MFU invalid" in metrics.format_record(records[0])


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


def _checkpoint_tensors(path: Path, into: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, into)  # our own files, in a test: a full unpickler is fine here
    return torch.load(into, weights_only=False)["model"]


def test_init_from_starts_a_new_run_from_the_weights_on_another_layout(two_rank_run, tmp_path,
                                                                       monkeypatch, capsys):
    source = two_rank_run["out"]  # ring 2 over 2 ranks; the new run: one process
    assert two_rank_run["done"].returncode == 0, two_rank_run["done"].stderr[-4000:]
    saved = _checkpoint_tensors(source / "checkpoints/step_000003", tmp_path / "saved.pt")
    seen = {}
    original = usp.training.loop.train_step

    def first_step_sees(run, step):
        if step == 1:
            seen["weights"] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
            seen["optimizer state"] = len(run.optimizer.state)
        return original(run, step)

    monkeypatch.setattr(usp.training.loop, "train_step", first_step_sees)
    out = tmp_path / "longer"
    # no --model: it comes from the source run; --steps and the schedule are this run's own
    assert cli.main(["train", "--init-from", str(source), "--steps", "2", "--warmup", "2",
                     "--seq-len", "64", "--data", CORPUS, "--no-progress", "--out",
                     str(out)]) == 0
    assert seen["weights"].keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(seen["weights"][name], tensor), name
    assert seen["optimizer state"] == 0, "the optimizer starts fresh"
    records = metrics.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(3e-3 / 2)  # the first warm-up step of a new schedule
    assert json.loads((out / "config.json").read_text())["checkpoint"]["init_from"] == \
        str(source.resolve())

    # another model than the checkpoint's: refused before anything starts, naming the fields
    capsys.readouterr()
    assert cli.main(["train", "--init-from", str(source), "--model", "small", "--seq-len",
                     "64", "--synthetic", "--out", str(tmp_path / "other")]) == 2
    message = capsys.readouterr().err
    assert "this run's model is not the checkpoint's: model.dim=128 in the checkpoint but 512" \
        in message
    assert not (tmp_path / "other").exists()
