"""State-space layers of transformers' hybrid models, split exactly: Mamba-2 (SSD) mixers run
on each rank's shard of the sequence through ``usp.scan``.

A hybrid (Bamba: Mamba-2 layers beside softmax attention) mixes tokens in layers that are not
attention. :meth:`usp.integrations.transformers.USPContext.prepare` replaces the forward of each
mixer this module knows (:data:`SPLIT_MIXERS`) with :func:`ssd_mixer_forward`, which runs the
layer's own parameters through the same steps as transformers' PyTorch path (input projection,
causal convolution, SSD scan, gated RMS norm, output projection) with the two steps that mix
tokens split: ``usp.scan.causal_conv`` (each rank's first taps read the previous rank's last
tokens) and ``usp.scan.ssd_scan`` (Ulysses over heads, the state entering each ring block passed
along the ring). Given a ``usp_context`` that does not split the sequence, or none, the layer
runs transformers' own forward. Packed documents (``usp_documents``) restart the state and the
convolution at every boundary, as the fused kernels' ``seq_idx`` does; with ring > 1 the token
layout must be ``contiguous`` (``docs/hybrid.md``). A KV or state cache (generation) is refused
while the sequence is split.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn

from usp.scan import causal_conv, ssd_scan

# mixer classes whose forward is transformers' Mamba-2 PyTorch path with these attributes:
# in_proj, conv1d, dt_bias, A_log, D, norm (gated RMS), out_proj, intermediate_size, conv_dim,
# num_heads, head_dim, n_groups, ssm_state_size, chunk_size, time_step_limit, activation
SPLIT_MIXERS = ("BambaMixer",)
# model types whose every state-space layer is one of them (their configs may name such layers)
SPLIT_MODEL_TYPES = ("bamba",)


def splits(module: nn.Module) -> bool:
    """Whether usp runs ``module`` (a sequence mixer) split over the sequence ranks."""
    return type(module).__name__ in SPLIT_MIXERS


def split_mixers(model: nn.Module) -> list[str]:
    """Replace the forward of every mixer of ``model`` that usp splits (in place; once); the
    names of those mixers."""
    names = []
    for name, module in model.named_modules():
        if splits(module):
            if not hasattr(module, "_usp_own_forward"):
                module._usp_own_forward = module.forward
                module.forward = types.MethodType(ssd_mixer_forward, module)
            names.append(name)
    return names


def _padding_zeroed(hidden: torch.Tensor, attention_mask) -> torch.Tensor:
    """transformers' zeroing of padding tokens before the mixer's two steps (a 2-D mask of this
    rank's tokens, 1 = token)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return hidden
    return (hidden * attention_mask[:, :, None]).to(hidden.dtype)


def ssd_mixer_forward(self, hidden_states: torch.Tensor, cache_params=None,
                      attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """A Mamba-2 mixer's forward on this rank's shard ``[B, S_local, hidden]`` (module
    docstring); transformers' own forward when the sequence is not split."""
    context = kwargs.get("usp_context")
    topology = getattr(context, "topology", None)
    if topology is None or topology.sequence_size == 1:
        return self._usp_own_forward(hidden_states, cache_params=cache_params,
                                     attention_mask=attention_mask, **kwargs)
    if cache_params is not None:
        raise ValueError(
            f"{type(self).__name__} with a cache (generation) while ring x ulysses = "
            f"{topology.sequence_size} ranks split the sequence: pass use_cache=False")
    batch, length, _ = hidden_states.shape
    dtype = hidden_states.dtype
    documents, layout = kwargs.get("usp_documents"), context.layout
    where = dict(layout=layout, documents=documents, cu_seqlens=kwargs.get("cu_seq_lens_q"))
    projected = self.in_proj(_padding_zeroed(hidden_states, attention_mask))
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
    out = self.norm(scanned.reshape(batch, length, -1), gate)
    return self.out_proj(out.to(dtype))
