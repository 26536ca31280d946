"""Single-process checks of the plain Llama: RoPE on explicit positions, GQA, tying, configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from usp.layout import shard_positions
from usp.models import CONFIGS, Llama, LlamaConfig, get_config
from usp.models.llama.model import apply_rotary, causal_attention, rotary_cos_sin

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


def _batch(config: LlamaConfig, batch: int = 2, seq: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    return tokens, torch.arange(seq).expand(batch, seq)


def test_rope_matches_complex_rotation():
    head_dim, theta = 8, 10000.0
    x = torch.randn(2, 6, 3, head_dim, dtype=torch.float64)
    positions = torch.tensor([[0, 5, 9, 100, 7, 3], [1, 2, 3, 4, 5, 6]])
    cos, sin = rotary_cos_sin(positions, head_dim, theta, torch.float64)
    ours = apply_rotary(x, cos, sin)
    # Meta's formulation: pairs as complex numbers times e^{i * position * theta^(-2j/D)}
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rotation = torch.polar(torch.ones(2, 6, head_dim // 2, dtype=torch.float64),
                           positions[..., None].double() * freqs)
    reference = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation[:, :, None, :]
    ).flatten(-2)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
def test_rope_on_explicit_positions_equals_contiguous_then_permuted(layout):
    seq, head_dim = 32, 16
    x = torch.randn(2, seq, 4, head_dim)
    cos, sin = rotary_cos_sin(torch.arange(seq).expand(2, seq), head_dim, 500000.0, torch.float32)
    contiguous = apply_rotary(x, cos, sin)
    for ring, ulysses in ((2, 2), (4, 1), (1, 4)):
        for ring_rank in range(ring):
            for ulysses_rank in range(ulysses):
                held = shard_positions(seq, ring, ulysses, ring_rank, ulysses_rank, layout)
                cos_l, sin_l = rotary_cos_sin(held.expand(2, -1), head_dim, 500000.0, torch.float32)
                shard = apply_rotary(x[:, held], cos_l, sin_l)
                torch.testing.assert_close(shard, contiguous[:, held], rtol=0, atol=0)


def test_logits_depend_only_on_relative_positions():
    model = Llama(dataclasses.replace(TINY, rope_theta=10000.0)).double()
    tokens, positions = _batch(TINY)
    shifted = model(tokens, positions + 1000)
    torch.testing.assert_close(shifted, model(tokens, positions), rtol=0, atol=1e-9)


def test_attention_is_causal_gqa_math():
    q = torch.randn(2, 10, 6, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 10, 3, 8, dtype=torch.float64).unbind(0)
    out = causal_attention(q, k, v)
    # query head h reads KV head h // (Hq / Hkv)
    k_rep, v_rep = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_rep) / 8**0.5
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    reference = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v_rep)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)


def test_gqa_equals_multi_head_with_repeated_kv_weights():
    gqa = Llama(TINY).double()
    mha = Llama(dataclasses.replace(TINY, n_kv_heads=TINY.n_heads)).double()
    state = gqa.state_dict()
    repeat = TINY.n_heads // TINY.n_kv_heads
    for name, value in list(state.items()):
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # [Hkv*D, dim] -> [Hkv, D, dim] -> [Hq, D, dim]: each KV head serves `repeat` q heads
            heads = value.unflatten(0, (TINY.n_kv_heads, TINY.head_dim))
            state[name] = heads.repeat_interleave(repeat, dim=0).flatten(0, 1)
    mha.load_state_dict(state)
    tokens, positions = _batch(TINY)
    torch.testing.assert_close(gqa(tokens, positions), mha(tokens, positions), rtol=0, atol=1e-12)


def test_later_tokens_do_not_change_earlier_logits():
    model = Llama(TINY).double()
    tokens, positions = _batch(TINY)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % TINY.vocab_size
    before, after = model(tokens, positions), model(changed, positions)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-12)
    assert (before[:, 10:] - after[:, 10:]).abs().max() > 1e-3


def test_tied_embeddings_share_one_weight_and_sum_both_gradients():
    tied = Llama(dataclasses.replace(TINY, tie_embeddings=True)).double()
    untied = Llama(TINY).double()
    assert tied.output.weight is tied.tok_embeddings.weight
    embedding = TINY.vocab_size * TINY.dim
    assert tied.num_params() == untied.num_params() - embedding
    state = tied.state_dict()
    untied.load_state_dict(state)
    tokens, positions = _batch(TINY)
    tied(tokens, positions).square().mean().backward()
    untied(tokens, positions).square().mean().backward()
    expected = untied.tok_embeddings.weight.grad + untied.output.weight.grad
    torch.testing.assert_close(tied.tok_embeddings.weight.grad, expected, rtol=0, atol=1e-12)


def test_init_weights_is_deterministic():
    a, b = Llama(TINY), Llama(TINY)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    b.init_weights(seed=4)
    assert not torch.equal(a.layers["0"].attention.wq.weight, b.layers["0"].attention.wq.weight)


def test_config_validation_and_lookup():
    with pytest.raises(ValueError, match="dim=30 is not divisible by n_heads=4"):
        LlamaConfig(vocab_size=8, dim=30, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8)
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by n_kv_heads=3"):
        LlamaConfig(vocab_size=8, dim=32, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8)
    with pytest.raises(ValueError, match="head_dim=3 must be even"):
        LlamaConfig(vocab_size=8, dim=12, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8)
    with pytest.raises(ValueError, match="llama3-8b"):
        get_config("llama9")
    assert get_config("tiny") is CONFIGS["tiny"]
    model = Llama(TINY)
    with pytest.raises(ValueError, match="same"):
        model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_llama3_8b_shapes_and_flops():
    config = get_config("llama3-8b")
    with torch.device("meta"):
        model = Llama(config)
    assert model.num_params() == 8_030_261_248  # Meta-Llama-3-8B's published parameter count
    non_embedding = model.num_params() - config.vocab_size * config.dim
    expected = 6 * non_embedding + 6 * config.n_layers * config.dim * 8192
    assert model.flops_per_token(8192) == expected
