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
from typing import Any, Literal, Sequence

import numpy as np
import onnx

from ._version import __version__
from . import _json
from . import refit as refit_mod
from .errors import DataError, LayerError, ModelError, OptionError
from .esvd import EsvdResult, esvd
from .guards import esvd_weight_fits, outputs_finite, refit_fits
from .graph import (LinearLayer, find_layers, output_path_is_value_preserving,
                    read_weight, select_layer, with_outputs, write_bias, write_weight)
from .capture import (DataSpec, Progress, RowReader, Rows, as_rows, capture, capture_metrics, data_spec,
                      group_stats, open_rows, report_outputs)
from .data import Table, open_table
from .metrics import OutputMetrics
from .modelio import LoadedModel, check_output_path, load_model, save_model
from .runtime import Runner, pipelined
from .stats import LayerStats

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
    values: tuple = field(default=(), repr=False)  # ((g0, g1) before, (g0, g1) after): report outputs, for plots

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
        models = (Path(source),) if source is not None else ()
        out = check_output_path(path, models=models, force=force)
        return save_model(self.model, out, external_data=self.external_data, force=force, models=models)


def default_output_path(model_path: str | Path) -> Path:
    """`MODEL` stem + `.esvd.onnx`, next to the input."""
    p = Path(model_path)
    return p.with_name(p.stem + ".esvd.onnx")


# ---------------------------------------------------------------------------------------------
# the pipeline


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
    progress: Progress | None = None,
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
    spec = data_spec(group, groups, target, features)
    loaded = load_model(model)
    return _repair(loaded, open_table(data), layer, spec, options, progress or (lambda name, rows: None))


@dataclass
class _Prepared:
    """Everything after pass 1 that a repair or a sweep shares."""

    loaded: LoadedModel
    layer: LinearLayer
    final: LinearLayer | None
    spec: DataSpec
    reader: RowReader
    cap: Any
    stats: LayerStats
    weight: np.ndarray
    before: OutputMetrics
    notes: list[str]

    @property
    def original(self) -> onnx.ModelProto:
        return self.loaded.model


def _prepare(loaded: LoadedModel, table: Table, layer_spec: int | str, spec: DataSpec, *, holdout: float,
             batch_size: int, seed: int, progress: Progress) -> _Prepared:
    """Pass 1: find the layers, read the data, capture the layer's statistics and the report rows."""
    original = loaded.model
    found = find_layers(original)
    layer = select_layer(found, layer_spec)
    if not original.graph.output:
        raise ModelError("the model has no outputs")
    reader = open_rows(original, table, spec, batch_size=batch_size, seed=seed)
    notes: list[str] = []
    cap = capture(original, [layer], reader, holdout, progress)
    stats = group_stats(cap, layer, reader, notes)
    if not cap.report.rows:
        raise DataError(f"{table.name}: no rows were left for the report; lower --holdout or add rows")
    outputs_finite(cap.report, str(loaded.path or "the model"), original.graph.output[0].name)
    return _Prepared(loaded, layer, found.final, spec, reader, cap, stats, read_weight(original, layer),
                     capture_metrics(cap, reader), notes)


def _refit_note(refit: str, prep: _Prepared) -> str:
    """Why the refit is skipped, or "" when it applies."""
    if refit == "none":
        return "skipped: --refit none"
    if prep.final is None:
        return "skipped: no final linear node feeds the model output"
    if prep.final.index == prep.layer.index:
        return "skipped: the repaired node is the final node, so there is nothing downstream to refit"
    return ""


def _patched(prep: _Prepared, weight: np.ndarray) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(prep.original)
    esvd_weight_fits(weight, prep.layer)
    write_weight(model, prep.layer, weight)
    return model


