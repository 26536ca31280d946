"""Memory features, gradient accumulation and the held-out loss against the single process.

One spawned world per world size (4 and 2 gloo ranks) runs a grid: chunked and vocab-parallel
cross-entropy, the tiled MLP, checkpointing by layer kind, gradient accumulation (also through
the pipeline's last stage) and the held-out loss, each compared with one process on the loss and
every gradient. The model runs in fp64, so the bound is 1e-10 (docs/testing.md). The 2-rank
world also runs ``usp train`` itself with every feature on against a single-process run with
every feature off (fp32: 1e-5 relative, as tests/test_train.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tests.distributed import collect_failures, run_on_ranks
from usp.batch import positions_in_documents, shard_batch
from usp.losses import LossHead
from usp.models import Llama, LlamaConfig
from usp.parallel import parallelize
from usp.pipeline import Pipeline
from usp.topology import Topology
from usp.training.accumulate import split_micro_batches, train_micro_batches
from usp.data.run import synthetic_tokens
from usp.training.evaluate import held_out_loss

CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
BATCH, SEQ, SEED, TOLERANCE = 4, 32, 5, 1e-10
# documents of the packed case: attention, labels and positions stay inside each
DOCUMENTS = torch.tensor([[0] * 9 + [1] * 24] * 2 + [[0] * 20 + [1] * 13] * 2)
CASES_4 = [
    # (degrees, parallelize options, loss, grad_accum, extras)
    ({"ring": 2, "ulysses": 2}, {}, "chunked", 1, {}),
    ({"tp": 2, "ulysses": 2}, {}, "vocab_parallel", 1, {}),
    ({"ring": 2, "ulysses": 2}, {"tiled_mlp": 5, "activation_checkpointing": "attention"},
     "full", 1, {}),
    ({"tp": 2, "ring": 2}, {"tiled_mlp": 3, "activation_checkpointing": "attention",
                            "layout": "contiguous"}, "vocab_parallel", 1, {}),
    ({"dp": 2, "ulysses": 2}, {"activation_checkpointing": "attention,mlp", "layout": "stripe"},
     "chunked", 2, {"tie": True, "documents": True}),
    ({"dp": 2, "ring": 2}, {"tiled_mlp": 4, "activation_checkpointing": "block"}, "chunked", 2, {}),
    ({"pp": 2, "ring": 2}, {"tiled_mlp": 8}, "chunked", 1, {"pipeline": 2}),
    ({"pp": 2, "tp": 2}, {"activation_checkpointing": "attention"}, "vocab_parallel", 1,
     {"pipeline": 2}),
]
CASES_2 = [
    ({"ulysses": 2}, {"tiled_mlp": 7}, "chunked", 1, {}),
    ({"tp": 2}, {"activation_checkpointing": "attention"}, "vocab_parallel", 1, {"tie": True}),
    ({"dp": 2}, {"activation_checkpointing": "mlp"}, "full", 2, {"documents": True}),
]


def _tokens() -> torch.Tensor:
    return synthetic_tokens(BATCH * (SEQ + 1), CONFIG.vocab_size, seed=SEED).view(BATCH, SEQ + 1)


def _model(tie: bool) -> Llama:
    model = Llama(dataclasses.replace(CONFIG, tie_embeddings=tie))
    model.init_weights(SEED)
    return model.double()


def _reference(tie: bool, documents: bool):
    """One process, plain model, full logits: the loss, every gradient, the forward-only loss."""
    model, tokens = _model(tie), _tokens()
    labels, positions, inside = tokens[:, 1:], torch.arange(SEQ).expand(BATCH, SEQ), None
    if documents:
        inside = DOCUMENTS[:, :-1]
        labels = labels.masked_fill(DOCUMENTS[:, 1:] != inside, -100)
        positions = positions_in_documents(inside)
    logits = model(tokens[:, :-1], positions, inside)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _sharded(topology: Topology, layout: str, documents: bool) -> dict:
    return shard_batch(_tokens(), topology, layout, documents=DOCUMENTS if documents else None)


def _gradients(model: torch.nn.Module) -> dict:
    return {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
            for name, p in model.named_parameters()}


def _check_error(name: str, got, expected) -> None:
    error = (torch.as_tensor(got) - torch.as_tensor(expected)).abs().max().item()
    if not error <= TOLERANCE:
        raise AssertionError(f"{name}: error {error:.2e} > {TOLERANCE:.0e}")


def _check_case(references: dict, case) -> None:
    degrees, options, loss_kind, grad_accum, extras = case
    topology = Topology.build(**degrees)
    tie, documents = extras.get("tie", False), extras.get("documents", False)
    layout = options.get("layout", "zigzag")
    model = parallelize(_model(tie), topology, loss=loss_kind, **options)
    head = LossHead(loss_kind, chunk_tokens=7)
    batch = _sharded(topology, layout, documents)
    if "pipeline" in extras:
        pipeline = Pipeline(model, topology, torch.device("cpu"), extras["pipeline"], loss=head)
        loss = pipeline.step(batch["input_ids"], batch["position_ids"], batch["labels"],
                             batch.get("documents"), activation_dtype=torch.float64).item()
    else:
        micro = split_micro_batches(batch, grad_accum)
        loss = train_micro_batches(model, micro, topology, head)[0].item()
    expected_loss, expected_grads = references[(tie, documents)]
    _check_error("loss", loss, expected_loss)
    failures = []
    for name, grad in _gradients(model).items():
        try:
            _check_error(name, grad, expected_grads[name])
        except AssertionError as exc:
            failures.append(str(exc))
    if "pipeline" not in extras:  # the held-out loss: forward only, the same batch
        try:
            _check_error("held-out loss", held_out_loss(model, split_micro_batches(
                batch, grad_accum), topology, head), expected_loss)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError("; ".join(failures))


def _reduce_scatters(grad_accum: int) -> int:
    """How many reduce-scatters FSDP runs for one optimizer step of ``grad_accum`` micro-steps."""
    calls = []
    original = dist.reduce_scatter_single  # what FSDP2 (torch 2.13) reduces gradients with

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counting
    try:
        topology = Topology.build(dp=2, ulysses=dist.get_world_size() // 2)
        model = parallelize(_model(False), topology)
        micro = split_micro_batches(_sharded(topology, "zigzag", False), grad_accum)
        train_micro_batches(model, micro, topology, LossHead())
    finally:
        dist.reduce_scatter_single = original
    return len(calls)


def _world(rank: int, world_size: int, cases: list, train_dirs) -> list[str]:
    references = {(tie, documents): _reference(tie, documents)
                  for tie in (False, True) for documents in (False, True)}
    failures = collect_failures(cases, lambda case: _check_case(references, case))
    once, twice = _reduce_scatters(1), _reduce_scatters(2)
    if not 0 < once == twice:
        failures.append(f"FSDP reduce-scatters per step: {once} with 1 micro-step, {twice} with "
                        "2 (gradients must sync in the last micro-step only)")
    if train_dirs is not None:
        from usp.training.loop import train

        records = train(_train_config().replace(**_FEATURES, out=train_dirs[0]))
        failures += _compare_runs(records, train_dirs[1])
    return failures


_TRAIN_SETTINGS = dict(model="tiny", seq_len=64, global_batch=2, steps=3, warmup=1,
                       synthetic=True, eval_every=2, eval_batches=1, ckpt_every=0,
                       progress=False)
_FEATURES = dict(ring=2, loss="chunked", loss_chunk_tokens=24, tiled_mlp=16, ac="attention",
                 grad_accum=2, nproc=2)


def _train_config():
    from tests.specs import run_spec

    return run_spec(**_TRAIN_SETTINGS)


def _compare_runs(records: list[dict], reference_dir: str) -> list[str]:
    from usp.training.metrics import read_metrics

    reference = read_metrics(f"{reference_dir}/metrics.jsonl")
    failures = []
    for mine, expected in zip(records, reference, strict=True):
        for key in ("loss", "grad_norm", "eval_loss"):
            if (key in mine) != (key in expected):
                failures.append(f"step {mine['step']}: {key} in one run only")
            elif key in mine and not abs(mine[key] - expected[key]) <= 1e-5 * abs(expected[key]):
                failures.append(f"step {mine['step']}: {key} {mine[key]} vs {expected[key]}")
    if [r["step"] for r in records if "eval_loss" in r] != [2, 3]:
        failures.append("eval_loss must be logged at steps 2 and 3")
    return failures


def test_memory_features_match_the_single_process_on_four_ranks():
    results = run_on_ranks(_world, 4, CASES_4, None, timeout_s=300)
    failures = [f"rank {r}: {line}" for r, lines in enumerate(results) for line in lines]
    assert not failures, "\n".join(failures)


def test_memory_features_and_usp_train_match_the_single_process_on_two_ranks(tmp_path):
    from usp.training.loop import train

    reference = tmp_path / "one-process-plain"
    train(_train_config().replace(out=str(reference)))
    dirs = (str(tmp_path / "two-ranks-features"), str(reference))
    results = run_on_ranks(_world, 2, CASES_2, dirs, timeout_s=300)
    failures = [f"rank {r}: {line}" for r, lines in enumerate(results) for line in lines]
    assert not failures, "\n".join(failures)
