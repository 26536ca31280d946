"""Checkpoints: exact resume on the same layout, fp32-close resume on other layouts, crash safety.

One spawned world of 4 ranks trains (all with the same seeded micro model and data):

- ``straight``: 10 steps, ring 2 x ulysses 2, checkpoints at 5 and 10 — the reference;
- ``crashed``: the same run killed in step 6; resumed from ``latest`` (step 5) and killed in the
  middle of saving step 10 (every shard written to ``step_000010.tmp``, nothing published);
  resumed from ``latest`` (still step 5) for the last 5 steps;
- the step-5 checkpoint resumed under other layouts: ulysses 4, ring 2 x tp 2, dp 2 x ulysses 2;

and the test process itself resumes the step-5 checkpoint in one process without a process group.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import math
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.distributed import run_on_ranks
from usp.training import checkpoint
from usp.models.llama import CONFIGS, LlamaConfig
from usp.training.loop import train
from usp.training.setup import validate
from usp.spec import RunSpec
from tests.specs import run_spec

MICRO = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
CROSS_LAYOUTS = {
    "ulysses4": {"ring": 1, "ulysses": 4},
    "ring2-tp2": {"ring": 2, "ulysses": 1, "tp": 2},
    "dp2-ulysses2": {"ring": 1, "ulysses": 2},
    "pp2-ring2": {"pp": 2, "ring": 2, "ulysses": 1},  # no stages -> two pipeline stages
    "from-pp2-ulysses4": {"ring": 1, "ulysses": 4},  # two pipeline stages -> none (see below)
}
# Other layouts sum the same terms in another order (attention merges, reduce-scatters); after
# 5 AdamW steps the measured loss differences are <= 1.2e-7 relative (fp32 rounding). 1e-5 leaves
# room without hiding a real bug: a wrong shard, position or optimizer state moves it by 1e-2.
CROSS_LAYOUT_RTOL = 1e-5


class SimulatedCrash(RuntimeError):
    """Stands for a kill: raised on every rank at the same point, as a dying job's ranks stop."""


@pytest.fixture(autouse=True)
def micro_model(monkeypatch):
    """The micro model's name resolves in this process during a test, and only then."""
    monkeypatch.setitem(CONFIGS, "test-micro", MICRO)
    deeper = LlamaConfig(**{**vars(MICRO), "n_layers": 3})
    monkeypatch.setitem(CONFIGS, "test-micro-3-layers", deeper)


def micro_config(out: Path, **overrides) -> RunSpec:
    settings = dict(
        model="test-micro", seq_len=64, global_batch=2, steps=10, warmup=2, lr=3e-3,
        min_lr=3e-4, ckpt_every=5, ring=2, ulysses=2, out=str(out), progress=False,
        peak_tflops=1.0, data=[inspect.getsourcefile(argparse)], seed=3,
    )
    settings.update(overrides)
    return run_spec(**settings)


def _crash_on(module, name: str, when):
    """Replace ``module.name`` by a function that raises SimulatedCrash when ``when(*args)``."""
    original = getattr(module, name)

    def crashing(*args):
        if when(*args):
            raise SimulatedCrash(f"killed in {name}{args!r:.80}")
        return original(*args)

    setattr(module, name, crashing)
    return original


def _run_until_crash(config: RunSpec, module, name: str, when) -> None:
    original = _crash_on(module, name, when)
    try:
        train(config)
        raise AssertionError(f"the simulated crash in {name} did not happen")
    except SimulatedCrash:
        pass
    finally:
        setattr(module, name, original)


