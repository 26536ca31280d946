"""Bytes and seconds of the collectives, and the exact traffic of one ``usp_attention`` call.

Bytes are always those a rank *sends* to other ranks, the quantity ``usp.comm.CommStats``
records: an all-to-all of an ``N``-byte input over ``G`` ranks sends ``N(G-1)/G``; an all-gather
whose output is ``F`` bytes sends ``F(G-1)/G`` (its input is ``F/G``, sent to ``G-1`` peers); a
reduce-scatter of an ``F``-byte input sends ``F(G-1)/G``; an all-reduce, a reduce-scatter followed
by an all-gather, sends ``2F(G-1)/G``; a point-to-point send sends the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from usp.comm import KINDS
from usp.plan.config import GroupPlacement, effective_kv_heads
from usp.plan.specs import ClusterSpec

FP32_BYTES = 4


def sent_bytes(kind: str, tensor_bytes: float, group_size: int) -> float:
    """Bytes one rank sends for one collective; ``tensor_bytes`` is the full (unsharded) tensor."""
    if group_size == 1:
        return 0.0
    share = tensor_bytes * (group_size - 1) / group_size
    return {"all_to_all": share, "all_gather": share, "reduce_scatter": share,
            "all_reduce": 2 * share, "p2p": tensor_bytes}[kind]


def latency_steps(kind: str, group_size: int) -> int:
    """Message rounds of the algorithm: ring collectives take G-1 (all-reduce twice that); an
    all-to-all posts its G-1 messages at once (NCCL groups the sends), so it pays one round, as a
    point-to-point send does."""
    if kind in ("p2p", "all_to_all"):
        return 1
    return (2 if kind == "all_reduce" else 1) * (group_size - 1)


def transfer_seconds(kind: str, sent: float, calls: float, placement: GroupPlacement,
                     cluster: ClusterSpec) -> float:
    """Time of ``calls`` collectives sending ``sent`` bytes in all, under the alpha-beta model.

    An all-to-all sends a separate chunk to every peer, so its chunks to same-node peers ride
    NVLink while the rest cross the network at the same time. A ring collective or a ring of
    P2P sends moves in lock-step, as fast as its slowest hop: inter-node once it spans nodes.
    Each call also pays the cluster's ``sync_us`` once (CPU ranks sharing cores).
    """
    if sent == 0 or placement.size == 1:
        return 0.0
    intra_bw = cluster.intra_bandwidth_gbs * 1e9
    inter_bw = cluster.inter_bandwidth_gbs * 1e9
    if placement.intra_node:
        bandwidth_time, latency = sent / intra_bw, cluster.intra_latency_us
    elif kind == "all_to_all":
        remote = placement.inter_peer_fraction
        bandwidth_time = max(sent * (1 - remote) / intra_bw, sent * remote / inter_bw)
        latency = cluster.inter_latency_us
    else:
        bandwidth_time, latency = sent / inter_bw, cluster.inter_latency_us
    rounds = calls * latency_steps(kind, placement.size) * latency
    return bandwidth_time + (rounds + calls * cluster.sync_us) * 1e-6


@dataclass(frozen=True)
class AttentionTraffic:
    """What one rank sends in one ``usp_attention`` forward and backward (the core's contract).

    Ulysses (``ulysses > 1``) all-to-alls q, k, v and the output forward, and dout, dq, dk, dv
    backward. The ring (``ring > 1``) forwards the local k and v block ``ring-1`` times in each
    pass and, backward, also circulates fp32 dk and dv ``ring`` times, home again.
    k and v travel stacked as one message, and so do dk and dv.
    """

    all_to_all_forward: int
    all_to_all_backward: int
    ring_kv_send: int  # bytes of one hop of the k and v blocks (input dtype)
    ring_grad_send: int  # bytes of one hop of the fp32 dk and dv blocks
    ring: int
    ulysses: int

    @property
    def p2p_forward(self) -> int:
        return (self.ring - 1) * self.ring_kv_send

    @property
    def p2p_backward(self) -> int:
        if self.ring == 1:
            return 0
        return (self.ring - 1) * self.ring_kv_send + self.ring * self.ring_grad_send

    def bytes(self, recompute_forward: bool = False) -> dict[str, int]:
        """Bytes by collective kind for forward + backward (plus a recomputed forward)."""
        forwards = 2 if recompute_forward else 1
        result = dict.fromkeys(KINDS, 0)
        result["all_to_all"] = forwards * self.all_to_all_forward + self.all_to_all_backward
        result["p2p"] = forwards * self.p2p_forward + self.p2p_backward
        return result

    def calls(self, recompute_forward: bool = False) -> dict[str, int]:
        forwards = 2 if recompute_forward else 1
        result = dict.fromkeys(KINDS, 0)
        if self.ulysses > 1:  # q, k and v travel packed: two all-to-alls each way per pass
            result["all_to_all"] = 2 * forwards + 2
        if self.ring > 1:
            # k and v travel stacked as one message; so do the fp32 dk and dv
            result["p2p"] = (self.ring - 1) * forwards + (self.ring - 1) + self.ring
        return result


def accumulator_bytes(element_bytes: int) -> int:
    """Ring gradients accumulate in fp32 (fp64 for fp64 inputs) and travel at that width."""
    return max(FP32_BYTES, element_bytes)


def attention_traffic(batch: int, seq_len: int, q_heads: int, kv_heads: int, head_dim: int,
                      element_bytes: int, ring: int, ulysses: int) -> AttentionTraffic:
    """Exact per-rank traffic of ``usp_attention`` on ``[batch, seq_len/(ring*ulysses), heads, D]``.

    ``q_heads``/``kv_heads`` are the heads this rank's attention sees (after any TP split).
    """
    tokens_per_rank = seq_len // (ring * ulysses)
    kv_in_all_to_all = effective_kv_heads(kv_heads, ulysses) if ulysses > 1 else kv_heads
    all_to_all_forward = all_to_all_backward = 0
    if ulysses > 1:
        # One all-to-all of an N-byte tensor sends N(U-1)/U; per pass: two q-sized tensors
        # (q and out forward, dout and dq backward) and two kv-sized ones (k, v / dk, dv).
        row_bytes = batch * tokens_per_rank * head_dim * element_bytes
        all_to_all_forward = (ulysses - 1) * (row_bytes * (2 * q_heads + 2 * kv_in_all_to_all)
                                              // ulysses)
        all_to_all_backward = all_to_all_forward
    # After the all-to-all a rank holds seq_len/ring tokens of kv_in_all_to_all/ulysses kv heads.
    ring_kv_heads = kv_in_all_to_all // ulysses if ulysses > 1 else kv_heads
    block_elements = batch * (seq_len // ring) * ring_kv_heads * head_dim
    return AttentionTraffic(
        all_to_all_forward=all_to_all_forward,
        all_to_all_backward=all_to_all_backward,
        ring_kv_send=2 * block_elements * element_bytes if ring > 1 else 0,
        ring_grad_send=2 * block_elements * accumulator_bytes(element_bytes) if ring > 1 else 0,
        ring=ring,
        ulysses=ulysses,
    )
