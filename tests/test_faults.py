"""Faults of whole ``usp train`` runs: a killed rank, SIGTERM during a save, a full disk, a corrupt
shard, two runs into one directory (planted pickles and broken pointers: test_checkpoint_trust.py).

One chain of ``usp train`` runs (2 gloo ranks, ring 2, a micro model, 12 steps, a checkpoint every
3) goes through every fault, then must reproduce the uninterrupted run bit for bit:

1. two identical runs start at once into one ``--out``: one trains (the reference), the other is
   refused before it starts, naming the run that holds the directory; while it trains, every
   socket its processes listen on is on 127.0.0.1;
2. the faulty run: rank 1 is killed with SIGKILL in step 5 (checkpoint 3 saved);
3. ``--resume RUN``: SIGTERM reaches the launcher while step 6 is being saved;
4. ``--resume RUN`` on a full disk (a 32 MiB tmpfs, filled before the save of step 9; skipped
   where tmpfs cannot be mounted);
5. 64 random bytes in the middle of a shard of the newest checkpoint (6), then ``--resume RUN``:
   it falls back to checkpoint 3 and trains to the end;
6. on a copy of the finished run, the index of checkpoint 12 names a FIFO outside the checkpoint
   (its manifest rewritten to match): ``--resume`` is refused, naming the entry, and nothing
   waits on the FIFO.

Faults are injected by ``fault_main.py`` (written below), the ``usp`` command with patches applied
at import: multiprocessing's spawn re-imports the main script in every rank, so they reach the
ranks too. Each run that fails must end with a clear message; a guard kills it (the launcher and
every rank) if it has not ended 60 s after its fault fired, and the test fails.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.test_checkpoint_trust import flip_64_bytes, plant_storage
from usp.training.metrics import read_metrics
from usp.models.llama import CONFIGS, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
MICRO = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
RUN_FLAGS = [
    "--nproc", "2", "--ring", "2", "--model", "test-micro", "--seq-len", "64", "--global-batch",
    "2", "--steps", "12", "--warmup", "2", "--ckpt-every", "3", "--synthetic", "--seed", "3",
    "--no-progress",
]
FAIL_WITHIN_S = 60  # seconds from a fault to the end of its run; later, it is killed: a hang
TRAIN_WITHIN_S = 900  # seconds for a whole run: a generous guard against a hang before a fault

FAULT_MAIN = '''
import os, signal, sys, time
import usp.training.checkpoint
import usp.training.loop
from usp.models.llama import CONFIGS, LlamaConfig

CONFIGS["test-micro"] = LlamaConfig(**{micro!r})
FAULT = os.environ.get("USP_FAULT", "")


def rank():  # set by the launcher in each rank after this module is imported
    return os.environ.get("RANK")


def fired():  # the test's guard counts from here
    open(os.environ["USP_FAULT_MARK"], "a").close()


if FAULT == "kill-rank-1-in-step-5":
    train_step = usp.training.loop.train_step

    def killing_train_step(run, step):
        if step == 5 and rank() == "1":
            fired()
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(run, step)

    usp.training.loop.train_step = killing_train_step

if FAULT == "sigterm-while-saving-6":
    publish = usp.training.checkpoint._publish

    def interrupted_publish(tmp, final):  # every shard is written, nothing published yet
        if final.name == "step_000006" and rank() == "0":
            fired()
            os.kill(os.getppid(), signal.SIGTERM)  # the launcher, as a scheduler would
            time.sleep(60)
        return publish(tmp, final)

    usp.training.checkpoint._publish = interrupted_publish

if FAULT == "disk-full-before-saving-9":
    save = usp.training.checkpoint.save_checkpoint

    def save_on_a_full_disk(root, step, *args):
        if step == 9 and rank() == "0":
            fired()
            filler = os.path.join(os.path.dirname(os.path.dirname(root)), "filler")
            with open(filler, "wb", buffering=0) as f:
                for size in (1 << 20, 4096, 1):
                    try:
                        while True:
                            f.write(bytes(size))
                    except OSError:
                        pass
        return save(root, step, *args)

    usp.training.checkpoint.save_checkpoint = save_on_a_full_disk

if FAULT == "planted-index":  # the fault is in the files: the guard counts from the start
    if rank() is None:  # the launcher (a finished run is answered there, its index checked)
        fired()

if __name__ == "__main__":
    from usp.cli import main
    sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(autouse=True)
def micro_model(monkeypatch):
    monkeypatch.setitem(CONFIGS, "test-micro", MICRO)


def _start(root: Path, args: list[str], fault: str = "") -> subprocess.Popen:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    name = f"{len(list(logs.glob('*.out'))):02d}-{fault or 'run'}"
    env = {**os.environ, "PYTHONPATH": path, "USP_FAULT": fault,
           "USP_FAULT_MARK": str(logs / f"{name}.fired")}
    with open(logs / f"{name}.out", "w") as stdout, open(logs / f"{name}.err", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(root / "fault_main.py"), "train", *args], cwd=root, env=env,
            stdout=stdout, stderr=stderr, text=True,
        )
    process.logs = logs / name
    return process


def _finish(process: subprocess.Popen, started: float) -> dict:
    """Wait for the run. A guard against hangs, not a timing: a run still going
    ``FAIL_WITHIN_S`` after its fault fired (or ``TRAIN_WITHIN_S`` after it started) is killed
    with its ranks and reported as hung."""
    mark = Path(f"{process.logs}.fired")
    hung = False
    while process.poll() is None:
        now = time.monotonic()
        fired_for = time.time() - mark.stat().st_mtime if mark.exists() else 0.0
        if fired_for > FAIL_WITHIN_S or now - started > TRAIN_WITHIN_S:
            hung = True
            for pid in _tree(process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()
            break
        time.sleep(0.2)
    return {"rc": process.returncode, "hung": hung, "fired": mark.exists(),
            "seconds": time.monotonic() - started,
            "out": Path(f"{process.logs}.out").read_text(),
            "err": Path(f"{process.logs}.err").read_text()}


def _run(root: Path, args: list[str], fault: str = "") -> dict:
    started = time.monotonic()
    return _finish(_start(root, args, fault), started)


def _tree(pid: int) -> set[int]:
    """``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = set(), [pid]
    while todo:
        tree.add(todo[-1])
        todo.extend(children.get(todo.pop(), []))
    return tree


