"""The planner prices a hybrid's scan layers (usp.plan.scans): their parameters against the
models transformers builds, their traffic against what usp.scan sends, and their compute, state
traffic and memory in a step's cost."""

import json
from dataclasses import replace

import pytest
import torch

from usp.plan.config import ParallelConfig, check_config
from usp.plan.cost import estimate
from usp.plan.planner import plan
from usp.plan.presets import get_cluster
from usp.plan.scans import ScanSpec, scan_traffic
from usp.plan.specs import ModelSpec, Workload

transformers = pytest.importorskip("transformers")

BAMBA = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
             mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
             mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=32)
NEMOTRON_H = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  layers_block_type=["mamba", "mlp", "attention", "mlp"], mamba_num_heads=8,
                  mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4, expand=2,
                  chunk_size=32)

# Granite 4 (dense): one attention layer among Mamba-2 layers, an MLP of its own size
GRANITE_4 = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, shared_intermediate_size=96, intermediate_size=32,
                 num_local_experts=0, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
                 mamba_d_state=8, mamba_chunk_size=32, mamba_expand=2,
                 layer_types=["linear_attention", "attention", "linear_attention",
                              "linear_attention"])
# Falcon-H1: attention and a Mamba-2 mixer in every layer (with and without the mixer's norm and
# biases)
FALCON_H1 = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_d_ssm=128,
                 mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                 mamba_chunk_size=32)

