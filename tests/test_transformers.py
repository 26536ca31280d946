"""attn_implementation="usp" on Hugging Face models vs the single-process eager model.

One spawned 4-rank world runs every architecture x topology case, the refusals and the FSDP2
training step. Each case compares logits (gathered), loss and every parameter's gradient (summed
over ranks) with the eager model run on the whole seeded batch in one process. fp32 rule
(docs/testing.md): the error against an fp64 eager reference is at most twice the fp32 eager model's
own error plus a tiny atol.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    GptOssConfig,
    Qwen3Config,
)
from transformers.masking_utils import (
    causal_mask_function,
    chunked_causal_mask_function,
    create_causal_mask,
    create_sliding_window_causal_mask,
    packed_sequence_compatibility_function,
    sliding_window_causal_mask_function,
)

from tests.distributed import collect_failures, run_on_ranks
from tests.fp32_rule import check_close, eager_reference, step_references
import usp
from usp import Topology, unshard_sequence
from usp.batch import IGNORE_INDEX, shard_batch
from usp.integrations.hf_masks import mask_components
from usp.parallel import parallelize
from usp.integrations.hf_family.model import build_hf_causal_lm, trivial_topology
from usp.integrations.transformers import USPContext
from usp.loss import global_mean_cross_entropy

WORLD = 4
VOCAB, BATCH, SEQ = 128, 2, 32
# 2 layers, hidden 64, vocab 128; init 0.2 makes the attention far from uniform, so a wrong mask
# or a wrong RoPE position changes the result well beyond the tolerance
_TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    initializer_range=0.2, tie_word_embeddings=False,
)
ARCHITECTURES = {
    "llama-mha": lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **_TINY),
    "llama-gqa": lambda: LlamaConfig(num_attention_heads=8, num_key_value_heads=2, **_TINY),
    "qwen2-gqa": lambda: Qwen2Config(num_attention_heads=8, num_key_value_heads=2, **_TINY),
    "qwen3-gqa-qknorm": lambda: Qwen3Config(
        num_attention_heads=8, num_key_value_heads=1, head_dim=16, **_TINY
    ),
    "llama-bidirectional": lambda: LlamaConfig(
        num_attention_heads=8, num_key_value_heads=2, is_causal=False, **_TINY
    ),
    "gemma-gqa": lambda: GemmaConfig(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        **{**_TINY, "tie_word_embeddings": True},
    ),
}
# (ring, ulysses, layout); ulysses 4 runs with the configs' 1 or 2 kv heads (replicated)
TOPOLOGIES = [(2, 2, "zigzag"), (1, 4, "zigzag")]
CASES = [(arch, *degrees) for arch in ARCHITECTURES for degrees in TOPOLOGIES]
CASES += [("llama-gqa", 4, 1, "stripe")]

# masks: (name, config, how the batch is masked); each against eager with the same mask
MASKED = {
    "mistral-sliding": (lambda: MistralConfig(num_attention_heads=8, num_key_value_heads=2,
                                              sliding_window=6, **_TINY), "plain"),
    "gemma2-alternating": (lambda: Gemma2Config(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
        attn_logit_softcapping=None, final_logit_softcapping=None,
        layer_types=["sliding_attention", "full_attention"], **_TINY), "plain"),
    "qwen2-padding-mask": (lambda: Qwen2Config(num_attention_heads=8, num_key_value_heads=2,
                                               **_TINY), "padding-mask"),
    "qwen2-padding-shard": (lambda: Qwen2Config(num_attention_heads=8, num_key_value_heads=2,
                                                **_TINY), "padding-shard"),
    "llama-packed": (lambda: LlamaConfig(num_attention_heads=8, num_key_value_heads=2, **_TINY),
                     "packed"),
    # attention sinks (s_aux) in every layer, sliding and full layers, mixture-of-experts MLPs
    # (their eager implementation: the grouped one has no fp64 for the reference)
    "gpt-oss-sinks-moe": (lambda: GptOssConfig(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], num_local_experts=4,
        num_experts_per_tok=2, experts_implementation="eager",
        **{**_TINY, "intermediate_size": 64}), "plain"),
    "llama-packed-cu-seqlens": (lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=4,
                                                    **_TINY), "cu-seqlens"),
}
MASK_CASES = [(name, *degrees) for name in MASKED for degrees in
              ((2, 2, "zigzag"), (1, 4, "stripe"))]
LENGTHS = torch.tensor([SEQ - 5, SEQ])  # right padding of the first row
DOCUMENT_STARTS = [0, 3, 4, 17, SEQ]  # packed documents of 3, 1, 13 and 15 tokens


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _eager_run(model, ids):
    """Logits, mean next-token loss and gradients of the whole batch in one process."""
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _compare(arch, ring, ulysses, layout, contexts):
    context = contexts[(ring, ulysses, layout)]
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(ARCHITECTURES[arch](), attn_implementation="eager")
    reference = copy.deepcopy(eager).double()
    model = context.prepare(copy.deepcopy(eager))
    ids = _batch()
    logits32, loss32, grads32 = _eager_run(eager, ids)
    logits64, loss64, grads64 = _eager_run(reference, ids)

    inputs = context.shard(ids)
    local = model(
        input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False,
        usp_context=context,
    ).logits
    loss = context.loss(local, inputs["labels"])
    loss.backward()
    logits = unshard_sequence(local.detach(), context.topology, layout)
    results = [("logits", logits, logits32, logits64), ("loss", loss.detach(), loss32, loss64)]
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)  # each rank's gradient is its share of the global mean's
        results.append((f"grad {name}", grad, grads32[name], grads64[name]))
    check_close(results)


def _masked_inputs(how: str):
    """The global batch and its mask as eager takes it, and the global labels usp trains on."""
    ids = _batch()
    eager_kwargs, shard_kwargs = {}, {}
    if how in ("padding-mask", "padding-shard"):
        padding = (torch.arange(SEQ)[None, :] < LENGTHS[:, None]).long()
        eager_kwargs = shard_kwargs = {"attention_mask": padding}
    if how in ("packed", "cu-seqlens"):
        positions = torch.cat([torch.arange(b - a) for a, b in
                               zip(DOCUMENT_STARTS, DOCUMENT_STARTS[1:])]).expand(BATCH, -1)
        eager_kwargs = shard_kwargs = {"position_ids": positions}
    global_context = USPContext(trivial_topology())
    labels = global_context.shard(ids, **shard_kwargs)["labels"]  # shifted, never across
    return ids, eager_kwargs, shard_kwargs, labels


def _compare_masked(name, ring, ulysses, layout, contexts):
    context = contexts[(ring, ulysses, layout)]
    make_config, how = MASKED[name]
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(make_config(), attn_implementation="eager")
    reference = copy.deepcopy(eager).double()
    model = context.prepare(copy.deepcopy(eager))
    ids, eager_kwargs, shard_kwargs, labels = _masked_inputs(how)
    logits32, loss32, grads32 = eager_reference(eager, ids, eager_kwargs, labels)
    logits64, loss64, grads64 = eager_reference(reference, ids, eager_kwargs, labels)

    forward = {"use_cache": False, "usp_context": context}
    inputs = context.shard(ids, **shard_kwargs)
    if how == "padding-mask":  # the plain transformers way: each rank its shard of the mask
        inputs.pop("usp_documents")
        forward["attention_mask"] = usp.shard_sequence(eager_kwargs["attention_mask"],
                                                       context.topology, layout)
    if how == "cu-seqlens":  # transformers' packing collator's kwargs instead of usp_documents
        inputs.pop("usp_documents")
        forward["cu_seq_lens_q"] = torch.tensor(DOCUMENT_STARTS)
    local = model(**{k: v for k, v in inputs.items() if k != "labels"}, **forward).logits
    loss = context.loss(local, inputs["labels"])
    loss.backward()
    logits = unshard_sequence(local.detach(), context.topology, layout)
    real = labels != IGNORE_INDEX  # padding rows attend to nothing in usp, to keys in eager
    results = [("logits", logits[real], logits32[real], logits64[real]),
               ("loss", loss.detach(), loss32, loss64)]
    for param_name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        results.append((f"grad {param_name}", grad, grads32[param_name], grads64[param_name]))
    check_close(results)


def _expect_refusal(context, run, *needles):
    """``run()`` raises ValueError on every rank, each with the refusing rank's message."""
    with pytest.raises(ValueError) as info:
        run()
    message = str(info.value)
    if not any(n in message for n in needles):
        raise AssertionError(f"unexpected refusal message: {message}")
    dist.barrier()  # every rank got here: nobody is left waiting in a collective


