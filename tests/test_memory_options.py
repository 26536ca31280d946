"""The memory features' options: what each refuses (on the CPU: activation offload), the held-out
split, and on CUDA (marked ``gpu``) the gradients with and without activation offload."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from usp.losses import check_loss
from usp.memory import ActivationOffload, checkpoint_kinds
from usp.memory.offload import is_parameter
from usp.models import Llama, LlamaConfig
from usp.parallel import check_memory_options
from usp.topology import AXES, Topology
from usp.training.evaluate import held_out_split
from usp.training.setup import validate
from tests.specs import run_spec


def _topology(**degrees) -> Topology:
    return Topology({axis: degrees.get(axis, 1) for axis in AXES}, {axis: 0 for axis in AXES})


def test_checkpointing_kinds_keep_the_presets_and_refuse_what_does_not_exist():
    assert checkpoint_kinds("none") == frozenset()
    assert checkpoint_kinds("full") == checkpoint_kinds("block") == {"block"}
    assert checkpoint_kinds("selective") == checkpoint_kinds("mlp") == {"mlp"}
    assert checkpoint_kinds("attention, mlp") == {"attention", "mlp"}
    with pytest.raises(ValueError, match=r"\['norm'\] unknown"):
        checkpoint_kinds("attention,norm")
    with pytest.raises(ValueError, match="'block' recomputes the whole block"):
        checkpoint_kinds("block,mlp")
    with pytest.raises(ValueError, match="recompute it twice"):
        check_memory_options("selective", 512)


def test_losses_refuse_the_wrong_tensor_parallel_degree():
    check_loss("chunked", _topology(ring=2))
    check_loss("vocab_parallel", _topology(tp=2))
    with pytest.raises(ValueError, match="tp=1 splits nothing"):
        check_loss("vocab_parallel", _topology())
    with pytest.raises(ValueError, match="with tp=2 it is split over the vocabulary"):
        check_loss("chunked", _topology(tp=2))
    with pytest.raises(ValueError, match="choose one of"):
        check_loss("sampled", _topology())


@pytest.mark.parametrize("change,message", [
    ({"offload_activations": True, "device": "cpu"}, "there is nothing to offload"),
    ({"grad_accum": 3, "global_batch": 4}, "not divisible by dp=1 x --grad-accum=3"),
    ({"grad_accum": 2, "global_batch": 4, "pp": 2, "nproc": 2}, "use --microbatches instead"),
    ({"eval_every": 2, "eval_batches": 0}, "--eval-batches=0 >= 1"),
    ({"loss": "vocab_parallel"}, "tp=1 splits nothing"),
    ({"ac": "mlp", "tiled_mlp": 256}, "recompute it twice"),
])
def test_usp_train_refuses_bad_memory_options_before_launch(change, message, tmp_path):
    config = run_spec(synthetic=True, out=str(tmp_path / "run")).replace(**change)
    with pytest.raises(ValueError, match=message):
        validate(config, config.nproc)


def test_activation_offload_on_the_cpu_is_an_error_not_a_no_op():
    with pytest.raises(ValueError, match="nothing to offload"):
        ActivationOffload(torch.device("cpu"))


def test_the_held_out_split_is_disjoint_from_training_and_fixed():
    tokens = torch.arange(1000)
    training, held_out = held_out_split(tokens, global_batch=2, seq_len=10, batches=3)
    batches = list(held_out.batches())
    assert [tuple(b.shape) for b in batches] == [(2, 11)] * 3
    assert torch.equal(torch.stack(batches).flatten().unique(), torch.arange(1000 - 61, 1000))
    assert torch.equal(training, torch.arange(1000 - 61))  # no label on both sides
    assert all(torch.equal(a, b) for a, b in zip(batches, held_out.batches()))
    with pytest.raises(ValueError, match="fewer than --global-batch=2"):
        held_out_split(torch.arange(60), global_batch=2, seq_len=10, batches=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_activation_offload_gives_the_same_gradients_on_cuda():
    config = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    tokens = torch.randint(0, 64, (2, 129), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(128, device="cuda").expand(2, 128)
    grads, saved_on_device = [], []
    for offload in (False, True):
        model = Llama(config).cuda()
        model.init_weights(1)
        hooks = ActivationOffload(torch.device("cuda"), saved_on_device.append) if offload else None
        with hooks if hooks is not None else torch.enable_grad():
            logits = model(tokens[:, :-1], positions)
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, offloaded in zip(*grads):  # (CUDA's embedding backward adds in any order)
        torch.testing.assert_close(offloaded, plain)
    assert saved_on_device and all(is_parameter(t) for t in saved_on_device)
