"""The CUDA paths without a GPU: op schemas under fake CUDA tensors, flash-attn's three
calling conventions through stand-ins, and ``auto`` falling back past kernels that fail.

The numerical checks of the CUDA kernels themselves are in test_kernels_gpu.py (marked ``gpu``).
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests import flash_attn_standins
from usp.attention.kernels import (KERNELS, Band, Kernel, default_scale, math_backward,
                                   math_forward)
from usp.attention.kernels import registry, resolve_kernel
from usp.attention.kernels.flash_attn import FLASH_ATTN, FLASH_ATTN_3, call_by_name

SDPA_KERNELS = ["cuda_flash", "cuda_efficient", "cuda_cudnn"]


class RecordAttentionOps(TorchDispatchMode):
    """Records the arguments of every aten attention op called inside it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "attention" in func.name():
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", SDPA_KERNELS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("head_dim", [64, 80, 20])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_adapters_match_torch_op_schemas_on_fake_cuda(name, heads, kv_heads, head_dim, causal):
    """Forward and backward bind to torch's op schemas and meta kernels (fake CUDA tensors), pass
    None (never an empty tensor) where the op means "no tensor", and return usp's shapes."""
    kernel = KERNELS[name]
    batch, seq = 2, 100
    with FakeTensorMode(), RecordAttentionOps() as recorded:
        make = lambda h: torch.empty(batch, seq, h, head_dim, device="cuda",  # noqa: E731
                                     dtype=torch.bfloat16)
        q, k, v, dout = make(heads), make(kv_heads), make(kv_heads), make(heads)
        scale = default_scale(head_dim, None)
        out, lse = kernel.forward(q, k, v, causal, scale)
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal, scale)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (batch, heads, seq) and lse.dtype == torch.float32
        assert lse.is_contiguous()
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    ops = [func.name() for func, _, _ in recorded.calls]
    assert len(ops) >= 2 and any("backward" in op for op in ops), ops
    for func, args, kwargs in recorded.calls:
        for position, value in enumerate([*args, *kwargs.values()]):
            if isinstance(value, torch.Tensor):
                assert value.numel() > 0, f"{func.name()} argument {position} is an empty tensor"
        schema = func._schema
        for argument, value in zip(schema.arguments, args):
            if argument.name in ("cum_seq_q", "cum_seq_k", "attn_bias", "bias"):
                assert value is None, f"{func.name()} got a tensor for {argument.name}"
        if head_dim % 8:
            tensors = [a for a in args  # q, k, v, out, dout (not cuDNN's [B, H, S, 1] lse)
                       if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[-1] != 1]
            assert all(t.shape[-1] % 8 == 0 for t in tensors), "head dim reached the op unpadded"
    if name == "cuda_flash" and kv_heads < heads:  # native GQA: no expanded copies
        forward = next(args for func, args, _ in recorded.calls if "forward" in func.name())
        assert forward[1].shape[2] == kv_heads


@pytest.mark.parametrize("band,n_q,n_k,box,window,causal", [
    # (usp band, block, the visible box the op runs on, flash's bottom-right window, causal flag)
    (Band(-3, 0), 16, 16, (16, 16), (3, 0), False),       # a sliding window
    (Band(None, -1), 16, 16, (15, 15), (-1, -1), True),   # stripe: strictly lower -> trimmed
    (Band(None, 0), 8, 16, (8, 8), (-1, -1), True),       # top-left causal, keys beyond cut
    (Band(None, 0), 16, 8, (16, 8), (-1, 8), False),      # top-left causal, more queries
    (Band(2, 6), 16, 16, (14, 14), (0, 4), False),        # a band above the diagonal
])
def test_bands_reach_flash_as_bottom_right_windows_on_their_visible_box(band, n_q, n_k, box,
                                                                        window, causal):
    with FakeTensorMode(), RecordAttentionOps() as recorded:
        q = torch.empty(1, n_q, 2, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.empty(1, n_k, 2, 64, device="cuda", dtype=torch.bfloat16)
        out, lse = KERNELS["cuda_flash"].forward(q, k, k, band, 0.125)
        assert out.shape == q.shape and lse.shape == (1, 2, n_q)
    func, args, kwargs = recorded.calls[0]
    assert (args[0].shape[1], args[1].shape[1]) == box
    assert (kwargs["window_size_left"], kwargs["window_size_right"]) == window
    assert args[8] is causal


def test_kernels_without_windows_refuse_bands_and_auto_avoids_them():
    with FakeTensorMode():
        q = torch.empty(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="'cuda_efficient' runs full and causal blocks only"):
            KERNELS["cuda_efficient"].forward(q, q, q, Band(-3, 0), 0.125)
    assert KERNELS["cuda_flash"].bands and not KERNELS["cuda_cudnn"].bands


def _inputs(heads=4, kv_heads=2, seq=24, head_dim=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(2, seq, h, head_dim, generator=g, dtype=torch.float64)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads), make(heads)


@pytest.mark.parametrize("generation", sorted(flash_attn_standins.GENERATIONS))
@pytest.mark.parametrize("causal", [True, False, Band(-5, 0), Band(None, -1), Band(-7, 3)])
def test_flash_attn_adapter_calls_every_api_generation_by_name(monkeypatch, generation, causal):
    forward, backward = flash_attn_standins.GENERATIONS[generation]
    interface = flash_attn_standins.module("standin", forward, backward)
    kernel = FLASH_ATTN_3 if generation == "v3" else FLASH_ATTN
    module_name = "flash_attn_interface" if generation == "v3" else "flash_attn.flash_attn_interface"
    monkeypatch.setitem(sys.modules, module_name, interface)
    q, k, v, dout = _inputs()
    scale = default_scale(q.shape[-1], None)
    out, lse = kernel.forward(q, k, v, causal, scale)
    grads = kernel.backward(dout, q, k, v, out, lse, causal, scale)
    ref_out, ref_lse = math_forward(q, k, v, causal, scale)
    ref_grads = math_backward(dout, q, k, v, ref_out, ref_lse, causal, scale)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)  # the lse leaves as fp32
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_flash_attn_custom_op_signature_is_read_through_the_wrapped_function():
    import inspect

    op = flash_attn_standins.fa27_forward
    assert "q" not in inspect.signature(op).parameters  # what broke usp before: (*args, **kwargs)
    with pytest.raises(ValueError, match=r"needs \['mystery'\]"):
        call_by_name(lambda q, mystery: None, {"q": 1})


