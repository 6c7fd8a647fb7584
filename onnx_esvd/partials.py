"""Mergeable statistics of the refit and report passes (the layer pass's are `shards.LayerPartial`).

`RefitPartial`: the refit pass over some rows: per final node, the per-group (train / ridge-validation)
moments of `[z, t]` (`refit.RefitAccumulator`), and for the penalised refits the group-stratified row
sample (`rowsample.StratifiedSample` with global row indices, so shards merge into exactly the sample
of all rows). `ReportPartial`: the report pass over some rows: the scored output, group and target of
every report row with its global row index (merged in global-row order, so the KS and the bootstrap are
exactly the one-process ones), plus the sums that measure how far other outputs moved.

Both merge only with partials of the same identity (model hashes, columns, groups, split, pass
options), refuse overlapping rows, and serialise to versioned .npz bytes (a JSON header and plain
arrays, never pickled). `pack`/`unpack` put the partials one task returns into one blob.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ._version import __version__
from .errors import DataError
from .metrics import OutputCollector
from .refit import RefitAccumulator
from .rowsample import StratifiedSample
from .shards import LayerPartial, _joined, _shown

REPORT_FORMAT = "onnx-esvd.report-stats"
REFIT_FORMAT = "onnx-esvd.refit-stats"
BUNDLE_FORMAT = "onnx-esvd.pass-result"
FORMAT_VERSION = 1


def check_headers(a: dict, b: dict, what: str) -> None:
    """Refuse (DataError, one line) the first header field where `a` and `b` differ, naming it and both values."""
    for key in sorted(set(a) | set(b)):
        if key in ("tool_version",):
            continue
        if a.get(key) != b.get(key):
            raise DataError(f"{what}: '{key}' differs (one has {_shown(a.get(key))}, the other has "
                            f"{_shown(b.get(key))})")


def _check_ranges(ranges: list[tuple[int, int]], what: str) -> list[tuple[int, int]]:
    ranges = sorted(ranges)
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise DataError(f"{what}: both cover global rows {b0}...{min(a1, b1) - 1} (the same shard twice?)")
    return _joined(ranges)


def _npz(head: dict, arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, header=np.array(json.dumps(head, sort_keys=True)), **arrays)
    return buf.getvalue()


def _read_npz(data: bytes, name: str, fmt: str) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        head = json.loads(str(arrays.pop("header")))
    except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise DataError(f"{name}: not readable onnx-esvd statistics ({str(exc).splitlines()[0] if str(exc) else exc})"
                        ) from None
    if not isinstance(head, dict) or head.get("format") != fmt:
        raise DataError(f"{name}: not an {fmt} file")
    if head.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{name}: statistics format version {head.get('format_version')!r}; this onnx-esvd "
                        f"{__version__} reads version {FORMAT_VERSION}; compute them again with this version")
    return head, arrays


# ---------------------------------------------------------------------------------------------
# the report pass


@dataclass
class ReportPartial:
    """The report pass over some rows: every report row's output, group and target, by global row index.

    Attributes:
        header: identity (model hashes, columns, groups, split, which rows) the partials must share.
        labels: group labels; `code` indexes them.
        pred: [n, cols] the scored output in the model's dtype. code: [n] int64. index: [n] int64 global row
            index, increasing. target: [n] float64 or None.
        drift: {other output: [5] float64 (rows, sum d^2, sum old, sum old^2, max |d|)} (the report of a repaired
            model: how far each other output moved from the original model's).
        width: values per row of the scored tensor. ranges: global rows covered [(first, end)].
    """

    header: dict
    labels: list[str]
    pred: np.ndarray
    code: np.ndarray
    index: np.ndarray
    target: np.ndarray | None
    drift: dict[str, np.ndarray] = field(default_factory=dict)
    width: int | None = None
    ranges: list[tuple[int, int]] = field(default_factory=list)
    name: str = "<report statistics>"
    skipped: int = 0  # rows of no compared group (an --eval file: labels the calibration did not have)
    other_labels: list[str] = field(default_factory=list)
    dropped: int = 0  # rows skipped for a missing value (--dropna)

    @property
    def rows(self) -> int:
        return int(self.code.shape[0])

    def merge(self, other: "ReportPartial") -> "ReportPartial":
        """Both partials' rows in global-row order (labels united; codes renumbered)."""
        what = f"cannot merge {other.name} into {self.name}"
        check_headers(self.header, other.header, what)
        if (self.target is None) != (other.target is None) and self.rows and other.rows:
            raise DataError(f"{what}: one has targets and the other not")
        if self.rows and other.rows and self.pred.shape[1] != other.pred.shape[1]:
            raise DataError(f"{what}: the scored output has {self.pred.shape[1]} vs {other.pred.shape[1]} columns")
        ranges = _check_ranges([*self.ranges, *other.ranges], what)
        labels = list(self.labels) + [lab for lab in other.labels if lab not in self.labels]
        remap = np.array([labels.index(lab) for lab in other.labels], dtype=np.int64)
        code = np.concatenate([self.code, remap[other.code] if other.rows else other.code])
        index = np.concatenate([self.index, other.index])
        order = None if not (self.rows and other.rows) or self.index[-1] < other.index[0] else \
            np.argsort(index, kind="stable")
        pick = (lambda a: a) if order is None else (lambda a: a[order])
        dtype = np.result_type(self.pred.dtype, other.pred.dtype)
        pred = np.concatenate([self.pred.astype(dtype, copy=False), other.pred.astype(dtype, copy=False)]) \
            if self.rows or other.rows else self.pred
        has_t = self.target is not None or other.target is not None
        target = None if not has_t else np.concatenate(
            [t if t is not None else np.zeros(0) for t in (self.target, other.target)])
        drift = {k: v.copy() for k, v in self.drift.items()}
        for k, v in other.drift.items():
            if k in drift:
                a = drift[k]
                drift[k] = np.array([a[0] + v[0], a[1] + v[1], a[2] + v[2], a[3] + v[3], max(a[4], v[4])])
            else:
                drift[k] = v.copy()
        return ReportPartial(dict(self.header), labels, pick(pred), pick(code), pick(index),
                             None if target is None else pick(target), drift, self.width or other.width, ranges,
                             self.name, self.skipped + other.skipped,
                             sorted(set(self.other_labels) | set(other.other_labels)), self.dropped + other.dropped)

    def collector(self, group_labels: Sequence[str]) -> OutputCollector:
        """An `OutputCollector` of the rows with code = group index in `group_labels` order (all rows, one block in
        global-row order: the values each group holds are the one-process pass's, in the same order)."""
        groups = list(group_labels)
        missing = [lab for lab in self.labels if lab not in groups]
        if missing and np.isin(self.code, [self.labels.index(m) for m in missing]).any():
            raise DataError(f"{self.name}: holds report rows of group {missing[0]!r}, which is not among the groups "
                            f"of this run ({', '.join(map(repr, groups))})")
        remap = np.array([groups.index(lab) if lab in groups else -1 for lab in self.labels] or [0], dtype=np.int64)
        out = OutputCollector()
        if self.rows:
            out.add(self.pred, remap[self.code], self.target)
        out.width = self.width
        return out

    def drift_result(self, names: Sequence[str]) -> list[tuple[str, float, float]]:
        """(name, relative RMS change, max |change|) of each other output, as `capture.output_drift` measures."""
        out = []
        for name in names:
            n, sdd, so, soo, mx = self.drift.get(name, np.zeros(5))
            spread = np.sqrt(max(soo / n - (so / n) ** 2, 0.0)) if n else 0.0
            rms = np.sqrt(sdd / n) if n else 0.0
            out.append((name, float(rms / spread) if spread > 0 else float(rms), float(mx)))
        return out

    def to_bytes(self) -> bytes:
        head = {"format": REPORT_FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__,
                "identity": self.header, "labels": list(self.labels), "width": self.width,
                "has_target": self.target is not None, "ranges": [[int(a), int(b)] for a, b in self.ranges],
                "drift": sorted(self.drift), "skipped": int(self.skipped), "other_labels": list(self.other_labels),
                "dropped": int(self.dropped)}
        arrays = {"pred": self.pred, "code": self.code.astype(np.int64), "index": self.index.astype(np.int64)}
        if self.target is not None:
            arrays["target"] = self.target.astype(np.float64)
        for i, k in enumerate(sorted(self.drift)):
            arrays[f"drift{i}"] = np.asarray(self.drift[k], dtype=np.float64)
        return _npz(head, arrays)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<report statistics>") -> "ReportPartial":
        head, a = _read_npz(data, name, REPORT_FORMAT)
        try:
            n = a["code"].shape[0]
            if a["pred"].shape[0] != n or a["index"].shape[0] != n or a["pred"].ndim != 2:
                raise DataError(f"{name}: arrays of different lengths; the statistics are corrupt")
            target = a["target"] if head["has_target"] else None
            drift = {k: a[f"drift{i}"] for i, k in enumerate(head["drift"])}
            return cls(head["identity"], list(head["labels"]), a["pred"], a["code"], a["index"], target, drift,
                       head["width"], [(int(x), int(y)) for x, y in head["ranges"]], name, int(head["skipped"]),
                       list(head["other_labels"]), int(head["dropped"]))
        except KeyError as exc:
            raise DataError(f"{name}: the statistics have no field {exc}; they are corrupt") from None


# ---------------------------------------------------------------------------------------------
# the refit pass


@dataclass
class RefitPartial:
    """The refit pass over some rows (group codes = index in `header["labels"]`).

    Attributes:
        header: identity (original and patched model hashes, columns, groups and labels, split, refitted nodes,
            sample settings).
        accs: {final node index: RefitAccumulator} (k groups, moments of `[z, t]`, `[p + m]`).
        sample: the stratified sample of the tuned chain's input rows (penalised refits), or None.
        ranges: global rows covered.
    """

    header: dict
    accs: dict[int, RefitAccumulator]
    sample: StratifiedSample | None = None
    ranges: list[tuple[int, int]] = field(default_factory=list)
    name: str = "<refit statistics>"

    def merge(self, other: "RefitPartial") -> "RefitPartial":
        what = f"cannot merge {other.name} into {self.name}"
        check_headers(self.header, other.header, what)
        if sorted(self.accs) != sorted(other.accs):
            raise DataError(f"{what}: the refitted nodes differ ({sorted(self.accs)} vs {sorted(other.accs)})")
        ranges = _check_ranges([*self.ranges, *other.ranges], what)
        accs = {}
        for f, acc in self.accs.items():
            new = RefitAccumulator(acc.p, acc.m, acc.k)
            for key in new.parts:
                new.parts[key] = acc.parts[key].copy()
                new.parts[key].merge(other.accs[f].parts[key])
            accs[f] = new
        if (self.sample is None) != (other.sample is None):
            raise DataError(f"{what}: one holds a row sample and the other not")
        sample = None if self.sample is None else self.sample.merge(other.sample)
        return RefitPartial(dict(self.header), accs, sample, ranges, self.name)

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        finals = []
        for f, acc in sorted(self.accs.items()):
            keys = [(part, g) for part in ("train", "val") for g in range(acc.k)]
            finals.append({"index": int(f), "p": acc.p, "m": acc.m, "k": acc.k})
            arrays[f"n{f}"] = np.array([acc.parts[k].n for k in keys], dtype=np.int64)
            arrays[f"mean{f}"] = np.stack([acc.parts[k].mean for k in keys]).astype(np.float64)
            arrays[f"scatter{f}"] = np.stack([acc.parts[k].scatter for k in keys]).astype(np.float64)
        sample = None
        if self.sample is not None:
            seen, parts = self.sample.parts()
            sample = {"capacity": self.sample.capacity, "min_keep": self.sample.min_keep, "seed": self.sample.seed,
                      "seen": {str(c): int(n) for c, n in seen.items()}, "codes": sorted(int(c) for c in parts)}
            for c, (x, t, index) in parts.items():
                arrays[f"sx{c}"], arrays[f"st{c}"], arrays[f"si{c}"] = x, t, index
        head = {"format": REFIT_FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__,
                "identity": self.header, "finals": finals, "sample": sample,
                "ranges": [[int(a), int(b)] for a, b in self.ranges]}
        return _npz(head, arrays)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<refit statistics>") -> "RefitPartial":
        head, a = _read_npz(data, name, REFIT_FORMAT)
        try:
            accs = {}
            for fin in head["finals"]:
                f, p, m, k = fin["index"], fin["p"], fin["m"], fin["k"]
                acc = RefitAccumulator(p, m, k)
                keys = [(part, g) for part in ("train", "val") for g in range(k)]
                if a[f"mean{f}"].shape != (2 * k, p + m) or a[f"scatter{f}"].shape != (2 * k, p + m, p + m):
                    raise DataError(f"{name}: refit moments of node {f} have the wrong shape; the statistics are corrupt")
                for i, key in enumerate(keys):
                    mom = acc.parts[key]
                    mom.n, mom.mean, mom.scatter = int(a[f"n{f}"][i]), a[f"mean{f}"][i], a[f"scatter{f}"][i]
                accs[f] = acc
            sample = None
            s = head["sample"]
            if s is not None:
                parts = {c: (a[f"sx{c}"], a[f"st{c}"], a[f"si{c}"]) for c in s["codes"]}
                sample = StratifiedSample.from_parts(s["capacity"], s["min_keep"], s["seed"],
                                                     {int(c): n for c, n in s["seen"].items()}, parts)
            return cls(head["identity"], accs, sample, [(int(x), int(y)) for x, y in head["ranges"]], name)
        except KeyError as exc:
            raise DataError(f"{name}: the statistics have no field {exc}; they are corrupt") from None


# ---------------------------------------------------------------------------------------------
# one task's result: several partials in one blob


def pack(result: dict[str, Any]) -> bytes:
    """One blob of a task's result {"rows": int, "counts": {"seen": {label: rows}, "skipped", "dropped"},
    "layers": {index: LayerPartial}, "report": ReportPartial,
    "refit": RefitPartial} (any of them)."""
    head: dict[str, Any] = {"format": BUNDLE_FORMAT, "format_version": FORMAT_VERSION, "rows": result.get("rows"),
                            "counts": result.get("counts"),
                            "layers": sorted(int(i) for i in result.get("layers", {}))}
    arrays = {f"layer{i}": np.frombuffer(p.to_bytes(), dtype=np.uint8) for i, p in result.get("layers", {}).items()}
    for key in ("report", "refit"):
        if result.get(key) is not None:
            arrays[key] = np.frombuffer(result[key].to_bytes(), dtype=np.uint8)
    head["parts"] = sorted(arrays)
    return _npz(head, arrays)


def unpack(blob: bytes, name: str = "<task result>") -> dict[str, Any]:
    """Inverse of `pack`."""
    head, a = _read_npz(bytes(blob), name, BUNDLE_FORMAT)
    out: dict[str, Any] = {"rows": head.get("rows"), "counts": head.get("counts"), "layers": {}}
    for i in head["layers"]:
        out["layers"][int(i)] = LayerPartial.from_bytes(a[f"layer{i}"].tobytes(), name)
    if "report" in a:
        out["report"] = ReportPartial.from_bytes(a["report"].tobytes(), name)
    if "refit" in a:
        out["refit"] = RefitPartial.from_bytes(a["refit"].tobytes(), name)
    return out
