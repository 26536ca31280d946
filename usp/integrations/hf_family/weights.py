"""Pretrained Hugging Face weights from a local directory, read straight into each rank's shards.

``usp train --hf-model DIR`` trains the model ``DIR/config.json`` describes, starting from the
weights beside it: ``model.safetensors``, or the shards ``model.safetensors.index.json`` names.
With LoRA adapters the folder is the base model's: an adapted layer's weight (PEFT's
``...q_proj.base_layer.weight``) is read from ``...q_proj.weight``, and the factors, which no
folder holds, are drawn from the run's seed.

- :func:`check_pretrained` (pure: reads headers, never tensor data) runs before any rank starts and
  again on every rank: the files exist, are safetensors, and hold exactly the model's tensors with
  its shapes; otherwise a ValueError names the file, the tensor and the numbers.
- :func:`load_pretrained` reads them with ``torch.distributed.checkpoint``'s safetensors reader
  into the model's sharded state dict: each rank reads only the slices of its own shards
  (safetensors slices a memory map), so no rank holds a full copy of a tensor, let alone of the
  model. Values are converted to the parameters' dtype.

Untrusted input: only safetensors are read (a JSON header and raw numbers; nothing is unpickled).
A directory holding pickle weights (``pytorch_model.bin``) and no safetensors is refused, and so are
weights holding NaN or infinity (each rank checks its shards after reading them, and all agree).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint._hf_utils import _HFStorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, set_model_state_dict,
)

from usp.models.lora import base_name, is_adapter

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PREFIX = "model."  # usp.integrations.hf_family.model.HFCausalLM keeps the transformers model as .model
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# buffers that transformers computes (never persistent), found in some older checkpoints
COMPUTED_BUFFERS = ("rotary_emb.inv_freq",)
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16}


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def weight_files(directory: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files of ``directory`` (those its index names), and the index's map."""
    index_path = directory / INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--hf-model: {index_path} is unreadable ({exc})") from exc
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError(f"--hf-model: {index_path} holds no weight_map of tensor names to "
                             "file names")
        names = sorted(set(weight_map.values()))
        foreign = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
        if foreign:
            raise ValueError(f"--hf-model: {index_path} names {foreign[0]!r}; an index may only "
                             "name .safetensors files in its own directory")
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ValueError(f"--hf-model: {len(missing)} of the {len(names)} weight files that "
                             f"{index_path} names are missing: {', '.join(missing[:3])}")
        return [directory / n for n in names], weight_map
    if (directory / SINGLE).is_file():
        return [directory / SINGLE], None
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"--hf-model {directory} holds {pickles[0]} but no {SINGLE} or {INDEX}: pickle files "
            "can run code when loaded, so usp reads safetensors only; convert them where you "
            "trust them (model.save_pretrained(DIR), which writes safetensors)"
        )
    raise ValueError(f"--hf-model {directory} holds neither {SINGLE} nor {INDEX}")


def read_headers(files: list[Path], weight_map: dict | None) -> dict[str, StoredTensor]:
    """Name -> file, shape and dtype of every tensor, from the files' headers (no tensor data)."""
    from safetensors import SafetensorError, safe_open

    stored: dict[str, StoredTensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if key in stored:
                        raise ValueError(f"--hf-model: tensor {key!r} is stored twice, in "
                                         f"{stored[key].file.name} and {path.name}")
                    piece = handle.get_slice(key)
                    dtype = piece.get_dtype()
                    if dtype not in FLOAT_DTYPES:
                        raise ValueError(f"--hf-model: {path.name} stores {key!r} as {dtype}; "
                                         f"model weights are one of {sorted(FLOAT_DTYPES)}")
                    stored[key] = StoredTensor(path, tuple(piece.get_shape()), FLOAT_DTYPES[dtype])
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"--hf-model: {path} is not a readable safetensors file "
                             f"({exc})") from exc
    for key, name in (weight_map or {}).items():
        if key not in stored or stored[key].file.name != name:
            where = stored[key].file.name if key in stored else "no file"
            raise ValueError(f"--hf-model: the index puts {key!r} in {name}, but it is in {where}")
    return stored


def expected_tensors(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The checkpoint names and global shapes of ``model``'s state (a transformers model, built
    or parallelised), and the names that only alias another tensor (a tied output projection)."""
    expected, aliases, seen = {}, set(), set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases.add(key)
        else:
            seen.add(id(tensor))
            expected[key] = tuple(tensor.shape)
    return expected, aliases


def _whole(model: nn.Module) -> nn.Module:
    """The whole transformers model ``model`` (an HFCausalLM, perhaps one pipeline stage of it)
    is built from, as a skeleton on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.config, dtype=model.model.dtype,
                                                trust_remote_code=False)


