"""Pipeline parallelism (pp) composed with USP, TP and FSDP2, against the single-process model.

One spawned world of 4 ranks runs every case: pp 2 with ring 2, ulysses 2, tp 2 and dp 2, under
1F1B and GPipe, with packed documents and activation checkpointing; each compared on the loss and
on every gradient of every stage's parameters after one step, then 10 AdamW steps of pp 2 x
ring 2 against the single-process loss curve. A world of 8 ranks runs pp 2 x ring 2 x tp 2.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import collect_failures, run_on_ranks
from tests.test_parallel import (
    BATCH, CONFIG, SEQ, _assert_within, _model, _rank_batch, _reference, _whole_grads,
)
from usp.batch import shard_batch
from usp.loss import global_mean_cross_entropy
from usp.parallel import parallelize
from usp.pipeline import Pipeline, check_pipeline, stage_layer_names
from usp.topology import Topology
from usp.data.run import synthetic_tokens
from usp.training.data import TokenBatcher

CASES_4 = [
    # (degrees, parallelize options, pipeline (microbatches, schedule), documents)
    ({"pp": 2, "ring": 2}, {}, (2, "1f1b"), False),
    ({"pp": 2, "ulysses": 2}, {"layout": "stripe"}, (2, "gpipe"), False),
    ({"pp": 2, "tp": 2}, {"activation_checkpointing": "selective"}, (2, "1f1b"), False),
    ({"pp": 2, "dp": 2}, {"activation_checkpointing": "full"}, (1, "gpipe"), False),
    ({"pp": 2, "ring": 2}, {"layout": "stripe"}, (2, "1f1b"), True),
    ({"pp": 4}, {}, (2, "gpipe"), False),
]


def _pipelined_step(topology: Topology, options: dict, pipeline: tuple, documents: bool):
    layout = options.get("layout", "zigzag")
    microbatches, schedule = pipeline
    stage = parallelize(_model(tie=False, n_layers=topology.size("pp")), topology, **options)
    runner = Pipeline(stage, topology, torch.device("cpu"), microbatches, schedule)
    batch, labels = _rank_batch(topology, layout, documents)
    loss = runner.step(batch["input_ids"], batch["position_ids"], labels, batch.get("documents"))
    return loss.item(), _whole_grads(stage)


def _check(references: dict, case) -> None:
    degrees, options, pipeline, documents = case
    topology = Topology.build(**degrees)
    loss, grads = _pipelined_step(topology, options, pipeline, documents)
    (loss64, grads64), (loss32, grads32) = references[(topology.size("pp"), documents)]
    _assert_within("loss", loss, loss64, loss32, atol=1e-6)
    expected = set(stage_layer_names(topology.size("pp"), topology.size("pp"),
                                     topology.rank("pp")))
    held = {name.split(".")[1] for name in grads if name.startswith("layers.")}
    assert held == expected, f"stage {topology.rank('pp')} holds layers {held}, not {expected}"
    failures = []
    for name, grad in grads.items():
        try:
            _assert_within(name, grad, grads64[name], grads32[name], atol=1e-7)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError("; ".join(failures))


def _loss_curve(topology: Topology | None, steps: int) -> list[float]:
    pp = 2
    model = _model(tie=False, n_layers=pp)
    runner = None
    if topology is not None:
        model = parallelize(model, topology)
        runner = Pipeline(model, topology, torch.device("cpu"), 2, "1f1b")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    stream = synthetic_tokens(37, CONFIG.vocab_size, seed=3).repeat(40)
    batcher = TokenBatcher(stream, BATCH, SEQ, seed=4)
    losses = []
    for _ in range(steps):
        tokens = batcher.next_batch()
        optimizer.zero_grad()
        if topology is None:
            logits = model(tokens[:, :-1], torch.arange(SEQ).expand(BATCH, SEQ))
            loss = global_mean_cross_entropy(logits, tokens[:, 1:], Topology.build())
            loss.backward()
        else:
            batch = shard_batch(tokens, topology, "zigzag")
            loss = runner.step(batch["input_ids"], batch["position_ids"], batch["labels"])
        optimizer.step()
        losses.append(loss.item())
    return losses


def _references(pps, documents_options) -> dict:
    return {(pp, documents): (_reference(False, torch.float64, documents, n_layers=pp),
                              _reference(False, torch.float32, documents, n_layers=pp))
            for pp in pps for documents in documents_options}


def _world_4(rank: int, world_size: int) -> dict:
    references = _references((2, 4), (False, True))
    failures = collect_failures(CASES_4, lambda case: _check(references, case))
    reference_curve = torch.tensor(_loss_curve(None, 10))
    curve = torch.tensor(_loss_curve(Topology.build(pp=2, ring=2), 10))
    relative = ((curve - reference_curve).abs() / reference_curve.abs()).max().item()
    if not relative <= 1e-4:
        failures.append(f"10-step loss curve: max relative difference {relative:.2e} > 1e-4")
    return {"failures": failures, "curve_decrease": (reference_curve[0] - reference_curve[-1]).item()}


def test_pipeline_matches_single_process_model():
    results = run_on_ranks(_world_4, 4, timeout_s=300)
    failures = [f"rank {r}: {line}" for r, result in enumerate(results)
                for line in result["failures"]]
    assert not failures, "\n".join(failures)
    assert results[0]["curve_decrease"] > 1.0  # the curve being compared does move


def test_pipeline_refusals_name_the_numbers():
    assert [stage_layer_names(5, 2, s) for s in range(2)] == [["0", "1", "2"], ["3", "4"]]
    with pytest.raises(ValueError, match="n_layers=3 < pp=4"):
        stage_layer_names(3, 4, 0)
    with pytest.raises(ValueError, match="microbatches=1 < pp=2"):
        check_pipeline(2, 4, 1, "1f1b")
    with pytest.raises(ValueError, match="holds 3 batch rows, which microbatches=2"):
        check_pipeline(2, 3, 2, "1f1b")
    with pytest.raises(ValueError, match="schedule 'zb'"):
        check_pipeline(2, 4, 2, "zb")
