"""A plain single-device Llama: RMSNorm, RoPE on explicit global positions, GQA, SwiGLU.

The model knows nothing of parallelism. Two things make it easy to parallelise afterwards
(``usp.parallelize``):

- RoPE takes the **global** position of every token (``position_ids``), so a rank that holds a
  zigzag shard of the sequence rotates its tokens exactly as the full model would.
- Attention goes through ``Attention.attention_fn(q, k, v)`` on ``[B, S, H, D]`` tensors, a plain
  causal attention by default, swapped for ``usp_attention`` by ``parallelize``. The attention reads
  its head counts off the projections' actual output sizes, so column-wise tensor parallelism (which
  gives each rank ``H / tp`` heads) needs no change here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from usp.models import init
from usp.models.counts import training_flops_per_token
from usp.models.family import ModelSettings
from usp.models.llama.presets import LlamaConfig, get_config


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     documents: torch.Tensor | None = None) -> torch.Tensor:
    """Single-device causal attention with GQA: ``[B, S, Hq, D], [B, S, Hkv, D] -> [B, S, Hq, D]``.

    Query head ``j`` reads KV head ``j // (Hq / Hkv)``, as in ``usp_attention``. ``documents``
    ``[B or 1, S]``: packed documents (an id per token); attention stays inside each, and a
    token with id -1 (no token) sees only itself.
    """
    mask = None
    if documents is not None:
        ids = documents.to(q.device)
        same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
        same |= torch.eye(ids.shape[1], dtype=torch.bool, device=q.device)
        mask = (same & torch.ones_like(same[0]).tril())[:, None]  # [B, 1, S, S]
    # [B, S, H, D] -> [B, H, S, D], the layout SDPA expects
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=mask is None, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles for explicit positions: ``[B, S] -> 2 x [B, S, 1, D/2]``."""
    # angles in fp64: positions up to 1e6 times frequencies keep their digits before the cast
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float64)
    inv_freq = theta ** (-exponents / head_dim)
    angles = position_ids.to(torch.float64)[..., None] * inv_freq  # [B, S, D/2]
    return angles.cos().to(dtype)[:, :, None, :], angles.sin().to(dtype)[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs ``(x[2i], x[2i+1])`` by the angle of their token (Meta's layout)."""
    pairs = x.unflatten(-1, (-1, 2))  # [B, S, H, D] -> [B, S, H, D/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)  # [B, S, H, D/2, 2] -> [B, S, H, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.attention_fn = causal_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq = x.shape[0], x.shape[1]
        # Head counts come from the projections' outputs: H here is H / tp under tensor parallelism.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)  # [B, S, H*D] -> [B, S, H, D]
        k = self.wk(x).view(batch, seq, -1, self.head_dim)  # [B, S, Hkv*D] -> [B, S, Hkv, D]
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attention_fn(q, k, v, documents=documents)  # [B, S, H, D]
        return self.wo(out.reshape(batch, seq, -1))  # [B, S, H, D] -> [B, S, H*D] -> [B, S, dim]


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``; w1 is the gate, w3 the up and w2 the down projection."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, documents)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    family = "llama"  # its entry in usp.models.registry (usp.models.llama.family)

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        # keyed by the layer's index, so a pipeline stage that keeps some layers keeps their names
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config) for i in range(config.n_layers)})
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights(seed=0)

    @property
    def hidden_size(self) -> int:
        """The residual stream's width (what pipeline stages exchange)."""
        return self.config.dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                documents: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """``input_ids, position_ids [B, S] -> logits [B, S, vocab]`` (at least fp32).

        ``position_ids`` are the tokens' positions; with a sharded sequence they are this
        rank's (non-contiguous, under zigzag) positions, from ``usp.batch.shard_batch``.
        ``documents``: packed documents of the global sequence (``shard_batch``'s), or None.

        A model whose ``tok_embeddings`` is None takes hidden states ``[B, S, dim]`` instead of
        ids, and one whose ``norm`` and ``output`` are None returns them (a pipeline stage).
        ``return_hidden``: the final norm's output ``[B, S, dim]`` instead of the logits, for a
        loss that applies the output projection itself (``usp.losses``, chunked).
        """
        hidden = self.hidden_states(input_ids, position_ids, documents)
        if return_hidden:
            return self.norm(hidden) if self.norm is not None else hidden
        return self.logits(hidden)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      documents: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the last block: ``[B, S] -> [B, S, dim]`` (before the final
        norm). With :meth:`logits` it is :meth:`forward`, split so that generation can take the
        logits of the rows it needs only."""
        # ids must match their positions; a stage's hidden states may hold S / tp of the tokens
        # (sequence-parallel TP), so only their batch is checked
        takes_ids = self.tok_embeddings is not None
        if (input_ids.shape != position_ids.shape if takes_ids
                else input_ids.shape[0] != position_ids.shape[0]):
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and position_ids "
                f"{tuple(position_ids.shape)} must have the same [B, S] shape"
            )
        h = self.tok_embeddings(input_ids) if self.tok_embeddings is not None else input_ids
        # [B, S] -> [B, S, dim]; RoPE in at least fp32, whatever the activations' dtype
        rope_dtype = torch.promote_types(h.dtype, torch.float32)
        cos, sin = rotary_cos_sin(
            position_ids, self.config.head_dim, self.config.rope_theta, rope_dtype
        )
        for layer in self.layers.values():
            h = layer(h, cos, sin, documents)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, S, dim] -> [B, S, vocab]`` (at least fp32): the final norm and the output head.

        A pipeline stage without them (``norm`` and ``output`` None) returns ``hidden``."""
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.output is None:
            return hidden
        logits = self.output(hidden)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic initialisation from ``seed``, of whole tensors or of this rank's shards.

        Normal(0, 0.02) for embeddings and input projections; the projections that write into the
        residual stream (``wo``, ``w2``) are scaled by ``1/sqrt(2 n_layers)`` (GPT-2) so the
        stream's variance does not grow with depth; the output projection by ``dim**-0.5``; norms
        start at one. Each parameter's values depend on ``(seed, its name)`` only
        (``usp.models.init``), so a model built on the meta device, parallelised, materialised
        with ``to_empty`` and then initialised holds exactly the single-process values.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, parameter in self.named_parameters():  # a tied output is the embedding
            if parameter.ndim == 1:
                init.fill_(parameter, 1.0)
            elif name == "output.weight":
                init.normal_(parameter, self.config.dim**-0.5, seed, name)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                init.normal_(parameter, residual_std, seed, name)
            else:
                init.normal_(parameter, 0.02, seed, name)

    def num_params(self) -> int:
        """Number of distinct parameters (a tied embedding counts once), global under sharding."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length ``seq_len``
        (``usp.models.counts.training_flops_per_token``): every parameter multiplies in a
        matmul except the embedding lookup table, unless it is tied to the output."""
        matmul_params = self.num_params()
        if not self.config.tie_embeddings:
            matmul_params -= self.tok_embeddings.weight.numel()
        return training_flops_per_token(matmul_params, self.config.n_layers,
                                        self.config.n_heads * self.config.head_dim, seq_len)


def skeleton(settings: ModelSettings) -> Llama:
    """The settings' preset on the meta device (the family entry's skeleton)."""
    with torch.device("meta"):
        return Llama(get_config(settings.model))
