"""parallelize, shard_batch and the global loss against the single-process model, same batch.

One spawned world of 4 ranks runs every case: (ring 2 x ulysses 2), (dp 2 x ulysses 2) and
(tp 2 x ulysses 2), plain and with activation checkpointing / ZeRO-2 / tied embeddings, each
compared on the loss and every parameter's gradient after one step; then 10 AdamW steps on
(ring 2 x ulysses 2) against the single-process loss curve.

Tolerance (docs/testing.md): error vs the fp64 single-process reference <= 2 x the error of the fp32
single-process model vs that reference, plus a tiny atol.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tests.distributed import collect_failures, run_on_ranks
from usp.batch import positions_in_documents, shard_batch
from usp.data.run import synthetic_tokens
from usp.training.data import TokenBatcher
from usp.loss import global_mean_cross_entropy
from usp.models import Llama, LlamaConfig
from usp.models.llama.plan import check_parallel_config
from usp.parallel import parallelize
from usp.topology import AXES, Topology

CONFIG = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=128)
BATCH, SEQ, SEED = 2, 64, 11
CASES = [
    # (degrees, parallelize options, tie_embeddings)
    ({"ring": 2, "ulysses": 2}, {}, False),
    ({"dp": 2, "ulysses": 2}, {}, False),
    ({"tp": 2, "ulysses": 2}, {}, False),
    ({"ring": 2, "ulysses": 2}, {"activation_checkpointing": "full",
                                 "reshard_after_forward": False}, False),
    ({"dp": 2, "ulysses": 2}, {"activation_checkpointing": "selective", "layout": "stripe"}, True),
    ({"tp": 2, "ulysses": 2}, {"activation_checkpointing": "selective"}, True),
    ({"tp": 2, "ring": 2}, {"activation_checkpointing": "full", "layout": "contiguous"}, False),
    # packed documents: attention, labels and RoPE positions stay inside each
    ({"ring": 2, "ulysses": 2}, {"documents": True}, False),
    ({"tp": 2, "ulysses": 2}, {"documents": True, "layout": "stripe"}, False),
]
DOCUMENTS = torch.tensor([[0] * 9 + [1] + [2] * 30 + [3] * 25, [0] * 40 + [1] * 25])


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, S+1] and a label mask [B, S] that leaves ranks with unequal token counts."""
    tokens = synthetic_tokens(BATCH * (SEQ + 1), CONFIG.vocab_size, seed=SEED).view(BATCH, SEQ + 1)
    position = torch.arange(SEQ).expand(BATCH, SEQ)
    ignored = (position * 7 + torch.arange(BATCH)[:, None]) % 5 == 0
    ignored[0, :20] = True
    return tokens, ignored


def _model(tie: bool, dtype: torch.dtype = torch.float32, n_layers: int = CONFIG.n_layers) -> Llama:
    model = Llama(dataclasses.replace(CONFIG, tie_embeddings=tie, n_layers=n_layers))
    model.init_weights(SEED)
    return model.to(dtype)


def _reference(tie: bool, dtype: torch.dtype, documents: bool = False,
               n_layers: int = CONFIG.n_layers):
    model = _model(tie, dtype, n_layers)
    tokens, ignored = _global_batch()
    labels = tokens[:, 1:].masked_fill(ignored, -100)
    positions, inside = torch.arange(SEQ).expand(BATCH, SEQ), None
    if documents:
        inside = DOCUMENTS[:, :-1]
        labels = tokens[:, 1:].masked_fill(DOCUMENTS[:, 1:] != inside, -100)
        positions = positions_in_documents(inside)
    logits = model(tokens[:, :-1], positions, inside)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {n: p.grad.double() for n, p in model.named_parameters()}


