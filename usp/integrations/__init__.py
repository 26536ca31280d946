"""Integrations with other libraries, each imported on its own and only when asked for.

- :mod:`usp.integrations.transformers`: ``attn_implementation="usp"`` for Hugging Face models
  (its mask function lives in :mod:`usp.integrations.hf_masks`).
- :mod:`usp.integrations.trainer`: ``with_usp(Trainer)`` for Hugging Face's ``Trainer`` and
  TRL's ``SFTTrainer`` (batches in :mod:`~usp.integrations.trainer_batch`, data loaders in
  :mod:`~usp.integrations.trainer_data`).
- :mod:`usp.integrations.hf_family`: the Hugging Face model family (``docs/models.md``): what
  ``usp train`` and ``usp generate`` build, parallelise and load for a transformers model.

Importing this package imports none of them (and no third-party library).
"""
