"""Every pass of `repair`, `audit` and `check` as a map over one data file: the part an engine runs.

A `PassTask` says which pass to run (its model as bytes, the columns and groups, the split, the nodes);
`run_pass(task, path, first_row)` runs it over the file `path` whose first row has global index
`first_row` and returns the result as bytes (`partials.pack`: .npz, no pickle). The client merges the
results (`partials.unpack`, then `.merge`) and finishes the repair; any engine that can call a Python
function on (path, first_row) pairs drives it: Dask (`engines.dask_engine`), Spark's `mapInPandas`,
Ray Data's `map_batches` (README: "More than one machine"). Sessions are cached per worker process
and model, so each worker builds one onnxruntime session per model it runs.

Kinds: "count" (data rows of the file), "capture" (pass 1 over the original model: per-group moments of
the inputs of `layers` on the fit rows, and the scored output on the report rows), "refit" (pass 2 over
the patched model: refit moments of `finals` and the penalised refits' row sample), "report" (pass 3
over the repaired model: the scored output on the report rows, and how far `drift` outputs moved).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import refit as refit_mod
from .capture import add_drift, as_rows, layer_rows, report_mask
from .rows import DataSpec
from .errors import LayerError, OptionError
from .partials import RefitPartial, ReportPartial, pack
from .rowsample import fold_of
from .runtime import Runner, pipelined
from .score import Score
from .shards import LayerPartial, columns_of, identity
from .stats import Moments, add_by_code, add_counts, code_masks

KINDS = ("count", "capture", "refit", "report")

#: onnxruntime threads per session in a worker: engines run one task per core.
ORT_THREADS = int(os.environ.get("ONNX_ESVD_WORKER_ORT_THREADS", os.environ.get("ONNX_ESVD_DASK_ORT_THREADS", "1")))


@dataclass(frozen=True)
class PassTask:
    """One pass, as every file's task runs it (everything but the file).

    Attributes:
        kind: one of KINDS.
        model: the serialized model the pass runs (capture: the original; refit/report: the patched one).
        original: the original model's bytes (refit: the teacher of distilled nodes; report: drift reference).
        spec: the run's DataSpec. score: the scored output. holdout, seed, batch_size: the run's.
        layers: capture: the nodes whose input moments are collected. report: capture also collects the report.
        labels: refit/report: the run's groups in group order (group codes of the partials).
        finals: refit: the final nodes refitted; taught: indices of those whose target is the original model's
            output (the others' is the label column).
        chain: refit: the penalised refit's tuned chain (its first layer's input is sampled) or None.
        sample: refit: (capacity, min rows kept per group[, the whole data's level from pass 1's fit counts]) of
            the row sample, or None.
        drift: report: other outputs whose change from the original model is measured.
        select: report: "report" (the report rows), "all" (every row) or "eval" (every row of the `labels`
            groups; the others skipped and counted: an --eval file measured on the calibration's groups).
    """

    kind: str
    model: bytes = b""
    original: bytes = b""
    spec: DataSpec | None = None
    score: Score | None = None
    holdout: float = 0.0
    seed: int = 0
    batch_size: int = 4096
    layers: tuple = ()
    report: bool = True
    labels: tuple[str, ...] = ()
    finals: tuple = ()
    taught: tuple[int, ...] = ()
    chain: Any = None
    sample: tuple[int, ...] | None = None
    drift: tuple[str, ...] = ()
    select: str = "report"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OptionError(f"pass kind {self.kind!r} is invalid; choose one of {', '.join(KINDS)}")


#: An engine maps a task over files: engine(task, [(path, first_row), ...]) -> [bytes, ...] in file order.
Engine = Callable[[PassTask, Sequence[tuple[str, int]]], Sequence[bytes]]

# worker side: (model sha256, fetched tensors) -> Runner; a few at a time (a pass uses at most two models)
_RUNNERS: dict[tuple, Any] = {}
_MODELS: dict[str, Any] = {}


def _model(blob: bytes) -> tuple[Any, str]:
    import hashlib

    import onnx

    digest = hashlib.sha256(blob).hexdigest()
    if digest not in _MODELS:
        if len(_MODELS) >= 2:
            _MODELS.pop(next(iter(_MODELS)))
        model = onnx.ModelProto()
        model.ParseFromString(blob)
        _MODELS[digest] = model
    return _MODELS[digest], digest


_HASHES: dict[str, str] = {}


def _hash(blob: bytes) -> str:
    """`shards.model_hash` of the model serialized in `blob` (cached per worker)."""
    from .shards import model_hash

    model, digest = _model(blob)
    if digest not in _HASHES:
        _HASHES[digest] = model_hash(model)
    return _HASHES[digest]


def _runner(blob: bytes, tensors: Sequence[tuple[str, int]]) -> tuple[Any, Runner]:
    """(model, Runner fetching `tensors`) for this worker process, built once per model and tensor list."""
    from .graph import with_outputs

    model, digest = _model(blob)
    key = (digest, tuple(tensors))
    if key not in _RUNNERS:
        if len(_RUNNERS) >= 4:
            _RUNNERS.pop(next(iter(_RUNNERS))).close()
        names = list(dict.fromkeys(name for name, _ in tensors))
        _RUNNERS[key] = Runner(with_outputs(model, list(tensors)), names, threads=ORT_THREADS)
    return model, _RUNNERS[key]


def pass_identity(task: PassTask, columns: dict, *, original: str, measured: str | None = None) -> dict:
    """The header fields a refit/report partial is checked against (hashes are sha256 of the model bytes)."""
    spec = task.spec
    return {"kind": task.kind, "model_sha256": original, "measured_sha256": measured, "columns": columns,
            "group_columns": list(spec.group_columns), "groups": None if spec.groups is None else list(spec.groups),
            "holdout": float(task.holdout), "seed": int(task.seed), "dropna": bool(spec.dropna),
            "target": spec.target, "score": spec.score, "select": task.select, "labels": list(task.labels),
            "finals": [int(f.index) for f in task.finals], "taught": list(task.taught), "drift": list(task.drift),
            "sample": None if task.sample is None else list(task.sample[:2]),
            "chain": None if task.chain is None else [int(x.index) for x in task.chain.layers]}


def run_pass(task: PassTask, path: str, first_row: int = 0) -> bytes:
    """Run `task` over the data file `path` (its first row is global row `first_row`); the result as bytes.

    BLAS runs on one thread, as in the command-line tool: the float64 reductions then do not depend on the
    worker's core count, and a worker per core does not oversubscribe the machine."""
    from threadpoolctl import threadpool_limits

    from .rows import open_rows
    from .layer_pass import open_data

    path = os.fspath(path)
    table = open_data(path, int(first_row))
    if task.kind == "count":
        from .sources.multi import count_rows

        return pack({"rows": int(count_rows(table))})
    with threadpool_limits(limits=1, user_api="blas"):
        if task.kind == "capture":
            tensors = [(x.input, x.elem_type) for x in task.layers] + [(task.score.tensor, task.score.elem_type)]
            model, runner = _runner(task.model, tensors)
            reader = open_rows(model, table, task.spec, batch_size=task.batch_size, seed=task.seed)
            return pack(capture_map(runner, reader, task, model, name=path))
        if task.kind == "refit":
            return pack({"refit": refit_map(task, table, name=path)})
        return pack({"report": report_map(task, table, name=path)})


def _ranges(table: Any, reader: Any) -> list[tuple[int, int]]:
    offsets = table.file_offsets() if hasattr(table, "file_offsets") else [0, reader.total + reader.dropped]
    return [(int(offsets[0]), int(offsets[-1]))] if offsets[-1] > offsets[0] else []


def _report_rows(task: PassTask, rows: Any) -> np.ndarray:
    return np.ones(len(rows.code), dtype=bool) if task.select == "all" else report_mask(rows, task.holdout)


def capture_map(runner: Runner, reader: Any, task: PassTask, model: Any, *, name: str) -> dict[str, Any]:
    """Pass 1 over every batch of `reader` (first pass): {"layers": {index: LayerPartial}, "report": ReportPartial}.
    `runner` fetches every layer's input and the scored tensor."""
    from ._version import __version__

    score, h = task.score, task.holdout
    moments: dict[int, list[Moments]] = {x.index: [] for x in task.layers}
    seen = np.zeros(0, dtype=np.int64)
    preds, codes, index, targets = [], [], [], []
    width = None
    for rows, out in pipelined(reader(first_pass=True), lambda r: runner.run(r.feeds)):
        n = len(rows.code)
        fit = rows.u >= h
        masks = code_masks(rows.code, fit)
        for layer in task.layers:
            x = layer_rows(np.asarray(out[layer.input]), n, layer)
            add_by_code(moments[layer.index], x, masks, layer.in_features)
        seen = add_counts(seen, rows.code)
        if task.report:
            if width is None and n:
                width = int(np.asarray(out[score.tensor]).reshape(n, -1).shape[1])
            keep = _report_rows(task, rows)
            if keep.any():
                preds.append(score.take(out[score.tensor], n)[keep])
                codes.append(rows.code[keep])
                index.append(rows.index[keep])
                if rows.target is not None:
                    targets.append(rows.target[keep])
    labels = list(reader.wanted) if reader.wanted is not None else list(reader.labels)
    columns = columns_of(reader)
    digest = _hash(task.model)
    ranges = _ranges(reader.table, reader)
    layers = {}
    for layer in task.layers:
        header = identity(digest, layer, columns, task.spec, holdout=h, seed=task.seed)
        part = LayerPartial({**header, "tool_version": __version__}, name=name)
        part.seen = {labels[c]: int(k) for c, k in enumerate(seen) if k}
        part.moments = {labels[c]: m for c, m in enumerate(moments[layer.index]) if m.n}
        part.skipped, part.dropped, part.ranges, part.sources = int(reader.skipped), int(reader.dropped), ranges, [name]
        layers[layer.index] = part
    result: dict[str, Any] = {"layers": layers, "rows": int(reader.total + reader.dropped)}
    if task.report:
        head = pass_identity(task, columns, original=digest)
        head.update({"kind": "capture", "labels": None, "skipped": None})
        result["report"] = ReportPartial(
            head, labels, np.concatenate(preds) if preds else np.zeros((0, 1), dtype=np.float32),
            np.concatenate(codes).astype(np.int64) if codes else np.zeros(0, dtype=np.int64),
            np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
            (np.concatenate(targets) if targets else np.zeros(0)) if task.spec.target else None,
            {}, width, ranges, name, dropped=int(reader.dropped))
    result["counts"] = {"seen": {labels[c]: int(k) for c, k in enumerate(seen) if k},
                        "skipped": int(reader.skipped), "dropped": int(reader.dropped)}
    return result


def _group_of(reader: Any, labels: Sequence[str], skip: bool = False) -> np.ndarray:
    """This file's label codes (so far) -> the run's group index; a label that is not a group of the run is an
    error, or with `skip` (an --eval file measured on the calibration's groups) group -1."""
    from .errors import DataError

    if reader.wanted is not None:
        return np.arange(len(reader.wanted), dtype=np.int64)
    extra = [lab for lab in reader.labels if lab not in labels]
    if skip:
        return np.array([list(labels).index(lab) if lab in labels else -1 for lab in reader.labels], dtype=np.int64)
    if extra:
        raise DataError(f"{reader.table.name}: group {extra[0]!r} is not among the groups the first pass found "
                        f"({', '.join(map(repr, labels))}); did the data change while it was read?")
    return np.array([list(labels).index(lab) for lab in reader.labels], dtype=np.int64)


def selected(reader: Any, select: str, holdout: float, labels: Sequence[str],
             skipped: list | None = None) -> Iterator[tuple[Any, np.ndarray]]:
    """One read of a file's rows of the compared groups: (Rows of `select` ("fit": u >= holdout, "report": u <
    holdout or all with holdout 0, "all"; "eval": all, rows of labels not in `labels` skipped and counted in
    `skipped[0]`), their group index in `labels` order) per batch."""
    from .rows import Rows

    for rows in reader(first_pass=True):
        if select in ("all", "eval") or (select == "report" and holdout <= 0):
            keep = None
        else:
            keep = rows.u >= holdout if select == "fit" else rows.u < holdout
            if not keep.any():
                continue
            if keep.all():
                keep = None
        group = _group_of(reader, labels, skip=select == "eval")[rows.code]
        if select == "eval" and (group < 0).any():
            skipped[0] += int((group < 0).sum())
            keep = group >= 0
            if not keep.any():
                continue
        if keep is not None:
            rows = Rows({k: v[keep] for k, v in rows.feeds.items()}, rows.code[keep],
                        None if rows.target is None else rows.target[keep], rows.u[keep], rows.index[keep])
            group = group[keep]
        yield rows, group


def refit_batches(batches: Any, runner: Runner, teacher: Runner | None, finals: Sequence[Any], taught: Sequence[Any],
                  accs: dict[int, refit_mod.RefitAccumulator], holdout: float, *, chain: Any = None,
                  sample: Any = None, sampled: Any = None,
                  progress: Callable[[str, int], None] = lambda name, rows: None,
                  folds: tuple[int, int] = (0, 0)) -> None:
    """Pass 2 over `batches` of (fit Rows, group index [n]): add each final node's `[z, t]` to `accs` (t: the
    teacher's output of the nodes in `taught`, else the label) and, for a penalised refit, the tuned chain's
    input rows of `sampled` (the scored final node) to `sample` (keyed by global row index)."""
    h = holdout
    done = 0

    def run(item: Any) -> tuple[dict, dict]:
        return runner.run(item[0].feeds), ({} if teacher is None else teacher.run(item[0].feeds))

    for (rows, code), (z_out, t_out) in pipelined(batches, run):
        n = len(rows.code)
        in_val = (rows.u - h) / (1.0 - h) < refit_mod.RIDGE_VALIDATION_SHARE
        for f in finals:
            z = as_rows(z_out[f.input], n, f"input '{f.input}' of the final node")
            if z.shape[1] != f.in_features:
                raise LayerError(f"final node '{f.name}' receives '{f.input}' with {z.shape[1]} columns per row; "
                                 f"only inputs of shape [rows, {f.in_features}] can be refitted (use --refit none)")
            if f in taught:
                t = as_rows(t_out[f.output], n, f"output '{f.output}' of node '{f.name}'")
            else:
                t = rows.target.reshape(n, 1)
            accs[f.index].add(z, t, code, in_val)
            if sample is not None and f is sampled:
                x = layer_rows(np.asarray(z_out[chain.input]), n, chain.layers[0]) if chain.input != f.input else z
                fold = None if folds[0] <= 0 else fold_of(rows.index, folds[1], folds[0])
                sample.add(x, t, code, fold, index=rows.index)
        done += n
        progress("refit", done)


def refit_map(task: PassTask, table: Any, *, name: str) -> RefitPartial:
    """Pass 2 over one file as a `RefitPartial` (group codes: `task.labels` order)."""
    from .rows import open_rows
    from .rowsample import StratifiedSample

    fetch = [(f.input, f.elem_type) for f in task.finals]
    if task.chain is not None:
        fetch.append((task.chain.input, task.chain.layers[0].elem_type))
    model, runner = _runner(task.model, fetch)
    taught = [f for f in task.finals if f.index in task.taught]
    teacher = _runner(task.original, [(f.output, f.elem_type) for f in taught])[1] if taught else None
    reader = open_rows(model, table, task.spec, batch_size=task.batch_size, seed=task.seed)
    k = len(task.labels)
    accs = {f.index: refit_mod.RefitAccumulator(f.in_features, f.out_features, k) for f in task.finals}
    sample = None
    if task.sample is not None:
        sample = StratifiedSample(capacity=task.sample[0], min_keep_per_group=task.sample[1], seed=task.seed)
        sample.cap = task.sample[2] if len(task.sample) > 2 else None  # the whole data's level: never keep more
    refit_batches(selected(reader, "fit", task.holdout, task.labels), runner, teacher, task.finals, taught, accs,
                  task.holdout, chain=task.chain, sample=sample, sampled=task.finals[0] if task.finals else None)
    head = pass_identity(task, columns_of(reader), original=_hash(task.original), measured=_hash(task.model))
    return RefitPartial(head, accs, sample, _ranges(table, reader), name)


def report_map(task: PassTask, table: Any, *, name: str) -> ReportPartial:
    """Pass 3 over one file: the scored output of `task.model` on the report rows (group codes: `task.labels`
    order) and the change of each `task.drift` output from the original model's."""
    from .rows import open_rows

    score = task.score
    names = list(task.drift)
    model, runner = _runner(task.model, [(score.tensor, score.elem_type)] + [(x, 0) for x in names])
    before = _runner(task.original, [(x, 0) for x in names])[1] if names else None
    reader = open_rows(model, table, task.spec, batch_size=task.batch_size, seed=task.seed)
    sums = {x: np.zeros(5) for x in names}
    preds, codes, index, targets = [], [], [], []
    select = task.select if task.select in ("all", "eval") else "report"
    skipped = [0]

    def run(item: Any) -> tuple[dict, dict]:
        return runner.run(item[0].feeds), ({} if before is None else before.run(item[0].feeds))

    width = None
    for (rows, group), (out, old) in pipelined(selected(reader, select, task.holdout, task.labels, skipped), run):
        n = len(rows.code)
        if width is None and n:
            width = int(np.asarray(out[score.tensor]).reshape(n, -1).shape[1])
        preds.append(score.take(out[score.tensor], n))
        codes.append(group)
        index.append(rows.index)
        if rows.target is not None:
            targets.append(rows.target)
        for x in names:
            add_drift(sums[x], old[x], out[x])
    head = pass_identity(task, columns_of(reader), original=_hash(task.original or task.model),
                         measured=_hash(task.model))
    return ReportPartial(head, list(task.labels), np.concatenate(preds) if preds else np.zeros((0, 1), np.float32),
                         np.concatenate(codes).astype(np.int64) if codes else np.zeros(0, dtype=np.int64),
                         np.concatenate(index) if index else np.zeros(0, dtype=np.int64),
                         (np.concatenate(targets) if targets else np.zeros(0)) if task.spec.target else None,
                         sums, width, _ranges(table, reader), name, int(reader.skipped) + skipped[0],
                         sorted(set(reader.labels) - set(task.labels)) if reader.wanted is None else [],
                         int(reader.dropped))
