"""Packed batches from a store: the windows and order ``usp train`` always cut, documents from
the store's offsets, the loss mask as targets, the exact count of the labels that carry loss
after shard_batch, the held-out split, resume at the next unseen window; and host memory that
does not grow with the corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_helpers import CONVERSATIONS, save_tokenizer, write_jsonl
from tests.test_data import _rank_topologies
from usp.batch import IGNORE_INDEX, shard_batch
from usp.data import DataSpec, PackedBatcher, TokenStore, hold_out, prepare
from usp.data.store import StoreWriter
from usp.inputs.byte_tokens import EOT
from usp.training.data import document_tokens, documents_of_windows
from usp.training.evaluate import held_out_split

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [f"document {n} " * (n % 5 + 1) for n in range(40)]


def _text_store(tmp_path) -> TokenStore:
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": d} for d in DOCUMENTS])
    return prepare(DataSpec(paths=(str(path),), cache=str(tmp_path / "cache"))).store


def _chat(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS * 6])
    spec = DataSpec(paths=(str(data),), chat_field="messages", cache=str(tmp_path / "cache"),
                    tokenizer=str(save_tokenizer(tmp_path / "tok")))
    return spec, prepare(spec).store


def test_windows_order_and_documents_are_the_byte_streams(tmp_path):
    """The windows of seq_len + 1 overlapping by one, in randperm's order of (seed, epoch), and
    the documents an EOT closes: what the token stream always gave."""
    store, stream = _text_store(tmp_path), document_tokens(DOCUMENTS)
    seq_len, batch, seed = 16, 3, 5
    batcher = PackedBatcher(store, batch, seq_len, seed)
    windows = (stream.numel() - 1) // seq_len
    order = [torch.randperm(windows, generator=torch.Generator().manual_seed(seed * 2**31 + e))
             for e in range(2)]
    expected = [stream[int(start) * seq_len:int(start) * seq_len + seq_len + 1]
                for epoch in order for start in epoch]
    got = [batcher.next_batch() for _ in range(2 * windows // batch)]
    tokens = torch.cat([b.tokens for b in got])
    assert torch.equal(tokens, torch.stack(expected[:len(tokens)]))
    documents = torch.cat([b.documents for b in got])
    assert torch.equal(documents, documents_of_windows(tokens, EOT))
    assert all(torch.equal(b.targets, b.tokens) for b in got)  # text: every token a target


def test_targets_carry_the_mask_and_the_global_label_count_is_exact(tmp_path):
    spec, store = _chat(tmp_path)
    seq_len = 32
    batcher = PackedBatcher(store, 4, seq_len, seed=1, render=spec.render())
    batch = batcher.next_batch()
    mask = torch.from_numpy(store.read_mask(0, store.num_tokens))
    tokens = torch.from_numpy(store.read_tokens(0, store.num_tokens))
    for row in range(4):  # each row is a run of the stream: find it and compare
        starts = [s for s in range(0, store.num_tokens - seq_len, seq_len)
                  if torch.equal(tokens[s:s + seq_len + 1], batch.tokens[row])]
        window = slice(starts[0], starts[0] + seq_len + 1)
        assert torch.equal(batch.targets[row],
                           tokens[window].masked_fill(~mask[window], IGNORE_INDEX))
    # a label counts iff its token is the assistant's and the same document continues
    same = batch.documents[:, 1:] == batch.documents[:, :-1]
    expected = int(((batch.targets[:, 1:] != IGNORE_INDEX) & same).sum())
    assert expected > 0
    for degrees in [(1, 1, 1, 1), (1, 2, 2, 1), (2, 1, 2, 1), (1, 2, 1, 2)]:
        counted = 0
        for topology in _rank_topologies(*degrees):
            if topology.rank("tp") != 0:
                continue  # tp ranks hold copies
            shard = shard_batch(batch.tokens, topology, "stripe", targets=batch.targets,
                                documents=batch.documents)
            counted += int((shard["labels"] != IGNORE_INDEX).sum())
        assert counted == expected, degrees


def test_the_state_resumes_at_the_next_unseen_window(tmp_path):
    spec, store = _chat(tmp_path)
    straight = PackedBatcher(store, 3, 12, seed=7, render=spec.render())
    batches = [straight.next_batch() for _ in range(12)]  # more than one epoch
    assert straight.epoch >= 1
    first = PackedBatcher(store, 3, 12, seed=7, render=spec.render())
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    assert json.loads(json.dumps(state)) == state  # small, plain, global (no rank in it)
    resumed = PackedBatcher(store, 3, 12, seed=7, render=spec.render())
    resumed.load_state_dict(state)
    for expected in batches[3:]:
        got = resumed.next_batch()
        for name in ("tokens", "targets", "documents"):
            assert torch.equal(getattr(got, name), getattr(expected, name))
    all_tokens = PackedBatcher(store, 3, 12, seed=7, render={**spec.render(), "loss_on": "all"})
    with pytest.raises(ValueError, match="resume with the same --text-field, --chat-field, "
                                         "--loss-on and chat template"):
        all_tokens.load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens=.* but this run has num_tokens=40"):
        PackedBatcher(TokenStore.in_memory(np.arange(40)), 3, 12, seed=7).load_state_dict(state)


def test_the_held_out_split_is_the_streams(tmp_path):
    store, stream = _text_store(tmp_path), document_tokens(DOCUMENTS)
    training, held = hold_out(store, global_batch=2, seq_len=10, batches=3)
    stream_training, stream_held = held_out_split(stream, global_batch=2, seq_len=10, batches=3)
    assert training.num_tokens == stream_training.numel()
    assert held.num_tokens == stream_held.tokens.numel()
    for got, expected in zip(held.batches(), stream_held.batches(), strict=True):
        assert torch.equal(got.tokens, expected)
        assert torch.equal(got.documents, documents_of_windows(expected, EOT))
    with pytest.raises(ValueError, match="fewer than --global-batch=2"):
        hold_out(store, global_batch=2, seq_len=10, batches=10_000)


# ---------------------------------------------------------------------------- host memory
def _write_store(directory: Path, tokens: int) -> None:
    writer = StoreWriter(directory, vocab_size=50_000, with_mask=True)
    generator = np.random.default_rng(0)
    for _ in range(tokens // 1_000_000):
        lengths = np.full(1000, 1000)
        writer.append(generator.integers(0, 50_000, 1_000_000), lengths,
                      generator.integers(0, 2, 1_000_000))
    writer.finish(skipped=0)


_READ_THROUGH = """
import json, sys
from pathlib import Path
from usp.data import PackedBatcher, TokenStore
def rss_kib():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}
store = TokenStore.open(Path(sys.argv[1]))
batcher = PackedBatcher(store, 8, 4096, seed=0)
before = rss_kib()
for _ in range(batcher.num_windows // 8):  # one whole epoch
    batcher.next_batch()
after = rss_kib()
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"before": before, "after": after, "peak_kib": peak,
                  "windows": batcher.num_windows}))
"""


def test_host_memory_stays_flat_when_the_corpus_grows_tenfold(tmp_path):
    """Read a whole epoch of a 4M-token and a 40M-token store (uint16 tokens and a mask: 12 MB
    and 120 MB on disk) in fresh processes: the resident memory after the epoch must not grow
    with the corpus (a loose sanity bound; the numbers are printed for the docs)."""
    results = {}
    for tokens in (4_000_000, 40_000_000):
        store = tmp_path / f"store{tokens}"
        _write_store(store, tokens)
        run = subprocess.run([sys.executable, "-c", _READ_THROUGH, str(store)], capture_output=True,
                             text=True, timeout=600, cwd=ROOT,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert run.returncode == 0, run.stderr
        results[tokens] = json.loads(run.stdout.strip().splitlines()[-1])
    print(results)
    small, large = results[4_000_000], results[40_000_000]
    corpus_growth_kib = 36_000_000 * 3 // 1024  # tokens (2 bytes) and mask (1 byte)
    growth = large["after"]["VmRSS"] - small["after"]["VmRSS"]
    assert growth < corpus_growth_kib / 10, results  # far below the corpus's growth
