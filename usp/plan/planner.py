"""Enumerate every configuration, drop the invalid and the too big, rank the rest by step time.

The search covers what ``usp train`` runs: the degrees, ZeRO stage 2 or 3 (FSDP; none when
nothing is sharded), TP always with sequence parallelism, placement, pipeline micro-batches or
gradient-accumulation steps, and the memory features: activation checkpointing of each kind the
cost model prices, the chunked or vocabulary-parallel loss and the tiled MLP. Each feature trades time for memory and the cost
model charges its recompute, so a configuration without it ranks first whenever it fits; among
equal step times the one with fewer features wins.

:func:`plan` returns a :class:`Plan`; :func:`explain` says in sentences why its best entry wins
(each sentence computed from the cost model, none written in advance); :func:`no_fit_message`
says which constraint bites, and by how much, when nothing can run.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, fields, replace

from usp.choices import PLACEMENTS
from usp.plan.config import AC, ParallelConfig, Violation, check_config, check_field
from usp.plan.cost import StepCost, estimate
from usp.plan.memory import model_states
from usp.plan.specs import GIB, ClusterSpec, Workload

KNOBS = ("sequence split", "placement", "tp", "pp", "zero", "ac", "micro-batches", "loss",
         "tiled_mlp")
# The tiled MLP the search tries: 4096 tokens per tile keeps each tile's GEMMs large while its
# intermediates (3 x ffn per token) stay a small part of a long sequence's activations
SEARCHED_TILED_MLP = 4096
# The model's uncertainty on step times: configurations predicted within this fraction of the
# fastest tie (docs/planner.md, "Against published measurements", is where it was measured).
TIE_BAND = 0.03
# The memory model's accuracy against measured peaks (docs/planner.md, "Predicted vs measured
# memory": within 8 %): memories closer than this do not separate a tie either.
MEMORY_BAND = 0.10
# Fields the search does not vary (ring_layout: only for a hybrid): --fix sets them on every
# configuration instead of filtering
SET_BY_FIX = ("pp_schedule", "loss_chunk_tokens", "tiled_mlp", "layout", "ring_layout")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _factorisations(n: int, parts: int):
    """Ordered tuples of ``parts`` positive integers whose product is ``n``."""
    if parts == 1:
        yield (n,)
        return
    for first in _divisors(n):
        for rest in _factorisations(n // first, parts - 1):
            yield (first, *rest)


def _memory_features(tp: int):
    """(ac, loss, tiled_mlp) combinations usp train runs: the chunked loss needs tp 1, the
    vocabulary-parallel one tp > 1, and a tiled MLP is not checkpointed again (selective)."""
    losses = ("full", "chunked") if tp == 1 else ("full", "vocab_parallel")
    for ac, loss, tile in itertools.product(AC, losses, (0, SEARCHED_TILED_MLP)):
        if not (tile and ac == "selective"):
            yield ac, loss, tile


def _micro_batches(pp: int, per_replica: int):
    """(microbatches, grad_accum, pp_schedule) as usp train takes them: a pipeline splits each
    replica's batch into micro-batches (1F1B needs one per stage at least, GPipe runs fewer,
    and holds the same ones); without a pipeline, gradient accumulation does."""
    for count in _divisors(per_replica):
        if pp == 1:
            yield 1, count, "1f1b"
        else:
            yield count, 1, "1f1b" if count >= pp else "gpipe"


def enumerate_configs(workload: Workload, cluster: ClusterSpec) -> list[ParallelConfig]:
    """Every configuration ``usp train`` runs: degrees, ZeRO stage (2 or 3 when dp x ring x
    ulysses shards, else none), placement, micro-batches and memory features (ac, loss, tiled
    MLP); TP always with sequence parallelism."""
    configs = []
    # a hybrid's scans need each ring block contiguous (usp.scan); its attention may run the
    # ring on zigzag blocks, re-laid around it (usp_attention's ring_layout)
    hybrid = workload.model.scan is not None
    layout = "contiguous" if hybrid else ParallelConfig.layout
    for pp, dp, tp, ring, ulysses in _factorisations(cluster.world_size, 5):
        per_replica = workload.global_batch // dp if workload.global_batch % dp == 0 else 1
        ring_layouts = (None, "zigzag") if hybrid and ring > 1 and workload.causal else (None,)
        for zero, placement, (microbatches, grad_accum, schedule), (ac, loss, tile), ring_on in \
                itertools.product(
                    (2, 3) if dp * ring * ulysses > 1 else (0,),
                    PLACEMENTS if ring > 1 and ulysses > 1 else ("head-first",),
                    _micro_batches(pp, per_replica),
                    _memory_features(tp), ring_layouts):
            configs.append(ParallelConfig(
                dp=dp, tp=tp, pp=pp, ring=ring, ulysses=ulysses, zero=zero,
                microbatches=microbatches, grad_accum=grad_accum, pp_schedule=schedule, ac=ac,
                placement=placement, loss=loss, tiled_mlp=tile, layout=layout,
                ring_layout=ring_on,
            ))
    return configs


@dataclass
class Plan:
    workload: Workload
    cluster: ClusterSpec
    ranked: list[StepCost]  # fit in memory: the tie (below) first, then fastest first
    too_big: list[StepCost]  # valid but over the memory budget, smallest first
    invalid: list[tuple[ParallelConfig, list[Violation]]]  # with the rules each breaks
    tied: int = 1  # how many of ranked's first entries the model cannot separate in time

    @property
    def best(self) -> StepCost:
        if not self.ranked:
            raise ValueError(no_fit_message(self))
        return self.ranked[0]

    @property
    def ties(self) -> list[StepCost]:
        """The configurations predicted within :data:`TIE_BAND` of the fastest: the best is
        the one of them with the fewest memory features, then the least memory."""
        return self.ranked[:self.tied]


def _with_fixed(configs: list[ParallelConfig], fixed: dict[str, object]) -> list[ParallelConfig]:
    """The configurations whose searched fields equal ``fixed``'s, with its other fields
    (:data:`SET_BY_FIX`) set, each once."""
    filters = {key: value for key, value in fixed.items() if key not in SET_BY_FIX}
    settings = {key: value for key, value in fixed.items() if key in SET_BY_FIX}
    chosen = [config for config in configs
              if all(getattr(config, key) == value for key, value in filters.items())]
    if settings:
        chosen = [replace(config, **settings) for config in chosen]
    return list(dict.fromkeys(chosen))


def _rank_key(cost: StepCost) -> tuple:
    """Fastest first; at equal times fewer memory features, then less memory."""
    return (round(cost.step_time, 9), len(cost.config.memory_features), cost.memory_total)


def rank(costs: list[StepCost]) -> tuple[list[StepCost], int]:
    """Order fitting configurations: those within :data:`TIE_BAND` of the fastest first, then
    the rest, fastest first. Returns the order and the tie's size.

    The model cannot order the tie by time, so it orders it by what it can tell: fewer memory
    features (less recompute and less to go wrong); then memory, when one needs more than
    :data:`MEMORY_BAND` above the least (closer than that the memory model cannot separate
    them either); then the predicted time.
    """
    ordered = sorted(costs, key=_rank_key)
    if not ordered:
        return ordered, 0
    limit = ordered[0].step_time * (1 + TIE_BAND)
    tied = [cost for cost in ordered if cost.step_time <= limit]
    fewest = min(len(cost.config.memory_features) for cost in tied)
    least = min(cost.memory_total for cost in tied
                if len(cost.config.memory_features) == fewest)

    def tie_key(cost: StepCost) -> tuple:
        features = len(cost.config.memory_features)
        roomy = features == fewest and cost.memory_total <= least * (1 + MEMORY_BAND)
        return (features, not roomy, _rank_key(cost))

    return sorted(tied, key=tie_key) + ordered[len(tied):], len(tied)


def plan(workload: Workload, cluster: ClusterSpec, fixed: dict[str, object] | None = None) -> Plan:
    """Rank all configurations (optionally only those whose fields equal ``fixed``)."""
    fixed = fixed or {}
    names = {f.name for f in fields(ParallelConfig)}
    unknown = sorted(set(fixed) - names)
    if unknown:
        raise ValueError(f"cannot fix {unknown}: the configuration fields are {sorted(names)}")
    for name, value in fixed.items():
        check_field(name, value)  # ValueError, naming it, for a value no configuration takes
    ranked, too_big, invalid = [], [], []
    for config in _with_fixed(enumerate_configs(workload, cluster), fixed):
        problems = check_config(workload, cluster, config)
        if problems:
            invalid.append((config, problems))
            continue
        cost = estimate(workload, cluster, config)
        (ranked if cost.fits else too_big).append(cost)
    ranked, tied = rank(ranked)
    too_big.sort(key=lambda c: c.memory_total)
    return Plan(workload, cluster, ranked, too_big, invalid, tied)


def _knob_value(config: ParallelConfig, knob: str) -> object:
    if knob == "sequence split":
        return (config.ring, config.ulysses)
    if knob == "micro-batches":
        return config.sequential_micro_batches
    return getattr(config, knob)


def _describe(config: ParallelConfig, knob: str) -> str:
    value = _knob_value(config, knob)
    if knob == "sequence split":
        return f"ring {value[0]} x ulysses {value[1]}"
    if knob == "micro-batches":
        return (f"microbatches {value}" if config.pp > 1 else f"grad_accum {value}")
    if knob == "loss":
        return f"the {value} loss"
    if knob == "tiled_mlp":
        return f"a tiled MLP ({value} tokens)" if value else "no tiled MLP"
    return f"{knob} {value}"


def _link(cost: StepCost, axis: str) -> str:
    return "inside one node" if cost.placements[axis].intra_node else "across nodes"


def _feature_sentences(result: Plan, best: StepCost) -> list[str]:
    """What each memory feature of ``best`` saves and costs, against the same configuration
    without it."""
    c, usable = best.config, result.cluster.usable_bytes
    without = {}
    if c.ac != "none":
        without[f"ac {c.ac}"] = replace(c, ac="none")
    if c.loss != "full":
        without[f"the {c.loss} loss"] = replace(c, loss="full")
    if c.tiled_mlp:
        without[f"the tiled MLP ({c.tiled_mlp} tokens)"] = replace(c, tiled_mlp=0)
    sentences = []
    for name, plain in without.items():
        other = estimate(result.workload, result.cluster, plain)
        saved = (other.memory_total - best.memory_total) / GIB
        extra = best.step_time - other.step_time
        verdict = (f"without it {other.memory_total / GIB:.1f} GiB > {usable / GIB:.1f} GiB "
                   "budget" if not other.fits else "it fits without it too")
        sentences.append(f"{name} saves {saved:.1f} GiB per GPU for {extra:.3f} s of recompute "
                         f"({100 * extra / best.step_time:.1f}% of the step); {verdict}")
    return sentences


def _method_sentences(workload: Workload, best: StepCost) -> list[str]:
    c, step = best.config, best.step_time
    sentences = []
    by_kind = best.bytes_by_kind()
    if c.ulysses > 1:
        sentences.append(
            f"ulysses {c.ulysses} {_link(best, 'ulysses')}: its all-to-all sends "
            f"{by_kind['all_to_all'] / 1e9:.2f} GB per GPU per step and blocks for "
            f"{best.time['all_to_all']:.3f} s "
            f"({100 * best.time['all_to_all'] / step:.1f}% of the step)"
        )
    if c.ring > 1:
        sentences.append(
            f"ring {c.ring} {_link(best, 'ring')}: its P2P of {by_kind['p2p'] / 1e9:.2f} GB "
            f"per GPU "
            f"overlaps the attention compute, leaving {best.time['ring_exposed']:.3f} s exposed"
        )
    if c.tp > 1:
        sentences.append(
            f"tp {c.tp}{' with sequence parallelism' if c.tp_sequence_parallel else ''} "
            f"{_link(best, 'tp')}: {best.time['tp']:.3f} s of blocking collectives"
        )
    if c.zero and c.shard_size > 1:
        sharded, replicated = (
            max(sum(model_states(workload, config, stage).values())
                for stage in {0, config.pp - 1})
            for config in (c, replace(c, zero=0))
        )
        sentences.append(
            f"ZeRO-{c.zero} over dp x ring x ulysses = {c.shard_size} GPUs keeps model states at "
            f"{sharded / GIB:.2f} GiB per GPU instead of {replicated / GIB:.2f} GiB replicated"
        )
    if c.pp > 1:
        sentences.append(f"pp {c.pp} with {c.microbatches} micro-batches: bubble "
                         f"{best.time['bubble']:.3f} s")
    return sentences


def _tie_sentences(result: Plan) -> list[str]:
    """How many configurations tie with the pick, and why the pick is the one named."""
    if result.tied < 2:
        return []
    best, ties = result.best, result.ties
    fastest = min(ties, key=_rank_key)
    sentence = (f"{result.tied} configurations are predicted within {100 * TIE_BAND:g}% of the "
                f"fastest (the model's uncertainty): they tie")
    if fastest is best:
        return [sentence + "; the pick is also the fastest of them"]
    reasons = []
    if len(best.config.memory_features) < len(fastest.config.memory_features):
        reasons.append(f"{len(best.config.memory_features)} memory features against "
                       f"{len(fastest.config.memory_features)}")
    if best.memory_total < fastest.memory_total / (1 + MEMORY_BAND):
        reasons.append(f"{best.memory_total / GIB:.1f} GiB per GPU against "
                       f"{fastest.memory_total / GIB:.1f}")
    ahead = 100 * (best.step_time / fastest.step_time - 1)
    return [sentence + f"; picked for {' and '.join(reasons) or 'its rank'} over the fastest "
            f"({fastest.config.label()}), predicted {ahead:.1f}% faster"]


def explain(result: Plan) -> list[str]:
    """Why the best configuration wins: what each of its methods costs, the best rival per knob."""
    best = result.best
    sentences = _tie_sentences(result) + _method_sentences(result.workload, best)
    sentences += _feature_sentences(result, best)
    usable = result.cluster.usable_bytes / GIB
    for knob in KNOBS:
        own = _knob_value(best.config, knob)
        rivals = [c for c in result.ranked if _knob_value(c.config, knob) != own]
        if rivals:
            rival = min(rivals, key=_rank_key)  # the fastest that differs in this knob
            gaps = {k: rival.time[k] - best.time[k] for k in best.time}
            main = max(gaps, key=gaps.get)
            slower = 100 * (rival.step_time / best.step_time - 1)
            verdict = "as fast (within 0.05%)"
            if abs(slower) < 100 * TIE_BAND and abs(slower) >= 0.05:
                verdict = (f"{abs(slower):.1f}% {'slower' if slower > 0 else 'faster'}: a tie "
                           f"(within the model's {100 * TIE_BAND:g}% uncertainty)")
            elif slower >= 0.05:
                verdict = (f"{slower:.1f}% slower, mostly {main.replace('_', ' ')} "
                           f"(+{gaps[main]:.3f} s)")
            sentences.append(
                f"best with {_describe(rival.config, knob)} ({rival.config.label()}) is {verdict}"
            )
            continue
        oversized = [c for c in result.too_big if _knob_value(c.config, knob) != own]
        if oversized:
            smallest = oversized[0]
            sentences.append(
                f"{_describe(smallest.config, knob)} does not fit: its smallest configuration "
                f"needs "
                f"{smallest.memory_total / GIB:.1f} GiB > {usable:.1f} GiB usable"
            )
    return sentences


def no_fit_message(result: Plan) -> str:
    """Which constraint leaves no configuration, and by how much."""
    usable = result.cluster.usable_bytes / GIB
    if result.too_big:
        smallest = result.too_big[0]
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in smallest.memory.items())
        largest = max(smallest.memory, key=smallest.memory.get)
        return (
            f"nothing fits in {result.cluster.budget()} per GPU: the smallest configuration "
            f"({smallest.config.label()}) needs {smallest.memory_total / GIB:.1f} GiB ({parts}), "
            f"{(smallest.memory_total / GIB - usable):.1f} GiB too much; {largest} dominate - "
            + ("add GPUs or shorten the sequence" if largest == "activations"
               else "add GPUs or use a smaller model")
        )
    if not result.invalid:
        return ("no configuration matches the fixed fields; relax --fix (the search offers "
                "what usp train runs: zero 2 or 3 when dp x ring x ulysses > 1, else 0, and "
                "tensor parallelism with tp_sequence_parallel=true)")
    # The binding rules: those that alone reject a configuration (lifting one would admit some).
    sole = Counter(problems[0].rule for _, problems in result.invalid if len(problems) == 1)
    counted = sole or Counter(p.rule for _, problems in result.invalid for p in problems)
    example = {p.rule: p for _, problems in result.invalid for p in reversed(problems)}
    common = "; ".join(f"{rule}: {count} configurations, e.g. {example[rule]}"
                       for rule, count in counted.most_common(3))
    return (
        f"no configuration of {result.cluster.world_size} GPUs is valid for this model and "
        f"workload; the rules that reject them{' alone' if sole else ''}: {common}"
    )
