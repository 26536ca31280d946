"""On a GPU with mamba_ssm installed: its fused chunked scan as SSD's first phase
(usp.scan.fused) against usp's torch phase (usp.scan.ssd_local) on the same block — the outputs
from a zero state, the final state (mamba_ssm lays it [B, H, P, N]), the transition and the
reach of the entering state, with packed documents (seq_idx) — and the whole ssd_scan both
ways. On CPU the composition is held to a stand-in of the kernel (tests/scan_world.py)."""

import pytest
import torch

from usp.scan import ssd_scan
from usp.scan.fused import fused_block, fused_chunk_scan, fused_output
from usp.scan.segments import block_segments, global_segments
from usp.scan.ssd_local import block_output, block_states
from usp.topology import Topology

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _inputs(dtype, length=512, heads=8, head_dim=64, groups=2, state=64):
    generator = torch.Generator(device="cuda").manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=generator, device="cuda",  # noqa: E731
                                      dtype=torch.float32)
    x, b, c = draw(2, length, heads, head_dim), draw(2, length, groups, state), draw(
        2, length, groups, state)
    dt = torch.nn.functional.softplus(draw(2, length, heads) - 2)
    a = -torch.rand(heads, generator=generator, device="cuda") - 0.5
    return [t.to(dtype) for t in (x, b, c)], dt, a


@pytest.mark.parametrize("documents", [False, True])
def test_fused_phase_one_equals_the_torch_phase(documents):
    (x, b, c), dt, a = _inputs(torch.float32)
    kernel = fused_chunk_scan(x)
    if kernel is None:
        pytest.skip("mamba_ssm is not installed")
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 300, 112]))
    segments = block_segments(global_segments(512, documents=ids if documents else None), 1, 0)
    if segments is not None:
        segments = segments.to(x.device)
    fused = fused_block(kernel, x, dt, a, b, c, segments, 64, torch.float32)
    ours = block_states(x, dt, a, b, c, segments, 64)
    entering = torch.randn_like(ours.final)  # a state from a block before
    for name, got, want in (("final", fused.final, ours.final),
                            ("transition", fused.transition, ours.transition),
                            ("outputs", fused_output(fused, None), block_output(ours, None)),
                            ("outputs after a state", fused_output(fused, entering),
                             block_output(ours, entering))):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), (name, (got - want).abs().max())


def test_ssd_scan_with_the_kernel_equals_the_torch_path(monkeypatch):
    (x, b, c), dt, a = _inputs(torch.bfloat16)
    if fused_chunk_scan(x) is None:
        pytest.skip("mamba_ssm is not installed")
    one = Topology.build()
    fused = ssd_scan(x, dt, a, b, c, one, chunk_size=64)
    monkeypatch.setattr("usp.scan.ssd.fused_chunk_scan", lambda t: None)
    torch_path = ssd_scan(x, dt, a, b, c, one, chunk_size=64)
    scale = torch_path.float().abs().max()
    assert (fused.float() - torch_path.float()).abs().max() <= 2e-2 * scale
