"""ShardedKVCache: per layer, the keys and values (after RoPE) of this rank's own tokens.

A sequence sharded over ``ring x ulysses = N`` ranks leaves each token's K/V on the rank that
computed it: the prompt's tokens where the layout put them, each decoded token on the rank that
holds the fewest tokens (the lowest sequence rank among equals: round-robin once the shards are
even, so they stay within one token of each other). Every rank keeps the global positions of
**every** shard, updated identically everywhere from numbers all ranks know, so a ring step can
compute which of another rank's keys its queries see without sending a position.

The cache is tied to the topology and layout it was built for and to ``max_tokens``: using it
with another one, or growing past ``max_tokens``, raises ValueError naming the numbers (the same
on every rank: the checks read only numbers every rank holds).
"""

from __future__ import annotations

import torch

from usp.comm import all_gather_stacked
from usp.layout import check_layout, padded_length
from usp.topology import Topology

Tensor = torch.Tensor


class ShardedKVCache:
    """This rank's K/V shard ``[B, n, Hkv, D]`` per layer and the positions of every shard.

    Storage for ``padded_length(max_tokens) / N`` tokens per rank is allocated up front (what a
    prompt and its balanced decode need); a shard that needs more (chunked prefills of uneven
    lengths) grows.
    """

    def __init__(self, topology: Topology, layout: str, *, n_layers: int, n_kv_heads: int,
                 head_dim: int, max_tokens: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: "str | torch.device" = "cpu") -> None:
        check_layout(layout)
        for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim), ("max_tokens", max_tokens), ("batch", batch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ShardedKVCache {name}={value!r} must be a positive integer")
        if topology.size("tp") != 1:
            raise ValueError(f"tp={topology.size('tp')}: inference runs with tp=1 (sequence "
                             "parallelism only); put the ranks on ring and ulysses")
        self.layout, self.max_tokens, self.batch = layout, max_tokens, batch
        self.built_for = _describe(topology)
        self.shards = topology.sequence_size
        self.sequence_rank = topology.sequence_rank
        rows = padded_length(max_tokens, topology.ring_size, topology.ulysses_size,
                             layout) // self.shards
        shape = (batch, rows, n_kv_heads, head_dim)
        self._keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._positions = [torch.empty(0, dtype=torch.int64) for _ in range(self.shards)]
        self._write = slice(0, 0)  # the rows of this rank that the current forward fills

    @classmethod
    def for_model(cls, config, topology: Topology, layout: str, max_tokens: int, *,
                  batch: int = 1, dtype: torch.dtype = torch.float32,
                  device: "str | torch.device" = "cpu") -> "ShardedKVCache":
        """A cache for a :class:`usp.models.LlamaConfig`'s layers and heads."""
        return cls(topology, layout, n_layers=config.n_layers, n_kv_heads=config.n_kv_heads,
                   head_dim=config.head_dim, max_tokens=max_tokens, batch=batch, dtype=dtype,
                   device=device)

    # ------------------------------------------------------------------ queries
    @property
    def n_layers(self) -> int:
        return len(self._keys)

    @property
    def n_kv_heads(self) -> int:
        return self._keys[0].shape[2]

    @property
    def head_dim(self) -> int:
        return self._keys[0].shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self._keys[0].dtype

    @property
    def counts(self) -> list[int]:
        """Tokens held by each shard, by sequence index."""
        return [p.numel() for p in self._positions]

    @property
    def length(self) -> int:
        """Tokens in the whole cache (all shards)."""
        return sum(self.counts)

    def positions(self, index: int | None = None) -> Tensor:
        """Global positions ``[n]`` (increasing) held by shard ``index`` (default: this rank's)."""
        return self._positions[self.sequence_rank if index is None else index]

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """This rank's keys and values of ``layer``: ``[B, n, Hkv, D]`` each (views)."""
        count = self.counts[self.sequence_rank]
        return self._keys[layer][:, :count], self._values[layer][:, :count]

    @property
    def pending_rows(self) -> int:
        """Rows of this rank that the current forward writes (set by :meth:`extend`)."""
        return self._write.stop - self._write.start

    def shard_bytes(self) -> int:
        """Bytes of K/V storage this rank holds (all layers, allocated rows)."""
        return sum(t.numel() * t.element_size() for t in self._keys + self._values)

    def next_owner(self) -> int:
        """The shard a decoded token goes to: the fewest tokens, the lowest index among equals."""
        counts = self.counts
        return counts.index(min(counts))

    # ------------------------------------------------------------------ checks
    def check(self, topology: Topology, layout: str) -> None:
        """Raise ValueError unless this cache was built for ``topology`` and ``layout``."""
        here = _describe(topology)
        if here != self.built_for or layout != self.layout:
            raise ValueError(
                f"the KV cache was built for {_words(self.built_for)}, layout {self.layout!r}; "
                f"this call runs on {_words(here)}, layout {layout!r}: build a cache for this "
                "topology and layout"
            )

    def check_room(self, new_tokens: int) -> None:
        """Raise ValueError if ``new_tokens`` more would exceed ``max_tokens``."""
        if self.length + new_tokens > self.max_tokens:
            raise ValueError(
                f"{new_tokens} new tokens after the {self.length} cached make "
                f"{self.length + new_tokens}, more than the cache's max_tokens={self.max_tokens}; "
                "build the cache with a larger max_tokens"
            )

    # ------------------------------------------------------------------ writing
    def extend(self, new_positions: list[Tensor]) -> None:
        """Start a forward that adds ``new_positions[i]`` (increasing, after every cached
        position) to shard ``i``; each layer then writes this rank's rows with :meth:`store`."""
        if len(new_positions) != self.shards:
            raise ValueError(f"{len(new_positions)} shards of positions, the cache has "
                             f"{self.shards}")
        self.check_room(sum(p.numel() for p in new_positions))
        start = self.counts[self.sequence_rank]
        mine = new_positions[self.sequence_rank]
        self._reserve(start + mine.numel())
        self._positions = [torch.cat([old, new.to(torch.int64).cpu()])
                           for old, new in zip(self._positions, new_positions)]
        self._write = slice(start, start + mine.numel())

    def store(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """Write this rank's new keys and values ``[B, n, Hkv, D]`` of ``layer``."""
        expected = (self.batch, self.pending_rows, self.n_kv_heads, self.head_dim)
        if tuple(keys.shape) != expected or keys.shape != values.shape:
            raise ValueError(f"layer {layer} stores keys {tuple(keys.shape)} and values "
                             f"{tuple(values.shape)}; the cache expects {expected}")
        self._keys[layer][:, self._write] = keys
        self._values[layer][:, self._write] = values

    def _reserve(self, rows: int) -> None:
        allocated = self._keys[0].shape[1]
        if rows <= allocated:
            return
        grown = max(rows, 2 * allocated)
        for store in (self._keys, self._values):
            for index, old in enumerate(store):
                new = old.new_empty(old.shape[0], grown, *old.shape[2:])
                new[:, :allocated] = old
                store[index] = new

    # ------------------------------------------------------------------ inspection
    def gather(self, layer: int, topology: Topology) -> tuple[Tensor, Tensor]:
        """Every shard's keys and values of ``layer`` in global position order, on every rank:
        ``[B, length, Hkv, D]`` each (a collective over the sequence group; tests, debugging)."""
        self.check(topology, self.layout)
        keys, values = self.layer(layer)
        if self.shards == 1:
            return keys.clone(), values.clone()
        counts = self.counts
        padded = keys.new_zeros(2, self.batch, max(counts), self.n_kv_heads, self.head_dim)
        padded[0, :, :keys.shape[1]], padded[1, :, :values.shape[1]] = keys, values
        stacked = all_gather_stacked(padded, topology.sequence_group)  # [G, 2, B, L, Hkv, D]
        parts, positions = [], []
        for group_rank, index in enumerate(topology.sequence_index_of_group_rank):
            parts.append(stacked[group_rank, :, :, :counts[index]])
            positions.append(self._positions[index])
        order = torch.argsort(torch.cat(positions)).to(keys.device)
        whole = torch.cat(parts, dim=2).index_select(2, order)  # [2, B, length, Hkv, D]
        return whole[0], whole[1]


def _describe(topology: Topology) -> tuple:
    return (topology.ring_size, topology.ulysses_size, topology.placement,
            topology.sequence_rank)


def _words(description: tuple) -> str:
    ring, ulysses, placement, rank = description
    return f"ring={ring} x ulysses={ulysses} ({placement}, sequence rank {rank})"
