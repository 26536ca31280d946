"""Integrations with other libraries, each imported on its own and only when asked for.

- :mod:`usp.integrations.transformers`: ``attn_implementation="usp"`` for Hugging Face models
  (its mask function lives in :mod:`usp.integrations.hf_masks`).
- :mod:`usp.integrations.trainer`: ``with_usp(Trainer)`` for Hugging Face's ``Trainer`` and
  TRL's ``SFTTrainer`` (batches in :mod:`~usp.integrations.trainer_batch`, data loaders in
  :mod:`~usp.integrations.trainer_data`).

Importing this package imports none of them (and no third-party library).
"""
