"""Layers of a transformers model that mix tokens along the sequence without softmax attention.

usp splits a model's sequence over ``ring x ulysses`` ranks and replaces its softmax attention
with one that sees the whole sequence. Any other layer that mixes tokens — a state-space layer
(Mamba, Mamba-2/SSD), linear attention or a gated delta rule, a recurrent block (RecurrentGemma,
RWKV, xLSTM), a convolution over tokens (causal conv1d, ShortConv, Hyena) — would run on each
rank's fragment of the sequence and compute something else than the model does, silently. Until
such layers are split exactly, a model that has one is refused whenever the sequence is split
(ring x ulysses > 1), before any layer runs; with ring = ulysses = 1 nothing is split and it runs.

No single signal finds them all, so three are combined (:func:`find_sequence_mixers`):

- the config's per-layer types: ``layer_types`` (``linear_attention``, ``conv``, ``hybrid`` ...),
  ``layers_block_type``, ``block_types``, ``hybrid_override_pattern`` (``M`` = Mamba), and the
  model types whose every layer is recurrent (Mamba, RWKV, xLSTM), which declare no layer types;
- class names of known sequence mixers (``Mamba``, ``SSM``, ``GatedDeltaNet``, ``ShortConv`` ...),
  read without the model's own family prefix (``RecurrentGemmaAttention`` is attention);
- any convolution with a kernel wider than 1 inside a decoder layer (a kernel over the tokens).

Each finding names the module (its path and class) and what kind of layer it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.conv import _ConvNd

from usp.integrations.hf_scan import SPLIT_MIXERS, SPLIT_MODEL_TYPES, splits

STATE_SPACE = "a state-space layer"
LINEAR_ATTENTION = "a linear-attention layer"
RECURRENT = "a recurrent layer"
CONVOLUTION = "a convolution over tokens"
# class names (after the family prefix) of the sequence mixers transformers ships, by kind
CLASS_PATTERNS = (
    (re.compile(r"Mamba|SSM|Ssm|StateSpace|Mixer$"), STATE_SPACE),
    (re.compile(r"GatedDelta|DeltaNet|DeltaAttention|LinearAttention|LightningAttention|"
                r"Retention"),
     LINEAR_ATTENTION),
    (re.compile(r"Recurrent|Rglru|RgLru|Rwkv|RWKV|Lstm|LSTM|TimeMix"), RECURRENT),
    (re.compile(r"ShortConv|Hyena|CausalConv|Conv1d"), CONVOLUTION),
)
NOT_A_MIXER = re.compile(r"Norm|MLP|Mlp|FeedForward|Moe|MoE|Expert|Dropout|Identity|Embedding")
# model types whose every layer is recurrent: their configs declare no per-layer types
RECURRENT_FAMILIES = {"mamba": STATE_SPACE, "mamba2": STATE_SPACE, "falcon_mamba": STATE_SPACE,
                      "rwkv": RECURRENT, "xlstm": RECURRENT}
# hybrid_override_pattern (Nemotron-H): M = Mamba-2, * = attention, - = MLP, E = experts
PATTERN_LETTERS = {"M": "mamba"}
_FAMILY_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "Model")


@dataclass(frozen=True)
class SequenceMixer:
    """One layer usp cannot split: where it is and what it is."""

    path: str  # the module's name in the model, or "layer i" when only the config tells
    class_name: str  # the module's class, or the config entry that declares it
    kind: str

    def __str__(self) -> str:
        return f"{self.path} ({self.class_name}): {self.kind}"


def _kind_of_layer_type(layer_type: str) -> str | None:
    """What a config's layer type declares, or None for attention and MLP layers."""
    name = str(layer_type).lower()
    if "linear" in name or "delta" in name:
        return LINEAR_ATTENTION
    if "attention" in name or name in ("full", "sliding", "global", "local", "chunked",
                                       "mlp", "moe", "dense", "ffn"):
        return None
    if "conv" in name:
        return CONVOLUTION
    if "recurrent" in name or "lstm" in name or "rwkv" in name:
        return RECURRENT
    if "mamba" in name or "ssm" in name:
        return STATE_SPACE
    if "hybrid" in name:
        return "a hybrid layer (a state-space or convolution mixer beside attention)"
    return "a layer that is neither softmax attention nor an MLP"  # unknown: refused, not guessed


