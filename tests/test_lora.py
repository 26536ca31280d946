"""LoRA adapters through PEFT (``--lora-rank``): built, trained, resumed and exported.

A tiny Llama-like model is written to a folder in this process (seeded, norms perturbed so a
wrong split of them would show). One spawned world of 4 gloo ranks then

- builds it the way ``usp train`` does (skeleton, PEFT adapters, ``usp.parallelize`` over
  ring 2 x ulysses 2 with FSDP2 over the 4 ranks, the base weights read from the folder) in
  fp64, for two adapter settings (every linear layer with alpha 3 x rank; q_proj and v_proj
  with the default alpha). The factors start as one process draws them (``B = 0``, ``A`` from
  ``(seed, name)``); ``B`` is then set to seeded values so that ``A`` gets a gradient. One
  forward and backward on a seeded batch: the loss and the gradient of every LoRA factor equal
  those of transformers + ``peft.get_peft_model`` in one process, with the same base weights
  and the same factors, to 1e-10 (docs/testing.md, fp64); no base parameter gets a gradient;
- trains 3 steps with ``usp train``'s loop and ``--lora-rank 4`` from the folder (checkpoints
  at steps 2 and 3), and resumes the step-2 checkpoint under another layout (ulysses 4, with
  full activation checkpointing and the tiled MLP).

In this process: the base weights in the last checkpoint equal the folder's (only adapters
were trained), the merged export loads with ``from_pretrained`` and the adapter export with
``PeftModel.from_pretrained`` on the folder, both giving the trained usp model's logits by
docs/testing.md's rule against the fp64 model; the optimizer holds the factors only; and the
refusals (a Llama preset, tp > 1, pp > 1, a target that names no module or no linear layer,
negative numbers, ``--adapter`` without adapters, ``--init-from`` with other adapters).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.distributed import run_on_ranks
from tests.specs import run_spec
from usp.topology import AXES, Topology

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORLD, BATCH, SEQ, LAYOUT, SEED = 4, 2, 32, "zigzag", 7
TOLERANCE = 1e-10  # fp64 (docs/testing.md)
SHAPE = dict(model_type="llama", vocab_size=288, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.2, tie_word_embeddings=False, max_position_embeddings=256)
CASES = {"all-linear alpha 12": dict(lora_rank=4, lora_alpha=12.0, lora_targets=["all-linear"]),
         "q v default alpha": dict(lora_rank=2, lora_alpha=0.0, lora_targets=["q_proj", "v_proj"])}
RUN = dict(seq_len=32, global_batch=2, steps=3, warmup=1, seed=SEED, lr=1e-2,
           data=[str(REPO / "README.md")], progress=False, lora_rank=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """The base model: config.json and model.safetensors (fp64), as save_pretrained writes."""
    path = tmp_path_factory.mktemp("lora") / "base"
    path.mkdir()
    values = dict(SHAPE)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    config.to_json_file(path / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    return str(path)


def _settings(folder: str, case: dict):
    from usp.models.family import ModelSettings

    return ModelSettings(hf_model=folder, lora_rank=case["lora_rank"],
                         lora_alpha=case["lora_alpha"], lora_targets=tuple(case["lora_targets"]))


def _tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ + 1), generator=generator)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# ------------------------------------------------------------------------------ the world
def _exact_step(folder: str, case: dict, topology: Topology) -> None:
    """usp's sharded LoRA model vs transformers + PEFT in one process, fp64."""
    from usp.batch import shard_batch
    from usp.integrations.hf_family.lora import add_adapters, init_factor
    from usp.integrations.hf_family.model import build_hf_causal_lm
    from usp.loss import global_mean_cross_entropy
    from usp.models import init
    from usp.models.init import materialize
    from usp.parallel import parallelize

    settings = _settings(folder, case)
    model = build_hf_causal_lm(folder, dtype=torch.float64, device="meta")
    add_adapters(model.model, settings)
    model = parallelize(model, topology, layout=LAYOUT)
    materialize(model, torch.device("cpu"), SEED, pretrained=folder)
    factors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, parameter in factors.items():  # as one process draws them, then B made non-zero
        expected = torch.empty(parameter.shape, dtype=parameter.dtype)
        init_factor(expected, name.removeprefix("model."), SEED)
        if not torch.equal(_whole(parameter.detach()), expected):
            raise AssertionError(f"{name} starts other than one process draws it")
        if ".lora_B." in name:
            init.normal_(parameter, 0.1, SEED + 1, name)
    batch = shard_batch(_tokens(), topology, LAYOUT)
    loss = global_mean_cross_entropy(model(batch["input_ids"], batch["position_ids"]),
                                     batch["labels"], topology)
    loss.backward()
    frozen = [name for name, p in model.named_parameters() if p.grad is not None
              and name not in factors]
    if frozen:
        raise AssertionError(f"base parameters got gradients: {frozen[:3]}")

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64,
                                                     attn_implementation="sdpa")
    reference = get_peft_model(reference, LoraConfig(
        r=case["lora_rank"], lora_alpha=case["lora_alpha"] or 2 * case["lora_rank"],
        target_modules=("all-linear" if case["lora_targets"] == ["all-linear"]
                        else case["lora_targets"]), lora_dropout=0.0))
    mine = {"base_model.model." + name.removeprefix("model."): p for name, p in factors.items()}
    theirs = {name: p for name, p in reference.named_parameters() if p.requires_grad}
    if set(mine) != set(theirs):
        raise AssertionError(f"factors differ: {sorted(set(mine) ^ set(theirs))[:4]}")
    with torch.no_grad():
        for name, parameter in theirs.items():
            parameter.copy_(_whole(mine[name].detach()))
    tokens = _tokens()
    logits = reference(input_ids=tokens[:, :-1], use_cache=False).logits
    expected = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    expected.backward()
    errors = {"loss": (loss.detach() - expected.detach()).abs().item()}
    errors.update({name: (_whole(mine[name].grad) - p.grad).abs().max().item()
                   for name, p in theirs.items()})
    wrong = {name: error for name, error in errors.items() if not error <= TOLERANCE}
    if wrong:
        raise AssertionError(f"{len(wrong)} of {len(errors)} beyond {TOLERANCE}: "
                             + ", ".join(f"{n} {e:.3g}" for n, e in list(wrong.items())[:4]))


