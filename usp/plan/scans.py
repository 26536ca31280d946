"""The scan layers of a hybrid model as the planner prices them: Mamba-2's SSD and the gated
delta rule (:mod:`usp.scan`), their shapes, work, traffic and saved tensors per token.

A hybrid's layers each mix tokens with softmax attention or with a scan (docs/hybrid.md); the
planner prices a layer as the average of its model's layers (:class:`usp.plan.specs.ModelSpec`),
so these functions give one scan layer's figures and the cost model weighs them by the share of
layers that scan. Names: ``H`` heads (value heads), ``P`` head dim (``Dv``), ``N`` state dim
(``Dk``), ``G`` groups (B/C groups, key heads), ``Q`` chunk, ``K`` convolution taps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from usp.choices import scan_ulysses

SCAN_KINDS = ("ssd", "delta")
FP32_BYTES = 4  # the scans accumulate, keep and pass their state in fp32


@dataclass(frozen=True)
class ScanSpec:
    """The scan mixers of a hybrid: ``layers`` of them, each of ``kind`` (``"ssd"``: Mamba-2;
    ``"delta"``: the gated delta rule) with ``heads`` x ``head_dim`` outputs, a ``state`` dim,
    ``groups`` (B/C groups or key heads), a ``conv_kernel``-tap causal convolution, scanned in
    chunks of ``chunk``; ``linear_params`` are the mixer's input and output projections and
    ``other_params`` its convolution, norm and per-head constants."""

    kind: str
    layers: int
    heads: int
    head_dim: int
    state: int
    groups: int
    conv_kernel: int = 4
    chunk: int = 64
    linear_params: int = 0
    other_params: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCAN_KINDS:
            raise ValueError(f"scan kind {self.kind!r}; choose one of {SCAN_KINDS}")
        for name in ("layers", "heads", "head_dim", "state", "groups", "conv_kernel", "chunk"):
            if not getattr(self, name) > 0:
                raise ValueError(f"scan: {name}={getattr(self, name)!r} must be positive")
        if self.heads % self.groups:
            raise ValueError(f"scan: heads={self.heads} are not a multiple of "
                             f"groups={self.groups}")

    @property
    def conv_channels(self) -> int:
        """What the convolution runs over: x, B and C (SSD); q, k and v (delta rule)."""
        return self.heads * self.head_dim + 2 * self.groups * self.state

    @property
    def state_elements(self) -> int:
        """One layer's recurrent state, every head: ``H x P x N``."""
        return self.heads * self.head_dim * self.state

    @property
    def forward_flops_per_token(self) -> float:
        """The scan's forward (its chunked form, every head) and the convolution, per token:
        SSD ``H (2Q(N + P) + 4NP)`` (C·Bᵀ and its product with x inside a chunk, the chunk's
        own state and the entering state's reach); the delta rule ``H (Q (6N + 4P + Q) +
        6NP)`` (the WY form's products and triangular solve, the intra-chunk attention, the
        walk's three state products)."""
        q, n, p = self.chunk, self.state, self.head_dim
        if self.kind == "ssd":
            scan = 2 * q * (n + p) + 4 * n * p
        else:
            scan = q * (6 * n + 4 * p + q) + 6 * n * p
        return self.heads * scan + 2 * self.conv_kernel * self.conv_channels

    @property
    def transition_flops_per_token(self) -> float:
        """What a block between the first and the last adds to pass the state on: nothing for
        SSD (a scalar per head); the delta rule's ``N x N`` map and its second walk, ``H (4N² +
        6NP)``."""
        if self.kind == "ssd":
            return 0.0
        return self.heads * (4 * self.state ** 2 + 6 * self.state * self.head_dim)


def scan_mode(scan: ScanSpec, ring: int, ulysses: int) -> str:
    """What ``usp.scan``'s ``ulysses="auto"`` runs on ``ring x ulysses`` ranks: ``"state"``
    (every head per rank, the state passed along every shard) or ``"heads"``."""
    return scan_ulysses("auto", ring * ulysses, matrix_transition=scan.kind == "delta")


