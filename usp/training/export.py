"""``usp export``: a Hugging Face model folder from a training checkpoint of any layout.

The checkpoint's model tensors are read from its DCP files a group at a time (a group is at most
one output shard, ``max_shard_bytes``), renamed and reshaped by the model family's exporter
(``usp.models.family.Exporter``) and written as sharded safetensors with an index: no process
ever holds the whole model, whatever layout (FSDP, TP, pipeline stages) wrote it. Beside them:
``config.json`` (the family's transformers config), ``generation_config.json`` and the run's
tokenizer files (for a run on byte-level tokens, a tokenizer whose ids are the bytes:
:func:`byte_level_tokenizer`).

A LoRA run's adapters are merged into the weights they adapt (``W + alpha / rank B @ A``, a
layer's tensors read in one group: ``usp.models.lora``), so the folder is an ordinary model of
the base architecture; ``adapter=True`` writes the adapters alone as a PEFT adapter folder
instead (``usp.training.export_adapter``).

The checkpoint is verified against its manifest and read through the same loaders as a resume
(``usp.training.integrity``): nothing in it runs code. The folder is written beside ``out`` and
renamed into place when complete, never through a link.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from usp.models import lora
from usp.models.family import ModelSettings
from usp import precision
from usp.models.registry import family_of
from usp.spec import RunSpec
from usp.inputs import safe_files
from usp.inputs.byte_tokens import EOT
from usp.training import checkpoint, integrity, run_dir
from usp.training.export_adapter import export_adapter
from usp.inputs.model import model_settings

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 << 30  # 2 GiB per safetensors file, as transformers writes them
MODEL_PREFIX = "model."  # the checkpoint's {"model": ..., "optim": ...} keys, flattened by DCP
END_OF_DOCUMENT = "<|end_of_document|>"  # the byte-level tokenizer's name for EOT


@dataclass(frozen=True)
class ExportResult:
    out: Path
    checkpoint: Path
    step: int
    tensors: int
    shards: int
    bytes: int
    byte_level: bool  # the run's tokens were bytes: the tokenizer written spells them
    adapter: bool = False  # a PEFT adapter folder (usp.training.export_adapter), no tokenizer


def byte_level_tokenizer():
    """usp train's byte-level tokens as a transformers tokenizer: a text's ids are its UTF-8
    bytes (0-255) and id 256 (:data:`~usp.inputs.byte_tokens.EOT`) ends a document. Bytes are
    spelled as GPT-2's byte-level pre-tokenizer spells them (printable Latin-1 as itself, the
    rest from U+0100 on), each its own token, with no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = iter(range(256, 512))
    spelled = {byte: chr(byte if byte in printable else next(others)) for byte in range(256)}
    vocab = {char: byte for byte, char in spelled.items()}
    vocab[END_OF_DOCUMENT] = EOT
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_DOCUMENT)


def find_checkpoint(source: Path, step: int | None) -> tuple[Path, Path]:
    """``(run directory, checkpoint)``: ``source`` is a run directory (its newest complete
    checkpoint, or ``step``'s) or one of its checkpoint directories."""
    source = Path(source)
    if (source / checkpoint.META).is_file():
        if step is not None:
            raise ValueError(f"{source} is one checkpoint already; --step needs a run directory")
        return source.parent.parent, source
    steps = checkpoint.steps_saved(source / "checkpoints")
    if not steps:
        raise ValueError(f"{source}: neither a run directory with a complete checkpoint under "
                         f"checkpoints/ nor a checkpoint directory (no {checkpoint.META})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{source} has no complete checkpoint of step {step}; it has steps "
                         f"{steps}")
    return source, checkpoint.step_dir(source / "checkpoints", step)


def run_model(run: Path) -> tuple[ModelSettings, str | None]:
    """The model settings and tokenizer folder a run trained with (its ``config.json``)."""
    model = RunSpec.from_flat(run_dir.read_settings(run)).model
    return model_settings(model), model.tokenizer


