"""The scalars a step's metrics record is charted as, one table for every viewer a run writes to
(TensorBoard, W&B): the record's field, the chart's name (grouped ``train/``, ``eval/``,
``speed/``, ``memory/``), and the value.
"""

from __future__ import annotations

# record field -> chart name
FIELDS = {
    "loss": "train/loss",
    "eval_loss": "eval/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "speed/tokens_per_s",
    "step_time_s": "speed/step_time_s",
    "data_s": "speed/data_s",
    "mfu": "speed/mfu",
}
# per-rank byte lists -> the largest rank's, in GiB
MEMORY = {"peak_memory_bytes": "memory/peak_gib", "memory_before_step_bytes": "memory/before_gib"}


def scalars(record: dict) -> dict[str, float]:
    """``{chart name: value}`` of the fields ``record`` holds (a step without a held-out loss
    or an MFU has none)."""
    values = {tag: float(record[field]) for field, tag in FIELDS.items()
              if record.get(field) is not None}
    values.update({tag: max(record[field]) / 2**30 for field, tag in MEMORY.items()
                   if record.get(field)})
    return values
