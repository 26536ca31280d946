"""Tiny random Flux and SD3 transformers (built from a config, no download), parallelized with
usp's processors, against the same model in one process: the output on every rank, and every
parameter's and input's gradient summed over the ranks, fp64 to 1e-10."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

import usp
from tests.attention_cases import max_error
from tests.attention_cases_errors import _expect_value_error
from tests.distributed import collect_failures
from usp.integrations.diffusers import parallelize_transformer

BATCH, TEXT_LEN = 2, 5  # 5 text tokens split over no ring evenly


def _flux():
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4))
    g = torch.Generator().manual_seed(3)
    inputs = {"hidden_states": torch.randn(BATCH, 8, 8, generator=g),  # 8 image tokens
              "encoder_hidden_states": torch.randn(BATCH, TEXT_LEN, 16, generator=g),
              "pooled_projections": torch.randn(BATCH, 8, generator=g),
              "timestep": torch.rand(BATCH, generator=g),
              "img_ids": torch.randint(0, 4, (8, 3), generator=g).float(),
              "txt_ids": torch.zeros(TEXT_LEN, 3)}
    return model, inputs


def _sd3():
    # layer 0 has SD3.5's second, image-only attention; the last layer's text is pre-only
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=16, caption_projection_dim=32,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,),
        qk_norm="rms_norm")
    g = torch.Generator().manual_seed(4)
    inputs = {"hidden_states": torch.randn(BATCH, 4, 8, 8, generator=g),  # 16 image tokens
              "encoder_hidden_states": torch.randn(BATCH, TEXT_LEN, 16, generator=g),
              "pooled_projections": torch.randn(BATCH, 8, generator=g),
              "timestep": torch.rand(BATCH, generator=g)}
    return model, inputs


MODELS = {"flux": _flux, "sd3": _sd3}


def _run(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients of a fixed weighted sum of it (the same loss on every rank)."""
    leaves = {name: t.clone().requires_grad_(name != "timestep" and "ids" not in name)
              for name, t in inputs.items()}
    out = model(**leaves).sample
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5),
                          dtype=out.dtype)
    (out * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads.update({name: t.grad for name, t in leaves.items() if t.requires_grad})
    return out.detach(), grads


def check_model(name: str, topology) -> None:
    model, inputs = MODELS[name]()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # init 0.2: attention far from uniform, so a wrong mask shows
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model = model.double()
    inputs = {key: t.double() for key, t in inputs.items()}
    want_out, want = _run(copy.deepcopy(model), inputs)
    handle = parallelize_transformer(model, topology)
    out, got = _run(model, inputs)
    for grad in got.values():  # the contract: sum over the sequence group; collectives first
        dist.all_reduce(grad, group=topology.sequence_group)
    handle.remove()  # the plain single-process model again
    with torch.no_grad():
        restored = model(**inputs).sample
    errors = {"out": max_error(out, want_out), "out after remove()": max_error(restored, want_out)}
    errors.update({key: max_error(got[key], want[key]) for key in want})
    worst = max(errors, key=errors.get)
    if not errors[worst] <= 1e-10 or set(got) != set(want):
        raise AssertionError(f"{name}: {worst} error {errors[worst]:.3e} > 1e-10")


def check_refusals(topology) -> None:
    """An image length the ranks cannot split and an unknown model: ValueErrors with the numbers
    (raised alike on every rank, before any collective: the inputs are the same)."""
    model, inputs = _flux()
    parallelize_transformer(model, topology)
    inputs["hidden_states"] = inputs["hidden_states"][:, :6]  # 6 image tokens over 4 ranks
    inputs["img_ids"] = inputs["img_ids"][:6]
    _expect_value_error(lambda: model(**inputs), "6 image tokens", "sequence size 4")
    _expect_value_error(lambda: parallelize_transformer(torch.nn.Linear(2, 2), topology),
                        "Linear is not supported")


def run_models(rank: int, world_size: int) -> list[str]:
    topology = usp.Topology.build(ring=2, ulysses=world_size // 2)
    failures = collect_failures(list(MODELS), lambda name: check_model(name, topology))
    failures += collect_failures(["refusals"], lambda _: check_refusals(topology))
    return [f"rank {rank} {f}" for f in failures]
