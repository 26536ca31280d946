"""``usp generate`` for the Llama family (its ``InferenceAdapter``'s generation,
``usp.models.llama.family``): a preset with random weights from a seed, byte-level tokens
(``usp train``'s own), and usp's prefill and decode over the sharded KV cache
(``usp.infer.generate``)."""

from __future__ import annotations

import torch

from usp.infer.generate import generate
from usp.models.family import ModelSettings
from usp.models.llama import Llama, get_config
from usp.precision import torch_dtype
from usp.topology import Topology
from usp.inputs.byte_tokens import EOT, decode, encode  # the byte-level tokenizer of usp train


def generate_text(settings: ModelSettings, text: str, topology: Topology, *, seed: int,
                  layout: str, ring_pass: str, kernel: str, dtype: str,
                  max_new_tokens: int) -> dict:
    """Greedy generation after ``text`` on this rank (every rank of the world calls it)."""
    model = Llama(get_config(settings.model))
    model.init_weights(seed=seed)
    model = model.to(torch_dtype(dtype)).eval()
    prompt = torch.tensor([encode(text)], dtype=torch.long)
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty: it holds no text")
    result = generate(model, prompt, topology, max_new_tokens=max_new_tokens, layout=layout,
                      ring_pass=ring_pass, kernel=kernel)
    tokens = result.tokens[0].tolist()
    return {"model": f"{settings.model} (random init, seed {seed})",
            "notes": [f"(untrained {settings.model} model: random text; pass --hf-model DIR for "
                      "a trained one)"],
            "prompt_tokens": prompt.shape[1], "tokens": tokens, "text": byte_text(tokens),
            "prefill_seconds": result.prefill_seconds, "token_seconds": result.token_seconds}


def byte_text(tokens: list[int]) -> str:
    """Text of byte-level ids; ids past the byte vocabulary (a random model's) show as ``<id>``."""
    pieces, run = [], []
    for token in tokens:
        if 0 <= token <= EOT:
            run.append(token)
        else:
            pieces += [decode(run), f"<{token}>"]
            run = []
    return "".join(pieces + [decode(run)])
