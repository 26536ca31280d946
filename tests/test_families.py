"""The model registry (usp.models.registry) and what the two families answer through it.

One process: which family claims which settings, a model of no family, the checkpoint record
each family writes (pinned: a run written earlier must still resume), the checks each family
runs before any rank starts (the Hugging Face family's losses for --hf-model too), the FLOPs and
generation through the entries, and that a Llama run never imports transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from usp.integrations.hf_family.config import hf_config_metadata
from usp.integrations.hf_family.model import build_hf_causal_lm, trivial_topology
from usp.models.family import ModelSettings
from usp.models.llama import CONFIGS, Llama
from usp.models import registry
from usp.models.registry import families, family_of, family_of_model
from usp.parallel import parallelize
from usp.topology import Topology
from usp.inputs.model import model_metadata, pretrained_source
from usp.training.setup import validate
from tests.specs import run_spec

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(seq_len=32, global_batch=1, steps=1, progress=False, synthetic=True)


def _sizes(**degrees) -> Topology:
    sizes = {"pp": 1, "dp": 1, "ring": 1, "ulysses": 1, "tp": 1, **degrees}
    return Topology(sizes, {axis: 0 for axis in sizes})


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    """A local Hugging Face model folder: config.json, safetensors weights and a tokenizer."""
    from tests.test_pretrained import _save_model, _save_tokenizer

    directory = tmp_path_factory.mktemp("families") / "qwen3"
    _save_model(directory, "qwen3", head_dim=16, tie_word_embeddings=False)
    _save_tokenizer(directory)
    return str(directory)


def test_each_setting_is_claimed_by_exactly_one_family(monkeypatch):
    assert [family.name for family in families()] == ["llama", "hugging-face"]
    assert family_of(ModelSettings(model="small")).name == "llama"
    assert family_of(ModelSettings(hf_config="tiny-qwen3")).name == "hugging-face"
    assert family_of(ModelSettings(hf_model="some/folder")).name == "hugging-face"
    greedy = dataclasses.replace(family_of(ModelSettings()), name="greedy",
                                 claims=lambda settings: True)
    monkeypatch.setitem(registry._families, "greedy", greedy)
    with pytest.raises(ValueError, match="exactly one model family; claimed by: llama, greedy"):
        family_of(ModelSettings())


def test_a_model_of_no_family_is_refused_by_parallelize():
    with pytest.raises(ValueError, match="Linear belongs to no registered model family"):
        parallelize(nn.Linear(4, 4), trivial_topology())
    assert family_of_model(Llama(CONFIGS["tiny"])).name == "llama"
    assert family_of_model(build_hf_causal_lm("tiny-qwen3", device="meta")).name == "hugging-face"


def test_checkpoint_records_are_those_earlier_runs_wrote():
    # the exact record of a preset in meta.json: a change here stops older checkpoints resuming
    name, record = model_metadata(run_spec(model="tiny", **RUN).model)
    assert (name, record) == ("tiny", {
        "vocab_size": 512, "dim": 128, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4,
        "ffn_dim": 384, "rope_theta": 500000.0, "norm_eps": 1e-5, "tie_embeddings": False})
    name, record = model_metadata(run_spec(hf_config="tiny-qwen3", **RUN).model)
    assert name == "tiny-qwen3" and record == hf_config_metadata("tiny-qwen3")
    assert "transformers_version" not in record and record["model_type"] == "qwen3"
    assert pretrained_source(run_spec(hf_config="tiny-qwen3", **RUN).model) is None
    assert pretrained_source(run_spec(hf_model="a/b", **RUN).model) == "a/b"


def test_each_family_checks_its_settings_before_any_rank_starts(model_folder, tmp_path):
    llama = family_of(ModelSettings())
    with pytest.raises(ValueError, match="LlamaConfig.vocab_size=512 is smaller than the 600"):
        llama.validate(ModelSettings(), _sizes(), 600)
    with pytest.raises(ValueError, match="n_heads=8 is not divisible by tp=3"):
        llama.validate(ModelSettings(), _sizes(tp=3), 257)
    # the full-logits loss only, for a config and for a model folder alike
    for settings in ({"hf_config": "tiny-qwen3"},
                     {"hf_model": model_folder, "tokenizer": model_folder}):
        config = run_spec(loss="chunked", out=str(tmp_path / "out"), **settings, **RUN)
        with pytest.raises(ValueError, match="loss='chunked' is not offered for .*: its "
                                             r"family's models offer \['full'\]"):
            validate(config, 1)
    with pytest.raises(ValueError, match="loss='chunked' is not offered for HFCausalLM"):
        parallelize(build_hf_causal_lm("tiny-qwen3", device="meta"), trivial_topology(),
                    loss="chunked")


def test_flops_per_token_is_the_family_formula():
    for settings in (ModelSettings(model="llama3-1b"), ModelSettings(hf_config="tiny-gemma")):
        family = family_of(settings)
        model = family.skeleton(settings)
        assert family.flops_per_token(model, 4096) == model.flops_per_token(4096)
    tied = CONFIGS["llama3-1b"]  # a tied embedding multiplies in the output projection
    model = family_of(ModelSettings(model="llama3-1b")).skeleton(ModelSettings(model="llama3-1b"))
    attention = 6 * tied.n_layers * tied.n_heads * tied.head_dim * 4096
    assert model.flops_per_token(4096) == 6.0 * model.num_params() + attention


def test_usp_generate_runs_a_model_folder_through_its_family(model_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from usp.cli import main

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the ring passes keys", encoding="utf-8")
    assert main(["generate", "--prompt-file", str(prompt), "--hf-model", model_folder,
                 "--max-new-tokens", "3", "--dtype", "fp64"]) == 0
    printed = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    ids = tokenizer(prompt.read_text(), return_tensors="pt").input_ids
    eager = AutoModelForCausalLM.from_pretrained(model_folder, attn_implementation="eager",
                                                 dtype=torch.float64)
    expected = eager.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert f"generated 3: {expected[0, ids.shape[1]:].tolist()}" in printed
    assert f"model {model_folder}; ring 1 x ulysses 1" in printed
    assert "untrained" not in printed


def test_a_llama_run_imports_no_transformers(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def f():", encoding="utf-8")
    script = f"""