def _refusals(rank, context):
    torch.manual_seed(0)
    config = LlamaConfig(num_attention_heads=8, num_key_value_heads=2, **_TINY)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="usp")
    inputs = context.shard(_batch())
    forward = dict(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                   use_cache=False, usp_context=context)
    reference = model(**forward).logits
    ones = torch.ones_like(inputs["input_ids"])
    torch.testing.assert_close(model(**forward, attention_mask=ones).logits, reference)

    # no position_ids: transformers counts 0..S_local-1 on every rank, right for rank 0 only
    _expect_refusal(context, lambda: model(**{**forward, "position_ids": None}),
                    "position_ids must be")
    # positions that restart (packed documents) without the documents: RoPE and the mask would
    # disagree; on one rank only, every rank must raise, not hang
    restarting = inputs["position_ids"] % 8 if rank == WORLD - 1 else inputs["position_ids"]
    _expect_refusal(context, lambda: model(**{**forward, "position_ids": restarting}),
                    "position_ids must be")
    square = torch.ones(1, 1, ones.shape[1], ones.shape[1], dtype=torch.bool).tril()
    _expect_refusal(context, lambda: model(**forward, attention_mask=square), "custom 4-D mask")


def _fsdp_step(rank, topology):
    """FSDP2 over dp 2 x ulysses 2: one step's gradients equal the single-process eager ones."""
    tokens = torch.randint(0, 512, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    eager = build_hf_causal_lm("tiny-qwen3", seed=3)
    eager.model.set_attn_implementation("eager")
    references = step_references(eager, tokens)

    model = parallelize(build_hf_causal_lm("tiny-qwen3", seed=3), topology, layout="zigzag")
    batch = shard_batch(tokens, topology, "zigzag")
    loss = global_mean_cross_entropy(model(batch["input_ids"], batch["position_ids"]),
                                     batch["labels"], topology)
    loss.backward()
    grads = {name: param.grad.full_tensor() for name, param in model.named_parameters()}
    check_close([(n, g, references[0][n], references[1][n]) for n, g in grads.items()])


def _world(rank, world_size):
    contexts = {
        (ring, ulysses, layout): USPContext(Topology.build(ring=ring, ulysses=ulysses), layout)
        for _, ring, ulysses, layout in CASES
    }
    contexts.update({(ring, ulysses, layout): USPContext(Topology.build(ring=ring, ulysses=ulysses),
                                                         layout)
                     for _, ring, ulysses, layout in MASK_CASES
                     if (ring, ulysses, layout) not in contexts})
    failures = collect_failures(CASES, lambda case: _compare(*case, contexts))
    failures += collect_failures(MASK_CASES, lambda case: _compare_masked(*case, contexts))
    ulysses4 = contexts[(1, 4, "zigzag")]
    failures += collect_failures(["refusals"], lambda _: _refusals(rank, ulysses4))
    dp2 = Topology.build(ring=1, ulysses=2, dp=2)
    failures += collect_failures(["fsdp dp2 x ulysses2"], lambda _: _fsdp_step(rank, dp2))
    return failures


def test_transformers_usp_matches_eager_on_four_ranks():
    failures = run_on_ranks(_world, WORLD, timeout_s=240)
    lines = [f"rank {rank}: {line}" for rank, lines in enumerate(failures) for line in lines]
    assert not lines, "\n".join(lines)


# ------------------------------------------------------------------------------ single process
def _single_process_pair(config):
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    context = USPContext(trivial_topology())
    return eager, context.prepare(copy.deepcopy(eager)), context


def test_single_process_matches_eager_and_refuses_what_it_cannot_run():
    eager, model, context = _single_process_pair(
        LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **_TINY)
    )
    ids = _batch()
    inputs = context.shard(ids)
    forward = dict(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                   usp_context=context, use_cache=False)
    expected = eager(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(model(**forward).logits, expected)
    ones = torch.ones_like(ids)
    torch.testing.assert_close(model(**forward, attention_mask=ones).logits, expected)
    # labels shifted before sharding: the loss is the model's own next-token loss
    loss = context.loss(model(**forward).logits, inputs["labels"])
    torch.testing.assert_close(loss, eager(input_ids=ids, labels=ids, use_cache=False).loss)

    with pytest.raises(ValueError, match="needs the forward kwarg usp_context"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="attends 1 queries to 33 keys"):
        cache = model(**{**forward, "use_cache": True}).past_key_values
        model(input_ids=ids[:, :1], position_ids=torch.full((BATCH, 1), SEQ),
              past_key_values=cache, usp_context=context)
    _, dropping, _ = _single_process_pair(
        LlamaConfig(num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1, **_TINY)
    )
    dropping.eval()(**forward)  # no dropout outside training
    with pytest.raises(ValueError, match="attention dropout 0.1"):
        dropping.train()(**forward)


def test_mask_requests_read_transformers_masks_and_refuse_the_rest():
    """The requests transformers' own mask builders make for "usp" (whatever their internals)."""
    config = LlamaConfig(**_TINY)
    config._attn_implementation = "usp"
    embeds = torch.zeros(1, 8, 4)
    zigzag = torch.tensor([[0, 1, 2, 3, 12, 13, 14, 15]])  # looks like 2 packed documents
    mask = lambda attention_mask=None, **options: create_causal_mask(  # noqa: E731
        config=config, inputs_embeds=embeds, attention_mask=attention_mask,
        past_key_values=None, **options,
    )
    for request in (mask(), mask(position_ids=zigzag), mask(attention_mask=torch.ones(1, 8))):
        assert request.causal and request.refusal is None and request.window is None
        assert request.padding is None
    padded = mask(attention_mask=torch.tensor([[0] + [1] * 7]))
    assert padded.refusal is None and padded.padded and padded.padding.tolist() == [
        [False] + [True] * 7]
    everything = lambda b, h, q, kv: q >= 0  # noqa: E731
    assert "custom attention mask" in mask(position_ids=zigzag, or_mask_function=everything).refusal
    assert "custom attention mask" in mask(and_mask_function=everything).refusal
    config.sliding_window = 4
    window = create_sliding_window_causal_mask(
        config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
        position_ids=zigzag,
    )
    assert window.refusal is None and window.causal and window.window == (3, -1)
    config.is_causal = False
    request = mask()
    assert not request.causal and request.refusal is None
    # the recogniser itself
    positions = torch.arange(8)[None]
    assert mask_components(packed_sequence_compatibility_function(
        sliding_window_causal_mask_function(4), positions, positions)) == {
            "causal": True, "window": (3, -1)}
    assert mask_components(causal_mask_function) == {"causal": True, "window": None}
    assert mask_components(chunked_causal_mask_function(4, torch.zeros(1))) is None
