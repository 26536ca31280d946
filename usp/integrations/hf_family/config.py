"""Hugging Face configs for usp: presets built in code, local ``config.json`` files read without
running code, their checks against a topology, and the settings functions of the family's entry.

- :func:`load_hf_config`: a preset (no download) or a local ``config.json`` or model folder;
  ``trust_remote_code`` is never set, a folder asking for custom code or naming a model type
  transformers does not ship is refused, and every size must be a positive whole number
  (``usp.inputs.folders``, ``usp.inputs.model_size``).
- :func:`validate_hf_config`: the config against a topology's shape (no process group).
- :func:`size`, :func:`validate`, :func:`metadata`: what ``usp.models.family.ModelFamily`` asks
  of a run's :class:`~usp.models.family.ModelSettings` (``--hf-config`` or ``--hf-model``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from usp.integrations.hf_family.stages import check_stages
from usp.integrations.hf_family.tp import check_tensor_parallel
from usp.integrations.hf_mixers import unsplit_mixers
from usp.integrations.hf_scan import SPLIT_MODEL_TYPES
from usp.integrations.transformers import ATTENTION_NAME, check_config, check_sequence_mixers
from usp.models.family import ModelSettings, ModelSize, check_vocabulary
from usp.topology import Topology
from usp.inputs import folders, model_size
from usp.inputs.byte_tokens import BYTE_VOCAB_SIZE

_TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1 << 17,
    tie_word_embeddings=False,
)
# CPU-sized configs of five architectures (vocab 512 covers the 257 byte-level ids of usp.inputs.byte_tokens)
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
    (``usp.inputs.folders``, ``usp.inputs.model_size``)."""
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
    check_vocabulary(type(config).__name__, config.vocab_size, min_vocab_size)
    if topology.size("ring") * topology.size("ulysses") * topology.size("tp") > 1:
        with torch.device("meta"):  # the modules, on meta: no storage
            skeleton = AutoModelForCausalLM.from_config(
                config, attn_implementation=ATTENTION_NAME, trust_remote_code=False)
        check_sequence_mixers(unsplit_mixers(skeleton), topology)  # the rest run split
        check_tensor_parallel(skeleton, topology)
    check_config(config, topology, scans=True)  # built, it is prepared: usp.parallelize
    check_stages(config, topology)
    return config


def hf_config_metadata(path_or_preset: str) -> dict:
    """The config as JSON data for checkpoint metadata (without the transformers version)."""
    values = json.loads(load_hf_config(path_or_preset).to_json_string(use_diff=False))
    for key in ("transformers_version", "_name_or_path"):
        values.pop(key, None)
    return values


# ---------------------------------------------------------------------------- the entry's
def source(settings: ModelSettings) -> str:
    """The config the settings name: ``--hf-model``'s folder or ``--hf-config``."""
    if settings.hf_model and settings.hf_config:
        raise ValueError("--hf-model DIR reads its config from DIR/config.json; drop --hf-config")
    return settings.hf_model or settings.hf_config


def size(settings: ModelSettings) -> ModelSize:
    """The config's vocabulary and a lower bound of its parameters (two MLP matrices)."""
    flag = "--hf-model" if settings.hf_model else "--hf-config"
    config = load_hf_config(source(settings), flag)
    return ModelSize(config.vocab_size, model_size.parameter_estimate(config),
                     scans=getattr(config, "model_type", None) in SPLIT_MODEL_TYPES)


def validate(settings: ModelSettings, topology: Topology, token_ids: int) -> None:
    """:func:`validate_hf_config` of the settings' config, and its LoRA adapters: the
    parallelism they run with and targets that name linear layers of the model."""
    config = validate_hf_config(source(settings), topology, token_ids)
    if settings.lora_rank:
        from usp.integrations.hf_family.lora import check_targets, check_topology

        check_topology(topology)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        check_targets(settings, skeleton)


def metadata(settings: ModelSettings) -> dict:
    """:func:`hf_config_metadata` of the settings' config."""
    return hf_config_metadata(source(settings))
