"""What a model family provides, written down once.

A **family** is one kind of model usp trains and runs: usp's own Llama (``usp.models.llama``) or
Hugging Face transformers causal LMs (``usp.integrations.hf_family``). Everything that differs
between families lives in the family's folder and is reached through its :class:`ModelFamily`
entry, found by the registry (``usp.models.registry``): ``usp.parallelize``, ``usp train`` and
``usp generate`` ask the entry and never branch on the family themselves.

An entry is a frozen dataclass of functions of the run's model settings (:class:`ModelSettings`)
or of a model the family built; the model follows :class:`FamilyModel`, the interface the
training loop, the pipeline and checkpoints call. This module imports neither torch nor any
family, and an entry's module imports no torch either (its heavier parts are named by import
path, ``usp.models.registry.lazy``), so the command line can read them before torch loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from usp.topology import Topology


@dataclass(frozen=True)
class ModelSettings:
    """Which model a run uses: the model section of its settings (``--model``, ``--hf-config``,
    ``--hf-model``, the LoRA adapters). Exactly one registered family claims a given value."""

    model: str = "tiny"  # a preset name (usp.models.llama.CONFIGS)
    hf_config: str | None = None  # a Hugging Face config: a preset, config.json or its folder
    hf_model: str | None = None  # a local Hugging Face model folder: config and safetensors
    # LoRA adapters (``--lora-rank``, ``--lora-alpha``, ``--lora-targets``): rank 0 trains every
    # weight; a family that takes adapters says so (``ModelFamily.lora``)
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: twice the rank
    lora_targets: tuple[str, ...] = ("all-linear",)  # PEFT's target_modules

    @property
    def lora_scaling(self) -> float:
        """What the adapters' product ``B @ A`` is multiplied by: alpha / rank."""
        return (self.lora_alpha or 2 * self.lora_rank) / self.lora_rank


class ModelSize(NamedTuple):
    """What a family reads off its settings before anything is built."""

    vocab_size: int
    parameters: int  # a lower bound where the shapes do not say everything
    # layers that scan the sequence in order (Mamba-2, gated delta: usp.scan): with ring > 1
    # they need each ring rank's block contiguous (layout "contiguous")
    scans: bool = False


class FamilyModel(Protocol):
    """The interface of every model a family builds (``Llama``, ``HFCausalLM``)."""

    family: str  # the name of its family's entry: usp.models.registry.family_of_model reads it
    config: Any  # the family's own config object
    layers: nn.ModuleDict  # the decoder blocks this rank holds, by global index
    hidden_size: int  # the width of the residual stream (what pipeline stages exchange)
    vocab_size: int
    # optional: a loss the model adds to the cross-entropy, set by its last forward (a
    # mixture-of-experts router loss, its coefficient applied): value the whole batch's,
    # gradient this rank's share; None or absent: nothing to add
    auxiliary_loss: torch.Tensor | None

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 documents: torch.Tensor | None = None, **loss_options) -> torch.Tensor:
        """``[B, S]`` ids and global positions -> logits ``[B, S, vocab]`` (at least fp32); a
        pipeline stage after the first takes hidden states ``[B, S, hidden]`` instead of ids,
        one before the last returns them. ``documents``: packed documents (``usp.batch``)."""

    def init_weights(self, seed: int) -> None:
        """Fill this rank's shards from ``seed`` with one process's values (``usp.models.init``)."""

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding once), global under sharding."""


@dataclass(frozen=True)
class ModelPlan:
    """What :func:`usp.parallelize` must know of a family's models, in its order of use."""

    # ValueError, naming the numbers, for what the topology cannot split; else a note worth a
    # warning (padded heads) or None
    check: Callable[[nn.Module, Topology], str | None]
    # swap every layer's attention for usp_attention: (model, topology, layout, kernel,
    # ring_layout: the layout the ring runs on, None: the layout's)
    use_attention: Callable[[nn.Module, Topology, str, str, str | None], None]
    # apply tensor parallelism: (model, tp mesh, output split over the vocabulary); None: no TP
    tensor_parallel: Callable[[nn.Module, object, bool], None] | None
    # cut the model to this rank's pipeline stage (usp.pipeline.stage_layer_names), in place;
    # None: no pipeline stages
    keep_stage: Callable[[nn.Module, Topology], nn.Module] | None
    mlp: Callable[[nn.Module], nn.Module]  # a block's MLP (selective checkpointing, tiling)
    # a block's attention (checkpointing of kind 'attention'); None: not offered
    attention: Callable[[nn.Module], nn.Module] | None = None
    # the losses of usp.losses.LOSSES its models can feed (usp.losses.LossHead): "full" needs
    # logits only; "chunked" needs forward(..., return_hidden=True) and the output projection
    # as .output; "vocab_parallel" needs tensor_parallel to leave the logits split over tp
    losses: tuple[str, ...] = ("full",)

    def check_loss(self, loss: str, model_name: str) -> None:
        """ValueError unless ``loss`` is one this family's models offer."""
        if loss not in self.losses:
            raise ValueError(f"loss={loss!r} is not offered for {model_name}: its family's "
                             f"models offer {list(self.losses)}; use one of those")


