"""The scan layers of transformers' hybrid models, split exactly: Mamba-2 (SSD), Mamba-1 and
gated-delta mixers and short convolutions run on each rank's shard of the sequence through
``usp.scan``.

A hybrid (Bamba, Nemotron-H, Zamba2, Granite 4: Mamba-2 layers beside softmax attention;
Falcon-H1: a Mamba-2 mixer beside attention in every layer; Jamba: Mamba-1 layers; Qwen3-Next,
Qwen3.5, OLMo Hybrid: gated-delta layers; LFM2: short convolutions) mixes tokens in layers that
are not attention.
:meth:`usp.integrations.transformers.USPContext.prepare` replaces the forward of each mixer
this module knows (:data:`SPLIT_MIXERS`) with one that runs the layer's own parameters through
the same steps as transformers' PyTorch path (input projections, causal convolution, scan, gated
RMS norm, output projection) with the steps that mix tokens split: ``usp.scan.causal_conv``
(each rank's first taps read the previous rank's last tokens) and ``usp.scan.ssd_scan`` /
``usp.scan.selective_scan`` / ``usp.scan.gated_delta_scan`` as their ``ulysses="auto"`` runs
them (SSD's and Mamba-1's state passed along every shard, every head on each rank; the delta
rule's heads split over Ulysses beyond two shards, its state passed along the ring). Given a
``usp_context`` (the call's, or the one its decoder layer was called with) that does not split
the sequence, or none, the layer runs transformers' own forward. Packed documents
(``usp_documents``) restart the state and the convolution at every boundary, as the fused
kernels' ``seq_idx`` does; with ring > 1 the token layout must be ``contiguous``
(``docs/hybrid.md``). A KV or state cache is refused while the sequence is split; a generation
(``usp.infer.hf``) runs the layer whole on every rank.
"""

from __future__ import annotations

import functools
import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from usp.scan import causal_conv, gated_delta_scan, selective_scan, ssd_scan

# model types whose every layer that is neither attention nor an MLP (dense or experts) is one
# of SPLIT_MIXERS or holds one beside attention (their configs name those layers
# "linear_attention", "mamba" or, Falcon-H1's and Zamba2's, "hybrid")
SPLIT_MODEL_TYPES = ("bamba", "nemotron_h", "qwen3_next", "zamba2", "granitemoehybrid",
                     "falcon_h1", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
                     "olmo_hybrid", "lfm2", "lfm2_moe", "lfm3", "jamba")


def splits(module: nn.Module) -> bool:
    """Whether usp runs ``module`` (a sequence mixer) split over the sequence ranks."""
    return type(module).__name__ in SPLIT_MIXERS


def split_mixers(model: nn.Module) -> list[str]:
    """Replace the forward of every mixer of ``model`` that usp splits (in place; once); the
    names of those mixers. A mixer whose decoder layer does not pass its kwargs on (Jamba's)
    still reads the usp kwargs (:data:`LAYER_KWARGS`) of the calls that hold it: forward
    pre-hooks hand it those of the module that holds it (its decoder layer) and, beneath those,
    those of the model's own call; a recomputation (activation checkpointing) runs the layer's
    hook again."""
    names = []
    modules = dict(model.named_modules())
    for name, module in model.named_modules():
        if splits(module):
            if not hasattr(module, "_usp_own_forward"):
                module._usp_own_forward = module.forward
                module.forward = types.MethodType(SPLIT_MIXERS[type(module).__name__], module)
                holder = modules[name.rpartition(".")[0]]
                holder.register_forward_pre_hook(
                    functools.partial(_hand_kwargs, [module], "_usp_layer_kwargs"),
                    with_kwargs=True)
            names.append(name)
    previous = getattr(model, "_usp_model_kwargs_hook", None)
    if previous is not None:
        previous.remove()
    model._usp_model_kwargs_hook = model.register_forward_pre_hook(functools.partial(
        _hand_kwargs, [modules[name] for name in names], "_usp_model_kwargs"), with_kwargs=True)
    return names


# what a split mixer reads of the calls that hold it: the context, the documents, the packing
LAYER_KWARGS = ("usp_context", "usp_documents", "cu_seq_lens_q")


