"""Integrations with other libraries, each imported on its own and only when asked for.

- :mod:`usp.integrations.transformers`: ``attn_implementation="usp"`` for Hugging Face models
  (its mask function lives in :mod:`usp.integrations.hf_masks`).

Importing this package imports none of them (and no third-party library).
"""
