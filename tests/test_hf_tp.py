"""Tensor parallelism of Hugging Face models from their config's ``base_model_tp_plan``.

One spawned 4-rank world: tiny Llama, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms) and a
Llama whose output projection is tied to the embedding, each written to a folder by one process,
then built on meta, ``usp.parallelize``d over tp 2 x ulysses 2, tp 2 x ring 2 and tp 2 x dp 2
(TP, then FSDP2 over the other two ranks), read back from the folder into the sharded DTensors
and run for one forward and backward; logits, loss and every parameter's gradient equal the
single-process model's in fp64 to 1e-10 (docs/testing.md). The reference attends with SDPA,
which computes fp64 throughout (transformers' eager attention takes its softmax in fp32). The
refusals (heads or vocabulary tp cannot split, no plan, a plan string or module usp does not
run, a per-head norm the plan leaves on whole heads, tp with pipeline stages) raise on every
rank before any collective.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from tests.distributed import collect_failures, run_on_ranks
from usp import Topology, unshard_sequence
from usp.batch import shard_batch
from usp.integrations.hf_family.config import validate_hf_config
from usp.integrations.hf_family.model import HFCausalLM, build_hf_causal_lm, trivial_topology
from usp.integrations.transformers import USPContext
from usp.loss import global_mean_cross_entropy
from usp.parallel import parallelize
from usp.topology import AXES
from usp.models.init import materialize

WORLD, BATCH, SEQ, VOCAB, LAYOUT = 4, 2, 32, 128, "zigzag"
TOLERANCE = 1e-10  # fp64 (docs/testing.md)
_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
             tie_word_embeddings=False)
ARCHITECTURES = {
    "llama": dict(model_type="llama"),
    "qwen2-bias": dict(model_type="qwen2"),
    "qwen3-qk-norm": dict(model_type="qwen3", head_dim=16),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
}
TOPOLOGIES = {"tp2-ulysses2": {"tp": 2, "ulysses": 2}, "tp2-ring2": {"tp": 2, "ring": 2},
              "tp2-dp2": {"tp": 2, "dp": 2}}
CASES = [(arch, topology) for arch in ("llama", "qwen2-bias", "qwen3-qk-norm")
         for topology in TOPOLOGIES] + [("llama-tied", "tp2-ulysses2")]


def _config(arch: str, **changes):
    values = {**_TINY, **ARCHITECTURES[arch], **changes}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _reference(arch: str, folder: str) -> dict:
    """The fp64 model in one process, saved to ``folder``; its logits, loss and gradients."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch), attn_implementation="sdpa",
                                             dtype=torch.float64)
    with torch.no_grad():  # biases 0 and norms 1 would hide a wrong split of either
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    _save(model, folder)
    tokens = _tokens()
    logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = {"model." + name: p.grad for name, p in model.named_parameters()}
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads}


def _save(model, folder: str) -> None:
    """config.json and model.safetensors, as ``save_pretrained`` writes them on one process (a
    tied output projection is the embedding, stored once)."""
    Path(folder).mkdir()
    model.config.to_json_file(f"{folder}/config.json")
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.contiguous()
    save_file(tensors, f"{folder}/model.safetensors")


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def _parallel_step(arch: str, topology: Topology, folders: dict, references: dict) -> None:
    """Built on meta, parallelised, its shards read from the folder: one step vs the reference."""
    folder = folders[arch]
    model = parallelize(build_hf_causal_lm(folder, dtype=torch.float64, device="meta"),
                        topology, layout=LAYOUT)
    materialize(model, torch.device("cpu"), seed=0, pretrained=folder)
    batch = shard_batch(_tokens(), topology, LAYOUT)
    local = model(batch["input_ids"], batch["position_ids"])
    loss = global_mean_cross_entropy(local, batch["labels"], topology)
    loss.backward()
    logits = unshard_sequence(local.detach(), topology, LAYOUT)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    reference = references[arch]
    rows = BATCH // topology.size("dp")
    start = topology.rank("dp") * rows
    errors = {"logits": (logits - reference["logits"][start:start + rows]).abs().max().item(),
              "loss": (loss.detach() - reference["loss"]).abs().item()}
    if set(grads) != set(reference["grads"]):
        raise AssertionError(f"parameters differ: {sorted(set(grads) ^ set(reference['grads']))}")
    errors.update({f"grad {name}": (grad - reference["grads"][name]).abs().max().item()
                   for name, grad in grads.items()})
    wrong = {name: error for name, error in errors.items() if not error <= TOLERANCE}
    if wrong:
        raise AssertionError(f"{len(wrong)} of {len(errors)} beyond {TOLERANCE}: "
                             + ", ".join(f"{n} {e:.3g}" for n, e in list(wrong.items())[:6]))


