"""The passes over the data (no scipy here: `check` uses it); rows are read by onnx_esvd/rows.py.

The capture pass reduces each batch at once into per-group float64 moments
of the chosen layers' inputs, and keeps the model output of the report rows for the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx

from .errors import DataError, LayerError, ModelError
from .graph import LinearLayer, upstream, with_outputs
from .guards import stats_finite
from .metrics import REPORT_ROWS, OutputCollector, OutputMetrics
from .runtime import Runner, pipelined
from .score import Score
from .stats import GroupStats, Moments, add_by_code, code_masks



from .rows import Progress, RowReader, Rows

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
    report: OutputCollector = field(default_factory=lambda: OutputCollector(cap=REPORT_ROWS))
    width: int | None = None  # values per row of the scored tensor, as the model produced them


def report_mask(rows: Rows, holdout: float) -> np.ndarray:
    """Rows measured by the report: the holdout rows, or every row with --holdout 0."""
    return rows.u < holdout if holdout > 0 else np.ones(len(rows.code), dtype=bool)


def layer_rows(x: np.ndarray, n: int, layer: LinearLayer) -> np.ndarray:
    """A linear node's input as `[n, d]`: `[n, d]` as it is, `[n, 1, ..., 1, d]` reshaped; anything else refused."""
    d = layer.in_features
    if x.shape == (n, d):
        return x
    if x.ndim > 2 and x.shape[0] == n and x.shape[-1] == d and all(s == 1 for s in x.shape[1:-1]):
        return x.reshape(n, d)
    raise LayerError(f"node '{layer.name}' receives '{layer.input}' with shape {list(x.shape)} for {n} rows; only "
                     f"inputs of shape [rows, {d}] (or [rows, 1, {d}]) can be repaired")


def score_runner(model: onnx.ModelProto, score: Score, tensors: Sequence[tuple[str, int]] = ()) -> Runner:
    """A session over `model` that fetches `tensors` (name, element type) and the scored tensor."""
    wanted = [*tensors, (score.tensor, score.elem_type)]
    return Runner(with_outputs(model, wanted), list(dict.fromkeys(name for name, _ in wanted)))


class FirstPass:
    """Pass 1's onnxruntime sessions. onnxruntime runs every node of a graph whatever is fetched, so the fit rows
    that are not report rows run the graph cut after the layers' inputs (`graph.upstream`; for layer 0 of a
    plain MLP that is no inference at all), and only the report rows run the whole model.

    `parts(rows)` (thread-safe: it only runs sessions) gives the batch's parts as (rows, outputs, whole): a part
    with `whole` False holds fit rows and only the layers' inputs; rows that are neither fit nor report rows
    are not run.
    """

    def __init__(self, model: onnx.ModelProto, layers: Sequence[LinearLayer], score: Score, holdout: float, *,
                 report: bool) -> None:
        tensors = [(layer.input, layer.elem_type) for layer in layers]
        # with --holdout 0 every fit row is a report row: then nothing runs the cut. Where the cut runs, the fit
        # rows (u >= holdout) and the report rows (u < holdout) are apart, and without a report the whole model
        # is not needed
        cut = upstream(model, tensors) if tensors and (holdout > 0 or not report) else None
        self.cut = None if cut is None else Runner(cut, list(dict.fromkeys(name for name, _ in tensors)))
        self.full = score_runner(model, score, tensors) if report or self.cut is None else None
        self.holdout, self.report = holdout, report

    def parts(self, rows: Rows) -> list[tuple[Rows, dict, bool]]:
        if self.cut is None:
            return [(rows, self.full.run(rows.feeds), True)]
        out = []
        measured = report_mask(rows, self.holdout) if self.report else np.zeros(len(rows.u), dtype=bool)
        for keep, runner, whole in ((rows.u >= self.holdout, self.cut, False), (measured, self.full, True)):
            if keep.any():
                part = rows if keep.all() else rows.take(keep)
                out.append((part, runner.run(part.feeds), whole))
        return out

    def close(self) -> None:
        for runner in (self.full, self.cut):
            if runner is not None:
                runner.close()


