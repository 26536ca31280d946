"""``model.generate`` with a USPCache vs single-process eager generation (usp.infer.hf).

One spawned 4-rank world: Llama with grouped kv heads (2 kv heads over Ulysses 4 included) on
ring 2 x ulysses 2, ring 4 and ulysses 4 greedy, and with sampling under a fixed seed; Qwen2
(q/k/v biases) greedy on ulysses 4; the hybrids Bamba (Mamba-2 layers), Qwen3-Next (gated
delta rule) and Falcon-H1 (attention and Mamba-2 side by side) greedy on ring 2 x ulysses 2,
Nemotron-H (Mamba-2, MLP and attention layers), Zamba2 (a shared attention block) and OLMo
Hybrid and Jamba (Mamba-1) on ring 4, Granite 4 and Qwen3.5 on ulysses 4, LFM2 (short
convolutions) on ring 2 x ulysses 2, their scan layers' states carried in the
cache from
the prompt through every new token (Bamba also prepared by ``USPContext.prepare``, whose split
scan layers run whole in a generation). The tokens equal eager's and sdpa's, every step's logits
equal fp64 sdpa's (as generate hands them out, cast to fp32); an uneven prompt.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, BambaConfig, FalconH1Config,
                          GraniteMoeHybridConfig, Lfm2Config, LlamaConfig, NemotronHConfig,
                          OlmoHybridConfig, Qwen2Config, Qwen3_5TextConfig, Qwen3NextConfig,
                          Zamba2Config)

from tests.distributed import collect_failures, run_on_ranks
from tests.test_hf_hybrid import (BAMBA, FALCON_H1, GRANITE_4, JAMBA, LFM2, NEMOTRON_H,
                                   OLMO_HYBRID, QWEN3_5, QWEN3_NEXT, ZAMBA2)
from usp import Topology
from usp.infer.hf import HYBRID_STATES, USPCache
from usp.integrations.transformers import USPContext
from usp.integrations.hf_family.model import trivial_topology

WORLD = 4
VOCAB, PROMPT, NEW = 128, 21, 12  # 21 tokens: no layout splits them over 4 ranks evenly
_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, initializer_range=0.2,
             tie_word_embeddings=False)
ARCHITECTURES = {"llama-gqa": lambda: LlamaConfig(**_TINY),
                 "qwen2-gqa": lambda: Qwen2Config(**_TINY),
                 "bamba": lambda: BambaConfig(**{**BAMBA, "vocab_size": VOCAB}),
                 "qwen3-next": lambda: Qwen3NextConfig(**{**QWEN3_NEXT, "vocab_size": VOCAB}),
                 # a Mamba-2 layer, an MLP layer (no cache), attention
                 "nemotron-h": lambda: NemotronHConfig(**{
                     **NEMOTRON_H, "vocab_size": VOCAB, "num_hidden_layers": 3,
                     "hybrid_override_pattern": "M-*"}),
                 # attention and a Mamba-2 mixer side by side in every layer
                 "falcon-h1": lambda: FalconH1Config(**{**FALCON_H1, "vocab_size": VOCAB}),
                 "granite-4": lambda: GraniteMoeHybridConfig(**{**GRANITE_4, "vocab_size": VOCAB}),
                 # a Mamba-2 layer, then a shared attention block beside a Mamba-2 layer
                 "zamba2": lambda: Zamba2Config(**{**ZAMBA2, "vocab_size": VOCAB}),
                 "qwen3.5": lambda: Qwen3_5TextConfig(**{**QWEN3_5, "vocab_size": VOCAB}),
                 "olmo-hybrid": lambda: OlmoHybridConfig(**{**OLMO_HYBRID, "vocab_size": VOCAB}),
                 "lfm2": lambda: Lfm2Config(**{**LFM2, "vocab_size": VOCAB}),
                 "jamba": lambda: AutoConfig.for_model("jamba", **{**JAMBA, "vocab_size": VOCAB})}
TOPOLOGIES = [(2, 2, "zigzag"), (4, 1, "stripe"), (1, 4, "contiguous")]


def _models(arch: str, prepare: USPContext | None = None):
    """eager, sdpa and usp copies of one seeded fp64 model (the usp copy ``prepare``d by that
    context, if given). transformers' eager attention takes its softmax in fp32 even for fp64
    (off by ~1e-6); sdpa is the exact fp64 reference."""
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(ARCHITECTURES[arch](), attn_implementation="eager")
    eager = eager.double().eval()
    exact, model = copy.deepcopy(eager), copy.deepcopy(eager)
    exact.set_attn_implementation("sdpa")
    if prepare is None:
        model.set_attn_implementation("usp")
    else:
        prepare.prepare(model)
    return eager, exact, model


def _prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(3))


def _generate(model, ids, cache=None, seed=None, **options):
    options = dict(options)
    if seed is not None:
        torch.manual_seed(seed)
    extra = {} if cache is None else {"past_key_values": cache, "usp_context": cache.context}
    options.setdefault("attention_mask", torch.ones_like(ids))  # token 0 is no padding here
    return model.generate(ids, max_new_tokens=NEW, pad_token_id=0, return_dict_in_generate=True,
                          output_logits=True, **options, **extra)


def _case(case, topologies, models, expected):
    arch, degrees, sampling = case
    topology, layout = topologies[degrees[:2]], degrees[2]
    cache = USPCache(models[arch].config, topology, layout, max_tokens=PROMPT + NEW, batch=2,
                     dtype=torch.float64)
    got = _generate(models[arch], _prompt(), cache, **SAMPLING[sampling])
    for name, want in zip(("eager", "sdpa"), expected[(arch, sampling)]):
        if not torch.equal(got.sequences, want.sequences):
            raise AssertionError(f"tokens differ from {name}:\n{got.sequences}\n"
                                 f"{want.sequences}")
    # generate hands out the logits cast to fp32: fp64 results within 1e-10 of each other cast
    # alike (the ranks merge in another order than sdpa sums, so allow one rounding step)
    error = max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits))
    bound = 2**-23 * max(b.abs().max().item() for b in want.logits)
    if not error <= bound:
        raise AssertionError(f"logits off by {error:.3g} > {bound:.3g}")
    counts = cache.sharded.counts
    if max(counts) - min(counts) > 1 or sum(counts) != PROMPT + NEW - 1:
        raise AssertionError(f"shards hold {counts} tokens")


SAMPLING = {False: {"do_sample": False}, True: {"do_sample": True, "seed": 7, "top_k": 20}}


def _world(rank, world_size):
    topologies = {degrees[:2]: Topology.build(ring=degrees[0], ulysses=degrees[1])
                  for degrees in TOPOLOGIES}
    # Llama greedy on every topology and sampling on one; Qwen2 (q/k/v biases) greedy on one
    cases = [("llama-gqa", degrees, False) for degrees in TOPOLOGIES]
    cases += [("llama-gqa", TOPOLOGIES[0], True), ("qwen2-gqa", TOPOLOGIES[2], False)]
    if HYBRID_STATES:  # transformers 5.23: the hybrids' states live in the Cache's layers
        cases += [("bamba", TOPOLOGIES[0], False), ("qwen3-next", TOPOLOGIES[0], False),
                  ("nemotron-h", TOPOLOGIES[1], False), ("falcon-h1", TOPOLOGIES[0], False),
                  ("granite-4", TOPOLOGIES[2], False), ("zamba2", TOPOLOGIES[1], False),
                  ("qwen3.5", TOPOLOGIES[2], False), ("olmo-hybrid", TOPOLOGIES[1], False),
                  ("lfm2", TOPOLOGIES[0], False), ("jamba", TOPOLOGIES[1], False)]
    models, expected = {}, {}
    for arch in dict.fromkeys(name for name, _, _ in cases):  # the same order on every rank
        # Bamba prepared for training first: its scan layers' split forward must run whole here
        context = USPContext(topologies[(2, 2)], "zigzag") if arch == "bamba" else None
        eager, exact, models[arch] = _models(arch, context)
        for sampling in {sampling for name, _, sampling in cases if name == arch}:
            expected[(arch, sampling)] = [_generate(reference, _prompt(), **SAMPLING[sampling])
                                          for reference in (eager, exact)]
    return collect_failures(cases, lambda case: _case(case, topologies, models, expected))


def test_generate_with_usp_cache_matches_eager_on_four_ranks():
    failures = run_on_ranks(_world, WORLD, timeout_s=180)
    lines = [f"rank {rank}: {line}" for rank, lines in enumerate(failures) for line in lines]
    assert not lines, "\n".join(lines)


def test_one_process_and_refusals():
    eager, _, model = _models("llama-gqa")
    ids = _prompt()
    cache = USPCache(model.config, trivial_topology(), max_tokens=PROMPT + NEW, batch=2,
                     dtype=torch.float64)
    got = _generate(model, ids, cache, do_sample=False)
    assert torch.equal(got.sequences, _generate(eager, ids, do_sample=False).sequences)
    small = USPCache(model.config, trivial_topology(), max_tokens=PROMPT, batch=2,
                     dtype=torch.float64)
    with pytest.raises(ValueError, match="max_tokens=21"):
        _generate(model, ids, small, do_sample=False)
    with pytest.raises(ValueError, match="beam search"):
        beams = USPCache(model.config, trivial_topology(), max_tokens=PROMPT + NEW, batch=2,
                         dtype=torch.float64)
        _generate(model, ids, beams, num_beams=2, do_sample=False)
    padded = USPCache(model.config, trivial_topology(), max_tokens=PROMPT + NEW, batch=2,
                      dtype=torch.float64)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="unpadded"):
        _generate(model, ids, padded, do_sample=False, attention_mask=mask)


def test_a_transformers_without_hybrid_cache_layers_refuses_hybrids(monkeypatch):
    """Before transformers 5.23 a hybrid's scan layers keep their states in a cache class of
    their own: a USPCache refuses them, naming the version, instead of failing in a layer."""
    import usp.infer.hf

    monkeypatch.setattr(usp.infer.hf, "HYBRID_STATES", False)
    with pytest.raises(ValueError, match=r"BambaConfig has layers other than attention.*5\.23"):
        USPCache(ARCHITECTURES["bamba"](), trivial_topology(), max_tokens=8)
    USPCache(ARCHITECTURES["llama-gqa"](), trivial_topology(), max_tokens=8)  # attention: kept
