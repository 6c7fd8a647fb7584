"""Choose the trade-off: sweep c1, c2 and the refit mode from one capture, and repair within a budget.

One capture pass serves the whole sweep. Each (c1, c2) then costs its math plus one refit pass
(shared by every refit mode of that patched layer) and one report pass per refit mode.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence


from .capture import capture_metrics, report_outputs
from .rows import data_spec
from .data import open_table
from .errors import LayerError, OptionError
from .esvd import esvd
from .graph import LinearLayer
from .guards import outputs_finite
from .metrics import OutputMetrics
from .modelio import load_model
from .oof import DEFAULT_FOLDS, OofScore, oof_score
from .refits import RefitSpec
from .pipeline import (BATCH_ROWS, LayerPass, RepairOptions, RepairResult, _apply_refit, _collect_refit, _patched,
                       _prepare, _refit_note, _refit_target_is_label, other_drifts, repair, resolve_holdout)

#: The default grid of `sweep` and of `repair --max-ks` (the paper benchmark's grid).
C1_GRID: tuple[float, ...] = (1, 5, 15, 50, 150)
C2_GRID: tuple[float, ...] = (1, 10, 150, 1000)


#: The refit settings `repair --max-ks` searches when no --refit is given: mean parity, mean and variance
#: parity at two variance gaps, and the CDF penalty at three weights (README: "Choosing the refit").
BUDGET_REFITS: tuple[RefitSpec, ...] = (
    RefitSpec("fair"), RefitSpec("moments", var_gap=0.5), RefitSpec("moments", var_gap=0.0),
    RefitSpec("cdf", lam=0.3), RefitSpec("cdf", lam=1.0), RefitSpec("cdf", lam=3.0))


#: The knob values a budget tries for an explicit `--refit moments` / `--refit cdf|w2` without --var-gap / --lam.
BUDGET_VAR_GAPS: tuple[float, ...] = (0.5, 0.25, 0.0)
BUDGET_LAMS: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class SweepPoint:
    """One setting and the repaired model's metrics on the holdout rows, or why the setting failed.

    A failed setting (its weights were not finite or did not fit the model's dtype, or the repaired model's
    output was NaN or infinite) has `metrics` None and `failed` the one-line reason; it is never Pareto-optimal
    and never chosen by a budget."""

    c1: float
    c2: float
    refit: str
    metrics: OutputMetrics | None
    pareto: bool = False
    layer: int | None = None  # index of the repaired layer (set when several layers were tried)
    spec: RefitSpec | None = None  # the refit with its knobs (var_gap, lam, tune)
    failed: str | None = None
    oof: OofScore | None = None  # out-of-fold metrics on the fit rows (sweep with folds > 0)

    @property
    def setting(self) -> RefitSpec:
        return self.spec if self.spec is not None else RefitSpec(self.refit)

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        return {"layer": self.layer, "c1": self.c1, "c2": self.c2, "refit": self.refit,
                **{k: v for k, v in self.setting.to_dict().items() if k != "mode"},
                "ks": None if m is None else m.ks, "mean_gap": None if m is None else m.mean_gap,
                "mse": None if m is None else m.mse, "mae": None if m is None else m.mae, "pareto": self.pareto,
                "failed": self.failed, "minority_rows": None if m is None else minority_rows(m),
                **({} if self.oof is None else {"out_of_fold": self.oof.to_dict()})}

    def ranking(self) -> dict[str, float]:
        """The values a budget ranks this point by: out-of-fold ones when measured, else the report rows'."""
        if self.oof is not None:
            return {"ks": self.oof.ks, "mean_gap": self.oof.mean_gap, "mse": self.oof.mse}
        return {k: v for k, v in self.metrics.to_dict().items() if k in ("ks", "mean_gap", "mse")}


def minority_rows(m: OutputMetrics) -> int:
    """Rows of the smallest group among the measured rows (report it next to any KS)."""
    return min((g.count for g in m.groups), default=0)


