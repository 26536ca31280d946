"""Mixture-of-experts models under attn_implementation="usp": the router load-balancing loss
(``outputs.aux_loss``) of a split sequence equals the one-process value, forward and backward.

One spawned 4-rank world runs Qwen3-MoE, Mixtral and GPT-OSS at ring 2 x ulysses 2 (zigzag) and
ulysses 4 (stripe), and the hybrids Granite 4 (a Mamba-2 layer, then attention), Qwen3.5-MoE and
Qwen3-Next (a gated-delta layer, then attention) and Jamba (Mamba-1, then attention), experts in
every layer, at ring 2 x ulysses 2
(contiguous), with a right-padded row, and compares the router loss, the model's training
loss (cross-entropy + router_aux_loss_coef x router loss, as transformers adds them) and every
parameter's gradient with transformers' eager model run on the whole batch in one process. fp32
rule of docs/testing.md: the error against the fp64 eager model is at most twice the fp32 eager
model's own plus 1e-6 of the largest reference value (of the model's gradients, for a gradient).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GptOssConfig, MixtralConfig
from transformers import GraniteMoeHybridConfig, Qwen3_5MoeTextConfig, Qwen3MoeConfig

from tests.distributed import collect_failures, run_on_ranks
from tests.fp32_rule import check_close
from usp import Topology
from usp.batch import IGNORE_INDEX, shard_batch
from usp.integrations.hf_family.model import build_hf_causal_lm, trivial_topology
from usp.integrations.transformers import USPContext, check_config
from usp.losses import LossHead
from usp.parallel import parallelize
from usp.training.accumulate import split_micro_batches, train_micro_batches

WORLD = 4
VOCAB, BATCH, SEQ = 96, 2, 24
LENGTHS = torch.tensor([SEQ - 5, SEQ])  # the first row right-padded
# a large coefficient: a router loss off by its fp32 rounding would pass, off by a rank's
# share would not
COEF = 0.5
_TINY = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, initializer_range=0.2,
             tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=COEF,
             experts_implementation="eager")
MODELS = {
    "qwen3-moe": lambda: Qwen3MoeConfig(
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64, **_TINY),
    "mixtral": lambda: MixtralConfig(
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        intermediate_size=32, **_TINY),
    "gpt-oss": lambda: GptOssConfig(
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], num_local_experts=4,
        num_experts_per_tok=2, intermediate_size=32, **_TINY),
    # a hybrid: a Mamba-2 layer (split: the contiguous layout), then attention; experts and a
    # shared MLP in each
    "granite-4": lambda: GraniteMoeHybridConfig(
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        intermediate_size=32, shared_intermediate_size=32,
        layer_types=["linear_attention", "attention"], mamba_n_heads=4, mamba_d_head=24,
        mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8, position_embedding_type="rope",
        **_TINY),
    # a hybrid: a gated-delta layer, then gated attention; routed and shared experts in both
    "qwen3.5-moe": lambda: Qwen3_5MoeTextConfig(
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=12, **_TINY),
    "qwen3-next": lambda: AutoConfig.for_model(
        "qwen3_next", num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=12, **_TINY),
    # Mamba-1, then attention; experts in both
    "jamba": lambda: AutoConfig.for_model(
        "jamba", num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, intermediate_size=32, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=1, expert_layer_offset=0, mamba_d_state=8, mamba_dt_rank=4,
        use_mamba_kernels=False, **_TINY),
}
HYBRIDS = ("granite-4", "qwen3.5-moe", "qwen3-next", "jamba")  # their scans need the contiguous layout
TOPOLOGIES = [(2, 2, "zigzag"), (1, 4, "stripe")]
CASES = [(name, *topology) for name in MODELS if name not in HYBRIDS for topology in TOPOLOGIES]
CASES += [(name, 2, 2, "contiguous") for name in HYBRIDS]


def _inputs():
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    padding = (torch.arange(SEQ)[None, :] < LENGTHS[:, None]).long()
    labels = USPContext(trivial_topology()).shard(ids, attention_mask=padding)["labels"]
    return ids, padding, labels


def _eager(model, ids, padding, labels):
    """Router loss, training loss and gradients of the whole batch in one process."""
    outputs = model(input_ids=ids, attention_mask=padding, use_cache=False)
    ce = F.cross_entropy(outputs.logits.reshape(-1, VOCAB), labels.reshape(-1),
                         ignore_index=IGNORE_INDEX)
    loss = ce + COEF * outputs.aux_loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return outputs.aux_loss.detach(), loss.detach(), grads


def _compare(name, ring, ulysses, layout, contexts):
    context = contexts[(ring, ulysses, layout)]
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(MODELS[name](), attn_implementation="eager")
    reference = copy.deepcopy(eager).double()
    model = context.prepare(copy.deepcopy(eager))
    ids, padding, labels = _inputs()
    aux32, loss32, grads32 = _eager(eager, ids, padding, labels)
    aux64, loss64, grads64 = _eager(reference, ids, padding, labels)

    inputs = context.shard(ids, attention_mask=padding)
    shard_labels = inputs.pop("labels")
    outputs = model(**inputs, usp_context=context, use_cache=False)
    loss = context.loss(outputs.logits, shard_labels) + model.router_aux_loss_coef * outputs.aux_loss
    loss.backward()
    results = [("router loss", outputs.aux_loss.detach(), aux32, aux64),
               ("loss", loss.detach(), loss32, loss64)]
    for param_name, param in model.named_parameters():
        grad = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
        dist.all_reduce(grad)  # each rank's gradient is its share of the whole batch's
        if param_name in grads64:
            results.append((f"grad {param_name}", grad, grads32[param_name], grads64[param_name]))
    check_close(results)


def _expect_refusal(run, needle):
    with pytest.raises(ValueError, match=needle):
        run()
    dist.barrier()  # every rank raised: none is left waiting in a collective


def _refusals(context):
    torch.manual_seed(0)
    config = MODELS["mixtral"]()
    ids, padding, _ = _inputs()
    inputs = context.shard(ids, attention_mask=padding)
    labels = inputs.pop("labels")
    model = context.prepare(AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
    # transformers would shift the labels inside each rank's shard
    _expect_refusal(lambda: model(**inputs, labels=labels, usp_context=context, use_cache=False),
                    "labels passed to the model while ring x ulysses = 4")
    # never prepared: nothing would reduce its router loss
    unprepared = AutoModelForCausalLM.from_config(config, attn_implementation="usp")
    _expect_refusal(lambda: unprepared(**inputs, usp_context=context, use_cache=False),
                    "prepare the model with USPContext.prepare")


def _training_step(config_dir, topology):
    """``usp train``'s path: the family's model, parallelised (FSDP2 over the 4 ranks), two
    micro-batches; the step's loss is the cross-entropy of the whole batch plus the coefficient
    times the mean of the micro-batches' router losses, as one process computes it."""
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(2))
    eager = build_hf_causal_lm(str(config_dir), seed=3)
    eager.model.set_attn_implementation("eager")
    eager.model.set_experts_implementation("eager")  # the grouped kernel has no fp64
    references = []
    for reference in (eager, copy.deepcopy(eager).double()):
        positions = torch.arange(SEQ).expand(2, -1)
        ce = F.cross_entropy(reference(tokens[:, :-1], torch.arange(SEQ).expand(4, -1))
                             .flatten(0, 1), tokens[:, 1:].flatten())
        aux = sum(reference.model(input_ids=rows[:, :-1], position_ids=positions,
                                  use_cache=False).aux_loss for rows in tokens.split(2)) / 2
        loss = ce + COEF * aux
        loss.backward()
        references.append((loss.detach(), {n: p.grad for n, p in reference.named_parameters()}))

    model = parallelize(build_hf_causal_lm(str(config_dir), seed=3), topology, layout="zigzag")
    batch = shard_batch(tokens, topology, "zigzag")
    loss, _ = train_micro_batches(model, split_micro_batches(batch, 2), topology, LossHead())
    results = [("loss", loss, references[0][0], references[1][0])]
    results += [(f"grad {name}", param.grad.full_tensor(), references[0][1][name],
                 references[1][1][name]) for name, param in model.named_parameters()]
    check_close(results)


