"""`repair` with every pass on an engine's workers: map each file to partial statistics, merge on the client.

The client never reads a data row: it opens the files only for their columns (and row counts, which
give each file's first global row), sends `passes.PassTask`s through the engine, merges the partials
in file order and runs the math (ESVD, the refit solve, the metrics) on the merged statistics. Results
equal the one-process run: layer and refit moments up to float64 rounding (pairwise merges), the row
sample and the report rows exactly (kept by global row index), so the KS is the same number.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from .capture import Capture, OutputDrift, capture_metrics
from .rows import DataSpec, GroupIndex, compared_groups, plan_inputs, reader_notes
from .errors import DataError, OptionError
from .partials import RefitPartial, ReportPartial, unpack
from .passes import PassTask
from .shards import LayerPartial, merge_all


class RemoteRows:
    """What the client knows of the rows without reading them (stands in for a `rows.RowReader` after pass 1):
    counts and group labels from the merged layer statistics, the column plan from the files' headers."""

    def __init__(self, name: str, spec: DataSpec, seed: int, partial: LayerPartial, inputs: list) -> None:
        class _Table:
            pass

        self.table = _Table()
        self.table.name = name
        self.spec, self.seed, self.inputs = spec, seed, inputs
        self.wanted = GroupIndex(spec, name).wanted
        self.labels = list(partial.seen)
        self.other_labels: set[str] = set()
        self.total = partial.rows - partial.dropped
        self.skipped, self.dropped = int(partial.skipped), int(partial.dropped)

    def by_position(self) -> list:
        return [inp for inp in self.inputs if inp.by_position]

    def group_labels(self) -> tuple[str, ...]:
        return compared_groups(self.table.name, self.spec, self.wanted, self.labels)

    def group_of_code(self) -> np.ndarray:
        return np.arange(len(self.group_labels()), dtype=np.int64)  # merged partials use group indices


def engine_of(layer_pass: Any) -> tuple[Callable, Callable[[], None]]:
    """(engine, close) for `LayerPass.engine`: "dask" (a DaskEngine on `scheduler`) or a user's callable."""
    if layer_pass.engine == "dask":
        from .engines.dask_engine import DaskEngine

        eng = DaskEngine(layer_pass.scheduler)
        return eng, eng.close
    if callable(layer_pass.engine):
        return layer_pass.engine, lambda: None
    raise OptionError(f"--engine {layer_pass.engine!r} is invalid; choose local or dask")


def data_files(table: Any) -> list[str]:
    """The files of a table (one task each); in-memory data is refused."""
    parts = getattr(table, "parts", [table])
    paths = [getattr(p, "path", None) for p in parts]
    if any(p is None for p in paths):
        raise OptionError("--engine reads data files on the workers; give files, a directory or a glob pattern, "
                          "not in-memory data")
    return [os.fspath(p) for p in paths]


def call(engine: Callable, task: PassTask, files: list[tuple[str, int]]) -> list:
    """`engine(task, files)`, checked: one result (bytes) per file."""
    blobs = list(engine(task, files))
    if len(blobs) != len(files):
        raise OptionError(f"the engine returned {len(blobs)} results for {len(files)} files; it must return one per "
                          "file, in order")
    return blobs


def file_offsets(engine: Callable, table: Any, paths: list[str]) -> list[int]:
    """Each file's first global row: from the metadata where the file says it (Parquet, .npz), else counted by a
    "count" task on the workers."""
    parts = getattr(table, "parts", [table])
    if len(parts) == 1:
        return [0]
    counts: list[Any] = [p.rows if isinstance(getattr(p, "rows", None), int) else None for p in parts]
    todo = [i for i, c in enumerate(counts) if c is None]
    if todo:
        blobs = call(engine, PassTask("count"), [(paths[i], 0) for i in todo])
        for i, blob in zip(todo, blobs):
            counts[i] = int(unpack(blob, paths[i])["rows"])
    return table.set_row_counts(counts)[:-1]


