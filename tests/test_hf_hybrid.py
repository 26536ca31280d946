"""Hybrid models split over the sequence (Bamba, Nemotron-H, Zamba2, Granite 4, Falcon-H1: Mamba-2
layers, Qwen3-Next: gated-delta layers, beside softmax attention): the scan layers run through
usp.scan, and the model equals transformers' eager model in one process.

One spawned 4-rank world prepares each tiny model (a scan layer, then an attention layer; both
in each layer for Falcon-H1) with ``USPContext.prepare`` at ring 2 x ulysses 2, ulysses 4 and
ring 4 (contiguous layout; a right-padded row in some cases) and compares logits at every token, the loss and every
parameter's gradient with the eager model on the whole batch (fp32 rule of docs/testing.md:
twice the fp32 eager model's error against its fp64 copy plus 1e-6 of the largest reference
value, of the largest gradient for gradients). It also trains one step of the model as
``usp train`` builds it (on the meta device, ``usp.parallelize``, FSDP2 over the 4 ranks, each
rank initialising its shards), and checks that a layout
which interleaves the ring's blocks is refused on every rank.
"""

from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from tests.distributed import collect_failures, run_on_ranks
from tests.fp32_rule import check_close, eager_reference, step_references
from usp import Topology, unshard_sequence
from usp.batch import IGNORE_INDEX, shard_batch
from usp.integrations.hf_family.model import build_hf_causal_lm, trivial_topology
from usp.integrations.transformers import USPContext
from usp.loss import global_mean_cross_entropy
from usp.models.init import materialize
from usp.parallel import parallelize

WORLD = 4
VOCAB, BATCH, SEQ = 96, 2, 24
LENGTHS = torch.tensor([SEQ - 5, SEQ])  # the first row right-padded
BAMBA = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, attn_layer_indices=[1],
             mamba_expand=2, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2,
             mamba_d_state=8, mamba_chunk_size=8, initializer_range=0.2,
             tie_word_embeddings=False)
# Qwen3-Next: a gated-delta layer, then an attention layer (mixture-of-experts MLPs; eager
# experts: the grouped kernel has no fp64)
QWEN3_NEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, head_dim=8,
                  layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  shared_expert_intermediate_size=16, initializer_range=0.2,
                  tie_word_embeddings=False, experts_implementation="eager")
# Nemotron-H: a Mamba-2 layer ("M": two groups, its norm gated per group), then attention ("*")
NEMOTRON_H = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, hybrid_override_pattern="M*",
                  mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=8,
                  chunk_size=8, initializer_range=0.2, tie_word_embeddings=False)
# Zamba2: a Mamba-2 layer, then a hybrid layer (a shared attention block over the hidden states
# and the input embeddings, then a Mamba-2 layer)
ZAMBA2 = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, intermediate_size=64, layers_block_type=["mamba", "hybrid"],
              mamba_headdim=16, mamba_ngroups=2, mamba_d_state=8, n_mamba_heads=4,
              chunk_size=8, initializer_range=0.2, tie_word_embeddings=False)
# Granite 4 (GraniteMoeHybrid, dense): a Mamba-2 layer, then attention, Granite's multipliers
GRANITE_4 = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, shared_intermediate_size=64, num_local_experts=0,
                 layer_types=["linear_attention", "attention"], position_embedding_type="rope",
                 mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                 mamba_chunk_size=8, embedding_multiplier=1.5, residual_multiplier=0.7,
                 attention_multiplier=0.3, logits_scaling=2.0, initializer_range=0.2,
                 tie_word_embeddings=False)
# Falcon-H1: a Mamba-2 mixer beside attention in each layer, every multiplier away from 1; its
# gated norm grouped and applied after the gate (the "silu" variant: no norm, the scan's output
# times silu(gate))
FALCON_H1 = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, intermediate_size=64, mamba_d_ssm=64,
                 mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                 mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=False,
                 ssm_in_multiplier=0.8, ssm_multipliers=[1.1, 0.9, 1.2, 0.7, 1.3],
                 ssm_out_multiplier=0.9, attention_in_multiplier=1.2,
                 attention_out_multiplier=0.8, key_multiplier=0.6, embedding_multiplier=1.3,
                 lm_head_multiplier=0.9, mlp_multipliers=[1.1, 0.8], initializer_range=0.2,
                 tie_word_embeddings=False)
