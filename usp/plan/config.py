"""A parallel configuration, the rules that make it valid, and where its groups sit on the nodes.

Ranks are laid on a row-major mesh, outermost axis first: ``pp, dp, ring, ulysses, tp``
("head-first": Ulysses on adjacent ranks, inside a node) or ``pp, dp, ulysses, ring, tp``
("context-first"). Node ``n`` holds ranks ``[n*G, (n+1)*G)`` for ``G`` GPUs per node, so a
group is intra-node exactly when its lowest and highest rank share a node.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from functools import lru_cache

from usp.choices import LAYOUTS, PIPELINE_SCHEDULES
from usp.plan.specs import ClusterSpec, ModelSpec, Workload

MESH_ORDER = {
    "head-first": ("pp", "dp", "ring", "ulysses", "tp"),
    "context-first": ("pp", "dp", "ulysses", "ring", "tp"),
}
# The ranks that hold replicas of the same parameters and must sum their gradients: the data
# parallel ranks and the sequence-parallel ranks (each saw different tokens). ZeRO/FSDP shards
# over exactly this group.
SHARD_AXES = ("dp", "ring", "ulysses")
# What each activation-checkpointing choice recomputes in the backward (usp.parallel's --ac):
# "full" each whole block (keeping its input), "selective" each block's MLP, "attention" each
# block's attention (projections, RoPE, the USP attention with its collectives).
CHECKPOINTING = ("none", "full", "selective", "attention")
# How the loss meets the vocabulary: "gathered" = full-vocabulary fp32 logits on every TP rank
# (usp train --loss full); "vocab-parallel" = each TP rank keeps V/tp columns (tp > 1);
# "chunked" = logits made and consumed loss_chunk tokens at a time, recomputed in backward (tp 1).
LOSSES = ("gathered", "vocab-parallel", "chunked")
# usp train's names for the same losses and checkpointing kinds, accepted by --fix and --config
LOSS_ALIASES = {"full": "gathered", "vocab_parallel": "vocab-parallel"}
CHECKPOINTING_ALIASES = {"block": "full", "mlp": "selective"}


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the five axes plus the memory/overlap switches of one training setup."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ring: int = 1
    ulysses: int = 1
    zero: int = 0
    tp_sequence_parallel: bool = True
    micro_batches: int = 1
    checkpointing: str = "none"  # one of CHECKPOINTING; True/False read as "full"/"none"
    placement: str = "head-first"
    pp_schedule: str = "1f1b"
    loss: str = "gathered"
    loss_chunk: int = 1024  # tokens per chunk of the "chunked" loss
    mlp_tile: int = 0  # tiled MLP: tokens per tile, recomputed in backward (0: not tiled)
    # token layout over the ring (usp.layout): zigzag and stripe balance causal work and cost
    # the same; contiguous leaves the ring's last rank the most work
    layout: str = "zigzag"

    def __post_init__(self) -> None:
        if isinstance(self.checkpointing, bool):
            object.__setattr__(self, "checkpointing", "full" if self.checkpointing else "none")
        for name, allowed in (("checkpointing", CHECKPOINTING),
                              ("pp_schedule", PIPELINE_SCHEDULES), ("loss", LOSSES),
                              ("layout", LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        if not (isinstance(self.mlp_tile, int) and self.mlp_tile >= 0):
            raise ValueError(f"mlp_tile={self.mlp_tile!r} must be 0 (off) or a token count")
        for name in ("dp", "tp", "pp", "ring", "ulysses", "micro_batches", "loss_chunk"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero={self.zero!r} must be a ZeRO stage 0, 1, 2 or 3 (3 = FSDP)")
        if self.placement not in MESH_ORDER:
            raise ValueError(f"placement={self.placement!r}; choose one of {tuple(MESH_ORDER)}")

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
        if self.checkpointing != "none":
            features.append(f"checkpointing {self.checkpointing}")
        if self.loss != "gathered":
            features.append(f"{self.loss} loss")
        if self.mlp_tile:
            features.append("tiled MLP")
        return tuple(features)

    def label(self) -> str:
        tp_sp = "-sp" if self.tp > 1 and self.tp_sequence_parallel else ""
        parts = [f"dp{self.dp}", f"tp{self.tp}{tp_sp}", f"pp{self.pp}", f"ring{self.ring}",
                 f"uly{self.ulysses}", f"zero{self.zero}", f"mb{self.micro_batches}",
                 {"none": "no-ckpt", "full": "ckpt"}.get(self.checkpointing,
                                                         f"ckpt-{self.checkpointing}")]
        if self.ring > 1 and self.ulysses > 1:
            parts.append(self.placement)
        if self.pp > 1 and self.pp_schedule != "1f1b":
            parts.append(self.pp_schedule)
        if self.ring > 1 and self.layout != "zigzag":
            parts.append(self.layout)
        if self.loss != "gathered":
            parts.append(f"loss-{self.loss}" + (f"{self.loss_chunk}" if self.loss == "chunked"
                                                else ""))
        if self.mlp_tile:
            parts.append(f"mlp-tile{self.mlp_tile}")
        return " ".join(parts)

    @classmethod
    def parse(cls, text: str) -> "ParallelConfig":
        """``"ring=2,ulysses=8,zero=3,ckpt=full"``; unnamed fields keep their defaults."""
        return cls(**cls.parse_fields(text))

    @classmethod
    def parse_fields(cls, text: str) -> dict[str, object]:
        """The fields named in ``text`` (keys: field names, or the short and ``usp train`` names
        of ``aliases`` below) with values; losses and checkpointing also by usp train's names."""
        aliases = {"ckpt": "checkpointing", "ac": "checkpointing", "mb": "micro_batches",
                   "sp": "tp_sequence_parallel", "u": "ulysses", "r": "ring",
                   "schedule": "pp_schedule", "tile": "mlp_tile", "tiled_mlp": "mlp_tile",
                   "loss_chunk_tokens": "loss_chunk"}
        known = {f.name for f in fields(cls)}
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key, raw = aliases.get(key.strip(), key.strip()), raw.strip()
            if not sep or key not in known:
                raise ValueError(f"cannot read {item!r}; write key=value with keys {sorted(known)}")
            if key in ("placement", "pp_schedule", "layout"):
                values[key] = raw
            elif key == "loss":
                values[key] = LOSS_ALIASES.get(raw, raw)
            elif key == "checkpointing" and (raw in CHECKPOINTING or raw in CHECKPOINTING_ALIASES):
                values[key] = CHECKPOINTING_ALIASES.get(raw, raw)
            elif key in ("checkpointing", "tp_sequence_parallel"):
                if raw.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
                    kinds = f", or one of {CHECKPOINTING}" if key == "checkpointing" else ""
                    raise ValueError(f"{key}={raw!r}: write on/off, 1/0 or true/false{kinds}")
                values[key] = raw.lower() in ("1", "true", "on", "yes")
            else:
                try:
                    values[key] = int(raw)
                except ValueError:
                    raise ValueError(f"{key}={raw!r} must be an integer") from None
        return values


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
    if config.loss == "vocab-parallel" and model.vocab % config.tp:
        problems.append(Violation(
            "vocab by tp", f"vocab={model.vocab} is not divisible by tp={config.tp} "
            "(the vocab-parallel loss splits it)"))
    # what usp train refuses (usp.losses.check_loss, usp.parallel.check_memory_options)
    if config.loss == "vocab-parallel" and config.tp == 1:
        problems.append(Violation(
            "loss by tp", "loss=vocab-parallel splits the vocabulary over tp, and tp=1 splits "
            "nothing; use loss=chunked"))
    if config.loss == "chunked" and config.tp > 1:
        problems.append(Violation(
            "loss by tp", f"loss=chunked runs the whole output projection on each rank, which "
            f"tp={config.tp} splits; use loss=vocab-parallel"))
    if config.mlp_tile and config.checkpointing == "selective":
        problems.append(Violation(
            "tiled MLP", f"mlp_tile={config.mlp_tile} with checkpointing=selective would "
            "recompute the MLP twice; use checkpointing full or attention, or no tiled MLP"))
    if model.layers % config.pp:
        problems.append(Violation(
            "layers by pp", f"layers={model.layers} is not divisible by pp={config.pp}"))
    per_replica, rest = divmod(workload.global_batch, config.dp)
    if rest:
        problems.append(Violation(
            "batch by dp",
            f"global batch {workload.global_batch} is not divisible by dp={config.dp}"))
    elif per_replica % config.micro_batches:
        problems.append(Violation(
            "batch by micro-batches",
            f"batch per replica {per_replica} is not divisible into {config.micro_batches} "
            f"micro-batches"
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
    order = MESH_ORDER[config.placement]
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
