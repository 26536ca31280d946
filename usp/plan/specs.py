"""What the planner reasons about: a model's shapes, a cluster's hardware, one training workload.

All three are frozen dataclasses with validated fields; presets live in :mod:`usp.plan.presets`.
Units: bandwidths in GB/s (1e9 bytes per second, one direction, per GPU), latency in microseconds,
memory in GiB (2**30 bytes, the unit GPU memory is sold in), throughput in TFLOPS (1e12 per second).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from usp.plan.scans import HYBRIDS, ScanSpec, hybrid_layers

GIB = 2**30


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{owner}: {name}={value!r} must be positive")


# config keys of the layers that are not softmax attention and a dense MLP: state-space and
# linear-attention mixers (Mamba, Mamba-2 / SSD, the gated delta rule) and routed experts
_SCAN_KEYS = ("attn_layer_indices", "layers_block_type", "hybrid_override_pattern",
              "attn_layer_period")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def _layer_kinds(path: Path, config: dict) -> dict:
    """The ``ModelSpec`` fields of a hybrid's scan layers (empty for an attention-only
    decoder); ValueError for a config whose layers the cost model would price wrongly: routed
    experts (priced as one dense MLP they are not), or scan layers of a hybrid it does not know
    (:data:`usp.plan.scans.HYBRIDS`)."""
    kinds = sorted(set(config.get("layer_types") or []) - {"full_attention", "sliding_attention"})
    scan = kinds or [key for key in _SCAN_KEYS if key in config] or [
        key for key in config if key.startswith(("mamba_", "ssm_", "linear_num_"))]
    experts = [key for key in _EXPERT_KEYS if (config.get(key) or 0) > 1]
    if experts and not (scan and config.get("model_type") in HYBRIDS):  # those say it per layer
        raise ValueError(
            f"{path} describes a mixture of experts ({experts[0]}={config[experts[0]]}); the "
            "planner prices one dense MLP of intermediate_size per layer, not routed experts "
            "(docs/planner.md)")
    if not scan:
        return {}
    try:
        return hybrid_layers(config.get("model_type", ""), config)
    except ValueError as exc:
        raise ValueError(
            f"{path} describes a model with state-space or linear-attention layers ({scan[0]} "
            f"in its config): {exc} (docs/planner.md); plan it by its attention layers' shape "
            f"in a config of its own, or measure it") from None


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style decoder: RMSNorm, GQA attention with RoPE, SwiGLU MLP, untied or tied head.

    A hybrid (:mod:`usp.plan.scans`) mixes tokens with a ``scan`` in ``scan.layers`` of its
    layers and with attention in ``attention_layers`` (None: every layer); ``mlp_layers`` of
    them (None: every layer) carry an MLP of ``mlp_matrices`` matrices (3: SwiGLU's gate, up and
    down; 2: an up and a down, as Nemotron-H's ReLU²). The cost model prices a layer as the
    average of the model's layers, each figure weighed by the share of layers that have it."""

    name: str
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    attention_layers: int | None = None
    mlp_layers: int | None = None
    mlp_matrices: int = 3
    scan: ScanSpec | None = None
    norms: int = 2  # RMSNorm scales per layer (Nemotron-H's one-block layers hold one)
    q_gate: bool = False  # attention output gated by a query-sized projection (Qwen3-Next's)
    attention_norm_params: int = 0  # an attention layer's q/k norm scales

    def __post_init__(self) -> None:
        _check_positive(
            f"model {self.name!r}",
            layers=self.layers, hidden=self.hidden, q_heads=self.q_heads,
            kv_heads=self.kv_heads, head_dim=self.head_dim, ffn_hidden=self.ffn_hidden,
            vocab=self.vocab,
        )
        # a layer holds attention, a scan, or both side by side (Falcon-H1), and an MLP or none
        scans = self.scan.layers if self.scan else 0
        if not (0 <= self.attention_count <= self.layers and 0 <= self.mlp_count <= self.layers
                and 0 <= scans <= self.layers and self.attention_count + scans >= 1):
            raise ValueError(
                f"model {self.name!r}: {self.attention_count} attention, "
                f"{self.scan.layers if self.scan else 0} scan and {self.mlp_count} MLP layers "
                f"do not fit {self.layers} layers")
        if self.q_heads % self.kv_heads:
            raise ValueError(
                f"model {self.name!r}: q_heads={self.q_heads} is not a multiple of "
                f"kv_heads={self.kv_heads}; grouped-query attention needs whole groups"
            )

    @property
    def attention_linear_params(self) -> int:
        """Weights of the q, k, v and output projections of one layer (biases and an output
        gate's projection included)."""
        q_width, kv_width = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        bias = (q_width + 2 * kv_width) if self.qkv_bias else 0
        gate = self.hidden * q_width if self.q_gate else 0
        return self.hidden * (2 * q_width + 2 * kv_width) + gate + bias

    @property
    def mlp_linear_params(self) -> int:
        """Gate, up and down projections of the SwiGLU MLP of one layer (up and down for a
        two-matrix MLP)."""
        return self.mlp_matrices * self.hidden * self.ffn_hidden

    @property
    def attention_count(self) -> int:
        """Layers that mix tokens with softmax attention."""
        return self.layers if self.attention_layers is None else self.attention_layers

    @property
    def mlp_count(self) -> int:
        return self.layers if self.mlp_layers is None else self.mlp_layers

    @property
    def shares(self) -> tuple[float, float, float]:
        """The shares of the layers that hold attention, a scan and an MLP."""
        scans = self.scan.layers if self.scan else 0
        return (self.attention_count / self.layers, scans / self.layers,
                self.mlp_count / self.layers)

    @property
    def linear_params_per_layer(self) -> float:
        """The linear weights of the average layer: attention's, a scan's and an MLP's, each
        weighed by the share of layers that hold it."""
        if self.scan is None and self.attention_layers is None and self.mlp_layers is None:
            return self.attention_linear_params + self.mlp_linear_params
        attention, scan, mlp = self.shares
        return (attention * self.attention_linear_params + mlp * self.mlp_linear_params
                + (scan * self.scan.linear_params if self.scan else 0.0))

    @property
    def layer_params(self) -> float:
        """Everything in the average decoder layer: the linear weights plus its RMSNorm scales
        (and a scan's convolution, norm and per-head constants)."""
        other = self.shares[1] * self.scan.other_params if self.scan else 0.0
        other += self.shares[0] * self.attention_norm_params
        return self.linear_params_per_layer + other + self.norms * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layers * self.layer_params + self.embedding_params + head + self.hidden

    @classmethod
    def from_llama_config(cls, name: str, config) -> "ModelSpec":
        """The shapes of a :class:`usp.models.llama.LlamaConfig`."""
        return cls(name, layers=config.n_layers, hidden=config.dim, q_heads=config.n_heads,
                   kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                   ffn_hidden=config.ffn_dim, vocab=config.vocab_size,
                   tied_embeddings=config.tie_embeddings)

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelSpec":
        """Read a Hugging Face ``config.json`` of a Llama/Mistral/Qwen2-style model, or of a
        hybrid :data:`usp.plan.scans.HYBRIDS` knows (Bamba, Nemotron-H, Qwen3-Next)."""
        path = Path(path)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read a model config from {path}: {exc}") from exc
        layers = _layer_kinds(path, config)  # a hybrid or MoE named as such, whatever keys
        if "layers" in layers:  # a hybrid that counts its layers by their kinds
            config = {**config, "num_hidden_layers": layers.pop("layers")}
        if "ffn_hidden" in layers:  # a hybrid whose dense MLP has a size of its own
            config = {**config, "intermediate_size": layers.pop("ffn_hidden")}
        missing = [
            key
            for key in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                        "intermediate_size", "vocab_size")
            if key not in config
        ]
        if missing:
            raise ValueError(f"{path} lacks {missing}; is it a decoder-only LLM config.json?")
        q_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // q_heads
        return cls(
            name=config.get("_name_or_path") or path.parent.name or path.stem,
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            q_heads=q_heads,
            kv_heads=config.get("num_key_value_heads") or q_heads,
            head_dim=head_dim,
            ffn_hidden=config["intermediate_size"],
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always carries q/k/v biases; Llama exposes the switch as attention_bias.
            qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            **layers,
        )


