"""`onnx-esvd` commands. Each body parses options, calls one library function and prints.

The library (numpy, scipy, onnx, onnxruntime) is imported inside the commands, so `--help` and
argument errors stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import OneLineErrors, handled

app = typer.Typer(
    name="onnx-esvd",
    cls=OneLineErrors,
    help="Repair statistical-parity gaps in ONNX regression models by rewriting their weights "
         "(explainable SVD). The repaired model needs no sensitive attribute at inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Reusable option types -------------------------------------------------------------------------

ModelArg = Annotated[Path, typer.Argument(help="The ONNX model file.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
PlotOpt = Annotated[Optional[str], typer.Option("--plot", metavar="PATH", help="Also draw a picture there "
                                                                             "(PNG; needs matplotlib).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress line on stderr.")]
DataOpt = Annotated[Path, typer.Option("--data", help="Calibration data: CSV with a header line, or .npz.",
                                       show_default=False)]
GroupOpt = Annotated[str, typer.Option("--group", help="Column holding the sensitive attribute.",
                                       show_default=False)]
GroupsOpt = Annotated[Optional[str], typer.Option(
    "--groups", metavar="A,B", help="The two values of the group column to compare (needed when it has more "
                                    "than two; other rows are skipped).")]
TargetOpt = Annotated[Optional[str], typer.Option(
    "--target", help="Label column: enables MSE/MAE and the label-based refit.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", max=2**31 - 1, help="Rows per onnxruntime run.")]
AutoBatchOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", max=2**31 - 1, show_default=False,
    help="Rows per onnxruntime run (default 4096; fewer when the layer's or the final node's input is wider than "
         "256, so that a batch of it stays at 8 MiB in float64).")]
SpillDirOpt = Annotated[Optional[Path], typer.Option("--spill-dir", help="Directory of the temporary spill file that "
                                                     "spares later passes re-parsing a CSV (default: the system's "
                                                     "temporary directory; at most 4 GiB, then it re-parses).")]
NoSpillOpt = Annotated[bool, typer.Option("--no-spill", help="Re-parse the CSV in every pass instead of spilling "
                                                             "parsed rows to a temporary file.")]
EngineOpt = Annotated[str, typer.Option("--engine", metavar="local|dask", help="Where the passes run: this "
                                        "process, or a Dask cluster (one task per data file, merged here).")]
SchedulerOpt = Annotated[Optional[str], typer.Option("--scheduler", metavar="ADDRESS", help="--engine dask: an "
                                                     "existing scheduler (default: a local cluster).")]


def _spill(directory: Optional[Path], off: bool):
    """The spill settings of a command (imported late: `--help` loads no numeric package)."""
    from onnx_esvd.spill import spill_options

    return spill_options(enabled=not off, directory=directory)


def _layer_text(value: Optional[str]) -> Optional[str]:
    """An index is ASCII digits with an optional sign; int() would also take '٣', ' 1_0 ' and the like."""
    import re

    if value is None:
        return value
    text = value.strip()
    try:
        int(text)
    except ValueError:
        return value
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise typer.BadParameter(f"{value!r} is not an index in ASCII digits (like -2) nor a node name")
    return value


LayerOpt = Annotated[str, typer.Option("--layer", callback=_layer_text,
                                       help="Index from `onnx-esvd layers` (negative counts from the end: -2 is the "
                                            "second-last) or node name.", show_default=False)]
AutoLayerOpt = Annotated[str, typer.Option("--layer", callback=_layer_text,
                                           help="Index from `onnx-esvd layers` (negative counts from the end: -2 is "
                                                "the second-last), node name, or 'auto' (audit's top layers and the "
                                                "second-last).", show_default=False)]
EpsOpt = Annotated[float, typer.Option("--eps", help="The eps of delta delta^T + eps I in the first-moment step.")]
RidgeOpt = Annotated[str, typer.Option("--ridge", metavar="auto|FLOAT", help="Ridge term of the refit, or 'auto' "
                                                                             "to choose it on held-out fit rows.")]
HoldoutOpt = Annotated[Optional[float], typer.Option("--holdout", show_default="0.2, or 0 with --eval",
                                                     help="Share of rows kept out of the fit to measure the "
                                                             "result (0: fit and report on all).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the holdout and ridge splits.")]
EvalOpt = Annotated[Optional[Path], typer.Option(
    "--eval", metavar="FILE", help="Measure before/after on every row of this file (same format as --data) "
                                  "instead of a holdout of the calibration data; the fit then uses every "
                                  "calibration row.")]
DropnaOpt = Annotated[bool, typer.Option("--dropna", help="Skip rows with a missing feature, group or target value "
                                                          "(the report counts them) instead of refusing the data.")]
MaxDriftOpt = Annotated[float, typer.Option(
    "--max-drift", help="Other outputs the repaired node feeds are refitted back to their original values; refuse "
                        "when one still moves by more than this (RMS change / its spread).")]
WeightsOpt = Annotated[str, typer.Option("--weights", metavar="size|equal", help="Group weights of the k-group "
                                                                            "steps: by group size, or equal.")]
BootstrapOpt = Annotated[int, typer.Option("--bootstrap", metavar="N", help="Bootstrap resamples for the 95% "
                                                                           "confidence intervals (0: none).")]
TuneOpt = Annotated[str, typer.Option("--tune-layers", metavar="K|all", help="Refit cdf/w2: tune the last K linear "
                                                                             "nodes (through elementwise "
                                                                             "activations), or all of them.")]
ScoreOpt = Annotated[Optional[str], typer.Option(
    "--score", metavar="NAME[:COL]", help="The model output (and column) whose distribution is scored and repaired "
                                         "(default: the only floating-point output; column 1 of an [N, 2] output).")]
FeaturesOpt = Annotated[Optional[str], typer.Option(
    "--features", metavar="COL,...", help="Feature columns in model order (default: every column but the group "
                                          "and target columns, in file order).")]


def _split(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _version(value: bool) -> None:
    if value:
        from onnx_esvd._version import __version__

        typer.echo(f"onnx-esvd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Repair statistical-parity gaps in ONNX regression models (explainable SVD)."""