@dataclass(frozen=True)
class ScanTraffic:
    """What one scan layer of one micro-batch sends per rank (bytes, one pass): the all-to-all
    of its inputs and of its output (``"heads"``), one state per link of the chain, and the
    convolution's halo; ``ring_links`` and ``ulysses_links`` are the chain's sequential hops
    over each kind of link, ``middle`` whether some block passes a state on (builds ``M``)."""

    all_to_all_inputs: float
    all_to_all_output: float
    state: float
    halo: float
    ring_links: int
    ulysses_links: int
    middle: bool


def scan_traffic(scan: ScanSpec, batch: int, tokens: int, element_bytes: int, ring: int,
                 ulysses: int) -> ScanTraffic:
    """The traffic of one layer on ``ring x ulysses`` ranks, each holding ``tokens`` tokens of
    each of ``batch`` sequences (``usp.scan``'s exchanges, docs/hybrid.md's table)."""
    mode = scan_mode(scan, ring, ulysses)
    h, p, n = scan.heads, scan.head_dim, scan.state
    inputs = output = 0.0
    if mode == "heads" and ulysses > 1:
        # x (or v) and dt (or g, beta) per head, and the groups each rank's heads read
        # (replicated when fewer groups than ranks); each rank keeps 1/U of what it holds
        groups = max(scan.groups, ulysses)
        share = (ulysses - 1) / ulysses
        inputs = share * batch * tokens * (h * p + 2 * h + 2 * groups * n) * element_bytes
        output = share * batch * tokens * h * p * element_bytes
    heads = h if mode == "state" else h // ulysses
    if mode == "state":
        ring_links, ulysses_links, blocks = ring - 1, ring * (ulysses - 1), ring * ulysses
    else:
        ring_links, ulysses_links, blocks = ring - 1, 0, ring
    halo = batch * scan.conv_channels * (scan.conv_kernel - 1) * element_bytes
    return ScanTraffic(
        all_to_all_inputs=inputs, all_to_all_output=output,
        state=batch * heads * p * n * FP32_BYTES if blocks > 1 else 0.0,
        halo=halo if ring * ulysses > 1 else 0.0,
        ring_links=ring_links, ulysses_links=ulysses_links, middle=blocks > 2)


@dataclass(frozen=True)
class ScanActivations:
    saved: float  # kept from the layer's forward to its backward
    working: float  # the extra of its backward: the fp32 internals' gradients


def scan_activations(scan: ScanSpec, batch: int, tokens: int,
                     element_bytes: int) -> ScanActivations:
    """Bytes one scan layer keeps for ``batch`` sequences of ``tokens`` tokens on a rank: the
    input projection's output, the convolution's output, the gated norm's input and output and
    the output projection's input (``element_bytes`` each), and what ``usp.scan`` keeps for its
    backward, per token and head in fp32 — counted with a saved-tensor hook
    (tests/test_plan_scans.py holds the count to it, within 5%): SSD ``5P + (4N + Q) G/H + 2Q
    + 2NP/Q + 4`` (x and its scaled copies, B and C once per group, the chunk's decays and
    scores, each chunk's state twice), the delta rule ``3N + 4P + 4Q + 2NP/Q + (8N + 2Q) G/H``
    (q and k once per key head, the rest per value head). The backward's extra is taken as the
    same internals again (their gradients)."""
    h, p, n, q, g = scan.heads, scan.head_dim, scan.state, scan.chunk, scan.groups
    projected = 2 * h * p + 2 * g * n + 2 * h
    per_token = element_bytes * (projected + scan.conv_channels + 3 * h * p)
    if scan.kind == "ssd":
        kept = 5 * p + (4 * n + q) * g / h + 2 * q + 2 * n * p / q + 4
    else:
        kept = 3 * n + 4 * p + 4 * q + 2 * n * p / q + (8 * n + 2 * q) * g / h
    internals = FP32_BYTES * h * kept
    return ScanActivations(saved=batch * tokens * (per_token + internals),
                           working=batch * tokens * internals)