def _listening(pids: set[int]) -> dict[int, list[str]]:
    """Local addresses of the TCP sockets each process listens on (/proc/net/tcp{,6})."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening[fields[9]] = fields[1]
    found: dict[int, list[str]] = {}
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes = [link[len("socket:["):-1] for link in links if link.startswith("socket:[")]
        addresses = [listening[inode] for inode in inodes if inode in listening]
        if addresses:
            found[pid] = addresses
    return found


def _is_loopback(address: str) -> bool:
    host = address.split(":")[0]
    return host == "0100007F" or host == "00000000000000000000000001000000"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _pair(root: Path, out: Path) -> dict:
    """Two identical runs started together into one --out; the sockets their processes listen on."""
    started = time.monotonic()
    pair = [_start(root, [*RUN_FLAGS, "--out", str(out)]) for _ in range(2)]
    sockets: dict[int, list[str]] = {}
    while any(p.poll() is None for p in pair):
        for process in pair:
            for pid, addresses in _listening(_tree(process.pid)).items():
                sockets[pid] = sorted(set(sockets.get(pid, []) + addresses))
        time.sleep(0.05)
    return {"runs": [_finish(p, started) for p in pair], "launchers": [p.pid for p in pair],
            "sockets": sockets}


def _latest(run: Path) -> str:
    return (run / "checkpoints/latest").read_text().strip()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Runs the stages in order; a stage that raises is recorded (its tests fail), and the
    chain goes on, so each test reports on its own fault."""
    root = tmp_path_factory.mktemp("faults")
    (root / "fault_main.py").write_text(FAULT_MAIN.format(micro=vars(MICRO)))
    disk = root / "disk"
    on_tmpfs = _mount_tmpfs(disk, "32m")
    faulty = disk / "run"
    results: dict = {"on_tmpfs": on_tmpfs, "root": root}

    def full_disk():
        if not on_tmpfs:  # the same point in the run, without the full disk
            assert _run(root, ["--resume", str(faulty)])["rc"] == 0
            for step in (9, 12):
                shutil.rmtree(faulty / f"checkpoints/step_{step:06d}")
            return None
        run = _run(root, ["--resume", str(faulty)], "disk-full-before-saving-9")
        run.update(latest=_latest(faulty), step6=_verify(faulty / "checkpoints/step_000006"))
        (disk / "filler").unlink()
        return run

    def corrupt_then_resume():
        flip_64_bytes(faulty / "checkpoints/step_000006/__0_0.distcp")
        run = _run(root, ["--resume", str(faulty)])
        shutil.copytree(faulty, root / "faulty", symlinks=True)  # off the tmpfs, for the tests
        return run

    def planted_index():
        planted = root / "planted"
        shutil.copytree(root / "faulty", planted, symlinks=True)
        os.mkfifo(planted / "fifo")
        plant_storage(planted / "checkpoints/step_000012",
                      lambda info: dataclasses.replace(info, relative_path="../../fifo"))
        metrics = (planted / "metrics.jsonl").read_bytes()
        run = _run(root, ["--resume", str(planted)], "planted-index")
        return {**run, "run": planted, "step9": _verify(planted / "checkpoints/step_000009"),
                "metrics_kept": (planted / "metrics.jsonl").read_bytes() == metrics}

    stages = {
        "pair": lambda: _pair(root, root / "straight"),
        "killed": lambda: {**_run(root, [*RUN_FLAGS, "--out", str(faulty)],
                                  "kill-rank-1-in-step-5"),
                           "latest": _latest(faulty),
                           "step3": _verify(faulty / "checkpoints/step_000003")},
        "sigterm": lambda: {**_run(root, ["--resume", str(faulty)], "sigterm-while-saving-6"),
                            "latest": _latest(faulty),
                            "step3": _verify(faulty / "checkpoints/step_000003"),
                            "tmp": (faulty / "checkpoints/step_000006.tmp").is_dir()},
        "disk_full": full_disk,
        "corrupt_resume": corrupt_then_resume,
        "planted_index": planted_index,
    }
    try:
        for name, stage in stages.items():
            try:
                results[name] = stage()
            except Exception as exc:  # recorded for the stage's own tests
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        yield results
    finally:
        if on_tmpfs:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _stage(chain: dict, name: str) -> dict:
    result = chain[name]
    assert not (isinstance(result, dict) and "error" in result), f"stage {name}: {result}"
    return result