@dataclass(frozen=True)
class SweepResult:
    """Every setting tried, in grid order, with the original model's metrics on the same rows (failed settings
    included, marked)."""

    layer: LinearLayer
    groups: tuple[str, str]
    before: OutputMetrics
    points: tuple[SweepPoint, ...]
    report_rows: str
    warnings: tuple[str, ...]

    @property
    def measured(self) -> tuple[SweepPoint, ...]:
        """The settings that did not fail."""
        return tuple(p for p in self.points if p.metrics is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer.to_dict(), "groups": list(self.groups), "report_rows": self.report_rows,
                "before": self.before.to_dict(), "points": [p.to_dict() for p in self.points],
                "warnings": list(self.warnings)}


def _cost(m: OutputMetrics) -> float:
    """What a sweep trades against KS: MSE when a target is known, else the mean gap."""
    return m.mse if m.mse is not None else m.mean_gap


def pareto_flags(points: Sequence[tuple[float, float]]) -> list[bool]:
    """True for the points no other point beats on both coordinates (lower is better on both); a point with a
    NaN coordinate (a failed setting) is never flagged and beats no other."""
    flags = []
    for i, (a, b) in enumerate(points):
        dominated = any((x <= a and y <= b) and (x < a or y < b) for j, (x, y) in enumerate(points)
                        if j != i and not (math.isnan(x) or math.isnan(y)))
        flags.append(not dominated and not (math.isnan(a) or math.isnan(b)))
    return flags


def _reason(exc: LayerError) -> str:
    """A failed setting's one-line reason (a sweep writes nothing, so the repair's "nothing was written" goes)."""
    return str(exc).replace("; nothing was written", "")


def _grid(values: Sequence[float] | None, default: Sequence[float], name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in (values if values else default))
    for v in out:
        if not (math.isfinite(v) and v >= 1):
            raise OptionError(f"--{name} value {v:g} is invalid; every value must be a number >= 1")
    return tuple(dict.fromkeys(out))


def refit_settings(refit: Sequence[str] | None, var_gap: Sequence[float] | None = None,
                   lam: Sequence[float] | None = None, tune_layers: int | str = 1,
                   ridge: float | str = "auto") -> tuple[RefitSpec, ...]:
    """Every refit setting of a sweep: each mode, `moments` once per var_gap, `cdf`/`w2` once per lam."""
    out = []
    for mode in dict.fromkeys(refit or ("fair",)):
        if mode == "moments":
            out += [RefitSpec(mode, ridge=ridge, var_gap=float(v)) for v in dict.fromkeys(var_gap or (0.0,))]
        elif mode in ("cdf", "w2"):
            out += [RefitSpec(mode, ridge=ridge, lam=float(v), tune=tune_layers) for v in dict.fromkeys(lam or (1.0,))]
        else:
            out.append(RefitSpec(mode, ridge=ridge))
    return tuple(out)


