"""No host synchronisation on the hot path of a training step (needs a GPU).

A forward and backward of a packed-documents Llama through ``usp.parallelize`` runs under
``torch.cuda.set_sync_debug_mode("error")``: any ``.item()``, ``.cpu()``, boolean indexing or
host-to-device copy that waits for the GPU's queue raises. The mask of each step is built on the
host from host documents (what ``usp train`` passes), once per step.
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()


def _documents(seq_len: int, cut: int) -> torch.Tensor:
    documents = torch.zeros(1, seq_len, dtype=torch.int64)
    documents[:, cut:] = 1
    return documents


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_a_training_step_never_waits_for_the_gpu(checkpointing):
    from usp.models import Llama, LlamaConfig
    from usp.parallel import parallelize
    from usp.topology import Topology

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, dim=256, n_layers=3, n_heads=4, n_kv_heads=2,
                         ffn_dim=512)
    model = Llama(config).cuda().to(torch.bfloat16)
    model = parallelize(model, Topology.build(), layout="zigzag",
                        activation_checkpointing=checkpointing)
    seq_len = 512
    tokens = torch.randint(0, 256, (1, seq_len), device="cuda")
    positions = torch.arange(seq_len, device="cuda")[None]

    def step(documents):
        logits = model(tokens, positions, documents)
        logits.float().square().mean().backward()

    step(_documents(seq_len, 100))  # warm-up: kernels probed and chosen, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(_documents(seq_len, 300))  # a new batch: its mask is built on the host
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
