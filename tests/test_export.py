"""``usp export``: a Hugging Face folder from a checkpoint of any layout, read back by
transformers.

Two runs train one step on 4 ranks and save a checkpoint: a usp Llama preset under tp 2 x
ulysses 2 (written as ``LlamaForCausalLM``, its query and key rows reordered for transformers'
rotary layout) and a Hugging Face Qwen3 with tied embeddings under tp 2 x ulysses 2 (written as
its own architecture). Each export is loaded with ``from_pretrained`` and its logits compared with
usp's model loaded from the same checkpoint, by docs/testing.md's rule against the fp64 model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.specs import run_spec
from usp.training.checkpoint import load_model_weights
from usp.training.export import export
from usp.training.loop import train

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = str(REPO / "README.md")
RUN = dict(seq_len=32, global_batch=2, steps=1, warmup=1, ckpt_every=1, data=[CORPUS],
           progress=False)
QWEN3 = dict(model_type="qwen3", vocab_size=384, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             tie_word_embeddings=True)


def _train(rank: int, world_size: int, root: str) -> None:
    train(run_spec(model="tiny", tp=2, ulysses=2, out=f"{root}/llama", **RUN))
    train(run_spec(hf_config=f"{root}/qwen3.json", tp=2, ulysses=2, out=f"{root}/qwen3",
                      **RUN))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    (root / "qwen3.json").write_text(json.dumps(QWEN3))
    run_on_ranks(_train, 4, str(root), timeout_s=400)
    return root


def _usp_model(run: Path, dtype: torch.dtype) -> torch.nn.Module:
    """usp's own model of the run, in one process, loaded from its newest checkpoint."""
    from usp.models.registry import family_of
    from usp.models.init import materialize
    from usp.training.export import find_checkpoint, run_model

    settings, _ = run_model(run)
    model = materialize(family_of(settings).skeleton(settings), torch.device("cpu"), seed=0)
    load_model_weights(find_checkpoint(run, None)[1], model)
    return model.to(dtype)


def _check_export(run: Path, out: Path, **options) -> dict:
    result = export(run, out, **options)
    exported = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(2, -1)
    with torch.no_grad():
        got = exported(ids).logits.double()
        own = _usp_model(run, torch.float32)(ids, positions).double()
        exact = _usp_model(run, torch.float64)(ids, positions)
    bound = 2 * (own - exact).abs().max().item() + 1e-6 * exact.abs().max().item()
    error = (got - exact).abs().max().item()
    assert error <= bound, f"{run.name}: exported logits off by {error:.3g} > {bound:.3g}"
    return {"result": result, "config": exported.config}


def test_a_tp_run_of_a_llama_preset_loads_in_transformers_with_the_same_logits(runs, tmp_path):
    checked = _check_export(runs / "llama", tmp_path / "llama", max_shard_bytes=400_000)
    result, config = checked["result"], checked["config"]
    assert config.architectures == ["LlamaForCausalLM"] and config.eos_token_id == 256
    assert result.shards > 1 and result.step == 1 and result.byte_level
    index = json.loads((tmp_path / "llama" / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == result.tensors == 39  # 4 layers x 9, embedding, norm, head
    assert {p.name for p in (tmp_path / "llama").iterdir()} >= {"config.json",
                                                                 "generation_config.json"}


def test_a_hugging_face_run_exports_as_its_own_architecture(runs, tmp_path):
    checked = _check_export(runs / "qwen3", tmp_path / "qwen3")
    config = checked["config"]
    assert config.architectures == ["Qwen3ForCausalLM"] and config.tie_word_embeddings
    saved = AutoConfig.from_pretrained(tmp_path / "qwen3")
    assert saved.num_hidden_layers == 2 and saved.vocab_size == 384
    assert (tmp_path / "qwen3" / "model.safetensors").is_file()  # one shard, no index


def test_bad_sources_and_outputs_are_refused_naming_them(runs, tmp_path):
    llama = runs / "llama"
    with pytest.raises(ValueError, match="has no complete checkpoint of step 7; it has steps"):
        export(llama, tmp_path / "a", step=7)
    with pytest.raises(ValueError, match="neither a run directory"):
        export(tmp_path, tmp_path / "b")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="exists; export into a new folder"):
        export(llama, tmp_path / "taken")
    damaged = tmp_path / "damaged"
    shutil.copytree(llama, damaged)
    step = damaged / "checkpoints" / "step_000001"
    shard = sorted(step.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"checkpoint {step} is corrupt.*{shard.name}"):
        export(damaged, tmp_path / "c")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.partial-*"))


def test_the_command_line_prints_what_it_wrote(runs, tmp_path):
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "usp", "export", str(runs / "llama"), "--out",
         str(tmp_path / "out"), "--dtype", "bf16", "--max-shard-size", "1MB"],
        env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "39 tensors" in done.stdout and "bf16" in done.stdout and "byte-level" in done.stdout
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "h\u00e9llo w\u00f6rld\n\t \U0001f600"
    assert tokenizer(text).input_ids == list(text.encode()) and tokenizer.eos_token_id == 256
    assert tokenizer.decode(list(text.encode())) == text
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_usp_generate_runs_a_checkpoint_greedily_like_its_model(runs, capsys):
    from usp.cli import main

    prompt = "def fibonacci(n):"
    assert main(["generate", "--checkpoint", str(runs / "llama"), "--prompt", prompt,
                 "--max-new-tokens", "4", "--dtype", "fp64"]) == 0
    printed = capsys.readouterr().out
    model = _usp_model(runs / "llama", torch.float64)
    ids = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        for _ in range(4):  # greedy, the whole sequence each time
            logits = model(ids, torch.arange(ids.shape[1])[None])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert f"generated 4: {ids[0, -4:].tolist()}" in printed
    assert "step_000001 (step 1)" in printed