# ---------------------------------------------------------------------------- configs
_PATTERN = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}  # Nemotron-H's old pattern


def _ssd_mixer(kind_layers: int, hidden: int, heads: int, head_dim: int, state: int, groups: int,
               kernel: int, chunk: int, proj_bias: bool, conv_bias: bool,
               out_bias: bool | None = None, gated_norm: bool = True) -> ScanSpec:
    """A Mamba-2 mixer: one input projection to z, x, B, C and dt, a convolution over x, B
    and C, the scan, a gated RMSNorm (or, without ``gated_norm``, a plain gate) and an output
    projection (with a bias when ``out_bias``; None: as the input projection)."""
    inner = heads * head_dim
    projected = 2 * inner + 2 * groups * state + heads
    channels = inner + 2 * groups * state
    out_bias = proj_bias if out_bias is None else out_bias
    linear = (hidden * projected + inner * hidden + (projected if proj_bias else 0)
              + (hidden if out_bias else 0))
    other = (channels * kernel + (channels if conv_bias else 0) + (inner if gated_norm else 0)
             + 3 * heads)
    return ScanSpec("ssd", kind_layers, heads, head_dim, state, groups, kernel, chunk,
                    linear, other)


def _bamba(config: dict) -> dict:
    layers = config["num_hidden_layers"]
    attention = len(set(config.get("attn_layer_indices") or []))
    return {"attention_layers": attention, "scan": _ssd_mixer(
        layers - attention, config["hidden_size"], config["mamba_n_heads"],
        config["mamba_d_head"], config["mamba_d_state"], config.get("mamba_n_groups", 1),
        config.get("mamba_d_conv", 4), config.get("mamba_chunk_size", 256),
        bool(config.get("mamba_proj_bias", False)), bool(config.get("mamba_conv_bias", True)))}


def _nemotron_h(config: dict) -> dict:
    types = config.get("layers_block_type")
    if types is None:
        types = [_PATTERN.get(char, char) for char in config["hybrid_override_pattern"]]
    types = ["mamba" if kind == "linear_attention" else
             "attention" if kind == "full_attention" else kind for kind in types]
    unknown = sorted(set(types) - {"mamba", "attention", "mlp"})
    if unknown:
        raise ValueError(f"layer types {unknown} (routed experts, or unknown): the planner "
                         f"prices Mamba-2, attention and dense MLP layers")
    relu2 = config.get("mlp_hidden_act", "relu2") == "relu2"
    return {"layers": len(types), "attention_layers": types.count("attention"),
            "mlp_layers": types.count("mlp"),
            "mlp_matrices": 2 if relu2 else 3, "norms": 1, "scan": _ssd_mixer(
                types.count("mamba"), config["hidden_size"], config["mamba_num_heads"],
                config["mamba_head_dim"], config["ssm_state_size"], config.get("n_groups", 1),
                config.get("conv_kernel", 4), config.get("chunk_size", 128),
                bool(config.get("use_bias", False)), bool(config.get("use_conv_bias", True)))}


def _gated_delta(config: dict, qwen_attention: bool = True) -> dict:
    """A gated-delta hybrid (Qwen3-Next, Qwen3.5, OLMo Hybrid): linear_attention or
    full_attention in each layer, then a dense MLP (routed experts refused). Qwen's attention
    (``qwen_attention``) gates its output by a second query-sized projection and norms each
    head's q and k; OLMo's has no gate and norms the whole q and k projections."""
    types = config["layer_types"]
    dense = set(config.get("mlp_only_layers") or [])
    if (config.get("num_experts") or 0) > 1 and set(range(len(types))) - dense:
        raise ValueError(f"routed experts (num_experts={config['num_experts']}) in layers "
                         f"outside mlp_only_layers: the planner prices dense MLP layers")
    hidden, value_heads = config["hidden_size"], config["linear_num_value_heads"]
    key_heads, key_dim = config["linear_num_key_heads"], config["linear_key_head_dim"]
    value_dim, kernel = config["linear_value_head_dim"], config.get("linear_conv_kernel_dim", 4)
    keys, values = key_heads * key_dim, value_heads * value_dim
    channels = 2 * keys + values
    # q, k, v, the output gate z, beta and a (the decay's input); the output projection
    linear = hidden * (2 * keys + 2 * values + 2 * value_heads) + values * hidden
    other = channels * kernel + value_dim + 2 * value_heads  # conv, norm, A_log and dt_bias
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_width = (config.get("num_key_value_heads") or heads) * head_dim
    norm_params = 2 * head_dim if qwen_attention else heads * head_dim + kv_width
    return {"attention_layers": types.count("full_attention"), "q_gate": qwen_attention,
            "attention_norm_params": norm_params,
            "scan": ScanSpec("delta", types.count("linear_attention"), value_heads, value_dim,
                             key_dim, key_heads, kernel, 64, linear, other)}