def capture(model: onnx.ModelProto, layers: Sequence[LinearLayer], reader: RowReader, holdout: float,
            progress: Progress, score: Score, *, report: bool = True) -> Capture:
    """Pass 1 over the original model: every given layer's input on the fit rows (reduced per batch into
    float64 moments, O(sum d^2) memory) and, with `report`, the scored output on the report rows."""
    runner = FirstPass(model, layers, score, holdout, report=report)
    cap = Capture(moments={layer.index: [] for layer in layers})
    done = 0
    for batch, parts in pipelined(reader(first_pass=True), runner.parts):
        for rows, out, whole in parts:
            n = len(rows.code)
            fit = rows.u >= holdout
            # one boolean mask per label code present among the fit rows, shared by every layer
            masks = code_masks(rows.code, fit)
            for layer in layers:
                d = layer.in_features
                x = layer_rows(np.asarray(out[layer.input]), n, layer)
                moments = cap.moments[layer.index]
                while len(moments) < max(2, len(reader.wanted or reader.labels)):
                    moments.append(Moments(d))
                add_by_code(moments, x, masks, d)
            if whole and cap.width is None and report:
                cap.width = int(np.asarray(out[score.tensor]).reshape(n, -1).shape[1]) if n else None
            in_report = report_mask(rows, holdout) if report and whole else None
            if in_report is not None and in_report.any():
                cap.report.add(score.take(out[score.tensor], n)[in_report], rows.code[in_report],
                               None if rows.target is None else rows.target[in_report], priority=rows.u[in_report])
        done += len(batch.code)
        progress("capture", done)
    runner.close()
    if reader.total == 0:
        raise DataError(f"{reader.table.name}: no data rows")
    return cap


#: Fewer calibration rows than this in a group is a warning (its moments are noisy).
FEW_GROUP_ROWS = 50


def group_stats(cap: Capture, layer: LinearLayer, reader: RowReader, notes: list[str]) -> GroupStats:
    """Merge a layer's per-label moments into the groups' statistics (k >= 2 groups), checking the groups."""
    labels, group_of = reader.group_labels(), reader.group_of_code()
    moments = cap.moments[layer.index]
    check_groups_present(cap, reader)
    d = layer.in_features
    merged = [Moments(d) for _ in labels]
    for c, mom in enumerate(moments):
        if c < len(group_of):
            merged[int(group_of[c])].merge(mom)
    for g, label in enumerate(labels):
        n_g = merged[g].n
        if n_g < 2:
            raise DataError(f"{reader.table.name}: group {label!r} has {n_g} fit row{'s' if n_g != 1 else ''}; "
                            "at least 2 are needed (add rows, lower --holdout, or leave the group out with --groups)")
        if n_g < FEW_GROUP_ROWS:
            notes.append(f"group {label!r} has only {n_g} fit rows: its moments are noisy, and groups are never "
                         "merged automatically (choose the groups with --groups)")
        if n_g < d:
            notes.append(f"group {label!r} has {n_g} fit rows, fewer than the layer width {d}: its covariance "
                         "is rank deficient, so the second-moment step sees only part of the disparity")
    stats = GroupStats.from_moments(merged, labels)
    stats_finite(stats, layer, reader.table.name)
    return stats


def report_outputs(model: onnx.ModelProto, reader: RowReader, holdout: float, progress: Progress,
                   score: Score, *, first_pass: bool = False) -> OutputCollector:
    """Pass 3: the model's scored output on the report rows, collected for the metrics. With `first_pass`, this is
    the reader's first pass (an evaluation file: every row of the compared groups is a report row)."""
    collector = OutputCollector(cap=REPORT_ROWS)
    runner = score_runner(model, score)
    done = 0
    rows_iter = reader(first_pass=True) if first_pass else reader(select="report", holdout=holdout)
    for rows, out in pipelined(rows_iter, lambda r: runner.run(r.feeds)):
        if first_pass and collector.width is None and len(rows.code):
            collector.width = int(np.asarray(out[score.tensor]).reshape(len(rows.code), -1).shape[1])
        n = len(rows.code)
        collector.add(score.take(out[score.tensor], n), rows.code, rows.target, priority=rows.u)
        done += n
        progress("report", done)
    runner.close()
    return collector