# Qwen3.5 (text, dense): a gated-delta layer (q, k and v in one projection; the gate, beta and
# a apart), then gated attention with a partial rotary embedding
QWEN3_5 = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=64, head_dim=8,
               layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
               linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
               initializer_range=0.2, tie_word_embeddings=False)
# OLMo Hybrid: a gated-delta layer (one projection per input, beta in (0, 2)), then attention
OLMO_HYBRID = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64,
                   layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                   linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                   linear_allow_neg_eigval=True, pad_token_id=0, initializer_range=0.2,
                   tie_word_embeddings=False)
# LFM2: a short convolution (C * conv(B * x)), then attention
LFM2 = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, layer_types=["conv", "full_attention"],
            conv_L_cache=3, conv_bias=True, initializer_range=0.2, tie_word_embeddings=False)
MODELS = {"bamba": BAMBA, "qwen3_next": QWEN3_NEXT, "nemotron_h": NEMOTRON_H, "zamba2": ZAMBA2,
          "granitemoehybrid": GRANITE_4, "falcon_h1": FALCON_H1, "qwen3_5_text": QWEN3_5,
          "olmo_hybrid": OLMO_HYBRID, "lfm2": LFM2,
          # LFM3: the same convolution, then sliding-window attention
          "lfm3": dict(LFM2, layer_types=["conv", "sliding_attention"], sliding_window=6,
                       pad_token_id=0)}
# Jamba: a Mamba-1 layer, then attention; experts in the second layer
JAMBA = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, attn_layer_period=2,
             attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
             mamba_d_state=8, mamba_dt_rank=4, use_mamba_kernels=False,
             experts_implementation="eager", initializer_range=0.2, tie_word_embeddings=False)
MODELS["jamba"] = JAMBA
# the models whose usp train build is checked too (Granite 4's mixer and its initialisation are
# Bamba's, Qwen3.5's Qwen3-Next's; LFM2's convolution has no parameter drawn by a rule of its own)
TRAINED = [name for name in MODELS
           if name not in ("granitemoehybrid", "qwen3_5_text", "lfm2", "lfm3")]
VARIANTS = {"falcon_h1:silu": ("falcon_h1", {"mamba_rms_norm": False}),
            # Jamba's mixers reading the usp kwargs of the model's call alone (their layers'
            # hooks removed: a mixer nested where no layer hands them on)
            "jamba:model call": ("jamba", {})}
# model, ring, ulysses, a right-padded row, the layout the ring attention runs on (its blocks
# re-laid from the scans' contiguous ones and back; None: contiguous)
CASES = [("bamba", 2, 2, False, None), ("bamba", 2, 2, True, "zigzag"),
         ("bamba", 1, 4, False, None), ("bamba", 4, 1, False, None),
         ("qwen3_next", 2, 2, False, None), ("qwen3_next", 2, 2, True, "stripe"),
         ("qwen3_next", 1, 4, False, None), ("nemotron_h", 2, 2, True, None),
         ("nemotron_h", 4, 1, False, "zigzag"), ("zamba2", 2, 2, True, None),
         ("granitemoehybrid", 2, 2, True, "zigzag"), ("falcon_h1", 2, 2, True, None),
         ("falcon_h1:silu", 4, 1, False, "zigzag"), ("qwen3_5_text", 2, 2, True, None),
         ("olmo_hybrid", 2, 2, True, "zigzag"), ("lfm2", 2, 2, True, "zigzag"),
         ("lfm3", 2, 2, True, "zigzag"), ("jamba", 2, 2, True, "zigzag"),
         ("jamba:model call", 1, 4, True, None)]


def _config(name: str = "bamba"):
    model_type, changes = VARIANTS.get(name, (name, {}))
    return AutoConfig.for_model(model_type, **{**MODELS[model_type], **changes})


def _inputs(padded: bool):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    padding = (torch.arange(SEQ)[None, :] < LENGTHS[:, None]).long() if padded else None
    kwargs = {} if padding is None else {"attention_mask": padding}
    labels = USPContext(trivial_topology()).shard(ids, **kwargs)["labels"]
    return ids, kwargs, labels