@dataclass(frozen=True)
class ClusterSpec:
    """Homogeneous nodes of identical accelerators.

    ``matmul_efficiency`` and ``attention_efficiency`` are the fractions of ``peak_tflops`` that
    large GEMMs and the fused attention kernel (forward + backward) reach in practice.
    ``reserved_gib`` is memory the step can never use (the CUDA context, communicator buffers).
    ``headroom`` is the fraction of ``memory_gib`` a plan leaves free on top of that: the
    caching allocator's fragmentation, kernel workspaces and what the memory model leaves out;
    a configuration fits when its predicted peak is at most :attr:`usable_bytes`, memory minus
    both. ``cores_per_node`` (CPU clusters; 0: every rank has its own
    accelerator) is the cores a node's ranks share: see :attr:`oversubscription`. ``sync_us``
    (CPU clusters; 0 elsewhere) is what one collective call adds inside a step beyond its
    latency: every peer must be running to take part, and ranks that share cores are not all
    running at once. ``attention_overhead_keys`` is the fixed work of each query row in one
    attention kernel call (loading its tile, the softmax epilogue, writing the output), counted
    in keys: a call whose rows meet ``k`` keys on average runs at ``k / (k + this)`` of the rate
    ``attention_efficiency`` gives long calls (0: every call runs at that rate). ``launch_us``
    is the host's time to launch one device operation from eager PyTorch: a stretch of work
    made of many short operations (a ring step of a short block) lasts at least that many
    launches (0: the host is never the bottleneck; CPU ranks pay their dispatch in their
    compute).
    """

    name: str
    nodes: int
    gpus_per_node: int
    peak_tflops: float
    memory_gib: float
    intra_bandwidth_gbs: float
    inter_bandwidth_gbs: float
    intra_latency_us: float
    inter_latency_us: float
    hbm_bandwidth_gbs: float
    matmul_efficiency: float
    attention_efficiency: float
    reserved_gib: float
    headroom: float = 0.1
    cores_per_node: float = 0.0
    sync_us: float = 0.0
    attention_overhead_keys: float = 0.0
    launch_us: float = 0.0

    def __post_init__(self) -> None:
        numeric = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}
        reserved, headroom = numeric.pop("reserved_gib"), numeric.pop("headroom")
        for name in ("cores_per_node", "sync_us", "attention_overhead_keys", "launch_us"):
            if numeric.pop(name) < 0:
                raise ValueError(f"cluster {self.name!r}: {name}={getattr(self, name)} < 0")
        _check_positive(f"cluster {self.name!r}", **numeric)
        for name in ("matmul_efficiency", "attention_efficiency"):
            if getattr(self, name) > 1:
                raise ValueError(f"cluster {self.name!r}: {name}={getattr(self, name)} exceeds 1")
        if not 0 <= reserved < self.memory_gib:
            raise ValueError(
                f"cluster {self.name!r}: reserved_gib={reserved} must lie in [0, {self.memory_gib})"
            )
        if not 0 <= headroom < 1 or reserved + headroom * self.memory_gib >= self.memory_gib:
            raise ValueError(
                f"cluster {self.name!r}: headroom={headroom} must lie in [0, 1) and leave memory "
                f"beside reserved_gib={reserved} of {self.memory_gib} GiB"
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def oversubscription(self) -> float:
        """Ranks per core on a node, when above 1 (else 1): each rank then computes at
        ``1 / oversubscription`` of its rate, and no transfer hides under compute — moving bytes
        through gloo is work for the same cores, and a rank that waits gives its core to another
        rank's compute rather than overlapping its own."""
        if not self.cores_per_node:
            return 1.0
        return max(1.0, min(self.gpus_per_node, self.world_size) / self.cores_per_node)

    @property
    def headroom_gib(self) -> float:
        return self.headroom * self.memory_gib

    @property
    def usable_bytes(self) -> float:
        """What a step may use: memory minus the reserved GiB and the headroom."""
        return (self.memory_gib - self.reserved_gib - self.headroom_gib) * GIB

    def budget(self) -> str:
        """The usable memory in words: ``80 GiB - 4 reserved - 8.0 headroom (10%) = 68.0 GiB``."""
        return (f"{self.memory_gib:g} GiB - {self.reserved_gib:g} reserved - "
                f"{self.headroom_gib:.1f} headroom ({100 * self.headroom:g}%) = "
                f"{self.usable_bytes / GIB:.1f} GiB")


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each model state, and of one activation element."""

    param: int
    grad: int
    optimizer: int  # AdamW: two fp32 moments, plus the fp32 master weights under mixed precision
    activation: int


PRECISIONS = {
    # ``usp train --dtype`` (the run spec's ``dtype``) -> bytes per parameter and activation.
    # bf16: bf16 weights and gradients, fp32 master + moments (the ZeRO paper's accounting of
    # mixed precision): GPUs
    "bf16": Precision(param=2, grad=2, optimizer=12, activation=2),
    # everything fp32, AdamW's two moments: the CPU runs
    "fp32": Precision(param=4, grad=4, optimizer=8, activation=4),
}


@dataclass(frozen=True)
class Workload:
    """One optimizer step: ``global_batch`` sequences of ``seq_len`` tokens in ``dtype`` (a key
    of ``PRECISIONS``, ``usp train``'s ``--dtype``)."""

    model: ModelSpec
    seq_len: int
    global_batch: int
    causal: bool = True
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        _check_positive("workload", seq_len=self.seq_len, global_batch=self.global_batch)
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {sorted(PRECISIONS)}")

    @property
    def bytes(self) -> Precision:
        return PRECISIONS[self.dtype]

    @property
    def element_bytes(self) -> int:
        """Width of an activation element (2 for bf16)."""
        return self.bytes.activation

    @property
    def tokens(self) -> int:
        return self.seq_len * self.global_batch


def parse_count(text: str | int) -> int:
    """``"208k"`` -> 212992 (k = 1024, m = 1024**2, as sequence lengths are quoted); ``"4096"``."""
    if isinstance(text, int):
        return text
    cleaned = text.strip().lower()
    scale = {"k": 1024, "m": 1024**2}.get(cleaned[-1:], 1)
    digits = cleaned[:-1] if scale > 1 else cleaned
    try:
        value = float(digits) * scale
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a count; write e.g. 4096, 32k or 1m") from None
    if value != int(value) or value <= 0:
        raise ValueError(f"{text!r} is not a positive whole number of tokens")
    return int(value)
