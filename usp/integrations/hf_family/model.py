"""A Hugging Face causal LM behind the interface of usp's models
(``usp.models.family.FamilyModel``), built on the meta device and initialised shard by shard.

- :class:`HFCausalLM` wraps a transformers model: ``forward(input_ids, position_ids) -> logits``
  like ``usp.models.Llama``, so ``usp train`` runs either with the same loop, and the decoder
  layers by global index, which ``usp.parallelize`` shards and checkpoints one by one.
- :func:`build_hf_causal_lm`: a model from a config (``usp.integrations.hf_family.config``),
  on the meta device, then materialised and randomly initialised (seeded, shard by shard, equal
  to one process's values).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, PretrainedConfig

from usp.integrations.hf_family.config import load_hf_config, source
from usp.integrations.hf_family.lora import add_adapters, init_factor
from usp.integrations.hf_family.stages import OtherStage
from usp.integrations.transformers import ATTENTION_NAME, USPContext
from usp.models import init
from usp.models.counts import training_flops_per_token
from usp.models.family import ModelSettings
from usp.models.lora import is_adapter
from usp.topology import AXES, Topology


def trivial_topology() -> Topology:
    """The single-process topology (every axis of size 1), built without a process group."""
    return Topology({axis: 1 for axis in AXES}, {axis: 0 for axis in AXES})


class HFCausalLM(nn.Module):
    """A transformers causal LM behind ``usp.models.Llama``'s interface.

    ``forward(input_ids, position_ids [B, S]) -> logits [B, S, V]`` (at least fp32), with
    ``use_cache=False`` and this model's :class:`USPContext` (single-process until
    ``usp.parallelize`` replaces it).
    """

    family = "hugging-face"  # its entry in usp.models.registry (usp.integrations.hf_family.family)

    def __init__(self, model: nn.Module, context: USPContext) -> None:
        super().__init__()
        self.model = model
        self.context = context
        self.auxiliary_loss: torch.Tensor | None = None  # set by each forward (forward)
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
                              if not isinstance(layer, OtherStage)})

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
        outputs = self.model(
            **given, position_ids=position_ids, use_cache=False,
            usp_context=self.context, usp_documents=documents,
        )
        # a mixture-of-experts model asked for its router loss (output_router_logits=True):
        # transformers' training loss adds it, times the config's coefficient; over the ranks
        # that hold different tokens it is the whole batch's (the prepared model's forward hook,
        # usp.integrations.hf_moe)
        aux = getattr(outputs, "aux_loss", None)
        self.auxiliary_loss = None if aux is None else self.model.router_aux_loss_coef * aux
        logits = outputs.logits
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    @torch.no_grad()
    def init_weights(self, seed: int, parameters: bool = True) -> None:
        """Initialise this rank's shards: matrices and embeddings (every parameter of 2 or more
        dimensions) ``normal(0, initializer_range)`` drawn shard-locally from ``(seed, name)``
        (``usp.models.init``); the rest as transformers initialises it, mostly a constant for
        each of them (biases 0, norms 1, or 0 where the norm scales by ``1 + weight``; what it
        draws at random is drawn from ``(seed, module name)``), and the computed buffers (RoPE
        frequencies, embedding scales). ``parameters=False`` leaves
        every base parameter alone and only computes the buffers (weights about to be loaded).
        LoRA factors are always drawn (no model folder holds them:
        ``usp.integrations.hf_family.lora.init_factor``).
        """
        named = list(self.model.named_parameters())
        drawn = [(name, p) for name, p in named
                 if not is_adapter(name) and (p.ndim >= 2 or not parameters)]
        factors = [(name, p) for name, p in named if is_adapter(name)]
        for _, parameter in drawn + factors:  # transformers' init functions skip these
            parameter._is_hf_initialized = True
        for name, module in self.model.named_modules():
            # what transformers draws at random (Qwen3-Next's A_log) comes from (seed, module):
            # the same values on every rank, layout and world size
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init.block_seed(seed, name, 0))
                _init_whole(self.model, module)
        std = getattr(self.config, "initializer_range", None) or 0.02
        for _, parameter in drawn + factors:
            del parameter._is_hf_initialized
        if parameters:
            for name, parameter in drawn:
                init.normal_(parameter, std, seed, name)
        for name, parameter in factors:
            init_factor(parameter, name, seed)

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counts once), global under sharding."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (``usp.models.counts.training_flops_per_token``): every
        parameter multiplies in a matmul except an untied embedding table; attention over the
        config's query heads (none: no softmax attention)."""
        config = self.config
        embedding = self.model.get_input_embeddings().weight
        matmul_params = self.num_params()
        if self.model.get_output_embeddings().weight is not embedding:
            matmul_params -= embedding.numel()
        heads = getattr(config, "num_attention_heads", None) or 0  # none: no softmax attention
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(heads, 1)
        return training_flops_per_token(matmul_params, config.num_hidden_layers,
                                        heads * head_dim, seq_len)


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


def skeleton(settings: ModelSettings) -> HFCausalLM:
    """The settings' model on the meta device (the family entry's skeleton), with its LoRA
    adapters where the settings ask for them (``usp.integrations.hf_family.lora``)."""
    model = build_hf_causal_lm(source(settings), device="meta")
    if settings.lora_rank:
        add_adapters(model.model, settings)
    return model


@torch.no_grad()
def _init_whole(model: nn.Module, module: nn.Module) -> None:
    """transformers' ``_init_weights`` of one module whose parameters may be shards (DTensors,
    after ``usp.parallelize``): it sees each parameter it initialises whole (some are not
    constants: Mamba-2's ``A_log`` is ``log(1..H)``), and each rank keeps its own block."""
    swapped = []
    for name, parameter in list(module.named_parameters(recurse=False)):
        if isinstance(parameter, DTensor) and not getattr(parameter, "_is_hf_initialized", False):
            whole = nn.Parameter(torch.zeros(parameter.shape, dtype=parameter.dtype,
                                             device=parameter.to_local().device),
                                 requires_grad=parameter.requires_grad)
            setattr(module, name, whole)
            swapped.append((name, parameter, whole))
    try:
        model._init_weights(module)
    finally:
        for name, parameter, whole in swapped:
            setattr(module, name, parameter)  # the shard FSDP2 and TP hold
            local, shape, offset = init.local_region(parameter)
            local.copy_(whole[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
