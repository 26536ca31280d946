"""Masked attention vs a single-process reference with the same mask, forward and dQ/dK/dV.

Packed documents (cu_seqlens, with a 1-token document and one longer than a rank's shard), sliding
windows, both, per-row right padding and an uneven length, on 1, 2, 4 and 8 gloo ranks: every
(ring, ulysses) factorisation, every layout, causal and not, Hkv in {Hq, Hq/2, 1} (8 ranks: Hq/2
and 1), fp64 (<= 1e-10) and fp32/bf16 (up to 4 ranks). Head counts Ulysses cannot split evenly (14/14, 14/2, 12/6, 6/6, 6/3 over
Ulysses 4 and ring 2 x Ulysses 2). The schedule's exact coverage is property-tested in
test_layout.py.
"""

from tests.attention_mask_cases import HEADS, run_mask_grid, run_uneven_heads, window_skips_steps
from tests.distributed import run_on_ranks

KINDS = ["documents", "window", "documents+window", "padding", "uneven"]


def _assert_no_failures(per_rank):
    failures = [line for rank in per_rank for line in rank]
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:40])


def test_masks_in_one_process():
    _assert_no_failures([run_mask_grid(0, 1, 30, KINDS)])


def test_masks_on_2_ranks():
    _assert_no_failures(run_on_ranks(run_mask_grid, 2, 32, KINDS))


def _four_ranks(rank, world_size):
    return {"grid": run_mask_grid(rank, world_size, 48, KINDS),
            "heads": run_uneven_heads(rank, world_size, 32),
            "sent": window_skips_steps(rank, world_size)}


def test_masks_uneven_heads_and_window_traffic_on_4_ranks():
    per_rank = run_on_ranks(_four_ranks, 4, timeout_s=400)
    _assert_no_failures([r["grid"] for r in per_rank])
    _assert_no_failures([r["heads"] for r in per_rank])
    sent = per_rank[0]["sent"]
    # dense: 3 K/V transfers forward, 3 K/V + 3 dK/dV backward + the dK/dV return; a window one
    # block long: 1 forward, 1 + the return backward
    assert sent["window"] < 0.5 * sent["dense"], sent


def test_masks_on_8_ranks():
    # GQA only, fp64 only: MHA, MQA and fp32/bf16 are covered on 1, 2 and 4 ranks, and 8
    # processes on two cores make every case count
    _assert_no_failures(run_on_ranks(run_mask_grid, 8, 48, KINDS, False, (HEADS // 2,),
                                     timeout_s=400))