def _compare(name, ring, ulysses, padded, ring_layout):
    context = USPContext(Topology.build(ring=ring, ulysses=ulysses), "contiguous",
                         ring_layout=ring_layout)
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(_config(name), attn_implementation="eager")
    reference = copy.deepcopy(eager).double()
    model = context.prepare(copy.deepcopy(eager))
    if name == "jamba:model call":
        for layer in model.model.layers:
            layer._forward_pre_hooks.clear()
    ids, kwargs, labels = _inputs(padded)
    logits32, loss32, grads32 = eager_reference(eager, ids, kwargs, labels)
    logits64, loss64, grads64 = eager_reference(reference, ids, kwargs, labels)

    inputs = context.shard(ids, **kwargs)
    shard_labels = inputs.pop("labels")
    local = model(**inputs, usp_context=context, use_cache=False).logits
    loss = context.loss(local, shard_labels)
    loss.backward()
    logits = unshard_sequence(local.detach(), context.topology, "contiguous")
    real = labels != IGNORE_INDEX
    results = [("logits", logits[real], logits32[real], logits64[real]),
               ("loss", loss.detach(), loss32, loss64)]
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)  # each rank's gradient is its share of the whole batch's
        results.append((f"grad {name}", grad, grads32[name], grads64[name]))
    check_close(results)


def _training_step(config_dir):
    """usp train's path: the family's model, parallelised (FSDP2 over ring 2 x ulysses 2); its
    shards initialised on each rank equal one process's whole model (Qwen3-Next's A_log is
    drawn at random by transformers: from the seed and the module's name). Bamba's and
    Nemotron-H's attention runs its ring on zigzag blocks (``--ring-layout zigzag``)."""
    topology = Topology.build(ring=2, ulysses=2)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    eager = build_hf_causal_lm(str(config_dir), seed=3)
    eager.model.set_attn_implementation("eager")
    references = step_references(eager, tokens)
    # built as usp train builds it: on the meta device, parallelised, then each rank's shards
    # initialised (Mamba-2's A_log is log(1..H): transformers' own init, per shard)
    torch.manual_seed(1000 + dist.get_rank())  # ranks whose random state differs, as in a run
    model = parallelize(build_hf_causal_lm(str(config_dir), device="meta"), topology,
                        layout="contiguous",
                        ring_layout="zigzag" if config_dir.name in ("bamba", "nemotron_h")
                        else None)
    materialize(model, torch.device("cpu"), seed=3)
    batch = shard_batch(tokens, topology, "contiguous")
    loss = global_mean_cross_entropy(model(batch["input_ids"], batch["position_ids"]),
                                     batch["labels"], topology)
    loss.backward()
    check_close([(f"grad {name}", param.grad.full_tensor(), references[0][name],
                   references[1][name]) for name, param in model.named_parameters()])


def _interleaved_layout_is_refused():
    context = USPContext(Topology.build(ring=2, ulysses=2), "zigzag")
    model = context.prepare(AutoModelForCausalLM.from_config(_config()))
    inputs = context.shard(_inputs(False)[0])
    inputs.pop("labels")
    try:
        model(**inputs, usp_context=context, use_cache=False)
    except ValueError as exc:
        assert "needs layout='contiguous'" in str(exc), str(exc)
    else:
        raise AssertionError("a zigzag layout on ring 2 was not refused")
    dist.barrier()  # every rank raised: none waits in a collective


def _world(rank, world_size, config_dir):
    failures = collect_failures(CASES, lambda case: _compare(*case))
    failures += collect_failures(TRAINED, lambda name: _training_step(config_dir / name))
    failures += collect_failures(["zigzag refused"], lambda _: _interleaved_layout_is_refused())
    return failures


def test_hybrids_split_over_the_sequence_equal_one_process(tmp_path):
    for name, values in MODELS.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": name, **values}))
    failures = run_on_ranks(_world, WORLD, tmp_path, timeout_s=300)
    lines = [f"rank {rank}: {line}" for rank, lines in enumerate(failures) for line in lines]
    assert not lines, "\n".join(lines)


def test_usp_train_refuses_an_interleaving_layout_before_any_rank_starts(tmp_path, capsys,
                                                                          monkeypatch):
    import usp.training.launcher
    from usp.cli import main

    def no_ranks(*args, **kwargs):
        raise AssertionError("ranks were launched")

    monkeypatch.setattr(usp.training.launcher, "launch_elastic", no_ranks)
    config = tmp_path / "bamba.json"
    config.write_text(json.dumps({"model_type": "bamba", **BAMBA, "vocab_size": 300}))
    code = main(["train", "--hf-config", str(config), "--seq-len", "32", "--steps", "1",
                 "--synthetic", "--no-progress", "--nproc", "2", "--ring", "2",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "with ring=2 each ring rank's block must be contiguous: pass --layout contiguous" \
        in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
