"""Train a Hugging Face causal LM with usp: build it from a config, then parallelise it.

- :func:`load_hf_config`: a preset built in code (no download) or a local ``config.json``.
- :func:`build_hf_causal_lm`: a model built on the meta device, then materialised and randomly
  initialised (seeded, shard by shard, equal to one process's values) and wrapped in
  :class:`HFCausalLM`, whose ``forward(input_ids, position_ids) -> logits`` is the interface of
  ``usp.models.Llama``, so ``usp train`` runs either with the same loop.
- :data:`HF_PLAN`: what ``usp.parallelize`` needs to know of these models: attention
  (``"usp"`` on the topology through a :class:`USPContext`), the MLP at ``.mlp``, and the
  pipeline stage (:func:`keep_hf_stage`: the stage's decoder layers keep their indices, the
  others become pass-throughs without parameters). Tensor parallelism is not offered for them
  (ValueError).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from usp.models import init
from usp.training import folders, model_size
from usp.training.data import BYTE_VOCAB_SIZE
from usp.integrations.transformers import (
    ATTENTION_NAME, USPContext, check_config, check_sequence_mixers,
)
from usp.parallel import ModelPlan
from usp.pipeline import stage_layer_names
from usp.topology import AXES, Topology

logger = logging.getLogger(__name__)

_TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1 << 17,
    tie_word_embeddings=False,
)
# CPU-sized configs of five architectures (vocab 512 covers the 257 byte-level ids of usp.training.data)
PRESETS: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", **_TINY),
    "tiny-qwen2": dict(model_type="qwen2", **_TINY),
    "tiny-qwen3": dict(model_type="qwen3", head_dim=16, **_TINY),  # q/k RMSNorm per head
    "tiny-mistral": dict(model_type="mistral", sliding_window=None, **_TINY),
    "tiny-gemma": dict(model_type="gemma", head_dim=16, **_TINY),
}


def load_hf_config(path_or_preset: str, flag: str = "--hf-config") -> PretrainedConfig:
    """A preset name, a ``config.json`` or a model folder holding one; never downloads, never
    runs code from the folder, and refuses sizes that are not positive whole numbers
    (``usp.training.folders``, ``usp.training.model_size``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if path_or_preset in PRESETS:
        values = dict(PRESETS[path_or_preset])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(path_or_preset)
    if path.is_dir():
        path = folders.expect_model_folder(path, flag)
    if not path.is_file():
        raise ValueError(
            f"{flag} {path_or_preset!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
            "nor a config.json file or a directory holding one"
        )
    values = _special_floats(folders.read_json(path, flag))
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"{str(path)!r} has no \"model_type\"; it is no transformers config.json")
    folders.refuse_custom_code(values, path, flag, CONFIG_MAPPING)
    model_type = values.pop("model_type")
    model_size.check_config_values(values, CONFIG_MAPPING[model_type], path)
    try:
        config = AutoConfig.for_model(model_type, **values)
    except Exception as exc:  # transformers' strict dataclasses raise their own types
        reason = str(exc).strip().splitlines()[-1].strip()
        raise ValueError(f"{str(path)!r} is not a valid {model_type} config: {reason}") from None
    model_size.check_config(config, path)
    return config


