"""``usp train --tensorboard``: each step's metrics as TensorBoard scalars in ``OUT/tensorboard``,
beside ``metrics.jsonl`` (which stays the record a resume and ``loss.png`` read).

Written on rank 0 through ``torch.utils.tensorboard`` (the ``tensorboard`` package: the ``hf``
extra installs it); ``tensorboard --logdir OUT/tensorboard`` shows them. A resumed run appends to
the same folder from its next step (what the stopped run wrote after its checkpoint is purged
from view, as ``metrics.jsonl`` is truncated).
"""

from __future__ import annotations

from pathlib import Path

from usp.training.scalars import scalars

FOLDER = "tensorboard"


def check_available() -> None:
    """ValueError, saying what to install, when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or the hf extra: pip install -e \".[hf]\")") from None


class TensorBoardLog:
    """A ``SummaryWriter`` on ``OUT/tensorboard``: :meth:`log` writes a step's record."""

    def __init__(self, out: Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = Path(out) / FOLDER
        # a resumed run: what an earlier run wrote past its checkpoint is hidden from the viewer
        self.writer = SummaryWriter(log_dir=str(self.directory), purge_step=start_step + 1)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
