"""usp.plan: a cost model of 4-D parallelism with USP, and a planner that picks the configuration.

>>> from usp.plan import Workload, get_cluster, get_model, plan
>>> best = plan(Workload(get_model("llama3-8b"), 208 * 1024, 1), get_cluster("a800x8", nodes=2)).best
>>> best.config.label(), best.mfu

The command is ``usp plan``; docs/cost-model.md derives the model, docs/planner.md shows its use.
"""

from usp.plan.collectives import attention_traffic
from usp.plan.config import ParallelConfig, check_config
from usp.plan.cost import StepCost, estimate
from usp.plan.planner import Plan, explain, plan
from usp.plan.presets import get_cluster, get_model
from usp.plan.specs import ClusterSpec, ModelSpec, Workload, parse_count

__all__ = [
    "ClusterSpec",
    "ModelSpec",
    "ParallelConfig",
    "Plan",
    "StepCost",
    "Workload",
    "attention_traffic",
    "check_config",
    "estimate",
    "explain",
    "get_cluster",
    "get_model",
    "parse_count",
    "plan",
]
