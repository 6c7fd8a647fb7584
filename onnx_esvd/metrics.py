"""Output metrics between the two groups: exact KS, mean gap, per-group summaries, MSE and MAE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sample Kolmogorov-Smirnov statistic sup_t |F_a(t) - F_b(t)| (no binning).

    Equals `scipy.stats.ks_2samp(a, b).statistic`.
    """
    a = np.sort(np.asarray(a, dtype=np.float64).ravel())
    b = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        return float("nan")
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


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


def _as_columns(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v.reshape(v.shape[0], -1)


def output_metrics(pred: np.ndarray, in_group1: np.ndarray, labels: tuple[str, str],
                   target: np.ndarray | None = None) -> OutputMetrics:
    """Compute `OutputMetrics`.

    Args:
        pred: [n] or [n, k] model outputs.
        in_group1: [n] bool, True for rows of group 1 (False: group 0).
        labels: the two groups' labels, group 0 first.
        target: [n] or [n, k] labels, or None.
    """
    p = _as_columns(pred)
    g1 = np.asarray(in_group1, dtype=bool)
    t = None if target is None else _as_columns(target)
    err = None if t is None else p - t
    ks_cols = tuple(ks_statistic(p[~g1, j], p[g1, j]) for j in range(p.shape[1]))
    summaries = []
    for label, mask in ((labels[0], ~g1), (labels[1], g1)):
        n = int(mask.sum())
        pg = p[mask]
        summaries.append(GroupSummary(
            label=str(label), count=n,
            mean=float(pg.mean()) if n else float("nan"),
            std=float(pg.std(ddof=1)) if n > 1 else float("nan"),
            mse=None if err is None or not n else float(np.mean(err[mask] ** 2)),
            mae=None if err is None or not n else float(np.mean(np.abs(err[mask]))),
        ))
    gaps = np.abs(p[~g1].mean(axis=0) - p[g1].mean(axis=0)) if (g1.any() and (~g1).any()) else np.array([np.nan])
    return OutputMetrics(
        ks=float(max(ks_cols)),
        mean_gap=float(np.max(gaps)),
        mse=None if err is None else float(np.mean(err**2)),
        mae=None if err is None else float(np.mean(np.abs(err))),
        rows=int(p.shape[0]),
        groups=(summaries[0], summaries[1]),
        ks_per_column=ks_cols,
    )