@app.command()
def layers(model: ModelArg, score: ScoreOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List the repairable linear nodes (Gemm, MatMul with a constant weight) in graph order."""
    with handled(debug):
        from onnx_esvd import list_layers
        from onnx_esvd._json import dumps

        from .report import layers_table

        found = list_layers(model, score=score)
        if json_out:
            typer.echo(dumps({
                "model": str(model),
                "score": found.score_tensor,
                "layers": [layer.to_dict() for layer in found.layers],
                "refused": [{"name": name, "reason": reason} for name, reason in found.refused.items()],
            }, indent=2))
        else:
            if not found.layers:
                typer.echo("no repairable linear node (Gemm or MatMul with a constant 2-D weight)")
            typer.echo(layers_table(found))


@app.command()
def repair(
    model: ModelArg,
    layer: AutoLayerOpt,
    data: DataOpt,
    group: GroupOpt,
    groups: GroupsOpt = None,
    target: TargetOpt = None,
    features: FeaturesOpt = None,
    score: ScoreOpt = None,
    evaluate: EvalOpt = None,
    dropna: DropnaOpt = False,
    max_drift: MaxDriftOpt = 0.05,
    c1: Annotated[float, typer.Option("--c1", help="First-moment shrink: divide the mean-gap bound by c1 "
                                                   "(1 skips).")] = 15.0,
    c2: Annotated[float, typer.Option("--c2", help="Second-moment shrink: divide the covariance-gap bound by "
                                                   "c2 (1 skips).")] = 150.0,
    eps: EpsOpt = 1e-5,
    refit: Annotated[Optional[str], typer.Option(
        "--refit", show_default="auto: cdf, or fair for a final node with several outputs",
        help="Refit of the final node: cdf or w2 (least squares plus a distribution penalty), fair (output mean "
             "parity), moments (mean and variance parity), plain (least squares), none.")] = None,
    var_gap: Annotated[float, typer.Option("--var-gap", help="Refit moments: the output variance gap kept, as a "
                                                             "share of fair's (0: equal variances).")] = 0.0,
    lam: Annotated[float, typer.Option("--lam", "--w2", help="Refit cdf/w2: weight of the distribution "
                                                             "penalty.")] = 1.0,
    tune_layers: TuneOpt = "1",
    weights: WeightsOpt = "size",
    bootstrap: BootstrapOpt = 200,
    layer_stats: Annotated[Optional[Path], typer.Option(
        "--layer-stats", metavar="ALL.npz", help="Layer statistics from `capture`/`merge`, used instead of the "
                                                 "layer pass.")] = None,
    engine: EngineOpt = "local",
    scheduler: SchedulerOpt = None,
    ridge: RidgeOpt = "auto",
    holdout: HoldoutOpt = None,
    seed: SeedOpt = 0,
    batch_size: AutoBatchOpt = None,
    spill_dir: SpillDirOpt = None,
    no_spill: NoSpillOpt = False,
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Output file (default: MODEL stem + "
                                                                          ".esvd.onnx next to MODEL).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    max_ks: Annotated[Optional[float], typer.Option("--max-ks", help="Search the refits and their knobs (or, with "
                                                                     "--refit fair, c1 x c2) and keep the "
                                                                     "lowest-MSE setting whose out-of-fold KS (see "
                                                                     "--folds) is at most this (needs --target).")
                      ] = None,
    max_mean_gap: Annotated[Optional[float], typer.Option("--max-mean-gap", help="The same budget on the "
                                                                                 "mean gap.")] = None,
    folds: Annotated[Optional[int], typer.Option("--folds", metavar="K", show_default="5",
                                                 help="With --max-ks/--max-mean-gap: rank the settings on K-fold "
                                                      "out-of-fold predictions on the fit rows (K >= 2); 0 ranks "
                                                      "them on the holdout rows.")] = None,
    plot: PlotOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Patch one linear layer with the explainable-SVD correction, refit the final node, write a new model."""
    with handled(debug), _spill(spill_dir, no_spill):
        from onnx_esvd import default_output_path
        from onnx_esvd import repair as run_repair
        from onnx_esvd._json import dumps
        from onnx_esvd.modelio import check_output_path

        from .progress import Progress
        from .report import budget_report, repair_report

        reads = tuple(p for p in (data, evaluate) if p is not None)
        out = check_output_path(output if output is not None else default_output_path(model), inputs=reads,
                                models=(model,), force=force)
        ridge_value = _ridge(ridge)
        if plot is not None:
            from onnx_esvd.plots import check_plot_path

            check_output_path(plot, inputs=(*reads, out), models=(model,), force=True, option="--plot")
            check_plot_path(plot)
        progress = Progress(quiet=quiet)
        budget = None
        common = dict(group=group, groups=_split(groups), target=target, features=_split(features), score=score,
                      evaluate=evaluate, dropna=dropna, max_drift=max_drift, eps=eps, ridge=ridge_value,
                      holdout=holdout, seed=seed, batch_size=batch_size, weights=weights, bootstrap=bootstrap,
                      tune_layers=_tune(tune_layers), progress=progress)
        if (layer_stats is not None or engine != "local") and (max_ks is not None or max_mean_gap is not None
                                                                 or layer.strip() == "auto"):
            from onnx_esvd import OptionError

            raise OptionError("--layer-stats and --engine dask need a fixed --layer and no --max-ks/--max-mean-gap")
        if folds is not None and max_ks is None and max_mean_gap is None:
            from onnx_esvd import OptionError

            raise OptionError(f"--folds {folds} ranks the settings of a budget search: add --max-ks and/or "
                              "--max-mean-gap, or drop --folds")
        if folds is not None:
            from onnx_esvd.tradeoff import check_folds

            check_folds(folds)
        try:
            if max_ks is not None or max_mean_gap is not None:
                from onnx_esvd import repair_within_budget

                budget = repair_within_budget(model, data, layer=layer, max_ks=max_ks, max_mean_gap=max_mean_gap,
                                              folds=folds, refit=None if refit is None else [refit],
                                              **({} if refit is None else {"var_gap": [var_gap], "lam": [lam]}),
                                              **common)
                result = budget.result
            elif layer.strip() == "auto":
                from onnx_esvd.tradeoff import repair_auto

                result = repair_auto(model, data, c1=c1, c2=c2, refit=refit or "auto", var_gap=var_gap, lam=lam,
                                     **common)
            else:
                result = run_repair(model, data, layer=layer, c1=c1, c2=c2, refit=refit or "auto", var_gap=var_gap,
                                    lam=lam, layer_stats=layer_stats, engine=engine, scheduler=scheduler, **common)
        finally:
            progress.close()
        if result is None:  # no setting meets the budget: write nothing, exit 1
            typer.echo(dumps(budget.to_dict(), indent=2) if json_out else budget_report(budget))
            raise typer.Exit(1)
        written = result.save(out, force=force, source=model)
        if plot is not None:
            from onnx_esvd.plots import plot_distributions

            plot_distributions(result, plot)
        if json_out:
            extra = {} if budget is None else {"budget": {k: v for k, v in budget.to_dict().items() if k != "sweep"}}
            typer.echo(dumps({"model": str(model), "output": str(written), **result.to_dict(), **extra}, indent=2))
        else:
            if budget is not None:
                typer.echo(budget_report(budget) + "\n")
            typer.echo(repair_report(result, str(model), str(written)))
            if plot is not None:
                typer.echo(f"plotted {plot}")


@app.command()
def sweep(
    model: ModelArg,
    layer: LayerOpt,
    data: DataOpt,
    group: GroupOpt,
    groups: GroupsOpt = None,
    target: TargetOpt = None,
    features: FeaturesOpt = None,
    score: ScoreOpt = None,
    evaluate: EvalOpt = None,
    dropna: DropnaOpt = False,
    max_drift: MaxDriftOpt = 0.05,
    c1: Annotated[str, typer.Option("--c1", metavar="LIST", help="c1 values, comma-separated.")] = "1,5,15,50,150",
    c2: Annotated[str, typer.Option("--c2", metavar="LIST", help="c2 values, comma-separated.")] = "1,10,150,1000",
    refit: Annotated[str, typer.Option("--refit", metavar="LIST", help="Refit modes, comma-separated "
                                                                       "(fair, moments, cdf, w2, plain, "
                                                                       "none).")] = "fair",
    var_gap: Annotated[str, typer.Option("--var-gap", metavar="LIST", help="Refit moments: variance gaps to try, "
                                                                           "comma-separated.")] = "0",
    lam: Annotated[str, typer.Option("--lam", "--w2", metavar="LIST", help="Refit cdf/w2: penalty weights to try, "
                                                                           "comma-separated.")] = "1",
    tune_layers: TuneOpt = "1",
    weights: WeightsOpt = "size",
    eps: EpsOpt = 1e-5,
    ridge: RidgeOpt = "auto",
    holdout: HoldoutOpt = None,
    seed: SeedOpt = 0,
    batch_size: AutoBatchOpt = None,
    spill_dir: SpillDirOpt = None,
    no_spill: NoSpillOpt = False,
    plot: PlotOpt = None,
    engine: EngineOpt = "local",
    scheduler: SchedulerOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fit every c1 x c2 x refit setting from one capture and measure each on the holdout rows."""
    with handled(debug), _spill(spill_dir, no_spill):
        from onnx_esvd import OptionError
        from onnx_esvd import sweep as run_sweep
        from onnx_esvd._json import dumps
        from onnx_esvd.modelio import check_output_path

        from .progress import Progress
        from .report import sweep_report

        def numbers(text: str, name: str) -> list[float]:
            try:
                values = [float(v) for v in _split(text) or []]
            except ValueError:
                values = []
            if not values:
                raise OptionError(f"--{name} {text!r} is invalid; give numbers separated by commas, e.g. 1,5,15")
            return values

        if plot is not None:
            from onnx_esvd.plots import check_plot_path

            check_output_path(plot, inputs=tuple(p for p in (data, evaluate) if p is not None), models=(model,),
                              force=True, option="--plot")
            check_plot_path(plot)
        progress = Progress(quiet=quiet)
        try:
            result = run_sweep(model, data, layer=layer, group=group, groups=_split(groups), target=target,
                               features=_split(features), score=score, evaluate=evaluate, dropna=dropna,
                               max_drift=max_drift, c1=numbers(c1, "c1"), c2=numbers(c2, "c2"), refit=_split(refit),
                               var_gap=numbers(var_gap, "var-gap"), lam=numbers(lam, "lam"),
                               tune_layers=_tune(tune_layers), weights=weights, eps=eps, ridge=_ridge(ridge),
                               holdout=holdout, seed=seed, batch_size=batch_size, progress=progress,
                               **_engine(engine, scheduler))
        finally:
            progress.close()
        if plot is not None:
            from onnx_esvd.plots import plot_tradeoff

            plot_tradeoff(result, plot)
        typer.echo(dumps(result.to_dict(), indent=2) if json_out else sweep_report(result))
        if plot is not None and not json_out:
            typer.echo(f"plotted {plot}")


def _tune(text: str) -> int | str:
    from onnx_esvd import OptionError

    value = text.strip().lower()
    if value == "all":
        return "all"
    if value.isascii() and value.isdigit() and int(value) >= 1:
        return int(value)
    raise OptionError(f"--tune-layers {text!r} is invalid; give a positive integer or 'all'")


def _ridge(text: str) -> float | str:
    from onnx_esvd import OptionError

    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"--ridge {text!r} is invalid; give 'auto' or a number >= 0") from None


@app.command()
def audit(
    model: ModelArg,
    data: DataOpt,
    group: GroupOpt,
    groups: GroupsOpt = None,
    target: TargetOpt = None,
    features: FeaturesOpt = None,
    score: ScoreOpt = None,
    dropna: DropnaOpt = False,
    eps: EpsOpt = 1e-5,
    top: Annotated[int, typer.Option("--top", help="How many leading singular directions the shares "
                                                   "count.")] = 3,
    weights: WeightsOpt = "size",
    bootstrap: BootstrapOpt = 200,
    batch_size: BatchOpt = 4096,
    engine: EngineOpt = "local",
    scheduler: SchedulerOpt = None,
    spill_dir: SpillDirOpt = None,
    no_spill: NoSpillOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Where the disparity lives: output metrics and, per layer, the moment gaps and their SVD bounds."""
    with handled(debug), _spill(spill_dir, no_spill):
        from onnx_esvd import audit as run_audit
        from onnx_esvd._json import dumps

        from .progress import Progress
        from .report import audit_report

        progress = Progress(quiet=quiet)
        try:
            result = run_audit(model, data, group=group, groups=_split(groups), target=target,
                               features=_split(features), score=score, dropna=dropna, eps=eps, top=top,
                               weights=weights, bootstrap=bootstrap, batch_size=batch_size,
                               progress=progress, **_engine(engine, scheduler))
        finally:
            progress.close()
        typer.echo(dumps(result.to_dict(), indent=2) if json_out else audit_report(result))


@app.command()
def check(
    model: ModelArg,
    data: DataOpt,
    group: GroupOpt,
    groups: GroupsOpt = None,
    target: TargetOpt = None,
    features: FeaturesOpt = None,
    score: ScoreOpt = None,
    dropna: DropnaOpt = False,
    max_ks: Annotated[Optional[float], typer.Option("--max-ks", help="Fail above this KS distance.")] = None,
    max_mean_gap: Annotated[Optional[float], typer.Option("--max-mean-gap", help="Fail above this mean "
                                                                                 "gap.")] = None,
    max_mse: Annotated[Optional[float], typer.Option("--max-mse", help="Fail above this MSE (needs "
                                                                       "--target).")] = None,
    max_mae: Annotated[Optional[float], typer.Option("--max-mae", help="Fail above this MAE (needs "
                                                                       "--target).")] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", metavar="OLD.onnx", help="A baseline model: "
                                                     "with --max-ks-increase, fail when the KS exceeds the "
                                                     "baseline's KS on the same rows by more than X.")] = None,
    max_ks_increase: Annotated[Optional[float], typer.Option("--max-ks-increase", metavar="X",
                                                             help="Largest KS increase over --baseline.")] = None,
    confidence: Annotated[str, typer.Option("--confidence", metavar="point|upper", help="Compare the point value "
                                            "(default) or the upper end of the 95% bootstrap interval.")] = "point",
    bootstrap: BootstrapOpt = 200,
    seed: SeedOpt = 0,
    junit: Annotated[Optional[str], typer.Option("--junit", metavar="PATH", help="Also write a JUnit XML "
                                                                                  "report there.")] = None,
    batch_size: BatchOpt = 4096,
    engine: EngineOpt = "local",
    scheduler: SchedulerOpt = None,
    spill_dir: SpillDirOpt = None,
    no_spill: NoSpillOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fairness gate for CI: exit 0 when every threshold holds, 1 when one is exceeded, 2 on bad input."""
    with handled(debug), _spill(spill_dir, no_spill):
        import time

        from onnx_esvd import check as run_check
        from onnx_esvd._json import dumps
        from onnx_esvd.modelio import check_output_path, write_text_atomic

        from .progress import Progress
        from .report import check_report

        if junit is not None:
            check_output_path(junit, inputs=(data,), models=tuple(m for m in (model, baseline) if m is not None),
                              force=True, option="--junit")
        started = time.perf_counter()
        progress = Progress(quiet=quiet)
        try:
            result = run_check(model, data, group=group, groups=_split(groups), target=target,
                               features=_split(features), score=score, dropna=dropna, max_ks=max_ks,
                               max_mean_gap=max_mean_gap, max_mse=max_mse, max_mae=max_mae, baseline=baseline,
                               max_ks_increase=max_ks_increase, confidence=confidence, bootstrap=bootstrap,
                               seed=seed, batch_size=batch_size, progress=progress, **_engine(engine, scheduler))
        finally:
            progress.close()
        if junit is not None:
            write_text_atomic(junit, result.junit_xml(time.perf_counter() - started))
        typer.echo(dumps(result.to_dict(), indent=2) if json_out else check_report(result))
    if not result.passed:
        raise typer.Exit(1)


from .shards import register as _register_shards  # noqa: E402 - `capture` and `merge` (issue 15)

_register_shards(app)


def _engine(engine: str, scheduler: Optional[str]) -> dict:
    """--engine / --scheduler, checked."""
    from onnx_esvd.errors import OptionError

    if engine not in ("local", "dask"):
        raise OptionError(f"--engine {engine!r} is invalid; choose local or dask")
    if scheduler is not None and engine != "dask":
        raise OptionError("--scheduler needs --engine dask")
    return {"engine": engine, "scheduler": scheduler}


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
