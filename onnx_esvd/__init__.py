"""onnx-esvd: repair statistical-parity gaps in ONNX regression models by rewriting their weights.

The public API: `repair` (one call from model and data to a repaired model and its report),
`list_layers`, the result and option types, the data reader protocol and the error family.
"""

from ._version import __version__
from .data import BatchReader
from .errors import DataError, EsvdError, LayerError, ModelError, OptionError, OutputError
from .graph import GraphLayers, LinearLayer
from .metrics import GroupSummary, OutputMetrics, ks_statistic
from .pipeline import RepairOptions, RepairResult, default_output_path, list_layers, repair

__all__ = [
    "__version__",
    "repair",
    "list_layers",
    "default_output_path",
    "RepairResult",
    "RepairOptions",
    "LinearLayer",
    "GraphLayers",
    "OutputMetrics",
    "GroupSummary",
    "ks_statistic",
    "BatchReader",
    "EsvdError",
    "ModelError",
    "LayerError",
    "DataError",
    "OptionError",
    "OutputError",
]
