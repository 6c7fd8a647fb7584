"""Mergeable statistics of the layer pass: compute them where the data is, merge them anywhere.

The layer pass of `repair` is a sum over rows: per group, the count, mean and centred scatter of the
repaired node's input on the fit rows. `LayerPartial` holds those for one shard of rows, keyed by
group LABEL (so shards that saw the groups in different orders merge correctly); `merge` combines two
with the pairwise update of `stats.Moments` (Chan et al.), and `save`/`load` keep one in a versioned
.npz file (float64/int64 arrays and a JSON header, never pickled). Any engine drives it: `map_batches`
turns a stream of row batches into a partial, the engines (Dask, or Spark/Ray by hand) merge them.

A partial records what it is the statistics OF: the model (sha256 of its serialized ModelProto), the
layer, the columns feeding each model input, the group column(s) and `--groups`, the holdout share and
seed (which rows are fit rows), `--dropna`, and the global rows it covers. Partials that differ in any
of these are never merged; overlapping row ranges (the same shard twice) are refused too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from ._version import __version__
from .errors import DataError, OptionError
from .stats import GroupStats, Moments, add_by_code, add_counts, code_masks

FORMAT = "onnx-esvd.layer-stats"
FORMAT_VERSION = 1

#: The header fields that must agree for two partials to merge, with how a message names them.
IDENTITY = {
    "model_sha256": "model (sha256 of the ModelProto)",
    "layer": "layer",
    "columns": "columns (model input -> data columns)",
    "group_columns": "group column(s)",
    "groups": "--groups",
    "holdout": "--holdout",
    "seed": "--seed",
    "dropna": "--dropna",
    "target": "--target (with --dropna, rows missing it are dropped)",
}

#: Fewer fit rows than this in a group is a note (its moments are noisy), as in the single-process pass.
FEW_GROUP_ROWS = 50


def model_hash(model: onnx.ModelProto) -> str:
    """sha256 (hex) of the model as deterministically serialized, weights included."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def identity(model: onnx.ModelProto | str, layer: Any, columns: Mapping[str, Sequence[str]], spec: Any, *,
             holdout: float, seed: int) -> dict:
    """The header fields a partial is checked against. `model`: a ModelProto or its `model_hash`; `layer`: a
    `graph.LinearLayer`; `columns`: {model input: data columns}; `spec`: a `rows.DataSpec`."""
    return {
        "model_sha256": model if isinstance(model, str) else model_hash(model),
        "layer": {"index": int(layer.index), "name": str(layer.name), "in_features": int(layer.in_features)},
        "columns": {str(k): [str(c) for c in v] for k, v in columns.items()},
        "group_columns": [str(c) for c in spec.group_columns],
        "groups": None if spec.groups is None else [str(g) for g in spec.groups],
        "holdout": float(holdout),
        "seed": int(seed),
        "dropna": bool(spec.dropna),
        "target": spec.target if spec.dropna else None,
    }


def columns_of(reader: Any) -> dict[str, list[str]]:
    """{model input: data columns} of a `rows.RowReader`."""
    return {inp.name: list(inp.columns) for inp in reader.inputs}