def _world(rank, world_size, config_dir):
    contexts = {(ring, ulysses, layout): USPContext(Topology.build(ring=ring, ulysses=ulysses),
                                                    layout)
                for _, ring, ulysses, layout in CASES}
    failures = collect_failures(CASES, lambda case: _compare(*case, contexts))
    failures += collect_failures(["refusals"], lambda _: _refusals(contexts[(2, 2, "zigzag")]))
    failures += collect_failures(["usp train step"], lambda _: _training_step(
        config_dir, contexts[(2, 2, "zigzag")].topology))
    return failures


def test_router_loss_and_gradients_equal_one_process_on_four_ranks(tmp_path):
    MODELS["mixtral"]().save_pretrained(tmp_path)
    failures = run_on_ranks(_world, WORLD, tmp_path, timeout_s=300)
    lines = [f"rank {rank}: {line}" for rank, lines in enumerate(failures) for line in lines]
    assert not lines, "\n".join(lines)


def test_a_router_loss_usp_does_not_know_is_refused_while_ranks_hold_different_tokens():
    known = MODELS["mixtral"]()
    other = AutoConfig.for_model("jetmoe", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                 num_key_value_heads=2, num_local_experts=4,
                                 output_router_logits=True)
    split = {"pp": 1, "dp": 1, "ring": 2, "ulysses": 2, "tp": 1}
    topology = Topology(split, dict.fromkeys(split, 0))
    check_config(known, topology)  # reduced over the ranks
    with pytest.raises(ValueError, match="'jetmoe' makes its loss otherwise"):
        check_config(other, topology)
    check_config(other, trivial_topology())  # one rank: its own loss is the batch's
