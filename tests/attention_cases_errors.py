"""Bad input for the attention API: each must raise ValueError naming the numbers, on every rank."""

from __future__ import annotations

import torch

import usp


def _expect_value_error(call, *fragments: str) -> str:
    try:
        call()
    except ValueError as exc:
        message = str(exc)
        missing = [f for f in fragments if f not in message]
        if missing:
            raise AssertionError(f"message {message!r} lacks {missing}") from exc
        return message
    raise AssertionError(f"no ValueError; expected one mentioning {fragments}")


def bad_inputs(rank: int, world_size: int) -> list[str]:
    """Runs on 4 ranks. Returns the messages so the test can check every rank said the same."""
    topology = usp.Topology.build(ring=2, ulysses=2)
    pure_ring = usp.Topology.build(ring=4, ulysses=1)
    x = lambda s, h, dtype=torch.float32: torch.zeros(1, s, h, 8, dtype=dtype)  # noqa: E731
    attention = usp.usp_attention
    messages = [
        # zigzag over ring 4 needs the sequence to be a multiple of 8: 4 ranks x 3 tokens = 12
        _expect_value_error(lambda: attention(x(3, 4), x(3, 4), x(3, 4), pure_ring, causal=True),
                            "12", "zigzag", "16"),
        _expect_value_error(lambda: attention(x(4, 4), x(4, 3), x(4, 3), topology),
                            "n_q_heads=4", "n_kv_heads=3"),
        _expect_value_error(lambda: attention(x(4, 4), x(5, 4), x(5, 4), topology), "(1, 4, 4, 8)"),
        _expect_value_error(lambda: attention(x(4, 4), x(4, 4), x(4, 2), topology), "k and v"),
        _expect_value_error(
            lambda: attention(x(4, 4), x(4, 4, torch.float64), x(4, 4), topology), "float64"),
        _expect_value_error(lambda: attention(x(4, 4), x(4, 4), x(4, 4), topology, layout="zig"),
                            "'zig'", "contiguous"),
        # contiguous shards of 3 over ring 4: ring blocks of 3 slots cannot be cut in halves
        _expect_value_error(lambda: attention(x(3, 4), x(3, 4), x(3, 4), pure_ring, causal=True,
                                              layout="contiguous", ring_layout="zigzag"),
                            "ring block of 3 slots", "multiple of 8", "'stripe'"),
        _expect_value_error(lambda: attention(x(4, 4), x(4, 4), x(4, 4), topology,
                                              layout="contiguous", ring_layout="zag"), "'zag'"),
        _expect_value_error(lambda: attention(x(4, 4), x(4, 4), x(4, 4), topology, kernel="fa9"),
                            "'fa9'", "cpu_flash"),
        _expect_value_error(
            lambda: attention(x(4, 4), x(4, 4), x(4, 4), topology, kernel="cuda_flash"), "cuda"),
        _expect_value_error(lambda: usp.Topology.build(ring=3), "ring=3", "4"),
        _expect_value_error(lambda: usp.Topology.build(ring=2, ulysses=2, dp=2), "dp=2", "4"),
        _expect_value_error(lambda: usp.ring_attention(x(4, 4), x(4, 4), x(4, 4), topology),
                            "ulysses=2"),
        # 4 slots per rank x 4 ranks = 16 slots: 3 tokens would have been padded to 4, not 16
        _expect_value_error(lambda: attention(x(4, 4), x(4, 4), x(4, 4), topology, seq_len=3),
                            "seq_len=3", "16 slots"),
        _expect_value_error(
            lambda: attention(x(4, 4), x(4, 4), x(4, 4), topology, window=(2, 0),
                              kernel="cuda_efficient"), "cuda"),
        _expect_value_error(
            lambda: attention(x(4, 4), x(4, 4), x(4, 4), topology,
                              documents=torch.tensor([0, 1, 0] + [2] * 13)), "contiguous run"),
    ]
    messages += malformed_masks(topology)
    messages += rank_dependent_inputs(rank, topology, pure_ring)
    # after all of that, the ranks are still in step: a real call works
    q = torch.randn(1, 4, 4, 8)
    usp.usp_attention(q, q, q, topology, causal=True)
    check_from_mesh_and_module()
    check_strided_and_nan_inputs(pure_ring)
    check_windows_beyond_the_sequence(topology)
    return messages


