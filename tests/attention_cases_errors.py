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
        _expect_value_error(lambda: attention(x(4, 3), x(4, 3), x(4, 3), topology),
                            "n_q_heads=3", "ulysses=2"),
        _expect_value_error(lambda: attention(x(4, 12), x(4, 3), x(4, 3), topology),
                            "n_kv_heads=3", "ulysses=2"),
        _expect_value_error(lambda: attention(x(4, 4), x(4, 3), x(4, 3), topology),
                            "n_q_heads=4", "n_kv_heads=3"),
        _expect_value_error(lambda: attention(x(4, 4), x(5, 4), x(5, 4), topology), "(1, 4, 4, 8)"),
        _expect_value_error(lambda: attention(x(4, 4), x(4, 4), x(4, 2), topology), "k and v"),
        _expect_value_error(
            lambda: attention(x(4, 4), x(4, 4, torch.float64), x(4, 4), topology), "float64"),
        _expect_value_error(lambda: attention(x(4, 4), x(4, 4), x(4, 4), topology, layout="zig"),
                            "'zig'", "contiguous"),
        _expect_value_error(lambda: attention(x(4, 4), x(4, 4), x(4, 4), topology, kernel="fa9"),
                            "'fa9'", "cpu_flash"),
        _expect_value_error(
            lambda: attention(x(4, 4), x(4, 4), x(4, 4), topology, kernel="cuda_flash"), "cuda"),
        _expect_value_error(lambda: usp.Topology.build(ring=3), "ring=3", "4"),
        _expect_value_error(lambda: usp.Topology.build(ring=2, ulysses=2, dp=2), "dp=2", "4"),
        _expect_value_error(lambda: usp.ring_attention(x(4, 4), x(4, 4), x(4, 4), topology),
                            "ulysses=2"),
        _expect_value_error(lambda: usp.shard_sequence(torch.zeros(1, 6), topology, "zigzag"),
                            "6", "8"),
    ]
    # after all of that, the ranks are still in step: a real call works
    q = torch.randn(1, 4, 4, 8)
    usp.usp_attention(q, q, q, topology, causal=True)
    return messages
