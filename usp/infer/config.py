"""The settings of one ``usp generate`` run, torch-free: the command's ``--help`` shows these
defaults without importing torch; ``usp.infer.launch`` runs them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from usp.choices import LAYOUTS
from usp.models.family import ModelSettings
from usp.models.registry import family_of  # torch-free until a family is asked
from usp.precision import DTYPES  # --dtype's choices (usp.infer.launch resolves them)


@dataclass
class GenerateConfig:
    """The settings of one ``usp generate`` run (the CLI's flags)."""

    prompt_file: str | None = None
    prompt: str | None = None  # the prompt itself, instead of prompt_file
    max_new_tokens: int = 32
    model: str = "tiny"
    seed: int = 0
    hf_model: str | None = None
    checkpoint: str | None = None  # a usp train run or checkpoint: its model, exported first
    nproc: int = 1
    ring: int = 1
    ulysses: int = 1
    layout: str = "zigzag"
    ring_pass: str = "auto"
    kernel: str = "auto"
    dtype: str = "fp32"

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout {self.layout!r}; choose one of {LAYOUTS}")
        if self.ring * self.ulysses != self.nproc:
            raise ValueError(f"ring={self.ring} x ulysses={self.ulysses} = "
                             f"{self.ring * self.ulysses} must equal --nproc {self.nproc}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        if self.checkpoint is not None and self.hf_model is not None:
            raise ValueError("--checkpoint and --hf-model both name a model; give one")
        text = self.prompt_text()
        if self.checkpoint is not None:
            return  # its model is checked once exported (usp.infer.launch)
        settings = self.model_settings()
        family_of(settings).inference.check(settings, text, self.nproc, self.dtype)

    def prompt_text(self) -> str:
        """The prompt: ``prompt``, or the text of ``prompt_file``; ValueError for neither,
        both, an unreadable or non-UTF-8 file, or an empty prompt."""
        if (self.prompt is None) == (self.prompt_file is None):
            raise ValueError("give the prompt as --prompt TEXT or --prompt-file FILE (one of "
                             "them)")
        if self.prompt is not None:
            text = self.prompt
        else:
            if not Path(self.prompt_file).is_file():
                raise ValueError(f"prompt file {self.prompt_file!r} does not exist")
            try:
                text = Path(self.prompt_file).read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"prompt file {self.prompt_file!r} is not UTF-8 text "
                                 f"({exc})") from None
        if not text:
            raise ValueError("the prompt is empty" + (
                f": {self.prompt_file!r} holds no text" if self.prompt_file else ""))
        return text

    def model_settings(self) -> ModelSettings:
        """The model section of these settings (``usp.models.registry.family_of`` reads it)."""
        return ModelSettings(model=self.model, hf_model=self.hf_model)
