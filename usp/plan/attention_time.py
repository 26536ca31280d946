"""Time of one sequence-parallel attention call on one GPU: Ulysses all-to-alls, the ring pass
and its merges, forward and backward.

The training step (:mod:`usp.plan.cost`) runs this once per layer and pass; the comparisons with
published attention benchmarks (:mod:`usp.bench.plan_published`) run it alone. Three things
decide a ring pass beyond its FLOPs and bytes (docs/cost-model.md §6 derives each):

- **the layout.** Zigzag and stripe give every ring rank the same causal work at every step. The
  contiguous layout does not: at step ``s`` ring rank ``r`` meets the block of rank ``r - s``,
  wholly visible when ``r > s``, so after the diagonal step the last rank computes a whole block
  at every step while its peers wait for the next hop. A causal pass then lasts ``R - 1/2``
  blocks instead of ``R/2``.
- **the size of each kernel call.** A flash-attention kernel pays a fixed cost per query row
  (loading the query tile, the softmax epilogue, writing the output and log-sum-exp), worth
  ``ClusterSpec.attention_overhead_keys`` keys; a call whose rows meet ``k`` keys on average runs
  at ``k / (k + that)`` of the long-call rate. Ring steps are short calls: ``S/R`` keys, half of
  them under a causal mask.
- **overlap.** Each step's compute hides the next block's transfer; when compute per step is
  shorter than a hop, the hop is what the step costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from usp.choices import LAYOUTS
from usp.plan.collectives import AttentionTraffic, transfer_seconds
from usp.plan.config import GroupPlacement
from usp.plan.specs import ClusterSpec

ATTENTION_BACKWARD_FACTOR = 2.5  # flash backward: 5 matmuls (P recomputed) vs 2 forward
FP32_BYTES = 4


@dataclass(frozen=True)
class RingImplementation:
    """What a ring implementation does per step besides its kernel: the bytes its merges move
    (in fp32 words per element, plus one read of the block in the input dtype) and how many
    device operations the host launches."""

    name: str
    merge_forward_words: int  # per query element of the rank's block
    merge_backward_q_words: int  # dq accumulation, per query element
    merge_backward_kv_words: int  # dk and dv accumulation and hand-over, per k (and v) element
    merges_forward: str  # "every step", or "after the first" (the first block is only cast)
    operations: tuple[int, int]  # launched per ring step, forward and backward
    call_operations: int  # launched by one call without a ring (kernel, all-to-alls, packing)


# usp.attention.ring as it runs: merge_into's eager elementwise kernels. Forward, per element:
# out *= w (read and write fp32), the block cast to fp32 (read e, write 4), times its weight
# (read and write 4), added to out (read 8, write 4): 8 words + e. Backward: dq += block (read
# 4 + e, write 4); per k and v element the buffer reset (write 4), += block (read 4 + e, write
# 4) and += the incoming partial (read 8, write 4). About a dozen launches per forward step
# (the kernel, merge_into's elementwise operations, the exchange), ten backward.
USP_RING = RingImplementation("usp", 8, 2, 6, "every step", (15, 10), 8)
# A merge fused into one kernel (ring-flash-attention's and YunChang's TorchScript
# update_out_and_lse; assumed for TransformerEngine's context parallelism): read out and the
# block, write out.
FUSED_RING = RingImplementation("fused", 2, 2, 4, "after the first", (5, 6), 6)


@dataclass(frozen=True)
class AttentionShape:
    """The attention one GPU runs: ``[batch, seq_len, heads, head_dim]`` over the whole sequence
    (before any split), ``q_heads``/``kv_heads`` as this GPU sees them (after a TP split)."""

    batch: int
    seq_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    element_bytes: int
    causal: bool = True

    @property
    def pairs(self) -> float:
        """(query, key) pairs of one head of one sequence."""
        return self.seq_len * (self.seq_len + 1) / 2 if self.causal else self.seq_len ** 2


@dataclass(frozen=True)
class AttentionTime:
    """Seconds of one call on one GPU, by part; ``forward`` and ``backward`` are the totals."""

    compute_forward: float  # the kernels' FLOPs at the rate of their call size
    compute_backward: float
    ring_forward: float  # the ring pass: its compute, exposed hops, waits for the slowest rank
    ring_backward: float
    merge_forward: float  # folding each ring step into fp32 accumulators (memory-bound)
    merge_backward: float
    all_to_all: float  # the Ulysses all-to-alls of one pass (forward and backward alike)
    kv_hop: float  # one hop of the k/v block
    grad_hop: float  # one hop of the fp32 dk/dv block

    @property
    def forward(self) -> float:
        return self.ring_forward + self.merge_forward + self.all_to_all

    @property
    def backward(self) -> float:
        return self.ring_backward + self.merge_backward + self.all_to_all


def call_efficiency(keys_per_row: float, overhead_keys: float) -> float:
    """Fraction of the long-call rate a kernel call reaches when its rows meet ``keys_per_row``
    keys on average: the fixed work per row is worth ``overhead_keys`` keys."""
    return keys_per_row / (keys_per_row + overhead_keys)


def keys_per_row(shape: AttentionShape, ring: int, layout: str) -> float:
    """Average keys a query row meets in the slowest rank's kernel call of one ring step.

    A ring step meets a block of ``S/R`` keys. Under a causal mask a balanced layout computes
    half of it (zigzag: half the queries or half the keys; stripe: a shifted triangle), and the
    slowest rank of a step runs the smaller call; the contiguous layout's slowest rank meets whole
    blocks after the diagonal step.
    """
    block = shape.seq_len / ring
    if shape.causal and not (layout == "contiguous" and ring > 1):
        return block / 2
    return block


def relayout_moved(ring: int, source: str, target: str) -> float:
    """The largest share of a ring block that leaves its rank when the blocks are re-laid from
    ``source`` to ``target`` (``usp.attention.relayout``): contiguous and zigzag share only
    the chunks they both put on a rank (half of rank 0's block, none of a middle rank's at
    R > 2); stripe keeps ``1/R`` of any other layout's block."""
    if source == target or ring == 1:
        return 0.0
    if {source, target} == {"contiguous", "zigzag"}:
        return max(1 - len({2 * r, 2 * r + 1} & {r, 2 * ring - 1 - r}) / 2 for r in range(ring))
    return 1 - 1 / ring


