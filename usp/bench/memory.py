"""`usp bench train --features`: what each memory feature saves, measured in real training steps.

For SP = 1, 2, 4 (``--grid``) it trains fresh ranks with every feature off, each feature alone and
all on, and reports per rank the step's peak memory and the bytes autograd saved for the
backward (``usp.training.metrics``). Vocabulary-parallel cross-entropy needs tensor parallelism:
it is measured against full logits at tp = 2. Activation offload needs CUDA and is not measured
on a CPU.

With ``--memory-cap-mib`` it then finds, for all features off and all on, the longest sequence
whose step peaks under that cap per rank: the peak is linear in S (the attention kernels keep
O(S) state), so it is fitted through the grid's lengths (``--fit-seq-lens``) and solved for the
cap, and one step is trained at the solution to confirm it (the bench reports what that step
measured, fitting or not).
"""

from __future__ import annotations

import logging

from usp.bench.training import MIB, measure

logger = logging.getLogger(__name__)


def features(tile_tokens: int, chunk_tokens: int) -> dict[str, dict]:
    """Name -> run spec settings of each measured configuration (tp = 1)."""
    return {
        "all off": {},
        "loss chunked": {"loss": "chunked", "loss_chunk_tokens": chunk_tokens},
        "tiled MLP": {"tiled_mlp": tile_tokens},
        "ac attention": {"ac": "attention"},
        "ac mlp": {"ac": "mlp"},
        "ac block": {"ac": "block"},
        "all on": {"loss": "chunked", "loss_chunk_tokens": chunk_tokens,
                   "tiled_mlp": tile_tokens, "ac": "block"},
    }


def measure_features(args, grid: list[tuple[int, int]]) -> list[dict]:
    """Every feature configuration at every ``RING x ULYSSES`` of ``grid``, then tp = 2."""
    results = []
    configurations = features(args.tile_tokens, args.chunk_tokens)
    for ring, ulysses in grid:
        for name, overrides in configurations.items():
            logger.info("SP=%d: %s", ring * ulysses, name)
            results.append({"feature": name, **measure(args, ring, ulysses, args.seq_len,
                                                        args.steps, overrides)})
    for ring, ulysses in grid[:2]:  # tp = 2 doubles the ranks: SP 1 and 2 (2 and 4 ranks)
        for name, loss in (("tp 2, full logits", "full"),
                           ("tp 2, vocab parallel", "vocab_parallel")):
            results.append({"feature": name, **measure(args, ring, ulysses, args.seq_len,
                                                        args.steps, {"tp": 2, "loss": loss})})
    return results


def format_features(results: list[dict]) -> str:
    off = {(r["ring"], r["ulysses"], r["feature"].startswith("tp 2")): r for r in results
           if r["feature"] in ("all off", "tp 2, full logits")}
    lines = [
        "per rank (the largest), MiB: peak = the step's peak memory; saved = tensors autograd "
        "keeps for the backward; vs off = against the same SP with every feature off (tp 2: "
        "against full logits)",
        f"{'SP':>3} {'ring x ulysses':>14} {'configuration':<22} {'peak':>7} {'vs off':>7} "
        f"{'saved':>7} {'vs off':>7}",
    ]
    for r in results:
        base = off[(r["ring"], r["ulysses"], r["feature"].startswith("tp 2"))]
        peak, saved = max(r["peak_mib"]), max(r["saved_mib"])
        lines.append(
            f"{r['sp']:>3} {r['ring']:>6} x {r['ulysses']:<6} {r['feature']:<22} {peak:>7.0f} "
            f"{peak / max(base['peak_mib']):>7.2f} {saved:>7.1f} "
            f"{saved / max(base['saved_mib']):>7.2f}"
        )
    return "\n".join(lines)


def longest_under_cap(args, ring: int, ulysses: int, name: str, overrides: dict) -> dict:
    """Fit the peak per rank over ``--fit-seq-lens``, solve for ``--memory-cap-mib``, confirm."""
    points = [measure(args, ring, ulysses, seq_len, 1, overrides) for seq_len in args.fit_seq_lens]
    xs = [p["seq_len"] for p in points]
    ys = [max(p["peak_mib"]) for p in points]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    per_token = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / sum(
        (x - x_mean) ** 2 for x in xs)
    intercept = y_mean - per_token * x_mean
    granule = 1024 * ring * ulysses
    predicted = int((args.memory_cap_mib - intercept) / per_token) // granule * granule
    confirmed = measure(args, ring, ulysses, predicted, 1, overrides)
    logger.info("%s at SP=%d: S=%d peaks at %.0f MiB (cap %d)", name, ring * ulysses, predicted,
                max(confirmed["peak_mib"]), args.memory_cap_mib)
    return {"feature": name, "sp": ring * ulysses, "fit_points": list(zip(xs, ys)),
            "mib_per_1k_tokens": per_token * 1024, "intercept_mib": intercept,
            "seq_len": predicted, "peak_mib": max(confirmed["peak_mib"]),
            "fits": max(confirmed["peak_mib"]) <= args.memory_cap_mib,
            "step_time_s": confirmed["step_time_s"]}


def format_cap(found: list[dict], cap_mib: int) -> str:
    lines = [f"longest sequence under {cap_mib} MiB per rank (fitted, then one step trained "
             "there):"]
    for r in found:
        points = ", ".join(f"S={x}: {y:.0f}" for x, y in r["fit_points"])
        lines.append(
            f"SP={r['sp']} {r['feature']:<8}: S={r['seq_len']:>7,} peaks at "
            f"{r['peak_mib']:.0f} MiB "
            f"({'fits' if r['fits'] else 'OVER the cap'}; {r['mib_per_1k_tokens']:.1f} MiB per 1k "
            f"tokens; fit through {points} MiB)"
        )
    by_sp = {}
    for r in found:
        by_sp.setdefault(r["sp"], {})[r["feature"]] = r["seq_len"]
    for sp, lengths in by_sp.items():
        if "all off" in lengths and "all on" in lengths:
            ratio = lengths["all on"] / lengths["all off"]
            lines.append(f"SP={sp}: all on / all off = {ratio:.2f}x")
    return "\n".join(lines)