def _world(rank: int, world_size: int, folder: str, out: str) -> dict:
    from tests.distributed import collect_failures
    from usp.training.loop import train

    topology = Topology.build(ring=2, ulysses=2)
    failures = collect_failures(list(CASES.values()),
                                lambda case: _exact_step(folder, case, topology))
    straight = train(run_spec(out=f"{out}/run", hf_model=folder, ring=2, ulysses=2,
                              ckpt_every=2, **RUN))
    # another layout, recomputing each block and tiling each MLP in the backward
    resumed = train(run_spec(out=f"{out}/resumed", hf_model=folder, ulysses=4, ckpt_every=0,
                             ac="full", tiled_mlp=8,
                             resume=f"{out}/run/checkpoints/step_000002", **RUN))
    return {"failures": failures, "straight": [r["loss"] for r in straight],
            "resumed": [r["loss"] for r in resumed]}


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lora-runs")
    results = run_on_ranks(_world, WORLD, folder, str(out), timeout_s=400)
    return {"results": results, "run": out / "run"}


def test_sharded_lora_matches_transformers_and_peft_in_one_process(trained):
    lines = [f"rank {rank}: {line}" for rank, result in enumerate(trained["results"])
             for line in result["failures"]]
    assert not lines, "\n".join(lines)


def test_training_changes_only_the_adapters_and_resumes_on_another_layout(trained, folder):
    from usp.training.checkpoint import read_tensors
    from usp.training.export import _model_tensors, find_checkpoint

    straight, resumed = trained["results"][0]["straight"], trained["results"][0]["resumed"]
    assert len(straight) == 3 and all(map(torch.isfinite, torch.tensor(straight)))
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight[2:]), rtol=1e-5,
                               atol=0)
    _, path = find_checkpoint(trained["run"], None)
    shapes = _model_tensors(path)
    tensors = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}
    read_tensors(path, tensors)
    base = load_file(f"{folder}/model.safetensors")
    factors = {name for name in tensors if ".lora_" in name}
    assert len(factors) == 2 * 7 * SHAPE["num_hidden_layers"]  # q k v o gate up down
    for name, tensor in tensors.items():
        if name not in factors:
            saved = base[name.removeprefix("model.").replace(".base_layer.", ".")]
            assert torch.equal(tensor, saved.to(tensor.dtype)), name
    assert all(tensors[name].abs().max() > 0 for name in factors if ".lora_B." in name)