def _resume_world(rank: int, world_size: int, root: str) -> dict:
    import usp.training.checkpoint as checkpoint_module
    import usp.training.loop as train_module

    CONFIGS["test-micro"] = MICRO  # this spawned rank's own registry
    root = Path(root)
    results = {"straight": train(micro_config(root / "straight"))}

    # 5 steps, checkpoint 5, killed in step 6.
    crashed = root / "crashed"
    _run_until_crash(
        micro_config(crashed), train_module, "train_step", lambda run, step: step == 6
    )
    results["latest_after_kill"] = (crashed / "checkpoints/latest").read_text().strip()
    # Resumed, but killed while saving step 10: every shard in step_000010.tmp, nothing published.
    _run_until_crash(
        micro_config(crashed, resume="latest"), checkpoint_module, "_publish",
        lambda tmp, final: final.name == "step_000010",
    )
    results["latest_after_crash_mid_save"] = (crashed / "checkpoints/latest").read_text().strip()
    results["tmp_left_by_crash"] = (crashed / "checkpoints/step_000010.tmp").is_dir()
    # Resumed again from the intact step 5.
    results["resumed"] = train(micro_config(crashed, resume="latest"))

    step5 = str(root / "crashed/checkpoints/step_000005")
    # a run with two pipeline stages from the start, whose step 5 a run without stages resumes
    results["pp2-straight"] = train(micro_config(root / "pp2-straight", pp=2, ring=2, ulysses=1))
    for name, degrees in CROSS_LAYOUTS.items():
        start = str(root / "pp2-straight/checkpoints/step_000005") if name.startswith("from-pp2") \
            else step5
        results[name] = train(micro_config(root / name, resume=start, **degrees))

    # Bad input on one rank only must still raise on every rank (no rank left in a collective).
    data = ["/nonexistent/corpus.txt"] if rank == 3 else None
    try:
        train(micro_config(root / "bad", **({"data": data} if data else {})))
        results["bad"] = "no error"
    except ValueError as exc:
        results["bad"] = str(exc)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    per_rank = run_on_ranks(_resume_world, 4, str(root), timeout_s=300)
    return root, per_rank


def _losses(records):
    return [r["loss"] for r in records]


def _load(path: Path, into: Path) -> dict:
    dcp_to_torch_save(path, into)
    return torch.load(into, weights_only=False)


def _flatten(state, prefix=""):
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _flatten(value, f"{prefix}{key}.")
    elif isinstance(state, torch.Tensor):
        yield prefix.rstrip("."), state


def test_resume_same_layout_is_bit_exact_after_a_kill_and_a_crash_mid_save(runs, tmp_path):
    root, per_rank = runs
    results = per_rank[0]
    straight, resumed = results["straight"], results["resumed"]
    assert results["latest_after_kill"] == "step_000005"
    assert results["latest_after_crash_mid_save"] == "step_000005", "a crash mid-save moved it"
    assert results["tmp_left_by_crash"], "the simulated crash should leave step_000010.tmp behind"
    assert [r["step"] for r in resumed] == list(range(6, 11))
    assert _losses(resumed) == _losses(straight[5:]), "resume is not bit-exact"
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight[5:]]
    for rank_results in per_rank[1:]:  # every rank reports the same global loss
        assert _losses(rank_results["resumed"]) == _losses(resumed)
    # The metrics file of the crashed run holds each step once, equal to the straight run's.
    crashed_log = checkpoint_records(root / "crashed")
    assert [r["step"] for r in crashed_log] == list(range(1, 11))
    assert _losses(crashed_log) == _losses(checkpoint_records(root / "straight"))
    crashed_dir = root / "crashed/checkpoints"
    assert sorted(p.name for p in crashed_dir.iterdir()) == ["latest", "step_000005", "step_000010"]
    # Final model and optimizer state, bit for bit.
    reference = _load(root / "straight/checkpoints/step_000010", tmp_path / "a.pt")
    candidate = _load(crashed_dir / "step_000010", tmp_path / "b.pt")
    reference_tensors, candidate_tensors = dict(_flatten(reference)), dict(_flatten(candidate))
    assert reference_tensors.keys() == candidate_tensors.keys()
    assert any(k.startswith("optim.state") for k in reference_tensors)
    for key, tensor in reference_tensors.items():
        assert torch.equal(tensor, candidate_tensors[key]), key


def checkpoint_records(run_dir: Path) -> list[dict]:
    from usp.training.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def test_pipeline_run_matches_the_run_without_stages(runs):
    _, per_rank = runs
    straight, pipelined = per_rank[0]["straight"], per_rank[0]["pp2-straight"]
    assert len(pipelined) == len(straight) == 10
    for mine, reference in zip(_losses(pipelined), _losses(straight)):
        assert math.isclose(mine, reference, rel_tol=CROSS_LAYOUT_RTOL), (mine, reference)


