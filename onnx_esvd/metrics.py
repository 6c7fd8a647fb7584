"""Output metrics between the two groups: exact KS, mean gap, per-group summaries, MSE and MAE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def ks_statistic(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 18) -> float:
    """Exact two-sample Kolmogorov-Smirnov statistic sup_t |F_a(t) - F_b(t)| (no binning).

    Equals `scipy.stats.ks_2samp(a, b).statistic`. The supremum is attained at a sample point, so the
    two empirical CDFs are compared at every point of both samples, `chunk` points at a time (memory:
    the two sorted samples plus O(chunk)).
    """
    a = np.sort(np.asarray(a, dtype=np.float64).ravel())
    b = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        return float("nan")
    best = 0.0
    for points in (a, b):
        for start in range(0, points.size, chunk):
            t = points[start:start + chunk]
            gap = np.abs(np.searchsorted(a, t, side="right") / a.size - np.searchsorted(b, t, side="right") / b.size)
            best = max(best, float(gap.max()))
    return best


@dataclass(frozen=True)
class GroupSummary:
    """Output summary of one group. `mse`/`mae` are None without a target."""

    label: str
    count: int
    mean: float
    std: float
    mse: float | None
    mae: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "count": self.count, "mean": self.mean, "std": self.std,
                "mse": self.mse, "mae": self.mae}


@dataclass(frozen=True)
class OutputMetrics:
    """Metrics of a model's output on rows of two groups.

    For an output with several columns, `ks` and `mean_gap` are the largest over the columns and
    `mse`/`mae` the average; `ks_per_column` keeps the detail.

    Attributes:
        ks: exact two-sample KS distance between the groups' outputs.
        mean_gap: |E[y | g0] - E[y | g1]|.
        mse, mae: against the target over both groups, None without a target.
        rows: rows measured (both groups).
        groups: summaries of group 0 and group 1.
        ks_per_column: KS of each output column.
    """

    ks: float
    mean_gap: float
    mse: float | None
    mae: float | None
    rows: int
    groups: tuple[GroupSummary, GroupSummary]
    ks_per_column: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ks": self.ks, "mean_gap": self.mean_gap, "mse": self.mse, "mae": self.mae,
                               "rows": self.rows, "groups": [g.to_dict() for g in self.groups]}
        if len(self.ks_per_column) > 1:
            out["ks_per_column"] = list(self.ks_per_column)
        return out


class _Scalar:
    """Count, mean and centred sum of squares of a stream of numbers (Chan merge, float64)."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        mean_b = float(v.mean())
        m2_b = float(np.sum((v - mean_b) ** 2))
        n = self.n + v.size
        delta = mean_b - self.mean
        self.mean += delta * v.size / n
        self.m2 += m2_b + delta * delta * self.n * v.size / n
        self.n = n


