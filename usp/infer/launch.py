"""``usp generate``'s work: its settings, the ranks it starts, and what each rank runs.

Ranks start like ``usp train``'s (``usp.launch``: torchrun's elastic launcher on the
loopback-only rendezvous, the machine's cores shared out). Each rank hands the settings to its
model family's inference adapter (``usp.models.family.InferenceAdapter``: a preset Llama from a seed, a local Hugging
Face model directory, ...), which builds the same model, shards the prompt and generates; rank
0's result comes back.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from usp.infer.config import GenerateConfig
from usp.launch import launch_ranks
from usp.models.registry import family_of
from usp.rendezvous import LOOPBACK
from usp.topology import Topology

logger = logging.getLogger(__name__)


def launch_generation(config: GenerateConfig) -> dict:
    """Validate, run ``config.nproc`` ranks (in-process for one), return rank 0's result. A
    ``checkpoint`` is exported first (``usp export``, into a temporary folder removed at the
    end) and generates as that Hugging Face folder."""
    config.validate()
    if config.checkpoint is not None:
        return _from_checkpoint(config)
    if config.nproc == 1:
        return run_generation(config)
    logger.info("starting %d ranks on %s (gloo): each imports torch, joins the process group "
                "and builds the model", config.nproc, LOOPBACK)
    return launch_ranks(config.nproc, _generation_rank, asdict(config), name="usp-generate")[0]


def _from_checkpoint(config: GenerateConfig) -> dict:
    import shutil
    import tempfile
    from dataclasses import replace

    from usp.training.export import export

    folder = Path(tempfile.mkdtemp(prefix="usp-generate-"))
    try:
        exported = export(config.checkpoint, folder / "model")
        result = launch_generation(replace(config, checkpoint=None,
                                           hf_model=str(exported.out)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["model"] = f"{exported.checkpoint} (step {exported.step})"
    return result


def _generation_rank(settings: dict) -> dict:
    return run_generation(GenerateConfig(**settings))


def run_generation(config: GenerateConfig) -> dict:
    """Generate on this rank (every rank of the world calls it); the same result everywhere."""
    topology = Topology.build(ring=config.ring, ulysses=config.ulysses)
    text = config.prompt_text()
    settings = config.model_settings()
    return family_of(settings).inference.generate(
        settings, text, topology, seed=config.seed, layout=config.layout,
        ring_pass=config.ring_pass, kernel=config.kernel, dtype=config.dtype,
        max_new_tokens=config.max_new_tokens)
