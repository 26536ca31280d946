"""Models built on the meta device, parallelised, then materialised shard by shard.

One spawned world of 4 gloo ranks:

- every parameter (and buffer) of our Llama and of Hugging Face models, built sharded under
  FSDP2, TP (Hugging Face models: from their config's plan), both, and pipeline stages, equals bit for bit the single-process initialisation of
  the same seed;
- a Llama-3-8B-shaped model (bf16, all 32 layers) parallelised on meta holds exactly a quarter of
  the parameter bytes per rank under FSDP over 4 (16.06 GB / 4 = 4.015 GB), a quarter plus half
  of the norms (replicated over tp) under TP 2 x FSDP 2, half of a stage's with pp 2 x FSDP 2;
- a model of Llama-3-8B's width (one layer, a 32K vocabulary: 0.49 B parameters, bf16) is
  materialised: each rank's parameter bytes are a
  quarter of the model's, its resident memory grows by its shard and no more, and its values
  equal the single-process initialisation of the same parameters.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.tensor import DTensor

from tests.distributed import collect_failures, run_on_ranks
from usp.models import Llama, LlamaConfig
from usp.models.llama import get_config
from usp.parallel import parallelize
from usp.topology import Topology
from usp.training import metrics
from usp.models.counts import parameter_bytes
from usp.models.init import materialize
from usp.integrations.hf_family.config import load_hf_config
from usp.integrations.hf_family.model import build_hf_causal_lm

SEED = 7
CONFIG = LlamaConfig(vocab_size=96, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=160)
LLAMA_CASES = [
    # (degrees, tie_embeddings)
    ({"ring": 2, "ulysses": 2}, False),
    ({"tp": 2, "ulysses": 2}, False),
    ({"tp": 2, "dp": 2}, True),
    ({"tp": 4}, False),
    ({"pp": 2, "tp": 2}, False),
    ({"pp": 2, "dp": 2}, False),
    ({"pp": 4}, False),
]
HF_CASES = [("tiny-qwen3", {"ring": 2, "ulysses": 2}), ("tiny-gemma", {"dp": 2, "ulysses": 2}),
            ("tiny-qwen2", {"dp": 4}), ("tiny-qwen3", {"tp": 2, "ulysses": 2})]
EIGHT_B = get_config("llama3-8b")
MiB = 2**20


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _tensors(model) -> dict[str, torch.Tensor]:
    """Parameters and buffers (computed ones too: RoPE tables), by name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _compare(model, reference: dict, what: str) -> None:
    """Every tensor of ``model`` (a parallelised one: this rank's stage) equals the reference."""
    state = _tensors(model)
    mismatched = [name for name, tensor in state.items()
                  if not torch.equal(_whole(tensor).detach(), reference[name])]
    if mismatched:
        raise AssertionError(f"{what}: {len(mismatched)} tensors differ from one process's: "
                             f"{mismatched[:4]}")


def _llama_case(case) -> None:
    degrees, tie = case
    config = dataclasses.replace(CONFIG, tie_embeddings=tie)
    single = Llama(config)
    single.init_weights(SEED)
    reference = _tensors(single)
    with torch.device("meta"):
        model = Llama(config)
    model = materialize(parallelize(model, Topology.build(**degrees)), torch.device("cpu"), SEED)
    _compare(model, reference, f"llama {degrees}")


def _hf_case(case) -> None:
    preset, degrees = case
    reference = _tensors(build_hf_causal_lm(preset, seed=SEED))
    model = parallelize(build_hf_causal_lm(preset, device="meta"), Topology.build(**degrees))
    _compare(materialize(model, torch.device("cpu"), SEED), reference, f"{preset} {degrees}")


def _meta_8b(degrees: dict) -> tuple[int, int]:
    """(this rank's parameter bytes, the whole model's) of Llama-3-8B in bf16, on meta."""
    with torch.device("meta"):
        model = Llama(EIGHT_B).to(torch.bfloat16)
    whole = parameter_bytes(model)
    return parameter_bytes(parallelize(model, Topology.build(**degrees))), whole


