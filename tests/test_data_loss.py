"""The supervised fine-tuning loss is exact: a packed batch of chat conversations of uneven
lengths, loss on the assistant's tokens only, gives on 4 ranks the loss and every gradient of
one process that runs each conversation alone under the same label mask (fp64, 1e-10:
docs/testing.md).

The conversations are tokenized by the real pipeline (``usp.data.prepare``: chat template,
assistant mask, token cache) and batched by ``usp.data.PackedBatcher``; each rank takes its part
with ``usp.batch.shard_batch`` (targets carry the mask before the shift, documents keep
attention, RoPE and labels inside each conversation) and runs usp's Llama parallelised by
``usp.parallelize``. The reference cuts every row at its document boundaries and runs each
piece (a whole conversation, or the part of one a window holds) alone at positions 0, 1, ...,
summing the cross-entropy of the assistant's tokens and dividing by their count over the whole
global batch. Cases: ring 2 x ulysses 2 (stripe and zigzag layouts) with the loss of
``usp.loss``, and dp 2 x ring 2 through ``usp.training.accumulate.train_micro_batches`` with two
micro-batches per dp rank (the count taken once over every rank and micro-batch).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tests.data_helpers import WORDS, save_tokenizer, write_jsonl
from tests.distributed import collect_failures, run_on_ranks
from usp.batch import IGNORE_INDEX, shard_batch
from usp.data import DataSpec, PackedBatcher, TokenStore, prepare
from usp.loss import global_mean_cross_entropy
from usp.losses import LossHead
from usp.models import Llama, LlamaConfig
from usp.parallel import parallelize
from usp.topology import Topology
from usp.training.accumulate import split_micro_batches, train_micro_batches

CONFIG = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=128)
SEQ, SEED = 64, 3
CASES = [
    ({"ring": 2, "ulysses": 2}, "stripe", 2, 1),  # (degrees, layout, global batch, micro-batches)
    ({"ring": 2, "ulysses": 2}, "zigzag", 2, 1),
    ({"dp": 2, "ring": 2}, "stripe", 4, 2),
]


def _conversations(count: int) -> list[list[dict]]:
    """Seeded conversations of 1 or 2 exchanges of 1 to 5 words, some with a system message."""
    chooser = random.Random(SEED)

    def words() -> str:
        return " ".join(chooser.choice(WORDS) for _ in range(chooser.randint(1, 5)))

    conversations = []
    for _ in range(count):
        messages = [{"role": "system", "content": words()}] if chooser.random() < 0.3 else []
        for _ in range(chooser.randint(1, 2)):
            messages += [{"role": "user", "content": words()},
                         {"role": "assistant", "content": words()}]
        conversations.append(messages)
    return conversations


def _model() -> Llama:
    model = Llama(CONFIG)
    model.init_weights(SEED)
    return model.to(torch.float64)


def _global_batch(store: Path, rows: int):
    batcher = PackedBatcher(TokenStore.open(store), rows, SEQ, seed=SEED)
    return batcher.next_batch()


def _reference(batch) -> tuple[float, dict]:
    """Each document piece of each row alone, the same mask: the global mean and its
    gradients."""
    model = _model()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for row in range(batch.tokens.shape[0]):
        documents = batch.documents[row]
        starts = [0] + [i for i in range(1, len(documents)) if documents[i] != documents[i - 1]]
        for start, stop in zip(starts, starts[1:] + [len(documents)]):
            tokens, targets = batch.tokens[row, start:stop], batch.targets[row, start:stop]
            if len(tokens) < 2:
                continue  # one token alone predicts nothing
            logits = model(tokens[None, :-1], torch.arange(len(tokens) - 1)[None])
            labels = targets[1:]
            total = total + F.cross_entropy(logits[0], labels, ignore_index=IGNORE_INDEX,
                                            reduction="sum")
            count += int((labels != IGNORE_INDEX).sum())
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _parallel(topology: Topology, layout: str, batch, micro_batches: int) -> tuple[float, dict]:
    model = parallelize(_model(), topology, layout=layout)
    shard = shard_batch(batch.tokens, topology, layout, targets=batch.targets,
                        documents=batch.documents)
    if micro_batches == 1:
        logits = model(shard["input_ids"], shard["position_ids"], shard["documents"])
        loss = global_mean_cross_entropy(logits, shard["labels"], topology)
        loss.backward()
    else:
        loss, _ = train_micro_batches(model, split_micro_batches(shard, micro_batches),
                                      topology, LossHead())
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for name, p in model.named_parameters()}
    return loss.item(), grads


def _check(store: Path, case) -> None:
    degrees, layout, rows, micro_batches = case
    batch = _global_batch(store, rows)
    loss64, grads64 = _reference(batch)
    loss, grads = _parallel(Topology.build(**degrees), layout, batch, micro_batches)
    problems = [f"loss {loss!r} vs {loss64!r}"] if abs(loss - loss64) > 1e-10 else []
    for name, reference in grads64.items():
        error = (grads[name].double() - reference).abs().max().item()
        if not error <= 1e-10:
            problems.append(f"{name}: gradient error {error:.2e} > 1e-10")
    if problems:
        raise AssertionError("; ".join(problems))


def _world(rank: int, world_size: int, store: str) -> list[str]:
    return collect_failures(CASES, lambda case: _check(Path(store), case))


def test_packed_sft_loss_and_gradients_equal_each_conversation_alone(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl",
                       [{"messages": c} for c in _conversations(40)])
    prepared = prepare(DataSpec(paths=(str(data),), chat_field="messages",
                                tokenizer=str(save_tokenizer(tmp_path / "tok")),
                                cache=str(tmp_path / "cache")))
    for _, _, rows, _ in CASES:  # the batches do hold what the test is about
        batch = _global_batch(prepared.store.directory, rows)
        assert all(len(set(row.tolist())) >= 3 for row in batch.documents)  # several per row
        assert (batch.targets == IGNORE_INDEX).any() and (batch.targets != IGNORE_INDEX).any()
    failures = run_on_ranks(_world, 4, str(prepared.store.directory), timeout_s=300)
    failures = [f"rank {rank}: {line}" for rank, lines in enumerate(failures) for line in lines]
    assert not failures, "\n".join(failures)