def malformed_masks(topology) -> list[str]:
    """Mask arguments of the wrong type, dtype, shape or range: a ValueError naming the argument,
    never a truncation (5.9 -> 5), a rounding (2.7 -> 2) or a silent padding of a short mask."""
    x = torch.zeros(1, 4, 4, 8)

    def call(**mask):
        return lambda: usp.usp_attention(x, x, x, topology, **mask)

    return [
        _expect_value_error(call(cu_seqlens=torch.tensor([0, 5.9, 16.0])), "cu_seqlens",
                            "integers", "float32"),
        _expect_value_error(call(cu_seqlens=[0, 5.9, 16]), "cu_seqlens", "integers"),
        _expect_value_error(call(documents=torch.full((16,), 0.7)), "documents", "integers"),
        _expect_value_error(call(documents="abc"), "documents", "'abc'"),
        _expect_value_error(call(documents=torch.zeros(16, dtype=torch.int64, device="meta")),
                            "documents", "meta"),
        _expect_value_error(call(documents=torch.zeros(2, 2, 16, dtype=torch.int64)),
                            "documents", "(2, 2, 16)"),
        _expect_value_error(call(documents=torch.full((16,), -3)), "documents", "-3"),
        _expect_value_error(call(window=(2.7, 0)), "window=(2.7, 0)", "int"),
        _expect_value_error(call(window=(float("inf"), 0)), "window", "int"),
        _expect_value_error(call(window=(True, 0)), "window", "int"),
        _expect_value_error(call(window=3), "window=3", "pair"),
        _expect_value_error(call(window=(-2, 0)), "window=(-2, 0)", ">= 0"),
        _expect_value_error(call(padding_mask=torch.ones(1, 10, dtype=torch.bool)),
                            "padding_mask covers 10 positions", "16"),
        _expect_value_error(call(padding_mask=torch.tensor(True)), "padding_mask", "[B, S]"),
        _expect_value_error(call(padding_mask=torch.full((1, 16), 0.5)), "padding_mask",
                            "integers"),
        _expect_value_error(call(padding_mask=torch.full((1, 16), 2)), "padding_mask", "1/0"),
        _expect_value_error(call(causal="yes"), "causal='yes'"),
        _expect_value_error(call(mask="causal"), "usp.AttentionMask"),
    ]


def check_windows_beyond_the_sequence(topology) -> None:
    """Window sides near the integer limit mean every key: full attention, exactly."""
    import sys

    from tests.attention_cases import reference

    g = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(1, 16, 4, 8, generator=g, dtype=torch.float64) for _ in range(4))
    expected = reference(q, k, v, dout, causal=False)
    shard = lambda t: usp.shard_sequence(t, topology, "zigzag")  # noqa: E731
    for window in ((sys.maxsize, sys.maxsize), (-1, 2 ** 63 - 1), (2 ** 63 - 1, -1)):
        leaves = [shard(t).requires_grad_() for t in (q, k, v)]
        out = usp.usp_attention(*leaves, topology, window=window)
        out.backward(shard(dout))
        for got, want in zip((out, *(t.grad for t in leaves)), expected):
            torch.testing.assert_close(got, shard(want), atol=1e-10, rtol=0,
                                       msg=lambda m: f"window={window}: {m}")


def rank_dependent_inputs(rank: int, topology, pure_ring) -> list[str]:
    """Ranks that disagree, or one rank with bad input: the same ValueError everywhere, no hang
    (a hang would exceed the spawn's timeout), and the ranks stay in step."""
    x = lambda s, h=4, d=8: torch.zeros(1, s, h, d)  # noqa: E731
    attention = usp.usp_attention
    first = rank == 0
    return [
        _expect_value_error(lambda: attention(x(4), x(4), x(4), topology, causal=first),
                            "disagree", "causal", "True on ranks [0]", "False on ranks [1, 2, 3]"),
        _expect_value_error(
            lambda: attention(x(4), x(4), x(4), pure_ring, layout="zigzag" if first else "stripe"),
            "disagree", "layout", "'stripe' on ranks [1, 2, 3]"),
        _expect_value_error(
            lambda: attention(x(4), x(4), x(4), topology, softmax_scale=0.5 if first else 0.25),
            "disagree", "softmax_scale", "0.5 on ranks [0]"),
        _expect_value_error(lambda: attention(*[x(8 if first else 4)] * 3, topology),
                            "disagree", "shapes", "(1, 8, 4, 8)"),
        # one rank's own validation error reaches every rank, with its message
        _expect_value_error(
            lambda: attention(x(4), x(4, 3 if rank == 2 else 4), x(4, 3 if rank == 2 else 4),
                              topology), "n_q_heads=4", "n_kv_heads=3", "rank 2"),
        _expect_value_error(lambda: attention(x(0), x(0), x(0), topology), "(1, 0, 4, 8)", "empty"),
        _expect_value_error(lambda: attention(x(4, d=0), x(4, d=0), x(4, d=0), topology),
                            "(1, 4, 4, 0)", "empty"),
        _expect_value_error(
            lambda: attention(x(4), x(4), x(4), topology, softmax_scale=float("nan")),
            "softmax_scale=nan", "finite"),
        # an exception that is no ValueError, on one rank only, reaches every rank too
        _expect_value_error(
            lambda: attention(x(4), x(4), x(4), topology,
                              softmax_scale="abc" if rank == 2 else None),
            "TypeError", "rank 2"),
    ] + late_disagreements(rank, topology)