# gated-delta hybrids with dense MLPs: Qwen3.5 and Qwen3-Next (gated attention, per-head q/k
# norms), OLMo Hybrid (q/k norms over the whole projections)
DELTA = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, intermediate_size=96,
             layer_types=["linear_attention", "full_attention", "linear_attention",
                          "linear_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=16, linear_value_head_dim=16)


def _spec(tmp_path, name, values) -> tuple[ModelSpec, int]:
    """The planner's reading of the config, and the parameters of the model transformers
    builds from it (on meta)."""
    config = getattr(transformers, name)(**values)
    (tmp_path / "config.json").write_text(config.to_json_string())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return (ModelSpec.from_hf_config(tmp_path / "config.json"),
            sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("name, values", [
    ("BambaConfig", BAMBA), ("NemotronHConfig", NEMOTRON_H), ("GraniteMoeHybridConfig", GRANITE_4),
    ("FalconH1Config", FALCON_H1), ("FalconH1Config", {**FALCON_H1, "mamba_rms_norm": True,
                                                       "mamba_proj_bias": True,
                                                       "projectors_bias": True}),
    ("Qwen3_5TextConfig", DELTA), ("OlmoHybridConfig", {**DELTA, "pad_token_id": 0}),
    ("Qwen3NextConfig", {**DELTA, "num_experts": 0, "mlp_only_layers": [0, 1, 2, 3]})])
def test_hybrid_configs_are_read_with_their_parameters(tmp_path, name, values):
    spec, parameters = _spec(tmp_path, name, values)
    kind = "delta" if "linear_num_key_heads" in values else "ssd"
    assert spec.scan is not None and spec.scan.kind == kind
    assert spec.total_params == parameters, (spec.total_params, parameters)


def test_bamba_default_config(tmp_path):
    # Bamba-9B's shapes (transformers' default config, 3 attention layers): 9.78B parameters
    spec, parameters = _spec(tmp_path, "BambaConfig", {"attn_layer_indices": [9, 18, 27]})
    assert (spec.attention_count, spec.scan.layers) == (3, 29)
    assert spec.total_params == parameters


def test_scan_traffic_is_what_usp_scan_sends():
    # tests/test_scan.py measures these bytes on 4 ranks; the planner books the same
    ssd = ScanSpec("ssd", 1, heads=4, head_dim=3, state=4, groups=2)
    delta = ScanSpec("delta", 1, heads=4, head_dim=3, state=4, groups=2)
    state = scan_traffic(ssd, 2, 6, 8, ring=2, ulysses=2)  # SSD: along every shard
    assert state.state == 2 * 4 * 3 * 4 * 4  # batch x H x P x N, fp32
    assert (state.ring_links, state.ulysses_links, state.all_to_all_inputs) == (1, 2, 0)
    assert state.halo == 2 * (4 * 3 + 2 * 2 * 4) * 3 * 8  # batch x channels x (K-1) x bytes
    heads = scan_traffic(delta, 2, 6, 8, ring=2, ulysses=2)  # the delta rule on 4: heads
    assert heads.state == 2 * 2 * 4 * 3 * 4 and (heads.ring_links, heads.ulysses_links) == (1, 0)
    assert heads.all_to_all_inputs == 0.5 * 2 * 6 * (4 * 3 + 2 * 4 + 2 * 2 * 4) * 8
    assert not heads.middle and scan_traffic(delta, 2, 6, 8, ring=4, ulysses=1).middle
    two = scan_traffic(delta, 2, 6, 8, ring=1, ulysses=2)  # on 2 ranks: the state
    assert two.state == state.state and two.all_to_all_inputs == 0


def _all_attention(spec: ModelSpec) -> ModelSpec:
    return replace(spec, scan=None, attention_layers=None)


def test_step_cost_counts_the_scans(tmp_path):
    spec, _ = _spec(tmp_path, "BambaConfig", {"attn_layer_indices": [9, 18, 27]})
    cluster = get_cluster("h100x8", nodes=1)
    workload = Workload(spec, seq_len=131072, global_batch=1)
    config = ParallelConfig(dp=1, ring=2, ulysses=4, tp=1, zero=3, ac="full", loss="chunked",
                            layout="contiguous")
    assert not check_config(workload, cluster, config)
    hybrid = estimate(workload, cluster, config)
    dense = estimate(Workload(_all_attention(spec), 131072, 1), cluster,
                     replace(config, layout="zigzag"))
    # 29 of 32 layers scan instead of attending at 128k tokens: far less compute
    assert hybrid.time["compute"] < 0.5 * dense.time["compute"]
    assert hybrid.time["scan_comm"] > 0 and "scan_comm" in dense.time
    # against the 3 attention layers alone: the scans' compute, and their p2p bytes — each
    # scan layer's state (every head, fp32) and halo, forward, recomputed and backward
    attention_only = estimate(Workload(replace(spec, scan=None, attention_layers=3), 131072, 1),
                              cluster, config)
    assert hybrid.time["compute"] > attention_only.time["compute"]
    scan = spec.scan
    state = scan.heads * scan.head_dim * scan.state * 4
    halo = scan.conv_channels * (scan.conv_kernel - 1) * 2  # bf16
    scanned = hybrid.bytes_by_kind()["p2p"] - attention_only.bytes_by_kind()["p2p"]
    assert scanned == pytest.approx(29 * 3 * (state + halo))
    # the scans' saved tensors: more memory without checkpointing than with it
    bare = estimate(workload, cluster, replace(config, ac="none"))
    assert bare.memory["activations"] > hybrid.memory["activations"]
    assert bare.memory["activations"] > estimate(
        Workload(replace(spec, scan=None, attention_layers=3), 131072, 1), cluster,
        replace(config, ac="none")).memory["activations"]


def test_planner_keeps_hybrids_contiguous_and_off_tp(tmp_path):
    spec, _ = _spec(tmp_path, "BambaConfig", {"attn_layer_indices": [9, 18, 27]})
    cluster = get_cluster("h100x8", nodes=1)
    workload = Workload(spec, seq_len=65536, global_batch=1)
    rules = {v.rule for v in check_config(workload, cluster, ParallelConfig(
        dp=1, ring=4, ulysses=1, tp=2, zero=3, loss="vocab_parallel", layout="zigzag"))}
    assert {"tp for scans", "layout for scans"} <= rules
    best = plan(workload, cluster).best
    assert best.config.tp == 1 and best.config.layout == "contiguous"


def test_unknown_hybrids_and_experts_stay_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(transformers.Zamba2Config().to_dict()))
    with pytest.raises(ValueError, match="prices the scan layers of"):
        ModelSpec.from_hf_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(transformers.GraniteMoeHybridConfig(
        **{**GRANITE_4, "num_local_experts": 4}).to_dict()))
    with pytest.raises(ValueError, match="routed experts"):
        ModelSpec.from_hf_config(tmp_path / "config.json")
    nemotron = transformers.NemotronHConfig(**{**NEMOTRON_H, "layers_block_type": [
        "mamba", "moe", "attention", "mlp"]}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(nemotron))
    with pytest.raises(ValueError, match="routed experts"):
        ModelSpec.from_hf_config(tmp_path / "config.json")