class RemoteRun:
    """A repair's engine, files and model on the client: `map` a task, `refit` and `report` the later passes."""

    def __init__(self, engine: Callable, close: Callable[[], None], files: list[tuple[str, int]], name: str,
                 original: onnx.ModelProto, spec: DataSpec, score: Any, *, holdout: float, seed: int,
                 batch_size: int) -> None:
        self.engine, self._close, self.files, self.name = engine, close, files, name
        self.blob = original.SerializeToString()
        self.spec, self.score, self.holdout, self.seed, self.batch_size = spec, score, holdout, seed, batch_size
        self.fit_counts: list[int] = []  # fit rows per group, from pass 1
        self.eval_run: RemoteRun | None = None  # the --eval files, where the report passes run instead

    def close(self) -> None:
        self._close()

    def task(self, kind: str, **kw: Any) -> PassTask:
        return PassTask(kind, spec=self.spec, score=self.score, holdout=self.holdout, seed=self.seed,
                        batch_size=self.batch_size, **kw)

    def map(self, task: PassTask) -> list[dict]:
        blobs = call(self.engine, task, self.files)
        return [unpack(b, path) for b, (path, _) in zip(blobs, self.files)]

    def refit(self, prep: Any, patched: onnx.ModelProto, plan: Any, holdout: float, progress: Callable) -> tuple:
        """Pass 2 on the workers: (refit accumulators by final node index, merged row sample or None)."""
        labels = tuple(prep.reader.group_labels())
        sample = None
        if plan.sample is not None:  # the level of the whole data (pass 1 counted the fit rows): shards keep no more
            from .rowsample import water_level

            level = water_level(self.fit_counts, plan.sample.capacity, plan.sample.min_keep)
            sample = (plan.sample.capacity, plan.sample.min_keep, level)
        task = self.task("refit", model=patched.SerializeToString(), original=self.blob, labels=labels,
                         finals=tuple(plan.finals), taught=tuple(f.index for f in plan.taught), chain=plan.chain,
                         sample=sample)
        merged: RefitPartial = _merge([r["refit"] for r in self.map(task)])
        progress("refit", prep.reader.total)
        return merged.accs, merged.sample

    def report(self, prep: Any, patched: onnx.ModelProto, names: Sequence[str], progress: Callable) -> tuple:
        """Pass 3 on the workers: (OutputCollector of the report rows, [OutputDrift] of `names`)."""
        labels = tuple(prep.reader.group_labels())
        run = self.eval_run or self
        task = run.task("report", model=patched.SerializeToString(), original=self.blob, labels=labels,
                        drift=tuple(names), select="eval" if self.eval_run is not None else "report")
        merged: ReportPartial = _merge([r["report"] for r in run.map(task)])
        progress("report", merged.rows)
        return merged.collector(labels), [OutputDrift(*d) for d in merged.drift_result(names)]


def _merge(partials: list) -> Any:
    out = partials[0]
    for p in partials[1:]:
        out = out.merge(p)
    return out


def prepare_remote(loaded: Any, table: Any, layer_spec: int | str, spec: DataSpec, *, holdout: float,
                   batch_size: int | None, seed: int, progress: Callable, refits: Sequence[str], bootstrap: int,
                   layer_pass: Any, evaluate: Any = None) -> Any:
    """`pipeline._prepare` with pass 1 on the engine's workers: the same `_Prepared`, whose `remote` runs the
    later passes there too."""
    from .graph import read_weight
    from .guards import outputs_finite, stats_finite
    from .pipeline import METADATA_KEY, _Prepared, pass_batch_size, resolve_repair

    original = loaded.model
    score, _found, layer, final, others = resolve_repair(original, layer_spec, spec, refits)
    batch_size = pass_batch_size(batch_size, layer, final)
    inputs = plan_inputs(original, table, spec)  # column errors here, once, before any task runs
    paths = data_files(table)
    eval_inputs = None if evaluate is None else plan_inputs(original, evaluate, spec)
    eval_paths = None if evaluate is None else data_files(evaluate)
    engine, close = engine_of(layer_pass)
    try:
        offsets = file_offsets(engine, table, paths)
        run = RemoteRun(engine, close, list(zip(paths, [int(x) for x in offsets])), table.name, original, spec, score,
                        holdout=holdout, seed=seed, batch_size=batch_size)
        results = run.map(run.task("capture", model=run.blob, layers=(layer,), report=evaluate is None))
        partial = merge_all(r["layers"][layer.index] for r in results)
        partial.name = table.name
        run.fit_counts = [partial.fit_rows(lab) for lab in partial.seen]
        if evaluate is None:
            report = _merge([r["report"] for r in results])
        else:  # the report passes measure every row of the --eval files, on the calibration's groups
            labels = RemoteRows(table.name, spec, seed, partial, inputs).group_labels()
            run.eval_run = RemoteRun(engine, lambda: None, list(zip(eval_paths, [int(x) for x in file_offsets(
                engine, evaluate, eval_paths)])), evaluate.name, original, spec, score, holdout=0.0, seed=seed,
                batch_size=batch_size)
            report = _merge([r["report"] for r in run.eval_run.map(run.eval_run.task(
                "report", model=run.blob, original=run.blob, labels=tuple(labels), select="eval"))])
    except BaseException:
        close()
        raise
    if partial.rows == 0:
        close()
        raise DataError(f"{table.name}: no data rows")
    progress("capture", partial.rows)
    rows = RemoteRows(table.name, spec, seed, partial, inputs)
    notes: list[str] = []
    try:
        if any(p.key == METADATA_KEY for p in original.metadata_props):
            notes.append("the input model already carries an onnx_esvd.repair record: this repairs a repaired model "
                         "(the new record replaces the old one)")
        labels = rows.group_labels()
        if rows.wanted is not None:
            for label in rows.wanted:
                if not partial.seen.get(label):
                    raise DataError(f"{table.name}: --groups value {label!r} is not in column '{spec.group}'")
        stats = partial.to_group_stats(list(labels), notes)
        stats_finite(stats, layer, table.name)
        cap = Capture(moments={}, report=report.collector(labels), width=report.width)
        report_rows = rows
        if evaluate is not None:
            report_rows = RemoteRows(evaluate.name, spec, seed, partial, eval_inputs)
            report_rows.skipped, report_rows.other_labels = report.skipped, set(report.other_labels)
            report_rows.dropped = report.dropped  # the evaluation files' own count, not the calibration's
            if report.skipped:
                others_seen = ", ".join(sorted(repr(x) for x in report.other_labels))
                notes.append(f"{report.skipped} rows of {evaluate.name} belong to no compared group ({others_seen}) "
                             "and were not measured")
        for r in (rows,) if evaluate is None else (rows, report_rows):
            notes += reader_notes(r.table.name, r)
        notes.append(f"every pass ran on the engine's workers ({len(paths)} file{'s' if len(paths) != 1 else ''}, "
                     "one task each), merged here")
        if not cap.report.rows:
            where = table.name if evaluate is None else evaluate.name
            raise DataError(f"{where}: no rows were left for the report; lower --holdout or add rows")
        outputs_finite(cap.report, str(loaded.path or "the model"), score.output)
        before = capture_metrics(cap, rows, bootstrap=bootstrap, seed=seed)
    except BaseException:
        close()
        raise
    return _Prepared(loaded, layer, final, spec, rows, cap, stats, read_weight(original, layer), before, notes, score,
                     others, report_rows, 0.0 if evaluate is not None else holdout, remote=run, batch_size=batch_size)