def config_layer_kinds(config) -> dict[int, tuple[str, str]]:
    """``{layer index: (the config entry, kind)}`` for the layers the config declares to be
    something other than softmax attention or an MLP."""
    declared: dict[int, tuple[str, str]] = {}
    for field in ("layer_types", "layers_block_type", "block_types"):
        for index, layer_type in enumerate(getattr(config, field, None) or ()):
            kind = _kind_of_layer_type(layer_type)
            if kind is not None and index not in declared:
                declared[index] = (f"config.{field}[{index}]={layer_type!r}", kind)
    pattern = getattr(config, "hybrid_override_pattern", None) or ""
    for index, letter in enumerate(pattern):
        if letter in PATTERN_LETTERS and index not in declared:
            declared[index] = (f"config.hybrid_override_pattern[{index}]={letter!r}", STATE_SPACE)
    family = RECURRENT_FAMILIES.get(getattr(config, "model_type", None))
    if family is not None and not declared:
        layers = getattr(config, "num_hidden_layers", None) or 1
        for index in range(layers):
            declared[index] = (f"model_type={config.model_type!r}", family)
    return declared


def config_sequence_mixers(config, scans: bool = False) -> list[SequenceMixer]:
    """The findings of the config alone (no module to name): one per declared layer.
    ``scans``: none for the model types whose every such layer is a mixer usp splits
    (``usp.integrations.hf_scan``: a model prepared by ``USPContext.prepare`` runs them split;
    Bamba's config calls its Mamba-2 layers ``linear_attention``)."""
    if scans and getattr(config, "model_type", None) in SPLIT_MODEL_TYPES:
        return []
    return [SequenceMixer(f"layer {index}", entry, kind)
            for index, (entry, kind) in sorted(config_layer_kinds(config).items())]


def _family_prefix(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix in _FAMILY_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return ""


def _class_kind(module: nn.Module, prefix: str) -> str | None:
    if type(module).__module__.startswith("torch."):
        return None  # torch's own layers (Conv1d ...): the convolution check names their owner
    name = type(module).__name__
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]  # RecurrentGemmaAttention is attention, Mamba2Mixer a mixer
    if NOT_A_MIXER.search(name):
        return None
    return next((kind for pattern, kind in CLASS_PATTERNS if pattern.search(name)), None)


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's decoder layers: the first ModuleList as long as ``num_hidden_layers``, else the
    longest one."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module)]
    if not lists:
        return None
    exact = [item for item in lists if len(item[1]) == count]
    return exact[0] if exact else max(lists, key=lambda item: len(item[1]))


def _join(*names: str) -> str:
    return ".".join(name for name in names if name)


def _is_token_convolution(module: nn.Module) -> bool:
    return isinstance(module, _ConvNd) and any(size > 1 for size in module.kernel_size)


def _first_mixing_child(layer: nn.Module, prefix: str) -> tuple[str, nn.Module] | None:
    """The child of a decoder layer that mixes tokens when only the config says so: the first
    one that is not a norm, an MLP or a plain linear map."""
    for name, child in layer.named_children():
        if NOT_A_MIXER.search(type(child).__name__[len(prefix):]) or isinstance(
                child, (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity)):
            continue
        return name, child
    return None


