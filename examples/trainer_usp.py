"""A Hugging Face Trainer (or TRL SFTTrainer) script that trains under USP: two added lines.

    torchrun --nproc-per-node 4 examples/trainer_usp.py --ring 2 --ulysses 2
    torchrun --nproc-per-node 4 examples/trainer_usp.py --ulysses 4 --sft
    accelerate launch --num-processes 4 examples/trainer_usp.py --ring 2 --ulysses 2   # GPUs
    python examples/trainer_usp.py                 # one process (ring = ulysses = 1)

(On a CPU, start the ranks with torchrun: ``accelerate launch --cpu`` starts one process.)

Everything is made here, nothing is downloaded: a word-level tokenizer with a chat template, a
tiny Llama from a config, packed documents of random words (``DataCollatorWithFlattening``:
positions restart in every document) or, with ``--sft``, chats trained with TRL's packing and
assistant-only loss. The lines marked ``# usp`` are all that differ from the plain script; the
losses it prints are those one process would print for the same data.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from transformers import (
    DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer,
    TrainingArguments,
)

from usp.integrations.trainer import USPArguments, with_usp  # usp

WORDS = [f"w{i}" for i in range(250)]
SPECIAL = ["<pad>", "<unk>", "<eos>", "<user>", "<asst>", "<eot>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<asst> {% generation %}{{ message['content'] }} <eot>"
    "{% endgeneration %} {% else %}<user> {{ message['content'] }} <eot> {% endif %}"
    "{% endfor %}"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--layout", choices=["contiguous", "zigzag", "stripe"], default="zigzag")
    parser.add_argument("--sft", action="store_true", help="TRL SFTTrainer on chats")
    parser.add_argument("--steps", type=int, default=10)
    return parser.parse_args()


def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))


def documents(seed: int, count: int, words: PreTrainedTokenizerFast) -> Dataset:
    rng = random.Random(seed)
    return Dataset.from_list([{"input_ids": words(sentence(rng))["input_ids"]}
                              for _ in range(count)])


def chats(seed: int, count: int) -> Dataset:
    rng = random.Random(seed)
    return Dataset.from_list([{"messages": [
        {"role": "user", "content": sentence(rng)},
        {"role": "assistant", "content": sentence(rng)},
    ]} for _ in range(count)])


def main() -> None:
    args = parse_args()
    words = tokenizer()
    config = LlamaConfig(vocab_size=len(words), hidden_size=128, intermediate_size=384,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         pad_token_id=words.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="trainer-usp-"), max_steps=args.steps,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
    )
    if args.sft:
        from trl import SFTConfig, SFTTrainer

        trainer_class = SFTTrainer
        training = SFTConfig(packing=True, assistant_only_loss=True, max_length=256, bf16=False,
                             **common)
        data = dict(train_dataset=chats(1, 400), eval_dataset=chats(2, 32),
                    processing_class=words)
    else:
        trainer_class = Trainer
        training = TrainingArguments(**common)
        data = dict(train_dataset=documents(1, 400, words), eval_dataset=documents(2, 32, words),
                    data_collator=DataCollatorWithFlattening())
    trainer_class = with_usp(trainer_class)  # usp
    trainer = trainer_class(model=model, args=training, **data,
                            usp=USPArguments(ring=args.ring, ulysses=args.ulysses,  # usp
                                             layout=args.layout))
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(f"eval loss {metrics['eval_loss']:.4f}")


if __name__ == "__main__":
    main()