def _kept_bytes(run) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``run()``."""
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(kept.values())


@pytest.mark.parametrize("kind, heads, head_dim, state, groups, chunk", [
    ("ssd", 8, 16, 8, 2, 32), ("ssd", 4, 64, 32, 1, 64), ("ssd", 16, 64, 128, 1, 64),
    ("delta", 4, 16, 8, 2, 32), ("delta", 4, 32, 64, 4, 64)])
def test_scan_internals_are_what_usp_scan_keeps(kind, heads, head_dim, state, groups, chunk):
    from usp.plan.scans import FP32_BYTES, scan_activations
    from usp.scan import gated_delta_scan, ssd_scan
    from usp.topology import Topology

    length, one = 512, Topology.build()
    draw = lambda *shape: torch.randn(*shape, requires_grad=True)  # noqa: E731
    if kind == "ssd":
        x, dt, b, c = (draw(1, length, heads, head_dim), draw(1, length, heads),
                       draw(1, length, groups, state), draw(1, length, groups, state))
        kept = _kept_bytes(lambda: ssd_scan(x, dt, -torch.rand(heads), b, c, one,
                                            chunk_size=chunk, D=torch.randn(heads),
                                            dt_softplus=True))
    else:
        q, k, v = (draw(1, length, groups, state), draw(1, length, groups, state),
                   draw(1, length, heads, head_dim))
        g = (-torch.rand(1, length, heads)).requires_grad_()  # in a model: projections'
        beta = torch.rand(1, length, heads, requires_grad=True)
        kept = _kept_bytes(lambda: gated_delta_scan(q, k, v, g, beta, one, chunk_size=chunk,
                                                    use_qk_l2norm=True))
    spec = ScanSpec(kind, 1, heads, head_dim, state, groups, chunk=chunk)
    counted = scan_activations(spec, 1, length, FP32_BYTES).working
    assert counted == pytest.approx(kept, rel=0.05), (counted, kept)


def test_hybrid_attention_on_a_balanced_ring_is_priced(tmp_path):
    from usp.plan.attention_time import relayout_moved
    from usp.plan.spec_io import to_run_spec

    # the share of a ring block that leaves its busiest rank (usp.attention.relayout's moves)
    assert relayout_moved(2, "contiguous", "zigzag") == 0.5
    assert relayout_moved(4, "contiguous", "zigzag") == 1.0
    assert relayout_moved(4, "contiguous", "stripe") == 0.75
    assert relayout_moved(4, "contiguous", "contiguous") == 0.0
    spec, _ = _spec(tmp_path, "BambaConfig", {"attn_layer_indices": [9, 18, 27]})
    cluster = get_cluster("h100x8", nodes=1)
    workload = Workload(spec, seq_len=131072, global_batch=1)
    config = ParallelConfig(dp=1, ring=8, ulysses=1, zero=3, ac="full", layout="contiguous")
    as_is, relaid = (estimate(workload, cluster, replace(config, ring_layout=ring_layout))
                     for ring_layout in (None, "zigzag"))
    # the busiest ring rank of a contiguous causal ring meets (2R-1)/R² of the pairs, which the
    # others wait for: zigzag's balance takes that off, for the all-to-alls of q, k, v and the
    # output each way (Bamba-9B at 128k on ring 8: 2.80 s predicted as is, 2.39 s relaid)
    assert relaid.time["ring_exposed"] < 0.1 * as_is.time["ring_exposed"]
    assert relaid.step_time < 0.9 * as_is.step_time
    moved = relaid.bytes_by_kind()["all_to_all"] - as_is.bytes_by_kind()["all_to_all"]
    block = (131072 // 8) * 128 * 2  # tokens of a ring block x head dim x bf16
    heads = 2 * 32 + 2 * 8  # q and output, k and v
    assert moved == pytest.approx(3 * 3 * block * heads)  # 3 attention layers, 3 passes
    best = plan(workload, cluster, fixed={"ring": 8}).best
    assert best.config.ring_layout == "zigzag"
    emitted = to_run_spec(best.config, workload, cluster, {"hf_config": str(tmp_path)})
    assert (emitted.parallel.layout, emitted.parallel.ring_layout) == ("contiguous", "zigzag")


def test_a_middle_block_pays_the_delta_rules_map_once_per_token():
    # ring 4: the delta rule's heads split over ulysses, its ring blocks 1 and 2 build the
    # Dk x Dk map M: each token of a rank's shard pays transition_flops_per_token once
    from usp.plan.cost import _Ledger, scan_layer_time
    from usp.plan.config import group_placement
    from usp.plan.memory import shapes

    delta = ScanSpec("delta", 2, heads=8, head_dim=64, state=64, groups=4, chunk=64)
    model = ModelSpec("delta", layers=2, hidden=512, q_heads=8, kv_heads=8, head_dim=64,
                      ffn_hidden=1024, vocab=1000, attention_layers=0, scan=delta)
    cluster = get_cluster("h100x8", nodes=1)
    workload = Workload(model, seq_len=8192, global_batch=1)
    for ring, ulysses, middle in ((4, 2, True), (2, 4, False), (1, 8, False)):
        config = ParallelConfig(dp=1, ring=ring, ulysses=ulysses, zero=3, layout="contiguous")
        s = shapes(workload, config)
        place = {axis: group_placement(config, cluster.gpus_per_node, (axis,))
                 for axis in ("ring", "ulysses")}
        rate = 1e12
        layer = scan_layer_time(workload, cluster, config, s, place, _Ledger(cluster), rate, 1)
        per_token = delta.forward_flops_per_token + (
            delta.transition_flops_per_token if middle else 0.0)
        assert layer.forward == pytest.approx(s.tokens * per_token / rate), (ring, ulysses)


def test_granite_4_head_dim_auto_reads_as_transformers_resolves_it(tmp_path):
    config = transformers.GraniteMoeHybridConfig(**GRANITE_4).to_dict()
    counts = []
    for head_dim in (config["mamba_d_head"], "auto"):  # a config.json may keep "auto"
        (tmp_path / "config.json").write_text(json.dumps({**config, "mamba_d_head": head_dim}))
        counts.append(ModelSpec.from_hf_config(tmp_path / "config.json").total_params)
    assert counts[0] == counts[1]