def find_sequence_mixers(model: nn.Module) -> list[SequenceMixer]:
    """Every module of ``model`` (a transformers model) that mixes tokens along the sequence
    other than softmax attention, in module order; [] for an attention-only model."""
    prefix = _family_prefix(model)
    found: dict[str, SequenceMixer] = {}
    located = _decoder_layers(model)
    layers_path, layers = located if located is not None else ("", nn.ModuleList())
    layer_ids = {id(layer) for layer in layers}

    def covered(path: str) -> bool:
        return any(path == known or path.startswith(known + ".") for known in found)

    def overlaps(path: str) -> bool:
        return covered(path) or any(known.startswith(path + ".") for known in found)

    for path, module in model.named_modules():
        if module is model or id(module) in layer_ids or covered(path):
            continue  # the decoder layers themselves hold attention too: look inside them
        kind = _class_kind(module, prefix)
        if kind is not None:
            found[path] = SequenceMixer(path, type(module).__name__, kind)
    declared = config_layer_kinds(getattr(model, "config", None))
    for index, layer in enumerate(layers):
        layer_path = _join(layers_path, str(index))
        for child_name, child in layer.named_children():
            child_path = _join(layer_path, child_name)
            if overlaps(child_path):
                continue
            if _is_token_convolution(child) or any(
                    _is_token_convolution(m) for m in child.modules()):
                kind = declared.get(index, (None, CONVOLUTION))[1]
                found[child_path] = SequenceMixer(child_path, type(child).__name__, kind)
        inside = any(covered_path.startswith(layer_path + ".") for covered_path in found)
        if index in declared and not inside:
            entry, kind = declared[index]
            child = _first_mixing_child(layer, prefix)
            path, name = ((_join(layer_path, child[0]), type(child[1]).__name__)
                          if child is not None else (layer_path, type(layer).__name__))
            found[path] = SequenceMixer(path, f"{name}; {entry}", kind)
    if not layers and declared:  # no decoder layers to name them in
        return config_sequence_mixers(model.config)
    order = {path: position for position, (path, _) in enumerate(model.named_modules())}
    return sorted(found.values(), key=lambda mixer: order.get(mixer.path, len(order)))


def unsplit_mixers(model: nn.Module) -> list[SequenceMixer]:
    """:func:`find_sequence_mixers` of ``model`` but the mixers usp splits
    (``usp.integrations.hf_scan.SPLIT_MIXERS``), which run split once the model is prepared."""
    modules, prefix = dict(model.named_modules()), _family_prefix(model)
    return [mixer for mixer in find_sequence_mixers(model)
            if not (mixer.path in modules and _runs_split(modules[mixer.path], prefix))]


def _runs_split(module: nn.Module, prefix: str) -> bool:
    """Whether usp splits ``module``: a mixer of SPLIT_MIXERS, or a layer that only wraps one
    (Zamba2's Mamba decoder layer: a norm and the mixer), whose other children mix nothing."""
    if splits(module):
        return True
    children = list(module.children())
    return any(splits(child) for child in children) and all(
        splits(child) or (_class_kind(child, prefix) is None
                          and not any(_is_token_convolution(m) for m in child.modules()))
        for child in children)


def refusal(mixers: list[SequenceMixer], ring: int, ulysses: int) -> str | None:
    """The message that refuses a model with ``mixers`` on ring x ulysses, or None when it can
    run (no such layer, or a sequence that is not split)."""
    if not mixers or ring * ulysses == 1:
        return None
    first, rest = mixers[0], mixers[1:]
    also = ""
    if rest:
        shown = "; ".join(str(m.path) for m in rest[:3])
        more = f" and {len(rest) - 3} more" if len(rest) > 3 else ""
        also = f" (also {shown}{more})"
    return (
        f"{first} mixes tokens along the sequence{also}; usp splits softmax attention and the "
        f"scan layers {', '.join(SPLIT_MIXERS)} exactly, not this layer, so this model cannot "
        f"run sequence-parallel (ring*ulysses > 1; here ring={ring} x ulysses={ulysses}) yet: "
        "use ring=1 and ulysses=1 (data parallel only)"
    )


def check_sequence_mixers(mixers: list[SequenceMixer] | nn.Module, topology) -> None:
    """Raise ValueError naming the first layer that mixes tokens other than softmax attention
    (:func:`find_sequence_mixers` of a model, or its findings) when ``topology`` splits the
    sequence. Depends on the model only: every rank raises alike, before any collective."""
    if isinstance(mixers, nn.Module):
        mixers = find_sequence_mixers(mixers)
    message = refusal(mixers, topology.size("ring"), topology.size("ulysses"))
    if message is not None:
        raise ValueError(message)


class SplitRefusal:
    """A forward pre-hook (``with_kwargs=True``) for a model with sequence mixers, prepared on an
    unsplit sequence: refuses a ``usp_context`` that splits it before any layer runs."""

    def __init__(self, mixers: list[SequenceMixer]) -> None:
        self.mixers = mixers

    def __call__(self, module: nn.Module, args, kwargs) -> None:
        topology = getattr(kwargs.get("usp_context"), "topology", None)
        if topology is not None:
            check_sequence_mixers(self.mixers, topology)
