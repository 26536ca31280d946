"""``usp export --adapter``: a LoRA run's adapters as a PEFT adapter folder.

The folder is what ``PeftModel.save_pretrained`` writes: ``adapter_config.json`` (the run's
rank, alpha and targets, and the base model's folder) and ``adapter_model.safetensors`` (each
adapted layer's two factors, named as PEFT names them: ``usp.models.lora.peft_name``).
``PeftModel.from_pretrained(base, DIR)`` loads it onto the base model the run started from.
Adapters are small (``rank x (in + out)`` numbers per layer), so they are read and written as
one file; like :func:`usp.training.export.export`, the folder is written beside ``out`` and
renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from usp.inputs import safe_files
from usp.models import lora
from usp.models.family import ModelSettings
from usp.training import checkpoint

WEIGHTS = "adapter_model.safetensors"


def export_adapter(path: Path, out: Path, settings: ModelSettings, family, config,
                   dtype: torch.dtype, tensors: dict) -> tuple[int, int]:
    """Write the adapter folder ``out`` from the LoRA factors among checkpoint ``path``'s model
    ``tensors`` (``{name: (shape, dtype)}``), renamed by the family's exporter
    (``family.export``, with the transformers ``config``) and spelled as PEFT spells them;
    returns the tensors and bytes written."""
    from safetensors.torch import save_file

    if family.export.adapter_config is None:
        raise ValueError(f"--adapter: {family.name} models' adapters are exported merged only; "
                         "leave out --adapter")
    state = {name: torch.empty(shape, dtype=stored) for name, (shape, stored) in tensors.items()
             if lora.is_adapter(name)}
    if not state:
        raise ValueError(f"--adapter: checkpoint {path} holds no LoRA factors")
    checkpoint.read_tensors(path, state)
    written = {}
    for name, tensor in state.items():
        for hf_name, hf_tensor in family.export.tensors(name, tensor, config):
            written[lora.peft_name(hf_name)] = hf_tensor.to(dtype).contiguous()
    base = str(Path(settings.hf_model).resolve()) if settings.hf_model else settings.hf_config
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    safe_files.make_directory(staging)
    try:
        save_file(written, str(staging / WEIGHTS), metadata={"format": "pt"})
        family.export.adapter_config(settings, base).save_pretrained(str(staging))
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(written), sum(t.numel() * t.element_size() for t in written.values())