def capture_remote(engine: Any, scheduler: Any, model: onnx.ModelProto, data: Any, spec: DataSpec, score: Any,
                   layers: Sequence[Any] = (), *, batch_size: int = 4096, seed: int = 0,
                   progress: Callable = lambda name, rows: None) -> tuple[RemoteRows, dict, Any]:
    """Pass 1 of `audit`/`check` (every row; no holdout) on an engine's workers: (rows, {layer index:
    LayerPartial}, OutputCollector of every row's scored output in group order). `engine`: "dask" or a callable."""
    from types import SimpleNamespace

    from .layer_pass import open_data

    if not (engine == "dask" or callable(engine)):
        raise OptionError(f"--engine {engine!r} is invalid; choose local or dask")
    table = open_data(data)
    inputs = plan_inputs(model, table, spec)
    paths = data_files(table)
    eng, close = engine_of(SimpleNamespace(engine=engine, scheduler=scheduler))
    try:
        offsets = file_offsets(eng, table, paths)
        run = RemoteRun(eng, close, list(zip(paths, [int(x) for x in offsets])), table.name, model, spec, score,
                        holdout=0.0, seed=seed, batch_size=batch_size)
        results = run.map(run.task("capture", model=run.blob, layers=tuple(layers)))
    finally:
        close()
    partials = {x.index: merge_all(r["layers"][x.index] for r in results) for x in layers}
    report = _merge([r["report"] for r in results])
    # row counts and groups: what every file's first pass saw
    counted = LayerPartial({"layer": {"in_features": 0}}, name=table.name)
    for r in results:
        c = r["counts"]
        for lab, n in c["seen"].items():
            counted.seen[lab] = counted.seen.get(lab, 0) + n
        counted.skipped += c["skipped"]
        counted.dropped += c["dropped"]
    counted.ranges = report.ranges if report.ranges else []
    rows = RemoteRows(table.name, spec, seed, counted, inputs)
    if counted.rows == 0 and not report.rows:
        raise DataError(f"{table.name}: no data rows")
    progress("capture", report.rows)
    labels = rows.group_labels()
    if rows.wanted is not None:
        for label in rows.wanted:
            if not counted.seen.get(label):
                raise DataError(f"{table.name}: --groups value {label!r} is not in column '{spec.group}'")
    collector = report.collector(labels)
    collector.width = report.width
    return rows, partials, collector
