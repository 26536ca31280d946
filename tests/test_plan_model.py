"""Properties the cost model must have, checked on the model's own outputs (nothing hard-coded).

Each property is one the USP paper derives by hand; here the model computes both sides.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from usp.plan.collectives import attention_traffic
from usp.plan.config import ParallelConfig, check_config, group_placement
from usp.plan.cost import estimate, model_flops_per_sequence
from usp.plan.memory import memory_per_gpu, model_states
from usp.plan.presets import get_cluster, get_model
from usp.plan.specs import Workload

LLAMA = get_model("llama3-8b")
SEQ = 64 * 1024


def _one_node(gpus: int):
    return get_cluster("a100x8", gpus_per_node=gpus)


def _bytes(cost, *kinds: str) -> float:
    totals = cost.bytes_by_kind()
    return sum(totals[kind] for kind in kinds)


def test_ulysses_all_to_all_falls_as_one_over_u_and_tp_sp_does_not():
    workload = Workload(LLAMA, SEQ, 1)
    ulysses, tp = {}, {}
    for degree in (2, 4, 8):
        cluster = _one_node(degree)
        ulysses[degree] = _bytes(estimate(workload, cluster, ParallelConfig(ulysses=degree)),
                                 "all_to_all")
        tp[degree] = _bytes(estimate(workload, cluster, ParallelConfig(tp=degree)),
                            "all_gather", "reduce_scatter")
    for degree in (4, 8):
        # Ulysses: (U-1)/U of an S/U-token shard, so bytes * U^2/(U-1) is the same for every U.
        assert ulysses[degree] * degree**2 / (degree - 1) == pytest.approx(
            ulysses[2] * 4 / 1, rel=1e-12)
        assert ulysses[degree] < ulysses[degree // 2]
        # TP-sp: (t-1)/t of the whole [b, s, h] activation, which does not shrink with t.
        assert tp[degree] * degree / (degree - 1) == pytest.approx(tp[2] * 2, rel=1e-12)
        assert tp[degree] > tp[2]


def test_ring_p2p_per_step_does_not_depend_on_ring_size_at_fixed_tokens_per_rank():
    tokens_per_rank = 4096
    sends = {r: attention_traffic(1, r * tokens_per_rank, 32, 8, 128, 2, ring=r, ulysses=1)
             for r in (2, 4, 8, 16)}
    for traffic in sends.values():
        assert traffic.ring_kv_send == sends[2].ring_kv_send
        assert traffic.ring_grad_send == sends[2].ring_grad_send
    # at a fixed sequence length the per-rank total does not fall with the ring size either
    fixed = {r: attention_traffic(1, SEQ, 32, 8, 128, 2, ring=r, ulysses=1).bytes()["p2p"]
             for r in (2, 4, 8)}
    assert fixed[2] <= fixed[4] <= fixed[8]


def test_gqa_lowers_sequence_parallel_traffic_but_not_tensor_parallel_traffic():
    mha = replace(LLAMA, name="llama3-8b-mha", kv_heads=LLAMA.q_heads)
    cluster = _one_node(8)
    for config, kinds, lowered in (
        (ParallelConfig(ulysses=8), ("all_to_all",), True),
        (ParallelConfig(ring=8), ("p2p",), True),
        (ParallelConfig(ring=2, ulysses=4), ("all_to_all", "p2p"), True),
        (ParallelConfig(tp=8), ("all_gather", "reduce_scatter"), False),
        (ParallelConfig(tp=8, tp_sequence_parallel=False), ("all_reduce",), False),
    ):
        gqa_bytes = _bytes(estimate(Workload(LLAMA, SEQ, 1), cluster, config), *kinds)
        mha_bytes = _bytes(estimate(Workload(mha, SEQ, 1), cluster, config), *kinds)
        assert gqa_bytes > 0
        if lowered:
            assert gqa_bytes < mha_bytes, config
        else:
            assert gqa_bytes == mha_bytes, config


def test_sequence_parallelism_alone_replicates_model_states_and_zero_shards_them():
    workload, model = Workload(LLAMA, SEQ, 1), LLAMA
    single = model_states(workload, ParallelConfig(), stage=0)
    assert single["parameters"] == 2 * model.total_params
    assert single["optimizer"] == 12 * model.total_params
    stages = {}
    for zero in (0, 1, 2, 3):
        stages[zero] = model_states(workload, ParallelConfig(ring=2, ulysses=4, zero=zero), 0)
    for kind in ("parameters", "gradients", "optimizer"):
        assert stages[0][kind] == single[kind]  # SP alone: replicated on every rank
    assert stages[1]["optimizer"] == single["optimizer"] / 8
    assert stages[2]["gradients"] < single["gradients"] / 4
    assert stages[3]["parameters"] < single["parameters"] / 4
    totals = [sum(stages[z][k] for k in ("parameters", "gradients", "optimizer")) for z in range(4)]
    assert totals == sorted(totals, reverse=True) and totals[3] < totals[0] / 6
    # ...and the activations are split over the sequence ranks whatever the stage
    alone = memory_per_gpu(workload, ParallelConfig())["activations"]
    for zero in (0, 1, 2, 3):
        split = memory_per_gpu(workload, ParallelConfig(ring=2, ulysses=4, zero=zero))
        assert split["activations"] < alone / 4


def test_checkpointing_and_pipeline_memory():
    workload = Workload(LLAMA, SEQ, 8)

    def memory(**fields):
        # eight micro-batches: the pipeline's, or gradient accumulation's without one
        micro = "microbatches" if fields.get("pp", 1) > 1 else "grad_accum"
        return memory_per_gpu(workload, ParallelConfig(**{micro: 8}, **fields))

    plain, checkpointed = memory(ring=4), memory(ring=4, ac="full")
    assert checkpointed["activations"] < plain["activations"] / 3
    # 1F1B: stage k keeps min(pp - k, m) micro-batches of its L/pp layers, so pipelining does not
    # add activation memory, while each stage holds only its share of the weights.
    flat, piped = memory(ac="full"), memory(pp=4, ac="full")
    assert piped["activations"] <= flat["activations"]
    assert piped["parameters"] < 0.4 * flat["parameters"]
    # with fewer micro-batches (of the same size) than stages, fewer are in flight
    many = memory(pp=4)
    few = memory_per_gpu(Workload(LLAMA, SEQ, 2), ParallelConfig(pp=4, microbatches=2))
    assert few["activations"] < many["activations"]


def test_causal_attention_flops_are_about_half_of_full_attention():
    def flops(seq: int, causal: bool) -> float:
        return model_flops_per_sequence(Workload(LLAMA, seq, 1, causal=causal))

    # full attention is quadratic: f(S) = a*S + c*S^2, so a and c follow from S = 1 and 2
    pair = (flops(2, False) - 2 * flops(1, False)) / 2
    per_token = flops(1, False) - pair
    attention_full = flops(SEQ, False) - SEQ * per_token
    attention_causal = flops(SEQ, True) - SEQ * per_token
    assert attention_full == pytest.approx(pair * SEQ**2, rel=1e-9)
    assert attention_causal / attention_full == pytest.approx((SEQ + 1) / (2 * SEQ), rel=1e-9)
    # the rest is the classic 2 FLOPs per weight per token (embedding lookup and norms excluded)
    norms = (2 * LLAMA.layers + 1) * LLAMA.hidden
    dense = LLAMA.total_params - LLAMA.embedding_params - norms
    assert per_token == pytest.approx(2 * dense, rel=1e-12)


def test_group_placement_follows_the_mesh_order():
    cluster = get_cluster("a800x8", nodes=2)
    head_first = ParallelConfig(ring=2, ulysses=8)
    context_first = replace(head_first, placement="context-first")
    assert group_placement(head_first, cluster.gpus_per_node, ("ulysses",)).intra_node
    assert not group_placement(head_first, cluster.gpus_per_node, ("ring",)).intra_node
    crossing = group_placement(context_first, cluster.gpus_per_node, ("ulysses",))
    assert not crossing.intra_node and crossing.inter_peer_fraction == pytest.approx(4 / 7)
    # all-to-all bytes split by the peers' nodes; the rest of the traffic by the slowest hop
    cost = estimate(Workload(LLAMA, SEQ, 1), cluster, context_first)
    inter = cost.comm_bytes[("all_to_all", "inter")]
    intra = cost.comm_bytes[("all_to_all", "intra")]
    assert inter / (inter + intra) == pytest.approx(4 / 7)
    inside = estimate(Workload(LLAMA, SEQ, 1), cluster, head_first)
    assert cost.time["all_to_all"] > inside.time["all_to_all"]


def test_time_breakdown_adds_up_to_the_step():
    cluster = get_cluster("a800x8", nodes=2)
    for config in (ParallelConfig(ring=2, ulysses=8, zero=3, ac="full"),
                   ParallelConfig(dp=2, tp=2, pp=2, ring=2, zero=1, microbatches=4),
                   ParallelConfig(dp=4, tp=2, ulysses=2, zero=2, grad_accum=2,
                                  tp_sequence_parallel=False)):
        cost = estimate(Workload(LLAMA, SEQ, 8), cluster, config)
        assert sum(cost.time.values()) == pytest.approx(cost.step_time, rel=1e-12)
        assert cost.tokens_per_second == pytest.approx(8 * SEQ / cost.step_time)
        assert 0 < cost.mfu < 1


def test_divisibility_rules_name_the_numbers():
    cluster = get_cluster("a800x8", nodes=2)
    qwen = Workload(get_model("qwen2.5-7b"), SEQ, 1)
    problems = check_config(qwen, cluster, ParallelConfig(ulysses=16))
    assert any("28" in p and "ulysses=16" in p for p in problems)
    odd = Workload(LLAMA, 1000, 3)
    problems = " | ".join(check_config(odd, cluster, ParallelConfig(dp=2, ring=8, pp=1)))
    assert "seq_len=1000" in problems and "global batch 3" in problems
    assert check_config(Workload(LLAMA, SEQ, 1), cluster,
                        ParallelConfig(ring=2, ulysses=8, zero=3)) == []
    three_kv = replace(LLAMA, name="odd-kv", q_heads=24, kv_heads=3)
    assert check_config(Workload(three_kv, SEQ, 1), _one_node(8), ParallelConfig(ulysses=8))


def test_ranks_sharing_cores_compute_slower_and_hide_no_transfer():
    workload = Workload(get_model("tiny"), 4096, 1)
    config = ParallelConfig(ring=2, ulysses=2)
    own = get_cluster("cpu", gpus_per_node=4)
    shared = replace(own, cores_per_node=2)  # 4 ranks on 2 cores
    enough = replace(own, cores_per_node=4)
    assert shared.oversubscription == 2 and enough.oversubscription == own.oversubscription == 1
    base, slow = estimate(workload, own, config), estimate(workload, shared, config)
    assert estimate(workload, enough, config).step_time == base.step_time
    assert slow.time["compute"] == pytest.approx(2 * base.time["compute"])
    # the ring's transfers hid under attention; on shared cores every hop adds to it
    assert base.time["ring_exposed"] < slow.time["ring_exposed"]
    # MFU is against the node's cores, so the same work at half the rate has the same MFU
    assert slow.mfu == pytest.approx(base.mfu * base.step_time / slow.step_time * 2)


def test_sync_cost_is_paid_once_per_collective_call():
    workload = Workload(get_model("tiny"), 2048, 1)
    cluster = get_cluster("cpu", gpus_per_node=4)
    synced = replace(cluster, sync_us=1000.0)
    uly = ParallelConfig(ulysses=4, zero=0)
    extra = (estimate(workload, synced, uly).time["all_to_all"]
             - estimate(workload, cluster, uly).time["all_to_all"])
    calls = attention_traffic(1, 2048, 8, 4, 16, 4, 1, 4).calls()["all_to_all"]
    layers = get_model("tiny").layers
    assert extra == pytest.approx(layers * calls * 1000e-6)