def _materialised_8b_width() -> dict:
    """One layer of Llama-3-8B's width, 32K vocabulary (0.49 B parameters, bf16), over ring 2 x
    ulysses 2 (kept small: four ranks share this machine's two cores and memory)."""
    config = dataclasses.replace(EIGHT_B, n_layers=1, vocab_size=32768)
    with torch.device("meta"):
        model = Llama(config).to(torch.bfloat16)
    whole = parameter_bytes(model)
    model = parallelize(model, Topology.build(ring=2, ulysses=2))
    cpu = torch.device("cpu")
    metrics.release_freed_memory(cpu)
    before = metrics.current_memory_bytes(cpu)
    metrics.reset_peak_memory(cpu)
    materialize(model, cpu, SEED)
    grown = metrics.peak_memory_bytes(cpu) - before
    # single-process values of a few whole parameters: the unparallelised skeleton with only
    # those materialised, initialised as one process initialises the whole model
    with torch.device("meta"):
        single = Llama(config).to(torch.bfloat16)
    names = ["layers.0.attention.wk.weight", "layers.0.attention.wo.weight", "norm.weight"]
    for name in names:
        single.get_submodule(name.rsplit(".", 1)[0]).to_empty(device=cpu)
    single.init_weights(SEED)
    parameters, expected = dict(model.named_parameters()), dict(single.named_parameters())
    equal = {name: torch.equal(parameters[name].full_tensor(), expected[name]) for name in names}
    return {"bytes": parameter_bytes(model), "whole": whole, "grown": grown, "equal": equal}


def _world(rank: int, world_size: int) -> dict:
    failures = collect_failures(LLAMA_CASES, _llama_case)
    failures += collect_failures(HF_CASES, _hf_case)
    meta = {name: _meta_8b(degrees) for name, degrees in
            (("fsdp4", {"ring": 2, "ulysses": 2}), ("tp2-dp2", {"tp": 2, "dp": 2}),
             ("pp2-dp2", {"pp": 2, "dp": 2}))}
    return {"failures": failures, "meta": meta, "materialised": _materialised_8b_width()}


def test_built_sharded_equals_one_process_and_holds_only_its_shard():
    results = run_on_ranks(_world, 4, timeout_s=400)
    failures = [f"rank {r}: {line}" for r, result in enumerate(results)
                for line in result["failures"]]
    assert not failures, "\n".join(failures)
    whole = results[0]["meta"]["fsdp4"][1]
    assert whole == 8_030_261_248 * 2  # Llama-3-8B in bf16
    norm_bytes = EIGHT_B.dim * 2
    norms = (2 * EIGHT_B.n_layers + 1) * norm_bytes
    for result in results:
        assert result["meta"]["fsdp4"][0] == whole // 4
        # tensor parallelism replicates the norms over tp (sequence parallel), FSDP halves them
        assert result["meta"]["tp2-dp2"][0] == (whole - norms) // 4 + norms // 2
        # a stage: the embedding and 16 layers, or 16 layers, the final norm and the output
        assert abs(result["meta"]["pp2-dp2"][0] - whole // 4) <= norm_bytes
        materialised = result["materialised"]
        assert materialised["bytes"] == materialised["whole"] // 4
        assert all(materialised["equal"].values()), materialised["equal"]
        # resident memory grows by the shard (and a block of rows in flight), never the model
        assert materialised["grown"] <= materialised["bytes"] + 64 * MiB, materialised


def test_one_process_build_keeps_ties_and_equals_an_eager_build(tmp_path):
    for tie in (False, True):
        config = dataclasses.replace(CONFIG, tie_embeddings=tie)
        reference = Llama(config)
        reference.init_weights(SEED)
        with torch.device("meta"):
            model = Llama(config)
        _compare(materialize(model, torch.device("cpu"), SEED), _tensors(reference), f"tie={tie}")
        assert (model.output.weight is model.tok_embeddings.weight) == tie
    config = load_hf_config("tiny-qwen3")
    config.tie_word_embeddings = True
    config.to_json_file(tmp_path / "config.json")
    tied = build_hf_causal_lm(str(tmp_path), seed=SEED)  # on meta, then materialised
    assert tied.model.lm_head.weight is tied.model.model.embed_tokens.weight
