"""``usp train --wandb PROJECT --wandb-mode offline``: each step's record logged to a W&B run in
OUT/wandb, read back from W&B's own offline files; a resumed run continues the same W&B run."""

from __future__ import annotations

import json
import struct

import pytest

import usp.training.loop
from usp import cli
from usp.training import metrics

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

FLAGS = ["--seq-len", "64", "--synthetic", "--no-progress", "--wandb", "usp-test",
         "--wandb-mode", "offline", "--steps", "4", "--ckpt-every", "2", "--eval-every", "2"]
BLOCK, HEADER = 32768, 7  # W&B's transaction log: LevelDB-style blocks of records


class SimulatedCrash(RuntimeError):
    """Stands for a kill of an in-process run."""


def _records(path):
    """The protobuf records of one offline run's ``run-ID.wandb`` file."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:HEADER]
    position, parts = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        parts = chunk if kind in (1, 2) else parts + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def _offline_runs(run_dir):
    """``[(run id, config, [history rows])]`` of each offline run under OUT/wandb, in order."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        run_id, config, rows = None, {}, []
        for record in _records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config.update({item.key: json.loads(item.value_json)
                               for item in record.run.config.update})
            elif kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
        runs.append((run_id, config, rows))
    return runs


def test_each_step_is_logged_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    original = usp.training.loop.train_step

    def crashing(run, step):
        if step == 4:
            raise SimulatedCrash("killed in step 4")
        return original(run, step)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:  # steps 1-3 logged, the checkpoint of step 2 kept
        patch.setattr(usp.training.loop, "train_step", crashing)
        with pytest.raises(SimulatedCrash):
            cli.main(["train", *FLAGS, "--out", str(run_dir)])
    assert cli.main(["train", "--resume", str(run_dir)]) == 0

    records = metrics.read_metrics(run_dir / "metrics.jsonl")
    (first_id, config, first), (second_id, _, second) = _offline_runs(run_dir)
    assert first_id == second_id == (run_dir / "wandb-id").read_text()
    assert config["data"]["seq_len"] == 64 and config["logging"]["wandb"] == "usp-test"
    assert [row["train/step"] for row in first] == [1, 2, 3]
    assert [row["train/step"] for row in second] == [3, 4]  # from the checkpoint of step 2
    by_step = {row["train/step"]: row for row in first[:2] + second}
    for record in records:
        row = by_step[record["step"]]
        for tag, field in (("train/loss", "loss"), ("train/lr", "lr"),
                           ("train/grad_norm", "grad_norm"),
                           ("speed/tokens_per_s", "tokens_per_s")):
            assert row[tag] == pytest.approx(record[field], rel=1e-6), (tag, record["step"])
    assert by_step[4]["eval/loss"] == pytest.approx(records[3]["eval_loss"], rel=1e-6)
    assert by_step[1]["memory/peak_gib"] == pytest.approx(
        max(records[0]["peak_memory_bytes"]) / 2**30, rel=1e-6)


def test_a_mode_without_a_project_and_a_planted_id_are_refused(tmp_path, capsys):
    code = cli.main(["train", "--synthetic", "--seq-len", "64", "--steps", "1", "--wandb-mode",
                     "offline", "--out", str(tmp_path / "a")])
    assert code == 2
    assert "--wandb-mode offline without --wandb" in capsys.readouterr().err
    run_dir = tmp_path / "b"
    run_dir.mkdir()
    (run_dir / "wandb-id").write_text("../../elsewhere")
    assert cli.main(["train", *FLAGS, "--steps", "1", "--out", str(run_dir)]) == 2
    assert "not a W&B run id" in capsys.readouterr().err
    assert not (run_dir / "metrics.jsonl").exists()  # refused before the first step
