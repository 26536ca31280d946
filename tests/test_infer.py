"""Prefill and decode over a sharded KV cache vs the single-process model (usp.infer).

One spawned 4-rank world runs every case: ring 2 x ulysses 2, ring 4 and ulysses 4 (4 query and
2 kv heads: fewer kv heads than Ulysses ranks), each layout, an even and an uneven prompt,
pass-KV and pass-Q, a continuation against a cache, 32 greedy decode steps, and the misuses.
Every case compares with the plain model run on the whole sequence in one process: fp64 to
1e-10; fp32 within twice the fp32 single-process model's own error against fp64 (docs/testing.md).
"""

from __future__ import annotations

import torch

from tests.distributed import collect_failures, run_on_ranks
from usp import Topology
from usp.comm import CommStats
from usp.infer import ShardedKVCache, choose_ring_pass, decode_step, generate, prefill
from usp.models import Llama, LlamaConfig, get_config
from usp.models.llama.model import causal_attention

WORLD = 4
CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
TOPOLOGIES = [(2, 2), (4, 1), (1, 4)]
LAYOUTS = ["contiguous", "zigzag", "stripe"]
EVEN, UNEVEN = 40, 37  # 37 tokens: no layout splits them over 4 ranks evenly
DECODE_STEPS = 32
FP64_TOLERANCE = 1e-10


def _model(dtype: torch.dtype = torch.float64) -> Llama:
    model = Llama(CONFIG)
    with torch.no_grad():  # sharper attention than the init's: a key seen wrongly shows
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(8.0)
            layer.attention.wk.weight.mul_(8.0)
    return model.to(dtype).eval()


def _prompt(length: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=generator)


def _reference(model: Llama, ids: torch.Tensor):
    """Logits ``[B, S, V]`` and each layer's K/V after RoPE, in one process."""
    captured = {}
    attentions = [layer.attention for layer in model.layers.values()]
    for index, attention in enumerate(attentions):
        def keep(q, k, v, documents=None, index=index):
            captured[index] = (k, v)
            return causal_attention(q, k, v)
        attention.attention_fn = keep
    try:
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids))
    finally:
        for attention in attentions:
            attention.attention_fn = causal_attention
    return logits, [captured[i] for i in range(len(attentions))]


def _reference_greedy(model: Llama, prompt: torch.Tensor, new_tokens: int):
    ids, logits = prompt, []
    for _ in range(new_tokens):
        with torch.no_grad():
            last = model(ids, torch.arange(ids.shape[1]).expand_as(ids))[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:], torch.stack(logits, dim=1)


