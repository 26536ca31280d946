"""The cases ``usp check`` runs: seeded, drawn alike on every rank, covering every feature early.

A case is one attention problem on one sequence grid: ``ring x ulysses`` (the rest of the world
is ``dp``; each dp replica draws its own tensors), a layout, causal or not, query and kv heads,
a length, a head dim and a mask (packed documents, a sliding window, padding, or several). It
runs in every dtype asked for.

The draws are round-robin over seeded permutations of each feature: every ``n`` consecutive
cases hold every one of a feature's ``n`` values, in a random pairing with the other features.
A short time budget therefore still visits every factorisation, layout, mask and head pattern.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from usp.choices import PLACEMENTS
from usp.layout import LAYOUTS, padded_length

NOT_A_TOKEN = -1
MASKS = ("none", "documents", "window", "documents+window", "padding", "padding+window",
         "documents+padding")
HEAD_PATTERNS = ("mha", "gqa", "mqa", "few-kv")  # few-kv: fewer kv heads than Ulysses ranks


@dataclass(frozen=True)
class Sizes:
    """The ranges shapes are drawn from (small on CPU; on CUDA large enough for fused kernels)."""

    seq_len: tuple[int, int]
    max_heads: int
    head_dims: tuple[int, ...]
    max_batch: int


SIZES = {
    "cpu": Sizes(seq_len=(30, 300), max_heads=8, head_dims=(8, 16, 16, 32, 64), max_batch=2),
    "cuda": Sizes(seq_len=(200, 1024), max_heads=16, head_dims=(64, 128, 64, 128, 96),
                  max_batch=2),
}


@dataclass(frozen=True)
class CheckCase:
    """One attention problem (see the module docstring).

    ``documents``: per batch row (one row: shared by the batch, passed as ``cu_seqlens``;
    several rows: passed as ``documents`` ids), the lengths of the packed documents, which may
    stop short of ``seq_len`` (the rest is no token). ``padding``: the real tokens of each batch
    row (right padding, passed as ``padding_mask``). ``window``: ``(left, right)``, -1 unbounded.
    """

    index: int
    ring: int
    ulysses: int
    dp: int
    placement: str
    layout: str
    causal: bool
    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    mask: str
    documents: tuple[tuple[int, ...], ...] | None = None
    window: tuple[int, int] | None = None
    padding: tuple[int, ...] | None = None
    seed: int = 0

    @property
    def slots(self) -> int:
        """The length the layout pads the sequence to (the padding path when it differs)."""
        return padded_length(self.seq_len, self.ring, self.ulysses, self.layout)

    def describe_mask(self) -> str:
        parts = []
        if self.documents is not None:
            count = max(len(row) for row in self.documents)
            rows = "/row" if len(self.documents) > 1 else ""
            parts.append(f"docs{count}{rows}")
        if self.window is not None:
            parts.append(f"win{self.window[0]},{self.window[1]}")
        if self.padding is not None:
            parts.append("pad")
        return "+".join(parts) or "-"

    def __str__(self) -> str:
        return (f"case {self.index}: ring={self.ring} ulysses={self.ulysses} dp={self.dp} "
                f"{self.placement} {self.layout} {'causal' if self.causal else 'full'} "
                f"B={self.batch} S={self.seq_len} heads={self.heads}/{self.kv_heads} "
                f"D={self.head_dim} mask={self.describe_mask()} seed={self.seed}")

    def mask_arguments(self) -> dict:
        """``usp_attention``'s mask keywords for this case (the real length included)."""
        arguments: dict = {"seq_len": self.seq_len}
        if self.window is not None:
            arguments["window"] = self.window
        if self.documents is not None:
            if len(self.documents) == 1:
                cuts = [0]
                for length in self.documents[0]:
                    cuts.append(cuts[-1] + length)
                arguments["cu_seqlens"] = torch.tensor(cuts, dtype=torch.int32)
            else:
                arguments["documents"] = self.document_ids()
        if self.padding is not None:
            arguments["padding_mask"] = (torch.arange(self.seq_len)[None, :]
                                         < torch.tensor(self.padding)[:, None])
        return arguments

    def document_ids(self) -> torch.Tensor:
        """``[rows, S]`` document ids of the documents alone, -1 past the last document."""
        rows = []
        for lengths in self.documents or ((self.seq_len,),):
            ids = torch.full((self.seq_len,), NOT_A_TOKEN, dtype=torch.int64)
            start = 0
            for number, length in enumerate(lengths):
                ids[start:start + length] = number
                start += length
            rows.append(ids)
        return torch.stack(rows)

    def token_ids(self) -> torch.Tensor:
        """``[rows, S]``: the document id of each position, -1 where there is no token (past the
        documents, or padding). One row when the whole batch shares it."""
        ids = self.document_ids()
        if self.padding is not None:
            real = torch.arange(self.seq_len)[None, :] < torch.tensor(self.padding)[:, None]
            ids = torch.where(real, ids.expand(len(self.padding), -1), NOT_A_TOKEN)
        return ids


