"""Published model shapes and typical cluster hardware, looked up by name.

Model shapes are the values in each model's released ``config.json``. Cluster numbers are
datasheet values per GPU and per direction (NVLink's quoted "600 GB/s" is 300 GB/s each way);
inter-node bandwidth is the node's NIC bandwidth divided by its GPUs. The efficiency factors are
what large bf16 GEMMs and FlashAttention-2 forward+backward typically reach on that part; they are
assumptions, stated here once, and ``usp plan --calibrate`` replaces them with measurements.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import replace
from pathlib import Path

from usp.models.llama.presets import CONFIGS as LLAMA_CONFIGS
from usp.plan.specs import ClusterSpec, ModelSpec

# The models usp train builds (usp.models.llama.presets: "tiny" and "small" run on CPU, llama3-1b and
# llama3-8b at their published shapes): a plan of one of these can be written as a run spec.
MODELS: dict[str, ModelSpec] = {name: ModelSpec.from_llama_config(name, config)
                                for name, config in LLAMA_CONFIGS.items()}
# Published shapes the planner knows and usp train does not build under these names (train them
# from their Hugging Face config.json: usp train --hf-config)
MODELS.update({
    spec.name: spec
    for spec in (
        ModelSpec("llama3-70b", layers=80, hidden=8192, q_heads=64, kv_heads=8, head_dim=128,
                  ffn_hidden=28672, vocab=128256),
        ModelSpec("llama2-7b", layers=32, hidden=4096, q_heads=32, kv_heads=32, head_dim=128,
                  ffn_hidden=11008, vocab=32000),
        ModelSpec("qwen2.5-7b", layers=28, hidden=3584, q_heads=28, kv_heads=4, head_dim=128,
                  ffn_hidden=18944, vocab=152064, qkv_bias=True),
        ModelSpec("mistral-7b", layers=32, hidden=4096, q_heads=32, kv_heads=8, head_dim=128,
                  ffn_hidden=14336, vocab=32000),
    )
})

# FlashAttention-2 forward + backward on an A100 (the kernel's published benchmark,
# Dao-AILab/flash-attention assets/flash2_a100_fwd_bwd_benchmark.png) runs at 99, 133, 155, 173,
# 182, 189 TFLOPS for causal sequences of 512 ... 16k at head dim 128, and 187, 196, 201, 203 for
# 2k ... 16k without the mask: k/(k + 256) of its long-call rate, k the keys a row meets (S/2
# causal, S full), within 3 % of each bar. 256 keys (two 128-key tiles) is each row's fixed work.
ATTENTION_OVERHEAD_KEYS = 256.0
# Host time to launch one GPU operation from eager PyTorch: "usually between 5-20 microseconds"
# (HolisticTraceAnalysis, docs/source/features/cuda_kernel_launch_stats.rst).
LAUNCH_US = 10.0
_GPU = dict(attention_overhead_keys=ATTENTION_OVERHEAD_KEYS, launch_us=LAUNCH_US)

# Keyword arguments shared by the 8-GPU NVLink boxes.
_NVLINK_BOX = dict(nodes=1, gpus_per_node=8, intra_latency_us=10.0, inter_latency_us=20.0,
                   reserved_gib=4.0, **_GPU)

CLUSTERS: dict[str, ClusterSpec] = {
    spec.name: spec
    for spec in (
        # A100-SXM4-80GB: NVLink3 12 links x 25 GB/s; 8 x 200 Gb/s HDR InfiniBand per node.
        ClusterSpec("a100x8", peak_tflops=312.0, memory_gib=80.0, intra_bandwidth_gbs=300.0,
                    inter_bandwidth_gbs=25.0, hbm_bandwidth_gbs=2039.0, matmul_efficiency=0.75,
                    attention_efficiency=0.60, **_NVLINK_BOX),
        # A800-SXM4-80GB: the export part, NVLink capped at 400 GB/s both ways; 4 x 200 Gb/s
        # InfiniBand per node, a common build (pass --inter-bw for yours).
        ClusterSpec("a800x8", peak_tflops=312.0, memory_gib=80.0, intra_bandwidth_gbs=200.0,
                    inter_bandwidth_gbs=12.5, hbm_bandwidth_gbs=2039.0, matmul_efficiency=0.75,
                    attention_efficiency=0.60, **_NVLINK_BOX),
        # H100-SXM5-80GB: NVLink4 900 GB/s both ways; 8 x 400 Gb/s NDR InfiniBand per node.
        ClusterSpec("h100x8", peak_tflops=989.0, memory_gib=80.0, intra_bandwidth_gbs=450.0,
                    inter_bandwidth_gbs=50.0, hbm_bandwidth_gbs=3350.0, matmul_efficiency=0.70,
                    attention_efficiency=0.50, **_NVLINK_BOX),
        # H800-SXM5-80GB: the export H100, NVLink capped at 400 GB/s both ways; 8 x 400 Gb/s
        # NDR InfiniBand per node.
        ClusterSpec("h800x8", peak_tflops=989.0, memory_gib=80.0, intra_bandwidth_gbs=200.0,
                    inter_bandwidth_gbs=50.0, hbm_bandwidth_gbs=3350.0, matmul_efficiency=0.70,
                    attention_efficiency=0.50, **_NVLINK_BOX),
        # L20 48 GB, PCIe Gen4 x16 only (no NVLink); 2 x 100 Gb/s RoCE per node.
        ClusterSpec("l20x8", nodes=1, gpus_per_node=8, peak_tflops=119.5, memory_gib=48.0,
                    intra_bandwidth_gbs=25.0, inter_bandwidth_gbs=3.125, intra_latency_us=15.0,
                    inter_latency_us=30.0, hbm_bandwidth_gbs=864.0, matmul_efficiency=0.70,
                    attention_efficiency=0.55, reserved_gib=3.0, **_GPU),
        # A100 80GB PCIe (no NVLink bridge): PCIe Gen4 x16, 1935 GB/s HBM2e; 2 x 100 Gb/s per
        # node, as the L20 box.
        ClusterSpec("a100pcie", nodes=1, gpus_per_node=8, peak_tflops=312.0, memory_gib=80.0,
                    intra_bandwidth_gbs=25.0, inter_bandwidth_gbs=3.125, intra_latency_us=15.0,
                    inter_latency_us=30.0, hbm_bandwidth_gbs=1935.0, matmul_efficiency=0.75,
                    attention_efficiency=0.60, reserved_gib=4.0, **_GPU),
    )
}


def cpu_cluster(ranks: int = 2) -> ClusterSpec:
    """This machine seen as one node of ``ranks`` single-thread gloo ranks.

    The numbers are one fp32 core of a 2-core AMD EPYC virtual machine, measured with
    ``usp plan --calibrate``: ~52 GFLOPS GEMM, ~45 GFLOPS for the CPU flash-attention kernel
    forward+backward, ~1 GB/s and ~150 us per message between two gloo ranks on 127.0.0.1.
    Calibrating measures them afresh.
    """
    try:
        total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total_bytes = 16 * 2**30
    return ClusterSpec(
        "cpu", nodes=1, gpus_per_node=ranks, peak_tflops=0.052,
        memory_gib=round(total_bytes / 2**30 / ranks, 1), intra_bandwidth_gbs=1.0,
        inter_bandwidth_gbs=0.5, intra_latency_us=150.0, inter_latency_us=300.0,
        hbm_bandwidth_gbs=10.0, matmul_efficiency=1.0, attention_efficiency=0.85,
        reserved_gib=1.0,
    )


def _unknown(kind: str, name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"unknown {kind} {name!r}{hint} Known: {', '.join(known)} (see usp plan --list)"
    )


def get_model(name_or_path: str) -> ModelSpec:
    """A preset by name, or a Hugging Face ``config.json`` (file or the folder holding it)."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        return ModelSpec.from_hf_config(path)
    raise _unknown("model", name_or_path, sorted(MODELS))


def get_cluster(name: str, nodes: int | None = None, **overrides: float | int) -> ClusterSpec:
    """A preset by name with any field overridden (``nodes=2``, ``inter_bandwidth_gbs=25``...)."""
    if name == "cpu":
        base = cpu_cluster()
    elif name in CLUSTERS:
        base = CLUSTERS[name]
    else:
        raise _unknown("cluster", name, sorted([*CLUSTERS, "cpu"]))
    changes = {key: value for key, value in overrides.items() if value is not None}
    if nodes is not None:
        changes["nodes"] = nodes
    return replace(base, **changes)
