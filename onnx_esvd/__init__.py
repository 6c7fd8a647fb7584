"""onnx-esvd: repair statistical-parity gaps in ONNX regression models by rewriting their weights.

The public API: `repair` (model and data in, repaired model and report out), `audit` (where the
disparity lives, layer by layer), `check` (a fairness gate for CI), `list_layers`, the result and
option types, the data reader protocol and the error family.

Submodules load on first use, so `import onnx_esvd` stays cheap and `check` never pays for scipy. No
submodule shares its name with a public function (importing it would bind the module over the name).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import DataError, EsvdError, LayerError, ModelError, OptionError, OutputError

_LAZY = {
    "repair": "pipeline",
    "list_layers": "graph",
    "default_output_path": "pipeline",
    "RepairResult": "pipeline",
    "RepairOptions": "pipeline",
    "audit": "explain",
    "AuditResult": "explain",
    "LayerAudit": "explain",
    "check": "gate",
    "CheckResult": "gate",
    "ThresholdResult": "gate",
    "LinearLayer": "graph",
    "GraphLayers": "graph",
    "OutputMetrics": "metrics",
    "GroupSummary": "metrics",
    "ks_statistic": "metrics",
    "BatchReader": "data",
    "sweep": "tradeoff",
    "SweepResult": "tradeoff",
    "SweepPoint": "tradeoff",
    "repair_within_budget": "tradeoff",
    "BudgetResult": "tradeoff",
}

__all__ = [
    "__version__", "repair", "audit", "check", "sweep", "repair_within_budget", "list_layers",
    "default_output_path", "SweepResult", "SweepPoint", "BudgetResult",
    "RepairResult", "RepairOptions", "AuditResult", "LayerAudit", "CheckResult", "ThresholdResult",
    "LinearLayer", "GraphLayers", "OutputMetrics", "GroupSummary", "ks_statistic", "BatchReader",
    "EsvdError", "ModelError", "LayerError", "DataError", "OptionError", "OutputError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'onnx_esvd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from .explain import AuditResult, LayerAudit, audit
    from .data import BatchReader
    from .gate import CheckResult, ThresholdResult, check
    from .graph import GraphLayers, LinearLayer, list_layers
    from .metrics import GroupSummary, OutputMetrics, ks_statistic
    from .pipeline import RepairOptions, RepairResult, default_output_path, repair
    from .tradeoff import BudgetResult, SweepPoint, SweepResult, repair_within_budget, sweep
