"""``usp check``: a correctness self-test of sequence-parallel attention on the user's machines.

Seeded random cases over every ``ring x ulysses`` factorisation of the world (the rest dp),
every layout, GQA/MQA (fewer kv heads than Ulysses ranks too), odd lengths and head counts,
packed documents, sliding windows and padding, causal or not, in several dtypes: forward and
backward of :func:`usp.usp_attention` on the sharded inputs against a single-device reference
from the same seeded global tensors (docs/check.md).

- :mod:`usp.check.cases`: the cases, drawn alike on every rank;
- :mod:`usp.check.reference`: the dense-mask reference and the error bounds;
- :mod:`usp.check.runner`: one rank's loop, in lockstep with the others, under a time budget;
- :mod:`usp.check.report`: every rank's errors merged into rows and a verdict;
- :mod:`usp.check.launch`: ``--nproc`` ranks, or the world of an external launcher.
"""

from usp.check.cases import MASKS, CheckCase, draw_cases
from usp.check.launch import launch_check
from usp.check.report import CheckReport
from usp.check.runner import CheckSettings, run_check

__all__ = ["MASKS", "CheckCase", "CheckReport", "CheckSettings", "draw_cases", "launch_check",
           "run_check"]
