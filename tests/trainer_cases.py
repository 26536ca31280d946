"""Tiny Trainer / SFTTrainer runs for tests/test_trainer.py: one function trains a case either as
one plain process (the reference) or as a usp trainer on a rank of a spawned world.

Everything is made here: a word-level tokenizer with a chat template whose assistant turns are
marked for assistant-only loss, 2-layer models (hidden 32, vocab 96) in fp64, random token
documents of uneven lengths (so ranks and micro-batches hold different numbers of labels), and
chats. Training uses SGD without clipping: Adam and clipping would hide a gradient of the wrong
scale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    DataCollatorForLanguageModeling, DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM,
    PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
    Trainer, TrainingArguments,
)

SPECIAL = ["<pad>", "<unk>", "<eos>", "<user>", "<asst>", "<eot>"]
VOCAB = 96
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<asst> {% generation %}{{ message['content'] }} <eot>"
    "{% endgeneration %} {% else %}<user> {{ message['content'] }} <eot> {% endif %}"
    "{% endfor %}"
)
_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0)
ARCHITECTURES = {
    # fewer kv heads than the 4 Ulysses ranks: replicated for the all-to-all
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                                    **_SHAPE)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(num_attention_heads=4, num_key_value_heads=1,
                                                    head_dim=8, **_SHAPE)),
    # a mixture of experts whose router loss joins the training loss (eager experts: fp64)
    "qwen3-moe": (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, output_router_logits=True,
        router_aux_loss_coef=ROUTER_COEF, experts_implementation="eager", **_SHAPE)),
}
ROUTER_COEF = 0.1
STEPS, BATCH = 3, 2


@dataclass(frozen=True)
class Case:
    """``data``: padding (right-padded rows), packing (DataCollatorWithFlattening's restarting
    position_ids), packing-cu (its cu_seq_lens too), sft (TRL packing, assistant-only loss)."""

    arch: str
    ring: int
    ulysses: int
    data: str
    grad_acc: int = 1
    layout: str = "zigzag"
    fsdp: bool = False  # FSDP2 through accelerate (else DDP)
    ring_layout: str | None = None  # the ring re-laid into this layout around each attention

    def __str__(self) -> str:
        return (f"{self.arch}-r{self.ring}u{self.ulysses}-{self.layout}"
                + (f"-ring-on-{self.ring_layout}" if self.ring_layout else "")
                + f"-{self.data}-ga{self.grad_acc}" + ("-fsdp2" if self.fsdp else ""))


def save_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory


def build_model(arch: str) -> torch.nn.Module:
    model_class, config = ARCHITECTURES[arch]
    torch.manual_seed(0)
    return model_class(config()).to(torch.float64)


def documents(seed: int, count: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 30, (count,), generator=generator).tolist()
    return Dataset.from_list([
        {"input_ids": torch.randint(len(SPECIAL), VOCAB, (length,), generator=generator).tolist()}
        for length in lengths
    ])


def chats(seed: int, count: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)

    def words():
        picks = torch.randint(0, len(WORDS), (int(torch.randint(2, 9, (1,),
                                                                generator=generator)),),
                              generator=generator)
        return " ".join(WORDS[i] for i in picks.tolist())

    return Dataset.from_list([
        {"messages": [{"role": "user", "content": words()},
                      {"role": "assistant", "content": words()},
                      {"role": "user", "content": words()},
                      {"role": "assistant", "content": words()}][: 2 + 2 * (i % 2)]}
        for i in range(count)
    ])


def train(case: Case, output_dir: Path, tokenizer_dir: Path, *, usp=None, dp: int = 1,
          collator=None, **extra) -> dict:
    """Train STEPS optimizer steps and evaluate once; ``usp``: USPArguments for a usp trainer
    on this rank (None: the plain one-process reference, its batches ``dp`` times as large)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    common = dict(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=BATCH * dp,
        per_device_eval_batch_size=BATCH * dp, gradient_accumulation_steps=case.grad_acc,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=7, bf16=False, dataloader_num_workers=0,
    )
    if usp is not None:
        common.update(per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH)
        if case.fsdp:
            common.update(fsdp="full_shard", fsdp_config={"version": 2})
    common.update(extra)
    model = build_model(case.arch)
    if case.data == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer_class = SFTTrainer
        args = SFTConfig(packing=True, assistant_only_loss=True, max_length=40, **common)
        kwargs = dict(train_dataset=chats(1, 24), eval_dataset=chats(2, 7),
                      processing_class=tokenizer)
    else:
        trainer_class = Trainer
        args = TrainingArguments(**common)
        if collator is None and case.data == "padding":
            collator = first_label_ignored(DataCollatorForLanguageModeling(tokenizer, mlm=False))
        elif collator is None:
            collator = DataCollatorWithFlattening(
                return_flash_attn_kwargs=case.data == "packing-cu")
        kwargs = dict(train_dataset=documents(1, 24), eval_dataset=documents(2, 7),
                      data_collator=collator)
    if usp is not None:
        from usp.integrations.trainer import with_usp

        trainer = with_usp(trainer_class)(model=model, args=args, usp=usp, **kwargs)
    else:  # eager attention, transformers' losses and TRL's fused LM head compute in fp32
        # whatever the model's dtype: the reference keeps fp64 with SDPA and its own loss
        model.set_attn_implementation("sdpa")
        trainer = trainer_class(model=model, args=args, compute_loss_func=fp64_loss, **kwargs)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    evaluation = trainer.evaluate()
    weights = {name: getattr(value, "full_tensor", value.detach)().detach().clone()
               for name, value in trainer.model.state_dict().items()}
    return {"losses": losses, "eval_loss": evaluation["eval_loss"], "weights": weights,
            "trainer": trainer}


def first_label_ignored(collator):
    """No causal LM predicts a row's first token, but transformers' Trainer before 5.17 counts
    its label in num_items_in_batch (the reference's divisor); -100 there makes every version's
    count exact."""
    def collate(rows):
        batch = collator(rows)
        batch["labels"][:, 0] = -100
        return batch

    return collate


def fp64_loss(outputs, labels, num_items_in_batch=None) -> torch.Tensor:
    """The causal LM loss of the reference in the model's dtype: sum over shifted labels / the
    Trainer's count of them; plus, for a mixture of experts, the router loss times its
    coefficient, as transformers adds it (:func:`router_loss`: in fp64, where transformers
    sums in fp32)."""
    logits, targets = outputs.logits[:, :-1], labels[:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              targets.reshape(-1), reduction="sum")
    count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    loss = total / count
    if getattr(outputs, "router_logits", None):
        loss = loss + ROUTER_COEF * router_loss(outputs.router_logits, experts=4, top_k=2)
    return loss


def router_loss(router_logits, experts: int, top_k: int) -> torch.Tensor:
    """transformers' load-balancing loss of a batch without padding, in fp64: ``E sum_e
    (T_e / N) (P_e / N)`` over every layer's rows (T: top-k picks, P: probabilities)."""
    rows = torch.cat([layer.double() for layer in router_logits])
    probabilities = torch.softmax(rows, dim=-1)
    picks = torch.nn.functional.one_hot(torch.topk(probabilities, top_k).indices,
                                        experts).sum(dim=(0, 1)).double()
    count = rows.shape[0]
    return experts * (picks / count * probabilities.sum(dim=0) / count).sum()


def set_rank_environment(rank: int, world_size: int) -> None:
    """What torchrun sets, so that TrainingArguments and accelerate see the spawned world."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
