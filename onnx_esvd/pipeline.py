"""The repair pipeline shared by the Python API and the command line.

Passes over the data (each streamed in batches):
  1. original model: capture the chosen node's input on the fit rows (per-group moments) and the
     model output on the report rows (the "before" metrics);
  2. patched model: capture the final node's input on the fit rows for the refit (plus the original
     final node's output when the refit distils instead of using labels);
  3. repaired model: the output on the report rows (the "after" metrics).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import onnx

from ._version import __version__
from . import _json
from . import refit as refit_mod
from .errors import DataError, LayerError, OptionError
from .esvd import EsvdResult, esvd
from .guards import esvd_weight_fits, outputs_finite, stats_finite
from .graph import (LinearLayer, find_layers, output_path_is_value_preserving,
                    read_weight, select_layer, with_outputs, write_weight)
from .capture import OutputDrift, Progress, capture, capture_metrics, group_stats, output_drift, report_outputs
from .rows import DataSpec, RowReader, data_spec, open_rows, reader_notes
from .data import Table, open_table
from .metrics import OutputMetrics
from .modelio import LoadedModel, check_output_path, load_model, save_model
from .runtime import Background, Runner
from .score import OtherOutput, Score, other_outputs, resolve_score
from . import refits
from .refits import MIN_KEEP, PENALTY_MIN_KEEP, PENALTY_ROWS, SAMPLE_ROWS, RefitSpec
from .stats import GroupStats

METADATA_KEY = "onnx_esvd.repair"

#: The refit `--refit auto` (the default) uses: least squares plus the CDF penalty at lam = 1 on the final
#: node. On the paper's Law School models it beat `fair` on held-out MSE and KS together (README: "Refit
#: modes, and why cdf is the default"). A final node with several outputs falls back to `fair`.
DEFAULT_REFIT = "cdf"


@dataclass(frozen=True)
class RepairOptions:
    """Options of `repair`, validated once here. See the README for their meaning."""

    c1: float = 15.0
    c2: float = 150.0
    eps: float = 1e-5
    refit: str = "auto"
    ridge: float | Literal["auto"] = "auto"
    holdout: float = 0.2
    seed: int = 0
    batch_size: int | None = None  # None: pass_batch_size's choice
    max_drift: float = 0.05
    var_gap: float = 0.0
    lam: float = 1.0
    tune_layers: int | str = 1
    weights: str = "size"
    bootstrap: int = 200

    def __post_init__(self) -> None:
        if not (isinstance(self.max_drift, (int, float)) and np.isfinite(self.max_drift) and self.max_drift >= 0):
            raise OptionError(f"--max-drift {self.max_drift} is invalid; it must be a number >= 0")
        for name in ("c1", "c2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 1):
                raise OptionError(f"--{name} {v} is invalid; it must be a number >= 1 (1 skips that step)")
        if not (isinstance(self.eps, (int, float)) and np.isfinite(self.eps) and self.eps > 0):
            raise OptionError(f"--eps {self.eps} is invalid; it must be a positive number (default 1e-5)")
        self.refit_spec  # validates refit, var_gap, lam, tune_layers
        if self.ridge != "auto" and not (isinstance(self.ridge, (int, float)) and np.isfinite(self.ridge)
                                         and self.ridge >= 0):
            raise OptionError(f"--ridge {self.ridge} is invalid; give 'auto' or a number >= 0")
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise OptionError(f"--holdout {self.holdout} is invalid; it must be in [0, 1)")
        if self.batch_size is not None and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise OptionError(f"--batch-size {self.batch_size} is invalid; it must be a positive integer")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise OptionError(f"--seed {self.seed} is invalid; it must be an integer >= 0")
        if self.weights not in ("size", "equal"):
            raise OptionError(f"--weights {self.weights!r} is invalid; choose size or equal")
        if not (isinstance(self.bootstrap, int) and 0 <= self.bootstrap <= 100_000):
            raise OptionError(f"--bootstrap {self.bootstrap} is invalid; give a number of resamples in 0..100000 "
                              "(0 turns the intervals off)")

    @property
    def refit_spec(self) -> RefitSpec:
        return RefitSpec(mode=DEFAULT_REFIT if self.refit == "auto" else self.refit, ridge=self.ridge,
                         var_gap=self.var_gap, lam=self.lam, tune=self.tune_layers)

    def resolved(self, final: LinearLayer | None) -> "RepairOptions":
        """`refit="auto"` made concrete: DEFAULT_REFIT where it applies (a final node with one output), else fair."""
        if self.refit != "auto":
            return self
        usable = final is not None and final.out_features == 1
        return dataclasses.replace(self, refit=DEFAULT_REFIT if usable else "fair")


@dataclass(frozen=True)
class RowCounts:
    """Rows read, rows of neither group (skipped), rows the fit used, rows the report measured."""

    total: int
    skipped: int
    fit: int
    report: int
    dropped: int = 0


@dataclass(frozen=True)
class RepairResult:
    """The repaired model and its report.

    Attributes:
        model: the new ModelProto (the caller's model is never modified).
        layer, final: the repaired node and the refitted final node.
        groups: labels of group 0 and group 1.
        before, after: metrics of the original and repaired models on the report rows.
        report_rows: "holdout" (rows the fit did not use), "fit" (--holdout 0) or "eval" (the --eval file).
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
    score: Score | None = None
    others: tuple[OutputDrift, ...] = ()
    penalty: Any = None  # refits.PenaltyReport of a cdf/w2 refit

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, as plain JSON-ready values."""
        return {
            "tool_version": __version__,
            "score": None if self.score is None else {**self.score.to_dict(), "described": self.score_text},
            "other_outputs": [o.to_dict() for o in self.others],
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
            "refit": None if self.refit is None else {**self.refit.to_dict(), **self.options.refit_spec.to_dict(),
                                                      **({} if self.penalty is None else self.penalty.to_dict())},
            "refit_note": self.refit_note,
            "warnings": list(self.warnings),
        }

    @property
    def score_text(self) -> str:
        """The scored output as the report names it (`'y'`, `'probabilities' column 1 (the positive class) of 2`)."""
        return "" if self.score is None else self.score.describe(self.score_width)

    @property
    def score_width(self) -> int | None:
        return self.score.width if self.score is not None else None

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
    score: str | None = None,
    max_drift: float = 0.05,
    c1: float = 15.0,
    c2: float = 150.0,
    eps: float = 1e-5,
    refit: str = "auto",
    ridge: float | Literal["auto"] = "auto",
    var_gap: float = 0.0,
    lam: float = 1.0,
    tune_layers: int | str = 1,
    weights: str = "size",
    holdout: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    evaluate: Any = None,
    dropna: bool = False,
    bootstrap: int = 200,
    layer_stats: Any = None,
    engine: str = "local",
    scheduler: Any = None,
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
        score: the output scored and repaired, "NAME" or "NAME:COL" (default: the only float output; column 1
            of an [N, 2] output).
        max_drift: other outputs the repaired node feeds are distilled back to their original values; the repair
            is refused when one still moves by more than this relative RMS change on the report rows.
        c1, c2, eps: ESVD constants (first moment, second moment, ridge of delta delta^T).
        refit: "auto" (default: "cdf" with `lam` 1 when the final node has one output, else "fair"), "fair" (ridge
            least squares with exact output mean parity), "moments" (mean parity and a variance
            gap of `var_gap` times fair's), "cdf"/"w2" (least squares plus `lam` times a distribution penalty,
            tuning the last `tune_layers` linear nodes), "plain", or "none".
        ridge: ridge term of the refit, or "auto" to choose it on a seeded validation part.
        weights: group weights of the k-group steps, "size" (default) or "equal".
        holdout: share of rows kept out of the fit to measure before/after (0: fit and report on all). Default
            0.2, or 0 with `evaluate`.
        seed: seed of the holdout and validation splits.
        batch_size: rows per onnxruntime run; None: `pass_batch_size`'s choice (4096, fewer for wide layers).
        evaluate: a separate evaluation data set (same kinds as `data`): before/after are measured on all its rows,
            and the fit uses every calibration row.
        dropna: skip rows with a missing feature, group or target value (counted in the report) instead of
            refusing the data.
        bootstrap: resamples for the 95% confidence intervals of the report's metrics (0: none).
        layer_stats: a statistics file from `onnx-esvd capture`/`merge` used instead of the layer pass (its
            model, layer, columns, groups and split must be this run's).
        engine, scheduler: "dask" runs the layer pass on a Dask cluster (scheduler address, or a local cluster).
        progress: called as progress(pass_name, rows_done) after each batch.

    Returns:
        RepairResult with the new model (`.model`), the metrics and the details.
    """
    options = RepairOptions(c1=c1, c2=c2, eps=eps, refit=refit, ridge=ridge, holdout=resolve_holdout(holdout, evaluate),
                            seed=seed, batch_size=batch_size, max_drift=max_drift, var_gap=var_gap, lam=lam,
                            tune_layers=tune_layers, weights=weights, bootstrap=bootstrap)
    spec = data_spec(group, groups, target, features, score, dropna, weights)
    loaded = load_model(model)
    where = LayerPass(layer_stats, engine, scheduler, data)
    return _repair(loaded, open_table(data), layer, spec, options, progress or (lambda name, rows: None),
                   evaluate=None if evaluate is None else open_table(evaluate), layer_pass=where)


def resolve_holdout(holdout: float | None, evaluate: Any) -> float:
    """The holdout share: 0.2 by default, 0 with a separate evaluation set (which replaces it)."""
    if evaluate is None:
        return 0.2 if holdout is None else holdout
    if holdout not in (None, 0, 0.0):
        raise OptionError(f"--holdout {holdout} and --eval are alternatives: with --eval the fit uses every "
                          "calibration row and the report measures the evaluation file")
    return 0.0


@dataclass
class _Prepared:
    """Everything after pass 1 that a repair or a sweep shares."""

    loaded: LoadedModel
    layer: LinearLayer
    final: LinearLayer | None
    spec: DataSpec
    reader: RowReader
    cap: Any
    stats: GroupStats
    weight: np.ndarray
    before_metrics: Any  # OutputMetrics, or a runtime.Background computing them (see `before`)
    notes: list[str]
    score: Score
    others: list[OtherOutput]
    report_reader: RowReader  # where before/after are measured: the calibration's holdout, or the --eval file
    report_holdout: float
    remote: Any = None  # remote.RemoteRun when every pass runs on an engine's workers
    batch_size: int = 4096  # rows per batch of every pass (pass_batch_size)

    @property
    def before(self) -> OutputMetrics:
        """The original model's metrics on the report rows (waits for them if they are still being computed)."""
        if isinstance(self.before_metrics, Background):
            self.before_metrics = self.before_metrics.get()
        return self.before_metrics

    @property
    def report_rows(self) -> str:
        if self.report_reader is not self.reader:
            return "eval"
        return "holdout" if self.report_holdout > 0 else "fit"

    @property
    def original(self) -> onnx.ModelProto:
        return self.loaded.model


def resolve_repair(original: onnx.ModelProto, layer_spec: int | str, spec: DataSpec, refits: Sequence[str]
                   ) -> tuple[Any, Any, LinearLayer, LinearLayer | None, list]:
    """(score, found layers, the layer to repair, the final node, other outputs it feeds) of a repair, with the
    refit modes checked against them."""
    score = resolve_score(original, spec.score)
    found = find_layers(original, score.tensor)
    layer = select_layer(found, layer_spec)
    final = found.final
    for mode in refits:
        _check_refit(mode, layer, final, found)
    return score, found, layer, final, other_outputs(original, found, layer, final, score)


def _prepare(loaded: LoadedModel, table: Table, layer_spec: int | str, spec: DataSpec, *, holdout: float,
             batch_size: int | None, seed: int, progress: Progress, refits: Sequence[str] = ("fair",),
             evaluate: Table | None = None, bootstrap: int = 0, layer_pass: LayerPass | None = None) -> _Prepared:
    """Pass 1: find the scored output and the layers, read the data, capture the layer's statistics and the
    report rows. Everything that can be refused from the model alone is refused before any data is read."""
    if layer_pass is not None and layer_pass.everywhere(evaluate):
        from .remote import prepare_remote

        return prepare_remote(loaded, table, layer_spec, spec, holdout=holdout, batch_size=batch_size, seed=seed,
                              progress=progress, refits=refits, bootstrap=bootstrap, layer_pass=layer_pass,
                              evaluate=evaluate)
    original = loaded.model
    score, found, layer, final, others = resolve_repair(original, layer_spec, spec, refits)
    batch_size = pass_batch_size(batch_size, layer, final)
    reader = open_rows(original, table, spec, batch_size=batch_size, seed=seed)
    notes: list[str] = []
    if any(p.key == METADATA_KEY for p in original.metadata_props):
        notes.append("the input model already carries an onnx_esvd.repair record: this repairs a repaired model "
                     "(the new record replaces the old one)")
    report_reader = reader
    if evaluate is not None:
        report_reader = open_rows(original, evaluate, spec, batch_size=batch_size, seed=seed, groups=reader.index)
    elsewhere = layer_pass is not None and layer_pass.elsewhere
    cap = capture(original, [] if elsewhere else [layer], reader, holdout, progress, score, report=evaluate is None)
    if elsewhere:
        stats = layer_pass.group_stats(original, layer, spec, reader, holdout=holdout, seed=seed,
                                       batch_size=batch_size, notes=notes)
        stats_finite(stats, layer, table.name)
    else:
        stats = group_stats(cap, layer, reader, notes)
    if evaluate is not None:
        reader.index.frozen = True  # the evaluation file is measured on the calibration's groups
        cap.report = report_outputs(original, report_reader, 0.0, progress, score, first_pass=True)
        cap.width = cap.report.width
        if report_reader.skipped:
            others_seen = ", ".join(sorted(repr(x) for x in report_reader.other_labels))
            notes.append(f"{report_reader.skipped} rows of {evaluate.name} belong to no compared group "
                         f"({others_seen}) and were not measured")
    readers = [(table.name, reader)] + ([(evaluate.name, report_reader)] if evaluate is not None else [])
    for name, r in readers:
        notes += reader_notes(name, r)
    if not cap.report.rows:
        where = evaluate.name if evaluate is not None else table.name
        raise DataError(f"{where}: no rows were left for the report; lower --holdout or add rows")
    outputs_finite(cap.report, str(loaded.path or "the model"), score.output)
    # the original's metrics (the KS and its bootstrap) are computed while the ESVD and the refit go on; nothing
    # else touches cap.report until `_Prepared.before` is read, and the group labels are read here, before the
    # reader's next pass
    before = Background(cap.report.result, reader.group_labels(), reader.group_of_code(), bootstrap=bootstrap,
                        seed=seed)
    return _Prepared(loaded, layer, final, spec, reader, cap, stats, read_weight(original, layer),
                     before, notes, score, others, report_reader,
                     0.0 if evaluate is not None else holdout, batch_size=batch_size)


#: Rows per batch of the passes by default ...
BATCH_ROWS = 4096
#: ... or fewer, so that a batch of the repaired node's or the final node's input stays at this many bytes in
#: float64 (from 257 inputs on). Up to three batches are in flight with their float64 copies: on 8,192 rows of a
#: 1024-wide layer, 1,024-row batches took the repair's peak RSS from 506 to 351 MiB, at the same speed.
BATCH_BYTES = 8 * 2**20


def pass_batch_size(batch_size: int | None, layer: LinearLayer, final: LinearLayer | None) -> int:
    """The batch size of the passes: `batch_size` when given, else BATCH_ROWS rows, fewer for inputs wider than
    256 (BATCH_BYTES per batch, at least 512 rows)."""
    if batch_size is not None:
        return batch_size
    width = max(layer.in_features, final.in_features if final is not None else 0, 1)
    return int(min(BATCH_ROWS, max(512, BATCH_BYTES // (8 * width))))


@dataclass(frozen=True)
class LayerPass:
    """Where the layer pass (per-group moments of the repaired node's input on the fit rows) runs.

    Attributes:
        stats: a statistics file from `onnx-esvd capture`/`merge` (or a LayerPartial) used instead of the pass.
        engine: "local" (this process) or "dask" (one task per data file on a Dask cluster).
        scheduler: the Dask scheduler address (or Client); None starts a local cluster.
        data: the data as given (the Dask engine opens the files on the workers).
    """

    stats: Any = None
    engine: str = "local"
    scheduler: Any = None
    data: Any = None

    def __post_init__(self) -> None:
        if not (self.engine in ("local", "dask") or callable(self.engine)):
            raise OptionError(f"--engine {self.engine!r} is invalid; choose local or dask")
        if self.stats is not None and self.engine != "local":
            raise OptionError("--layer-stats and --engine dask are alternatives: the statistics are already computed")

    @property
    def elsewhere(self) -> bool:
        return self.stats is not None or self.engine != "local"

    def everywhere(self, evaluate: Any = None) -> bool:
        """Every pass runs on the engine's workers (with --eval: over its files too)."""
        return self.stats is None and self.engine != "local"

    def group_stats(self, model: onnx.ModelProto, layer: LinearLayer, spec: DataSpec, reader: RowReader, *,
                    holdout: float, seed: int, batch_size: int, notes: list[str]) -> GroupStats:
        labels = reader.group_labels()
        if self.stats is not None:
            from .layer_pass import layer_stats_for_repair

            return layer_stats_for_repair(self.stats, model, layer, spec, holdout=holdout, seed=seed,
                                          columns=reader, labels=labels, notes=notes)[0]
        raise OptionError("internal: with an engine every pass runs on its workers (remote.prepare_remote)")


def _check_refit(mode: str, layer: LinearLayer, final: LinearLayer | None, found: Any) -> None:
    """Refuse a repair that cannot change the scored distribution or whose refit is impossible."""
    scored = [x for x in found.layers if x.feeds_score]
    earlier = scored[-2].index if len(scored) >= 2 else None
    hint = (f"choose an earlier layer, e.g. --layer {earlier} (the second-last; `onnx-esvd audit` ranks them)"
            if earlier is not None else "the model has no earlier linear node to repair")
    if final is not None and layer.index == final.index:
        if layer.out_features == 1:
            raise LayerError(f"--layer {layer.index} ('{layer.name}') is the final node with a single output: the "
                             f"repair could only rescale it, which leaves the KS unchanged; {hint}")
        if mode != "none":
            raise LayerError(f"--layer {layer.index} ('{layer.name}') is the final node, so nothing downstream can be "
                             f"refitted; {hint}, or pass --refit none")


def _refit_note(refit: str, prep: _Prepared) -> str:
    """Why the refit is skipped, or "" when it applies."""
    if refit == "none":
        return "skipped: --refit none"
    if prep.final is None:
        return "skipped: no final linear node feeds the model output"
    return ""


def _patched(prep: _Prepared, weight: np.ndarray) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(prep.original)
    esvd_weight_fits(weight, prep.layer)
    write_weight(model, prep.layer, weight)
    return model


def _repair(loaded: LoadedModel, table: Table, layer_spec: int | str, spec: DataSpec, options: RepairOptions,
            progress: Progress, evaluate: Table | None = None, layer_pass: LayerPass | None = None) -> RepairResult:
    prep = _prepare(loaded, table, layer_spec, spec, holdout=options.holdout, batch_size=options.batch_size,
                    seed=options.seed, progress=progress, refits=(options.refit,), evaluate=evaluate,
                    bootstrap=options.bootstrap, layer_pass=layer_pass)
    options = dataclasses.replace(options, batch_size=prep.batch_size)  # the JSON says what ran
    try:
        return _repair_prepared(prep, options, progress)
    finally:
        if prep.remote is not None:
            prep.remote.close()


def _repair_prepared(prep: _Prepared, options: RepairOptions, progress: Progress) -> RepairResult:
    chosen = options.resolved(prep.final)
    if options.refit == "auto" and chosen.refit != DEFAULT_REFIT and prep.final is not None:
        prep.notes.append(f"the default refit ({DEFAULT_REFIT}) needs a final node with one output; "
                          f"'{prep.final.name}' has {prep.final.out_features}, so the refit is {chosen.refit}")
    options = chosen
    result = esvd(prep.weight, prep.stats, c1=options.c1, c2=options.c2, eps=options.eps, weights=options.weights)
    patched = _patched(prep, result.weight)
    refit_report, refit_note = None, _refit_note(options.refit, prep)
    rspec = options.refit_spec
    collected = _collect_refit(prep, patched, options.holdout, progress, scored=not refit_note, specs=[rspec])
    penalty = None
    if collected is not None:
        refit_report, penalty = _apply_refit(patched, prep, collected, rspec)
    collected = None  # the refit's row sample is not kept through the report pass
    return _finish(prep, patched, result, refit_report, refit_note, options, progress, penalty)


def _finish(prep: _Prepared, patched: onnx.ModelProto, result: EsvdResult, refit_report, refit_note: str,
            options: RepairOptions, progress: Progress, penalty: Any = None) -> RepairResult:
    """Pass 3 (the report of the repaired model), the result and its metadata record."""
    reader, rr, h = prep.reader, prep.report_reader, prep.report_holdout
    names = [o.name for o in prep.others]
    if prep.remote is not None:
        after_values, raw = prep.remote.report(prep, patched, names, progress)
    else:
        after_values = report_outputs(patched, rr, h, progress, prep.score)
        raw = None  # measured by other_drifts on the report rows
    outputs_finite(after_values, "the repaired model", prep.score.output, repaired=True)
    after = capture_metrics(prep.cap, reader, after_values, bootstrap=options.bootstrap, seed=options.seed)
    drifts = other_drifts(prep, patched, progress, options.max_drift, raw)
    notes = list(prep.notes)
    for o, drift in zip(prep.others, drifts):
        if o.how == "derived":
            notes.append(f"output '{o.name}' is computed from the scored output's final node, so it changes with "
                         f"the repair (relative RMS change {drift.relative:.3g} on the report rows)")
    if penalty is not None and penalty.limited_rounds:
        rounds = ", ".join(str(r) for r in penalty.limited_rounds)
        notes.append(f"the {refit_report.mode} refit's optimiser stopped at its iteration limit in round {rounds}: its "
                     "weights are not converged and may move with --batch-size or the file split (the report "
                     "measures the model as written)")
    if after.ks > prep.before.ks:
        notes.append(f"the repair made the KS worse on the report rows ({prep.before.ks:.4f} -> {after.ks:.4f}); "
                     "do not ship this model: try another --layer, --refit or more calibration rows")
    counts = RowCounts(total=reader.total, skipped=reader.skipped, fit=int(np.sum(prep.stats.counts)),
                       report=prep.before.rows, dropped=reader.dropped)
    res = RepairResult(model=patched, layer=prep.layer, final=prep.final, groups=reader.group_labels(),
                       before=prep.before, after=after, report_rows=prep.report_rows, rows=counts,
                       esvd=result, refit=refit_report, refit_note=refit_note, options=options, data=prep.spec,
                       external_data=prep.loaded.external_data, warnings=tuple(notes),
                       values=(_group_values(prep.cap.report, reader), _group_values(after_values, reader)),
                       score=dataclasses.replace(prep.score, width=prep.cap.width or prep.score.width),
                       others=drifts, penalty=penalty)
    _record(patched, res)
    return res


def other_drifts(prep: _Prepared, patched: onnx.ModelProto, progress: Progress, max_drift: float,
                 raw: Sequence[OutputDrift] | None = None) -> tuple[OutputDrift, ...]:
    """How far each other output the repaired node feeds moved on the report rows (`raw`: already measured, e.g.
    on an engine's workers); raises LayerError when a distilled one moved by more than `max_drift` of its spread."""
    if not prep.others:
        return ()
    if raw is None:
        raw = output_drift(prep.original, patched, prep.report_reader, prep.report_holdout,
                           [o.name for o in prep.others], progress)
    drifts = tuple(dataclasses.replace(d, how=o.how) for o, d in zip(prep.others, raw))
    for o, drift in zip(prep.others, drifts):
        if o.how == "distilled" and not drift.relative <= max_drift:
            raise LayerError(f"output '{o.name}' would change: after refitting its final node '{o.final.name}' to its "
                             f"original values it still moves by {drift.relative:.3g} of its spread (relative RMS, "
                             f"--max-drift {max_drift:g}); repair a layer that only the scored output "
                             f"'{prep.score.output}' depends on, or raise --max-drift")
    return drifts


def _group_values(collector: Any, reader: RowReader) -> tuple[np.ndarray, ...]:
    """The report rows' outputs of each group, in group order (for plots)."""
    groups = [int(x) for x in reader.group_of_code()]
    k = len(reader.group_labels())
    return tuple(collector.values(groups.index(g)) if g in groups else np.zeros((0, 1)) for g in range(k))


@dataclass
class _RefitData:
    """What pass 2 collected: refit moments of the scored final node (None when it is not refitted) and of the
    final nodes of other outputs that are distilled back to their original values."""

    scored: refit_mod.RefitAccumulator | None
    kind: str
    distilled: dict[int, refit_mod.RefitAccumulator]
    sample: Any = None  # StratifiedSample of the tuned chain's input rows (penalised refits)
    chain: Any = None  # the tuned layers (tuning.GraphChain)


def _refit_target_is_label(prep: _Prepared) -> bool:
    final = prep.final
    return (prep.spec.target is not None and final.out_features == 1
            and output_path_is_value_preserving(prep.original, final, prep.score.tensor))


@dataclass
class _RefitPlan:
    """What pass 2 fetches: the final nodes refitted (the scored one first when `scored`), those whose target is
    the original model's output (`taught`), and the penalised refit's tuned chain and row sample."""

    finals: list
    taught: list
    use_label: bool
    scored: bool
    chain: Any = None
    sample: Any = None
    folds: int = 0  # > 0: every sampled row carries its fold id (the budget's out-of-fold ranking)


def _refit_plan(prep: _Prepared, scored: bool, specs: Sequence[RefitSpec], folds: int = 0) -> _RefitPlan | None:
    original = prep.original
    finals = ([prep.final] if scored else []) + [o.final for o in prep.others if o.how == "distilled"]
    if not finals:
        return None
    rows_spec = next((r for r in specs if r.needs_rows), None) if scored else None
    if rows_spec is None and scored and folds > 0:
        rows_spec = RefitSpec("fair")  # the out-of-fold ranking refits the final node alone
    chain = sample = None
    if rows_spec is not None:
        from .graph import find_layers
        from .rowsample import StratifiedSample
        from .tuning import graph_chain

        tunes = {r.tune for r in specs if r.needs_rows}
        if len(tunes) > 1:
            raise OptionError("penalised refits in one run must tune the same number of layers (--tune-layers)")
        chain = graph_chain(original, find_layers(original, prep.score.tensor), prep.final, rows_spec.tune)
        # the final node alone: the fit term comes from the refit moments, the sample serves the penalty alone
        small = len(chain.layers) == 1 and folds == 0
        sample = StratifiedSample(capacity=PENALTY_ROWS if small else SAMPLE_ROWS,
                                  min_keep_per_group=PENALTY_MIN_KEEP if small else MIN_KEEP, seed=prep.reader.seed)
    use_label = scored and _refit_target_is_label(prep)
    for final in finals:
        if final.bias is None and _has_unwritable_bias(original, final):
            raise LayerError(f"final node '{final.name}' has a bias C that the refit cannot rewrite (computed at run "
                             "time, or one value broadcast to several outputs); use --refit none")
    taught = [f for f in finals if not (use_label and f.index == prep.final.index)]
    return _RefitPlan(finals, taught, use_label, scored, chain, sample, folds if sample is not None else 0)


def _collect_refit(prep: _Prepared, patched: onnx.ModelProto, holdout: float, progress: Progress, *,
                   scored: bool = True, specs: Sequence[RefitSpec] = (), folds: int = 0) -> _RefitData | None:
    """Pass 2: stream the patched model's final-node inputs (and the targets) into refit moments: the scored
    final node's (when `scored`) and those of other outputs' final nodes that are distilled; for a penalised
    refit among `specs`, or for an out-of-fold ranking (`folds` > 0), also a group-stratified sample of the
    tuned chain's input rows, each with its fold id (`rowsample.fold_of` of its global row index)."""
    plan = _refit_plan(prep, scored, specs, folds)
    if plan is None:
        return None
    if prep.remote is not None:
        if plan.folds:
            raise OptionError("the out-of-fold ranking of --max-ks runs in one process: leave out --engine or "
                              "give --folds 0")
        accs, sample = prep.remote.refit(prep, patched, plan, holdout, progress)
    else:
        from .passes import refit_batches

        original, reader = prep.original, prep.reader
        finals, chain = plan.finals, plan.chain
        k = len(reader.group_labels())
        accs = {f.index: refit_mod.RefitAccumulator(f.in_features, f.out_features, k) for f in finals}
        fetch = [(f.input, f.elem_type) for f in finals]
        if chain is not None:
            fetch.append((chain.input, chain.layers[0].elem_type))
        runner = Runner(with_outputs(patched, fetch), list(dict.fromkeys(name for name, _ in fetch)))
        teacher = (Runner(with_outputs(original, [(f.output, f.elem_type) for f in plan.taught]),
                          list(dict.fromkeys(f.output for f in plan.taught))) if plan.taught else None)
        group_of = reader.group_of_code()
        batches = ((rows, group_of[rows.code]) for rows in reader(select="fit", holdout=holdout))
        sample = plan.sample
        try:
            refit_batches(batches, runner, teacher, finals, plan.taught, accs, holdout, chain=chain, sample=sample,
                          sampled=prep.final if scored else None, progress=progress,
                          folds=(plan.folds, reader.seed))
        finally:
            runner.close()
            if teacher is not None:
                teacher.close()
    return _RefitData(accs[prep.final.index] if scored else None, "label" if plan.use_label else "distillation",
                      {f.index: accs[f.index] for f in plan.finals if not (scored and f.index == prep.final.index)},
                      sample, plan.chain)


def _apply_refit(patched: onnx.ModelProto, prep: _Prepared, data: _RefitData, spec: RefitSpec
                 ) -> tuple[refit_mod.RefitReport | None, Any]:
    """Solve the refits from what pass 2 collected and write them into `patched`: the scored final node (and,
    for a penalised refit, the tuned layers before it) as `spec` says, the distilled nodes of other outputs by
    plain least squares on their original values. Returns the refit report and the penalised refit's details."""
    report = penalty = None
    if data.scored is not None and spec.mode != "none":
        sol, report = refits.fit_final(data.scored, prep.final, spec, data.kind)
        if spec.needs_rows:
            report, penalty = refits.penalised(patched, data.chain, data.sample, sol, report, spec,
                                               prep.reader.group_labels(), acc=data.scored)
        else:
            refits.write_solution(patched, prep.final, sol)
    by_index = {o.final.index: o.final for o in prep.others if o.how == "distilled"}
    for index, acc in data.distilled.items():
        sol, _ = refits.fit_final(acc, by_index[index], RefitSpec(mode="plain", ridge=spec.ridge), "distillation")
        refits.write_solution(patched, by_index[index], sol)
    return report, penalty


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
