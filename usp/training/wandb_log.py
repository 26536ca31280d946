"""``usp train --wandb PROJECT``: each step's metrics logged to a Weights & Biases run, beside
``metrics.jsonl`` (which stays the record a resume and ``loss.png`` read).

Written on rank 0 through the ``wandb`` package (the ``hf`` extra installs it), with the same
chart names as TensorBoard's (``usp.training.scalars``) against the training step
(``train/step``), and the run's spec as the W&B run's config. The W&B run's files live in
``OUT/wandb``; its id in ``OUT/wandb-id``, so a resumed run continues the same W&B run.
``--wandb-mode offline`` needs no network or account: ``wandb sync OUT/wandb/offline-run-*``
uploads it later. W&B keeps what the stopped run logged after its last checkpoint: those steps
appear twice there (``metrics.jsonl`` and TensorBoard show each step once).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from usp.inputs import safe_files
from usp.training.scalars import scalars

ID_FILE = "wandb-id"
FOLDER = "wandb"
_ID = re.compile(r"[a-z0-9]{8,64}")


def check_available() -> None:
    """ValueError, saying what to install, when the wandb package is missing."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install wandb (or the hf extra: "
                         "pip install -e \".[hf]\")") from None


def run_id(out: Path) -> str:
    """The W&B run id of the run in ``out``: read from ``OUT/wandb-id``, or made and written
    there the first time (a resume continues the same W&B run)."""
    path = Path(out) / ID_FILE
    if not os.path.lexists(path):  # a link or anything else is refused by read_text below
        new = uuid.uuid4().hex[:16]
        safe_files.write_new(path, new.encode())
        return new
    text = safe_files.read_text(path, limit=256).strip()
    if not _ID.fullmatch(text):
        raise ValueError(f"{path} holds {text[:80]!r}, not a W&B run id (8-64 lower-case letters "
                         "and digits); remove it to start a new W&B run")
    return text


class WandbLog:
    """A W&B run for the run in ``out``: :meth:`log` logs a step's record."""

    def __init__(self, out: Path, project: str, mode: str | None, config: dict) -> None:
        import wandb

        self.out = Path(out)
        try:
            self.run = wandb.init(
                project=project, id=run_id(self.out), resume="allow", name=self.out.name,
                dir=str(self.out), mode=mode, config=config,
                # no capture of the process's output: the ranks' logs stay where they were
                settings=wandb.Settings(console="off"),
            )
        except ValueError:
            raise
        except Exception as exc:  # W&B's own errors: no account, no network, a refused project
            raise ValueError(f"--wandb {project}: W&B could not start the run ({exc}); "
                             "--wandb-mode offline writes it under OUT/wandb without a network "
                             "or an account") from exc
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")

    def log(self, record: dict) -> None:
        self.run.log({"train/step": record["step"], **scalars(record)})

    def close(self) -> None:
        self.run.finish()
