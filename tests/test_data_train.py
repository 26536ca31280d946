"""``usp train`` on chat data: the log reports the tokens (documents, loss tokens, skipped,
throughput, cache hit), each step records its data time, and a run resumed from a checkpoint
continues with the next unseen sample. (The position is global: tests/test_checkpoint.py resumes
a checkpoint of ring 2 x ulysses 2 under other layouts and world sizes, its data read through
the same batcher, and matches the straight run.)"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import usp.training.loop
from tests.data_helpers import CONVERSATIONS, save_tokenizer, write_jsonl
from usp import cli
from usp.training import metrics


class SimulatedCrash(RuntimeError):
    """Stands for a kill of an in-process run."""


@pytest.fixture
def chat_run(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS] * 12)
    tokenizer = save_tokenizer(tmp_path / "tok")
    return ["--data", str(data), "--chat-field", "messages", "--tokenizer", str(tokenizer),
            "--data-cache", str(tmp_path / "cache"), "--seq-len", "32", "--steps", "5",
            "--ckpt-every", "2", "--lr", "1e-3", "--no-progress"]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics.read_metrics(run / "metrics.jsonl")]


def test_a_chat_run_reports_its_tokens_and_resumes_at_the_next_unseen_sample(
        tmp_path, chat_run, caplog, monkeypatch):
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", *chat_run, "--out", str(tmp_path / "straight")]) == 0
    assert "tokens: 36 documents, 732 tokens, 252 loss tokens, 12 skipped; tokenized in " \
        in caplog.text
    assert "data: 36 documents, 732 tokens to train on; 5 steps x 1 x 32 tokens" in caplog.text
    records = metrics.read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert all(0 <= r["data_s"] <= r["step_time_s"] for r in records)
    state = torch.load(tmp_path / "straight/checkpoints/step_000002/trainer.pt",
                       weights_only=True)["data"]
    assert (state["epoch"], state["index"]) == (0, 2)  # the next unseen window: the third
    assert {key: state["render"][key] for key in ("kind", "field", "loss_on")} == \
        {"kind": "chat", "field": "messages", "loss_on": "assistant"}
    assert len(state["render"]["chat_template_sha256"]) == 64

    caplog.clear()
    original = usp.training.loop.train_step

    def crashing(run, step):
        if step == 4:
            raise SimulatedCrash("killed in step 4")
        return original(run, step)

    with monkeypatch.context() as patch, caplog.at_level(logging.INFO):
        patch.setattr(usp.training.loop, "train_step", crashing)
        with pytest.raises(SimulatedCrash):
            cli.main(["train", *chat_run, "--out", str(tmp_path / "crashed")])
    assert "loss tokens, 12 skipped; cache hit, " in caplog.text  # not tokenized again
    assert cli.main(["train", "--resume", str(tmp_path / "crashed")]) == 0
    assert _losses(tmp_path / "crashed") == _losses(tmp_path / "straight")  # bit for bit