@pytest.mark.parametrize("layout", sorted(CROSS_LAYOUTS))
def test_resume_under_another_layout_matches_to_fp32_tolerance(runs, layout, tmp_path):
    root, per_rank = runs
    straight, resumed = per_rank[0]["straight"], per_rank[0][layout]
    assert [r["step"] for r in resumed] == list(range(6, 11))
    for mine, reference in zip(_losses(resumed), _losses(straight[5:])):
        assert math.isclose(mine, reference, rel_tol=CROSS_LAYOUT_RTOL), (mine, reference)
    reference = dict(_flatten(_load(root / "straight/checkpoints/step_000010", tmp_path / "a.pt")))
    candidate = dict(_flatten(_load(root / layout / "checkpoints/step_000010", tmp_path / "b.pt")))
    for key, tensor in reference.items():
        if key.startswith("model."):
            torch.testing.assert_close(candidate[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


def test_resume_in_one_process_without_a_process_group(runs):
    root, per_rank = runs
    straight = per_rank[0]["straight"]
    step5 = root / "crashed/checkpoints/step_000005"
    resumed = train(micro_config(root / "single", resume=str(step5), ring=1, ulysses=1, nproc=1))
    for mine, reference in zip(_losses(resumed), _losses(straight[5:]), strict=True):
        assert math.isclose(mine, reference, rel_tol=CROSS_LAYOUT_RTOL), (mine, reference)


def test_bad_input_on_one_rank_raises_on_every_rank(runs):
    _, per_rank = runs
    # every rank raises the rejecting rank's own message, naming that rank
    assert "does not exist" in per_rank[3]["bad"] and "[rank 3]" in per_rank[3]["bad"]
    assert all(per_rank[rank]["bad"] == per_rank[3]["bad"] for rank in range(3))


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_mismatched_checkpoint_is_refused_naming_the_fields(runs):
    root, _ = runs
    step5 = root / "crashed/checkpoints/step_000005"
    before = _tree_digest(root / "crashed")
    with pytest.raises(ValueError, match=r"model\.n_layers=2 in the checkpoint but 3 now"):
        validate(micro_config(root / "other", resume=str(step5), model="test-micro-3-layers"), 4)
    with pytest.raises(ValueError, match=r"seq_len=64 in the checkpoint but 128 now"):
        validate(micro_config(root / "other", resume=str(step5), seq_len=128), 4)
    assert _tree_digest(root / "crashed") == before
    assert not (root / "other").exists()


def test_unreadable_checkpoint_is_refused_and_nothing_is_overwritten(runs, tmp_path):
    root, _ = runs
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / checkpoint.META).write_text("{ not json")
    with pytest.raises(ValueError, match=r"broken is unreadable \(.*meta\.json"):
        validate(micro_config(tmp_path / "out", resume=str(broken), ring=1, ulysses=1), 1)
    # A torn shard: meta.json is fine, a .distcp file is cut short.
    torn = tmp_path / "torn"
    source = root / "crashed/checkpoints/step_000005"
    torn.mkdir()
    for file in source.iterdir():
        data = file.read_bytes()
        (torn / file.name).write_bytes(data[: len(data) // 3] if file.suffix == ".distcp" else data)
    out = tmp_path / "resumed-from-torn"
    torn_message = r"torn is corrupt, nothing was loaded: .*/__0_0\.distcp has"
    with pytest.raises(ValueError, match=torn_message):
        train(micro_config(out, resume=str(torn), ring=1, ulysses=1, nproc=1))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    # A pointer to a checkpoint that is gone.
    pointer_root = tmp_path / "pointer" / "checkpoints"
    pointer_root.mkdir(parents=True)
    (pointer_root / checkpoint.LATEST).write_text("step_000007\n")
    gone = r"no complete checkpoint left .*latest holds 'step_000007'"
    with pytest.raises(ValueError, match=gone):
        validate(micro_config(tmp_path / "pointer", resume="latest", ring=1, ulysses=1), 1)
