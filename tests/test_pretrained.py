"""`usp train --hf-model DIR --tokenizer DIR`: local safetensors into the shards, a local tokenizer.

The test builds everything it needs in tmp directories (no download): a BPE tokenizer trained on
a few sentences, a tiny random Llama saved in several safetensors files with an index, and a
tiny Qwen3 with tied embeddings in one file. One spawned world of 4 gloo ranks then

- builds each model sharded from its files (ring 2 x ulysses 2, dp 2 x ulysses 2) and compares
  every parameter with the saved tensors, exactly, and each rank's bytes with a quarter of them;
- trains 3 steps of each with ``usp.training.loop.train`` (the Llama on packed documents ended by
  the tokenizer's EOS, the Qwen3 unpacked) and resumes the Llama from its step-2 checkpoint.

Step 1's loss must equal the loss plain transformers computes in this process from the same files
and the same batch (per document when packed), within docs/testing.md's rule: error vs the fp64
reference <= 2 x the fp32 reference's error + 1e-6. The resumed step 3 equals the straight one
bit for bit. Bad inputs are refused by ``validate``, before any rank would start, with the file,
the tensor or the numbers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from tests.distributed import run_on_ranks
from usp.topology import Topology
from usp.models.counts import parameter_bytes
from usp.training.build import build_model
from usp.training.data import TokenBatcher
from usp.training.loop import train
from usp.training.setup import validate
from tests.specs import run_spec

SENTENCES = [
    "the ring passes keys and values around the ranks",
    "ulysses trades heads for sequence with one all to all",
    "every rank holds a shard of the parameters and of the tokens",
    "the loss is the mean over every token of every rank",
    "a checkpoint written under one layout loads under another",
    "packed documents never attend across their boundaries",
    "the tokenizer ends every document with its end of sequence token",
    "gradients are summed over the data and sequence ranks",
]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, vocab_size=128)
RUN = dict(seq_len=24, global_batch=2, steps=3, warmup=1, seed=3, progress=False)


def _save_tokenizer(directory: Path, eos: bool = True) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<eos>"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   **({"eos_token": "<eos>"} if eos else {}))
    fast.save_pretrained(directory)
    return len(fast)


def _save_model(directory: Path, model_type: str, **overrides) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**SHAPE, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    sharded = model_type == "llama"
    model.save_pretrained(directory, max_shard_size="60KB" if sharded else "1GB")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pretrained")
    tokens = _save_tokenizer(root / "tokenizer")
    _save_model(root / "llama", "llama", tie_word_embeddings=False)
    _save_model(root / "qwen3", "qwen3", head_dim=16, tie_word_embeddings=True)
    data = []  # a sentence per document: every window of step 1 holds an EOS
    for i, sentence in enumerate(SENTENCES):
        data.append(root / f"doc{i}.txt")
        data[-1].write_text(sentence)
    return {"tokens": tokens, "tokenizer": str(root / "tokenizer"), "llama": str(root / "llama"),
            "qwen3": str(root / "qwen3"), "data": [str(p) for p in data]}


def _saved(directory: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


# ------------------------------------------------------------------------------ the reference
def _first_batch(files: dict) -> tuple[torch.Tensor, int]:
    """Step 1's global batch, tokenized here with plain transformers calls."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(files["tokenizer"], local_files_only=True)
    stream = []
    for path in files["data"]:
        stream += tokenizer(Path(path).read_text(), add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id)
    batcher = TokenBatcher(torch.tensor(stream), RUN["global_batch"], RUN["seq_len"], RUN["seed"])
    return batcher.next_batch(), tokenizer.eos_token_id


