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


def test_a_band_flash_runs_whole_binds_its_window_to_the_op_schema():
    """A sliding window on a square block reaches torch's FlashAttention-2 op as one call whose
    window keywords bind to the real schema (fake CUDA tensors)."""
    with FakeTensorMode(), RecordAttentionOps() as recorded:
        q = torch.empty(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        out, lse = KERNELS["cuda_flash"].forward(q, q, q, Band(-3, 0), 0.125)
        assert out.shape == q.shape and lse.shape == (1, 2, 16)
    (func, args, kwargs), = recorded.calls
    assert (kwargs["window_size_left"], kwargs["window_size_right"]) == (3, 0)
    assert args[8] is False  # is_causal


class RecordCalls:
    """Torch's FlashAttention-2 stand-ins, recording (rows, keys, causal, window) per forward."""

    def __init__(self):
        self.calls = []
        self._flash_attention_backward = flash_attn_standins.aten_flash_backward

    def _flash_attention_forward(self, *args, **kwargs):
        self.calls.append((args[0].shape[1], args[1].shape[1], args[8],
                           (kwargs["window_size_left"], kwargs["window_size_right"])))
        return flash_attn_standins.aten_flash_forward(*args, **kwargs)


@pytest.mark.parametrize("band,n_q,n_k,calls", [
    # (usp band, block, the op calls it becomes: rows, keys, causal flag, bottom-right window)
    (Band(-3, 0), 16, 16, [(16, 16, False, (3, 0))]),          # a sliding window: one call
    (Band(None, -1), 16, 16, [(15, 15, True, (-1, -1))]),      # stripe: strictly lower -> trimmed
    (Band(None, 0), 8, 16, [(8, 8, True, (-1, -1))]),          # top-left causal, keys beyond cut
    (Band(2, 6), 16, 16, [(14, 14, False, (0, 4))]),           # a band above the diagonal
    # top-left causal with more rows than keys: FlashAttention-2 turns the window (-1, 8) into
    # full attention, so the rows run in chunks of 8: a causal square, then rows seeing all
    (Band(None, 0), 16, 8, [(8, 8, True, (-1, -1)), (8, 8, False, (-1, -1))]),
    # a lower band on 32 x 16: the right side would be -1 -> seqlen_k, short of the last key
    (Band(-4, None), 32, 16, [(16, 16, False, (4, -1)), (4, 4, False, (0, -1))]),
])
def test_bands_reach_torch_flash_as_windows_that_mean_them(monkeypatch, band, n_q, n_k, calls):
    from usp.attention.kernels import sdpa

    recorder = RecordCalls()
    monkeypatch.setattr(sdpa, "aten", recorder)
    q, k, v, dout = _block_inputs(n_q, n_k)
    out, lse = KERNELS["cuda_flash"].forward(q, k, v, band, 0.125)
    assert recorder.calls == calls
    _assert_matches_math(KERNELS["cuda_flash"], band, q, k, v, dout, out, lse)


def _block_inputs(n_q, n_k, heads=4, kv_heads=2, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda s, h: torch.randn(1, s, h, head_dim, generator=g, dtype=torch.float64)  # noqa: E731
    return make(n_q, heads), make(n_k, kv_heads), make(n_k, kv_heads), make(n_q, heads)


def _assert_matches_math(kernel, mask, q, k, v, dout, out=None, lse=None, scale=0.125):
    if out is None:
        out, lse = kernel.forward(q, k, v, mask, scale)
    ref_out, ref_lse = math_forward(q, k, v, mask, scale)
    # the ops' lse is fp32: parts merge with fp32 weights
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows that see no key differ"
    torch.testing.assert_close(lse.double().masked_fill(empty, 0), ref_lse.masked_fill(empty, 0),
                               atol=1e-5, rtol=0)  # the lse leaves as fp32
    grads = kernel.backward(dout, q, k, v, out, lse, mask, scale)
    ref_grads = math_backward(dout, q, k, v, ref_out, ref_lse, mask, scale)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["cuda_efficient", "cuda_cudnn"])
@pytest.mark.parametrize("band,n_q,n_k", [
    (Band(-3, 0), 16, 16), (Band(None, -1), 16, 16), (Band(None, 0), 16, 8),
    (Band(2, 6), 16, 16), (Band(-4, None), 32, 16), (Band(-9, 2), 40, 24), (Band(0, None), 8, 8),
])
def test_kernels_without_windows_run_bands_as_full_and_causal_squares(monkeypatch, name, band,
                                                                       n_q, n_k):
    """Memory-efficient and cuDNN attention have no window: bands reach them as full blocks and
    causal squares only (the stand-in refuses anything else), and the result is the band's."""
    from usp.attention.kernels import sdpa

    monkeypatch.setattr(sdpa, "aten", flash_attn_standins.ATEN_NO_WINDOW)
    q, k, v, dout = _block_inputs(n_q, n_k)
    _assert_matches_math(KERNELS[name], band, q, k, v, dout)


def _inputs(heads=4, kv_heads=2, seq=24, head_dim=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(2, seq, h, head_dim, generator=g, dtype=torch.float64)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads), make(heads)


def _install(monkeypatch, generation):
    forward, backward, version_3 = flash_attn_standins.GENERATIONS[generation]
    interface = flash_attn_standins.module("standin", forward, backward)
    module_name = "flash_attn_interface" if version_3 else "flash_attn.flash_attn_interface"
    monkeypatch.setitem(sys.modules, module_name, interface)
    return FLASH_ATTN_3 if version_3 else FLASH_ATTN


@pytest.mark.parametrize("generation", sorted(flash_attn_standins.GENERATIONS))
@pytest.mark.parametrize("mask,n_q,n_k", [
    (True, 24, 24), (False, 24, 24), (Band(-5, 0), 24, 24), (Band(None, -1), 24, 24),
    (Band(-7, 3), 24, 24), (Band(None, 0), 40, 16), (Band(-6, None), 40, 16),
    (Band(-9, 2), 16, 40),
])
def test_flash_attn_adapter_calls_every_api_generation_by_meaning(monkeypatch, generation, mask,
                                                                   n_q, n_k):
    """Each release's calling convention and its own window rules: causal reaches the backward
    of every FlashAttention-3 signature (``causal`` or ``is_causal``), and windows mean the band
    on blocks with more rows than keys too."""
    kernel = _install(monkeypatch, generation)
    q, k, v, dout = _block_inputs(n_q, n_k, head_dim=20)
    _assert_matches_math(kernel, mask, q, k, v, dout, scale=default_scale(20, None))


def test_a_flash_attn_meaning_without_a_parameter_is_an_error_at_the_probe(monkeypatch):
    """A release whose backward takes no causal flag under any known name must not run with the
    flag dropped: the call raises, so the probe refuses the kernel and says why."""
    def backward_without_causal(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale,
                                window_size_left=-1, window_size_right=-1):
        raise AssertionError("called with the causal flag dropped")

    interface = flash_attn_standins.module("standin", flash_attn_standins.fa3_head_forward,
                                           backward_without_causal)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", interface)
    q, k, v, dout = _block_inputs(24, 24)
    out, lse = FLASH_ATTN_3.forward(q, k, v, True, 0.125)
    with pytest.raises(ValueError, match="has no parameter for 'causal'"):
        FLASH_ATTN_3.backward(dout, q, k, v, out, lse, True, 0.125)
    monkeypatch.setattr(registry, "_probes", {})
    reason = registry.probe(FLASH_ATTN_3, torch.float64, torch.device("cpu"), 16)
    assert reason is not None and "has no parameter for 'causal'" in reason


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