import sys, torch
from usp.infer.config import GenerateConfig
from usp.inputs.model import model_metadata
from usp.training.build import build_model
from usp.training.setup import validate
from tests.specs import run_spec
config = run_spec(model="tiny", out={str(tmp_path / "out")!r}, **{RUN!r})
validate(config, 1)
model_metadata(config.model)
build_model(config.model, config.parallel, config.memory, __import__("usp").Topology.build(),
            torch.device("cpu"), seq_len=config.data.seq_len, seed=config.seed)
GenerateConfig(prompt_file={str(prompt)!r}).validate()
print(sorted(name for name in sys.modules if name.split(".")[0] == "transformers"))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1].replace("'", '"')) == []


def test_settings_are_checked_before_torch_loads(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def f():", encoding="utf-8")
    script = f"""
import sys
from usp.infer.config import GenerateConfig
from usp.models.family import ModelSettings
from usp.models.registry import family_of
for settings in (ModelSettings(model="llama3-8b"), ModelSettings(hf_config="tiny-qwen3")):
    family = family_of(settings)
    family.display_name(settings), family.plan.losses, family.pretrained(settings)
family_of(ModelSettings()).size(ModelSettings())
family_of(ModelSettings()).metadata(ModelSettings())
GenerateConfig(prompt_file={str(prompt)!r}, model="small").validate()
try:
    GenerateConfig(prompt_file={str(prompt)!r}, model="huge").validate()
except ValueError as exc:
    print(exc)
print(sorted({{name.split(".")[0] for name in sys.modules}} & {{"torch", "transformers"}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    refusal, imported = result.stdout.splitlines()[-2:]
    assert refusal.startswith("unknown model config 'huge'") and imported == "[]"