def _reference_loss(model_dir: str, tokens: torch.Tensor, eos: int, pack: bool,
                    dtype: torch.dtype) -> float:
    """Plain transformers: the mean next-token loss over the windows, or over each packed
    document (one ends with EOS) run on its own from position 0; in ``dtype`` throughout
    (transformers' own loss would upcast the logits to fp32 only)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                 dtype=dtype, local_files_only=True)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in tokens:
            ends = (row == eos).nonzero().flatten().tolist() if pack else []
            for start, stop in zip([0] + [e + 1 for e in ends], ends + [len(row) - 1]):
                segment = row[start : stop + 1]
                if len(segment) >= 2:
                    logits = model(input_ids=segment[None]).logits[0, :-1]
                    total += F.cross_entropy(logits, segment[1:], reduction="sum").item()
                    count += len(segment) - 1
    return total / count


# ------------------------------------------------------------------------------ the world
def _loaded_equals_saved(files: dict, name: str, degrees: dict) -> dict:
    config = run_spec(hf_model=files[name], tokenizer=files["tokenizer"], data=files["data"],
                         **{k: v for k, v in RUN.items() if k != "progress"}, **degrees)
    model, _ = build_model(config.model, config.parallel, config.memory, Topology.build(**degrees),
                           torch.device("cpu"), seq_len=config.data.seq_len, seed=config.seed)
    saved = _saved(files[name])
    differing = [key for key, p in model.named_parameters()
                 if not torch.equal((p.full_tensor() if isinstance(p, DTensor) else p).detach(),
                                    saved[key.removeprefix("model.")])]
    whole = sum(t.numel() * t.element_size() for t in saved.values())
    return {"differing": differing, "bytes": parameter_bytes(model), "whole": whole}


def _world(rank: int, world_size: int, files: dict, out: str) -> dict:
    loaded = {name: _loaded_equals_saved(files, name, degrees) for name, degrees in
              (("llama", {"ring": 2, "ulysses": 2}), ("qwen3", {"dp": 2, "ulysses": 2}))}
    common = dict(tokenizer=files["tokenizer"], data=files["data"], **RUN)
    llama = dict(hf_model=files["llama"], ring=2, ulysses=2, **common)
    straight = train(run_spec(out=f"{out}/llama", ckpt_every=2, **llama))
    resumed = train(run_spec(out=f"{out}/llama-resumed", ckpt_every=0,
                                resume=f"{out}/llama/checkpoints/step_000002", **llama))
    qwen3 = train(run_spec(out=f"{out}/qwen3", hf_model=files["qwen3"], dp=2, ulysses=2,
                              pack=False, ckpt_every=0, **{**common, "steps": 1}))
    # pipeline stages (pp 2 x ulysses 2, one decoder layer each): loaded from the files, and
    # resumed from the ring 2 x ulysses 2 run's checkpoint
    staged = {**llama, "ring": 1, "pp": 2}
    stage_loaded = _loaded_equals_saved(files, "llama", {"pp": 2, "ulysses": 2})
    piped = train(run_spec(out=f"{out}/llama-pp", ckpt_every=0, **staged))
    piped_resumed = train(run_spec(out=f"{out}/llama-pp-resumed", ckpt_every=0,
                                      resume=f"{out}/llama/checkpoints/step_000002", **staged))
    return {"loaded": loaded, "straight": [r["loss"] for r in straight],
            "resumed": [r["loss"] for r in resumed], "qwen3": [r["loss"] for r in qwen3],
            "stage_loaded": stage_loaded, "piped": [r["loss"] for r in piped],
            "piped_resumed": [r["loss"] for r in piped_resumed]}


def test_fine_tune_from_local_files_matches_transformers(files, tmp_path):
    results = run_on_ranks(_world, 4, files, str(tmp_path), timeout_s=400)
    for result in results:
        for name, loaded in result["loaded"].items():
            assert not loaded["differing"], (name, loaded["differing"])
            assert loaded["bytes"] == loaded["whole"] // 4, (name, loaded)
    tokens, eos = _first_batch(files)
    assert ((tokens == eos).sum(dim=1) >= 1).all(), "step 1 should hold packed documents"
    for name, losses, pack in (("llama", results[0]["straight"], True),
                               ("qwen3", results[0]["qwen3"], False)):
        reference64 = _reference_loss(files[name], tokens, eos, pack, torch.float64)
        reference32 = _reference_loss(files[name], tokens, eos, pack, torch.float32)
        error, bound = abs(losses[0] - reference64), 2 * abs(reference32 - reference64) + 1e-6
        assert error <= bound, (name, losses[0], reference64, reference32)
    assert results[0]["resumed"] == results[0]["straight"][2:]
    assert all(r["straight"] == results[0]["straight"] for r in results)
    straight = torch.tensor(results[0]["straight"], dtype=torch.float64)
    for result in results:  # every stage holds its own layers, read from the files
        assert not result["stage_loaded"]["differing"], result["stage_loaded"]["differing"]
    piped = torch.tensor(results[0]["piped"], dtype=torch.float64)
    resumed = torch.tensor(results[0]["piped_resumed"], dtype=torch.float64)
    torch.testing.assert_close(piped, straight, rtol=1e-5, atol=0)
    torch.testing.assert_close(resumed, straight[2:], rtol=1e-5, atol=0)


def test_bf16_weights_load_into_fp32_parameters_in_one_process(files, tmp_path):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(files["qwen3"], local_files_only=True)
    source.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config = run_spec(hf_model=str(tmp_path / "bf16"), tokenizer=files["tokenizer"],
                         data=files["data"], seq_len=24)
    model, _ = build_model(config.model, config.parallel, config.memory, Topology.build(),
                           torch.device("cpu"), seq_len=config.data.seq_len, seed=config.seed)
    saved = _saved(str(tmp_path / "bf16"))
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32, name
        assert torch.equal(parameter, saved[name.removeprefix("model.")].float()), name
    assert torch.equal(model.model.lm_head.weight, model.model.model.embed_tokens.weight)


# ------------------------------------------------------------------------------ refusals
def _copy(files: dict, name: str, tmp_path: Path, new: str) -> Path:
    target = tmp_path / new
    shutil.copytree(files[name], target)
    return target


def test_bad_weights_and_tokenizers_are_refused_with_the_numbers(files, tmp_path):
    def refused(message: str, **settings) -> None:
        settings = {"tokenizer": files["tokenizer"], "data": files["data"],
                    "out": str(tmp_path / "out"), **RUN, **settings}
        with pytest.raises(ValueError, match=re.escape(message)):
            validate(run_spec(**settings), 1)

    missing = _copy(files, "llama", tmp_path, "missing")
    second = sorted(missing.glob("*.safetensors"))[1]
    second.unlink()
    refused(f"weight files that {missing / 'model.safetensors.index.json'} names are missing: "
            f"{second.name}", hf_model=str(missing))
    truncated = _copy(files, "llama", tmp_path, "truncated")
    shard = sorted(truncated.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    refused(f"{shard} is not a readable safetensors file", hf_model=str(truncated))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(Path(files["qwen3"]) / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    refused("holds pytorch_model.bin but no model.safetensors", hf_model=str(pickled))
    wider = _copy(files, "qwen3", tmp_path, "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    refused("model.layers.0.mlp.down_proj.weight is [64, 128] in model.safetensors, the config "
            "gives [64, 96]", hf_model=str(wider))
    extra = _copy(files, "qwen3", tmp_path, "extra")
    tensors = load_file(extra / "model.safetensors")
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, extra / "model.safetensors")
    refused("1 tensors the model does not have (model.extra.weight)", hf_model=str(extra))
    small = _copy(files, "qwen3", tmp_path, "small-vocab")
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 64}))
    refused(f"has {files['tokens']} tokens (ids up to {files['tokens'] - 1}), but the model "
            f"{small} has vocab_size=64", hf_model=str(small))
    no_eos = tmp_path / "no-eos"
    _save_tokenizer(no_eos, eos=False)
    refused("has no EOS token", hf_model=files["qwen3"], tokenizer=str(no_eos))
    refused("drop --hf-config", hf_model=files["qwen3"], hf_config="tiny-qwen3")