def _model_tensors(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The model's tensors in the checkpoint's index: ``{name: (shape, dtype)}``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = integrity.SafeFileSystemReader(path).read_metadata()
    return {key[len(MODEL_PREFIX):]: (entry.size, entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items()
            if key.startswith(MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata)}


def _groups(tensors: dict, dtype: torch.dtype, limit: int) -> list[list[str]]:
    """The names in shards of at most ``limit`` bytes written as ``dtype`` (a bigger tensor
    gets a shard of its own); a LoRA-adapted layer's tensors stay in one group, which its merge
    reads together (``usp.models.lora.units``)."""
    groups, size = [[]], 0
    for unit in lora.units(list(tensors)):
        nbytes = sum(tensors[name][0].numel() for name in unit) * dtype.itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].extend(unit)
        size += nbytes
    return groups


def export(source: Path, out: Path, step: int | None = None, dtype: str = "fp32",
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, adapter: bool = False) -> ExportResult:
    """Write the Hugging Face folder ``out`` from ``source`` (a run or checkpoint directory):
    a LoRA run's adapters merged into its weights, or with ``adapter`` only the adapters, as
    a PEFT adapter folder (:func:`export_adapter`). ValueError, naming the path, for a missing,
    corrupt or foreign checkpoint, a model family without an exporter, or an ``out`` that
    exists."""
    from safetensors.torch import save_file

    run, path = find_checkpoint(source, step)
    settings, tokenizer_dir = run_model(run)
    family = family_of(settings)
    if family.export is None:
        raise ValueError(f"{family.name} models have no Hugging Face exporter")
    if adapter and not settings.lora_rank:
        raise ValueError(f"--adapter: {run} trained every weight, no LoRA adapters (its "
                         "--lora-rank is 0); export the whole model without --adapter")
    if dtype not in precision.EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}; choose one of {list(precision.EXPORT_DTYPES)}")
    if max_shard_bytes < 1:
        raise ValueError(f"--max-shard-size {max_shard_bytes} must be at least 1 byte")
    out = Path(out)
    if os.path.lexists(out):
        raise ValueError(f"--out {out} exists; export into a new folder")
    problems = integrity.verify(path)
    if problems:
        raise ValueError(f"checkpoint {path} is corrupt, nothing was exported: "
                         + "; ".join(problems))
    saved = checkpoint.read_metadata(path)
    if saved["model"] != family.metadata(settings):
        raise ValueError(f"checkpoint {path} records another model than its run's config.json "
                         f"names ({family.display_name(settings)}); was the model folder edited?")

    torch_dtype = precision.torch_dtype(dtype)
    if adapter:
        config = family.export.config(settings, dtype=torch_dtype, eos_token_id=None)
        count, total = export_adapter(path, out, settings, family, config, torch_dtype,
                                      _model_tensors(path))
        logger.info("exported the adapters of %s (step %d) to %s", path, saved["step"], out)
        return ExportResult(out=out, checkpoint=path, step=saved["step"], tensors=count,
                            shards=1, bytes=total, byte_level=False, adapter=True)
    if tokenizer_dir:
        from usp.inputs.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = byte_level_tokenizer()
    eos = tokenizer.eos_token_id
    config = family.export.config(settings, dtype=torch_dtype, eos_token_id=eos)
    tensors = _model_tensors(path)
    groups = _groups(tensors, torch_dtype, max_shard_bytes)
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    safe_files.make_directory(staging)
    try:
        weight_map, total = {}, 0
        for index, names in enumerate(groups, start=1):
            shard = (f"model-{index:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1
                     else "model.safetensors")
            state = {name: torch.empty(tensors[name][0], dtype=tensors[name][1]) for name in names}
            checkpoint.read_tensors(path, state)
            if settings.lora_rank:  # W + alpha / rank B @ A, under the base model's names
                state = lora.merged(state, settings.lora_scaling)
            written = {}
            for name, tensor in state.items():
                for hf_name, hf_tensor in family.export.tensors(name, tensor, config):
                    written[hf_name] = hf_tensor.to(torch_dtype).contiguous()
            save_file(written, str(staging / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(written, shard))
            total += sum(t.numel() * t.element_size() for t in written.values())
            del state, written  # one group at a time
        if len(groups) > 1:
            index_text = json.dumps({"metadata": {"total_size": total},
                                     "weight_map": dict(sorted(weight_map.items()))}, indent=2)
            safe_files.write_new(staging / "model.safetensors.index.json", index_text.encode())
        config.save_pretrained(staging)
        family.export.generation_config(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s (step %d) to %s", path, saved["step"], out)
    return ExportResult(out=out, checkpoint=path, step=saved["step"], tensors=len(weight_map),
                        shards=len(groups), bytes=total, byte_level=not tokenizer_dir)