def _teacher_forced(model: Llama, prompt: torch.Tensor, tokens: torch.Tensor):
    """The logits each of ``tokens`` was chosen from, given the tokens before it."""
    ids = torch.cat([prompt, tokens[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids))
    return logits[:, prompt.shape[1] - 1:]


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    error = (got.double() - want.double()).abs().max().item()
    if not error <= tolerance:
        raise AssertionError(f"{name}: error {error:.3g} > {tolerance:.3g}")


def _check_cache(cache, topology, references, length) -> None:
    for layer, (keys, values) in enumerate(references):
        got_k, got_v = cache.gather(layer, topology)
        _close(f"layer {layer} keys", got_k, keys[:, :length], FP64_TOLERANCE)
        _close(f"layer {layer} values", got_v, values[:, :length], FP64_TOLERANCE)


def _prefill_case(case, topologies, model):
    degrees, layout, length, ring_pass = case
    topology = topologies[degrees]
    ids = _prompt(length)
    logits, kv = _reference(model, ids)
    cache = ShardedKVCache.for_model(CONFIG, topology, layout, length + 4, batch=2,
                                     dtype=torch.float64)
    got = prefill(model, cache, ids, topology, ring_pass=ring_pass)
    _close("last logits", got, logits[:, -1], FP64_TOLERANCE)
    _check_cache(cache, topology, kv, length)


def _continuation_case(case, topologies, model):
    """24 prompt tokens, then 13 more against the cache through either ring; the p2p bytes are
    the per-step messages of the pass-KV / pass-Q rule."""
    degrees, layout, ring_pass = case
    topology = topologies[degrees]
    ids = _prompt(UNEVEN, seed=1)
    logits, kv = _reference(model, ids)
    cache = ShardedKVCache.for_model(CONFIG, topology, layout, UNEVEN, batch=2,
                                     dtype=torch.float64)
    prefill(model, cache, ids[:, :24], topology)
    with CommStats() as stats:
        got = prefill(model, cache, ids[:, 24:], topology, ring_pass=ring_pass)
    _close("last logits", got, logits[:, -1], FP64_TOLERANCE)
    _check_cache(cache, topology, kv, UNEVEN)
    ranks, head_dim = topology.sequence_size, CONFIG.head_dim
    if ring_pass == "kv":  # the longest shard's K and V, every step
        message = 2 * 2 * max(cache.counts) * CONFIG.n_kv_heads * head_dim * 8
    else:  # this rank's query rows (13 new tokens padded to 16: 4 per rank)
        message = 2 * 4 * CONFIG.n_heads * head_dim * 8
    expected = CONFIG.n_layers * (ranks - 1) * message
    if stats.bytes["p2p"] != expected:
        raise AssertionError(f"p2p bytes {stats.bytes['p2p']} != {expected}")


def _decode_case(case, topologies, models):
    degrees, layout, dtype = case
    topology = topologies[degrees]
    model, reference64 = models[dtype], models[torch.float64]
    prompt = _prompt(UNEVEN, seed=2)
    cache = ShardedKVCache.for_model(CONFIG, topology, layout, UNEVEN + DECODE_STEPS + 1,
                                     batch=2, dtype=dtype)
    result = generate(model, prompt, topology, max_new_tokens=DECODE_STEPS + 1, cache=cache)
    if max(cache.counts) - min(cache.counts) > 1:  # decoded tokens even out the shards
        raise AssertionError(f"unbalanced shards {cache.counts}")
    if dtype == torch.float64:
        tokens, logits = _reference_greedy(model, prompt, DECODE_STEPS + 1)
        _close("decode logits", result.logits, logits, FP64_TOLERANCE)
    else:  # the fp32 rule, on the tokens usp chose (a near tie may pick either in fp32)
        tokens, _ = _reference_greedy(model, prompt, DECODE_STEPS + 1)
        exact = _teacher_forced(reference64, prompt, result.tokens)
        own = (_teacher_forced(model, prompt, result.tokens).double() - exact).abs().max().item()
        _close("decode logits", result.logits, exact, 2 * own + 1e-6 * exact.abs().max().item())
    if not torch.equal(result.tokens, tokens):
        raise AssertionError(f"tokens differ:\n{result.tokens}\n{tokens}")


def _raises(call, *words) -> None:
    try:
        call()
    except ValueError as exc:
        missing = [w for w in words if w not in str(exc)]
        if missing:
            raise AssertionError(f"ValueError without {missing}: {exc}") from exc
        return
    raise AssertionError("no ValueError")


def _misuse_case(case, topologies, model):
    ids = _prompt(EVEN)
    built = topologies[(2, 2)]
    cache = ShardedKVCache.for_model(CONFIG, built, "zigzag", EVEN, batch=2, dtype=torch.float64)
    if case == "other topology":
        _raises(lambda: prefill(model, cache, ids, topologies[(4, 1)]), "ring=2 x ulysses=2",
                "ring=4 x ulysses=1")
    elif case == "prompt too long":
        small = ShardedKVCache.for_model(CONFIG, built, "zigzag", EVEN - 1, batch=2,
                                         dtype=torch.float64)
        _raises(lambda: prefill(model, small, ids, built), "40", "max_tokens=39")
    elif case == "decode past the end":
        prefill(model, cache, ids, built)
        _raises(lambda: decode_step(model, cache, ids[:, 0], built), "41", "max_tokens=40")


def _all_cases(rank, world_size):
    torch.manual_seed(0)
    topologies = {degrees: Topology.build(ring=degrees[0], ulysses=degrees[1])
                  for degrees in TOPOLOGIES}
    model = _model()
    failures = []
    prefill_cases = [(degrees, layout, length, ring_pass) for degrees in TOPOLOGIES
                     for layout in LAYOUTS for length in (EVEN, UNEVEN)
                     for ring_pass in ("kv", "q")]
    failures += collect_failures(prefill_cases, lambda c: _prefill_case(c, topologies, model))
    continuation_cases = [(degrees, layout, ring_pass) for degrees in TOPOLOGIES
                          for layout in LAYOUTS for ring_pass in ("kv", "q")]
    failures += collect_failures(continuation_cases,
                                 lambda c: _continuation_case(c, topologies, model))
    models = {torch.float64: model, torch.float32: _model(torch.float32)}
    decode_cases = [((2, 2), "zigzag", torch.float64), ((4, 1), "stripe", torch.float64),
                    ((1, 4), "contiguous", torch.float64), ((2, 2), "stripe", torch.float32)]
    failures += collect_failures(decode_cases, lambda c: _decode_case(c, topologies, models))
    misuse_cases = ["other topology", "prompt too long", "decode past the end"]
    failures += collect_failures(misuse_cases, lambda c: _misuse_case(c, topologies, model))
    return failures


def test_infer_grid_on_four_ranks():
    failures = run_on_ranks(_all_cases, WORLD, timeout_s=180)
    report = [f"rank {rank}: {line}" for rank, lines in enumerate(failures) for line in lines]
    assert not report, "\n".join(report)


def test_one_process_generation_matches_the_model():
    model = _model()
    prompt = _prompt(UNEVEN)
    result = generate(model, prompt, Topology.build(), max_new_tokens=8)
    tokens, logits = _reference_greedy(model, prompt, 8)
    assert torch.equal(result.tokens, tokens)
    assert (result.logits - logits).abs().max().item() <= FP64_TOLERANCE


def test_ring_pass_rule_follows_message_sizes():
    # pass-Q when T/(T+P) < 2 Hkv/Hq: 8 query and 2 kv heads give the threshold 1/2
    assert choose_ring_pass(1000, 0, 8, 2) == "kv"  # full prefill
    assert choose_ring_pass(1, 4095, 8, 2) == "q"  # decode-like
    assert choose_ring_pass(500, 500, 8, 2) == "kv"  # miss rate 1/2: equal messages, pass-KV
    assert choose_ring_pass(499, 501, 8, 2) == "q"
    # MHA (Hq = Hkv): the queries are half the K/V even in a full prefill (the paper: pass-KV
    # is smaller for a full prefill only when Hq > 2 Hkv)
    assert choose_ring_pass(1000, 0, 4, 4) == "q"
    assert choose_ring_pass(1000, 0, 4, 2) == "kv"  # Hq = 2 Hkv: equal messages, pass-KV
    # the compute-overlap test of the paper's Algorithm 1 keeps pass-KV for long chunks
    assert choose_ring_pass(4096, 10**6, 8, 1, ranks=4, peak_flops=1e12,
                            bandwidth=1e10) == "kv"
    assert choose_ring_pass(16, 10**6, 8, 1, ranks=4, peak_flops=1e12, bandwidth=1e10) == "q"


def test_usp_generate_command_in_one_process(tmp_path, capsys):
    from usp.cli import main
    from usp.inputs.byte_tokens import encode

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("def fibonacci(n):\n    ", encoding="utf-8")
    assert main(["generate", "--prompt-file", str(prompt_file), "--max-new-tokens", "4",
                 "--dtype", "fp64"]) == 0
    printed = capsys.readouterr().out
    model = Llama(get_config("tiny"))  # the command's default: the preset from seed 0
    tokens, _ = _reference_greedy(model.double(), torch.tensor([encode(prompt_file.read_text())]),
                                  4)
    assert f"generated 4: {tokens[0].tolist()}" in printed
    assert "prefill:" in printed and "per-token decode latency:" in printed
    assert printed.startswith("(untrained tiny model: random text; pass --hf-model DIR")

