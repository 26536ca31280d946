"""``usp data prepare``: tokenize data into the token cache ahead of training (``usp.data`` does
the work)."""

from __future__ import annotations

from usp.cli.help import add_parser
from usp.data.spec import DEFAULT_TEXT_FIELD, LOSS_ON, DataSpec, default_cache_dir


def register(subparsers) -> None:
    data = add_parser(
        subparsers, "data", help="prepare training data: tokenize it into the token cache",
        description="Training data in the formats users hold (local text, JSON Lines, JSON, "
        "Parquet, Arrow, datasets.save_to_disk folders; chat conversations). See "
        "docs/fine-tuning.md.",
    )
    kinds = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prepare = add_parser(
        kinds, "prepare", help="tokenize data into the cache usp train reads",
        description="Tokenize --data with --tokenizer (or byte-level tokens) into the token "
        "cache, in parallel processes, and report documents, tokens, loss tokens, skipped "
        "conversations, throughput and whether the cache already held them. usp train with the "
        "same data, tokenizer, fields, --loss-on and --data-cache then reads the cache without "
        "tokenizing. Local files only; nothing in the data runs code.",
    )
    a = prepare.add_argument
    a("--data", nargs="+", metavar="PATH", required=True,
      help="local files or folders: text files (one document each), JSON Lines, JSON, Parquet, "
      "Arrow, datasets.save_to_disk folders (required)")
    a("--tokenizer", metavar="DIR", default=None,
      help="a local Hugging Face tokenizer folder, the run's (default: byte-level tokens)")
    a("--text-field", metavar="NAME", default=DEFAULT_TEXT_FIELD,
      help="the field of each record that holds its text")
    a("--chat-field", metavar="NAME", default=None,
      help="read each record's NAME field as a conversation (role/content messages) rendered "
      "with the tokenizer's chat template (default: none, records are text)")
    a("--loss-on", choices=LOSS_ON, default=None,
      help="with --chat-field, which tokens carry the loss (default: assistant for "
      "conversations; text trains on every token)")
    a("--data-cache", metavar="DIR", default=default_cache_dir(),
      help="the token cache (usp train's --data-cache)")
    a("--num-proc", type=int, default=0,
      help="tokenizing processes (default 0: one per 1000 records, at most one per core)")
    prepare.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    from usp.data.cache import prepare

    spec = DataSpec(paths=tuple(args.data), text_field=args.text_field,
                    chat_field=args.chat_field, loss_on=args.loss_on, tokenizer=args.tokenizer,
                    cache=args.data_cache, num_proc=args.num_proc)
    prepared = prepare(spec)
    share = prepared.loss_tokens / prepared.tokens
    if prepared.cache_hit:
        how = f"hit (tokenized earlier: {prepared.tokens_per_s:,.0f} tokens/s)"
    else:
        how = (f"miss: tokenized in {prepared.seconds:.2f} s, {prepared.tokens_per_s:,.0f} "
               f"tokens/s with {prepared.processes} process"
               f"{'es' if prepared.processes > 1 else ''}")
    skipped = (f"{prepared.skipped:,} conversations (no assistant turn, or nothing to train on)"
               if spec.is_chat else f"{prepared.skipped:,}")
    print(f"documents:   {prepared.documents:,}\n"
          f"tokens:      {prepared.tokens:,}\n"
          f"loss tokens: {prepared.loss_tokens:,} ({share:.1%}; loss on "
          f"{spec.effective_loss_on})\n"
          f"skipped:     {skipped}\n"
          f"cache:       {how}\n"
          f"             {prepared.store.name}")
    return 0
