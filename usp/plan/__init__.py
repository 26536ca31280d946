"""usp.plan: a cost model of 4-D parallelism with USP, and a planner that picks the configuration.

>>> from usp.plan import Workload, get_cluster, get_model, plan
>>> workload = Workload(get_model("llama3-8b"), 208 * 1024, 1)
>>> best = plan(workload, get_cluster("a800x8", nodes=2)).best
>>> best.config.label(), best.mfu

The command is ``usp plan``; docs/cost-model.md derives the model, docs/planner.md shows its use.
A configuration's fields are the run spec's (``usp.spec``): :func:`to_run_spec` writes one as a
spec ``usp train --config`` runs, :func:`from_run_spec` reads one back.
The exports are imported on first use (``usp.lazy``): the specs, presets and configurations are
torch-free, so ``usp plan --help`` reads them without importing torch.
"""

from usp.lazy import lazy_exports

_EXPORTS = {
    "ClusterSpec": "usp.plan.specs",
    "ModelSpec": "usp.plan.specs",
    "ParallelConfig": "usp.plan.config",
    "Plan": "usp.plan.planner",
    "StepCost": "usp.plan.cost",
    "Workload": "usp.plan.specs",
    "attention_traffic": "usp.plan.collectives",
    "check_config": "usp.plan.config",
    "estimate": "usp.plan.cost",
    "explain": "usp.plan.planner",
    "from_run_spec": "usp.plan.spec_io",
    "get_cluster": "usp.plan.presets",
    "get_model": "usp.plan.presets",
    "parse_count": "usp.plan.specs",
    "plan": "usp.plan.planner",
    "to_run_spec": "usp.plan.spec_io",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
