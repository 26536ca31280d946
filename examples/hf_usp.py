"""A Hugging Face model trained with sequence parallelism: ``attn_implementation="usp"``.

    torchrun --nproc-per-node 4 examples/hf_usp.py --ring 2 --ulysses 2
    torchrun --nproc-per-node 4 examples/hf_usp.py --ulysses 4 --model-type qwen3
    python examples/hf_usp.py                      # one process: plain attention, same numbers

Every rank holds 1/(ring*ulysses) of each sequence (zigzag layout). The model is an ordinary
transformers model built from a config (random init, nothing downloaded); only the attention
implementation, the sharded inputs and the loss change. Gradients are summed over the ranks
(each rank's loss gradient is its share of the global mean). Step 1 also prints the loss of the
same model run on the whole batch in one process with eager attention: the two agree.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from usp import Topology
from usp.integrations.transformers import USPContext


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--model-type", default="llama", help="llama, qwen2, qwen3, mistral, ...")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    topology = Topology.build(ring=args.ring, ulysses=args.ulysses)

    config = AutoConfig.for_model(
        args.model_type, vocab_size=512, hidden_size=128, intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        **({"sliding_window": None} if args.model_type == "mistral" else {}),
    )
    torch.manual_seed(0)  # the same initial weights on every rank
    model = AutoModelForCausalLM.from_config(config, attn_implementation="usp")
    context = USPContext(topology, layout="zigzag")
    context.prepare(model)  # fails here, with the reason, for settings usp cannot run exactly
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    for step in range(1, args.steps + 1):
        tokens = torch.randint(0, 512, (args.batch, args.seq_len),
                               generator=torch.Generator().manual_seed(step))
        inputs = context.shard(tokens)  # this rank's input_ids, global position_ids, labels
        logits = model(
            input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
            usp_context=context, use_cache=False,
        ).logits
        loss = context.loss(logits, inputs["labels"])  # the exact global mean
        if step == 1:
            reference = check_against_one_process(model, tokens)
        loss.backward()
        if dist.is_initialized():
            for param in model.parameters():  # sum the ranks' shares of the gradient
                dist.all_reduce(param.grad)
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            extra = f"   (one process, eager attention: {reference:.6f})" if step == 1 else ""
            print(f"step {step}: loss {loss.item():.6f}{extra}")
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def check_against_one_process(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """The loss of the same weights on the whole batch, in one process, with eager attention."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    logits = eager(input_ids=tokens, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()


if __name__ == "__main__":
    main()