def _wrapped(config) -> HFCausalLM:
    """A skeleton on meta, as ``usp train`` parallelises it."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="usp")
    return HFCausalLM(model, USPContext(trivial_topology()))


def _plan_without(arch: str, *names: str) -> dict:
    plan = dict(_config(arch).base_model_tp_plan)
    return {key: style for key, style in plan.items() if key.rsplit(".", 1)[-1] not in names}


REFUSALS = [
    # (what, config, topology, message)
    ("kv heads", _config("llama", num_key_value_heads=1), "tp2-ulysses2",
     "num_key_value_heads=1 is not divisible by tp=2"),
    ("heads", _config("llama", num_attention_heads=1, num_key_value_heads=1), "tp2-ring2",
     "num_attention_heads=1 is not divisible by tp=2"),
    ("vocabulary", _config("llama", vocab_size=VOCAB - 1), "tp2-dp2",
     f"vocab_size={VOCAB - 1} is not divisible by tp=2"),
    ("no plan", _config("llama", base_model_tp_plan=None), "tp2-ulysses2",
     "has no base_model_tp_plan"),
    ("plan string", _config("llama", base_model_tp_plan={
        **_config("llama").base_model_tp_plan, "layers.*.self_attn.q_proj": "sequence_parallel"}),
     "tp2-ulysses2", "the style 'sequence_parallel', which usp does not run"),
    ("unnamed q/k norms", _config("qwen3-qk-norm",
                                  base_model_tp_plan=_plan_without("qwen3-qk-norm", "q_norm",
                                                                   "k_norm")),
     "tp2-ulysses2", "layers.0.self_attn.q_norm (Qwen3RMSNorm) holds parameters beside"),
    ("q/k norms on whole heads", _config("qwen3-qk-norm", base_model_tp_plan={
        **_config("qwen3-qk-norm").base_model_tp_plan,
        **{f"layers.*.self_attn.{name}_proj": "colwise_gather_output" for name in "qkv"},
        "layers.*.self_attn.o_proj": "rowwise_split_input"}),
     "tp2-ring2", "no projection beside it is 'colwise'"),
    ("pipeline stages", _config("llama"), "pp2-tp2", "tp=2 with pp=2"),
]


def _refusal(case, topologies: dict) -> None:
    _, config, topology, message = case
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parallelize(_wrapped(config), topologies[topology])
    dist.barrier()  # every rank got here: nobody waits in a collective


def _world(rank: int, world_size: int) -> list[str]:
    topologies = {name: Topology.build(**degrees) for name, degrees in TOPOLOGIES.items()}
    topologies["pp2-tp2"] = Topology.build(pp=2, tp=2)
    with tempfile.TemporaryDirectory() as root:
        folders = {arch: f"{root}/{arch}" for arch in ARCHITECTURES}
        references = {arch: _reference(arch, folders[arch]) for arch in ARCHITECTURES}
        failures = collect_failures(CASES, lambda case: _parallel_step(
            case[0], topologies[case[1]], folders, references))
    failures += collect_failures(REFUSALS, lambda case: _refusal(case, topologies))
    return failures


def test_hf_tensor_parallel_matches_one_process_and_refuses_what_it_cannot_split():
    failures = run_on_ranks(_world, WORLD, timeout_s=240)
    lines = [f"rank {rank}: {line}" for rank, lines in enumerate(failures) for line in lines]
    assert not lines, "\n".join(lines)


def _shape(**degrees) -> Topology:
    return Topology(sizes={axis: degrees.get(axis, 1) for axis in AXES},
                    ranks={axis: 0 for axis in AXES})


def test_hf_config_checks_tensor_parallelism_before_launch():
    """``usp train``'s check of an ``--hf-config`` (no process group) accepts tp where the plan
    splits the model and refuses, naming the numbers, where it does not."""
    validate_hf_config("tiny-qwen3", _shape(tp=2, ulysses=2))
    validate_hf_config("tiny-gemma", _shape(tp=4))
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by tp=3"):
        validate_hf_config("tiny-llama", _shape(tp=3))
    with pytest.raises(ValueError, match="tp=2 with pp=2"):
        validate_hf_config("tiny-qwen2", _shape(tp=2, pp=2))
