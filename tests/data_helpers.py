"""Small local data and a local tokenizer with a chat template for the data tests (nothing from
a hub): a WordLevel ``tokenizers`` model wrapped in ``PreTrainedTokenizerFast`` and saved to a
folder, with a ChatML-like template that marks the assistant's text with ``{% generation %}``
(or the same template without the markers), and the same records as JSON Lines, Parquet, Arrow
(both formats) and a ``save_to_disk`` folder."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("hello world how are you fine thanks bye the a is what yes no good day sun rain "
         "one two three four five six seven eight nine ten").split()
SPECIAL = ["<unk>", "<eos>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]

# ChatML-like; a role the template does not know raises, as real templates do
_CHECK = ("{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('Unexpected role: ' + m['role']) }}{% endif %}")
_HEAD = "{% for m in messages %}" + _CHECK + "<|im_start|>{{ m['role'] }} "
_TAIL = (" {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
GENERATION_TEMPLATE = (
    _HEAD + "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} <|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }} <|im_end|>{% endif %}" + _TAIL)
PLAIN_TEMPLATE = _HEAD + "{{ m['content'] }} <|im_end|>" + _TAIL

CONVERSATIONS = [
    [{"role": "system", "content": "the sun is good"},
     {"role": "user", "content": "hello how are you"},
     {"role": "assistant", "content": "fine thanks"},
     {"role": "user", "content": "bye"},
     {"role": "assistant", "content": "bye bye good day"}],
    [{"role": "user", "content": "what is one two"}],  # no assistant turn: skipped
    [{"role": "user", "content": "rain"}, {"role": "assistant", "content": "yes rain"}],
    [{"role": "user", "content": "one two three four five six seven"},
     {"role": "assistant", "content": "eight nine ten eight nine ten one two three"}],
]


def vocabulary() -> dict[str, int]:
    return {token: index for index, token in enumerate(SPECIAL + ROLES + WORDS)}


def save_tokenizer(directory: Path, template: str | None = GENERATION_TEMPLATE) -> Path:
    """A word-level fast tokenizer (whitespace-split words; EOS ``<eos>``) saved in
    ``directory``, with ``template`` as its chat template (None: no template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordLevel(vocabulary(), unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>",
                                        eos_token="<eos>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(directory))
    return Path(directory)


def expected_chat(conversation: list[dict]) -> tuple[list[int], list[int]]:
    """The tokens and assistant mask of a conversation under the templates above, by hand:
    ``<|im_start|> ROLE words... <|im_end|>`` per message, and the assistant's words and its
    ``<|im_end|>`` marked."""
    ids, mask = vocabulary(), []
    tokens = []
    for message in conversation:
        turn = ["<|im_start|>", message["role"], *message["content"].split(), "<|im_end|>"]
        tokens += [ids[token] for token in turn]
        mark = int(message["role"] == "assistant")
        mask += [0, 0] + [mark] * (len(turn) - 2)
    return tokens, mask


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as parquet

    parquet.write_table(pa.Table.from_pylist(records), str(path))
    return path


def write_arrow_stream(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa

    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_arrow_file(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa

    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def save_to_disk(path: Path, records: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path
