"""``usp export``: a Hugging Face model folder from a training run (``usp.training.export``
does the work)."""

from __future__ import annotations

from usp.cli.help import add_parser
from usp.precision import EXPORT_DTYPES


def _size(text: str) -> int:
    """``2GB``, ``500MB``, ``4096`` (bytes) -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit):
            return int(float(upper[:-len(unit)]) * scale)
    return int(upper)


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "export", help="write a run's model as a Hugging Face folder",
        description=(
            "Write a Hugging Face model folder (config.json, sharded safetensors with an index, "
            "generation_config.json, the run's tokenizer) from a usp train checkpoint of "
            "any layout, one group of tensors at a time. A Llama preset is written as "
            "LlamaForCausalLM; a --hf-config or --hf-model run as its own architecture. "
            "transformers loads the folder with from_pretrained, and usp generate --hf-model "
            "runs it. See docs/fine-tuning.md."
        ),
    )
    a = parser.add_argument
    a("run", metavar="RUN_DIR", help="a run directory (its newest complete checkpoint) or one "
      "of its checkpoint directories")
    a("--out", required=True, metavar="DIR", help="the new folder to write (required)")
    a("--step", type=int, default=None,
      help="export this step's checkpoint of RUN_DIR (default: the newest)")
    a("--dtype", choices=EXPORT_DTYPES, default="fp32",
      help="the precision of the written weights (training keeps fp32 master weights)")
    a("--max-shard-size", type=_size, default="2GiB", metavar="SIZE",
      help="the largest safetensors file, e.g. 500MB or 2GiB; also the most tensor data held "
      "in memory at once")
    a("--adapter", action="store_true",
      help="a LoRA run (--lora-rank): write its adapters alone as a PEFT adapter folder "
      "(adapter_config.json, adapter_model.safetensors) that PeftModel.from_pretrained loads "
      "onto the base model (default: the adapters merged into the weights, an ordinary model "
      "folder)")
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from usp.training.export import export

    result = export(args.run, args.out, step=args.step, dtype=args.dtype,
                    max_shard_bytes=args.max_shard_size, adapter=args.adapter)
    if result.adapter:
        print(f"exported the LoRA adapters of {result.checkpoint} (step {result.step}) to "
              f"{result.out}: {result.tensors} tensors, {result.bytes / 2**20:.2f} MiB, "
              f"{args.dtype}; load them with peft.PeftModel.from_pretrained(base, DIR)")
        return 0
    tokenizer = ("a byte-level tokenizer (the run's tokens: ids 0-255 are the bytes, 256 ends a "
                 "document)" if result.byte_level else "the run's tokenizer")
    print(f"exported {result.checkpoint} (step {result.step}) to {result.out}: "
          f"{result.tensors} tensors, {result.bytes / 2**20:.1f} MiB in {result.shards} "
          f"safetensors file{'s' if result.shards > 1 else ''}, {args.dtype}; {tokenizer}")
    return 0