def _repair(loaded: LoadedModel, table: Table, layer_spec: int | str, spec: DataSpec, options: RepairOptions,
            progress: Progress) -> RepairResult:
    prep = _prepare(loaded, table, layer_spec, spec, holdout=options.holdout, batch_size=options.batch_size,
                    seed=options.seed, progress=progress)
    result = esvd(prep.weight, prep.stats, c1=options.c1, c2=options.c2, eps=options.eps)
    patched = _patched(prep, result.weight)
    refit_report, refit_note = None, _refit_note(options.refit, prep)
    if not refit_note:
        acc, kind = _collect_refit(prep, patched, options.holdout, progress)
        refit_report = _apply_refit(patched, prep.final, acc, kind, options.refit, options.ridge)
    return _finish(prep, patched, result, refit_report, refit_note, options, progress)


def _finish(prep: _Prepared, patched: onnx.ModelProto, result: EsvdResult, refit_report, refit_note: str,
            options: RepairOptions, progress: Progress) -> RepairResult:
    """Pass 3 (the report of the repaired model), the result and its metadata record."""
    reader, h = prep.reader, options.holdout
    after_values = report_outputs(patched, reader, h, progress)
    outputs_finite(after_values, "the repaired model", patched.graph.output[0].name, repaired=True)
    after = capture_metrics(prep.cap, reader, after_values)
    counts = RowCounts(total=reader.total, skipped=reader.skipped, fit=prep.stats.n0 + prep.stats.n1,
                       report=prep.before.rows)
    res = RepairResult(model=patched, layer=prep.layer, final=prep.final, groups=reader.group_labels(),
                       before=prep.before, after=after, report_rows="holdout" if h > 0 else "fit", rows=counts,
                       esvd=result, refit=refit_report, refit_note=refit_note, options=options, data=prep.spec,
                       external_data=prep.loaded.external_data, warnings=tuple(prep.notes),
                       values=(_group_values(prep.cap.report, reader), _group_values(after_values, reader)))
    _record(patched, res)
    return res


def _group_values(collector: Any, reader: RowReader) -> tuple[np.ndarray, np.ndarray]:
    """The report rows' outputs of group 0 and group 1 (for plots)."""
    groups = [int(x) for x in reader.group_of_code()]
    return tuple(collector.values(groups.index(g) if g in groups else g) for g in (0, 1))  # type: ignore[return-value]


def _collect_refit(prep: _Prepared, patched: onnx.ModelProto, holdout: float,
                   progress: Progress) -> tuple[refit_mod.RefitAccumulator, str]:
    """Pass 2: stream the patched model's final-node inputs (and the target) into refit moments."""
    original, final, spec, reader = prep.original, prep.final, prep.spec, prep.reader
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
    h = holdout
    done = 0

    def run(rows: Rows) -> tuple[np.ndarray, np.ndarray | None]:
        z = runner.run(rows.feeds)[final.input]
        return z, None if teacher is None else teacher.run(rows.feeds)[final.output]

    for rows, (z_out, t_out) in pipelined(reader(select="fit", holdout=h), run):
        n = len(rows.code)
        z = as_rows(z_out, n, f"input '{final.input}' of the final node")
        if z.shape[1] != p:
            raise LayerError(f"final node '{final.name}' receives '{final.input}' with {z.shape[1]} columns per row; "
                             f"only inputs of shape [rows, {p}] can be refitted (use --refit none)")
        t = rows.target.reshape(n, 1) if use_label else as_rows(t_out, n, f"output '{final.output}' of the final node")
        in_val = (rows.u - h) / (1.0 - h) < refit_mod.RIDGE_VALIDATION_SHARE
        acc.add(z, t, group_of[rows.code] == 1, in_val)
        done += n
        progress("refit", done)
    runner.close()
    if teacher is not None:
        teacher.close()
    return acc, "label" if use_label else "distillation"


def _apply_refit(patched: onnx.ModelProto, final: LinearLayer, acc: refit_mod.RefitAccumulator, kind: str,
                 mode: str, ridge: Any) -> refit_mod.RefitReport:
    """Solve the refit from the collected moments and write the final node into `patched`."""
    sol, report = refit_mod.fit(acc, mode=mode, ridge=ridge, fit_intercept=final.bias is not None, target_kind=kind)
    refit_fits(sol.coef, sol.intercept, final)
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
