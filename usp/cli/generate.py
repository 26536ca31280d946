"""``usp generate``: greedy generation with a sharded KV cache (usp.infer.launch does the work)."""

from __future__ import annotations

import logging
import statistics

from usp.choices import LAYOUTS, RING_PASSES
from usp.cli.help import add_parser
from usp.infer.config import DTYPES, GenerateConfig
from usp.models.llama.presets import CONFIGS

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "generate", help="generate text with a sharded KV cache on N ranks",
        description=(
            "Prefill a prompt with sequence parallelism (ring x ulysses) into a KV cache sharded "
            "over --nproc gloo ranks, then decode greedily against it. The model is a preset "
            "Llama with random weights from --seed (byte-level tokens), or a local Hugging Face "
            "model directory (--hf-model). See docs/inference.md."
        ),
    )
    d = GenerateConfig()
    a = parser.add_argument
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text (this or --prompt-file is required)")
    prompt.add_argument("--prompt-file", help="a UTF-8 text file: the prompt")
    a("--max-new-tokens", type=int, default=d.max_new_tokens,
      help="tokens to generate after the prompt")
    a("--model", choices=sorted(CONFIGS), default=d.model,
      help="preset Llama of usp.models, random init")
    a("--seed", type=int, default=d.seed, help="the preset's initialisation")
    a("--hf-model", metavar="DIR", default=None,
      help="a local Hugging Face causal LM directory (config, weights, tokenizer) instead of "
      "--model (default: none)")
    a("--checkpoint", metavar="RUN_DIR|CKPT", default=None,
      help="a usp train run (its newest checkpoint) or one of its checkpoints, instead of "
      "--model: its model, weights and tokenizer, exported as by usp export (default: none)")
    a("--nproc", type=int, default=d.nproc, help="ranks to launch (ring x ulysses)")
    a("--ring", type=int, default=None, help="ring degree (default: --nproc / --ulysses)")
    a("--ulysses", type=int, default=d.ulysses, help="Ulysses degree")
    a("--layout", choices=LAYOUTS, default=d.layout, help="token layout over the ranks")
    a("--ring-pass", choices=RING_PASSES, default=d.ring_pass,
      help="ring of a prompt continuing a cache (auto: the one with the smaller messages)")
    a("--kernel", default=d.kernel, help="local attention kernel (auto or a kernel's name)")
    a("--dtype", choices=sorted(DTYPES), default=d.dtype, help="the model's precision")
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    ring = args.ring if args.ring is not None else max(1, args.nproc // args.ulysses)
    config = GenerateConfig(
        prompt_file=args.prompt_file, prompt=args.prompt, checkpoint=args.checkpoint,
        max_new_tokens=args.max_new_tokens, model=args.model,
        seed=args.seed, hf_model=args.hf_model, nproc=args.nproc, ring=ring,
        ulysses=args.ulysses, layout=args.layout, ring_pass=args.ring_pass, kernel=args.kernel,
        dtype=args.dtype,
    )
    config.validate()  # bad input answers before torch loads
    logger.info("importing torch")
    # torch loads here, not at import: `usp generate --help` stays instant
    from usp.infer.launch import launch_generation

    result = launch_generation(config)
    print(summarize(result, config))
    return 0


def summarize(result: dict, config: GenerateConfig) -> str:
    steps = result["token_seconds"]
    latency = (f"{1e3 * statistics.median(steps):.2f} ms median, "
               f"{1e3 * min(steps):.2f}-{1e3 * max(steps):.2f} ms range over {len(steps)} steps"
               if steps else "no decode step (one new token)")
    return "\n".join([
        *result["notes"],
        result["text"],
        "",
        f"model {result['model']}; ring {config.ring} x ulysses {config.ulysses}, "
        f"layout {config.layout}",
        f"prompt {result['prompt_tokens']} tokens, generated {len(result['tokens'])}: "
        f"{result['tokens']}",
        f"prefill: {result['prefill_seconds']:.3f} s",
        f"per-token decode latency: {latency}",
    ])
