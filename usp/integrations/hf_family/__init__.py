"""The Hugging Face family: transformers causal LMs trained and run by usp (``docs/models.md``).

- ``family``: its entry in ``usp.models.registry`` (imports neither transformers nor torch);
- ``config``: presets, ``config.json`` files read without running code, checks;
- ``model``: ``HFCausalLM``, the wrapper with usp's model interface, built on meta;
- ``stages``, ``plan``: what ``usp.parallelize`` needs (stage cut, attention, MLP);
- ``weights``: pretrained safetensors read straight into each rank's shards.
"""