def _hand_kwargs(mixers: list[nn.Module], slot: str, holder: nn.Module, args, kwargs) -> None:
    given = {key: kwargs[key] for key in LAYER_KWARGS if key in kwargs}
    for mixer in mixers:
        setattr(mixer, slot, given)


def _given(self, kwargs: dict) -> dict:
    """The mixer's kwargs, over what its layer's call was given, over what the model's call
    was given (where a layer did not pass them on)."""
    return {**getattr(self, "_usp_model_kwargs", {}), **getattr(self, "_usp_layer_kwargs", {}),
            **kwargs}


def _split_topology(self, cache_params, kwargs):
    """The context's topology when it splits the sequence (None: run transformers' forward,
    also where the context holds the whole sequence on every rank, as a generation's does);
    a cache is refused while the sequence is split."""
    context = kwargs.get("usp_context")
    topology = getattr(context, "topology", None)
    if (topology is None or topology.sequence_size == 1
            or not getattr(context, "shards_hidden_states", True)):
        return None
    if cache_params is not None:
        raise ValueError(
            f"{type(self).__name__} with a cache (generation) while ring x ulysses = "
            f"{topology.sequence_size} ranks split the sequence: pass use_cache=False")
    return topology


def _where(kwargs) -> dict:
    """Where this rank's tokens sit in the sequence: the layout and the documents."""
    return dict(layout=kwargs["usp_context"].layout, documents=kwargs.get("usp_documents"),
                cu_seqlens=kwargs.get("cu_seq_lens_q"))


def _padding_zeroed(hidden: torch.Tensor, attention_mask) -> torch.Tensor:
    """transformers' zeroing of padding tokens before the mixer's two steps (a 2-D mask of this
    rank's tokens, 1 = token)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return hidden
    return (hidden * attention_mask[:, :, None]).to(hidden.dtype)


def split_forward(cache: str = "cache_params"):
    """A mixer's forward from its split steps ``steps(self, hidden_states, attention_mask,
    topology, given)``: they run when the context (the call's, or its layer's) splits the
    sequence; transformers' own forward runs otherwise, with the call's arguments. ``cache``:
    the name the mixer takes its cache by (a cache is refused while the sequence is split)."""
    def wrap(steps):
        @functools.wraps(steps)
        def forward(self, hidden_states: torch.Tensor, cache_given=None,
                    attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
            state = kwargs.pop(cache, cache_given)
            given = _given(self, kwargs)  # what the split steps read
            topology = _split_topology(self, state, given)
            if topology is None:
                return self._usp_own_forward(hidden_states, attention_mask=attention_mask,
                                             **{cache: state}, **kwargs)
            return steps(self, hidden_states, attention_mask, topology, given)
        return forward
    return wrap


@split_forward()
def ssd_mixer_forward(self, hidden_states: torch.Tensor, attention_mask, topology,
                      given: dict) -> torch.Tensor:
    """A Mamba-2 mixer's forward on this rank's shard ``[B, S_local, hidden]`` (module
    docstring); transformers' own forward when the sequence is not split."""
    projected = self.in_proj(_padding_zeroed(hidden_states, attention_mask))
    scanned, gate = _ssd_steps(self, projected, attention_mask, topology, given)
    return self.out_proj(self.norm(scanned, gate).to(hidden_states.dtype))


@split_forward()
def falcon_h1_mixer_forward(self, hidden_states: torch.Tensor, attention_mask, topology,
                            given: dict) -> torch.Tensor:
    """Falcon-H1's Mamba-2 mixer (``FalconH1Mixer``) on this rank's shard: Bamba's steps with
    its multipliers (``ssm_in_multiplier`` on the input, ``mup_vector`` on the projection) and
    its gate (the gated norm when ``mamba_rms_norm``, else the scan's output times
    ``silu(gate)``), as transformers' PyTorch path runs them."""
    scaled = _padding_zeroed(hidden_states, attention_mask) * self.ssm_in_multiplier
    projected = self.in_proj(scaled) * self.mup_vector
    scanned, gate = _ssd_steps(self, projected, attention_mask, topology, given)
    out = self.norm(scanned, gate) if self.mamba_rms_norm else scanned * F.silu(gate)
    return self.out_proj(out.to(hidden_states.dtype))


