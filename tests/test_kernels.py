"""Local kernels vs the math reference (fp64), forward, lse and backward; the merge rule."""

import pytest
import torch

from usp.attention.kernels import KERNELS, default_scale, math_backward, math_forward, resolve_kernel
from usp.attention.merge import merge_into

CUDA = torch.cuda.is_available()


def _inputs(dtype, device="cpu", n_q=4, n_kv=2, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(2, seq, h, 16, generator=g, dtype=torch.float64)  # noqa: E731
    tensors = [make(n_q), make(n_kv), make(n_kv), make(n_q)]
    return [t.to(device=device, dtype=dtype) for t in tensors], tensors


def _check_kernel(name, dtype, device, causal):
    (q, k, v, dout), (q64, k64, v64, dout64) = _inputs(dtype, device)
    scale = default_scale(q.shape[-1], None)
    kernel = resolve_kernel(name, q)
    out, lse = kernel.forward(q, k, v, causal, scale)
    ref_out, ref_lse = math_forward(q64, k64, v64, causal, scale)
    ref_grads = math_backward(dout64, q64, k64, v64, ref_out, ref_lse, causal, scale)
    grads = kernel.backward(dout, q, k, v, out, lse, causal, scale)
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 8e-2,
                 torch.float16: 1e-2}[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == (2, 4, 24)
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=tolerance, rtol=0)
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=tolerance, rtol=0)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        torch.testing.assert_close(g.double().cpu(), r, atol=tolerance * 4, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_flash_matches_math(dtype, causal):
    _check_kernel("cpu_flash", dtype, "cpu", causal)


def test_math_backward_matches_autograd():
    (q, k, v, dout), _ = _inputs(torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    scale = default_scale(16, None)
    qh = leaves[0].transpose(1, 2)
    kh, vh = (t.repeat_interleave(2, dim=2).transpose(1, 2) for t in leaves[1:])
    expected = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                                scale=scale).transpose(1, 2)
    expected.backward(dout)
    out, lse = math_forward(q, k, v, True, scale)
    grads = math_backward(dout, q, k, v, out, lse, True, scale)
    torch.testing.assert_close(out, expected.detach(), atol=1e-12, rtol=0)
    for g, leaf in zip(grads, leaves):
        torch.testing.assert_close(g, leaf.grad, atol=1e-12, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name,dtype", [
    ("cuda_flash", torch.bfloat16), ("cuda_flash", torch.float16),
    ("cuda_efficient", torch.float32), ("cuda_efficient", torch.bfloat16),
    ("cuda_cudnn", torch.bfloat16), ("math", torch.float64),
])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kernels_match_math(name, dtype, causal):
    _check_kernel(name, dtype, "cuda", causal)


def test_unknown_or_unavailable_kernel_is_a_clear_error():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        resolve_kernel("nope", q)
    with pytest.raises(ValueError, match="runs on cuda"):
        resolve_kernel("cuda_flash", q)
    with pytest.raises(ValueError, match="flash-attn|runs on cuda"):
        resolve_kernel("flash_attn", q)
    assert resolve_kernel("auto", q) is KERNELS["cpu_flash"]


def test_merge_equals_attention_over_the_union_of_key_blocks():
    (q, k, v, _), _ = _inputs(torch.float64, seq=32)
    scale = default_scale(16, None)
    full_out, full_lse = math_forward(q, k, v, False, scale)
    out = torch.zeros_like(q)
    lse = torch.full(full_lse.shape, float("-inf"), dtype=torch.float64)
    for block in (slice(0, 10), slice(10, 11), slice(11, 32)):
        merge_into(out, lse, *math_forward(q, k[:, block], v[:, block], False, scale))
    torch.testing.assert_close(out, full_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=1e-12, rtol=0)


def test_merge_keeps_rows_that_saw_no_key_finite():
    out = torch.zeros(1, 3, 1, 2)
    lse = torch.full((1, 1, 3), float("-inf"))
    block_lse = torch.tensor([[[float("-inf"), 0.5, float("-inf")]]])
    merge_into(out, lse, torch.ones(1, 3, 1, 2), block_lse)
    assert torch.isfinite(out).all()
    assert out[0, 1].eq(1).all() and out[0, 0].eq(0).all()
    assert torch.isneginf(lse[0, 0, 0]) and lse[0, 0, 1] == 0.5


@pytest.mark.parametrize("chunking", [((64, 512), 256), ((2, 4), 2), ((4, 8), 1)])
def test_cpu_flash_runs_every_band_exactly(monkeypatch, chunking):
    """Bands (windows, the stripe layout's strictly lower blocks, bands above the diagonal, rows
    that see nothing) through the CPU kernel's chunked masked / plain / causal calls."""
    from usp.attention.kernels import Band
    from usp.attention.kernels import cpu

    monkeypatch.setattr(cpu, "BAND_ROWS", chunking[0])
    monkeypatch.setattr(cpu, "SPLIT_ROWS", chunking[1])
    g = torch.Generator().manual_seed(0)
    bands = [Band(-70, 0), Band(-40, 30), Band(None, -1), Band(-120, None), Band(-700, 0),
             Band(-5, 2), Band(3, 9), Band(-2, -1)]
    for n_q, n_k in [(300, 300), (200, 330), (33, 20)]:
        for band in bands:
            make = lambda n, h: torch.randn(1, n, h, 8, generator=g, dtype=torch.float64)  # noqa
            q, k, v, dout = make(n_q, 2), make(n_k, 1), make(n_k, 1), make(n_q, 2)
            out, lse = math_forward(q, k, v, band, 0.3)
            grads = math_backward(dout, q, k, v, out, lse, band, 0.3)
            got_out, got_lse = cpu.cpu_flash_forward(q, k, v, band, 0.3)
            seen = torch.isfinite(lse[0, 0])
            assert torch.equal(torch.isneginf(got_lse), torch.isneginf(lse)), (n_q, n_k, band)
            torch.testing.assert_close(got_out[:, seen], out[:, seen], atol=1e-10, rtol=0)
            for got, want in zip(cpu.cpu_flash_backward(dout, q, k, v, out, lse, band, 0.3),
                                 grads):
                torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_the_gpu_kernel_check_itself_on_cpu(monkeypatch):
    """test_kernels_gpu.check (bound: 2x plain low-precision attention) run on the CPU kernel,
    bands included, so the GPU grid's own logic is exercised where CI runs."""
    from tests import test_kernels_gpu
    from usp.attention.kernels import Band

    monkeypatch.setattr(test_kernels_gpu, "DEVICE", "cpu")
    for dtype in (torch.float32, torch.bfloat16):
        for mask in (True, False, Band(-33, 0), Band(None, -1), Band(-20, 7)):
            test_kernels_gpu.check("cpu_flash", dtype, (8, 2), 64, mask, 200)