def _special_floats(value):
    """JSON values with transformers' encoding of infinities and NaN (``{"__float__":
    "Infinity"}``, as in Mamba-2's ``time_step_limit``) decoded to floats."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in ("Infinity", "-Infinity", "NaN"):
            return float(value["__float__"].lower().replace("infinity", "inf"))
        return {key: _special_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_special_floats(item) for item in value]
    return value


def validate_hf_config(
    path_or_preset: str, topology: Topology, min_vocab_size: int = BYTE_VOCAB_SIZE
) -> PretrainedConfig:
    """Load and check a config for training on ``topology`` (its sizes only: no process group)."""
    config = load_hf_config(path_or_preset)
    if topology.size("tp") != 1:
        raise ValueError(
            f"tp={topology.size('tp')}: tensor parallelism is not supported for Hugging Face "
            "models; use --tp 1"
        )
    if config.vocab_size < min_vocab_size:
        raise ValueError(
            f"{type(config).__name__}.vocab_size={config.vocab_size} is smaller than the "
            f"{min_vocab_size} token ids of the training data; use vocab_size >= {min_vocab_size}"
        )
    if topology.size("ring") * topology.size("ulysses") > 1:  # the modules, on meta: no storage
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                config, attn_implementation=ATTENTION_NAME, trust_remote_code=False)
        check_sequence_mixers(skeleton, topology)
    check_config(config, topology)
    check_stages(config, topology)
    return config


def hf_config_metadata(path_or_preset: str) -> dict:
    """The config as JSON data for checkpoint metadata (without the transformers version)."""
    values = json.loads(load_hf_config(path_or_preset).to_json_string(use_diff=False))
    for key in ("transformers_version", "_name_or_path"):
        values.pop(key, None)
    return values


def trivial_topology() -> Topology:
    """The single-process topology (every axis of size 1), built without a process group."""
    return Topology({axis: 1 for axis in AXES}, {axis: 0 for axis in AXES})


class HFCausalLM(nn.Module):
    """A transformers causal LM behind ``usp.models.Llama``'s interface.

    ``forward(input_ids, position_ids [B, S]) -> logits [B, S, V]`` (at least fp32), with
    ``use_cache=False`` and this model's :class:`USPContext` (single-process until
    ``usp.parallelize`` replaces it).
    """

    def __init__(self, model: nn.Module, context: USPContext) -> None:
        super().__init__()
        self.model = model
        self.context = context
        self.model_plan = HF_PLAN
        if not isinstance(getattr(model.base_model, "layers", None), nn.ModuleList):
            raise ValueError(
                f"{type(model).__name__} keeps no decoder layers in base_model.layers; usp "
                "shards and checkpoints per decoder layer and cannot wrap this architecture"
            )

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def layers(self) -> nn.ModuleDict:
        """This rank's decoder layers by global index (what ``usp.parallel`` shards and
        checkpoints one by one; a pipeline stage's pass-throughs left out)."""
        return nn.ModuleDict({str(i): layer for i, layer in enumerate(self.model.base_model.layers)
                              if not isinstance(layer, _OtherStage)})

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids [B, S]`` (or, on a pipeline stage after the first, the previous stage's
        hidden states ``[B, S, hidden]``) -> logits (the hidden states before the last stage)."""
        if input_ids.shape[:2] != position_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and position_ids "
                f"{tuple(position_ids.shape)} must have the same [B, S] shape"
            )
        given = ({"inputs_embeds": input_ids} if input_ids.is_floating_point()
                 else {"input_ids": input_ids})
        logits = self.model(
            **given, position_ids=position_ids, use_cache=False,
            usp_context=self.context, usp_documents=documents,
        ).logits
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    @torch.no_grad()
    def init_weights(self, seed: int, parameters: bool = True) -> None:
        """Initialise this rank's shards: matrices and embeddings (every parameter of 2 or more
        dimensions) ``normal(0, initializer_range)`` drawn shard-locally from ``(seed, name)``
        (``usp.models.init``); the rest as transformers initialises it, which is a constant
        for each of them (biases 0, norms 1, or 0 where the norm scales by ``1 + weight``) and
        the computed buffers (RoPE frequencies, embedding scales). ``parameters=False`` leaves
        every parameter alone and only computes the buffers (weights about to be loaded).
        """
        drawn = [(name, p) for name, p in self.model.named_parameters()
                 if p.ndim >= 2 or not parameters]
        for _, parameter in drawn:  # transformers' init functions skip what carries this flag
            parameter._is_hf_initialized = True
        for module in self.model.modules():
            self.model._init_weights(module)
        std = getattr(self.config, "initializer_range", None) or 0.02
        for name, parameter in drawn:
            del parameter._is_hf_initialized
            if parameters:
                init.normal_(parameter, std, seed, name)

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counts once), global under sharding."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, counted as ``usp.models.Llama.flops_per_token`` does."""
        config = self.config
        embedding = self.model.get_input_embeddings().weight
        matmul_params = self.num_params()
        if self.model.get_output_embeddings().weight is not embedding:
            matmul_params -= embedding.numel()
        heads = getattr(config, "num_attention_heads", None) or 0  # none: no softmax attention
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(heads, 1)
        attention = 6 * config.num_hidden_layers * heads * head_dim * seq_len
        return 6.0 * matmul_params + attention


