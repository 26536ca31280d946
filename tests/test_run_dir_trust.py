"""A run directory someone else could have prepared: links, FIFOs and edited files in it.

Every case runs the ``usp`` command in this process (one rank, a micro model). A "victim" is a
file outside the run that a planted link points at: it must keep its content, and the command
must refuse in one line (exit code 2) naming the planted entry, before training anything. On a
resume the planted run is a copy of one real run (2 steps, checkpoints 1 and 2; step 2 removed,
so that the resume would train, log, plot and save again).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.test_checkpoint_trust import unblock_after
from usp import cli
from usp.models.llama import CONFIGS, LlamaConfig

MICRO = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
FLAGS = ["--nproc", "1", "--model", "test-micro", "--seq-len", "64", "--synthetic",
         "--no-progress"]
PRECIOUS = "precious: must never be overwritten\n"


@pytest.fixture(autouse=True)
def micro_model(monkeypatch):
    monkeypatch.setitem(CONFIGS, "test-micro", MICRO)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    CONFIGS["test-micro"] = MICRO
    try:
        run = tmp_path_factory.mktemp("saved") / "run"
        assert cli.main(["train", *FLAGS, "--steps", "2", "--ckpt-every", "1",
                         "--out", str(run)]) == 0
    finally:
        del CONFIGS["test-micro"]
    shutil.rmtree(run / "checkpoints/step_000002")
    (run / "checkpoints/latest").write_text("step_000001\n")
    return run


def _victim(tmp_path: Path, name: str = "victim") -> Path:
    victim = tmp_path / name
    victim.write_text(PRECIOUS)
    return victim


def _refused(capsys, arguments: list[str]) -> str:
    rc = cli.main(["train", *arguments])
    error = capsys.readouterr().err
    assert rc == 2, error[-3000:]
    assert error.count("\n") == 1, f"not one line: {error[-3000:]}"
    return error


@pytest.mark.parametrize("name", [".lock", "config.json.tmp", "loss.png"])
def test_a_new_run_never_writes_through_a_planted_link(name, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    victim = _victim(tmp_path)
    (out / name).symlink_to(victim)
    error = _refused(capsys, [*FLAGS, "--steps", "1", "--ckpt-every", "0", "--out", str(out)])
    assert f"{out / name} is a symbolic link" in error
    assert victim.read_text() == PRECIOUS
    assert sorted(p.name for p in out.iterdir()) == [name], "the run wrote into its directory"


def test_a_resume_never_writes_through_planted_temporary_names(saved_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run, symlinks=True)
    names = [".lock", "config.json.tmp", "metrics.jsonl.tmp", "loss.png", "checkpoints/latest.tmp"]
    victims = {}
    for index, name in enumerate(names):
        victims[name] = _victim(tmp_path, f"victim{index}")
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victims[name])
    error = _refused(capsys, ["--resume", str(run)])
    assert "is a symbolic link" in error and str(run) in error
    for name, victim in victims.items():
        assert victim.read_text() == PRECIOUS, f"written through {name}"
        assert (run / name).is_symlink()  # left as it was: nothing replaced it either


def test_a_resume_never_reads_or_writes_the_run_files_through_links(saved_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.move(run / name, outside / name)
        (run / name).symlink_to(outside / name)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    error = _refused(capsys, ["--resume", str(run)])
    assert f"{run / 'config.json'} is a symbolic link" in error
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_a_latest_pointer_linked_elsewhere_is_refused_without_echoing_it(saved_run, tmp_path,
                                                                         capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run, symlinks=True)
    secret = tmp_path / "secret"
    secret.write_text("SECRET-FIRST-LINE of a file outside the run\n")
    (run / "checkpoints/latest").unlink()
    (run / "checkpoints/latest").symlink_to(secret)
    error = _refused(capsys, ["--resume", str(run)])
    assert f"{run / 'checkpoints/latest'} is a symbolic link" in error
    assert "SECRET" not in error + caplog.text
    assert secret.read_text().startswith("SECRET")


@pytest.mark.parametrize("what", ["the run directory", "checkpoints", "a step directory"])
def test_directories_linked_elsewhere_are_refused(what, saved_run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(saved_run, elsewhere, symlinks=True)
    run = tmp_path / "run"
    if what == "the run directory":
        run.symlink_to(elsewhere)
        entry = run
    else:
        shutil.copytree(saved_run, run, symlinks=True)
        entry = run / "checkpoints"
        if what == "checkpoints":
            shutil.rmtree(entry)
        else:
            entry = entry / "step_000003"
        entry.symlink_to(elsewhere / ("checkpoints" if what == "checkpoints"
                                      else "checkpoints/step_000001"))
    before = sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*"))
    error = _refused(capsys, ["--resume", str(run)])
    assert f"{entry} is a symbolic link" in error
    assert sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*")) == before


def test_a_fifo_in_place_of_a_run_file_is_refused(saved_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run, symlinks=True)
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    guard = unblock_after(run / "metrics.jsonl", 60)
    try:
        error = _refused(capsys, ["--resume", str(run)])
    finally:
        guard.set()
    assert f"{run / 'metrics.jsonl'} is a FIFO" in error


def test_edited_settings_and_metrics_are_refused_in_one_line(saved_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run, symlinks=True)
    settings = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**settings, "seq_len": "64"}))
    error = _refused(capsys, ["--resume", str(run)])
    assert "setting seq_len='64' is not of type int" in error
    (run / "config.json").write_text(json.dumps(settings))
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"loss": 1.0}\n')
    error = _refused(capsys, ["--resume", str(run)])
    assert f"{run / 'metrics.jsonl'} line 3 is not a metrics record" in error
