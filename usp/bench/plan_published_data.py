"""Published measurements of Ulysses, ring and USP layouts, as the sources print them.

Only numbers read in the sources themselves are here, each with where it was read; docs/planner.md
("Against published measurements") lists the sources and what was not usable. Configurations
name the source's degrees; ``contiguous`` is the sources' "basic" ring (no load balance),
``zigzag`` their "zigzag"/"lb-ring", ``stripe`` their "stripe". Sequence lengths are global (the
yunchang benchmarks give each of the 8 ranks ``seqlen / 8`` tokens).
"""

from __future__ import annotations

from dataclasses import replace

from usp.bench.plan_published import Case, Row, Source, calibrated
from usp.plan.attention_time import AttentionShape
from usp.plan.config import ParallelConfig
from usp.plan.presets import get_cluster, get_model
from usp.plan.specs import ModelSpec, Workload

K = 1024
BF16 = 2

SOURCES = {source.key: source for source in (
    Source("usp-report", "Fang & Zhao, \"A Unified Sequence Parallelism Approach for Long Context "
           "Generative AI\", first version (arXiv 2405.07719v1), Tables 3-7",
           "feifeibear/long-context-attention, media/unified_seq_parallel_tech_report.pdf at "
           "commit 5f80b4d (2024-05-16); the arXiv pages were not reachable from here",
           "8xA100-SXM4 NVLink; 8xL20 PCIe; 1 and 2 nodes of 8xA800 (NVLink 400 GB/s, 1.6 Tbps "
           "RDMA between nodes)",
           "Tables 3-4: attention forward only (the yunchang benchmark). Tables 5-7: Megatron-LM "
           "training, ZeRO-1 over dp x sp, TP always with sequence parallelism, no gradient "
           "accumulation; activation recompute not stated (modelled without)."),
    Source("yunchang", "YunChang (long-context-attention) README, section Benchmark",
           "feifeibear/long-context-attention: media/benchmark_results.png (commit b93c30e, "
           "2024-04-18), media/pcie_machine.jpg (commit 065086d, 2024-05-08); scripts "
           "benchmark/benchmark_longctx_qkvpacked.py and benchmark_longctx.py at b93c30e",
           "8xA100-SXM4-80GB NVLink; 4xA100 over PCIe (titled '4xA100-SXM4-80GB PCIe', "
           "modelled as the a100pcie preset); 8xL20 PCIe",
           "Attention forward only, causal, bf16, iterations/s; qkvpack columns (q, k, v in one "
           "all-to-all, as usp sends them), no_packed where the table has no qkvpack number."),
    Source("ring-flash-attention", "ring-flash-attention README, batch API table",
           "zhuzilin/ring-flash-attention README.md at commit 01c8baf; "
           "benchmark/benchmark_kvpacked_func.py",
           "8xH800, 8xA100 (NVLink)",
           "Ring 8 only, three layouts; Llama-3.1-8B attention (32 q / 8 kv heads, head dim 128), "
           "8K tokens per GPU, batch 1, causal, bf16. The single-GPU flash_attn row calibrates "
           "the kernel's rate; the varlen rows (llama3 all-gather CP) are not modelled."),
    Source("xdit-flux", "xDiT, Flux.1 performance, 4xH100 table (torch.compile column)",
           "xdit-project/xDiT docs/performance/flux.md (file version 248abec, 2025-02-25)",
           "4xH100 (NVLink)",
           "FLUX.1-dev, 1024px (4096 image + 512 text tokens), 28 steps; end-to-end latency "
           "(text encoders and VAE included, which the model leaves out)."),
)}


def _config(ulysses: int = 1, ring: int = 1, layout: str = "zigzag", **fields) -> ParallelConfig:
    return ParallelConfig(ring=ring, ulysses=ulysses, layout=layout, **fields)