def _granite_4(config: dict) -> dict:
    """Granite 4 (GraniteMoeHybrid): Mamba-2 or attention in each layer, then a dense SwiGLU MLP
    of ``shared_intermediate_size`` (routed experts beside it refused)."""
    experts = config.get("num_local_experts") or 0
    if experts > 0:
        raise ValueError(f"routed experts (num_local_experts={experts}) beside the shared MLP: "
                         "the planner prices dense MLP layers")
    types = config["layer_types"]  # transformers builds a Mamba-2 mixer for linear_attention
    mamba = types.count("linear_attention")  # and attention for any other type
    head_dim = config["mamba_d_head"]
    if head_dim == "auto":  # as GraniteMoeHybridConfig resolves it
        head_dim = config.get("mamba_expand", 2) * config["hidden_size"] // config["mamba_n_heads"]
    return {"attention_layers": len(types) - mamba,
            "ffn_hidden": config["shared_intermediate_size"], "scan": _ssd_mixer(
                mamba, config["hidden_size"],
                config["mamba_n_heads"], head_dim, config["mamba_d_state"],
                config.get("mamba_n_groups", 1), config.get("mamba_d_conv", 4),
                config.get("mamba_chunk_size", 256), bool(config.get("mamba_proj_bias", False)),
                bool(config.get("mamba_conv_bias", True)))}


def _falcon_h1(config: dict) -> dict:
    """Falcon-H1: attention and a Mamba-2 mixer side by side in every layer, then a SwiGLU MLP;
    the mixer's gated norm only with ``mamba_rms_norm``."""
    layers = config["num_hidden_layers"]
    return {"attention_layers": layers, "scan": _ssd_mixer(
        layers, config["hidden_size"], config["mamba_n_heads"], config["mamba_d_head"],
        config["mamba_d_state"], config.get("mamba_n_groups", 1), config.get("mamba_d_conv", 4),
        config.get("mamba_chunk_size", 256), bool(config.get("mamba_proj_bias", False)),
        bool(config.get("mamba_conv_bias", True)),
        out_bias=bool(config.get("projectors_bias", False)),
        gated_norm=bool(config.get("mamba_rms_norm", False)))}


# the hybrids the planner prices, by model_type: their configs' layer kinds and mixer shapes
HYBRIDS = {"bamba": _bamba, "nemotron_h": _nemotron_h, "granitemoehybrid": _granite_4,
           "falcon_h1": _falcon_h1, "qwen3_next": _gated_delta, "qwen3_5_text": _gated_delta,
           "olmo_hybrid": partial(_gated_delta, qwen_attention=False)}


def hybrid_layers(model_type: str, config: dict) -> dict:
    """``usp.plan.specs.ModelSpec`` fields of a hybrid's config (``scan``, the layer counts);
    ValueError for a model type not in :data:`HYBRIDS`, a key it lacks, or routed experts in
    its layers (priced as one dense MLP they would be wrong)."""
    if model_type not in HYBRIDS:
        raise ValueError(f"the planner prices the scan layers of {sorted(HYBRIDS)} configs, "
                         f"not {model_type!r}")
    try:
        return HYBRIDS[model_type](config)
    except KeyError as exc:
        raise ValueError(f"a {model_type} config needs {exc.args[0]!r}") from None