@dataclass(frozen=True)
class Weights:
    """A family's reader of pretrained weights into a built (sharded, materialised) model."""

    source: Callable[[ModelSettings], str | None]  # the folder to read; None: init from the seed
    # pure (reads headers, no tensor data): ValueError unless the folder holds exactly the
    # whole model's tensors; (folder, the skeleton or a stage of it), before any rank starts
    check: Callable[[str, nn.Module], None]
    # every parameter and computed buffer of this rank's shards from the folder (a collective
    # with a process group), what no folder holds (LoRA factors) from the seed: (model after
    # to_empty, folder, seed)
    load: Callable[[nn.Module, str, int], None]


@dataclass(frozen=True)
class InferenceAdapter:
    """How ``usp generate`` runs a family's model (``usp.infer.launch``)."""

    # (settings, prompt text, ranks, dtype name): ValueError for what cannot generate, in the
    # launching process before any rank starts
    check: Callable[[ModelSettings, str, int, str], None]
    # (settings, prompt text, topology, *, seed, layout, ring_pass, kernel, dtype name,
    # max_new_tokens) -> {"model": what ran, "notes": [lines to say first], "prompt_tokens",
    # "tokens", "text", "prefill_seconds", "token_seconds"}, the same on every rank
    generate: Callable[..., dict]


@dataclass(frozen=True)
class Exporter:
    """How ``usp export`` writes a family's trained model as a Hugging Face folder
    (``usp.training.export``), one checkpoint tensor at a time."""

    # (settings, *, dtype) -> the transformers config to write (a PretrainedConfig)
    config: Callable[..., Any]
    # (checkpoint name, its whole tensor, that config) -> [(transformers name, tensor)]: a
    # tensor renamed (and reordered where the layouts differ), or [] for one not written (an
    # output projection tied to the embedding)
    tensors: Callable[[str, "torch.Tensor", Any], list[tuple[str, "torch.Tensor"]]]
    # (that config) -> the GenerationConfig to write beside it
    generation_config: Callable[[Any], Any]
    # (settings, base model folder or None) -> the ``peft.LoraConfig`` of a LoRA run's adapter
    # folder (``usp export --adapter``); None: the family's adapters are exported merged only
    adapter_config: Callable[[ModelSettings, str | None], Any] | None = None


@dataclass(frozen=True)
class ModelFamily:
    """One family's entry in the registry: everything usp asks of a family, and nothing else."""

    name: str  # the registry's key; the family's models carry it as ``.family``
    claims: Callable[[ModelSettings], bool]  # whether these settings name one of its models
    display_name: Callable[[ModelSettings], str]  # the model as logs and checkpoints name it
    # vocabulary and parameters, read off the settings alone (no module built, not even on
    # meta); ValueError for settings it cannot read, naming the flag
    size: Callable[[ModelSettings], ModelSize]
    # (settings, topology, token ids of the data): ValueError, naming the numbers, unless the
    # model splits over the topology's shape (heads vs tp and ulysses, layers vs pp, ...) and
    # its embedding takes every token id; reads files, never tensor data, needs no process group
    validate: Callable[[ModelSettings, Topology, int], None]
    skeleton: Callable[[ModelSettings], FamilyModel]  # the whole model on the meta device
    # the model's config as JSON data, recorded in every checkpoint's meta.json and compared on
    # resume: a family keeps this exactly as it is, or older checkpoints stop resuming
    metadata: Callable[[ModelSettings], dict]
    plan: ModelPlan
    # training FLOPs per token (forward + backward) of a built model at a sequence length: the
    # family's one formula (usp.models.counts), behind the MFU of usp train and its benchmarks
    flops_per_token: Callable[[FamilyModel, int], float]
    inference: InferenceAdapter
    weights: Weights | None = None  # None: the family's models start from a seed only
    export: Exporter | None = None  # None: ``usp export`` refuses the family's runs
    # whether its skeleton takes LoRA adapters (``ModelSettings.lora_rank``: injected by PEFT,
    # named as PEFT names them, base weights frozen); False: runs with adapters are refused
    lora: bool = False

    def pretrained(self, settings: ModelSettings) -> str | None:
        """The folder the model's first weights come from, or None (initialised from a seed)."""
        return self.weights.source(settings) if self.weights is not None else None


def check_vocabulary(config_name: str, vocab_size: int, token_ids: int) -> None:
    """ValueError unless an embedding of ``vocab_size`` rows takes ``token_ids`` token ids."""
    if vocab_size < token_ids:
        raise ValueError(
            f"{config_name}.vocab_size={vocab_size} is smaller than the {token_ids} token ids of "
            f"the training data; use vocab_size >= {token_ids}"
        )