def test_missing_flash_attn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        FLASH_ATTN.load()


def _broken_kernels():
    def raises(*args):
        raise RuntimeError("CUDA error: no kernel image is available")

    def wrong_forward(q, k, v, causal, scale):
        out, lse = math_forward(q, k, v, causal, scale)
        return out * 1.5, lse

    dtypes = (torch.float64, torch.float32, torch.bfloat16)
    return {
        "raises": Kernel("raises", "cpu", dtypes, raises, raises),
        "wrong": Kernel("wrong", "cpu", dtypes, wrong_forward, math_backward),
    }


def test_auto_skips_kernels_that_raise_or_are_wrong_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_probes", {})
    monkeypatch.setattr(registry, "_announced", set())
    for name, kernel in _broken_kernels().items():
        monkeypatch.setitem(KERNELS, name, kernel)
    monkeypatch.setitem(registry.AUTO_ORDER, "cpu", ("raises", "wrong", "cpu_flash", "math"))
    q = torch.zeros(1, 4, 2, 8)
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        assert resolve_kernel("auto", q) is KERNELS["cpu_flash"]
    message = caplog.text
    assert "cpu_flash" in message and "skipped raises (RuntimeError: CUDA error" in message
    assert "skipped wrong (out is off by" in message
    # a kernel named explicitly that fails is an error at once, with the reason
    with pytest.raises(ValueError, match="kernel 'raises' fails on .* RuntimeError: CUDA error"):
        resolve_kernel("raises", q)
    with pytest.raises(ValueError, match="kernel 'wrong' fails .* out is off by"):
        resolve_kernel("wrong", q)


def test_auto_with_nothing_that_works_names_every_reason(monkeypatch):
    monkeypatch.setattr(registry, "_probes", {})
    for name, kernel in _broken_kernels().items():
        monkeypatch.setitem(KERNELS, name, kernel)
    monkeypatch.setitem(registry.AUTO_ORDER, "cpu", ("raises", "wrong"))
    with pytest.raises(ValueError, match="no attention kernel works .* raises: .* wrong: "):
        resolve_kernel("auto", torch.zeros(1, 4, 2, 8))


def test_cuda_tensors_off_the_current_device_under_nccl_are_refused(monkeypatch):
    """NCCL sends from the current CUDA device: usp_attention says so instead of hanging."""
    import usp
    from usp.attention import usp as usp_module

    topology = usp.Topology(sizes={"dp": 1, "ring": 2, "ulysses": 1, "tp": 1},
                            ranks={"dp": 0, "ring": 1, "ulysses": 0, "tp": 0},
                            _groups={"ring": object()})
    monkeypatch.setattr(usp_module.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with FakeTensorMode():
        q = torch.empty(1, 8, 2, 64, device="cuda:1", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"on cuda:1 but this rank's current CUDA device is "
                                             r"cuda:0.*torch.cuda.set_device"):
            usp_module._check_collective_device(q, topology)
        on_current = torch.empty(1, 8, 2, 64, device="cuda:0", dtype=torch.bfloat16)
        usp_module._check_collective_device(on_current, topology)  # no error