def sweep(model: Any, data: Any, *, layer: int | str, group: str, groups: Sequence[str] | None = None,
          target: str | None = None, features: Sequence[str] | None = None, score: str | None = None,
          c1: Sequence[float] | None = None, c2: Sequence[float] | None = None, refit: Sequence[str] | None = None,
          var_gap: Sequence[float] | None = None, lam: Sequence[float] | None = None, tune_layers: int | str = 1,
          refits: Sequence[RefitSpec] | None = None, eps: float = 1e-5, weights: str = "size",
          ridge: float | Literal["auto"] = "auto", holdout: float | None = None, seed: int = 0,
          batch_size: int | None = None, evaluate: Any = None, dropna: bool = False, max_drift: float = 0.05,
          progress: Any = None, folds: int | None = 0, engine: Any = "local", scheduler: Any = None) -> SweepResult:
    """Fit every (c1, c2, refit setting) on the fit rows and measure each on the holdout rows (or on every row
    of `evaluate`). Refit settings: `refit` modes with the `var_gap` (moments) and `lam` (cdf, w2) lists, or
    `refits` given directly.

    A setting whose repair fails (non-finite weights, weights beyond the model's dtype, NaN or infinite outputs)
    is kept as a failed point with the reason, and the sweep goes on; when every setting fails, the first
    failure is raised (LayerError).


    `engine` "dask" (or an engine callable; `scheduler` as for `repair`) runs every pass on the engine's workers:
    the capture once, and each patched layer's refit pass and each setting's report pass, merged here.

    `folds` K >= 2 also scores each setting out of fold on the fit rows (`SweepPoint.oof`, see onnx_esvd.oof);
    None: DEFAULT_FOLDS where that is possible (a label target of a single-output final node whose output is
    the score), else none, with a warning; 0: none."""
    folds = check_folds(folds)
    c1s, c2s = _grid(c1, C1_GRID, "c1"), _grid(c2, C2_GRID, "c2")
    settings = tuple(refits) if refits else refit_settings(refit, var_gap, lam, tune_layers, ridge)
    holdout = resolve_holdout(holdout, evaluate)
    options = RepairOptions(eps=eps, ridge=ridge, holdout=holdout, seed=seed, batch_size=batch_size,
                            max_drift=max_drift, weights=weights, bootstrap=0)
    spec = data_spec(group, groups, target, features, score, dropna, weights)
    progress = progress or (lambda name, rows: None)
    where = LayerPass(None, engine, scheduler, data) if engine != "local" else None
    prep = _prepare(load_model(model), open_table(data), layer, spec, holdout=holdout, batch_size=batch_size,
                    seed=seed, progress=progress, refits=tuple(r.mode for r in settings),
                    evaluate=None if evaluate is None else open_table(evaluate), layer_pass=where)
    options = dataclasses.replace(options, batch_size=prep.batch_size)
    try:
        return _sweep_points(prep, c1s, c2s, settings, options, holdout, folds, max_drift, seed, weights, progress)
    finally:
        if prep.remote is not None:
            prep.remote.close()


def _sweep_points(prep: Any, c1s: Sequence[float], c2s: Sequence[float], settings: Sequence[RefitSpec],
                  options: RepairOptions, holdout: float, folds: int | None, max_drift: float, seed: int,
                  weights: str, progress: Any) -> SweepResult:
    """Every (c1, c2, refit setting) of `sweep` on the prepared data."""
    folds = _usable_folds(folds, prep)
    points: list[tuple[float, float, RefitSpec, OutputMetrics | LayerError, OofScore | None]] = []
    scored = any(not _refit_note(r.mode, prep) for r in settings)
    distilled = any(o.how == "distilled" for o in prep.others)
    for a in c1s:
        for b in c2s:
            try:
                patched: Any = _patched(prep, esvd(prep.weight, prep.stats, c1=a, c2=b, eps=options.eps,
                                                   weights=weights).weight)
            except LayerError as exc:  # this (c1, c2)'s weight is not finite or does not fit the dtype
                patched = exc
            collected: Any = None
            for setting in settings:
                oof = None
                try:
                    if isinstance(patched, LayerError):
                        raise patched
                    model_m = patched
                    if not _refit_note(setting.mode, prep) or prep.others or folds:
                        if collected is None:  # one refit pass per patched layer, shared by the refit settings
                            try:
                                collected = _collect_refit(prep, patched, holdout, progress, scored=scored,
                                                           specs=settings, folds=folds)
                            except LayerError as exc:
                                collected = exc
                        if isinstance(collected, LayerError):
                            raise collected
                        model_m = patched.__class__()
                        model_m.CopyFrom(patched)
                        if collected is not None:
                            report, _ = _apply_refit(model_m, prep, collected, setting)
                            if folds:
                                oof = oof_score(patched, model_m, collected.chain, collected.sample, setting,
                                                alpha=report.alpha if report is not None else 0.0,
                                                fit_intercept=prep.final.bias is not None,
                                                labels=prep.reader.group_labels(), folds=folds)
                    raw = None
                    if prep.remote is not None:  # the report pass on the engine's workers
                        outputs, raw = prep.remote.report(prep, model_m, [o.name for o in prep.others], progress)
                    else:
                        outputs = report_outputs(model_m, prep.report_reader, prep.report_holdout, progress,
                                                 prep.score)
                    outputs_finite(outputs, "the repaired model", prep.score.output, repaired=True)
                    after: OutputMetrics | LayerError = capture_metrics(prep.cap, prep.reader, outputs, seed=seed)
                    if distilled:  # refuse the setting as `repair` would
                        other_drifts(prep, model_m, progress, max_drift, raw)
                except LayerError as exc:
                    after, oof = exc, None
                points.append((a, b, setting, after, oof))
    failures = [m for *_rest, m, _oof in points if isinstance(m, LayerError)]
    if len(failures) == len(points):
        raise failures[0]
    nan = float("nan")
    flags = pareto_flags([(nan, nan) if isinstance(m, LayerError) else (m.ks, _cost(m)) for *_rest, m, _oof in points])
    return SweepResult(layer=prep.layer, groups=prep.reader.group_labels(), before=prep.before,
                       points=tuple(SweepPoint(a, b, r.mode, None if isinstance(m, LayerError) else m, f,
                                               prep.layer.index, r, _reason(m) if isinstance(m, LayerError) else None,
                                               o)
                                    for (a, b, r, m, o), f in zip(points, flags)),
                       report_rows=prep.report_rows, warnings=tuple(prep.notes))


