"""Reading rows into model feeds and the first pass over the data (no scipy here: `check` uses it).

Rows of the data become batches of feeds with a group-label code and a seeded uniform number per
row (the holdout split). The capture pass reduces each batch at once into per-group float64 moments
of the chosen layers' inputs, and keeps the model output of the report rows for the metrics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx

from .data import Table, _label_text
from .errors import DataError, LayerError, ModelError, OptionError
from .graph import LinearLayer, model_inputs, with_outputs
from .guards import input_fits, stats_finite
from .metrics import OutputCollector, OutputMetrics
from .runtime import Runner, pipelined
from .stats import LayerStats, Moments

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class DataSpec:
    """How data columns map onto the model: group and target columns, features per model input."""

    group: str
    groups: tuple[str, str] | None = None
    target: str | None = None
    features: tuple[str, ...] | None = None


# ---------------------------------------------------------------------------------------------
# rows, groups, feeds


def data_spec(group: str, groups: Sequence[str] | None, target: str | None,
              features: Sequence[str] | None) -> DataSpec:
    """Validate the column options shared by every command."""
    if groups is not None:
        groups = tuple(str(g) for g in groups)
        if len(groups) != 2 or _label_text(groups[0]) == _label_text(groups[1]):
            raise OptionError(f"--groups {','.join(groups)} is invalid; give two different values, e.g. --groups A,B")
    return DataSpec(group=group, groups=groups, target=target, features=tuple(features) if features else None)


def positive_batch(batch_size: int) -> int:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise OptionError(f"--batch-size {batch_size} is invalid; it must be a positive integer")
    return batch_size


def source_name(obj: Any) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    return f"<{type(obj).__name__}>"


def open_rows(model: onnx.ModelProto, data: Any, spec: DataSpec, *, batch_size: int, seed: int = 0) -> RowReader:
    """The data (a path, arrays or a reader) as batches of feeds for `model`, columns checked."""
    from .data import open_table

    table = open_table(data)
    return RowReader(table, plan_inputs(model, table, spec), spec, batch_size=positive_batch(batch_size), seed=seed)


def row_uniform(seed: int, start: int, n: int) -> np.ndarray:
    """A seeded uniform [0, 1) per global row index (splitmix64), independent of batch sizes."""
    return row_uniform_at(seed, np.arange(start, start + n, dtype=np.uint64))


def row_uniform_at(seed: int, index: np.ndarray) -> np.ndarray:
    """`row_uniform` for arbitrary global row indices."""
    with np.errstate(over="ignore"):
        z = np.asarray(index, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 1) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


@dataclass(frozen=True)
class InputPlan:
    name: str
    columns: tuple[str, ...]
    dtype: np.dtype
    rank: int


def plan_inputs(model: onnx.ModelProto, table: Table, spec: DataSpec) -> list[InputPlan]:
    inputs = model_inputs(model)
    if not inputs:
        raise ModelError("the model has no runtime inputs to feed")
    plans = []
    for inp in inputs:
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise ModelError(f"model input '{inp.name}' is not a tensor; only tensor inputs can be fed from columns")
        dims = list(tt.shape.dim)
        if len(dims) not in (1, 2):
            raise ModelError(f"model input '{inp.name}' has rank {len(dims)}; only [rows] or [rows, features] "
                             "inputs can be fed from data columns")
        width = 1
        if len(dims) == 2:
            if not dims[1].HasField("dim_value") or dims[1].dim_value <= 0:
                raise ModelError(f"model input '{inp.name}' has no fixed feature width (shape "
                                 f"{[d.dim_param or d.dim_value for d in dims]})")
            width = dims[1].dim_value
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        plans.append((inp.name, width, dtype, len(dims)))
    reserved = {spec.group} | ({spec.target} if spec.target else set())
    for col in reserved:
        if col not in table.columns:
            what = "group" if col == spec.group else "target"
            raise DataError(f"{table.name}: no {what} column '{col}' (columns: {', '.join(table.columns)})")
    if len(plans) == 1:
        name, width, dtype, rank = plans[0]
        if spec.features:
            cols = tuple(spec.features)
            for c in cols:
                if c not in table.columns:
                    raise DataError(f"{table.name}: no feature column '{c}' (columns: {', '.join(table.columns)})")
                if c in reserved:
                    raise DataError(f"--features lists '{c}', which is the group or target column")
        else:
            cols = tuple(c for c in table.columns if c not in reserved)
        if len(cols) != width:
            raise DataError(f"{table.name}: model input '{name}' takes {width} features but "
                            f"{'--features names' if spec.features else 'the data has'} {len(cols)} feature columns "
                            f"({', '.join(cols[:12])}{', ...' if len(cols) > 12 else ''}); "
                            "choose them with --features")
        return [InputPlan(name, cols, dtype, rank)]
    if spec.features:
        raise OptionError("--features applies to single-input models; a model with several inputs takes the "
                          "columns named after each input (NAME, or NAME_0 ... NAME_{w-1})")
    out = []
    for name, width, dtype, rank in plans:
        cols = (name,) if width == 1 and name in table.columns else tuple(f"{name}_{j}" for j in range(width))
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise DataError(f"{table.name}: model input '{name}' needs column "
                            f"{'s ' + cols[0] + ' ... ' + cols[-1] if width > 1 else repr(name)}; "
                            f"'{missing[0]}' is missing")
        out.append(InputPlan(name, cols, dtype, rank))
    return out


@dataclass
class Rows:
    """One batch of rows of the two groups, ready to feed."""

    feeds: dict[str, np.ndarray]
    code: np.ndarray  # [n] int: label code (first-seen order)
    target: np.ndarray | None  # [n] float64
    u: np.ndarray  # [n] seeded uniform per row


class RowReader:
    """Batches of feeds with group label codes; keeps the label table across passes."""

    def __init__(self, table: Table, inputs: list[InputPlan], spec: DataSpec, *, batch_size: int,
                 seed: int = 0) -> None:
        self.table, self.inputs, self.spec = table, inputs, spec
        self.batch_size, self.seed = batch_size, seed
        self.numeric = [c for inp in inputs for c in inp.columns] + ([spec.target] if spec.target else [])
        self.labels: list[str] = []
        self.code_of: dict[str, int] = {}
        self.wanted = None if spec.groups is None else tuple(_label_text(g) for g in spec.groups)
        self.total = 0
        self.skipped = 0
        self.other_labels: set[str] = set()
        self._row_codes: list[np.ndarray] = []

    def _codes(self, labels: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(labels, return_inverse=True)
        codes = np.empty(len(uniq), dtype=np.int64)
        for i, lab in enumerate(uniq):
            lab = str(lab)
            if self.wanted is not None:
                if lab in self.wanted:
                    codes[i] = self.wanted.index(lab)
                else:
                    codes[i] = -1
                    if len(self.other_labels) < 20:
                        self.other_labels.add(lab)
                continue
            if lab not in self.code_of:
                if len(self.code_of) == 2:
                    seen = ", ".join(repr(x) for x in [*self.labels, lab])
                    raise DataError(f"{self.table.name}: group column '{self.spec.group}' has more than two values "
                                    f"({seen}, ...); pick two with --groups A,B")
                self.code_of[lab] = len(self.labels)
                self.labels.append(lab)
            codes[i] = self.code_of[lab]
        return codes[inverse.reshape(-1)]

    def __call__(self, first_pass: bool = False, select: str = "all", holdout: float = 0.0) -> Iterator[Rows]:
        """Batches of the rows of the two groups.

        The first pass reads the group column and remembers every row's label code (one byte a row).
        Later passes take the codes from there and read only the rows they need: `select` "fit"
        (u >= holdout), "report" (u < holdout, or every row with holdout 0) or "all".
        """
        keep = None if first_pass else self._selector(select, holdout)
        label = self.spec.group if first_pass else None
        for batch in self.table.batches(self.numeric, label, self.batch_size, keep=keep):
            index = batch.row_index()
            if first_pass:
                code = self._codes(batch.labels)
                self._row_codes.append(code.astype(np.int8))
                self.total += len(code)
                self.skipped += int((code < 0).sum())
            else:
                code = self.row_codes[index].astype(np.int64)
            mask = code >= 0
            if not mask.any():
                continue
            values = batch.values if mask.all() else batch.values[mask]
            index, code = index[mask], code[mask]
            feeds, j = {}, 0
            for inp in self.inputs:
                block = values[:, j:j + len(inp.columns)]
                input_fits(block, inp.dtype, inp.columns, self.table.name, inp.name)
                j += len(inp.columns)
                arr = block.astype(inp.dtype)
                feeds[inp.name] = arr.reshape(-1) if inp.rank == 1 else arr
            target = values[:, j] if self.spec.target else None
            yield Rows(feeds, code, target, row_uniform_at(self.seed, index))

    @property
    def row_codes(self) -> np.ndarray:
        """Label code of every row of the data (-1: neither group), known after the first pass."""
        if len(self._row_codes) != 1:
            self._row_codes = [np.concatenate(self._row_codes) if self._row_codes else np.zeros(0, np.int8)]
        return self._row_codes[0]

    def _selector(self, select: str, holdout: float):
        codes = self.row_codes

        def keep(start: int, n: int) -> np.ndarray:
            mask = codes[start:start + n] >= 0
            if select == "all" or (select == "report" and holdout <= 0):
                return mask
            u = row_uniform(self.seed, start, n)
            return mask & (u >= holdout if select == "fit" else u < holdout)

        return keep

    def group_labels(self) -> tuple[str, str]:
        """Labels of group 0 and group 1 after the first pass; code c of the pass maps to group order[c]."""
        name, col = self.table.name, self.spec.group
        if self.wanted is not None:
            return self.wanted  # codes are already group indices
        if len(self.labels) < 2:
            only = f"only the value {self.labels[0]!r}" if self.labels else "no values"
            raise DataError(f"{name}: group column '{col}' has {only}; it needs rows of two groups")
        return tuple(sorted(self.labels, key=_sort_key))  # type: ignore[return-value]

    def group_of_code(self) -> np.ndarray:
        """Array mapping a label code to the group index (0 or 1)."""
        if self.wanted is not None:
            return np.array([0, 1])
        order = self.group_labels()
        return np.array([order.index(lab) for lab in self.labels])


def _sort_key(label: str) -> tuple:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def as_rows(arr: np.ndarray, n: int, what: str) -> np.ndarray:
    """`arr` as [n, k]: float32 and float64 outputs keep their dtype (the report keeps one value per
    row, so it stays compact); anything else becomes float64."""
    a = np.asarray(arr)
    if a.ndim == 0 or a.shape[0] != n:
        raise ModelError(f"{what} has shape {list(a.shape)}, which is not one row per data row ({n} rows)")
    return a.reshape(n, -1) if a.dtype in (np.float32, np.float64) else a.reshape(n, -1).astype(np.float64)


@dataclass
class Capture:
    """What the first pass collects: per-label-code moments of each layer's input on the fit rows, and
    the model output, label codes and targets of the report rows."""

    moments: dict[int, list[Moments]]  # layer index -> moments per label code
    report: OutputCollector = field(default_factory=OutputCollector)


def report_mask(rows: Rows, holdout: float) -> np.ndarray:
    """Rows measured by the report: the holdout rows, or every row with --holdout 0."""
    return rows.u < holdout if holdout > 0 else np.ones(len(rows.code), dtype=bool)


def capture(model: onnx.ModelProto, layers: Sequence[LinearLayer], reader: RowReader, holdout: float,
             progress: Progress) -> Capture:
    """Pass 1 over the original model: every given layer's input on the fit rows (reduced per batch into
    float64 moments, O(sum d^2) memory) and the model output on the report rows."""
    out_name = model.graph.output[0].name
    tensors = list(dict.fromkeys(layer.input for layer in layers))
    elem = {layer.input: layer.elem_type for layer in layers}
    runner = Runner(with_outputs(model, [(t, elem[t]) for t in tensors]), [*tensors, out_name])
    cap = Capture(moments={layer.index: [] for layer in layers})
    done = 0
    for rows, out in pipelined(reader(first_pass=True), lambda r: runner.run(r.feeds)):
        n = len(rows.code)
        fit = rows.u >= holdout
        # one boolean mask per label code present among the fit rows, shared by every layer
        masks = [(int(c), fit & (rows.code == c)) for c in np.unique(rows.code[fit])]
        for layer in layers:
            d = layer.in_features
            x = np.asarray(out[layer.input])
            if x.shape != (n, d):
                raise LayerError(f"node '{layer.name}' receives '{layer.input}' with shape {list(x.shape)}; only "
                                 f"inputs of shape [rows, {d}] can be repaired")
            moments = cap.moments[layer.index]
            while len(moments) < max(2, len(reader.labels)):
                moments.append(Moments(d))
            for c, mask in masks:
                moments[c].add(x[mask])
        report = report_mask(rows, holdout)
        if report.any():
            cap.report.add(as_rows(out[out_name], n, f"model output '{out_name}'")[report], rows.code[report],
                           None if rows.target is None else rows.target[report])
        done += n
        progress("capture", done)
    runner.close()
    if reader.total == 0:
        raise DataError(f"{reader.table.name}: no data rows")
    return cap


def group_stats(cap: Capture, layer: LinearLayer, reader: RowReader, notes: list[str]) -> LayerStats:
    """Merge a layer's per-label moments into the two groups' statistics, checking the groups."""
    labels, group_of = reader.group_labels(), reader.group_of_code()
    moments = cap.moments[layer.index]
    check_groups_present(cap, reader)
    d = layer.in_features
    merged = [Moments(d), Moments(d)]
    for c, mom in enumerate(moments):
        merged[int(group_of[c])].merge(mom)
    for g in (0, 1):
        n_g = merged[g].n
        if n_g < 2:
            raise DataError(f"{reader.table.name}: group {labels[g]!r} has {n_g} fit row{'s' if n_g != 1 else ''}; "
                            "at least 2 are needed (add rows or lower --holdout)")
        if n_g < d:
            notes.append(f"group {labels[g]!r} has {n_g} fit rows, fewer than the layer width {d}: its covariance "
                         "is rank deficient, so the second-moment step sees only part of the disparity")
    stats = LayerStats.from_moments(merged[0], merged[1])
    stats_finite(stats, layer, reader.table.name)
    return stats


def report_outputs(model: onnx.ModelProto, reader: RowReader, holdout: float,
                   progress: Progress) -> OutputCollector:
    """Pass 3: the model's output on the report rows, collected for the metrics."""
    out_name = model.graph.output[0].name
    collector = OutputCollector()
    runner = Runner(model, [out_name])
    done = 0
    for rows, out in pipelined(reader(select="report", holdout=holdout), lambda r: runner.run(r.feeds)):
        n = len(rows.code)
        collector.add(as_rows(out[out_name], n, f"model output '{out_name}'"), rows.code, rows.target)
        done += n
        progress("report", done)
    runner.close()
    return collector


def capture_metrics(cap: Capture, reader: RowReader, collector: OutputCollector | None = None) -> OutputMetrics:
    """Output metrics of the report rows collected by `capture`, or by `report_outputs` (same rows)."""
    collector = cap.report if collector is None else collector
    if not collector.rows:
        raise DataError(f"{reader.table.name}: no rows of the two groups to measure")
    return collector.result(reader.group_labels(), reader.group_of_code())


def check_groups_present(cap: Capture, reader: RowReader) -> None:
    """With --groups, both values must occur among the rows read."""
    if reader.wanted is None:
        return
    seen = {c for c in (0, 1) if cap.report.rows_of(c)}
    for moments in cap.moments.values():
        seen.update(c for c, m in enumerate(moments) if m.n)
    for c, label in enumerate(reader.wanted):
        if c not in seen:
            others = ", ".join(sorted(repr(x) for x in reader.other_labels)) or "none"
            raise DataError(f"{reader.table.name}: --groups value {label!r} is not in column "
                            f"'{reader.spec.group}' (other values seen: {others})")
