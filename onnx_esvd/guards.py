"""Guards against numbers that would turn a broken model into a confident answer.

- every weight written into a model is finite and fits the tensor's stored dtype (float16 overflows
  at 65504, float32 at 3.4e38);
- every input column fits the dtype of the model input it feeds (a float64 1e300 cast to float32 is inf);
- model outputs are finite on the rows measured (a NaN output makes every metric meaningless);
- a model file read is usable: outputs present, known element types, UTF-8 names, onnx.checker-clean.

Each guard raises the library's one-line errors; none of them changes a value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .errors import DataError, LayerError, ModelError


def _largest(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).max)


def weight_fits(values: np.ndarray, dtype: np.dtype | type, what: str, advice: str) -> None:
    """Refuse `values` (any shape, float64) that are not finite or overflow `dtype`.

    `what` names the tensor ("weight 'W1' of node 'Gemm_1'"); `advice` says what to do.
    """
    v = np.asarray(values, dtype=np.float64)
    dt = np.dtype(dtype)
    if not np.isfinite(v).all():
        bad = int(np.size(v) - np.count_nonzero(np.isfinite(v)))
        raise LayerError(f"the repair computed {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf) for "
                         f"{what}; nothing was written; {advice}")
    if dt.kind == "f" and v.size:
        peak = float(np.max(np.abs(v)))
        if peak > _largest(dt):
            raise LayerError(f"the repair computed {peak:.3g} for {what}, beyond the largest {dt.name} "
                             f"({_largest(dt):.5g}) the model stores; nothing was written; {advice}")


ESVD_ADVICE = "check the calibration data for extreme feature values, or raise --eps"
REFIT_ADVICE = ("the refit's target or inputs are too large for the model's dtype: rescale the target column "
                "(e.g. to standard units) or pass --refit none")


def esvd_weight_fits(weight: np.ndarray, layer) -> None:
    """The ESVD step's new `W: [out, in]` of `layer` (a LinearLayer) is finite and fits its dtype.

    The check is on the effective weight (Gemm's alpha is 1 for every exported model we know; the
    writer checks the stored values again)."""
    weight_fits(weight, layer.dtype, f"weight '{layer.weight}' of node '{layer.name}'", ESVD_ADVICE)


def refit_fits(coef: np.ndarray, intercept: np.ndarray | None, final) -> None:
    """The refit's `coef: [m, p]` and `intercept: [m]` of the final node `final` are finite and fit its dtype."""
    weight_fits(coef, final.dtype, f"weight '{final.weight}' of the final node '{final.name}'", REFIT_ADVICE)
    if intercept is not None:
        weight_fits(intercept, final.dtype, f"bias '{final.bias}' of the final node '{final.name}'", REFIT_ADVICE)


def model_weight_finite(values: np.ndarray, tensor: str, node: str) -> None:
    """A weight read from the model (`values`: any shape) holds only finite numbers."""
    v = np.asarray(values)
    if v.dtype.kind == "f" and not np.isfinite(v).all():
        bad = int(v.size - np.count_nonzero(np.isfinite(v)))
        raise ModelError(f"weight '{tensor}' of node '{node}' holds {bad} NaN or infinite value"
                         f"{'s' if bad != 1 else ''}; the model is broken, export it again")


def input_fits(block: np.ndarray, dtype: np.dtype | type, columns: Sequence[str], source: str, model_input: str) -> None:
    """Feature columns `block: [n, len(columns)] float64` fit the model input's float `dtype` (cast is finite)."""
    dt = np.dtype(dtype)
    if dt.kind != "f" or dt.itemsize >= 8 or block.size == 0:
        return
    limit = _largest(dt)
    with np.errstate(invalid="ignore"):
        over = np.abs(block) > limit
    if over.any():
        rows, cols = np.nonzero(over)
        col = columns[int(cols[0])] if len(columns) else model_input
        value = float(block[rows[0], cols[0]])
        raise DataError(f"{source}: column '{col}' holds {value:.6g}, beyond the range of {dt.name} "
                        f"(largest {limit:.5g}) that model input '{model_input}' takes; rescale that column "
                        "or drop the row")


