"""The tables ``usp bench attention`` prints, CPU ranks and one GPU."""

from __future__ import annotations

from dataclasses import replace

from usp.bench.attention import BenchResult, BenchShape, Timing
from usp.bench.masks import work_vs_dense
from usp.bench.breakdown import COLUMNS


def _ratio(value: float) -> str:
    # an efficiency above 1 is a measurement artefact (load changed within a round): flag it
    return f"{value:.2f}" + ("!" if value > 1.0 else " ")


def format_result(shape: BenchShape, nproc: int, result: BenchResult) -> str:
    single, ceiling = result.single, result.ceiling
    lines = [
        f"S={shape.seq_len} B={shape.batch} H={shape.heads} Hkv={shape.kv_heads} "
        f"D={shape.head_dim} {shape.dtype} causal={shape.causal} ranks={nproc} "
        f"threads/rank={shape.threads}; median of {shape.rounds} rounds of {shape.iters} calls",
    ]
    for mask, timing in single.items():
        lines.append(f"single process, {mask}: forward {1e3 * timing.forward_s:.1f} ms, "
                     f"forward+backward {1e3 * timing.train_s:.1f} ms")
    dense = single["dense"] if "dense" in single else None
    if ceiling is not None and dense is not None:
        lines.append(
            f"ceiling ({nproc} ranks at once, {shape.heads // nproc} heads each, no "
            f"communication, dense): forward {1e3 * ceiling.forward_s:.1f} ms (efficiency "
            f"{_efficiency(dense, ceiling, nproc, 'forward_s')}), forward+backward "
            f"{1e3 * ceiling.train_s:.1f} ms ({_efficiency(dense, ceiling, nproc, 'train_s')})")
    elif ceiling is None:
        lines.append(f"ceiling: n/a ({shape.heads} heads do not split over {nproc} ranks)")
    masked = any(row.config.mask != "dense" for row in result.rows)
    header = (f"{'mode':8} {'ring':>4} {'uly':>4} {'layout':10} {'mask':7} {'fwd ms':>9} "
              f"{'fwd+bwd ms':>11} {'eff fwd':>8} {'eff f+b':>8} {'ceil f+b':>9} "
              f"{'balance':>8} {'kernel %':>8}")
    if masked:
        header += f" {'work/dense':>10} {'time/dense':>10} {'bytes/dense':>11}"
    lines += [header, "-" * len(header)]
    for row in result.rows:
        c, t, kernel = row.config, row.timing, row.kernel_ms_per_rank
        mean_kernel = sum(kernel) / len(kernel)
        versus_ceiling = "     -   "
        if ceiling is not None and c.mask == "dense":
            versus_ceiling = f"{_ratio(ceiling.train_s / t.train_s):>9}"
        line = (
            f"{c.mode:8} {c.ring:>4} {c.ulysses:>4} {_layout_name(c):10} "
            f"{c.mask:7} {1e3 * t.forward_s:>9.1f} {1e3 * t.train_s:>11.1f} "
            f"{_efficiency(single[c.mask], t, nproc, 'forward_s'):>8} "
            f"{_efficiency(single[c.mask], t, nproc, 'train_s'):>8} {versus_ceiling} "
            f"{max(kernel) / mean_kernel:>8.2f} {100 * mean_kernel / (1e3 * t.train_s):>7.0f}%"
        )
        if masked:
            base = next(r for r in result.rows if r.config == replace(c, mask="dense"))
            line += (f" {work_vs_dense(shape, c):>10.3f} {t.train_s / base.timing.train_s:>10.3f}"
                     f" {row.bytes_sent / max(base.bytes_sent, 1):>11.3f}")
        lines.append(line)
    lines.append("eff = (single-process time on the same mask / ranks) / time; ceil = ceiling time "
                 "/ time; balance = max/mean kernel CPU time over ranks; ! = above 1 (noise)")
    if masked:
        lines.append("work/dense = (query, key) pairs computed / dense causal's; time/dense and "
                     "bytes/dense: fwd+bwd time and bytes sent against the dense row")
    return "\n".join(lines)


def format_breakdown(result: BenchResult) -> str:
    """Rank 0's milliseconds per category in one call, each configuration, fwd and fwd+bwd."""
    header = f"{'configuration':28} {'call':8} " + " ".join(f"{c:>9}" for c in COLUMNS)
    lines = ["where rank 0's time goes (ms in one call, torch.profiler labels; profiling adds a "
             "little)", header, "-" * len(header)]
    for row in result.rows:
        c = row.config
        name = (f"{c.mode} r{c.ring} u{c.ulysses} {_layout_name(c)}"
                f" {c.mask}")
        for kind, spent in row.breakdown.items():
            lines.append(f"{name:28} {kind:8} " + " ".join(f"{spent[col]:>9.1f}" for col in COLUMNS))
    return "\n".join(lines)


