"""Trusting a checkpoint: planted pickles never run, an index that names files outside the
checkpoint (or a FIFO, or bytes past a file's end) is refused before anything is read, a tampered
trainer step is refused before anything is written, a corrupt file is named, a broken ``latest``
pointer falls back to the newest checkpoint.

One in-process micro run (6 steps, checkpoints 3 and 6) provides the checkpoints; each case works
on a copy. A "planted" checkpoint is what someone else could hand over: any file replaced, and the
manifest rewritten to match (checksums catch corruption, not tampering).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import pickle
import re
import shutil
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from torch.distributed.checkpoint import FileSystemReader

from usp.training import checkpoint
from usp.training.metrics import read_metrics
from usp.models.llama import CONFIGS, LlamaConfig
from usp.training.loop import train
from usp.spec import RunSpec
from tests.specs import run_spec

MICRO = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)


@pytest.fixture(autouse=True)
def micro_model(monkeypatch):
    monkeypatch.setitem(CONFIGS, "test-micro", MICRO)


def _config(out: Path, resume: str | None = None) -> RunSpec:
    return run_spec(
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


def _refusal(config: RunSpec) -> str:
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


# ------------------------------------------------------------------------------ the index's paths
def plant_storage(directory: Path, change) -> None:
    """Rewrite ``.metadata`` with ``change(storage_info)`` applied to every storage entry (as a
    hostile checkpoint could: the index is data), and the manifest to match."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metadata = FileSystemReader(directory).read_metadata()  # our own file, in a test
    metadata.storage_data = {index: change(info) for index, info in metadata.storage_data.items()}
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    _rewrite_manifest(directory)


def unblock_after(fifo: Path, seconds: float) -> threading.Event:
    """A guard against a hang on a FIFO: after ``seconds``, open it for reading and writing
    (which never blocks) for a moment, so that code blocked opening it, for either end, goes on
    and fails instead of waiting forever. Set the returned event to stop the guard."""
    done = threading.Event()

    def opener():
        deadline = time.monotonic() + seconds
        while not done.wait(0.5):
            if time.monotonic() > deadline:
                fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
                time.sleep(0.5)
                os.close(fd)

    threading.Thread(target=opener, daemon=True).start()
    return done


@pytest.mark.parametrize("planted", ["outside", "missing", "fifo", "past the end"])
def test_an_index_entry_outside_the_checkpoint_is_refused_before_reading(run, tmp_path, planted):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    directory = copy / "checkpoints/step_000006"
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(directory / "__0_0.distcp", outside / "__0_0.distcp")  # a readable copy
    if planted == "fifo":
        os.mkfifo(outside / "fifo")
    name = {"outside": "../../../outside/__0_0.distcp", "missing": "../../../nowhere/__0_0.distcp",
            "fifo": "../../../outside/fifo", "past the end": "__0_0.distcp"}[planted]
    if planted == "past the end":
        plant_storage(directory, lambda info: dataclasses.replace(info, offset=info.offset + 10**9))
    else:
        plant_storage(directory, lambda info: dataclasses.replace(info, relative_path=name))
    metrics_before = (copy / "metrics.jsonl").read_bytes()
    guard = unblock_after(outside / "fifo", 60) if planted == "fifo" else None
    try:
        message = _refusal(_config(tmp_path / "branch", str(directory)))
    finally:
        if guard is not None:
            guard.set()
    assert f"checkpoint {directory} was refused, nothing was loaded: {directory / '.metadata'} " \
           "entry " in message, message
    if planted == "past the end":
        assert "which holds" in message and "bytes" in message
    else:
        assert f"names {name!r}, which is no file name of the checkpoint's own folder" in message
    assert str(outside) not in message.replace(name, "")
    assert (copy / "metrics.jsonl").read_bytes() == metrics_before
    assert not (tmp_path / "branch" / "checkpoints").exists()


def test_a_tampered_trainer_step_is_refused_and_the_metrics_are_kept(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    directory = copy / "checkpoints/step_000006"
    state = torch.load(directory / "trainer.pt", weights_only=True)
    torch.save({**state, "step": -3}, directory / "trainer.pt")
    _rewrite_manifest(directory)
    before = read_metrics(copy / "metrics.jsonl")
    message = _refusal(_config(copy, "latest"))
    assert f"{directory / 'trainer.pt'}: step -3 is not a step of this run (0 to --steps=6)" \
        in message, message
    assert "was refused, nothing was loaded" in message
    assert read_metrics(copy / "metrics.jsonl") == before, "the refused resume rewrote the metrics"