def _sweep(source: str, name: str, cluster, shape: AttentionShape, layout: str,
           rates: dict[int, float], kind: str = "attention forward") -> Case:
    """Iterations/s by Ulysses degree; the rest of the cluster's GPUs form the ring."""
    gpus = cluster.world_size
    rows = tuple(Row(f"U{u}xR{gpus // u}", _config(u, gpus // u, layout), rate)
                 for u, rate in rates.items())
    return Case(source, name, kind, cluster, rows, True, shape=shape)


def _attention(seq: int, heads: int, head_dim: int, kv_heads: int | None = None,
               batch: int = 1) -> AttentionShape:
    return AttentionShape(batch, seq, heads, kv_heads or heads, head_dim, BF16)


A100 = get_cluster("a100x8")
L20 = get_cluster("l20x8")
A100_PCIE_4 = get_cluster("a100pcie", gpus_per_node=4)


def _yunchang_cases() -> list[Case]:
    """README figures; per group: (shape, {layout: {ulysses degree: it/s}})."""
    a100 = [
        (_attention(8 * K, 32, 32, batch=2), {
            "contiguous": {8: 237.162, 4: 521.899, 2: 408.351, 1: 253.157},
            "zigzag": {8: 237.874, 4: 581.26, 2: 417.267, 1: 245.756}}),
        (_attention(32 * K, 32, 32, batch=2), {
            "contiguous": {8: 91.375, 4: 66.451, 2: 68.777, 1: 51.304},
            "zigzag": {8: 87.997, 4: 89.286, 2: 78.662, 1: 59.774}}),
        (_attention(128 * K, 32, 32, batch=2), {  # basic U1 ran out of memory
            "contiguous": {8: 15.918, 4: 8.722, 2: 9.035},
            "zigzag": {8: 15.895, 4: 16.027, 2: 15.305, 1: 13.169}}),
        (_attention(128 * K, 8, 32, batch=2), {
            "contiguous": {8: 58.242, 4: 41.546, 2: 35.884, 1: 32.825},
            "zigzag": {8: 58.629, 4: 59.483, 2: 58.277, 1: 51.83}}),
        (_attention(128 * K, 64, 32, kv_heads=8, batch=2), {  # GQA: no_packed columns
            "contiguous": {8: 8.375, 4: 5.562, 2: 4.74, 1: 4.38},
            "zigzag": {8: 8.37, 4: 8.054, 2: 8.038, 1: 7.819}}),
        (_attention(128 * K, 8, 128, batch=2), {
            "contiguous": {8: 20.988, 4: 15.309, 2: 8.994, 1: 7.769},
            "zigzag": {8: 20.992, 4: 21.916, 2: 21.383, 1: 18.211}}),
    ]
    l20 = [
        (_attention(128 * K, 32, 32, batch=2), {
            "contiguous": {8: 3.782, 4: 4.962, 2: 4.779, 1: 3.746},
            "zigzag": {8: 3.869, 4: 6.113, 2: 7.381, 1: 7.028}}),
    ]
    pcie = [
        (_attention(64 * K, 32, 32, batch=2), {
            "contiguous": {4: 8.186, 2: 5.759, 1: 5.08},
            "zigzag": {4: 6.134, 2: 7.241, 1: 7.358}}),
        (_attention(16 * K, 32, 32, batch=2), {
            "contiguous": {4: 34.189, 2: 13.852, 1: 25.534},
            "zigzag": {4: 41.433, 2: 21.045, 1: 21.133}}),
        (_attention(4 * K, 32, 32, batch=2), {
            "contiguous": {4: 258.372, 2: 134.916, 1: 155.624},
            "zigzag": {4: 262.536, 2: 188.991, 1: 153.836}}),
    ]
    cases = []
    for machine, cluster, groups in (("8xA100 NVLink", A100, a100), ("8xL20 PCIe", L20, l20),
                                     ("4xA100 PCIe", A100_PCIE_4, pcie)):
        for shape, by_layout in groups:
            for layout, rates in by_layout.items():
                name = (f"{machine}, {shape.seq_len // K}K x{shape.batch}, {shape.q_heads}"
                        f"{'/' + str(shape.kv_heads) if shape.kv_heads != shape.q_heads else ''}"
                        f" heads x {shape.head_dim}, {layout}")
                cases.append(_sweep("yunchang", name, cluster, shape, layout, rates))
    return cases


def _report_attention_cases() -> list[Case]:
    """Tables 3 (8xA100 NVLink) and 4 (8xL20 PCIe): 32 q / 8 kv heads x 128, batch 1."""
    groups = [
        ("8xA100 NVLink", A100, 32 * K, {"contiguous": {8: 135.569, 4: 103.525, 2: 91.365,
                                                        1: 81.985},
                                         "zigzag": {8: 136.375, 4: 132.979, 2: 132.979,
                                                    1: 113.79}}),
        ("8xA100 NVLink", A100, 128 * K, {"contiguous": {8: 2.782, 4: 2.024, 2: 1.73, 1: 1.628},
                                          "zigzag": {8: 2.785, 4: 2.771, 2: 2.89, 1: 2.91}}),
        ("8xL20 PCIe", L20, 8 * K, {"contiguous": {8: 57.346, 4: 153.134, 2: 415.5, 1: 358.595},
                                    "zigzag": {8: 57.098, 4: 152.189, 2: 454.93, 1: 361.969}}),
        ("8xL20 PCIe", L20, 32 * K, {"contiguous": {8: 15.229, 4: 28.584, 2: 44.348, 1: 40.478},
                                     "zigzag": {8: 14.262, 4: 32.818, 2: 62.754, 1: 58.377}}),
        ("8xL20 PCIe", L20, 128 * K, {"contiguous": {8: 2.563, 4: 3.217, 2: 3.399, 1: 3.131},
                                      "zigzag": {8: 2.586, 4: 4.235, 2: 5.476, 1: 5.186}}),
    ]
    return [_sweep("usp-report", f"{machine}, {seq // K}K, 32/8 heads x 128, {layout}", cluster,
                   _attention(seq, 32, 128, kv_heads=8), layout, rates)
            for machine, cluster, seq, by_layout in groups
            for layout, rates in by_layout.items()]


def _ring_flash_attention_cases() -> list[Case]:
    """Ring 8 by layout; 'theoretic flash_attn' is one GPU's 8K call (its it/s before the /8)."""
    shape = _attention(64 * K, 32, 128, kv_heads=8)
    local = _attention(8 * K, 32, 128, kv_heads=8)
    cases = []
    for gpu, preset, passes, single, rates in (
            ("8xH800", "h800x8", "attention forward", 591.5, (38.5, 63.0, 55.0)),
            ("8xH800", "h800x8", "attention forward+backward", 154.7, (10.4, 17.4, 16.0)),
            ("8xA100", "a100x8", "attention forward", 373.4, (24.0, 38.2, 32.5)),
            ("8xA100", "a100x8", "attention forward+backward", 94.7, (6.2, 10.6, 9.75))):
        backward = passes.endswith("backward")
        cluster = calibrated(get_cluster(preset), local, 1 / single, backward)
        rows = tuple(Row(layout, _config(ring=8, layout=layout), rate)
                     for layout, rate in zip(("contiguous", "zigzag", "stripe"), rates))
        cases.append(Case("ring-flash-attention", f"{gpu}, {passes}, 64K, ring 8 by layout",
                          passes, cluster, rows, True, shape=shape))
    return cases


def _report_training_cases() -> list[Case]:
    """Tables 5 (Llama2-7B, 1x8 A800), 6 and 7 (Llama3-8B, 2x8 A800): FLOPS/GPU by
    (tp, ulysses, ring[, global batch]); dp fills the rest of the GPUs."""
    def rows(nodes: int, entries) -> tuple[Row, ...]:
        out = []
        for tp, ulysses, ring, flops, *batch in entries:
            dp = 8 * nodes // (tp * ulysses * ring)
            label = f"tp{tp} U{ulysses} R{ring}" + (f" dp{dp}" if dp > 1 else "")
            config = _config(ulysses, ring, dp=dp, tp=tp, zero=1)
            out.append(Row(label, config, flops, batch[0] if batch else 0))
        return tuple(out)

    def case(model: str, nodes: int, seq: int, batch: int, entries, table: int) -> Case:
        # the report's RDMA: 1.6 Tbps per node = 25 GB/s per GPU
        cluster = get_cluster("a800x8", nodes=nodes, inter_bandwidth_gbs=25.0)
        return Case("usp-report", f"Table {table}: {model}, {nodes}x8 A800, {seq // K}K x{batch}",
                    "training step", cluster, rows(nodes, entries), True,
                    workload=Workload(get_model(model), seq, batch))

    return [
        case("llama2-7b", 1, 64 * K, 1, [(4, 2, 1, 260.2), (4, 1, 2, 255.0), (8, 1, 1, 238.9)], 5),
        case("llama2-7b", 1, 30 * K, 16, [(2, 4, 1, 239.2), (2, 1, 4, 226.6), (4, 1, 1, 230.1),
                                          (1, 8, 1, 250.6), (1, 1, 8, 218.0), (8, 1, 1, 198.0)],
             5),
        case("llama3-8b", 2, 64 * K, 1, [
            (1, 8, 2, 220.3), (1, 4, 4, 222.2), (1, 2, 8, 209.2), (1, 1, 16, 196.9),
            (8, 1, 2, 209.7), (4, 2, 2, 197.9), (2, 4, 2, 141.7), (2, 2, 4, 144.4),
            (4, 1, 4, 198.1), (2, 1, 8, 163.8), (8, 1, 1, 228.2, 2)], 6),
        case("llama3-8b", 2, 80 * K, 1, [
            (1, 8, 2, 245.4), (1, 4, 4, 247.8), (1, 2, 8, 233.2), (1, 1, 16, 221.1),
            (8, 1, 2, 226.6), (4, 2, 2, 228.8), (2, 4, 2, 184.8), (2, 2, 4, 184.4),
            (4, 1, 4, 216.8), (2, 1, 8, 201.6), (8, 1, 1, 240.3, 2)], 6),
        case("llama3-8b", 2, 120 * K, 1, [(4, 2, 2, 266.0), (2, 4, 2, 238.3), (8, 1, 2, 254.5),
                                          (4, 1, 4, 263.3)], 6),
        case("llama3-8b", 2, 160 * K, 1, [(4, 2, 2, 284.5), (8, 1, 2, 280.9), (4, 1, 4, 285.8)],
             7),
    ]


# FLUX.1-dev's transformer (diffusers FluxTransformer2DModel: 19 double- and 38 single-stream
# blocks, 24 heads x 128, MLP ratio 4). Every block runs 12 h^2 weights per token (q, k, v, out:
# 4 h^2; MLP 8 h^2), which a SwiGLU-shaped spec with ffn = 8h/3 reproduces.
FLUX_DIT = ModelSpec("flux.1-dev-transformer", layers=57, hidden=3072, q_heads=24, kv_heads=24,
                     head_dim=128, ffn_hidden=8192, vocab=1)


def _xdit_cases() -> list[Case]:
    workload = Workload(FLUX_DIT, 4096 + 512, 1, causal=False)
    cases = []
    for gpus, rows in ((2, [(2, 1, 2.68), (1, 2, 2.60)]),
                       (4, [(2, 2, 1.80), (4, 1, 1.63), (1, 4, 1.98)])):
        cluster = get_cluster("h100x8", gpus_per_node=gpus)
        entries = tuple(Row(f"U{u}xR{r}", _config(u, r, layout="contiguous"), seconds)
                        for u, r, seconds in rows)
        cases.append(Case("xdit-flux", f"{gpus}xH100, FLUX.1-dev 1024px, torch.compile",
                          "forward", cluster, entries, False, workload=workload))
    return cases


def all_cases() -> list[Case]:
    return [*_report_attention_cases(), *_yunchang_cases(), *_ring_flash_attention_cases(),
            *_report_training_cases(), *_xdit_cases()]


def with_cluster(case: Case, **changes) -> Case:
    """``case`` on its cluster with fields changed (what-ifs in tests and docs)."""
    return replace(case, cluster=replace(case.cluster, **changes))
