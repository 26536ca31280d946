"""A parallel configuration, the rules that make it valid, and where its groups sit on the nodes.

The fields are the run spec's (:mod:`usp.spec`: ``ring``, ``microbatches``, ``ac``, ``loss``,
``tiled_mlp``...), with the values ``usp train`` takes, so a configuration and a spec convert
field for field (:mod:`usp.plan.spec_io`). Ranks are laid on a row-major mesh in the order of
``usp.choices.MESH_ORDERS`` (the one :class:`usp.topology.Topology` builds): ``pp, dp, ring,
ulysses, tp`` ("head-first": Ulysses on adjacent ranks, inside a node) or ``pp, dp, ulysses,
ring, tp`` ("context-first"). Node ``n`` holds ranks ``[n*G, (n+1)*G)`` for ``G`` GPUs per node,
so a group is intra-node exactly when its lowest and highest rank share a node.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from functools import lru_cache

from usp.choices import (
    DEFAULT_CHUNK_TOKENS, LAYOUTS, LOSSES, MESH_ORDERS, PIPELINE_SCHEDULES, PLACEMENTS,
)
from usp.plan.specs import ClusterSpec, ModelSpec, Workload

# The ranks that hold replicas of the same parameters and must sum their gradients: the data
# parallel ranks and the sequence-parallel ranks (each saw different tokens). ZeRO/FSDP shards
# over exactly this group.
SHARD_AXES = ("dp", "ring", "ulysses")
# The activation checkpointing the cost model prices (``usp train --ac``): "none"; "full" each
# whole block (keeping its input); "selective" each block's MLP; "attention" each block's
# attention (projections, RoPE, the USP attention with its collectives). usp train also takes
# the kinds by name ("block" is full, "mlp" selective) and lists of them ("attention,mlp"),
# which the planner does not cost.
AC = ("none", "selective", "attention", "full")
# Fields read as text; the rest are integers, and tp_sequence_parallel a yes/no
TEXT_FIELDS = {"ac": AC, "loss": LOSSES, "placement": PLACEMENTS,
               "pp_schedule": PIPELINE_SCHEDULES, "layout": LAYOUTS}


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the five axes plus the memory/overlap switches of one training setup.

    ``microbatches`` are the pipeline's (pp > 1) and ``grad_accum`` the micro-steps of gradient
    accumulation (pp = 1), as in ``usp train``; :attr:`sequential_micro_batches` is what the
    cost model counts. ``zero`` 3 is FSDP resharding after the forward, 2 keeps the parameters
    gathered until the backward (``usp train``'s two); 0 and 1 (replicated parameters and
    gradients, sharded optimizer for 1) are modelled for published comparisons, and
    ``tp_sequence_parallel=False`` (Megatron TP without sequence parallelism) likewise: the
    search offers neither (:func:`usp.plan.planner.enumerate_configs`).
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ring: int = 1
    ulysses: int = 1
    zero: int = 0
    tp_sequence_parallel: bool = True
    microbatches: int = 1
    grad_accum: int = 1
    ac: str = "none"
    placement: str = "head-first"
    pp_schedule: str = "1f1b"
    loss: str = "full"
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # tokens per chunk of the "chunked" loss
    tiled_mlp: int = 0  # tokens per tile of the MLP, recomputed in backward (0: not tiled)
    # token layout over the ring (usp.layout): zigzag and stripe balance causal work and cost
    # the same; contiguous leaves the ring's last rank the most work
    layout: str = "zigzag"
    # the layout ring attention runs on when not the layout's (usp_attention's ring_layout): its
    # blocks re-laid across the ring and back around each attention; None: the layout's
    ring_layout: str | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            check_field(item.name, getattr(self, item.name))
        if self.microbatches > 1 and self.pp == 1:
            raise ValueError(f"microbatches={self.microbatches} are pipeline micro-batches and "
                             f"pp=1 has no pipeline; use grad_accum={self.microbatches}")
        if self.grad_accum > 1 and self.pp > 1:
            raise ValueError(f"grad_accum={self.grad_accum} with pp={self.pp}: the pipeline "
                             f"runs the batch as micro-batches already; use "
                             f"microbatches={self.grad_accum * self.microbatches}")

    @property
    def sequential_micro_batches(self) -> int:
        """Micro-batches each rank runs one after another per optimizer step: the pipeline's
        (pp > 1) or the gradient-accumulation steps (pp = 1)."""
        return self.microbatches * self.grad_accum

    @property
    def sequence_size(self) -> int:
        return self.ring * self.ulysses

    @property
    def shard_size(self) -> int:
        """Size of the gradient-reduction / ZeRO group: dp x ring x ulysses."""
        return self.dp * self.sequence_size

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.sequence_size * self.tp

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    @property
    def memory_features(self) -> tuple[str, ...]:
        """The memory features this configuration uses, each trading time for memory."""
        features = []
        if self.ac != "none":
            features.append(f"ac {self.ac}")
        if self.loss != "full":
            features.append(f"{self.loss} loss")
        if self.tiled_mlp:
            features.append("tiled MLP")
        return tuple(features)

    def label(self) -> str:
        tp_sp = "-sp" if self.tp > 1 and self.tp_sequence_parallel else ""
        parts = [f"dp{self.dp}", f"tp{self.tp}{tp_sp}", f"pp{self.pp}", f"ring{self.ring}",
                 f"uly{self.ulysses}", f"zero{self.zero}"]
        if self.pp > 1:
            parts.append(f"mb{self.microbatches}")
        if self.grad_accum > 1:
            parts.append(f"accum{self.grad_accum}")
        parts.append(f"ac-{self.ac}")
        if self.ring > 1 and self.ulysses > 1:
            parts.append(self.placement)
        if self.pp > 1 and self.pp_schedule != "1f1b":
            parts.append(self.pp_schedule)
        if self.ring > 1 and self.layout != "zigzag":
            parts.append(self.layout)
        if self.ring > 1 and self.ring_layout not in (None, self.layout):
            parts.append(f"ring-on-{self.ring_layout}")
        if self.loss != "full":
            parts.append(f"loss-{self.loss}" + (f"{self.loss_chunk_tokens}"
                                                if self.loss == "chunked" else ""))
        if self.tiled_mlp:
            parts.append(f"tiled-mlp{self.tiled_mlp}")
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str) -> "ParallelConfig":
        """``"ring=2,ulysses=8,zero=3,ac=full"``; unnamed fields keep their defaults."""
        return cls(**cls.parse_fields(text))

    @classmethod
    def parse_fields(cls, text: str) -> dict[str, object]:
        """The fields named in ``text`` (``key=value`` joined by commas, the keys this class's
        field names, the run spec's) with their values."""
        known = [f.name for f in fields(cls)]
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = (part.strip() for part in item.partition("="))
            if not sep:
                raise ValueError(f"cannot read {item!r}; write key=value with keys "
                                 f"{', '.join(known)}")
            if key not in known:
                raise ValueError(f"unknown field {key!r} in {item!r}; the fields are "
                                 f"{', '.join(known)}")
            if key == "ring_layout":
                values[key] = None if raw.lower() == "none" else raw
            elif key in TEXT_FIELDS:
                values[key] = raw
            elif key == "tp_sequence_parallel":
                if raw.lower() not in ("true", "false"):
                    raise ValueError(f"tp_sequence_parallel={raw!r}: write true or false")
                values[key] = raw.lower() == "true"
            else:
                try:
                    values[key] = int(raw)
                except ValueError:
                    raise ValueError(f"{key}={raw!r} must be an integer") from None
        return values


_AC_HINT = (" (usp train's 'block' is 'full' and 'mlp' is 'selective'; lists of kinds such as "
            "'attention,mlp' are not costed)")


def check_field(name: str, value: object) -> None:
    """ValueError, naming it, for a value field ``name`` of :class:`ParallelConfig` cannot take
    (the rules between fields are the class's)."""
    if name == "ring_layout":
        if value is not None and value not in LAYOUTS:
            raise ValueError(f"ring_layout={value!r}; choose one of {LAYOUTS} or none")
    elif name in TEXT_FIELDS:
        if value not in TEXT_FIELDS[name]:
            raise ValueError(f"{name}={value!r}; choose one of {TEXT_FIELDS[name]}"
                             + (_AC_HINT if name == "ac" else ""))
    elif name == "tp_sequence_parallel":
        if not isinstance(value, bool):
            raise ValueError(f"tp_sequence_parallel={value!r} must be true or false")
    elif name == "zero":
        if value not in (0, 1, 2, 3):
            raise ValueError(f"zero={value!r} must be a ZeRO stage 0, 1, 2 or 3 (3 = FSDP)")
    elif name == "tiled_mlp":
        if not (isinstance(value, int) and value >= 0):
            raise ValueError(f"tiled_mlp={value!r} must be 0 (off) or a token count")
    elif not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{name}={value!r} must be a positive integer")


def effective_kv_heads(kv_heads: int, ulysses: int) -> int:
    """KV heads entering the Ulysses all-to-all: replicated up to ``ulysses`` when fewer."""
    return kv_heads if kv_heads % ulysses == 0 else ulysses


class Violation(str):
    """A broken rule: the sentence (with the numbers) plus the name of the rule, for grouping."""

    rule: str

    def __new__(cls, rule: str, text: str) -> "Violation":
        violation = super().__new__(cls, text)
        violation.rule = rule
        return violation


def check_config(workload: Workload, cluster: ClusterSpec,
                 config: ParallelConfig) -> list[Violation]:
    """Every divisibility rule the configuration breaks, each as a sentence with the numbers."""
    model: ModelSpec = workload.model
    problems: list[Violation] = []
    if config.world_size != cluster.world_size:
        problems.append(Violation(
            "world size",
            f"pp*dp*ring*ulysses*tp = {config.world_size} but the cluster has "
            f"{cluster.world_size} GPUs"
        ))
    for heads_name, heads in (("q_heads", model.q_heads), ("kv_heads", model.kv_heads)):
        if heads % config.tp:
            problems.append(Violation(
                "heads by tp", f"{heads_name}={heads} is not divisible by tp={config.tp}"))
    q_local, kv_local = model.q_heads // config.tp, model.kv_heads // config.tp
    if config.ulysses > 1 and not problems:
        if q_local % config.ulysses:
            problems.append(Violation(
                "heads by ulysses",
                f"q heads per tp rank {q_local} are not divisible by ulysses={config.ulysses}"
            ))
        if kv_local % config.ulysses and config.ulysses % kv_local:
            problems.append(Violation(
                "heads by ulysses",
                f"kv heads per tp rank {kv_local} neither divide nor are divided by "
                f"ulysses={config.ulysses} (kv heads are split, or replicated, a whole number "
                f"of times)"
            ))
    if model.scan is not None and config.tp > 1:
        problems.append(Violation(
            "tp for scans", f"tp={config.tp}: usp train splits a hybrid's layers over tp by "
            "transformers' tp plan, which its scan mixers do not have; use tp=1"))
    if model.scan is not None and config.ring > 1 and config.layout != "contiguous":
        problems.append(Violation(
            "layout for scans", f"layout={config.layout} with ring={config.ring}: a scan passes "
            "its state from each ring block to the next, so the blocks must be contiguous; use "
            "layout=contiguous"))
    if (config.ring > 1 and config.ring_layout == "zigzag"
            and (workload.seq_len // config.ring) % 2):
        problems.append(Violation(
            "ring layout", f"ring_layout=zigzag cuts each ring block of "
            f"{workload.seq_len // config.ring} tokens in halves, so it must be even; use "
            f"ring_layout=stripe"))
    if config.loss == "vocab_parallel" and model.vocab % config.tp:
        problems.append(Violation(
            "vocab by tp", f"vocab={model.vocab} is not divisible by tp={config.tp} "
            "(the vocab_parallel loss splits it)"))
    # what usp train refuses (usp.losses.check_loss, usp.parallel.check_memory_options,
    # usp.pipeline.check_pipeline)
    if config.loss == "vocab_parallel" and config.tp == 1:
        problems.append(Violation(
            "loss by tp", "loss=vocab_parallel splits the vocabulary over tp, and tp=1 splits "
            "nothing; use loss=chunked"))
    if config.loss == "chunked" and config.tp > 1:
        problems.append(Violation(
            "loss by tp", f"loss=chunked runs the whole output projection on each rank, which "
            f"tp={config.tp} splits; use loss=vocab_parallel"))
    if config.tiled_mlp and config.ac == "selective":
        problems.append(Violation(
            "tiled MLP", f"tiled_mlp={config.tiled_mlp} with ac=selective would recompute the "
            "MLP twice; use ac full or attention, or no tiled MLP"))
    if config.zero < 2 and config.shard_size > 1:
        problems.append(Violation(
            "zero", f"zero={config.zero} with dp x ring x ulysses = {config.shard_size}: usp "
            "train shards over them with FSDP, ZeRO stage 2 or 3; use zero=3 (or 2)"))
    if config.tp > 1 and not config.tp_sequence_parallel:
        problems.append(Violation(
            "tp without sequence parallelism", f"tp={config.tp} with tp_sequence_parallel=false: "
            "usp train's tensor parallelism always splits the sequence outside attention "
            "(Megatron-SP); use tp_sequence_parallel=true"))
    if config.pp > 1 and config.pp_schedule == "1f1b" and config.microbatches < config.pp:
        problems.append(Violation(
            "micro-batches by pp", f"microbatches={config.microbatches} < pp={config.pp}: 1F1B "
            f"needs at least one per stage; use pp_schedule=gpipe or more micro-batches"))
    if model.layers % config.pp:
        problems.append(Violation(
            "layers by pp", f"layers={model.layers} is not divisible by pp={config.pp}"))
    per_replica, rest = divmod(workload.global_batch, config.dp)
    if rest:
        problems.append(Violation(
            "batch by dp",
            f"global batch {workload.global_batch} is not divisible by dp={config.dp}"))
    elif per_replica % config.sequential_micro_batches:
        name = "microbatches" if config.pp > 1 else "grad_accum"
        problems.append(Violation(
            "batch by micro-batches",
            f"batch per replica {per_replica} is not divisible into {name}="
            f"{config.sequential_micro_batches} micro-batches"
        ))
    # zigzag cuts the sequence into 2*ring chunks (usp.layout), each ring block into ulysses
    # pieces; TP-sp splits each rank's tokens again over tp.
    tp_split = config.tp if config.tp > 1 and config.tp_sequence_parallel else 1
    zigzag = config.ring > 1 and config.layout == "zigzag"
    needed = math.lcm(config.sequence_size * tp_split, 2 * config.ring if zigzag else 1)
    if workload.seq_len % needed:
        factors = "ring*ulysses" + ("*tp" if tp_split > 1 else "")
        if zigzag:
            factors += ", and 2*ring for zigzag"
        problems.append(Violation(
            "sequence split",
            f"seq_len={workload.seq_len} is not a multiple of {needed} ({factors}); pad it to "
            f"{-(-workload.seq_len // needed) * needed}"
        ))
    return problems


@dataclass(frozen=True)
class GroupPlacement:
    """How one axis group (or group of axes) falls on the nodes, for its worst-placed member."""

    size: int
    intra_node: bool
    inter_peer_fraction: float  # share of a member's peers that sit on other nodes


def group_placement(config: ParallelConfig, gpus_per_node: int,
                    axes: tuple[str, ...]) -> GroupPlacement:
    order = MESH_ORDERS[config.placement]
    return _placement(tuple(config.size(a) for a in order), order, tuple(axes), gpus_per_node)


@lru_cache(maxsize=4096)
def _placement(sizes: tuple[int, ...], order: tuple[str, ...], axes: tuple[str, ...],
               gpus_per_node: int) -> GroupPlacement:
    strides = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
    inside = [i for i, a in enumerate(order) if a in axes]
    outside = [i for i, a in enumerate(order) if a not in axes]
    offsets = [sum(c * strides[i] for c, i in zip(coord, inside))
               for coord in itertools.product(*(range(sizes[i]) for i in inside))]
    size = len(offsets)
    intra, worst_fraction = True, 0.0
    for coord in itertools.product(*(range(sizes[i]) for i in outside)):
        base = sum(c * strides[i] for c, i in zip(coord, outside))
        per_node: dict[int, int] = {}
        for offset in offsets:
            node = (base + offset) // gpus_per_node
            per_node[node] = per_node.get(node, 0) + 1
        if len(per_node) > 1:
            intra = False
            fewest_together = min(per_node.values())
            worst_fraction = max(worst_fraction, (size - fewest_together) / (size - 1))
    return GroupPlacement(size=size, intra_node=intra, inter_peer_fraction=worst_fraction)
