"""usp.integrations.hf_family: Hugging Face configs, the HFCausalLM wrapper and its parallelisation.

Single process; the FSDP2 step over dp 2 x ulysses 2 runs in tests/test_transformers.py's world.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from usp import Topology
from usp.integrations.hf_family.config import PRESETS, load_hf_config, validate_hf_config
from usp.integrations.hf_family.model import build_hf_causal_lm, trivial_topology
from usp.models.llama import Llama, get_config
from usp.memory.checkpointing import PRESETS as CHECKPOINT_PRESETS
from usp.parallel import parallelize

ACTIVATION_CHECKPOINTING = tuple(CHECKPOINT_PRESETS)  # none, full, selective


def _sizes(**degrees) -> Topology:
    """A shape-only topology, as ``usp train`` validates with before starting any rank."""
    sizes = {"dp": 1, "ring": 1, "ulysses": 1, "tp": 1, **degrees}
    return Topology(sizes, {axis: 0 for axis in sizes})


def test_hf_configs_presets_files_and_refusals(tmp_path):
    for preset in PRESETS:
        validate_hf_config(preset, _sizes(ring=2, ulysses=2))
    path = tmp_path / "config.json"
    load_hf_config("tiny-qwen3").to_json_file(path)
    assert load_hf_config(str(tmp_path)).head_dim == 16
    assert type(load_hf_config(str(path))).__name__ == "Qwen3Config"

    def written(name, values):
        (tmp_path / name).write_text(json.dumps(values))
        return str(tmp_path / name)

    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    refusals = [
        (lambda: load_hf_config(str(tmp_path / "missing")), "neither a preset"),
        (lambda: load_hf_config(written("a.json", {"vocab_size": 512})), 'no "model_type"'),
        (lambda: validate_hf_config(written("e.json", {"model_type": "llama",
                                                       "num_attention_heads": 6, "hidden_size": 384,
                                                       "num_key_value_heads": 4}), _sizes()),
         "n_q_heads=6 is not a multiple of n_kv_heads=4"),
        (lambda: validate_hf_config("tiny-llama", _sizes(tp=3)),
         "num_attention_heads=8 is not divisible by tp=3"),
        (lambda: validate_hf_config(written("t.json", {"model_type": "llama", "vocab_size": 512,
                                                       "tie_word_embeddings": True}),
                                    _sizes(pp=2)), "tie_word_embeddings with pp > 1"),
        (lambda: validate_hf_config(written("p.json", {"model_type": "llama", "vocab_size": 512,
                                                       "num_hidden_layers": 2}),
                                    _sizes(pp=4)), "num_hidden_layers=2 < pp=4"),
        (lambda: validate_hf_config(written("b.json", {"model_type": "llama", "vocab_size": 100}),
                                    _sizes()), "vocab_size=100 is smaller"),
        (lambda: validate_hf_config(written("c.json", {"model_type": "llama",
                                                       "attention_chunk_size": 8}), _sizes()),
         "attention_chunk_size=8"),
        (lambda: validate_hf_config(written("d.json", {"model_type": "llama",
                                                       "rope_parameters": rope}), _sizes()),
         "rope_type='dynamic'"),
    ]
    for run, needle in refusals:
        with pytest.raises(ValueError, match=re.escape(needle)):
            run()


def test_build_is_seeded_and_equal_to_a_fresh_build():
    first = build_hf_causal_lm("tiny-gemma", seed=5)
    second = build_hf_causal_lm("tiny-gemma", seed=5)
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = build_hf_causal_lm("tiny-gemma", seed=6)
    assert not torch.equal(first.model.lm_head.weight, other.model.lm_head.weight)
    with pytest.raises(ValueError, match="same \\[B, S\\] shape"):
        first(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_hf_causal_lm_checkpointing_and_flops():
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, -1)
    grads = {}
    for ac in ACTIVATION_CHECKPOINTING:
        model = parallelize(build_hf_causal_lm("tiny-llama", seed=1), trivial_topology(),
                               activation_checkpointing=ac)
        logits = model(tokens[:, :-1], positions)
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads[ac] = [p.grad for p in model.parameters()]
    for ac in ACTIVATION_CHECKPOINTING[1:]:
        for got, expected in zip(grads[ac], grads["none"]):
            torch.testing.assert_close(got, expected)
    # the same shapes as usp's own "tiny" Llama: the same parameter count and FLOPs
    llama = Llama(get_config("tiny"))
    assert model.num_params() == llama.num_params()
    assert model.flops_per_token(1024) == llama.flops_per_token(1024)