class OutputCollector:
    """Model outputs of two groups streamed batch by batch.

    Keeps one value per row and output column in the model's own float dtype plus a one-byte group
    code (an exact KS needs every value); everything else (means, spreads, MSE, MAE) is summed on
    the fly, so the target column is never stored.
    """

    def __init__(self) -> None:
        self._pred: list[list[np.ndarray]] = [[], []]  # per code: [n_c, k] blocks in the model's dtype
        self._values = [_Scalar(), _Scalar()]  # per code, over all output columns
        self._column_sum: list[np.ndarray | None] = [None, None]  # per code: sum of each output column
        self._rows = [0, 0]
        self._sq_err = [0.0, 0.0]
        self._abs_err = [0.0, 0.0]
        self.has_target: bool | None = None
        self.width: int | None = None  # values per row of the scored tensor (set by the pass that fills it)

    @property
    def rows(self) -> int:
        return self._rows[0] + self._rows[1]

    def values(self, code: int) -> np.ndarray:
        """Every output value of the rows with group code `code`, [n_c, k] in the model's dtype."""
        blocks = self._pred[code]
        return np.concatenate(blocks) if blocks else np.zeros((0, 1), dtype=np.float32)

    def rows_of(self, code: int) -> int:
        """Rows added with group code `code`."""
        return self._rows[code]

    def add(self, pred: np.ndarray, code: np.ndarray, target: np.ndarray | None = None) -> None:
        """Add `pred: [n] or [n, k]` with group codes `code: [n]` (0 or 1) and `target: [n] or [n, k]`."""
        p = np.asarray(pred)
        p = p.reshape(p.shape[0], -1)
        if p.dtype not in (np.float32, np.float64):
            p = p.astype(np.float64)
        c = np.asarray(code).astype(np.int8)
        if self.has_target is None:
            self.has_target = target is not None
        t = None if target is None else np.asarray(target, dtype=np.float64).reshape(p.shape[0], -1)
        for g in (0, 1):
            mask = c == g
            if not mask.any():
                continue
            self._pred[g].append(p[mask])
            pg = self._pred[g][-1].astype(np.float64)
            self._rows[g] += int(mask.sum())
            self._values[g].add(pg)
            col = pg.sum(axis=0)
            self._column_sum[g] = col if self._column_sum[g] is None else self._column_sum[g] + col
            if t is not None:
                err = pg - t[mask]
                self._sq_err[g] += float(np.sum(err * err))
                self._abs_err[g] += float(np.sum(np.abs(err)))

    def result(self, labels: tuple[str, str], group_of_code: np.ndarray | None = None) -> OutputMetrics:
        """The metrics, with code c counted as group `group_of_code[c]` (default: code = group)."""
        order = [0, 1]  # order[g]: the code counted as group g
        if group_of_code is not None:
            groups = [int(x) for x in group_of_code]
            order = [groups.index(g) if g in groups else g for g in (0, 1)]
        blocks = [self._pred[c] for c in order]
        k = next((b[0].shape[1] for b in blocks if b), 1)
        pred = [np.concatenate(b) if b else np.zeros((0, k)) for b in blocks]
        ks_cols = tuple(ks_statistic(pred[0][:, j], pred[1][:, j]) for j in range(k))
        target = bool(self.has_target)
        summaries = []
        for label, c in zip(labels, order):
            n, vals = self._rows[c], self._values[c]
            cells = n * k
            summaries.append(GroupSummary(
                label=str(label), count=n,
                mean=vals.mean if vals.n else float("nan"),
                std=float(np.sqrt(vals.m2 / (vals.n - 1))) if vals.n > 1 else float("nan"),
                mse=self._sq_err[c] / cells if target and cells else None,
                mae=self._abs_err[c] / cells if target and cells else None,
            ))
        sums = [self._column_sum[c] for c in order]
        if all(x is not None for x in sums) and all(self._rows[c] for c in order):
            gaps = np.abs(sums[0] / self._rows[order[0]] - sums[1] / self._rows[order[1]])
        else:
            gaps = np.array([np.nan])
        cells = self.rows * k
        return OutputMetrics(
            ks=float(max(ks_cols)) if ks_cols else float("nan"),
            mean_gap=float(np.max(gaps)),
            mse=(self._sq_err[0] + self._sq_err[1]) / cells if target and cells else None,
            mae=(self._abs_err[0] + self._abs_err[1]) / cells if target and cells else None,
            rows=self.rows,
            groups=(summaries[0], summaries[1]),
            ks_per_column=ks_cols,
        )


def output_metrics(pred: np.ndarray, in_group1: np.ndarray, labels: tuple[str, str],
                   target: np.ndarray | None = None) -> OutputMetrics:
    """Compute `OutputMetrics` of arrays in memory.

    Args:
        pred: [n] or [n, k] model outputs.
        in_group1: [n] bool, True for rows of group 1 (False: group 0).
        labels: the two groups' labels, group 0 first.
        target: [n] or [n, k] labels, or None.
    """
    collector = OutputCollector()
    collector.add(pred, np.asarray(in_group1, dtype=bool).astype(np.int8), target)
    return collector.result(labels)