@dataclass
class LayerPartial:
    """The layer pass's statistics over one shard of rows.

    Attributes:
        header: the identity fields (see IDENTITY) plus `tool_version`.
        moments: {label: Moments} of the layer input `[d]` on the shard's fit rows, per group label.
        seen: {label: rows of that group read} (fit and report rows).
        skipped: rows of no compared group. dropped: rows dropped for a missing value (--dropna).
        ranges: [(first, end)] global row index ranges covered (end exclusive), sorted.
        sources: names of the files read (for the record only).
    """

    header: dict
    moments: dict[str, Moments] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    dropped: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    name: str = "<statistics>"

    @property
    def dim(self) -> int:
        return int(self.header["layer"]["in_features"])

    @property
    def rows(self) -> int:
        """Global rows covered."""
        return sum(end - first for first, end in self.ranges)

    @property
    def labels(self) -> list[str]:
        """Group labels seen, sorted as the groups are ordered (numbers by value), or the --groups order."""
        groups = self.header.get("groups")
        if groups is not None:
            return [g for g in groups if g in self.seen]
        from .rows import _sort_key

        return sorted(self.seen, key=_sort_key)

    def fit_rows(self, label: str) -> int:
        m = self.moments.get(label)
        return 0 if m is None else int(m.n)

    # -- merging ------------------------------------------------------------------------------

    def merge(self, other: "LayerPartial") -> "LayerPartial":
        """A new partial holding both shards' rows; refuses partials of different models, layers, columns or
        options (naming the field and both values) and overlapping row ranges."""
        check_same(self.header, other.header, f"cannot merge {other.name} into {self.name}")
        ranges = sorted([*self.ranges, *other.ranges])
        for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
            if b0 < a1:
                raise DataError(f"cannot merge {other.name} into {self.name}: both cover global rows {b0}..."
                                f"{min(a1, b1) - 1} (the same shard twice?); give each shard its own --first-row")
        out = LayerPartial(dict(self.header), {k: m.copy() for k, m in self.moments.items()}, dict(self.seen),
                           self.skipped + other.skipped, self.dropped + other.dropped, _joined(ranges),
                           [*self.sources, *other.sources], self.name)
        for label, m in other.moments.items():
            if label in out.moments:
                out.moments[label].merge(m)
            else:
                out.moments[label] = m.copy()
        for label, n in other.seen.items():
            out.seen[label] = out.seen.get(label, 0) + n
        return out

    # -- the statistics ----------------------------------------------------------------------

    def to_group_stats(self, labels: Sequence[str] | None = None, notes: list[str] | None = None) -> GroupStats:
        """`GroupStats` of the groups in `labels` order (default: `self.labels`); every group needs >= 2 fit rows,
        and every group with fit rows must be listed. Notes about small groups are appended to `notes`."""
        labels = list(self.labels if labels is None else labels)
        fitted = [lab for lab, m in self.moments.items() if m.n]
        extra = [lab for lab in fitted if lab not in labels]
        if extra:
            raise DataError(f"{self.name}: holds rows of group {extra[0]!r}, which is not among the groups of this "
                            f"run ({', '.join(map(repr, labels))}); capture with the same --group/--groups")
        if len(labels) < 2:
            only = f"only the group {labels[0]!r}" if labels else "no group"
            raise DataError(f"{self.name}: {only} has rows; at least two groups are needed")
        d = self.dim
        moments = []
        for lab in labels:
            m = self.moments.get(lab, Moments(d))
            if m.n < 2:
                raise DataError(f"{self.name}: group {lab!r} has {m.n} fit row{'s' if m.n != 1 else ''}; at least 2 "
                                "are needed (add rows, lower --holdout, or leave the group out with --groups)")
            if notes is not None and m.n < FEW_GROUP_ROWS:
                notes.append(f"group {lab!r} has only {m.n} fit rows: its moments are noisy")
            elif notes is not None and m.n < d:
                notes.append(f"group {lab!r} has {m.n} fit rows, fewer than the layer width {d}: its covariance "
                             "is rank deficient, so the second-moment step sees only part of the disparity")
            moments.append(m)
        stats = GroupStats.from_moments(moments, labels)
        for arr in (stats.means, stats.covs, stats.gram):
            if not np.isfinite(arr).all():
                raise DataError(f"{self.name}: the inputs of node '{self.header['layer']['name']}' reach values whose "
                                "squares overflow float64; rescale the feature columns")
        return stats

    # -- the file ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the partial to `path` (.npz: header JSON + float64/int64 arrays), atomically."""
        out = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".onnx-esvd-", suffix=".npz", dir=out.parent if str(out.parent) else ".")
        try:
            with os.fdopen(fd, "wb") as f:
                self._write(f)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out

    def _write(self, f: Any) -> None:
        labels = sorted(set(self.seen) | set(self.moments))
        d = self.dim
        empty = Moments(d)
        head = {"format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__,
                **{k: self.header[k] for k in IDENTITY}, "labels": labels, "skipped": int(self.skipped),
                "dropped": int(self.dropped), "ranges": [[int(a), int(b)] for a, b in self.ranges],
                "sources": list(self.sources)}
        arrays = {
            "header": np.array(json.dumps(head, sort_keys=True)),
            "n": np.array([self.moments.get(lab, empty).n for lab in labels], dtype=np.int64),
            "seen": np.array([self.seen.get(lab, 0) for lab in labels], dtype=np.int64),
            "mean": np.stack([self.moments.get(lab, empty).mean for lab in labels]).astype(np.float64)
            if labels else np.zeros((0, d)),
            "scatter": np.stack([self.moments.get(lab, empty).scatter for lab in labels]).astype(np.float64)
            if labels else np.zeros((0, d, d)),
        }
        np.savez(f, **arrays)

    def to_bytes(self) -> bytes:
        """The partial as the bytes of its .npz file (what `save` writes), for engines that ship bytes."""
        buf = io.BytesIO()
        self._write(buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<statistics>") -> "LayerPartial":
        """Inverse of `to_bytes`; `name` names the partial in messages."""
        return cls.load(io.BytesIO(data), name=name)

    @classmethod
    def load(cls, path: "str | os.PathLike | io.BytesIO", name: str | None = None) -> "LayerPartial":
        """Read a file written by `save`; anything malformed is a one-line DataError naming the file."""
        name = str(path) if name is None else name
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("header", "n", "seen", "mean", "scatter")}
        except FileNotFoundError:
            raise DataError(f"{name}: no such file; give a statistics file written by `onnx-esvd capture`") from None
        except KeyError as exc:
            raise DataError(f"{name}: not an onnx-esvd statistics file (no array {exc}); write it with "
                            "`onnx-esvd capture`") from None
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{name}: not a readable statistics file ({str(exc).splitlines()[0] if str(exc) else exc})"
                            "; write it with `onnx-esvd capture`") from None
        try:
            head = json.loads(str(arrays["header"]))
        except (ValueError, TypeError):
            raise DataError(f"{name}: the header is not JSON; the file is corrupt") from None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise DataError(f"{name}: not an onnx-esvd layer statistics file; write it with `onnx-esvd capture`")
        if head.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{name}: statistics format version {head.get('format_version')!r}; this onnx-esvd "
                            f"{__version__} reads version {FORMAT_VERSION}; capture them again with this version")
        missing = [k for k in (*IDENTITY, "labels", "skipped", "dropped", "ranges") if k not in head]
        if missing:
            raise DataError(f"{name}: the header has no field '{missing[0]}'; the file is corrupt")
        labels, d = head["labels"], int(head["layer"]["in_features"])
        k = len(labels)
        shapes = {"n": (k,), "seen": (k,), "mean": (k, d), "scatter": (k, d, d)}
        for key, shape in shapes.items():
            if arrays[key].shape != shape:
                raise DataError(f"{name}: array '{key}' has shape {list(arrays[key].shape)}, expected {list(shape)}; "
                                "the file is corrupt")
        moments, seen = {}, {}
        for i, lab in enumerate(labels):
            m = Moments(d)
            m.n, m.mean, m.scatter = int(arrays["n"][i]), arrays["mean"][i].astype(np.float64), \
                arrays["scatter"][i].astype(np.float64)
            moments[lab] = m
            seen[lab] = int(arrays["seen"][i])
        header = {k: head[k] for k in IDENTITY}
        header["tool_version"] = head.get("tool_version")
        return cls(header, moments, seen, int(head["skipped"]), int(head["dropped"]),
                   [(int(a), int(b)) for a, b in head["ranges"]], list(head.get("sources", [])), name)


