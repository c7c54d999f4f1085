"""Heads: named scikit-learn pipelines, a leakage-safe protocol, metrics with uncertainty.

Works on numpy arrays only; imports neither torch nor ``featurize`` (``pipelines`` opens stores).
"""

from .budget import DEFAULT_BUDGET_MINUTES
from .errors import HeadsError
from .fewshot import parse_shots
from .evaluate import HeadRun, fit_head, run_head
from .metrics import bootstrap_ci, mcnemar_p_value, paired_difference_ci, point_metrics
from .protocol import Plan, Task, plan_protocol
from .selection import STRATEGIES, select
from .registry import HEADS, PREPROCESSING, HeadSpec, get_head, list_heads, register_head, resolve_heads
from .transferability import SCORES

__all__ = [
    "DEFAULT_BUDGET_MINUTES",
    "HEADS",
    "PREPROCESSING",
    "SCORES",
    "STRATEGIES",
    "HeadRun",
    "HeadSpec",
    "HeadsError",
    "Plan",
    "Task",
    "bootstrap_ci",
    "fit_head",
    "get_head",
    "list_heads",
    "mcnemar_p_value",
    "paired_difference_ci",
    "parse_shots",
    "plan_protocol",
    "point_metrics",
    "register_head",
    "resolve_heads",
    "run_head",
    "select",
]
