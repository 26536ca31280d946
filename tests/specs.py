"""The run spec of flat settings, as tests write them: ``run_spec(seq_len=64, ring=2)``."""

from usp.spec import RunSpec


def run_spec(**settings) -> RunSpec:
    return RunSpec.from_flat(settings)