def _one_step(topology: Topology, options: dict, tie: bool) -> tuple[float, dict]:
    options = dict(options)
    documents = options.pop("documents", False)
    layout = options.get("layout", "zigzag")
    model = parallelize(_model(tie), topology, **options)
    batch, labels = _rank_batch(topology, layout, documents)
    logits = model(batch["input_ids"], batch["position_ids"], batch.get("documents"))
    loss = global_mean_cross_entropy(logits, labels, topology)
    loss.backward()
    return loss.item(), _whole_grads(model)


def _rank_batch(topology: Topology, layout: str, documents: bool) -> tuple[dict, torch.Tensor]:
    """This rank's part of the global batch and its labels (the global label mask applied)."""
    tokens, ignored = _global_batch()
    if documents:
        batch = shard_batch(tokens, topology, layout, documents=DOCUMENTS)
        return batch, batch["labels"]
    batch = shard_batch(tokens, topology, layout)
    # the same global mask, read at this rank's rows and global positions
    local_batch = BATCH // topology.size("dp")
    rows = ignored.narrow(0, topology.rank("dp") * local_batch, local_batch)
    return batch, batch["labels"].masked_fill(rows.gather(1, batch["position_ids"]), -100)


def _whole_grads(model) -> dict:
    """Every parameter's whole gradient (DTensor shards gathered), fp64, by name."""
    grads = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).double()
    return grads


def _assert_within(name: str, got, reference64, reference32, atol: float) -> None:
    got, reference64, reference32 = (torch.as_tensor(t, dtype=torch.float64)
                                     for t in (got, reference64, reference32))
    error = (got - reference64).abs().max().item()
    bound = 2 * (reference32 - reference64).abs().max().item() + atol
    if not error <= bound:
        raise AssertionError(f"{name}: error {error:.3e} > bound {bound:.3e}")


def _check_one_step(rank: int, references: dict, case) -> None:
    degrees, options, tie = case
    topology = Topology.build(**degrees)
    loss, grads = _one_step(topology, options, tie)
    (loss64, grads64), (loss32, grads32) = references[(tie, options.get("documents", False))]
    _assert_within("loss", loss, loss64, loss32, atol=1e-6)
    assert grads.keys() == grads64.keys(), sorted(set(grads) ^ set(grads64))
    failures = []
    for name in grads64:
        try:
            _assert_within(name, grads[name], grads64[name], grads32[name], atol=1e-7)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError("; ".join(failures))


def _loss_curve(topology: Topology | None, steps: int) -> list[float]:
    model = _model(tie=False)
    if topology is not None:
        parallelize(model, topology)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    # a stream with period 37: learnable, so the loss and the gradients move a lot in 10 steps
    stream = synthetic_tokens(37, CONFIG.vocab_size, seed=3).repeat(40)
    batcher = TokenBatcher(stream, BATCH, SEQ, seed=4)
    single = Topology.build() if topology is None else topology
    losses = []
    for _ in range(steps):
        tokens = batcher.next_batch()
        if topology is None:
            batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
                     "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}
        else:
            batch = shard_batch(tokens, topology, "zigzag")
        logits = model(batch["input_ids"], batch["position_ids"])
        loss = global_mean_cross_entropy(logits, batch["labels"], single)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _mask_builds_per_step(topology: Topology) -> int:
    """How many times one forward+backward with packed documents builds the attention mask,
    with 3 layers recomputed in the backward (full activation checkpointing)."""
    from usp.mask import AttentionMask

    builds = []
    build = AttentionMask.build.__func__

    def counted(cls, *args, **kwargs):
        builds.append(1)
        return build(cls, *args, **kwargs)

    AttentionMask.build = classmethod(counted)
    try:
        model = parallelize(_model(False, n_layers=3), topology, layout="stripe",
                            activation_checkpointing="full")
        batch, labels = _rank_batch(topology, "stripe", documents=True)
        logits = model(batch["input_ids"], batch["position_ids"], batch["documents"])
        global_mean_cross_entropy(logits, labels, topology).backward()
    finally:
        AttentionMask.build = classmethod(build)
    return len(builds)