def _verify(path: Path) -> list[str]:
    from usp.training import integrity

    return integrity.verify(path)


def _tensors(path: Path, into: Path) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(path, into)  # our own files, in a test: a full unpickler is fine here
    flat, todo = {}, [("", torch.load(into, weights_only=False))]
    while todo:
        prefix, value = todo.pop()
        if isinstance(value, dict):
            todo.extend((f"{prefix}{k}.", v) for k, v in value.items())
        elif isinstance(value, torch.Tensor):
            flat[prefix.rstrip(".")] = value
    return flat


def test_two_runs_into_one_directory_one_is_refused_at_once(chain):
    first, second = _stage(chain, "pair")["runs"]
    refused = [r for r in (first, second) if r["rc"] != 0]
    assert len(refused) == 1, [(r["rc"], r["err"][-800:]) for r in (first, second)]
    message = refused[0]["err"]
    assert refused[0]["rc"] == 2, message[-2000:]
    # it names the run holding the directory, and never started ranks or training
    assert "is in use by another usp train run (pid " in message, message[-2000:]
    for started in ("launching", "process group ready", "training steps"):
        assert started not in message, message[-2000:]
    steps = [r["step"] for r in read_metrics(chain["root"] / "straight/metrics.jsonl")]
    assert steps == list(range(1, 13)), "two runs interleaved metrics.jsonl"


