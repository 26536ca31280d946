"""``usp train``'s first hour: defaults that run, a resume that changes the layout, what the log
and the summary say, and refusals that name their cause. Nothing here starts a rank process
(launching is replaced by a recorder); the runs that train do so in this process."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

import usp.training.launcher
import usp.training.loop
from usp import cli
from usp.cli.train import spec_from_args, summarize
from usp.training.run_dir import RunLock
from tests.specs import run_spec

FLAGS = ["--seq-len", "64", "--synthetic", "--no-progress"]


@pytest.fixture
def launches(monkeypatch) -> list:
    """The configs ``usp train`` would launch rank processes with (none are started)."""
    launched = []

    def record(config, run_dir_locked=False):
        launched.append(config)
        return []

    monkeypatch.setattr(usp.training.launcher, "launch_elastic", record)
    return launched


def test_pipeline_stages_run_with_the_default_global_batch(tmp_path, launches):
    # one row per micro-batch of each dp rank: pp 2 -> 2 micro-batches -> a batch of 2
    assert cli.main(["train", "--nproc", "2", "--pp", "2", *FLAGS, "--out",
                     str(tmp_path / "pp")]) == 0
    assert launches[-1].data.global_batch == 2
    assert cli.main(["train", "--nproc", "4", "--pp", "2", *FLAGS, "--out",
                     str(tmp_path / "pp-dp")]) == 0
    assert launches[-1].data.global_batch == 4  # dp 2 x 2 micro-batches
    assert cli.main(["train", "--nproc", "2", *FLAGS, "--grad-accum", "2", "--out",
                     str(tmp_path / "dp")]) == 0
    assert launches[-1].data.global_batch == 4  # dp 2 x 2 accumulation steps
    # a given batch is kept, and refused with the numbers when it cannot split
    assert cli.main(["train", "--nproc", "2", "--pp", "2", "--global-batch", "3", *FLAGS,
                     "--out", str(tmp_path / "odd")]) == 2


def _saved_run(run: Path, **settings) -> None:
    run.mkdir(parents=True)
    values = run_spec(out=str(run), **settings).nested()
    (run / "config.json").write_text(json.dumps(values))


def test_a_resume_that_gives_a_degree_takes_the_others_from_their_defaults(tmp_path):
    run = tmp_path / "run"
    _saved_run(run, nproc=4, ring=2, ulysses=2, tp=1, seq_len=64)
    parser = cli.build_parser()

    def resumed(*flags):
        return spec_from_args(parser.parse_args(["train", "--resume", str(run), *flags]))

    kept = resumed()
    assert (kept.nproc, kept.parallel.ring, kept.parallel.ulysses) == (4, 2, 2)
    changed = resumed("--ulysses", "4")  # not ring 2 x ulysses 4
    assert (changed.nproc, changed.parallel.ring, changed.parallel.ulysses) == (4, 1, 4)
    fewer = resumed("--nproc", "2", "--ulysses", "2")
    assert (fewer.nproc, fewer.parallel.ring, fewer.parallel.ulysses) == (2, 1, 2)
    more = resumed("--nproc", "8")  # no degree given: the saved ones, dp absorbs the rest
    assert (more.nproc, more.parallel.ring, more.parallel.ulysses, more.parallel.dp) == (8, 2, 2, -1)


# the flat config.json of a run written before the spec had sections (zero2 was its switch)
OLDER_FLAT = {"model": "tiny", "seq_len": 64, "global_batch": 2, "steps": 6, "lr": 0.001,
              "ring": 2, "ulysses": 1, "tp": 1, "pp": 1, "dp": -1, "zero2": True,
              "synthetic": True, "data": [], "nproc": 2, "ckpt_every": 3, "resume": None}


def test_a_run_of_an_older_version_resumes_from_its_flat_config(tmp_path):
    run = tmp_path / "older"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**OLDER_FLAT, "out": str(run)}))
    parser = cli.build_parser()
    spec = spec_from_args(parser.parse_args(["train", "--resume", str(run)]))
    assert (spec.parallel.zero, spec.parallel.ring, spec.optim.lr, spec.data.seq_len) == \
        (2, 2, 0.001, 64)
    (run / "config.json").write_text(json.dumps({**OLDER_FLAT, "zero2": False}))
    assert spec_from_args(parser.parse_args(["train", "--resume", str(run)])).parallel.zero == 3
    # a setting this version does not know: refused, naming the file, the names and the way on
    (run / "config.json").write_text(json.dumps({**OLDER_FLAT, "flash": 1, "zero1": True}))
    with pytest.raises(ValueError, match=r"config.json holds settings this usp does not know: "
                                         r"\['flash', 'zero1'\]; remove them from the file"):
        spec_from_args(parser.parse_args(["train", "--resume", str(run)]))


def test_a_run_writes_its_config_as_the_nested_spec_and_resumes_from_it(tmp_path, launches):
    from usp.spec import RunSpec
    from usp.training import run_dir

    run = tmp_path / "run"
    run.mkdir()
    spec = run_spec(out=str(run), ring=2, zero=2, seq_len=64, synthetic=True, lr=1e-3)
    run_dir.write_settings(run, spec)
    written = json.loads((run / "config.json").read_text())
    assert written["parallel"]["zero"] == 2 and written["optim"]["lr"] == 1e-3
    assert RunSpec.from_nested(written) == spec
    resumed = spec_from_args(cli.build_parser().parse_args(["train", "--resume", str(run)]))
    assert resumed.replace(resume=None) == spec


def test_flags_override_the_config_file_which_overrides_the_resumed_run(tmp_path):
    run = tmp_path / "run"
    _saved_run(run, nproc=2, ring=2, seq_len=64, lr=1e-3, steps=6)
    config = tmp_path / "run.toml"
    config.write_text("[optim]\nlr = 0.002\nsteps = 9\n[data]\nseq_len = 128\n")
    parser = cli.build_parser()

    def spec(*flags):
        return spec_from_args(parser.parse_args(["train", *flags]))

    fresh = spec("--config", str(config), "--steps", "12", "--out", str(tmp_path / "new"))
    assert (fresh.optim.lr, fresh.optim.steps, fresh.data.seq_len, fresh.parallel.ring) == \
        (0.002, 12, 128, 1)
    resumed = spec("--resume", str(run), "--config", str(config), "--steps", "12")
    assert (resumed.optim.lr, resumed.optim.steps, resumed.data.seq_len,
            resumed.parallel.ring) == (0.002, 12, 128, 2)
    config.write_text("[optim]\nlearning_rate = 0.002\n")
    with pytest.raises(ValueError, match=r"--config .*run.toml: unknown settings "
                                         r"\['learning_rate'\]"):
        spec("--config", str(config))


def test_the_summary_reports_the_mean_of_the_last_steps_beside_the_last_loss():
    losses = [4.0] * 5 + [2.8, 2.7, 2.9, 2.8, 2.7, 2.8, 2.9, 2.7, 2.8, 3.99]
    records = [{"step": i + 1, "loss": loss, "tokens_per_s": 100.0, "step_time_s": 1.0,
                "peak_memory_bytes": [2**30]} for i, loss in enumerate(losses)]
    line = summarize(records, Path("runs/x")).splitlines()[0]
    mean = sum(losses[-10:]) / 10
    assert f"4.0000 -> 3.9900 (last step; mean of the last 10 steps {mean:.4f})" in line


def test_the_log_counts_data_and_parameters(tmp_path, caplog, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in (("a.txt", "x" * 300), ("b.txt", "y" * 500), ("c.md", "z" * 199)):
        (corpus / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", "--data", str(corpus), "--seq-len", "64", "--steps", "4",
                         "--global-batch", "2", "--no-progress", "--out", "run"]) == 0
    # 999 bytes + 3 end-of-text tokens; 4 steps x 2 x 64 = 512 tokens seen
    assert "data: 3 documents, 1,002 tokens to train on; 4 steps x 2 x 64 tokens = 512 " \
           "tokens, 0.51 epochs" in caplog.text
    assert "model tiny: 918.7K parameters, initialised from seed 0" in caplog.text
    assert "GiB of parameters" not in caplog.text


def test_a_busy_directory_names_the_run_that_holds_it(tmp_path, capsys, launches):
    out = tmp_path / "run"
    _saved_run(out, seq_len=64)  # the other run has written its settings already
    with RunLock(out):  # held by "another run": this process, through another descriptor
        assert cli.main(["train", *FLAGS, "--nproc", "2", "--ring", "2", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert f"--out {out} is in use by another usp train run (pid {os.getpid()} on " in message
    assert "wait for it to finish or choose another --out" in message
    assert "--resume" not in message and not launches


def test_resuming_a_finished_run_answers_before_starting_anything(tmp_path, capsys, launches,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *FLAGS, "--steps", "2", "--out", "done"]) == 0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(usp.training.loop, "train", no_training)
    capsys.readouterr()
    for flags in ([], ["--nproc", "2", "--ring", "2"]):
        assert cli.main(["train", "--resume", "done", *flags]) == 0
        assert "nothing to train: done has finished its 2 steps; to train longer, start a new " \
               "run from its weights: usp train --init-from done --steps N" \
               in capsys.readouterr().out
    assert not launches
