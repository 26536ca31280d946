"""Trusting a checkpoint: planted pickles never run, a corrupt file is named, a broken ``latest``
pointer falls back to the newest checkpoint.

One in-process micro run (6 steps, checkpoints 3 and 6) provides the checkpoints; each case works
on a copy. A "planted" checkpoint is what someone else could hand over: any file replaced, and the
manifest rewritten to match (checksums catch corruption, not tampering).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from usp.training import checkpoint
from usp.models.llama import CONFIGS, LlamaConfig
from usp.training.loop import train
from usp.training.setup import TrainConfig

MICRO = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)


@pytest.fixture(autouse=True)
def micro_model(monkeypatch):
    monkeypatch.setitem(CONFIGS, "test-micro", MICRO)


def _config(out: Path, resume: str | None = None) -> TrainConfig:
    return TrainConfig(
        model="test-micro", seq_len=64, global_batch=2, steps=6, warmup=2, ckpt_every=3,
        synthetic=True, seed=3, out=str(out), resume=resume, progress=False,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    CONFIGS["test-micro"] = MICRO
    try:
        out = tmp_path_factory.mktemp("trust") / "run"
        train(_config(out))
    finally:
        del CONFIGS["test-micro"]
    return out


def _rewrite_manifest(directory: Path) -> None:
    """After planting a file: the manifest says what an attacker's would (a valid checksum)."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():  # a checkpoint format without one
        return
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in directory.iterdir() if p.is_file() and p.name != "manifest.json"
    }
    manifest_path.write_text(json.dumps(manifest))


def flip_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes((b + 1) % 256 for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


class _Planted:
    """Unpickling this creates ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _refusal(config: TrainConfig) -> str:
    try:
        train(config)
    except ValueError as exc:
        return str(exc)
    return "no error: the checkpoint was loaded"


def _as_current_format(directory: Path) -> None:
    """The planted checkpoint claims the format this usp reads, so nothing refuses it early."""
    meta = json.loads((directory / "meta.json").read_text())
    (directory / "meta.json").write_text(json.dumps({**meta, "format": checkpoint.FORMAT_VERSION}))


def test_a_planted_metadata_pickle_is_never_unpickled(run, tmp_path):
    marker = tmp_path / "pwned"
    planted = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints/step_000006", planted)
    _as_current_format(planted)
    (planted / ".metadata").write_bytes(torch.serialization.pickle.dumps(_Planted(marker)))
    _rewrite_manifest(planted)
    message = _refusal(_config(tmp_path / "out", str(planted)))
    assert not marker.exists(), "unpickling the planted .metadata ran its code"
    refused = r"was refused, nothing was loaded: .*/\.metadata refers to pathlib\.Path\.touch"
    assert re.search(refused, message), message


def test_a_planted_optimizer_value_is_never_unpickled(run, tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    source = run / "checkpoints/step_000006"
    dcp_to_torch_save(source, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    state["optim"]["param_groups"][0]["lr"] = _Planted(marker)  # a non-tensor value: pickled
    planted = tmp_path / "ckpt"
    with warnings.catch_warnings():  # DCP warns that one process "assumes" no process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=planted, no_dist=True)
    for file in source.iterdir():
        if file.suffix != ".distcp" and file.name != ".metadata":
            shutil.copy(file, planted / file.name)
    _as_current_format(planted)
    _rewrite_manifest(planted)
    message = _refusal(_config(tmp_path / "out", str(planted)))
    assert not marker.exists(), "unpickling the planted optimizer value ran its code"
    assert "value 'optim.param_groups.0.lr' is not plain data and was not loaded" in message


def test_an_explicit_corrupt_checkpoint_is_refused_naming_the_file(run, tmp_path):
    corrupt = tmp_path / "step_000006"
    shutil.copytree(run / "checkpoints/step_000006", corrupt)
    flip_64_bytes(corrupt / "__0_0.distcp")
    out = tmp_path / "out"
    corrupt_file = r"is corrupt, nothing was loaded: .*/__0_0\.distcp has SHA"
    with pytest.raises(ValueError, match=corrupt_file):
        train(_config(out, str(corrupt)))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("pointer", ["deleted", "garbage"])
def test_a_broken_latest_pointer_falls_back_to_the_newest_checkpoint(run, tmp_path, caplog,
                                                                      pointer):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    latest = copy / "checkpoints/latest"
    if pointer == "deleted":
        latest.unlink()
    else:
        latest.write_bytes(b"\xff\xfe not a step \x00")
    with caplog.at_level("INFO"):
        records = train(_config(copy, "latest"))
    assert records == [], "step 6 is the last: resuming it leaves nothing to train"
    text = caplog.text
    assert f"checkpoint pointer {latest}" in text
    assert "resuming from step_000006, the newest checkpoint" in text
    assert f"resumed from {copy / 'checkpoints/step_000006'} at step 6" in text