def _layout_name(c) -> str:
    """The layout column: ``-`` for Ulysses, ``xN`` appended for N overlapped head chunks."""
    name = "-" if c.mode == "ulysses" else c.layout
    return name + (f" x{c.head_chunks}" if c.head_chunks > 1 else "")


def _efficiency(single: Timing, measured: Timing, nproc: int, attribute: str) -> str:
    return _ratio(getattr(single, attribute) / nproc / getattr(measured, attribute))


def format_device_report(report: dict) -> str:
    shape, peak = report["shape"], report["datasheet_peak_tflops"]
    lines = [
        f"{report['device']}, torch {report['torch']}: Hq={shape['heads']} Hkv={shape['kv_heads']} "
        f"D={shape['head_dim']} {shape['dtype']}, one rank of a {shape['layout']} ring of "
        f"{shape['ring_size']} (loopback transport)",
        f"{shape['dtype']} matmul {report['matmul_tflops']:.1f} TFLOPS measured"
        + (f", datasheet peak {peak:.0f}" if peak else ""),
    ]
    lines += [f"skipped {name}: {why}" for name, why in report["skipped"]]
    header = (f"{'kernel':14} {'T/rank':>7} {'full f+b':>9} {'%peak':>6} {'causal f+b':>10} "
              f"{'full fwd':>9} {'ring ms':>8} {'in-ring':>8} {'replay':>7} {'ratio':>6} "
              f"{'overhead':>8}")
    lines += [header, "-" * len(header)]
    for row in report["rows"]:
        share = f"{100 * row['full_fwd_bwd_tflops'] / peak:5.1f}%" if peak else "     -"
        lines.append(
            f"{row['kernel']:14} {row['tokens_per_rank']:>7} {row['full_fwd_bwd_tflops']:>9.1f} "
            f"{share:>6} {row['causal_fwd_bwd_tflops']:>10.1f} {row['full_fwd_tflops']:>9.1f} "
            f"{row['step_ms']:>8.1f} {row['tflops_in_ring']:>8.1f} {row['tflops_replayed']:>7.1f} "
            f"{row['in_ring_vs_replayed']:>6.2f} {100 * row['ring_overhead_share']:>7.1f}%"
        )
    lines.append("TFLOPS per GPU; f+b = forward+backward; in-ring / replay: the kernel calls of the "
                 "ring step timed inside it / replayed alone; overhead = 1 - kernel time / step time")
    return "\n".join(lines)


def format_decode(report: dict) -> str:
    """``usp bench decode``'s tables: latency and bytes per cache length, then the crossover."""
    bench = report["bench"]
    sp = bench["ring"] * bench["ulysses"]
    heads, kv_heads = report["heads"]
    lines = [
        f"usp bench decode: model {bench['model']}, ring {bench['ring']} x ulysses "
        f"{bench['ulysses']} ({bench['layout']}), median of {bench['steps']} decode steps",
        f"{'cache tokens':>12} {'SP=' + str(sp) + ' ms/token':>16} {'1 process':>10} "
        f"{'KV bytes/rank':>14} {'1 process':>12} {'ratio':>6}",
    ]
    for row in report["decode"]:
        lines.append(
            f"{row['cache_tokens']:>12} {1e3 * row['decode_s']:>16.2f} "
            f"{1e3 * row['single_decode_s']:>10.2f} {row['rank_bytes']:>14,} "
            f"{row['single_bytes']:>12,} {row['rank_bytes'] / row['single_bytes']:>6.3f}")
    lines += [
        "",
        f"pass-KV vs pass-Q: T new tokens against P cached, T + P = {bench['crossover_total']}; "
        f"rule (arXiv 2411.01783 eq. 1): pass-Q when T/(T+P) < 2*{kv_heads}/{heads} = "
        f"{report['threshold']:.3f}",
        f"{'T':>6} {'P':>6} {'T/(T+P)':>8} {'kv ms':>8} {'q ms':>8} {'kv p2p B':>10} "
        f"{'q p2p B':>10} {'faster':>6} {'rule':>5}",
    ]
    for row in report["crossover"]:
        faster = "kv" if row["kv_s"] <= row["q_s"] else "q"
        lines.append(
            f"{row['new_tokens']:>6} {row['cached_tokens']:>6} "
            f"{row['new_tokens'] / (row['new_tokens'] + row['cached_tokens']):>8.3f} "
            f"{1e3 * row['kv_s']:>8.1f} {1e3 * row['q_s']:>8.1f} {row['kv_p2p_bytes']:>10,} "
            f"{row['q_p2p_bytes']:>10,} {faster:>6} {row['rule']:>5}")
    return "\n".join(lines)
