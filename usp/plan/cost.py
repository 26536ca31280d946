"""The cost of one training step under one configuration: FLOPs, bytes by kind and link, time.

Time is modelled per pipeline stage and micro-batch, layer by layer, with the overlap each method
allows (docs/cost-model.md derives every term): the Ulysses all-to-all and the TP collectives
block the compute that needs their result; the ring's P2P of the next k/v block runs under the
attention of the current one; FSDP prefetches a layer's parameters during the previous layer's
compute; the data-parallel gradient reduction runs under the last micro-batch's backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from usp.plan.attention_time import (USP_RING, AttentionShape, RingImplementation,
                                     attention_time, relayout_moved)
from usp.plan.collectives import KINDS, attention_traffic, sent_bytes, transfer_seconds
from usp.plan.config import SHARD_AXES, GroupPlacement, ParallelConfig, group_placement
from usp.plan.memory import layer_params_per_gpu, memory_per_gpu, shapes, stage_params
from usp.plan.scans import scan_traffic
from usp.plan.specs import ClusterSpec, Workload

# AdamW reads master, grad, m, v (14 B per parameter) and writes master, m, v, bf16 copy (14 B)
OPTIMIZER_BYTES_MOVED = 28


@dataclass
class StepCost:
    """Everything the model predicts for one configuration; bytes and seconds are per GPU."""

    config: ParallelConfig
    memory: dict[str, float]
    usable_memory: float
    comm_bytes: dict[tuple[str, str], float]
    time: dict[str, float]
    step_time: float
    model_flops: float
    tokens_per_second: float
    mfu: float
    placements: dict[str, GroupPlacement] = field(repr=False, default_factory=dict)

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.memory_total <= self.usable_memory

    def bytes_by_kind(self) -> dict[str, float]:
        totals = dict.fromkeys(KINDS, 0.0)
        for (kind, _link), value in self.comm_bytes.items():
            totals[kind] += value
        return totals


def model_flops_per_sequence(workload: Workload) -> float:
    """Forward FLOPs of one sequence: linear layers, causal-aware attention, the scans (a
    hybrid's), LM head."""
    m, seq = workload.model, workload.seq_len
    linear = 2 * seq * m.layers * m.linear_params_per_layer
    pairs = seq * (seq + 1) / 2 if workload.causal else seq * seq
    attention = 4 * m.attention_count * m.q_heads * m.head_dim * pairs
    scans = seq * m.scan.layers * m.scan.forward_flops_per_token if m.scan else 0.0
    head = 2 * seq * m.hidden * m.vocab
    return linear + attention + scans + head


class _Ledger:
    """Accumulates the bytes a GPU sends per step by (kind, link) and prices one transfer."""

    def __init__(self, cluster: ClusterSpec) -> None:
        self.cluster = cluster
        self.bytes: dict[tuple[str, str], float] = {}

    def add(self, kind: str, sent: float, calls: int, placement: GroupPlacement,
            repeat: float) -> float:
        """Record ``repeat`` transfers of ``sent`` bytes (``calls`` calls each); time one."""
        if sent == 0 or placement.size == 1:
            return 0.0
        if placement.intra_node:
            shares = {"intra": 1.0}
        elif kind == "all_to_all":
            remote = placement.inter_peer_fraction
            shares = {"intra": 1.0 - remote, "inter": remote}
        else:
            shares = {"inter": 1.0}
        for link, share in shares.items():
            if share:
                self.bytes[(kind, link)] = self.bytes.get((kind, link), 0.0) + repeat * sent * share
        return transfer_seconds(kind, sent, calls, placement, self.cluster)


def relayout_time(workload: Workload, config: ParallelConfig, s,
                  place: dict[str, GroupPlacement], ledger: "_Ledger", repeat: float) -> float:
    """Seconds one attention pass spends re-laying its ring blocks (``ring_layout``): q, k and
    v into the ring's layout and the output back (the backward moves their gradients the same
    way), one all-to-all over the ring each, blocking; books the bytes ``repeat`` times."""
    target = config.ring_layout or config.layout
    moved = relayout_moved(config.ring, config.layout, target)
    if not moved:
        return 0.0
    # after the Ulysses all-to-all a rank holds its ring block for its slice of the heads
    heads = (2 * s.q_heads + 2 * s.kv_heads_attention) / config.ulysses
    sent = (moved * s.micro_batch * (workload.seq_len // config.ring) * heads
            * workload.model.head_dim * workload.element_bytes)
    return ledger.add("all_to_all", sent, 4, place["ring"], repeat=repeat)


@dataclass(frozen=True)
class ScanLayerTime:
    """One scan layer of one micro-batch on one GPU: its compute forward and backward (the
    slowest rank's: a block between the chain's first and last also builds ``M``), and its
    blocking communication per pass (the all-to-alls, the chain's hops one after another, the
    halo)."""

    forward: float
    backward: float
    communication: float


def scan_layer_time(workload: Workload, cluster: ClusterSpec, config: ParallelConfig, s,
                    place: dict[str, GroupPlacement], ledger: "_Ledger", rate: float,
                    passes: float) -> ScanLayerTime:
    """Price one scan layer (``usp.scan`` as ``ulysses="auto"`` runs it) and book its bytes
    ``passes`` times (the layer executions of a step times its forward passes and backward)."""
    scan, e = workload.model.scan, workload.element_bytes
    ring, ulysses = config.ring, config.ulysses
    traffic = scan_traffic(scan, s.micro_batch, s.tokens, e, ring, ulysses)
    # every rank scans tokens x heads of one sequence shard's worth: S/(RU) x H (the state
    # along every shard), or S/R x H/U (the heads split); a middle block also builds M
    per_token = scan.forward_flops_per_token + (
        scan.transition_flops_per_token if traffic.middle else 0.0)
    work = s.micro_batch * s.tokens * per_token
    a2a = ledger.add("all_to_all", traffic.all_to_all_inputs + traffic.all_to_all_output, 2,
                     place["ulysses"], repeat=passes)
    chain_place = place["ring"] if ring > 1 else place["ulysses"]
    hop = ledger.add("p2p", traffic.state, 1, chain_place, repeat=passes)
    ulysses_hop = transfer_seconds("p2p", traffic.state, 1, place["ulysses"], cluster)
    chain = traffic.ring_links * (hop if ring > 1 else 0.0) + traffic.ulysses_links * ulysses_hop
    halo = ledger.add("p2p", traffic.halo, 1, chain_place, repeat=passes)
    return ScanLayerTime(work / rate, 2 * work / rate, a2a + chain + halo)


def estimate(workload: Workload, cluster: ClusterSpec, config: ParallelConfig,
             ring_implementation: RingImplementation = USP_RING) -> StepCost:
    """Predict memory, traffic and time of one step; ``config`` must pass ``check_config``.
    ``ring_implementation``: what the ring does besides its kernel (usp's own by default)."""
    model, e, s = workload.model, workload.element_bytes, shapes(workload, config)
    R, U, t, p = config.ring, config.ulysses, config.tp, config.pp
    m = config.sequential_micro_batches
    place = {axis: group_placement(config, cluster.gpus_per_node, (axis,))
             for axis in ("ring", "ulysses", "tp", "pp")}
    place["shard"] = shard = group_placement(config, cluster.gpus_per_node, SHARD_AXES)
    ledger = _Ledger(cluster)
    runs = s.layers * m  # layer executions per GPU per step
    # checkpointing repeats the forward of what it recomputes: the whole block, its MLP
    # ("selective") or its attention (projections, the USP attention and its collectives)
    attention_forwards = 2 if config.ac in ("full", "attention") else 1
    mlp_forwards = 2 if config.ac in ("full", "selective") else 1
    # a tiled MLP runs each tile's forward again in its backward (inside the TP region: no
    # collective of its own), on top of any checkpoint's recompute
    tiled_mlp_forwards = 1 if config.tiled_mlp else 0
    # a scan layer's mixer is recomputed only by a full checkpoint ("attention" checkpoints
    # the softmax attention, "selective" the MLP)
    scan_forwards = 2 if config.ac == "full" else 1
    # the average layer (a hybrid's): the shares of layers with attention, a scan and an MLP,
    # and the shares of its linear work in each
    with_attention, with_scan, with_mlp = model.shares
    per_layer = model.linear_params_per_layer
    mlp_share = with_mlp * model.mlp_linear_params / per_layer
    scan_share = with_scan * model.scan.linear_params / per_layer if model.scan else 0.0
    attention_share = 1 - mlp_share - scan_share
    # oversubscribed CPU ranks share cores: slower compute, and transfers that hide nothing
    shared, hides = cluster.oversubscription, cluster.oversubscription == 1
    peak, hbm = cluster.peak_tflops * 1e12 / shared, cluster.hbm_bandwidth_gbs * 1e9 / shared
    matmul_rate = peak * cluster.matmul_efficiency

    # --- compute of one layer for one micro-batch on one GPU ---
    linear_flops = 2 * s.micro_batch * s.tokens * per_layer / t
    seq = workload.seq_len
    linear_fwd = linear_flops / matmul_rate
    linear_bwd = 2 * linear_fwd

    # --- sequence-parallel attention: the exact traffic of usp_attention, its time ---
    traffic = attention_traffic(s.micro_batch, seq, s.q_heads, s.kv_heads, model.head_dim, e, R, U)
    ledger.add("all_to_all", traffic.all_to_all_forward, 2, place["ulysses"],
               repeat=runs * with_attention * (attention_forwards + 1))
    # The ring's bytes are booked per pass; its time is priced per hop (one message each).
    ledger.add("p2p", attention_forwards * traffic.p2p_forward + traffic.p2p_backward, 0,
               place["ring"], repeat=runs * with_attention)
    attention = attention_time(
        AttentionShape(s.micro_batch, seq, s.q_heads, s.kv_heads, model.head_dim, e,
                       workload.causal),
        traffic, cluster, place["ulysses"], place["ring"], config.ring_layout or config.layout,
        rate_share=1 / shared, hides=hides, implementation=ring_implementation)
    relaid = relayout_time(workload, config, s, place, ledger,
                           repeat=runs * with_attention * (attention_forwards + 1))
    # the attention's figures for the average layer: weighed by the share of layers with it
    attention_fwd = with_attention * attention.compute_forward
    attention_bwd = with_attention * attention.compute_backward
    a2a = with_attention * (attention.all_to_all + relaid)
    kv_hop = with_attention * attention.kv_hop
    grad_hop = with_attention * attention.grad_hop
    ring_fwd, ring_bwd = (with_attention * attention.ring_forward,
                          with_attention * attention.ring_backward)
    merge_fwd, merge_bwd = (with_attention * attention.merge_forward,
                            with_attention * attention.merge_backward)
    # and a scan's (usp.scan: its compute, the all-to-alls, the chain of states, the halo)
    scan_fwd = scan_bwd = scan_comm = 0.0
    if model.scan is not None:
        scan = scan_layer_time(workload, cluster, config, s, place, ledger,
                               peak * cluster.matmul_efficiency,
                               passes=runs * with_scan * (scan_forwards + 1))
        scan_fwd, scan_bwd = with_scan * scan.forward, with_scan * scan.backward
        scan_comm = with_scan * scan.communication
    compute_fwd = linear_fwd + attention_fwd + scan_fwd
    compute_bwd = linear_bwd + attention_bwd + scan_bwd

    # --- tensor parallelism (Megatron), with or without its sequence parallelism ---
    activation = s.micro_batch * s.tokens * model.hidden * e  # one [b, s, h] tensor
    tp_fwd = tp_bwd = 0.0
    if t > 1 and config.tp_sequence_parallel:
        one = sent_bytes("all_gather", activation, t)
        regions = attention_forwards + mlp_forwards  # each region: one AG and one RS forward
        gather = ledger.add("all_gather", one, 1, place["tp"], repeat=runs * (regions + 4))
        scatter = ledger.add("reduce_scatter", one, 1, place["tp"], repeat=runs * (regions + 2))
        # Backward re-gathers the sharded inputs of the two column-parallel GEMMs for their
        # weight gradients; Megatron overlaps that gather with the input-gradient GEMMs (half of
        # the linear backward). The other collectives carry data the next GEMM needs: blocking.
        regather = max(0.0, 2 * gather - (linear_bwd / 2 if hides else 0.0))
        tp_fwd, tp_bwd = 2 * gather + 2 * scatter, 2 * gather + 2 * scatter + regather
    elif t > 1:
        reduce = ledger.add("all_reduce", sent_bytes("all_reduce", activation, t), 1, place["tp"],
                            repeat=runs * (attention_forwards + mlp_forwards + 2))
        tp_fwd = tp_bwd = 2 * reduce

    pass_fwd = linear_fwd + ring_fwd + merge_fwd + a2a + tp_fwd + scan_fwd + scan_comm
    pass_bwd = linear_bwd + ring_bwd + merge_bwd + a2a + tp_bwd + scan_bwd + scan_comm
    # what the recompute repeats: each region's linear work, the attention and its collectives,
    # a scan and its messages
    recompute = ((mlp_forwards - 1) * (mlp_share * linear_fwd + tp_fwd / 2)
                 + tiled_mlp_forwards * mlp_share * linear_fwd
                 + (attention_forwards - 1) * (attention_share * linear_fwd + ring_fwd + merge_fwd
                                               + a2a + tp_fwd / 2)
                 + (scan_forwards - 1) * (scan_share * linear_fwd + scan_fwd + scan_comm))
    layer_time = pass_fwd + recompute + pass_bwd

    # --- ZeRO / FSDP and the gradient reduction, over dp x ring x ulysses ---
    psi = max(stage_params(workload, config, 0), stage_params(workload, config, p - 1))
    layer_params = layer_params_per_gpu(model, t)
    # Overlapped transfers on the ring's link class share it with the ring's P2P, so they hide
    # only behind compute the ring has not already used.
    same_link = place["ring"].intra_node == shard.intra_node
    busy_fwd = (R - 1) * kv_hop if same_link else 0.0
    busy_bwd = (R - 1) * (kv_hop + grad_hop) if same_link else 0.0
    window_fwd = max(0.0, compute_fwd - busy_fwd)
    recompute_compute = ((mlp_forwards - 1 + tiled_mlp_forwards) * mlp_share * linear_fwd
                         + (attention_forwards - 1) * (attention_share * linear_fwd
                                                       + attention_fwd)
                         + (scan_forwards - 1) * (scan_share * linear_fwd + scan_fwd))
    window_bwd = max(0.0, recompute_compute + compute_bwd - busy_bwd)
    if not hides:
        window_fwd = window_bwd = 0.0
    fsdp, sync, regather = 0.0, 0.0, 0.0
    if config.zero == 3 and shard.size > 1:
        gathered = sent_bytes("all_gather", workload.bytes.param * layer_params, shard.size)
        gather = ledger.add("all_gather", gathered, 1, shard, repeat=2 * runs)
        scatter = ledger.add("reduce_scatter",
                             sent_bytes("reduce_scatter", workload.bytes.grad * layer_params,
                                        shard.size),
                             1, shard, repeat=runs)
        # Prefetch hides layer i+1's gather under layer i; the first gathers and the last
        # reduce-scatter of each pass have nothing to hide under.
        fsdp = (s.layers * (max(0.0, gather - window_fwd) + max(0.0, gather + scatter - window_bwd))
                + 2 * gather + scatter)
    elif shard.size > 1:
        kind = "all_reduce" if config.zero == 0 else "reduce_scatter"
        reductions = m if config.zero == 2 else 1
        one = ledger.add(kind, sent_bytes(kind, workload.bytes.grad * psi, shard.size), 1, shard,
                         repeat=reductions)
        sync = reductions * max(0.0, one - s.layers * window_bwd)
        if config.zero >= 1:
            # The updated parameters are gathered layer by layer ahead of the next forward
            # (Megatron-LM's --overlap-param-gather, DeepSpeed's ZeRO-1/2): only the first
            # layer's share waits, and what the forward's compute cannot cover.
            updated = sent_bytes("all_gather", workload.bytes.param * psi, shard.size)
            whole = ledger.add("all_gather", updated, 1, shard, repeat=1)
            regather = whole / s.layers + max(0.0, whole - s.layers * window_fwd)

    # --- pipeline: activations forward and their gradients backward cross each boundary ---
    boundary_time = 0.0
    if p > 1:
        sends = 2 if p > 2 else 1  # an inner stage sends both ways
        boundary = s.micro_batch * s.tokens_outside_attention * model.hidden * e
        boundary_time = sends * ledger.add("p2p", boundary, 1, place["pp"], repeat=sends * m)

    # the output projection: forward and two backward GEMMs; the chunked loss recomputes the
    # forward of each chunk in the backward (its logits are never kept)
    head_passes = 4 if config.loss == "chunked" else 3
    head_time = head_passes * (2 * s.micro_batch * s.tokens * model.hidden * model.vocab / t) \
        / matmul_rate
    stage_time = s.layers * layer_time + fsdp + head_time + boundary_time
    optimizer = (psi / (shard.size if config.zero >= 1 else 1)) * OPTIMIZER_BYTES_MOVED / hbm
    step_time = (m + p - 1) * stage_time + sync + regather + optimizer

    # MFU against the node's cores: peak is already a rank's share of them
    model_flops = 3 * workload.global_batch * model_flops_per_sequence(workload)
    time = {
        "compute": runs * (compute_fwd + recompute_compute + compute_bwd) + m * head_time,
        "all_to_all": runs * (attention_forwards + 1) * a2a,
        "ring_exposed": runs * (attention_forwards * (ring_fwd - attention_fwd)
                                + ring_bwd - attention_bwd),
        "ring_merge": runs * (attention_forwards * merge_fwd + merge_bwd),
        "scan_comm": runs * (scan_forwards + 1) * scan_comm,
        "tp": runs * ((attention_forwards + mlp_forwards) / 2 * tp_fwd + tp_bwd),
        "fsdp_exposed": m * fsdp,
        "grad_sync_exposed": sync + regather,
        "pipeline_p2p": m * boundary_time,
        "bubble": (p - 1) * stage_time,
        "optimizer": optimizer,
    }
    return StepCost(
        config=config,
        memory=memory_per_gpu(workload, config),
        usable_memory=cluster.usable_bytes,
        comm_bytes=ledger.bytes,
        time=time,
        step_time=step_time,
        model_flops=model_flops,
        tokens_per_second=workload.tokens / step_time,
        mfu=model_flops / (step_time * cluster.world_size * peak),
        placements=place,
    )


def forward_time(workload: Workload, cluster: ClusterSpec, config: ParallelConfig,
                 ring_implementation: RingImplementation = USP_RING) -> float:
    """Seconds of one forward of the whole model without a backward (a prefill, one diffusion
    step), sequence-parallel only: each rank runs the linear layers of its ``S/(R*U)`` tokens and
    one ``usp_attention`` forward per attention layer (a scan per scan layer; no loss, no
    optimizer)."""
    if config.tp > 1 or config.pp > 1:
        raise ValueError(f"forward_time models sequence-parallel layouts only, not "
                         f"{config.label()}")
    model, e, s = workload.model, workload.element_bytes, shapes(workload, config)
    place = {axis: group_placement(config, cluster.gpus_per_node, (axis,))
             for axis in ("ring", "ulysses")}
    rate = cluster.peak_tflops * 1e12 * cluster.matmul_efficiency
    linear = 2 * s.micro_batch * s.tokens * model.linear_params_per_layer / rate
    with_attention, with_scan, _ = model.shares
    scan = 0.0
    if model.scan is not None:
        layer = scan_layer_time(workload, cluster, config, s, place, _Ledger(cluster), rate,
                                passes=1)
        scan = with_scan * (layer.forward + layer.communication)
    traffic = attention_traffic(s.micro_batch, workload.seq_len, s.q_heads, s.kv_heads,
                                model.head_dim, e, config.ring, config.ulysses)
    attention = attention_time(
        AttentionShape(s.micro_batch, workload.seq_len, s.q_heads, s.kv_heads, model.head_dim,
                       e, workload.causal),
        traffic, cluster, place["ulysses"], place["ring"], config.ring_layout or config.layout,
        implementation=ring_implementation)
    relaid = relayout_time(workload, config, s, place, _Ledger(cluster), repeat=1)
    return config.sequential_micro_batches * s.layers * (
        linear + with_attention * (attention.forward + relaid) + scan)
