"""Prefill and decode of a :class:`usp.models.Llama` over a sharded KV cache.

The model stays plain: for one forward, every layer's ``attention_fn`` is swapped for a function
that stores the layer's new keys and values (after RoPE) in the cache and attends through it,
and the original is put back afterwards.

- :func:`prefill` runs ``T`` new tokens, sharded by the cache's layout like a training batch
  (padded when the layout cannot split ``T`` evenly), against the ``P`` cached ones. The first
  prefill under pass-KV is :func:`usp.usp_attention` itself (ring x Ulysses); a continuation
  (``P > 0``) or pass-Q runs the rings of :mod:`usp.infer.attention` over the whole sequence
  group. Returns the logits of the last new token, on every rank.
- :func:`decode_step` runs one token per sequence, the same on every rank: the position comes
  from the cache, its K/V go to one rank (:meth:`ShardedKVCache.next_owner`), every rank
  computes the same logits.

Both run under ``torch.inference_mode()``: nothing here has a backward. A forward that raises
part-way leaves the cache unusable (some layers hold the new tokens, others not).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from usp.attention import usp_attention
from usp.attention.kernels import Kernel, default_scale, resolve_kernel
from usp.comm import nbytes, record
from usp.infer.attention import (
    RING_PASSES,
    causal_pieces,
    choose_ring_pass,
    decode_attention,
    pass_kv_attention,
    pass_q_attention,
)
from usp.infer.cache import ShardedKVCache
from usp.layout import shard_positions, shard_sequence
from usp.topology import Topology

Tensor = torch.Tensor


@dataclass
class _Forward:
    """What every layer of one forward shares: the mode, the rows to store, the ring plan."""

    cache: ShardedKVCache
    topology: Topology
    mode: str  # "usp" (first prefill, pass-KV), "kv", "q" or "decode"
    kernel_name: "str | Kernel"
    new_rows: int  # rows of this rank's input that are real new tokens (stored in the cache)
    seq_len: int = 0  # "usp": the prompt's length
    pieces_by_source: list = field(default_factory=list)  # "kv" / "q", by group rank
    key_rows: int = 0  # "kv": the longest shard
    kernel: Kernel | None = None

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self.topology.sequence_group if self.topology.sequence_size > 1 else None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor,
               documents: Tensor | None = None) -> Tensor:
        """The layer's attention: ``q [B, S_local, Hq, D]``, ``k/v [B, S_local, Hkv, D]``."""
        if documents is not None:
            raise ValueError("packed documents are not supported in generation")
        self.cache.store(layer, k[:, :self.new_rows], v[:, :self.new_rows])
        if self.kernel is None:
            self.kernel = resolve_kernel(self.kernel_name, q)
        if self.mode == "usp":
            return usp_attention(q, k, v, self.topology, causal=True, layout=self.cache.layout,
                                 seq_len=self.seq_len, kernel=self.kernel)
        scale = default_scale(q.shape[-1], None)
        keys, values = self.cache.layer(layer)
        if self.mode == "decode":
            return decode_attention(q, keys, values, self.group, scale, self.kernel)
        if self.mode == "kv":
            return pass_kv_attention(q, keys, values, self.key_rows, self.pieces_by_source,
                                     self.group, scale, self.kernel)
        return pass_q_attention(q, keys, values, self.pieces_by_source, self.group, scale,
                                self.kernel)


@contextmanager
def _attention_through(model, forward: _Forward):
    """Swap every layer's ``attention_fn`` for ``forward.attend`` of its index, then restore."""
    attentions = [layer.attention for layer in model.layers.values()]
    saved = [attention.attention_fn for attention in attentions]
    for index, attention in enumerate(attentions):
        attention.attention_fn = lambda q, k, v, documents=None, index=index: forward.attend(
            index, q, k, v, documents)
    try:
        yield
    finally:
        for attention, original in zip(attentions, saved):
            attention.attention_fn = original


def _check_call(model, cache: ShardedKVCache, tokens: Tensor, topology: Topology,
                new_tokens: int) -> None:
    """Every rank raises the same ValueError for a call the cache cannot take."""
    error = None
    try:
        cache.check(topology, cache.layout)
        config = model.config
        mine = (config.n_layers, config.n_kv_heads, config.head_dim)
        theirs = (cache.n_layers, cache.n_kv_heads, cache.head_dim)
        if mine != theirs:
            raise ValueError(f"the model has (layers, kv heads, head dim) {mine}, the cache "
                             f"{theirs}")
        if tokens.dim() != 2 or tokens.shape[0] != cache.batch or tokens.shape[1] < 1:
            raise ValueError(f"tokens {tuple(tokens.shape)} must be [batch={cache.batch}, T>=1]")
        cache.check_room(new_tokens)
    except ValueError as exc:
        error = str(exc)
    # the description holds no cache length, so a decode loop agrees once, not every step
    topology.agree_on_call({"infer_tokens": tuple(tokens.shape)}, error)