def check_folds(folds: int | None) -> int | None:
    """Validate `--folds`: None (the default), 0 (rank on the holdout rows) or an integer K >= 2."""
    if folds is None:
        return None
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 0 or folds == 1:
        raise OptionError(f"--folds {folds!r} is invalid; give an integer K >= 2 (rank the settings on K-fold "
                          "out-of-fold predictions) or 0 (rank them on the holdout rows)")
    return folds


def _usable_folds(folds: int | None, prep: Any) -> int:
    """The fold count to use: refuse an explicit K where out-of-fold scores cannot be computed; for the default
    (None), fall back to none with a warning there."""
    if folds == 0:
        return 0
    why = ""
    if prep.final is None:
        why = "no final linear node feeds the scored output"
    elif prep.spec.target is None:
        why = "there is no --target"
    elif not _refit_target_is_label(prep):
        why = (f"the scored output is not the single output of the final node '{prep.final.name}' unchanged (the "
               "refit then fits the original model's outputs, not the labels)")
    if not why:
        return DEFAULT_FOLDS if folds is None else folds
    if folds is not None:
        raise OptionError(f"--folds {folds}: out-of-fold ranking is not possible here: {why}; give --folds 0 to "
                          "rank the settings on the holdout rows")
    prep.notes.append(f"the settings are ranked on the holdout rows, not out of fold: {why}")
    return 0


@dataclass(frozen=True)
class BudgetResult:
    """`repair_within_budget`: the winning repair (None when no setting meets the budget), the winner's and
    the runner-up's sweep points, and the setting closest to the budget when none meets it."""

    result: RepairResult | None
    winner: SweepPoint | None
    runner_up: SweepPoint | None
    closest: SweepPoint | None
    budget: dict[str, float]
    sweep: SweepResult
    folds: int = 0  # K of the out-of-fold ranking; 0: ranked on the report rows

    @property
    def ranked_on(self) -> str:
        """What the settings were ranked on, in words."""
        if self.folds:
            return f"{self.folds}-fold out-of-fold predictions on the fit rows"
        return f"the {self.sweep.report_rows} rows"

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "met": self.result is not None, "folds": self.folds,
                "ranked_on": self.ranked_on, "failed": sum(p.metrics is None for p in self.sweep.points),
                "winner": None if self.winner is None else self.winner.to_dict(),
                "runner_up": None if self.runner_up is None else self.runner_up.to_dict(),
                "closest": None if self.closest is None else self.closest.to_dict(),
                "sweep": self.sweep.to_dict()}