def _ring_pass(step_compute: float, hop: float, ring: int, first_step: float, tail: float,
               hides: bool, issue: float = 0.0) -> float:
    """``ring`` steps: the first computes ``first_step`` on the local block, each later step
    ``step_compute`` while the next block travels (``hides``; else after it), then ``tail``.
    A step lasts at least ``issue``, the host's time to launch its operations: the device runs
    ahead of the host only while its work per step is longer."""
    if ring == 1:
        return max(first_step, issue)
    if not hides:
        return first_step + (ring - 1) * (step_compute + hop) + tail
    return (max(first_step, hop, issue) + (ring - 2) * max(step_compute, hop, issue)
            + max(step_compute, issue) + tail)


def attention_time(shape: AttentionShape, traffic: AttentionTraffic, cluster: ClusterSpec,
                   ulysses: GroupPlacement, ring: GroupPlacement, layout: str = "zigzag",
                   rate_share: float = 1.0, hides: bool = True,
                   implementation: RingImplementation = USP_RING) -> AttentionTime:
    """Seconds of one ``usp_attention`` call of ``shape`` on one GPU of a ring x Ulysses grid.

    ``traffic`` is the call's exact per-rank traffic (:func:`usp.plan.collectives.
    attention_traffic`); ``rate_share`` the share of the GPU's compute and memory bandwidth a
    rank gets (below 1 on oversubscribed CPU nodes); ``hides`` whether a transfer runs under
    compute at all; ``implementation`` what the ring does per step besides its kernel (usp's, or
    another library's for published comparisons).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}")
    R, U = traffic.ring, traffic.ulysses
    peak = cluster.peak_tflops * 1e12 * rate_share
    hbm = cluster.hbm_bandwidth_gbs * 1e9 * rate_share
    efficiency = call_efficiency(keys_per_row(shape, R, layout), cluster.attention_overhead_keys)
    rate = peak * cluster.attention_efficiency * efficiency
    q_heads = shape.q_heads // U
    # every rank's share of the causal triangle (balanced layouts), at the call's rate
    flops = 4 * shape.batch * shape.q_heads * shape.head_dim * shape.pairs / (R * U)
    forward, backward = flops / rate, ATTENTION_BACKWARD_FACTOR * flops / rate

    kv_hop = transfer_seconds("p2p", traffic.ring_kv_send, 1, ring, cluster)
    grad_hop = transfer_seconds("p2p", traffic.ring_grad_send, 1, ring, cluster)
    # One block of the ring is (S/R)^2 pairs; a balanced causal step computes half of it, so a
    # pass of R steps costs C/R per step. The contiguous layout's slowest rank computes the
    # diagonal half-block, then a whole block at each of the R-1 later steps.
    if shape.causal and layout == "contiguous" and R > 1:
        step_fwd, step_bwd = 2 * forward / R, 2 * backward / R
    else:
        step_fwd, step_bwd = forward / R, backward / R
    launch, ops = cluster.launch_us * 1e-6, implementation
    issue_fwd, issue_bwd = ((ops.operations[0] * launch, ops.operations[1] * launch) if R > 1
                            else (ops.call_operations * launch,) * 2)
    ring_fwd = _ring_pass(step_fwd, kv_hop, R, forward / R, 0.0, hides, issue_fwd)
    ring_bwd = _ring_pass(step_bwd, kv_hop + grad_hop, R, backward / R, grad_hop, hides,
                          issue_bwd)

    # Each ring step folds its block into fp32 accumulators: memory-bound passes over this
    # rank's queries after the all-to-all, [b, S/R, H/U, D] (and, backward, its k/v block).
    e = shape.element_bytes
    out_elements = shape.batch * (shape.seq_len // R) * q_heads * shape.head_dim
    kv_elements = traffic.ring_kv_send / (2 * e) if R > 1 else 0.0  # one of k, v in one block
    merges = (R if ops.merges_forward == "every step" else R - 1) if R > 1 else 0
    merge_fwd = merges * out_elements * (ops.merge_forward_words * FP32_BYTES + e) / hbm
    merge_bwd = (R - 1) * (out_elements * (ops.merge_backward_q_words * FP32_BYTES + e)
                           + 2 * kv_elements * (ops.merge_backward_kv_words * FP32_BYTES + e)
                           ) / hbm
    all_to_all = (transfer_seconds("all_to_all", traffic.all_to_all_forward, 2, ulysses, cluster)
                  if U > 1 else 0.0)
    return AttentionTime(
        compute_forward=forward, compute_backward=backward,
        ring_forward=ring_fwd, ring_backward=ring_bwd,
        merge_forward=merge_fwd, merge_backward=merge_bwd,
        all_to_all=all_to_all, kv_hop=kv_hop, grad_hop=grad_hop,
    )
