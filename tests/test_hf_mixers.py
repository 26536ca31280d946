"""Models with layers usp does not split (Mamba, gated delta rule, convolutions over tokens ...)
are refused whenever the sequence is split, before any layer runs, on every rank; they run
unsplit (ring = ulysses = 1); attention-only models are accepted.

One spawned 4-rank world runs every refusal (USPContext.prepare, a forward with a context that
splits, a model never prepared, usp.parallelize, USPCache, generation from a model directory)
under ring 2 x ulysses 2 and ulysses 4; the detection itself and ``usp train`` run in process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from tests.distributed import run_on_ranks
from usp import Topology
from usp.cli import main as usp_main
from usp.integrations.hf_mixers import find_sequence_mixers
from usp.integrations.transformers import USPContext
from usp.parallel import parallelize
from usp.integrations.hf_family.config import PRESETS, load_hf_config
from usp.integrations.hf_family.model import build_hf_causal_lm, trivial_topology

WORLD = 4
# model types whose state-space mixers usp splits (usp.integrations.hf_scan)
SPLIT = {"bamba", "nemotron_h", "qwen3_next", "zamba2", "falcon_h1", "lfm2", "jamba"}
VOCAB = 300  # holds usp train's 257 byte-level ids
_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False)
_MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8)
# model type -> (config values, the module the refusal must name); tiny, built in the tests
CONFIGS = {
    "bamba": (dict(_SHAPE, attn_layer_indices=[1], mamba_expand=2, **_MAMBA),
              "model.layers.0.mamba (BambaMixer)"),
    "nemotron_h": (dict(_SHAPE, hybrid_override_pattern="M*", mamba_num_heads=4,
                        mamba_head_dim=16, n_groups=1, ssm_state_size=8),
                   "model.layers.0.mixer (NemotronHMamba2Mixer)"),
    "qwen3_next": (dict(_SHAPE, layer_types=["linear_attention", "full_attention"],
                        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                        linear_value_head_dim=8, head_dim=8, num_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=16,
                        shared_expert_intermediate_size=16),
                   "model.layers.0.linear_attn (Qwen3NextGatedDeltaNet)"),
    "mamba2": (dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4,
                    head_dim=16, n_groups=1, state_size=8, expand=2),
               "backbone.layers.0.mixer (Mamba2Mixer)"),
    "falcon_h1": (dict(_SHAPE, mamba_d_ssm=64, **_MAMBA), "model.layers.0.mamba (FalconH1Mixer)"),
    "zamba2": (dict(_SHAPE, mamba_headdim=16, mamba_d_state=8, n_mamba_heads=4,
                    layers_block_type=["mamba", "hybrid"]),
               "model.layers.0.mamba (Zamba2MambaMixer)"),
    "jamba": (dict(_SHAPE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                   expert_layer_offset=1, num_experts=2, mamba_d_state=8),
              "model.layers.0.mamba (JambaMambaMixer)"),
    "lfm2": (dict(_SHAPE, layer_types=["conv", "full_attention"]),
             "model.layers.0.conv (Lfm2ShortConv)"),
    "recurrent_gemma": (dict(_SHAPE, lru_width=32, block_types=["recurrent", "attention"],
                             head_dim=8),
                        "model.layers.0.temporal_block (RecurrentGemmaRecurrentBlock)"),
    "rwkv": (dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                  attention_hidden_size=32, intermediate_size=64),
             "rwkv.blocks.0.attention (RwkvSelfAttention"),
    "xlstm": (dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4),
              "backbone.blocks.0.mlstm_layer (xLSTMLayer"),
}
SPLITS = [(2, 2), (1, 4)]


def _config(model_type: str):
    return AutoConfig.for_model(model_type, **CONFIGS[model_type][0])


def _model(model_type: str, **options):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(model_type), trust_remote_code=False,
                                            **options)


def _meta_model(model_type: str):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_config(model_type), trust_remote_code=False)


def _refused(run, *needles: str) -> str | None:
    """None if ``run()`` raised a ValueError holding every needle; else what went wrong."""
    try:
        run()
    except ValueError as exc:
        missing = [n for n in needles if n not in str(exc)]
        return f"message lacks {missing}: {exc}" if missing else None
    except Exception as exc:  # a crash is no refusal either: reported with the other cases
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return "not refused"


def _check(failures: list[str], name: str, problem: str | None) -> None:
    if problem is not None:
        failures.append(f"{name}: {problem}")
    dist.barrier()  # every rank got here: nobody waits in a collective


# ------------------------------------------------------------------------------ 4 ranks
def _world(rank: int, world_size: int, files: dict) -> list[str]:
    failures: list[str] = []
    contexts = {split: USPContext(Topology.build(ring=split[0], ulysses=split[1]))
                for split in SPLITS}
    for (ring, ulysses), context in contexts.items():
        for model_type, (_, named) in CONFIGS.items():
            if model_type in SPLIT:  # its mixers run split (tests/test_hf_hybrid.py)
                problem = _refused(lambda: context.prepare(_meta_model(model_type)))
                _check(failures, f"prepare {model_type} r{ring}u{ulysses}",
                       None if problem == "not refused" else problem)
                continue
            problem = _refused(lambda: context.prepare(_meta_model(model_type)), named,
                               "mixes tokens along the sequence", f"ring={ring} x ulysses="
                               f"{ulysses}", "cannot run sequence-parallel")
            _check(failures, f"prepare {model_type} r{ring}u{ulysses}", problem)
        for preset in ("tiny-llama", "tiny-qwen3"):  # attention only: accepted
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(load_hf_config(preset))
            problem = _refused(lambda: context.prepare(model))
            _check(failures, f"{preset} r{ring}u{ulysses}",
                   None if problem == "not refused" else problem)
    split = contexts[(2, 2)]

    # prepared unsplit (dp 4), then run with a context that splits: refused before any layer
    gemma = USPContext(Topology.build(dp=4)).prepare(_model("recurrent_gemma"))
    ran = []
    gemma.model.layers[0].register_forward_pre_hook(lambda *args: ran.append(1))
    inputs = split.shard(torch.randint(0, VOCAB, (1, 16), generator=torch.Generator()))
    forward = dict(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                   use_cache=False, usp_context=split)
    problem = _refused(lambda: gemma(**forward), CONFIGS["recurrent_gemma"][1])
    _check(failures, "forward of a prepared model", problem or (
        f"{len(ran)} layers ran before the refusal" if ran else None))

    # never prepared (attn_implementation="usp" only): refused at the first attention layer
    for model_type in ("bamba", "nemotron_h", "qwen3_next", "falcon_h1"):
        bare = _model(model_type, attn_implementation="usp")
        problem = _refused(lambda: bare(**forward), "mixes tokens along the sequence")
        _check(failures, f"{model_type} never prepared", problem)

    for model_type in ("mamba2",):  # usp.parallelize, as usp train builds it
        problem = _refused(lambda: parallelize(
            build_hf_causal_lm(files[model_type], device="meta"), split.topology),
            CONFIGS[model_type][1])
        _check(failures, f"parallelize {model_type}", problem)

    from usp.infer.hf import USPCache
    from usp.infer.hf_generation import hf_generate

    # a generation runs the scan layers of the hybrids usp splits whole, their states in the
    # cache (tests/test_infer_hf.py); a hybrid whose layers it keeps none for is refused
    problem = _refused(lambda: USPCache(_config("recurrent_gemma"), split.topology,
                                        max_tokens=8),
                       "mixes tokens along the sequence")
    _check(failures, "USPCache", problem)
    problem = _refused(lambda: hf_generate(
        files["mamba2"], "a prompt", split.topology, layout="zigzag", max_new_tokens=2,
        dtype=torch.float32), "mixes tokens along the sequence")
    _check(failures, "hf_generate", problem)
    return failures


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    from tests.test_pretrained import _save_tokenizer

    root = tmp_path_factory.mktemp("mixers")
    saved = {}
    for model_type in ("bamba", "mamba2"):
        directory = root / model_type
        _model(model_type).save_pretrained(directory)
        _save_tokenizer(directory)
        saved[model_type] = str(directory)
    return saved


def test_models_with_other_sequence_mixers_are_refused_on_every_rank(files):
    failures = run_on_ranks(_world, WORLD, files, timeout_s=240)
    lines = [f"rank {rank}: {line}" for rank, lines in enumerate(failures) for line in lines]
    assert not lines, "\n".join(lines)


# ------------------------------------------------------------------------------ one process
def test_detection_names_each_sequence_mixer_and_nothing_in_attention_models():
    for model_type, (_, named) in CONFIGS.items():
        mixers = [str(m) for m in find_sequence_mixers(_meta_model(model_type))]
        assert mixers and mixers[0].startswith(named), (model_type, mixers)
    for preset in PRESETS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_hf_config(preset))
        assert find_sequence_mixers(model) == [], preset


@pytest.mark.parametrize("model_type", ["bamba", "mamba2"])
def test_an_unsplit_sequence_still_runs_such_models(model_type):
    eager = _model(model_type, attn_implementation="eager").eval()
    context = USPContext(trivial_topology())
    model = context.prepare(_model(model_type, attn_implementation="eager")).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs = context.shard(ids)
    got = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                use_cache=False, usp_context=context).logits
    torch.testing.assert_close(got, eager(input_ids=ids, use_cache=False).logits)


def test_usp_train_refuses_them_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    import usp.training.launcher

    def no_ranks(*args, **kwargs):
        raise AssertionError("ranks were launched")

    monkeypatch.setattr(usp.training.launcher, "launch_elastic", no_ranks)
    config = tmp_path / "recurrent_gemma.json"
    config.write_text(json.dumps({"model_type": "recurrent_gemma",
                                  **CONFIGS["recurrent_gemma"][0]}))
    flags = ["train", "--hf-config", str(config), "--seq-len", "32", "--steps", "1",
             "--synthetic", "--no-progress"]
    assert usp_main([*flags, "--nproc", "2", "--ring", "2", "--out", str(tmp_path / "a")]) == 2
    message = capsys.readouterr().err
    assert ("model.layers.0.temporal_block (RecurrentGemmaRecurrentBlock): a recurrent layer "
            "mixes") in message
    assert not Path(tmp_path / "a").exists()
    # unsplit it trains (one process, nothing split)
    assert usp_main([*flags, "--out", str(tmp_path / "b")]) == 0