def _new_positions(cache: ShardedKVCache, topology: Topology, new_tokens: int) -> list[Tensor]:
    """Positions ``[slots]`` of each shard's slots of ``new_tokens`` after the cached ones; -1
    for the padding slots of an uneven length."""
    cached, ring, ulysses = cache.length, topology.ring_size, topology.ulysses_size
    result = []
    for index in range(topology.sequence_size):
        slots = shard_positions(new_tokens, ring, ulysses, index // ulysses, index % ulysses,
                                cache.layout)
        result.append(torch.where(slots < new_tokens, slots + cached, -1))
    return result


@torch.inference_mode()
def prefill(model, cache: ShardedKVCache, tokens: Tensor, topology: Topology, *,
            ring_pass: str = "auto", kernel: "str | Kernel" = "auto") -> Tensor:
    """Run ``tokens [B, T]`` (the same on every rank) after the cache's tokens, fill the cache
    with their K/V, return the last token's logits ``[B, vocab]`` on every rank.

    ``ring_pass``: ``"kv"``, ``"q"`` or ``"auto"`` (:func:`choose_ring_pass` with the model's
    head counts).
    """
    if ring_pass not in RING_PASSES:
        raise ValueError(f"ring_pass={ring_pass!r}; choose one of {RING_PASSES}")
    new_tokens = tokens.shape[-1] if tokens.dim() == 2 else 0
    _check_call(model, cache, tokens, topology, new_tokens)
    config, cached = model.config, cache.length
    if ring_pass == "auto":
        ring_pass = choose_ring_pass(new_tokens, cached, config.n_heads, config.n_kv_heads)
    slots = _new_positions(cache, topology, new_tokens)
    mine = slots[topology.sequence_rank]
    real = mine >= 0
    cache.extend([positions[positions >= 0] for positions in slots])
    forward = _Forward(cache, topology, "usp" if ring_pass == "kv" and cached == 0 else ring_pass,
                       kernel, new_rows=int(real.sum()), seq_len=new_tokens)
    if forward.mode != "usp":
        _plan_ring(forward, slots)
    local = shard_sequence(tokens, topology, cache.layout)  # [B, T] -> [B, slots/N]
    rope_positions = torch.where(real, mine, cached + new_tokens).to(tokens.device)
    with _attention_through(model, forward):
        hidden = model.hidden_states(local, rope_positions.expand_as(local))  # [B, S_local, dim]
    # the last new token's hidden state, from the rank that holds it, to every rank
    last = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])
    row = (mine == cached + new_tokens - 1).nonzero().flatten()
    if row.numel():
        last.copy_(hidden[:, int(row[0])][:, None])
    if forward.group is not None:
        record("all_reduce", 2 * nbytes(last) * (topology.sequence_size - 1)
               // topology.sequence_size)
        dist.all_reduce(last, group=forward.group)  # one rank's row plus zeros: exact
    return model.logits(last)[:, 0]


def _plan_ring(forward: _Forward, slots: list[Tensor]) -> None:
    """The pieces of every ring step, computed once for all layers."""
    cache, topology = forward.cache, forward.topology
    order = topology.sequence_index_of_group_rank  # group rank -> sequence index
    mine = slots[topology.sequence_rank]
    if forward.mode == "kv":
        forward.key_rows = max(cache.counts)
        forward.pieces_by_source = [causal_pieces(mine, cache.positions(index))
                                    for index in order]
    else:
        forward.pieces_by_source = [causal_pieces(slots[index], cache.positions())
                                    for index in order]


@torch.inference_mode()
def decode_step(model, cache: ShardedKVCache, tokens: Tensor, topology: Topology, *,
                kernel: "str | Kernel" = "auto") -> Tensor:
    """Run one token per sequence, ``tokens [B]`` (the same on every rank), after the cached
    ones; its K/V go to one rank's shard. Returns its logits ``[B, vocab]`` on every rank."""
    tokens = tokens.reshape(-1, 1)  # [B] -> [B, 1]
    _check_call(model, cache, tokens, topology, 1)
    position = cache.length
    owner = cache.next_owner()
    cache.extend([torch.tensor([position] if index == owner else [], dtype=torch.int64)
                  for index in range(cache.shards)])
    forward = _Forward(cache, topology, "decode", kernel,
                       new_rows=int(owner == topology.sequence_rank))
    with _attention_through(model, forward):
        hidden = model.hidden_states(tokens, torch.full_like(tokens, position))  # [B, 1, dim]
    return model.logits(hidden)[:, 0]