@split_forward()
def mamba1_mixer_forward(self, hidden_states: torch.Tensor, attention_mask, topology,
                         given: dict) -> torch.Tensor:
    """Jamba's Mamba-1 mixer (``JambaMambaMixer``) on this rank's shard: the input projection,
    the split causal convolution, padding zeroed, the selective projections with Jamba's norms
    on ``dt``, ``B`` and ``C``, :func:`usp.scan.selective_scan` gated by ``silu(z)``, the output
    projection, as transformers' PyTorch path runs them."""
    where = _where(given)
    projected = self.in_proj(_padding_zeroed(hidden_states, attention_mask)).transpose(1, 2)
    x, gate = projected.chunk(2, dim=1)  # [B, D, S_local] each
    x = causal_conv(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, topology,
                    activation=self.activation, **where)
    x = _padding_zeroed(x.transpose(1, 2), attention_mask)  # [B, S_local, D]
    step, b, c = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size,
                                              self.ssm_state_size], dim=-1)
    step = self.dt_proj.weight @ self.dt_layernorm(step).transpose(1, 2)  # [B, D, S_local]
    bias = self.dt_proj.bias.float() if self.dt_proj.bias is not None else None
    y = selective_scan(x.transpose(1, 2), step, -torch.exp(self.A_log.float()),
                       self.b_layernorm(b).transpose(1, 2), self.c_layernorm(c).transpose(1, 2),
                       topology, D=self.D.float(), z=gate, dt_bias=bias, dt_softplus=True,
                       **where)
    return self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))


def _ssd_steps(self, projected: torch.Tensor, attention_mask, topology,
               given) -> tuple[torch.Tensor, torch.Tensor]:
    """The steps of a Mamba-2 mixer between its input projection ``projected``
    ``[B, S_local, gate + conv channels + heads]`` and its gate: the split causal convolution,
    padding zeroed, the split scan; ``(scan output [B, S_local, heads x head dim], gate)``."""
    batch, length, _ = projected.shape
    where = _where(given)
    gate, mixed, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads],
                                      dim=-1)
    # [B, S_local, channels] -> [B, channels, S_local], as transformers' causal_conv1d_fn
    mixed = causal_conv(mixed.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                        topology, activation=self.activation, **where).transpose(1, 2)
    mixed = _padding_zeroed(mixed, attention_mask)
    groups = self.n_groups * self.ssm_state_size
    x, b, c = torch.split(mixed, [self.intermediate_size, groups, groups], dim=-1)
    scanned = ssd_scan(
        x.reshape(batch, length, self.num_heads, self.head_dim), dt,
        -torch.exp(self.A_log.float()),
        b.reshape(batch, length, self.n_groups, self.ssm_state_size),
        c.reshape(batch, length, self.n_groups, self.ssm_state_size), topology,
        chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
        dt_limit=(tuple(self.time_step_limit) if self.time_step_limit is not None
                  else (0.0, math.inf)), **where,
    )
    return scanned.reshape(batch, length, -1), gate


@split_forward()
def delta_mixer_forward(self, hidden_states: torch.Tensor, attention_mask, topology,
                        given: dict) -> torch.Tensor:
    """A gated-delta mixer's forward (Qwen3-Next's, Qwen3.5's, OLMo Hybrid's: their inputs
    read by :data:`DELTA_INPUTS`) on this rank's shard ``[B, S_local, hidden]`` (module
    docstring); transformers' own forward when the sequence is not split."""
    where = _where(given)
    hidden_states = _padding_zeroed(hidden_states, attention_mask)
    inputs, norm, out_proj = DELTA_INPUTS[type(self).__name__]
    mixed, gate, beta, a = inputs(self, hidden_states)
    batch, length, _ = mixed.shape
    mixed = causal_conv(mixed.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                        topology, activation=self.activation, **where).transpose(1, 2)
    query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    out = gated_delta_scan(
        query.reshape(batch, length, -1, self.head_k_dim),
        key.reshape(batch, length, -1, self.head_k_dim),
        value.reshape(batch, length, -1, self.head_v_dim),
        -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias), beta, topology,
        use_qk_l2norm=True, **where,
    )
    out = getattr(self, norm)(out.reshape(-1, out.shape[-1]), gate.reshape(-1, out.shape[-1]))
    return getattr(self, out_proj)(out.reshape(batch, length, -1))