def repair_within_budget(model: Any, data: Any, *, layer: int | str, group: str, max_ks: float | None = None,
                         max_mean_gap: float | None = None, target: str | None = None,
                         refit: Sequence[str] | None = None, c1: Sequence[float] | None = None,
                         c2: Sequence[float] | None = None, folds: int | None = None, **kwargs: Any) -> BudgetResult:
    """Search the settings and repair with the lowest-MSE one whose KS (and mean gap) meet the budget.

    The settings are ranked on `folds`-fold out-of-fold predictions on the fit rows (default DEFAULT_FOLDS = 5;
    onnx_esvd.oof), or with `folds=0` on the report rows (the holdout, or `evaluate`) as before. With the
    default, a model whose score is not the final node's output (or without a label target) is ranked on the
    report rows, with a warning; an explicit K >= 2 is refused there.

    Without `refit`, the settings are BUDGET_REFITS (fair; moments at var-gap 0.5 and 0; cdf at lam 0.3, 1, 3) at
    c1 = 15, c2 = 150 (or the c1/c2 values given); with `refit` modes, the c1 x c2 grid (default C1_GRID x
    C2_GRID) with those modes and their knobs (`var_gap`, `lam` lists).

    Needs a target column (settings are ranked by MSE). When no setting meets the budget, `result` is
    None and `closest` is the setting with the smallest excess over the budget.
    """
    budget = {k: float(v) for k, v in (("ks", max_ks), ("mean_gap", max_mean_gap)) if v is not None}
    if not budget:
        raise OptionError("give a budget: --max-ks and/or --max-mean-gap")
    for key, value in budget.items():
        if not (math.isfinite(value) and value >= 0):
            raise OptionError(f"--max-{key.replace('_', '-')} {value:g} is invalid; it must be a number >= 0")
    if target is None:
        raise OptionError("--max-ks and --max-mean-gap rank the settings by MSE: add --target COL")
    folds = check_folds(folds)
    layers = auto_layers(model, data, group=group, target=target, **kwargs) if layer == "auto" else [layer]
    knobs = {k: kwargs.pop(k) for k in ("var_gap", "lam", "tune_layers") if k in kwargs}
    ridge = kwargs.get("ridge", "auto")
    if refit:
        settings = refit_settings(refit, knobs.get("var_gap") or BUDGET_VAR_GAPS, knobs.get("lam") or BUDGET_LAMS,
                                  knobs.get("tune_layers", 1), ridge)
        if any(r.mode in ("moments", "cdf", "w2") for r in settings):  # their knobs are the search
            c1, c2 = c1 or (15.0,), c2 or (150.0,)
    else:
        tune = knobs.get("tune_layers", 1)
        settings = tuple(dataclasses.replace(r, ridge=ridge, tune=tune if r.needs_rows else r.tune)
                         for r in BUDGET_REFITS)
    sweep_kwargs = {k: v for k, v in kwargs.items() if k != "bootstrap"}
    if not refit:  # the refit decides far more than c1 and c2: search the refits at the given constants
        c1, c2 = c1 or (15.0,), c2 or (150.0,)
    sweeps, failed = [], []
    for lay in layers:
        try:
            sweeps.append(sweep(model, data, layer=lay, group=group, target=target, c1=c1, c2=c2, refits=settings,
                                folds=folds, **sweep_kwargs))
        except LayerError as exc:  # every setting failed at this layer; another layer may still do
            failed.append(exc)
    if not sweeps:
        raise failed[0]
    result = sweeps[0] if len(sweeps) == 1 else SweepResult(
        layer=sweeps[0].layer, groups=sweeps[0].groups, before=sweeps[0].before,
        points=tuple(p for sw in sweeps for p in sw.points), report_rows=sweeps[0].report_rows,
        warnings=tuple(dict.fromkeys(w for sw in sweeps for w in sw.warnings)))

    used = next((p.oof.folds for p in result.points if p.oof is not None), 0)
    if used and any(p.oof is None for p in result.measured):  # not reached: one rule for every layer of a sweep
        raise OptionError("some settings have no out-of-fold scores; give --folds 0 to rank on the holdout rows")

    def excess(p: SweepPoint) -> float:
        values = p.ranking()
        return max(max(values[k] - v, 0.0) / max(v, 1e-12) for k, v in budget.items())

    measured = result.measured  # failed settings are never chosen
    feasible = sorted((p for p in measured if excess(p) == 0.0), key=lambda p: (p.ranking()["mse"], p.c1 * p.c2))
    if not feasible:
        closest = min(measured, key=lambda p: (excess(p), p.ranking()["mse"]))
        return BudgetResult(None, None, None, closest, budget, result, used)
    winner = feasible[0]
    runner_up = feasible[1] if len(feasible) > 1 else None
    passed = ("groups", "features", "score", "eps", "ridge", "holdout", "seed", "batch_size", "progress", "evaluate",
              "dropna", "max_drift", "weights", "bootstrap")
    options = {k: v for k, v in kwargs.items() if k in passed}
    w = winner.setting
    chosen = repair(model, data, layer=winner.layer, group=group, target=target, c1=winner.c1, c2=winner.c2,
                    refit=w.mode, var_gap=w.var_gap, lam=w.lam, tune_layers=w.tune, **options)
    return BudgetResult(chosen, winner, runner_up, None, budget, result, used)



