"""The training application: its config, the loop, data, metrics, checkpoints and the launcher.

Built on the library core (``usp.topology``, ``usp.layout``, ``usp.attention``, ``usp.batch``,
``usp.loss``, ``usp.parallel``); nothing in the core imports it.
"""
