"""Training metrics: memory, MFU against a stated peak, the JSONL log with a progress bar on rank
0, and the loss plot.

Memory is per rank. On CUDA it is the caching allocator's ``max_memory_allocated``. On CPU it is
the process's resident set: ``VmRSS`` and its high-water mark ``VmHWM`` from ``/proc/self/status``,
whose peak is reset per step by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0); where
that file is missing the peak falls back to ``getrusage``'s lifetime ``ru_maxrss``. Before a step's
baseline is read on CPU, ``malloc_trim`` hands freed heap pages back to the kernel, so the baseline
is what is live (model, optimizer state) and not what glibc kept from the previous step.

The run's ``metrics.jsonl`` and ``loss.png`` are written through ``usp.inputs.safe_files``
(appended and replaced without following a link).
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import math
import numbers
import resource
from pathlib import Path

import torch

from usp.precision import datasheet_peak, effective_precision
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from usp.inputs import safe_files

logger = logging.getLogger(__name__)

# Dense peak TFLOP/s of common accelerators (bf16 tensor cores; fp32 is the TF32 rate).


# ---------------------------------------------------------------------------- memory
def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        return None
    return None


def release_freed_memory(device: torch.device) -> None:
    """Return freed heap pages to the kernel (CPU, glibc) so RSS shows live memory only."""
    if device.type != "cpu":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        logger.debug("malloc_trim is unavailable; CPU memory baselines include freed pages")


def current_memory_bytes(device: torch.device) -> int:
    """Memory this rank holds now: CUDA allocated bytes, or the process RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (per step)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # "5" resets VmHWM to the current RSS
    except OSError:
        logger.debug("cannot reset the RSS peak; CPU peaks are lifetime peaks")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank since the last :func:`reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SavedActivations:
    """Bytes of the tensors autograd saves for the backward inside this context: the activation
    memory proper, free of allocator caching and of the step's temporaries. Storages are counted
    once (views share them); a checkpointed region's inner tensors are not saved, so not counted."""

    def __init__(self) -> None:
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.count(tensor)
        return tensor

    def count(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage (also for hooks that replace this one: activation offload)."""
        # DTensor and the collectives' async wrappers hold no storage themselves: count the
        # plain tensors inside them
        if is_traceable_wrapper_subclass(tensor):
            inner_names, _ = tensor.__tensor_flatten__()
            for name in inner_names:
                inner = getattr(tensor, name)
                if isinstance(inner, torch.Tensor):  # flatten may also name a DeviceMesh
                    self.count(inner)
            return
        storage = tensor.untyped_storage()
        self._storages[storage.data_ptr()] = storage.nbytes()

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())


# ---------------------------------------------------------------------------- MFU
def peak_tflops(device: torch.device, dtype_name: str, given: float | None) -> float | None:
    """The per-device peak MFU is stated against: ``--peak-tflops``, else a known GPU's
    datasheet value in the precision its matmuls use (``usp.precision``), else None (no MFU: a CPU has no peak worth stating, and a matmul timed at
    start-up is not one: it read 206-348 % MFU on a shared CPU)."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    precision = effective_precision(dtype_name, torch.backends.cuda.matmul.allow_tf32)
    return datasheet_peak(torch.cuda.get_device_name(device), precision)


def model_flops_utilization(
    tokens_per_s: float, flops_per_token: float, num_devices: int, peak_tflops: float
) -> float:
    """Achieved model FLOP/s over the peak of all devices (PaLM's MFU definition)."""
    return tokens_per_s * flops_per_token / (num_devices * peak_tflops * 1e12)


def mfu_fields(
    tokens_per_s: float, flops_per_token: float, num_devices: int, peak: float | None
) -> dict:
    """A record's MFU fields: none without a stated peak; ``mfu`` and ``peak_tflops`` with one;
    ``mfu_above_peak`` instead of ``mfu`` when the ratio exceeds 1, which no hardware does: the
    stated peak (or the FLOP count) is wrong, and the number is not reported as an MFU."""
    if peak is None:
        return {}
    mfu = model_flops_utilization(tokens_per_s, flops_per_token, num_devices, peak)
    return {"mfu" if mfu <= 1.0 else "mfu_above_peak": mfu, "peak_tflops": peak}


def format_mfu(record: dict) -> str | None:
    if "mfu" in record:
        return f"{record['mfu']:.2%}"
    if "mfu_above_peak" in record:
        return f"invalid ({record['mfu_above_peak']:.0%} of the stated peak)"
    return None


# ---------------------------------------------------------------------------- log and plot
def read_metrics(path: str | Path, follow_links: bool = True) -> list[dict]:
    """The records of a metrics JSONL file; a ValueError naming the file and line of one that is
    not a record (a JSON object with an integer ``step`` and a numeric ``loss``). A run's own
    file is read with ``follow_links=False``."""
    text = safe_files.read_text(Path(path), follow_links=follow_links)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or type(record.get("step")) is not int \
                or not isinstance(record.get("loss"), numbers.Real):
            raise ValueError(f"{path} line {number} is not a metrics record (a JSON object with "
                             "an integer step and a numeric loss)")
        records.append(record)
    return records


def check_logging(logging_section) -> None:
    """The logging section (``usp.spec.Logging``): a ``--reference-metrics`` file that exists and
    whose records read, before a run that ends drawing them; the tensorboard and wandb packages
    where ``--tensorboard`` and ``--wandb`` ask for them."""
    if logging_section.tensorboard:
        from usp.training import tensorboard

        tensorboard.check_available()
    if logging_section.wandb is not None:
        from usp.training import wandb_log

        if not logging_section.wandb.strip():
            raise ValueError("--wandb needs a project name")
        wandb_log.check_available()
    elif logging_section.wandb_mode is not None:
        raise ValueError(f"--wandb-mode {logging_section.wandb_mode} without --wandb: there is "
                         "no W&B run to log to; give --wandb PROJECT")
    reference = logging_section.reference_metrics
    if reference:
        if not Path(reference).is_file():
            raise ValueError(f"--reference-metrics {reference!r} does not exist")
        read_metrics(reference)


class MetricsLog:
    """Appends one JSON record per step to ``path`` and draws a progress bar (rank 0 only);
    as the ``logging`` section (``usp.spec.Logging``) asks, also logs the record's scalars to
    TensorBoard (``usp.training.tensorboard``) and W&B (``usp.training.wandb_log``, with the
    run's ``config``), in the run directory.

    Other ranks construct it too and it does nothing for them, so the loop has no rank branches.
    A viewer that cannot start is a ValueError (on rank 0: the loop agrees on it).
    """

    def __init__(self, path: Path, total_steps: int, start_step: int, enabled: bool,
                 logging_section, config: dict | None = None) -> None:
        progress = logging_section.progress
        self.path, self.enabled, self.progress = path, enabled, progress
        self._viewers = []
        if enabled and logging_section.tensorboard:  # beside metrics.jsonl, in the run directory
            from usp.training.tensorboard import TensorBoardLog

            self._viewers.append(TensorBoardLog(path.parent, start_step))
        if enabled and logging_section.wandb is not None:
            from usp.training.wandb_log import WandbLog

            self._viewers.append(WandbLog(path.parent, logging_section.wandb,
                                          logging_section.wandb_mode, config or {}))
        self._file = safe_files.open_append(path) if enabled else None
        self._bar = None
        self._warned_mfu = False
        if enabled and progress:
            from tqdm import tqdm

            # disable=None: a bar on a terminal, none in a log file (the step lines remain)
            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", disable=None
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for viewer in self._viewers:
            viewer.log(record)
        if "mfu_above_peak" in record and not self._warned_mfu:
            self._warned_mfu = True
            logger.warning(
                "step %d: model FLOP/s are %.0f%% of the stated peak of %g TFLOP/s per device, "
                "which is impossible: the peak is too low (check --peak-tflops); MFU is not "
                "reported (the JSONL says mfu_above_peak)", record["step"],
                100 * record["mfu_above_peak"], record["peak_tflops"],
            )
        if not self.progress:
            return
        from tqdm import tqdm

        tqdm.write(format_record(record))  # above the bar, which redraws below it
        mfu = format_mfu(record)
        self._bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            **({"mfu": mfu} if mfu else {}),
            mem_gib=f"{max(record['peak_memory_bytes']) / 2**30:.2f}",
        )
        self._bar.update(1)

    def close(self) -> None:
        for viewer in self._viewers:
            viewer.close()
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()


def format_record(record: dict) -> str:
    peaks = ", ".join(f"{p / 2**20:.0f}" for p in record["peak_memory_bytes"])
    mfu = format_mfu(record)
    return (
        f"step {record['step']:>5} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | "
        f"{record['step_time_s'] * 1000:.0f} ms | " + (f"MFU {mfu} | " if mfu else "")
        + f"peak MiB per rank [{peaks}]"
        + (f" | eval loss {record['eval_loss']:.4f}" if "eval_loss" in record else "")
    )


def plot_loss(metrics_path: Path, png_path: Path, reference_path: Path | None = None) -> None:
    """Write a PNG of loss against step, with a reference run's curve when one is given."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(7, 4))
    # the run's own file is never read through a link; a reference is the user's input
    curves = [("this run", metrics_path, "-", False)]
    if reference_path is not None:
        curves.append(("reference", reference_path, "--", True))
    for label, path, style, follow_links in curves:
        records = read_metrics(path, follow_links=follow_links)
        steps = [r["step"] for r in records]
        losses = [r["loss"] for r in records]
        axes.plot(steps, losses, style, label=label)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel("loss (global mean cross-entropy)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    safe_files.replace(png_path, image.getvalue())


def finite_or_raise(loss: float, step: int) -> float:
    """Stop a diverged run at the step it diverged instead of training on NaNs."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr or use --dtype fp32")
    return loss