def build_hf_causal_lm(
    path_or_preset: str, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> HFCausalLM:
    """A causal LM (``attn_implementation="usp"``) built on the meta device, then materialised on
    ``device`` and initialised from ``seed`` (:meth:`HFCausalLM.init_weights`): equal on every
    rank. ``device="meta"`` returns the skeleton, to parallelise first and materialise after."""
    config = load_hf_config(path_or_preset)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=ATTENTION_NAME, dtype=dtype, trust_remote_code=False
        )
    wrapped = HFCausalLM(model, USPContext(trivial_topology()))
    if torch.device(device).type != "meta":
        init.to_empty(wrapped, device)
        wrapped.init_weights(seed)
    return wrapped


def _check(model: HFCausalLM, topology: Topology) -> None:
    check_sequence_mixers(model.model, topology)
    check_config(model.config, topology)
    check_stages(model.config, topology)


def check_stages(config: PretrainedConfig, topology: Topology) -> None:
    """Raise ValueError, naming the numbers, unless ``config`` can be cut into ``pp`` stages."""
    pp, layers = topology.size("pp"), config.num_hidden_layers
    if pp > 1 and layers < pp:
        raise ValueError(f"num_hidden_layers={layers} < pp={pp}: every pipeline stage needs a layer")
    if pp > 1 and getattr(config, "tie_word_embeddings", False):
        raise ValueError(
            "tie_word_embeddings with pp > 1: the embedding (first stage) and the output "
            "projection (last stage) would live on different ranks; untie them or use pp=1"
        )


class _OtherStage(nn.Module):
    """A decoder layer that another pipeline stage holds: the hidden states pass through."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def keep_hf_stage(model: HFCausalLM, topology: Topology) -> HFCausalLM:
    """Cut ``model`` to this rank's pipeline stage, in place. The stage's decoder layers keep
    their place (and so their names: checkpoints do not depend on pp); the others become
    pass-throughs. The first stage keeps the embedding, the last the final norm and the output
    projection; the stages between take the hidden states as ``inputs_embeds`` (an
    architecture that scales its embeddings does so in the embedding module, on the first)."""
    pp, stage = topology.size("pp"), topology.rank("pp")
    base = model.model.base_model
    keep = set(stage_layer_names(len(base.layers), pp, stage))
    for index in range(len(base.layers)):
        if str(index) not in keep:
            base.layers[index] = _OtherStage()
    if stage != 0:
        base.embed_tokens = None
    if stage != pp - 1:
        base.norm = nn.Identity()
        model.model.set_output_embeddings(nn.Identity())
    return model


def _use_attention(model: HFCausalLM, topology: Topology, layout: str, kernel: str) -> None:
    model.context = USPContext(topology, layout, kernel)
    model.context.prepare(model.model)


def _mlp(layer: nn.Module) -> nn.Module:
    if not hasattr(layer, "mlp"):
        raise ValueError(
            f"selective activation checkpointing recomputes each decoder layer's .mlp, which "
            f"{type(layer).__name__} lacks; use activation_checkpointing='full'"
        )
    return layer.mlp


HF_PLAN = ModelPlan(
    check=_check, use_attention=_use_attention, tensor_parallel=None, keep_stage=keep_hf_stage,
    mlp=_mlp
)