def late_disagreements(rank: int, topology) -> list[str]:
    """Ranks that agreed on two calls before, then pass one each: the agreement runs every call,
    so they get the same ValueError instead of entering different collectives."""
    x = torch.zeros(1, 4, 4, 8)
    first = rank == 0
    calls = {
        "documents": ({"cu_seqlens": torch.tensor([0, 5, 16])},
                      {"cu_seqlens": torch.tensor([0, 9, 16])}),
        "window": ({"window": (2, 0)}, {"window": (3, 0)}),
        "causal": ({"causal": True}, {"causal": False}),
    }
    messages = []
    for field, (one, other) in calls.items():
        usp.usp_attention(x, x, x, topology, **one)  # both agreed, every rank alike
        usp.usp_attention(x, x, x, topology, **other)
        messages.append(_expect_value_error(
            lambda: usp.usp_attention(x, x, x, topology, **(one if first else other)),
            "disagree", field, "on ranks [0]", "on ranks [1, 2, 3]"))
    return messages


def check_strided_and_nan_inputs(pure_ring) -> None:
    """A strided head dim is read correctly; a NaN in q or k propagates to exactly the rows that
    read it (CPU flash returns 0 for a NaN query row; usp must not), at ring 4 and in one process."""
    from tests.attention_cases import reference

    g = torch.Generator().manual_seed(5)
    wide = torch.randn(1, 16, 2, 16, generator=g, dtype=torch.float64)
    q, k, v, dout = wide[..., ::2], *(torch.randn(1, 16, 2, 8, generator=g,
                                                  dtype=torch.float64) for _ in range(3))
    expected = reference(q.contiguous(), k, v, dout, causal=True)
    trivial = usp.Topology(sizes={"dp": 1, "ring": 1, "ulysses": 1, "tp": 1},
                           ranks={"dp": 0, "ring": 0, "ulysses": 0, "tp": 0})
    for topology in (pure_ring, trivial):
        shard = lambda t: usp.shard_sequence(t, topology, "zigzag")  # noqa: E731
        local_q = shard(wide).requires_grad_()
        out = usp.usp_attention(local_q[..., ::2], shard(k), shard(v), topology, causal=True)
        out.backward(shard(dout))
        torch.testing.assert_close(out, shard(expected[0]), atol=1e-10, rtol=0)
        torch.testing.assert_close(local_q.grad[..., ::2], shard(expected[1]), atol=1e-10, rtol=0)
        assert local_q.grad[..., 1::2].abs().max() == 0

        bad_q, bad_k = q.contiguous().clone(), k.clone()
        bad_q[0, 5, 1, 3] = float("nan")  # query 5, head 1: only that output row turns NaN
        bad_k[0, 9, 0, 0] = float("nan")  # key 9 of kv head 0: every causal row >= 9 of head 0
        out = usp.unshard_sequence(
            usp.usp_attention(shard(bad_q), shard(bad_k), shard(v), topology, causal=True),
            topology, "zigzag")
        nan_rows = out.isnan().any(dim=-1)[0]  # [S, H]
        want = torch.zeros(16, 2, dtype=torch.bool)
        want[5, 1] = True
        want[9:, 0] = True
        assert torch.equal(nan_rows, want), nan_rows.nonzero().tolist()


def check_from_mesh_and_module() -> None:
    """A user's own DeviceMesh (context-first order, no dp axis) drives USPAttention exactly."""
    from torch.distributed.device_mesh import init_device_mesh

    from tests.attention_cases import global_tensors, reference, Case

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ulysses", "ring"))
    topology = usp.Topology.from_mesh(mesh)
    assert topology.placement == "context-first"
    assert (topology.size("dp"), topology.ring_size, topology.ulysses_size) == (1, 2, 2)
    assert topology.sequence_rank == topology.ring_rank * 2 + topology.ulysses_rank
    case = Case(2, 2, "stripe", True, 2, "fp64")
    q, k, v, dout = global_tensors(case, 4, 16)
    expected = reference(q, k, v, dout, causal=True)
    module = usp.USPAttention(topology, causal=True, layout="stripe")
    leaves = [usp.shard_sequence(t, topology, "stripe").requires_grad_() for t in (q, k, v)]
    out = module(*leaves)
    out.backward(usp.shard_sequence(dout, topology, "stripe"))
    for got, want in zip((out, *(t.grad for t in leaves)), expected):
        torch.testing.assert_close(got, usp.shard_sequence(want, topology, "stripe"),
                                   atol=1e-10, rtol=0)
    gathered = usp.unshard_sequence(out, topology, "stripe")
    torch.testing.assert_close(gathered, expected[0], atol=1e-10, rtol=0)