def outputs_finite(collector, model: str, output: str, *, repaired: bool = False) -> None:
    """Every collected output value (an OutputCollector of the rows measured, every group, every row, also those
    past the KS sample's cap) is finite."""
    bad, total = collector.nonfinite, collector.cells
    if not bad:
        return
    share = f"{bad} of {total} output value{'s' if total != 1 else ''}"
    if repaired:
        raise LayerError(f"the repaired model's output '{output}' is NaN or infinite on {share} of the report rows; "
                         "nothing was written; try a smaller correction (lower --c1/--c2), --refit none, or rescale "
                         "the data")
    raise ModelError(f"{model}: output '{output}' is NaN or infinite on {share}; no metric can be computed; "
                     "check the model and the data (features far outside the training range?)")


def stats_finite(stats, layer, source: str) -> None:
    """The layer's input moments (a GroupStats: means [k, d], covariances [k, d, d], Gram [d, d]) are finite.

    They overflow when the layer's inputs are beyond ~1e154 (their squares pass float64's range)."""
    for name in ("means", "covs", "gram"):
        if not np.isfinite(getattr(stats, name)).all():
            raise DataError(f"{source}: the inputs of node '{layer.name}' reach values whose squares overflow "
                            "float64, so their statistics are not finite; rescale the feature columns (or check the "
                            "model's weights for huge values)")


# ---------------------------------------------------------------------------------------------
# the model file itself


def model_structure_ok(model: onnx.ModelProto, path: Path) -> None:
    """onnx.checker on the loaded model (nodes without outputs, attributes of the wrong type, ...): what
    it rejects could never be written back, and would otherwise fail deep inside the graph code."""
    try:
        if model.ByteSize() < 2**31 - 2**26:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError, ValueError, ...
        raise ModelError(f"{path}: the model fails onnx.checker: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}; export it again") from None


def model_usable(model: onnx.ModelProto, name: str) -> None:
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{name}: the ONNX file has an empty graph; export the model again")
    if not model.graph.output:
        raise ModelError(f"{name}: the graph has no outputs, so there is nothing to measure; export the model again")
    odd = _unknown_element_type(model.graph)
    if odd is not None:
        raise ModelError(f"{name}: {odd}; no ONNX version defines it, so the file is corrupt or from an unknown "
                         "tool; export the model again")
    bad = _non_utf8_name(model.graph)
    if bad is not None:
        raise ModelError(f"{name}: {bad} is not valid UTF-8; ONNX names are UTF-8 text, export the model again")


_KNOWN_TYPES = frozenset(v for v in onnx.TensorProto.DataType.values() if v != onnx.TensorProto.UNDEFINED)


def _unknown_element_type(graph: onnx.GraphProto) -> str | None:
    """The first initializer, graph input or output whose element type no ONNX version defines, or None."""
    for t in graph.initializer:
        if t.data_type not in _KNOWN_TYPES:
            return f"initializer '{t.name}' has element type {t.data_type}"
    for kind, items in (("graph input", graph.input), ("graph output", graph.output)):
        for v in items:
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type not in _KNOWN_TYPES:
                return f"{kind} '{v.name}' has element type {v.type.tensor_type.elem_type}"
    return None


def _non_utf8_name(graph: onnx.GraphProto) -> str | None:
    """The first name of the main graph that protobuf could not decode as UTF-8 (it returns bytes), or None."""
    for i, node in enumerate(graph.node):
        for kind, values in (("name", [node.name]), ("op type", [node.op_type]), ("input", node.input),
                             ("output", node.output)):
            for v in values:
                if isinstance(v, bytes):
                    return f"the {kind} {v!r} of node #{i}"
    for kind, items in (("initializer", graph.initializer), ("graph input", graph.input),
                        ("graph output", graph.output), ("value_info", graph.value_info)):
        for item in items:
            if isinstance(item.name, bytes):
                return f"the {kind} name {item.name!r}"
    return None
