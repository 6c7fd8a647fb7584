"""The repair pipeline shared by the Python API and the command line.

Passes over the data (each streamed in batches):
  1. original model: capture the chosen node's input on the fit rows (per-group moments) and the
     model output on the report rows (the "before" metrics);
  2. patched model: capture the final node's input on the fit rows for the refit (plus the original
     final node's output when the refit distils instead of using labels);
  3. repaired model: the output on the report rows (the "after" metrics).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import onnx

from ._version import __version__
from . import _json
from . import refit as refit_mod
from .errors import DataError, LayerError, ModelError, OptionError
from .esvd import EsvdResult, esvd
from .graph import (GraphLayers, LinearLayer, find_layers, model_inputs, output_path_is_value_preserving,
                    read_weight, select_layer, with_outputs, write_bias, write_weight)
from .data import Table, open_table, _label_text
from .metrics import OutputMetrics, output_metrics
from .modelio import LoadedModel, check_output_path, load_model, save_model
from .runtime import Runner
from .stats import LayerStats, Moments

METADATA_KEY = "onnx_esvd.repair"


@dataclass(frozen=True)
class RepairOptions:
    """Options of `repair`, validated once here. See the README for their meaning."""

    c1: float = 15.0
    c2: float = 150.0
    eps: float = 1e-5
    refit: Literal["fair", "plain", "none"] = "fair"
    ridge: float | Literal["auto"] = "auto"
    holdout: float = 0.2
    seed: int = 0
    batch_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("c1", "c2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 1):
                raise OptionError(f"--{name} {v} is invalid; it must be a number >= 1 (1 skips that step)")
        if not (isinstance(self.eps, (int, float)) and np.isfinite(self.eps) and self.eps > 0):
            raise OptionError(f"--eps {self.eps} is invalid; it must be a positive number (default 1e-5)")
        if self.refit not in ("fair", "plain", "none"):
            raise OptionError(f"--refit {self.refit!r} is invalid; choose fair, plain or none")
        if self.ridge != "auto" and not (isinstance(self.ridge, (int, float)) and np.isfinite(self.ridge)
                                         and self.ridge >= 0):
            raise OptionError(f"--ridge {self.ridge} is invalid; give 'auto' or a number >= 0")
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise OptionError(f"--holdout {self.holdout} is invalid; it must be in [0, 1)")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise OptionError(f"--batch-size {self.batch_size} is invalid; it must be a positive integer")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise OptionError(f"--seed {self.seed} is invalid; it must be an integer >= 0")


@dataclass(frozen=True)
class DataSpec:
    """How data columns map onto the model: group and target columns, features per model input."""

    group: str
    groups: tuple[str, str] | None = None
    target: str | None = None
    features: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RowCounts:
    """Rows read, rows of neither group (skipped), rows the fit used, rows the report measured."""

    total: int
    skipped: int
    fit: int
    report: int


@dataclass(frozen=True)
class RepairResult:
    """The repaired model and its report.

    Attributes:
        model: the new ModelProto (the caller's model is never modified).
        layer, final: the repaired node and the refitted final node.
        groups: labels of group 0 and group 1.
        before, after: metrics of the original and repaired models on the report rows.
        report_rows: "holdout" (rows the fit did not use) or "fit" (--holdout 0).
        rows: row counts.
        esvd: the two ESVD steps' details.
        refit: what the refit did, or None when it was skipped (see `refit_note`).
        refit_note: why the refit was skipped, or "".
        options: the options used.
        warnings: things the user should know (e.g. rank-deficient covariances).
    """

    model: onnx.ModelProto
    layer: LinearLayer
    final: LinearLayer | None
    groups: tuple[str, str]
    before: OutputMetrics
    after: OutputMetrics
    report_rows: str
    rows: RowCounts
    esvd: EsvdResult
    refit: refit_mod.RefitReport | None
    refit_note: str
    options: RepairOptions
    data: DataSpec
    external_data: bool = False
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, as plain JSON-ready values."""
        return {
            "tool_version": __version__,
            "layer": self.layer.to_dict(),
            "final_layer": None if self.final is None else self.final.to_dict(),
            "groups": list(self.groups),
            "options": {**asdict(self.options), **{k: v for k, v in asdict(self.data).items()}},
            "report_rows": self.report_rows,
            "rows": asdict(self.rows),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "esvd": {
                "second_moment": {"applied": self.esvd.second.applied, "c2": self.esvd.second.c,
                                  "rank": self.esvd.second.rank, "lambda": self.esvd.second.lam,
                                  "bound_before": self.esvd.second.bound_before,
                                  "bound_after": self.esvd.second.bound_after},
                "first_moment": {"applied": self.esvd.first.applied, "c1": self.esvd.first.c,
                                 "lambda": self.esvd.first.lam, "bound_before": self.esvd.first.bound_before,
                                 "bound_after": self.esvd.first.bound_after},
            },
            "refit": None if self.refit is None else self.refit.to_dict(),
            "refit_note": self.refit_note,
            "warnings": list(self.warnings),
        }

    def save(self, path: str | Path, *, force: bool = False, source: str | Path | None = None) -> Path:
        """Write the repaired model atomically; refuses to overwrite `source` or (without force) anything."""
        inputs = (Path(source),) if source is not None else ()
        out = check_output_path(Path(path), inputs=inputs, force=force)
        return save_model(self.model, out, external_data=self.external_data)


def default_output_path(model_path: str | Path) -> Path:
    """`MODEL` stem + `.esvd.onnx`, next to the input."""
    p = Path(model_path)
    return p.with_name(p.stem + ".esvd.onnx")


# ---------------------------------------------------------------------------------------------
# rows, groups, feeds


def row_uniform(seed: int, start: int, n: int) -> np.ndarray:
    """A seeded uniform [0, 1) per global row index (splitmix64), independent of batch sizes."""
    with np.errstate(over="ignore"):
        z = np.arange(start, start + n, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 1) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


@dataclass(frozen=True)
class _Input:
    name: str
    columns: tuple[str, ...]
    dtype: np.dtype
    rank: int


def _plan_inputs(model: onnx.ModelProto, table: Table, spec: DataSpec) -> list[_Input]:
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
        return [_Input(name, cols, dtype, rank)]
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
        out.append(_Input(name, cols, dtype, rank))
    return out


@dataclass
class _Rows:
    """One batch of rows of the two groups, ready to feed."""

    feeds: dict[str, np.ndarray]
    code: np.ndarray  # [n] int: label code (first-seen order)
    target: np.ndarray | None  # [n] float64
    u: np.ndarray  # [n] seeded uniform per row


class _Reader:
    """Batches of feeds with group label codes; keeps the label table across passes."""

    def __init__(self, table: Table, inputs: list[_Input], spec: DataSpec, options: RepairOptions) -> None:
        self.table, self.inputs, self.spec, self.options = table, inputs, spec, options
        self.numeric = [c for inp in inputs for c in inp.columns] + ([spec.target] if spec.target else [])
        self.labels: list[str] = []
        self.code_of: dict[str, int] = {}
        self.wanted = None if spec.groups is None else tuple(_label_text(g) for g in spec.groups)
        self.total = 0
        self.skipped = 0
        self.other_labels: set[str] = set()

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

    def __call__(self, first_pass: bool = False) -> Iterator[_Rows]:
        for batch in self.table.batches(self.numeric, self.spec.group, self.options.batch_size):
            code = self._codes(batch.labels)
            keep = code >= 0
            if first_pass:
                self.total += len(code)
                self.skipped += int((~keep).sum())
            values = batch.values if keep.all() else batch.values[keep]
            idx = np.flatnonzero(keep) + batch.start
            if not len(idx):
                continue
            feeds, j = {}, 0
            for inp in self.inputs:
                block = values[:, j:j + len(inp.columns)]
                j += len(inp.columns)
                arr = block.astype(inp.dtype)
                feeds[inp.name] = arr.reshape(-1) if inp.rank == 1 else arr
            target = values[:, j] if self.spec.target else None
            u = row_uniform(self.options.seed, batch.start, len(code))[keep]
            yield _Rows(feeds, code[keep], target, u)

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


def _as_rows(arr: np.ndarray, n: int, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 0 or a.shape[0] != n:
        raise ModelError(f"{what} has shape {list(a.shape)}, which is not one row per data row ({n} rows)")
    return a.reshape(n, -1).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# the pipeline


def list_layers(model: str | Path | onnx.ModelProto) -> GraphLayers:
    """The repairable linear nodes of a model (and the linear nodes refused, with reasons)."""
    return find_layers(load_model(model).model)


def repair(
    model: str | Path | onnx.ModelProto,
    data: Any,
    *,
    layer: int | str,
    group: str,
    groups: Sequence[str] | None = None,
    target: str | None = None,
    features: Sequence[str] | None = None,
    c1: float = 15.0,
    c2: float = 150.0,
    eps: float = 1e-5,
    refit: Literal["fair", "plain", "none"] = "fair",
    ridge: float | Literal["auto"] = "auto",
    holdout: float = 0.2,
    seed: int = 0,
    batch_size: int = 4096,
    progress: Callable[[str, int], None] | None = None,
) -> RepairResult:
    """Repair one linear node of `model` with explainable SVD and refit the final node.

    Args:
        model: path of an ONNX file, or a ModelProto (not modified).
        data: .csv/.npz path, a mapping {column: array}, or a re-iterable reader of batch mappings.
        layer: index among the repairable nodes (negative counts from the end) or node name.
        group: the column holding the sensitive attribute; `groups` picks two of its values.
        target: label column (enables MSE/MAE and a label-based refit), or None.
        features: feature columns of a single-input model (default: every other column, in order).
        c1, c2, eps: ESVD constants (first moment, second moment, ridge of delta delta^T).
        refit: "fair" (ridge least squares with exact output mean parity), "plain", or "none".
        ridge: ridge term of the refit, or "auto" to choose it on a seeded validation part.
        holdout: share of rows kept out of the fit to measure before/after (0: fit and report on all).
        seed: seed of the holdout and validation splits.
        batch_size: rows per onnxruntime run.
        progress: called as progress(pass_name, rows_done) after each batch.

    Returns:
        RepairResult with the new model (`.model`), the metrics and the details.
    """
    options = RepairOptions(c1=c1, c2=c2, eps=eps, refit=refit, ridge=ridge, holdout=holdout, seed=seed,
                            batch_size=batch_size)
    if groups is not None:
        groups = tuple(str(g) for g in groups)
        if len(groups) != 2 or _label_text(groups[0]) == _label_text(groups[1]):
            raise OptionError(f"--groups {','.join(groups)} is invalid; give two different values, e.g. --groups A,B")
    spec = DataSpec(group=group, groups=groups, target=target, features=tuple(features) if features else None)
    loaded = load_model(model)
    return _repair(loaded, open_table(data), layer, spec, options, progress or (lambda name, rows: None))


@dataclass
class _Capture:
    """What the first pass collects: per-label-code moments of each layer's input on the fit rows, and
    the model output, label codes and targets of the report rows."""

    moments: dict[int, list[Moments]]  # layer index -> moments per label code
    pred: list[np.ndarray] = field(default_factory=list)
    code: list[np.ndarray] = field(default_factory=list)
    target: list[np.ndarray] = field(default_factory=list)


def _report_mask(rows: _Rows, holdout: float) -> np.ndarray:
    """Rows measured by the report: the holdout rows, or every row with --holdout 0."""
    return rows.u < holdout if holdout > 0 else np.ones(len(rows.code), dtype=bool)


def _capture(model: onnx.ModelProto, layers: Sequence[LinearLayer], reader: _Reader, holdout: float,
             progress: Callable[[str, int], None]) -> _Capture:
    """Pass 1 over the original model: every given layer's input on the fit rows (reduced per batch into
    float64 moments, O(d^2) memory) and the model output on the report rows."""
    out_name = model.graph.output[0].name
    tensors = list(dict.fromkeys(layer.input for layer in layers))
    elem = {layer.input: layer.elem_type for layer in layers}
    runner = Runner(with_outputs(model, [(t, elem[t]) for t in tensors]), [*tensors, out_name])
    cap = _Capture(moments={layer.index: [] for layer in layers})
    done = 0
    for rows in reader(first_pass=True):
        out = runner.run(rows.feeds)
        n = len(rows.code)
        fit = rows.u >= holdout
        cf = rows.code[fit]
        for layer in layers:
            d = layer.in_features
            x = np.asarray(out[layer.input])
            if x.shape != (n, d):
                raise LayerError(f"node '{layer.name}' receives '{layer.input}' with shape {list(x.shape)}; only "
                                 f"inputs of shape [rows, {d}] can be repaired")
            moments = cap.moments[layer.index]
            while len(moments) < max(2, len(reader.labels)):
                moments.append(Moments(d))
            xf = x[fit]
            for c in np.unique(cf):
                moments[c].add(xf[cf == c])
        report = _report_mask(rows, holdout)
        if report.any():
            cap.pred.append(_as_rows(out[out_name], n, f"model output '{out_name}'")[report])
            cap.code.append(rows.code[report])
            if rows.target is not None:
                cap.target.append(rows.target[report])
        done += n
        progress("capture", done)
    runner.close()
    if reader.total == 0:
        raise DataError(f"{reader.table.name}: no data rows")
    return cap


def _group_stats(cap: _Capture, layer: LinearLayer, reader: _Reader, notes: list[str]) -> LayerStats:
    """Merge a layer's per-label moments into the two groups' statistics, checking the groups."""
    labels, group_of = reader.group_labels(), reader.group_of_code()
    moments = cap.moments[layer.index]
    if reader.wanted is not None:
        seen = set()
        for codes in cap.code:
            seen.update(np.unique(codes).tolist())
        for c, mom in enumerate(moments[:2]):
            if mom.n == 0 and c not in seen:
                others = ", ".join(sorted(repr(x) for x in reader.other_labels)) or "none"
                raise DataError(f"{reader.table.name}: --groups value {labels[c]!r} is not in column "
                                f"'{reader.spec.group}' (other values seen: {others})")
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
    return LayerStats.from_moments(merged[0], merged[1])


def _report_outputs(model: onnx.ModelProto, reader: _Reader, holdout: float,
                    progress: Callable[[str, int], None]) -> np.ndarray:
    """Pass 3: the model's output on the report rows, [rows, k] float64, in data order."""
    out_name = model.graph.output[0].name
    preds = []
    runner = Runner(model, [out_name], optimize=True)
    done = 0
    for rows in reader():
        report = _report_mask(rows, holdout)
        if not report.any():
            continue
        n = int(report.sum())
        feeds = {k: v[report] for k, v in rows.feeds.items()}
        preds.append(_as_rows(runner.run(feeds)[out_name], n, f"model output '{out_name}'"))
        done += n
        progress("report", done)
    runner.close()
    return np.concatenate(preds)


def _repair(loaded: LoadedModel, table: Table, layer_spec: int | str, spec: DataSpec, options: RepairOptions,
            progress: Callable[[str, int], None]) -> RepairResult:
    original = loaded.model
    found = find_layers(original)
    layer = select_layer(found, layer_spec)
    final = found.final
    if not original.graph.output:
        raise ModelError("the model has no outputs")
    reader = _Reader(table, _plan_inputs(original, table, spec), spec, options)
    h = options.holdout
    notes: list[str] = []

    cap = _capture(original, [layer], reader, h, progress)
    stats = _group_stats(cap, layer, reader, notes)
    if not cap.pred:
        raise DataError(f"{table.name}: no rows were left for the report; lower --holdout or add rows")

    weight = read_weight(original, layer)
    result = esvd(weight, stats, c1=options.c1, c2=options.c2, eps=options.eps)
    patched = onnx.ModelProto()
    patched.CopyFrom(original)
    write_weight(patched, layer, result.weight)

    refit_report, refit_note = None, ""
    if options.refit == "none":
        refit_note = "skipped: --refit none"
    elif final is None:
        refit_note = "skipped: no final linear node feeds the model output"
    elif final.index == layer.index:
        refit_note = "skipped: the repaired node is the final node, so there is nothing downstream to refit"
    else:
        refit_report = _refit(original, patched, final, reader, spec, options, progress)

    after_pred = _report_outputs(patched, reader, h, progress)
    labels = reader.group_labels()
    in_group1 = reader.group_of_code()[np.concatenate(cap.code)] == 1
    tgt = np.concatenate(cap.target) if cap.target else None
    before = output_metrics(np.concatenate(cap.pred), in_group1, labels, tgt)
    after = output_metrics(after_pred, in_group1, labels, tgt)
    counts = RowCounts(total=reader.total, skipped=reader.skipped, fit=stats.n0 + stats.n1, report=before.rows)
    res = RepairResult(model=patched, layer=layer, final=final, groups=labels, before=before, after=after,
                       report_rows="holdout" if h > 0 else "fit", rows=counts, esvd=result, refit=refit_report,
                       refit_note=refit_note, options=options, data=spec, external_data=loaded.external_data,
                       warnings=tuple(notes))
    _record(patched, res)
    return res


def _refit(original: onnx.ModelProto, patched: onnx.ModelProto, final: LinearLayer, reader: _Reader,
           spec: DataSpec, options: RepairOptions, progress: Callable[[str, int], None]) -> refit_mod.RefitReport:
    """Pass 2: stream the patched model's final-node inputs and solve the refit; writes into `patched`."""
    use_label = (spec.target is not None and final.out_features == 1
                 and output_path_is_value_preserving(original, final))
    if final.bias is None and _has_unwritable_bias(original, final):
        raise LayerError(f"final node '{final.name}' has a bias C that the refit cannot rewrite (computed at run "
                         "time, or one value broadcast to several outputs); use --refit none")
    p, m = final.in_features, final.out_features
    acc = refit_mod.RefitAccumulator(p, m)
    runner = Runner(with_outputs(patched, [(final.input, final.elem_type)]), [final.input])
    teacher = None if use_label else Runner(with_outputs(original, [(final.output, final.elem_type)]), [final.output])
    group_of = reader.group_of_code()
    h = options.holdout
    done = 0
    for rows in reader():
        fit = rows.u >= h
        if not fit.any():
            continue
        feeds = {k: v[fit] for k, v in rows.feeds.items()}
        n = int(fit.sum())
        z = _as_rows(runner.run(feeds)[final.input], n, f"input '{final.input}' of the final node")
        if z.shape[1] != p:
            raise LayerError(f"final node '{final.name}' receives '{final.input}' with {z.shape[1]} columns per row; "
                             f"only inputs of shape [rows, {p}] can be refitted (use --refit none)")
        if use_label:
            t = rows.target[fit].reshape(n, 1)
        else:
            t = _as_rows(teacher.run(feeds)[final.output], n, f"output '{final.output}' of the final node")
        in_val = (rows.u[fit] - h) / (1.0 - h) < refit_mod.RIDGE_VALIDATION_SHARE
        acc.add(z, t, group_of[rows.code[fit]] == 1, in_val)
        done += n
        progress("refit", done)
    runner.close()
    if teacher is not None:
        teacher.close()
    mode = options.refit
    sol, report = refit_mod.fit(acc, mode=mode, ridge=options.ridge, fit_intercept=final.bias is not None,
                                target_kind="label" if use_label else "distillation")
    write_weight(patched, final, sol.coef)
    if sol.intercept is not None:
        write_bias(patched, final, sol.intercept)
    return report


def _has_unwritable_bias(model: onnx.ModelProto, layer: LinearLayer) -> bool:
    """A Gemm whose C input counts (beta != 0) but is not a per-output constant."""
    node = model.graph.node[layer.node_index]
    return layer.op == "Gemm" and len(node.input) > 2 and bool(node.input[2]) and layer.beta != 0.0


def _record(model: onnx.ModelProto, res: RepairResult) -> None:
    """Store the repair's parameters and metrics in metadata_props (replacing an earlier record)."""
    info = res.to_dict()
    text = _json.dumps(info, sort_keys=True)
    for i, prop in enumerate(model.metadata_props):
        if prop.key == METADATA_KEY:
            del model.metadata_props[i]
            break
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, text