def test_a_local_run_listens_on_loopback_only(chain):
    pair = _stage(chain, "pair")
    sockets = pair["sockets"]
    launchers = [pid for pid in pair["launchers"] if pid in sockets]
    assert launchers, f"no launcher was seen listening: {sockets}"
    assert len(sockets) >= 3, f"expected the launcher's stores and the ranks' sockets: {sockets}"
    wide = {pid: [a for a in found if not _is_loopback(a)] for pid, found in sockets.items()}
    assert not any(wide.values()), f"listening beyond 127.0.0.1 (hex address:port): {wide}"


def test_progress_is_logged_once_from_the_start(chain):
    trained = next(r for r in _stage(chain, "pair")["runs"] if r["rc"] == 0)
    log = trained["err"]
    assert "launching 2 ranks" in log
    assert log.count("building test-micro") == 1
    assert log.count("parallelized Llama over") == 1, "every rank logged the same line"
    assert "rank 1 INFO" not in log
    assert log.index("launching 2 ranks") < log.index("process group ready")
    assert log.index("process group ready") < log.index("training steps 1-12")


def test_a_killed_rank_ends_the_run_with_a_message_and_checkpoint_3_intact(chain):
    killed = _stage(chain, "killed")
    assert killed["fired"] and not killed["hung"] and killed["rc"] == 1, killed["err"][-2000:]
    assert "rank 1: killed by SIGKILL" in killed["err"]
    assert "the last complete checkpoint is" in killed["err"] and "step 3" in killed["err"]
    assert killed["latest"] == "step_000003" and killed["step3"] == [], killed["step3"]


def test_sigterm_during_a_save_publishes_nothing(chain):
    stopped = _stage(chain, "sigterm")
    assert stopped["fired"] and not stopped["hung"], stopped["err"][-2000:]
    assert stopped["rc"] == 128 + 15, stopped["err"][-2000:]
    assert "stopped by SIGTERM" in stopped["err"] and "step 3" in stopped["err"]
    assert stopped["latest"] == "step_000003" and stopped["step3"] == [], stopped["step3"]
    assert stopped["tmp"], "the interrupted save should have left step_000006.tmp"


def test_a_full_disk_ends_the_run_with_a_message_and_checkpoint_6_intact(chain):
    if not chain["on_tmpfs"]:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    full = _stage(chain, "disk_full")
    assert full["fired"] and not full["hung"] and full["rc"] == 1, full["err"][-2000:]
    assert "No space left on device" in full["err"]
    assert "step 6" in full["err"]
    assert full["latest"] == "step_000006"
    assert full["step6"] == []


def test_a_corrupt_shard_falls_back_and_the_run_matches_the_uninterrupted_one(chain, tmp_path):
    resumed = _stage(chain, "corrupt_resume")
    assert resumed["rc"] == 0, resumed["err"][-3000:]
    assert "step_000006 is corrupt" in resumed["err"] and "__0_0.distcp" in resumed["err"]
    assert "resumed from step_000003" in resumed["err"]
    root = chain["root"]
    straight = read_metrics(root / "straight/metrics.jsonl")
    faulty = read_metrics(root / "faulty/metrics.jsonl")
    assert [r["step"] for r in faulty] == list(range(1, 13))
    assert [r["loss"] for r in faulty] == [r["loss"] for r in straight], "not bit-exact"
    assert [r["grad_norm"] for r in faulty] == [r["grad_norm"] for r in straight]
    reference = _tensors(root / "straight/checkpoints/step_000012", tmp_path / "a.pt")
    candidate = _tensors(root / "faulty/checkpoints/step_000012", tmp_path / "b.pt")
    assert reference.keys() == candidate.keys() and any(k.startswith("optim.") for k in reference)
    for key, tensor in reference.items():
        assert torch.equal(tensor, candidate[key]), key


def test_an_index_naming_a_fifo_outside_is_refused_without_waiting(chain):
    planted = _stage(chain, "planted_index")
    assert planted["fired"] and not planted["hung"], "the resume waited on the planted FIFO"
    assert planted["rc"] == 2, planted["err"][-3000:]
    checkpoint = planted["run"] / "checkpoints/step_000012"
    assert f"checkpoint {checkpoint} was refused, nothing was loaded: " in planted["err"]
    assert "names '../../fifo', which is no file name of the checkpoint's own folder" \
        in planted["err"]
    assert planted["step9"] == [] and planted["metrics_kept"]