def factorisations(world_size: int) -> list[tuple[int, int]]:
    """Every ``(ring, ulysses)`` whose product divides the world (the rest is dp), largest
    sequence groups first."""
    grids = [(ring, sequence // ring)
             for sequence in range(world_size, 0, -1) if world_size % sequence == 0
             for ring in range(1, sequence + 1) if sequence % ring == 0]
    return grids


class _RoundRobin:
    """Each call returns the next value of a stream of seeded permutations of ``values``."""

    def __init__(self, values, rng: random.Random) -> None:
        self.values, self.rng, self.queue = list(values), rng, []

    def next(self):
        if not self.queue:
            self.queue = self.rng.sample(self.values, len(self.values))
        return self.queue.pop()


def draw_cases(count: int, world_size: int, device_type: str, seed: int = 0,
               masks: tuple[str, ...] = MASKS) -> list[CheckCase]:
    """``count`` cases for a world of ``world_size`` ranks on ``device_type`` (see the module
    docstring); the same list for the same arguments on every rank."""
    rng = random.Random(seed)
    sizes = SIZES[device_type]
    streams = {
        "grid": _RoundRobin(factorisations(world_size), rng),
        "layout": _RoundRobin(LAYOUTS, rng),
        "mask": _RoundRobin(masks, rng),
        "heads": _RoundRobin(HEAD_PATTERNS, rng),
        "causal": _RoundRobin((True, False), rng),
        "placement": _RoundRobin(PLACEMENTS, rng),
    }
    cases = []
    for index in range(count):
        ring, ulysses = streams["grid"].next()
        placement = streams["placement"].next() if ring > 1 and ulysses > 1 else "head-first"
        seq_len = rng.randint(*sizes.seq_len)
        heads, kv_heads = _heads(streams["heads"].next(), ulysses, sizes.max_heads, rng)
        batch = rng.randint(1, sizes.max_batch)
        mask = streams["mask"].next()
        causal = streams["causal"].next()
        cases.append(CheckCase(
            index=index, ring=ring, ulysses=ulysses, dp=world_size // (ring * ulysses),
            placement=placement, layout=streams["layout"].next(), causal=causal, batch=batch,
            seq_len=seq_len, heads=heads, kv_heads=kv_heads,
            head_dim=rng.choice(sizes.head_dims), mask=mask,
            documents=_documents(batch, seq_len, rng) if "documents" in mask else None,
            window=_window(seq_len, causal, rng) if "window" in mask else None,
            padding=_padding(batch, seq_len, rng) if "padding" in mask else None,
            seed=rng.randrange(2**31),
        ))
    return cases


def _heads(pattern: str, ulysses: int, max_heads: int, rng: random.Random) -> tuple[int, int]:
    """``(query heads, kv heads)`` of a head pattern; odd counts come up often (head padding)."""
    if pattern == "mha":
        heads = rng.randint(1, max_heads)
        return heads, heads
    if pattern == "mqa":
        return rng.randint(2, max_heads), 1
    if pattern == "gqa":
        heads = rng.choice([h for h in range(4, max_heads + 1) if _proper_divisors(h)])
        return heads, rng.choice(_proper_divisors(heads))
    # fewer kv heads than Ulysses ranks: each kv head is replicated to several ranks
    kv_heads = rng.randint(1, max(1, ulysses - 1))
    groups = rng.randint(1, max(1, max_heads // kv_heads))
    return kv_heads * groups, kv_heads


def _proper_divisors(n: int) -> list[int]:
    return [d for d in range(2, n) if n % d == 0]


def _documents(batch: int, seq_len: int, rng: random.Random) -> tuple[tuple[int, ...], ...]:
    """Packed document lengths: shared by the batch or one set per row; one-token documents
    happen; the documents may stop short of the sequence (no tokens after them)."""
    rows = 1 if batch == 1 or rng.random() < 0.5 else batch

    def one_row() -> tuple[int, ...]:
        total = seq_len if rng.random() < 0.7 else rng.randint(seq_len // 2, seq_len)
        cuts = sorted(rng.sample(range(1, total), min(rng.randint(1, 5), total - 1)))
        if rng.random() < 0.3:  # a one-token document
            cuts = sorted(set(cuts) | {cuts[0] + 1} - {total})
        bounds = [0, *cuts, total]
        return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a)

    return tuple(one_row() for _ in range(rows))


def _window(seq_len: int, causal: bool, rng: random.Random) -> tuple[int, int]:
    left = rng.randint(0, seq_len // 2) if rng.random() < 0.85 else -1
    if causal:
        return left, 0
    right = rng.randint(0, seq_len // 3) if rng.random() < 0.85 else -1
    return (left, right) if (left, right) != (-1, -1) else (seq_len // 4, -1)


def _padding(batch: int, seq_len: int, rng: random.Random) -> tuple[int, ...]:
    """The real tokens of each batch row; the last row is padded, the others may be full."""
    return tuple(rng.randint(max(1, seq_len // 3), seq_len if row < batch - 1 else seq_len - 1)
                 for row in range(batch))