def _padding_warnings(topology: Topology) -> int:
    """Warnings parallelize logs on this rank for heads Ulysses runs padded (6/3 over 2)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("usp.parallel")
    log.addHandler(handler)
    try:
        with torch.device("meta"):
            odd = Llama(dataclasses.replace(CONFIG, dim=36, n_heads=6, n_kv_heads=3))
        parallelize(odd, topology)
    finally:
        log.removeHandler(handler)
    return sum("heads run as" in record.getMessage() for record in records)


def _world(rank: int, world_size: int) -> dict:
    padding_warnings = _padding_warnings(Topology.build(ulysses=2, dp=2))
    references = {(tie, documents): (_reference(tie, torch.float64, documents),
                                     _reference(tie, torch.float32, documents))
                  for tie in (False, True) for documents in (False, True)}
    failures = collect_failures(CASES, lambda case: _check_one_step(rank, references, case))
    builds = _mask_builds_per_step(Topology.build(ring=2, ulysses=2))
    if builds != 1:  # every layer and the recompute reuse the step's mask (no host sync each)
        failures.append(f"the attention mask was built {builds} times in one step of 3 layers")
    reference_curve = torch.tensor(_loss_curve(None, 10))
    curve = torch.tensor(_loss_curve(Topology.build(ring=2, ulysses=2), 10))
    relative = ((curve - reference_curve).abs() / reference_curve.abs()).max().item()
    if not relative <= 1e-4:
        failures.append(f"10-step loss curve: max relative difference {relative:.2e} > 1e-4")
    return {"failures": failures, "curve_relative": relative, "padding_warnings": padding_warnings,
            "curve_decrease": (reference_curve[0] - reference_curve[-1]).item()}


def test_parallel_matches_single_process_model():
    results = run_on_ranks(_world, 4, timeout_s=300)
    failures = [f"rank {r}: {line}" for r, result in enumerate(results)
                for line in result["failures"]]
    assert not failures, "\n".join(failures)
    assert results[0]["curve_decrease"] > 1.0  # the curve being compared does move
    assert [r["padding_warnings"] for r in results] == [1, 0, 0, 0], "once, on the first rank"


def _topology(**degrees) -> Topology:
    sizes = {axis: degrees.get(axis, 1) for axis in AXES}
    return Topology(sizes=sizes, ranks={axis: 0 for axis in AXES})


def test_bad_parallel_configs_name_the_numbers(caplog):
    # heads ulysses cannot split evenly run on padded heads: a note about the cost, which
    # parallelize logs (once, on the first rank), never the check itself (run again per rank)
    assert check_parallel_config(CONFIG, _topology(tp=2, ulysses=8)) is not None
    odd_heads = dataclasses.replace(CONFIG, dim=36, n_heads=6, n_kv_heads=3)
    assert "6/3 heads run as 8/4" in check_parallel_config(odd_heads, _topology(ulysses=2))
    assert caplog.text == ""
    with pytest.raises(ValueError, match="n_kv_heads=4 is not divisible by tp=8"):
        check_parallel_config(CONFIG, _topology(tp=8))
    with pytest.raises(ValueError, match="vocab_size=257 is not divisible by tp=2"):
        check_parallel_config(dataclasses.replace(CONFIG, vocab_size=257), _topology(tp=2))
    with pytest.raises(ValueError, match="activation_checkpointing='some'"):
        parallelize(_model(False), _topology(), activation_checkpointing="some")
    with pytest.raises(ValueError, match="mixed precision"):
        parallelize(_model(False), _topology(), param_dtype=torch.bfloat16)


def test_single_process_loss_is_the_mean_and_parallelize_is_identity():
    model, reference = _model(False), _model(False)
    parallelize(model, Topology.build())
    tokens, ignored = _global_batch()
    labels = tokens[:, 1:].masked_fill(ignored, -100)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    loss = global_mean_cross_entropy(model(tokens[:, :-1], positions), labels, Topology.build())
    expected = F.cross_entropy(reference(tokens[:, :-1], positions).flatten(0, 1),
                               labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