@dataclass(frozen=True)
class OutputDrift:
    """How far another graph output moved between the original and the repaired model on the report rows.

    Attributes:
        name: the output.
        relative: RMS of (new - old) over the RMS spread of the old values (0: unchanged).
        max_abs: largest absolute change of any value.
        how: "distilled" or "derived" (see score.OtherOutput).
    """

    name: str
    relative: float
    max_abs: float
    how: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "how": self.how, "relative_rms_change": self.relative,
                "max_abs_change": self.max_abs}


def add_drift(acc: list, old: Any, new: Any) -> None:
    """Add one batch of an output before (`old`) and after (`new`) to `acc` = [values, sum of squared
    changes, sum, sum of squares, largest absolute change]; a non-tensor output (a ZipMap's maps) is skipped
    (it is measured through its input)."""
    try:
        o = np.asarray(old, dtype=np.float64).ravel()
        d = np.asarray(new, dtype=np.float64).ravel() - o
    except (TypeError, ValueError):
        return
    acc[0] += o.size
    acc[1] += float(d @ d)
    acc[2] += float(o.sum())
    acc[3] += float(o @ o)
    acc[4] = max(acc[4], float(np.max(np.abs(d)))) if d.size else acc[4]


def output_drift(original: onnx.ModelProto, patched: onnx.ModelProto, reader: RowReader, holdout: float,
                 names: Sequence[str], progress: Progress) -> list[OutputDrift]:
    """Run both models on the report rows and measure how far each named output moved (nothing stored per row)."""
    if not names:
        return []
    before, after = Runner(original, list(names)), Runner(patched, list(names))
    sums = {name: np.zeros(5) for name in names}  # n, sum d^2, sum old, sum old^2, max |d|
    done = 0
    for rows, (old, new) in pipelined(reader(select="report", holdout=holdout),
                                      lambda r: (before.run(r.feeds), after.run(r.feeds))):
        for name in names:
            add_drift(sums[name], old[name], new[name])
        done += len(rows.code)
        progress("other outputs", done)
    before.close()
    after.close()
    out = []
    for name in names:
        n, sdd, so, soo, mx = sums[name]
        spread = np.sqrt(max(soo / n - (so / n) ** 2, 0.0)) if n else 0.0
        rms = np.sqrt(sdd / n) if n else 0.0
        out.append(OutputDrift(name, float(rms / spread) if spread > 0 else float(rms), float(mx)))
    return out


def capture_metrics(cap: Capture, reader: RowReader, collector: OutputCollector | None = None, *,
                    bootstrap: int = 0, seed: int = 0) -> OutputMetrics:
    """Output metrics of the report rows collected by `capture`, or by `report_outputs` (same rows), with
    `bootstrap` resamples for the confidence intervals (0: none)."""
    collector = cap.report if collector is None else collector
    if not collector.rows:
        raise DataError(f"{reader.table.name}: no rows of the compared groups to measure")
    return collector.result(reader.group_labels(), reader.group_of_code(), bootstrap=bootstrap, seed=seed)


def check_groups_present(cap: Capture, reader: RowReader) -> None:
    """With --groups, every value must occur among the rows read."""
    if reader.wanted is None:
        return
    seen = {c for c in range(len(reader.wanted)) if cap.report.rows_of(c)}
    for moments in cap.moments.values():
        seen.update(c for c, m in enumerate(moments) if m.n)
    for c, label in enumerate(reader.wanted):
        if c not in seen:
            others = ", ".join(sorted(repr(x) for x in reader.other_labels)) or "none"
            raise DataError(f"{reader.table.name}: --groups value {label!r} is not in column "
                            f"'{reader.spec.group}' (other values seen: {others})")