def _joined(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a == out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, dict) and "name" in value and "index" in value:
        return f"{value['index']} ('{value['name']}', {value.get('in_features')} inputs)"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def check_same(a: Mapping[str, Any], b: Mapping[str, Any], what: str, *, first: str = "one has",
               second: str = "the other has") -> None:
    """Refuse (DataError) the first identity field where `a` and `b` differ, naming it and both values."""
    for key, label in IDENTITY.items():
        va, vb = a.get(key), b.get(key)
        if key == "columns" and isinstance(va, dict) and isinstance(vb, dict) and va != vb:
            inp = next((i for i in sorted(set(va) | set(vb)) if va.get(i) != vb.get(i)))
            raise DataError(f"{what}: the columns of model input '{inp}' differ ({first} "
                            f"{_shown(va.get(inp))}, {second} {_shown(vb.get(inp))})")
        if va != vb:
            raise DataError(f"{what}: the {label} differs ({first} {_shown(va)}, {second} {_shown(vb)})")


def merge_all(partials: Iterable[LayerPartial]) -> LayerPartial:
    """Merge partials in the order given (at least one)."""
    it = iter(partials)
    try:
        out = next(it)
    except StopIteration:
        raise OptionError("no statistics to merge; give at least one file") from None
    for p in it:
        out = out.merge(p)
    return out


