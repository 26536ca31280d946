"""The Hugging Face family's entry in the model registry: transformers causal LMs from a config
(``--hf-config``: a preset, a ``config.json`` or its folder; random init) or a local model
folder (``--hf-model``: its safetensors weights), run with the ``"usp"`` attention.

transformers is optional: this entry imports neither it nor torch. Each part is named by import
path (``usp.models.registry.lazy``) and loads when first called, so a run of another family
reads this entry without importing transformers. Generation runs in ``usp.infer``
(``usp.infer.hf_generation``: ``model.generate`` over a sharded KV cache).

Offered: ring × ulysses sequence parallelism (refused, naming the layer, for layers that mix
tokens other than by softmax attention), tensor parallelism from the config's own
``base_model_tp_plan`` (plain, without sequence parallelism; not with pipeline stages:
``usp.integrations.hf_family.tp``), FSDP2, pipeline stages, activation checkpointing and the
tiled MLP; the full-logits loss only. LoRA adapters through PEFT (``--lora-rank``:
``usp.integrations.hf_family.lora``), with ring × ulysses and FSDP2 (not with tp or pp).
"""

from __future__ import annotations

from usp.models.family import (
    Exporter, InferenceAdapter, ModelFamily, ModelPlan, ModelSettings, Weights,
)
from usp.models.registry import lazy

PACKAGE = "usp.integrations.hf_family"


def claims(settings: ModelSettings) -> bool:
    """A Hugging Face config or model folder is named."""
    return settings.hf_config is not None or settings.hf_model is not None


HUGGING_FACE = ModelFamily(
    name="hugging-face",
    claims=claims,
    display_name=lambda settings: settings.hf_model or settings.hf_config,
    size=lazy(f"{PACKAGE}.config:size"),
    validate=lazy(f"{PACKAGE}.config:validate"),
    skeleton=lazy(f"{PACKAGE}.model:skeleton"),
    metadata=lazy(f"{PACKAGE}.config:metadata"),
    plan=ModelPlan(
        check=lazy(f"{PACKAGE}.plan:check"),
        use_attention=lazy(f"{PACKAGE}.plan:use_usp_attention"),
        tensor_parallel=lazy(f"{PACKAGE}.tp:apply_hf_tensor_parallel"),
        keep_stage=lazy(f"{PACKAGE}.stages:keep_hf_stage"),
        mlp=lazy(f"{PACKAGE}.plan:mlp"),
    ),
    flops_per_token=lazy(f"{PACKAGE}.model:HFCausalLM.flops_per_token"),
    inference=InferenceAdapter(
        check=lazy("usp.infer.hf_generation:check_generation"),
        generate=lazy("usp.infer.hf_generation:generate_text"),
    ),
    weights=Weights(
        source=lambda settings: settings.hf_model,
        check=lazy(f"{PACKAGE}.weights:check_pretrained"),
        load=lazy(f"{PACKAGE}.weights:load_weights"),
    ),
    export=Exporter(
        config=lazy(f"{PACKAGE}.export:hf_config"),
        tensors=lazy(f"{PACKAGE}.export:hf_tensors"),
        generation_config=lazy(f"{PACKAGE}.export:generation_config"),
        adapter_config=lazy(f"{PACKAGE}.lora:lora_config"),
    ),
    lora=True,
)