@split_forward(cache="past_key_values")
def short_conv_forward(self, hidden_states: torch.Tensor, attention_mask, topology,
                       given: dict) -> torch.Tensor:
    """LFM2's short convolution (``Lfm2ShortConv``: ``C ⊙ conv(B ⊙ x)`` between an input and an
    output projection) on this rank's shard, the convolution split (its first taps read the
    previous rank's last tokens); transformers' own forward when the sequence is not split."""
    projected = self.in_proj(_padding_zeroed(hidden_states, attention_mask)).transpose(-1, -2)
    b, c, x = projected.chunk(3, dim=-2)  # [B, hidden, S_local] each
    mixed = causal_conv(b * x, self.conv.weight.squeeze(1), self.conv.bias, topology,
                        **_where(given))
    return self.out_proj((c * mixed).transpose(-1, -2).contiguous())


def _qwen3_next_inputs(self, hidden: torch.Tensor):
    """Qwen3-Next's two fused projections, in its grouped order: ``(q k v [B, S, 2K + V],
    gate, beta, a)``."""
    query, key, value, z, b, a = self.fix_query_key_value_ordering(
        self.in_proj_qkvz(hidden), self.in_proj_ba(hidden))
    batch, length = query.shape[:2]
    mixed = torch.cat([x.reshape(batch, length, -1) for x in (query, key, value)], dim=-1)
    return mixed, z, b.sigmoid(), a


def _qwen3_5_inputs(self, hidden: torch.Tensor):
    """Qwen3.5's projections: q, k and v in one, the gate, beta and a apart."""
    return (self.in_proj_qkv(hidden), self.in_proj_z(hidden), self.in_proj_b(hidden).sigmoid(),
            self.in_proj_a(hidden))


def _olmo_hybrid_inputs(self, hidden: torch.Tensor):
    """OLMo Hybrid's projections, one per input; beta in (0, 2) when the layer allows negative
    eigenvalues."""
    mixed = torch.cat([self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)], dim=-1)
    beta = self.b_proj(hidden).sigmoid()
    if self.allow_neg_eigval:
        beta = beta * 2.0
    return mixed, self.g_proj(hidden), beta, self.a_proj(hidden)


# gated-delta mixer class -> (its inputs: q k v side by side, the output gate, beta and the
# decay's input a, as transformers' forward computes them; its gated norm; its output
# projection). Between those every one runs the same steps
DELTA_INPUTS = {
    "Qwen3NextGatedDeltaNet": (_qwen3_next_inputs, "norm", "out_proj"),
    "Qwen3_5GatedDeltaNet": (_qwen3_5_inputs, "norm", "out_proj"),
    "Qwen3_5MoeGatedDeltaNet": (_qwen3_5_inputs, "norm", "out_proj"),
    "OlmoHybridGatedDeltaNet": (_olmo_hybrid_inputs, "o_norm", "o_proj"),
}


# mixer class -> the forward that runs it split. Each is transformers' PyTorch path of its layer,
# read off these attributes: Mamba-2 (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj,
# intermediate_size, conv_dim, num_heads, head_dim, n_groups, ssm_state_size, chunk_size,
# time_step_limit, activation); gated delta (its inputs per DELTA_INPUTS, conv1d, key_dim,
# value_dim, head_k_dim, head_v_dim, A_log, dt_bias, its norm and output projection, activation)
# Nemotron-H's, Zamba2's and Granite 4's (GraniteMoeHybrid) Mamba-2 mixers run the same steps as
# Bamba's (transformers' forwards are line for line the same; a norm gated per group is the
# layer's own norm module's business); Falcon-H1's adds multipliers and an optional norm
# (ssm_in_multiplier, mup_vector, mamba_rms_norm)
SPLIT_MIXERS = {"BambaMixer": ssd_mixer_forward, "NemotronHMamba2Mixer": ssd_mixer_forward,
                "Zamba2MambaMixer": ssd_mixer_forward,
                "GraniteMoeHybridMambaLayer": ssd_mixer_forward,
                "FalconH1Mixer": falcon_h1_mixer_forward,
                "JambaMambaMixer": mamba1_mixer_forward,
                **{name: short_conv_forward for name in (
                    "Lfm2ShortConv", "Lfm2MoeShortConv", "Lfm3ShortConv")},
                **{name: delta_mixer_forward for name in DELTA_INPUTS}}