# ---------------------------------------------------------------------------------------------
# map: batches of rows -> a partial


def map_batches(runner: Any, layer: Any, reader: Any, *, holdout: float, header: dict,
                progress: Callable[[str, int], None] | None = None, name: str | None = None,
                allow_empty: bool = False) -> LayerPartial:
    """The layer pass over every batch of `reader` (a `rows.RowReader`, first pass) as a partial.

    runner: a `runtime.Runner` whose outputs include `layer.input` (e.g. `capture.score_runner` or
    `Runner(graph.with_outputs(model, [(layer.input, layer.elem_type)]), [layer.input])`).
    Fit rows are those with `row_uniform(seed, global row index) >= holdout`, as in `capture.capture`.
    allow_empty: a source without rows gives an empty partial (one empty file among many) instead of an error.
    """
    from .capture import layer_rows
    from .runtime import pipelined

    d = layer.in_features
    by_code: list[Moments] = []
    seen_code = np.zeros(0, dtype=np.int64)
    done = 0
    for rows, out in pipelined(reader(first_pass=True), lambda r: runner.run(r.feeds)):
        n = len(rows.code)
        x = layer_rows(np.asarray(out[layer.input]), n, layer)
        fit = rows.u >= holdout
        add_by_code(by_code, x, code_masks(rows.code, fit), d)
        seen_code = add_counts(seen_code, rows.code)
        done += n
        if progress is not None:
            progress("capture", done)
    table = reader.table
    if reader.total == 0 and reader.dropped == 0 and not allow_empty:
        raise DataError(f"{table.name}: no data rows")
    labels = list(reader.wanted) if reader.wanted is not None else list(reader.labels)
    partial = LayerPartial({**header, "tool_version": __version__}, name=name or table.name)
    for c, count in enumerate(seen_code):
        if count:
            partial.seen[labels[c]] = int(count)
    for c, m in enumerate(by_code):
        if m.n:
            partial.moments[labels[c]] = m
    partial.skipped, partial.dropped = int(reader.skipped), int(reader.dropped)
    offsets = table.file_offsets() if hasattr(table, "file_offsets") else [0, reader.total + reader.dropped]
    partial.ranges = [(int(offsets[0]), int(offsets[-1]))] if offsets[-1] > offsets[0] else []
    parts = getattr(table, "parts", None)
    partial.sources = [p.name for p in parts] if parts is not None else [table.name]
    return partial
