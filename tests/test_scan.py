"""usp.scan (SSD, Mamba-1's selective scan, the gated delta rule, the causal convolution) against
one process, forward and backward, fp64 within 1e-10 (docs/testing.md).

One spawned 4-rank gloo world runs every multi-rank case (tests/scan_world.py): ring 2 x
ulysses 2, ring 4 and ulysses 4; even and uneven lengths; no documents, one packing, one per
batch row; head counts Ulysses must pad; each scan with its state passed along every shard
(``ulysses="state"``) and with its heads split over Ulysses (``"heads"``). In the same world: the
state passing skipped (each rank from a zero state) must be far off, bad input must raise the same ValueError on every
rank, and the state passing's bytes must be one state per rank and direction.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.bamba.modeling_bamba import mamba2_chunk_scan
from transformers.models.jamba.modeling_jamba import mamba_selective_scan
from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

from tests.distributed import collect_failures, run_on_ranks
from tests.scan_cases import grid, run_case
from tests.scan_world import scan_world
from usp.scan.reference import gated_delta_recurrence, selective_recurrence, ssd_recurrence
from usp.topology import Topology

FP32 = torch.float32


@pytest.fixture(scope="module")
def world_4():
    return run_on_ranks(scan_world, 4, timeout_s=300)  # a hang guard, generous under load


def test_references_are_transformers_torch_paths():
    # the token-by-token references mean what transformers' chunked torch paths compute (fp32)
    generator = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    x, dt, b, c = draw(2, 19, 4, 3), draw(2, 19, 4), draw(2, 19, 2, 5), draw(2, 19, 2, 5)
    a, d, dt_bias = -torch.rand(4, generator=generator) - 0.2, draw(4), draw(4)
    theirs = mamba2_chunk_scan(x, dt, a, b, c, chunk_size=8, D=d, dt_bias=dt_bias,
                               dt_softplus=True, dt_limit=(0.0, 2.5))
    step = F.softplus(dt + dt_bias).clamp(max=2.5)
    ours = ssd_recurrence(x.double(), step.double(), a.double(), b.double(), c.double(),
                          d.double())[0]
    assert (theirs.double() - ours).abs().max() < 1e-4
    q, k, v = draw(2, 19, 2, 4), draw(2, 19, 2, 4), draw(2, 19, 4, 3)
    g, beta = -torch.rand(2, 19, 4, generator=generator), torch.rand(2, 19, 4, generator=generator)
    theirs = torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=8,
                                          use_qk_l2norm_in_kernel=True)[0]
    ours = gated_delta_recurrence(*(t.double() for t in (q, k, v, g, beta)), normalise_qk=True)[0]
    assert (theirs.double() - ours).abs().max() < 1e-5
    x, dt, z, b, c = draw(2, 4, 19), draw(2, 4, 19), draw(2, 4, 19), draw(2, 5, 19), draw(2, 5, 19)
    a = -torch.rand(4, 5, generator=generator) - 0.2
    theirs = mamba_selective_scan(x, dt, a, b, c, D=d, z=z, delta_bias=dt_bias,
                                  delta_softplus=True)
    step = F.softplus(dt + dt_bias[:, None])
    ours = selective_recurrence(*(t.double() for t in (x, step, a, b, c, d, z)))[0]
    assert (theirs.double() - ours).abs().max() < 1e-5


def test_auto_split_over_ulysses():
    # SSD passes the state along every shard; the delta rule only while no block sits between
    # the first and the last (its middle blocks build a Dk x Dk map for every head)
    from usp.choices import scan_ulysses

    for shards, delta in ((1, "state"), (2, "state"), (3, "heads"), (4, "heads")):
        assert scan_ulysses("auto", shards, matrix_transition=False) == "state"
        assert scan_ulysses("auto", shards, matrix_transition=True) == delta
        assert scan_ulysses("heads", shards, matrix_transition=False) == "heads"


def test_one_process_matches_reference():
    topology = Topology.build()  # no process group: the single-process path
    failures = collect_failures(grid(), lambda case: _assert_exact(case, topology))
    assert not failures, "\n".join(failures)


def _assert_exact(case, topology):
    error = run_case(case, topology)
    assert error <= 1e-10, f"error {error:.3g} > 1e-10"


def test_four_ranks_match_reference_forward_and_backward(world_4):
    failures = [line for rank in world_4 for line in rank["failures"]]
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:40])


def test_skipping_the_state_passing_is_far_off(world_4):
    # the comparison can tell: with each rank starting from a zero state (zero halo) every
    # rank is off by order one: the later ranks' outputs, the earlier ranks' gradients
    for rank, result in enumerate(world_4):
        for where, error in result["skipped"].items():
            assert error > 1e-2, (rank, where, error)


def test_bad_input_raises_the_same_error_on_every_rank(world_4):
    messages = [rank["errors"] for rank in world_4]
    assert all(m == messages[0] for m in messages), "ranks disagreed on the errors"
    expected = {
        "interleaving layout": "needs layout='contiguous' when ring=2",
        "x not 4-D": "x must be a tensor [B, S_local, H, P]; got (1, 6, 12)",
        "dt shape": "dt (1, 6, 3) must be [B, S_local, H] = (1, 6, 4)",
        "heads not a multiple of groups": "4 heads are not a multiple of 3 groups",
        "A shape": "A (3,) must be [H] = [4]",
        "g shape": "g (1, 6, 2) must be [B, S_local, Hv] = (1, 6, 4)",
        "value heads not a multiple of key heads": "3 heads are not a multiple of 2 groups",
        "delta layout": "layout='stripe' interleaves the blocks",
        "conv channels": "C=4 != 5",
        "conv halo longer than a shard": "each rank holds 2 tokens but a kernel of 4 taps",
        "documents rows": "documents have 3 batch rows and the inputs 2",
        "seq_len beyond the slots": "seq_len=30 does not fit 24 slots (6 per rank x 4 ranks)",
        "one rank's documents differ": "ranks disagree on the call (every rank must pass the "
                                       "same): documents:",
        "one rank's length differs": "ranks disagree on the call",
        "unknown split over ulysses": "ulysses='tokens'; choose 'state'",
        "selective A shape": "A (3, 2) must be [D, N] with D = 4 as x",
    }
    for what, message in messages[0]:
        assert expected[what] in message, (what, message)


def test_state_passing_sends_one_state_per_rank_and_direction(world_4):
    # fp64 (8 bytes), batch 2; SSD heads 4 x head_dim 3 x state 4; delta value heads 4 x Dk 4 x
    # Dv 3; conv 5 channels x (4 - 1) halo tokens; Mamba-1 4 channels x state 3. "heads": the heads split over ulysses, the
    # state passed along the ring; "state": every head, the state passed along every shard
    for rank, result in enumerate(world_4):
        for (ring, ulysses), sent in result["bytes"].items():
            ring_rank, shard = rank // ulysses, rank  # head-first: sequence shard = rank
            along_ring = (ring_rank > 0) + (ring_rank < ring - 1)
            along_shards = (shard > 0) + (shard < ring * ulysses - 1)
            expected = {"ssd heads": along_ring * 2 * 4 // ulysses * 3 * 4 * 8,
                        "delta": along_ring * 2 * 4 // ulysses * 4 * 3 * 8,
                        "ssd": along_shards * 2 * 4 * 3 * 4 * 8,
                        "delta state": along_shards * 2 * 4 * 4 * 3 * 8,
                        "conv": along_shards * 2 * 5 * 3 * 8,
                        "selective": along_shards * 2 * 4 * 3 * 8}
            for name, count in expected.items():
                assert sent[name] == count, (rank, ring, ulysses, name, sent)