#: How many of audit's top-ranked layers `--layer auto` tries (plus the second-last linear node).
AUTO_CANDIDATES = 2


def auto_layers(model: Any, data: Any, *, group: str, groups: Sequence[str] | None = None,
                target: str | None = None, features: Sequence[str] | None = None, score: str | None = None,
                eps: float = 1e-5, batch_size: int | None = None, dropna: bool = False, progress: Any = None,
                **_ignored: Any) -> list[int]:
    """The layers `--layer auto` tries: audit's top-ranked ones and the second-last linear node (the paper's
    choice), in that order, without repeats."""
    from .explain import audit

    report = audit(model, data, group=group, groups=groups, target=target, features=features, score=score, eps=eps,
                   batch_size=BATCH_ROWS if batch_size is None else batch_size, dropna=dropna, progress=progress)
    own = _own_layers(model, score)
    ranked = [a.layer.index for a in report.ranked() if a.rank is not None and a.layer.index in own][:AUTO_CANDIDATES]
    mine = [a for a in report.layers if a.layer.index in own]
    if len(mine) >= 2:
        ranked.append(mine[-2].layer.index)
    if not ranked:
        shared = [a.layer for a in report.layers if a.layer.index not in own and not a.layer.is_final]
        if shared:
            raise OptionError(f"--layer auto found no layer to try: the layers before the final node of "
                              f"{report.score} ({', '.join(f'{la.index} {la.name!r}' for la in shared)}) also feed "
                              "other outputs, which a repair there would change; give --layer N to repair one of "
                              "them anyway (the other outputs' own final nodes are then refitted back, within "
                              "--max-drift)")
        raise OptionError("--layer auto found no layer worth repairing (the only linear node is a single-output "
                          "final node); give --layer")
    return list(dict.fromkeys(ranked))


def _own_layers(model: Any, score: str | None) -> set[int]:
    """Indices of the layers whose repair leaves every other output alone (or changes only outputs computed from
    the score itself): `--layer auto` tries only these."""
    from .errors import LayerError
    from .graph import find_layers
    from .score import other_outputs, resolve_score

    proto = load_model(model).model
    scored = resolve_score(proto, score)
    found = find_layers(proto, scored.tensor)
    own = set()
    for layer in found.layers:
        if not layer.feeds_score:
            continue
        try:
            if all(o.how == "derived" for o in other_outputs(proto, found, layer, found.final, scored)):
                own.add(layer.index)
        except LayerError:
            continue
    return own


def repair_auto(model: Any, data: Any, *, group: str, **kwargs: Any) -> RepairResult:
    """`repair` with `--layer auto`: repair each candidate layer with the given options and keep the one with
    the lowest holdout KS (ties: lower MSE)."""
    keys = ("groups", "target", "features", "score", "eps", "batch_size", "progress", "dropna")
    candidates = auto_layers(model, data, group=group, **{k: v for k, v in kwargs.items() if k in keys})
    results = [repair(model, data, layer=lay, group=group, **kwargs) for lay in candidates]
    return min(results, key=lambda r: (r.after.ks, r.after.mse if r.after.mse is not None else 0.0))
