"""``usp train --tensorboard``: each step's record as TensorBoard scalars in OUT/tensorboard, read
back with TensorBoard's own event reader; a resumed run hides what the stopped run wrote past
its checkpoint, as ``metrics.jsonl`` is truncated."""

from __future__ import annotations

import pytest

import usp.training.loop
from usp import cli
from usp.training import metrics

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

FLAGS = ["--seq-len", "64", "--synthetic", "--no-progress", "--tensorboard", "--steps", "4",
         "--ckpt-every", "2", "--eval-every", "2"]


class SimulatedCrash(RuntimeError):
    """Stands for a kill of an in-process run."""


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_the_scalars_are_the_records_and_a_resume_replaces_the_steps_it_repeats(tmp_path,
                                                                                monkeypatch):
    original = usp.training.loop.train_step

    def crashing(run, step):
        if step == 4:
            raise SimulatedCrash("killed in step 4")
        return original(run, step)

    with monkeypatch.context() as patch:  # steps 1-3 logged, the checkpoint of step 2 kept
        patch.setattr(usp.training.loop, "train_step", crashing)
        with pytest.raises(SimulatedCrash):
            cli.main(["train", *FLAGS, "--out", str(tmp_path / "run")])
    assert [s for s, _ in _scalars(tmp_path / "run")["train/loss"]] == [1, 2, 3]
    assert cli.main(["train", "--resume", str(tmp_path / "run")]) == 0

    records = metrics.read_metrics(tmp_path / "run" / "metrics.jsonl")
    scalars = _scalars(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for tag, field in (("train/loss", "loss"), ("train/lr", "lr"),
                       ("train/grad_norm", "grad_norm"), ("speed/tokens_per_s", "tokens_per_s")):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
        for (step, value), record in zip(scalars[tag], records):
            assert value == pytest.approx(record[field], rel=1e-6), (tag, step)
    assert [s for s, _ in scalars["eval/loss"]] == [2, 4]
    assert scalars["eval/loss"][1][1] == pytest.approx(records[3]["eval_loss"], rel=1e-6)
    peak = max(records[0]["peak_memory_bytes"]) / 2**30
    assert scalars["memory/peak_gib"][0][1] == pytest.approx(peak, rel=1e-6)
