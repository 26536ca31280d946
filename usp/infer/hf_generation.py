"""``usp generate --hf-model DIR`` (the Hugging Face family's ``InferenceAdapter``,
``usp.integrations.hf_family.family``): ``model.generate`` over a :class:`~usp.infer.hf.USPCache`.

The folder is checked in the launching process before any rank starts
(:func:`check_hf_generation`) and read without running code from it
(``trust_remote_code=False``, safetensors only); every rank then loads it and generates
(:func:`hf_generate`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from usp.infer.hf import USPCache
from usp.integrations.hf_mixers import unsplit_mixers
from usp.integrations.transformers import check_sequence_mixers
from usp.models.family import ModelSettings
from usp.precision import torch_dtype
from usp.topology import Topology


class _Clock:
    """A ``generate`` streamer that only notes when each batch of tokens arrives: the prompt
    first, then every new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""


def check_hf_generation(model_dir: str, text: str, ranks: int, dtype: torch.dtype) -> None:
    """``usp generate --hf-model DIR``'s input, checked in the launching process before any rank
    starts: DIR is a Hugging Face model folder (not a usp run or checkpoint) whose config, weights
    and tokenizer need no custom code; the sizes are positive and ``ranks`` whole copies of the
    model fit this machine's memory; every weight is finite; the prompt has tokens, and the
    tokenizer's ids fit the model's vocabulary."""
    from safetensors import safe_open

    from usp.integrations.hf_family.config import load_hf_config
    from usp.integrations.hf_family.model import build_hf_causal_lm
    from usp.integrations.hf_family.weights import check_pretrained, read_headers, weight_files
    from usp.inputs import model_size
    from usp.inputs.tokenizer import check_vocab, load_tokenizer

    flag = "--hf-model"
    config = load_hf_config(model_dir, flag)
    stored = read_headers(*weight_files(Path(model_dir)))
    # transformers builds the model the config describes, then reads the files into it
    parameters = max(model_size.parameter_estimate(config),
                     sum(math.prod(item.shape) for item in stored.values()))
    bytes_per_parameter = torch.empty((), dtype=dtype).element_size()
    model_size.check_inference_memory(model_dir, parameters, bytes_per_parameter, ranks)
    check_pretrained(model_dir, build_hf_causal_lm(model_dir, device="meta"))
    for key, item in stored.items():  # one tensor at a time
        with safe_open(str(item.file), framework="pt") as handle:
            bad = int((~torch.isfinite(handle.get_tensor(key))).sum())
        if bad:
            raise ValueError(f"{flag} {model_dir}: tensor {key!r} in {item.file.name} holds {bad} "
                             "NaN or infinite values; fix or replace the weights")
    tokenizer = load_tokenizer(model_dir, flag, need_eos=False)
    check_vocab(tokenizer, model_dir, config.vocab_size, model_dir, flag)
    if not tokenizer(text).input_ids:
        raise ValueError(f"the prompt is empty: the tokenizer of {model_dir} turns it into no "
                         "tokens")


def hf_generate(model_dir: str, text: str, topology: Topology, *, layout: str,
                max_new_tokens: int, dtype: torch.dtype, kernel: str = "auto") -> dict:
    """Greedy generation with a local Hugging Face model directory (its weights and tokenizer)
    over ``topology``: ``usp generate --hf-model``'s work on one rank. The folder was checked by
    :func:`check_hf_generation`; it is read from disk only, with no code from it."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                              trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="usp", dtype=dtype, local_files_only=True,
        trust_remote_code=False, use_safetensors=True).eval()
    # before any layer runs, on every rank alike; the scan layers usp knows run whole, their
    # states in the USPCache
    check_sequence_mixers(unsplit_mixers(model), topology)
    ids = tokenizer(text, return_tensors="pt").input_ids
    cache = USPCache(model.config, topology, layout, max_tokens=ids.shape[1] + max_new_tokens,
                     dtype=dtype, kernel=kernel)
    clock = _Clock()
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         past_key_values=cache, usp_context=cache.context, streamer=clock,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    # the prompt arrives at the start, each token when it is chosen
    steps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
    return {"prompt_tokens": ids.shape[1], "tokens": tokens,
            "text": tokenizer.decode(tokens), "prefill_seconds": clock.times[1] - clock.times[0],
            "token_seconds": steps}


def check_generation(settings: ModelSettings, text: str, ranks: int, dtype: str) -> None:
    """:func:`check_hf_generation` of the settings' model folder."""
    check_hf_generation(settings.hf_model, text, ranks, torch_dtype(dtype))


def generate_text(settings: ModelSettings, text: str, topology: Topology, *, seed: int,
                  layout: str, ring_pass: str, kernel: str, dtype: str,
                  max_new_tokens: int) -> dict:
    """:func:`hf_generate` of the settings' model folder: trained weights (no ``seed``), a
    prompt that starts an empty cache (no ``ring_pass`` to choose)."""
    result = hf_generate(settings.hf_model, text, topology, layout=layout,
                         max_new_tokens=max_new_tokens, dtype=torch_dtype(dtype), kernel=kernel)
    return {"model": settings.hf_model, "notes": [], **result}