def _usp_logits(run: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The trained usp model of ``run`` in one process, loaded from its newest checkpoint."""
    from usp.models.init import materialize
    from usp.models.registry import family_of
    from usp.training.checkpoint import load_model_weights
    from usp.training.export import find_checkpoint, run_model

    settings, _ = run_model(run)
    model = materialize(family_of(settings).skeleton(settings), torch.device("cpu"), seed=0)
    load_model_weights(find_checkpoint(run, None)[1], model)
    with torch.no_grad():
        return model.to(dtype)(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1)).double()


def test_merged_and_adapter_exports_give_the_trained_logits(trained, folder, tmp_path):
    from usp.training.export import export

    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    own, exact = (_usp_logits(trained["run"], ids, dtype)
                  for dtype in (torch.float32, torch.float64))
    bound = 2 * (own - exact).abs().max().item() + 1e-6 * exact.abs().max().item()

    merged = export(trained["run"], tmp_path / "merged")
    assert not merged.adapter
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    assert not any(".lora_" in name or "base_layer" in name for name in model.state_dict())
    with torch.no_grad():
        error = (model(ids).logits.double() - exact).abs().max().item()
    assert error <= bound, f"merged export off by {error:.3g} > {bound:.3g}"

    adapter = export(trained["run"], tmp_path / "adapter", adapter=True)
    assert adapter.adapter and adapter.tensors == 2 * 7 * SHAPE["num_hidden_layers"]
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors"}
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["lora_alpha"] == 8
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        error = (peft_model(input_ids=ids).logits.double() - exact).abs().max().item()
    assert error <= bound, f"adapter export off by {error:.3g} > {bound:.3g}"


def test_export_adapter_of_a_run_without_adapters_is_refused(trained, tmp_path):
    import shutil

    from usp.training import run_dir

    full = tmp_path / "full"
    shutil.copytree(trained["run"], full)
    settings = run_dir.read_settings(full)
    (full / "config.json").write_text(json.dumps({**settings, "lora_rank": 0}))
    with pytest.raises(ValueError, match="--adapter: .* trained every weight"):
        from usp.training.export import export

        export(full, tmp_path / "out", adapter=True)


def test_the_optimizer_holds_the_adapters_only(folder):
    from usp.integrations.hf_family.model import skeleton
    from usp.training.optim import build_optimizer

    model = skeleton(_settings(folder, CASES["q v default alpha"]))
    optimizer, _ = build_optimizer(model, run_spec().optim)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    factors = {name for name, p in model.named_parameters() if id(p) in held}
    assert len(factors) == 2 * 2 * SHAPE["num_hidden_layers"]  # A and B of q_proj and v_proj
    assert all(".lora_A." in name or ".lora_B." in name for name in factors)


def test_init_from_a_run_with_other_adapters_is_refused(trained):
    from usp.training.checkpoint import read_metadata
    from usp.training.export import find_checkpoint
    from usp.training.resume import check_init_source

    _, path = find_checkpoint(trained["run"], None)
    saved = read_metadata(path)
    check_init_source(str(path), saved)  # the same adapters
    other = {"model": saved["model"], "run": {**saved["run"], "lora": None}}
    with pytest.raises(ValueError, match=re.escape(
            "LoRA adapters {'rank': 4, 'alpha': 8, 'targets': ['all-linear']} in the checkpoint "
            "but None now")):
        check_init_source(str(path), other)


# ------------------------------------------------------------------------------ refusals
def _shape(**degrees) -> Topology:
    return Topology(sizes={axis: degrees.get(axis, 1) for axis in AXES},
                    ranks={axis: 0 for axis in AXES})


@pytest.mark.parametrize("settings, degrees, message", [
    (dict(model="tiny", lora_rank=4), {}, "offered for Hugging Face models only, not for the "
     "Llama preset --model tiny; .* --hf-model DIR or --hf-config"),
    (dict(lora_rank=4), {"tp": 2}, "LoRA adapters with tp=2"),
    (dict(lora_rank=4), {"pp": 2}, "LoRA adapters with pp=2"),
    (dict(lora_rank=4, lora_targets=["q_proj", "qkv_proj"]), {},
     "--lora-targets 'qkv_proj' matches no module of LlamaForCausalLM"),
    (dict(lora_rank=4, lora_targets=["input_layernorm"]), {},
     "matches model.layers.0.input_layernorm \\(LlamaRMSNorm\\)"),
    (dict(lora_rank=-1), {}, "--lora-rank=-1 and --lora-alpha=0.0 must be >= 0"),
    (dict(lora_rank=4, lora_alpha=-2.0), {}, "--lora-alpha=-2.0 must be >= 0"),
])
def test_what_lora_cannot_run_is_refused_before_any_rank_starts(folder, settings, degrees,
                                                                 message):
    from usp.inputs.model import validate_model

    values = {"hf_model": folder, **settings} if "model" not in settings else settings
    with pytest.raises(ValueError, match=message):
        validate_model(run_spec(**values).model, _shape(**degrees), cuda=False, loss="full")