def check_pretrained(directory: str, model: nn.Module) -> dict[str, StoredTensor]:
    """Check that ``directory``'s safetensors hold exactly the tensors and shapes of the whole
    model ``model`` belongs to; returns those ``model`` holds (a pipeline stage holds some)."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"--hf-model {directory!r} is not a directory")
    stored = read_headers(*weight_files(path))
    expected, aliases = expected_tensors(_whole(model))
    ignored = {key for key in stored if key in aliases or key.endswith(COMPUTED_BUFFERS)}
    problems = []
    missing = sorted(set(expected) - set(stored))
    if missing:
        problems.append(f"{len(missing)} tensors missing ({', '.join(missing[:3])})")
    unexpected = sorted(set(stored) - set(expected) - ignored)
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model does not have "
                        f"({', '.join(unexpected[:3])})")
    problems += [f"{key} is {list(stored[key].shape)} in {stored[key].file.name}, the config "
                 f"gives {list(shape)}" for key, shape in expected.items()
                 if key in stored and stored[key].shape != shape][:3]
    if problems:
        raise ValueError(f"--hf-model {directory} does not fit the model its config.json "
                         "describes: " + "; ".join(problems))
    held, _ = expected_tensors(model.model)
    return {base_name(key): stored[base_name(key)] for key in held if not is_adapter(key)}


class _CheckedReader(HuggingFaceStorageReader):
    """torch's safetensors reader over exactly the tensors :func:`check_pretrained` read (torch's
    own metadata lists every ``*.safetensors`` in the directory, whatever the index says)."""

    def __init__(self, directory: Path, stored: dict[str, StoredTensor]) -> None:
        super().__init__(str(directory))
        self._stored = stored

    def read_metadata(self) -> Metadata:
        tensors, storage = {}, {}
        for key, item in self._stored.items():
            origin = torch.Size([0] * len(item.shape))
            tensors[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=item.dtype), size=torch.Size(item.shape),
                chunks=[ChunkStorageMetadata(offsets=origin, sizes=torch.Size(item.shape))],
            )
            storage[MetadataIndex(fqn=key, offset=origin)] = _HFStorageInfo(
                relative_path=str(item.file), shape=torch.Size(item.shape), dtype=item.dtype
            )
        metadata = Metadata(state_dict_metadata=tensors, storage_data=storage)
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata


def load_weights(model: nn.Module, directory: str, seed: int) -> None:
    """A materialised ``HFCausalLM``'s computed buffers (RoPE tables) and LoRA factors (from
    ``seed``), then every other parameter from ``directory``, each rank its own shards (the
    family's ``Weights.load``)."""
    model.init_weights(seed, parameters=False)  # buffers and adapters: no base parameter
    load_pretrained(model, directory)


def load_pretrained(model: nn.Module, directory: str) -> None:
    """Read ``directory``'s weights into ``model`` (an HFCausalLM, parallelised or not), each rank
    its own shards; a collective when a process group is up."""
    stored = check_pretrained(directory, model)
    state = get_model_state_dict(model)
    # "model.<transformers name>" -> the name the files use (a LoRA-adapted layer's weight
    # without PEFT's ".base_layer"; the factors are no file's); aliases are tied
    names = {base_name(key[len(PREFIX):]): key for key in state
             if key.startswith(PREFIX) and not is_adapter(key)}
    wanted = {name: state[key] for name, key in names.items() if name in stored}
    try:
        with warnings.catch_warnings():  # DCP warns that one process "assumes" one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(wanted, storage_reader=_CheckedReader(Path(directory), stored),
                     no_dist=not dist.is_initialized())
    except (Exception, dcp.CheckpointException) as exc:  # CheckpointException: a BaseException
        causes = (exc.failures.values() if isinstance(exc, dcp.CheckpointException)
                  else [(exc,)])
        text = "; ".join(sorted({f"{type(c[0]).__name__}: {c[0]}" for c in causes}))
        raise ValueError(f"--hf-model {directory}: reading the weights failed: {text}") from exc
    _check_finite(wanted, stored, directory)
    set_model_state_dict(model, {names[name]: tensor for name, tensor in wanted.items()},
                         options=StateDictOptions(strict=False))


def _check_finite(tensors: dict, stored: dict[str, StoredTensor], directory: str) -> None:
    """Refuse weights holding NaN or infinity (training would only say "lower --lr" after its
    first step): each rank checks its own shards, and every rank raises the same error."""
    from usp.comm import agree

    error = None
    for key, tensor in tensors.items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        bad = int((~torch.isfinite(local)).sum())
        if bad:
            error = (f"--hf-model {directory}: tensor {key!r} in {stored[key].file.name} holds "
                     f"{bad} NaN or infinite values (in this rank's shard of "
                     f"{local.numel()}); fix or replace the weights")
            break
    agree(dist.group.WORLD if dist.is_initialized() else None, {}, error)
