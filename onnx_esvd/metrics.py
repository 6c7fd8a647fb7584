"""Output metrics between k >= 2 groups: max pairwise exact KS, KS to everyone, mean gap, per-group
summaries, MSE and MAE, with the KS noise floor and optional bootstrap intervals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .rowsample import water_level
from .stats import present_codes, quantile
from .ks import PooledOrder, ks_critical, ks_max_pairwise, ks_noise_floor, ks_statistic, ks_to_overall

__all__ = ["GroupSummary", "OutputMetrics", "OutputCollector", "REPORT_ROWS", "output_metrics", "ks_statistic",
           "ks_max_pairwise", "ks_noise_floor", "MIN_ESTIMABLE_ROWS", "NOISE_FLOOR_PERMUTATIONS"]

#: A group with fewer evaluation rows is flagged not estimable (for k >= 3 left out of the aggregates).
MIN_ESTIMABLE_ROWS = 30

#: Report rows kept for the KS, its noise floor and the bootstrap intervals by the pipeline's passes: past this,
#: a group-stratified sample of them (see `OutputCollector`), so that memory does not grow with the rows.
REPORT_ROWS = 250_000

#: Label permutations averaged by the noise floor (fewer for very many rows, see `_floor_permutations`).
NOISE_FLOOR_PERMUTATIONS = 200


def _floor_permutations(rows: int) -> int:
    """200 permutations up to 100k rows, then fewer (at least 20) to keep the cost near 2e7 row-draws."""
    return max(20, min(NOISE_FLOOR_PERMUTATIONS, int(2e7 // max(rows, 1))))


@dataclass(frozen=True)
class GroupSummary:
    """Output summary of one group. `mse`/`mae` are None without a target.

    `ks_overall`: sup_t |F_g(t) - F(t)| against all rows of all groups (max over output columns);
    `estimable`: the group has at least MIN_ESTIMABLE_ROWS rows.
    """

    label: str
    count: int
    mean: float
    std: float
    mse: float | None
    mae: float | None
    ks_overall: float = float("nan")
    estimable: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "count": self.count, "mean": self.mean, "std": self.std,
                "mse": self.mse, "mae": self.mae, "ks_overall": self.ks_overall, "estimable": self.estimable}


@dataclass(frozen=True)
class OutputMetrics:
    """Metrics of a model's output on rows of k >= 2 groups.

    Which groups count: for k >= 3, groups with fewer than MIN_ESTIMABLE_ROWS rows are left out of
    `ks`, `ks_overall` and `mean_gap` (all groups with rows count if fewer than two are estimable);
    for k = 2 both groups always count (small ones are still listed in `not_estimable`).
    For an output with several columns, `ks` and `mean_gap` are the largest over the columns and
    `mse`/`mae` the average; `ks_per_column` keeps the detail.

    Attributes:
        ks: max pairwise exact KS max_{g<h} sup_t |F_g(t) - F_h(t)| (k = 2: the two-sample KS).
        mean_gap: max - min of the group mean outputs (k = 2: |E[y | g0] - E[y | g1]|).
        mse, mae: against the target over all rows, None without a target.
        rows: rows measured (all groups).
        groups: the k group summaries, in group order.
        ks_per_column: max pairwise KS of each output column.
        ks_pair: labels of the pair attaining `ks`.
        ks_overall: max_g sup_t |F_g(t) - F(t)|, F over all rows.
        ks_critical: 1.36 sqrt(1/n_g + 1/n_h) for the attaining pair (95% same-distribution level).
        noise_floor: mean max pairwise KS over label permutations of the counted groups' sizes
            (`ks_noise_floor`: computed from the sizes alone with tie-free values, seeded, 200 draws up
            to 100k rows, at least 20 beyond).
        intervals: 95% bootstrap intervals {"ks", "mean_gap", "mse" (with a target)}: (lo, hi), rows
            resampled within groups; empty without `bootstrap`. KS and mean gap: basic (reflected) intervals
            for the population value (see `_bootstrap`); MSE: percentile interval.
        not_estimable: labels of groups with fewer than MIN_ESTIMABLE_ROWS rows.
        ks_rows: rows the KS, KS vs all, critical value, noise floor and intervals were measured on: `rows`, or
            fewer when the report rows passed the collector's cap (a group-stratified sample of them).
    """

    @property
    def ks_sampled(self) -> bool:
        return self.ks_rows is not None and self.ks_rows < self.rows


    ks: float
    mean_gap: float
    mse: float | None
    mae: float | None
    rows: int
    groups: tuple[GroupSummary, ...]
    ks_per_column: tuple[float, ...]
    ks_pair: tuple[str, ...] = ()
    ks_overall: float = float("nan")
    ks_critical: float = float("nan")
    noise_floor: float = float("nan")
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    not_estimable: tuple[str, ...] = ()
    ks_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ks": self.ks, "mean_gap": self.mean_gap, "mse": self.mse, "mae": self.mae,
                               "rows": self.rows, "groups": [g.to_dict() for g in self.groups]}
        if len(self.ks_per_column) > 1:
            out["ks_per_column"] = list(self.ks_per_column)
        out.update({"ks_pair": list(self.ks_pair), "ks_overall": self.ks_overall, "ks_critical": self.ks_critical,
                    "noise_floor": self.noise_floor,
                    "intervals": {name: list(iv) for name, iv in self.intervals.items()},
                    "not_estimable": list(self.not_estimable),
                    "ks_rows": self.rows if self.ks_rows is None else self.ks_rows})
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
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite outputs are refused by the caller's guard
            mean_b = float(v.mean())
            m2_b = float(np.sum((v - mean_b) ** 2))
        n = self.n + v.size
        delta = mean_b - self.mean
        self.mean += delta * v.size / n
        self.m2 += m2_b + delta * delta * self.n * v.size / n
        self.n = n


class OutputCollector:
    """Model outputs of k groups streamed batch by batch (group codes 0..k-1; negative codes are ignored).

    Keeps one value per row and output column in the model's own float dtype plus, with a target,
    each row's squared error summed over columns in float64 (for bootstrap intervals of the MSE); the
    target itself is never stored. Means, spreads, MSE and MAE are summed on the fly.

    With `cap` (the pipeline's passes set REPORT_ROWS), at most about `cap` rows are kept for the KS, its
    noise floor and the bootstrap: a group-stratified sample that keeps every row of a group up to a common
    level (as `rowsample.StratifiedSample`), chosen by each row's `priority` (a seeded uniform number per
    data row, so that the before and after passes keep the same rows). Below the cap nothing changes; above
    it `OutputMetrics.ks_rows` says on how many rows the KS was measured. Means, spreads, MSE and MAE always
    cover every row.
    """

    def __init__(self, cap: int | None = None) -> None:
        if cap is not None and cap < 1:
            raise ValueError(f"cap {cap} must be a positive number of rows")
        self.cap = cap
        self._prio: list[list[np.ndarray]] = []  # per code: priorities of the kept rows (with a cap)
        self._kept: list[int] = []  # per code: rows kept (buffered) for the KS
        self._cut: list[float | None] = []  # per code: rows with a larger priority can never be kept
        self._pred: list[list[np.ndarray]] = []  # per code: [n_c, cols] blocks in the model's dtype
        self._row_sq: list[list[np.ndarray]] = []  # per code: [n_c] squared error of each row (with a target)
        self._values: list[_Scalar] = []  # per code, over all output columns
        self._column_sum: list[np.ndarray | None] = []  # per code: sum of each output column
        self._rows: list[int] = []
        self._sq_err: list[float] = []
        self._abs_err: list[float] = []
        self.has_target: bool | None = None
        self.width: int | None = None  # values per row of the scored tensor (set by the pass that fills it)
        self.cells = 0  # output values added (every row of every group, kept for the KS or not)
        self.nonfinite = 0  # of those, NaN or infinite

    def _grow(self, codes: int) -> None:
        while len(self._rows) < codes:
            self._prio.append([])
            self._kept.append(0)
            self._cut.append(None)
            self._pred.append([])
            self._row_sq.append([])
            self._values.append(_Scalar())
            self._column_sum.append(None)
            self._rows.append(0)
            self._sq_err.append(0.0)
            self._abs_err.append(0.0)

    @property
    def rows(self) -> int:
        return sum(self._rows)

    def values(self, code: int) -> np.ndarray:
        """The output values of the rows with group code `code` that the KS uses (every row below the cap),
        [n_c, cols] in the model's dtype."""
        self._finish_sample()
        blocks = self._pred[code] if code < len(self._pred) else []
        return np.concatenate(blocks) if blocks else np.zeros((0, 1), dtype=np.float32)

    def rows_of(self, code: int) -> int:
        """Rows added with group code `code`."""
        return self._rows[code] if 0 <= code < len(self._rows) else 0

    def add(self, pred: np.ndarray, code: np.ndarray, target: np.ndarray | None = None,
            priority: np.ndarray | None = None) -> None:
        """Add `pred: [n] or [n, cols]` with group codes `code: [n]` (0..k-1; < 0 skipped),
        `target: [n] or [n, cols]` and, with a cap, `priority: [n]` float (which rows the KS sample keeps)."""
        if self.cap is not None and priority is None:
            raise ValueError("a capped OutputCollector needs a priority per row")
        p = np.asarray(pred)
        p = p.reshape(p.shape[0], -1)
        if p.dtype not in (np.float32, np.float64):
            p = p.astype(np.float64)
        c = np.asarray(code).astype(np.int64).reshape(-1)
        if self.has_target is None:
            self.has_target = target is not None
        t = None if target is None else np.asarray(target, dtype=np.float64).reshape(p.shape[0], -1)
        if c.size and c.max() >= 0:
            self._grow(int(c.max()) + 1)
        for g in present_codes(c[c >= 0]):
            mask = c == g
            pg = p[mask].astype(np.float64)
            self._rows[g] += int(mask.sum())
            self.cells += pg.size
            self.nonfinite += int(pg.size - np.count_nonzero(np.isfinite(pg)))
            self._values[g].add(pg)
            col = pg.sum(axis=0)
            self._column_sum[g] = col if self._column_sum[g] is None else self._column_sum[g] + col
            keep = slice(None)
            if self.cap is not None:
                prio = np.asarray(priority, dtype=np.float64).reshape(-1)[mask]
                keep = prio <= self._cut[g] if self._cut[g] is not None else slice(None)
                self._prio[g].append(prio[keep])
                self._kept[g] += int(self._prio[g][-1].size)
            self._pred[g].append(p[mask][keep])
            if t is not None:
                err = pg - t[mask]
                sq = err * err
                self._row_sq[g].append(sq.sum(axis=1)[keep])
                self._sq_err[g] += float(np.sum(sq))
                self._abs_err[g] += float(np.sum(np.abs(err)))
        if self.cap is not None:
            level = water_level(self._rows, self.cap, 0)
            for g in range(len(self._rows)):
                if self._kept[g] > level + max(level // 4, c.size):
                    self._trim(g, level)

    def _trim(self, g: int, level: int) -> None:
        """Keep the `level` rows of code g with the smallest priorities (their order kept)."""
        prio = np.concatenate(self._prio[g]) if self._prio[g] else np.zeros(0)
        if prio.size > level:
            keep = np.sort(np.argpartition(prio, level - 1)[:level]) if level > 0 else np.zeros(0, dtype=np.int64)
            if level > 0:
                self._cut[g] = float(prio[keep].max())
        else:
            keep = slice(None)
        self._prio[g] = [prio[keep]]
        self._pred[g] = [np.concatenate(self._pred[g])[keep]] if self._pred[g] else []
        if self._row_sq[g]:
            self._row_sq[g] = [np.concatenate(self._row_sq[g])[keep]]
        self._kept[g] = int(self._prio[g][0].size)

    def _finish_sample(self) -> None:
        """Trim every code to the final level (the KS sample is complete)."""
        if self.cap is None:
            return
        level = water_level(self._rows, self.cap, 0)
        for g in range(len(self._rows)):
            if self._kept[g] > level:
                self._trim(g, level)

    def kept_of(self, code: int) -> int:
        """Rows of code `code` kept for the KS (all of them without a cap or below it)."""
        if not 0 <= code < len(self._rows):
            return 0
        return self._kept[code] if self.cap is not None else self._rows[code]

    def result(self, labels: Sequence[str], group_of_code: np.ndarray | None = None, *, bootstrap: int = 0,
               seed: int = 0) -> OutputMetrics:
        """The metrics of the k = len(labels) groups, with code c counted as group `group_of_code[c]`
        (default: code = group). `bootstrap`: resamples for the 95% intervals (0: none), seeded by `seed`,
        which also seeds the noise floor."""
        k = len(labels)
        self._grow(k)
        self._finish_sample()
        order = list(range(k))  # order[g]: the code counted as group g
        if group_of_code is not None:
            groups = [int(x) for x in group_of_code]
            order = [groups.index(g) if g in groups else g for g in range(k)]
            self._grow(max(order) + 1)
        blocks = [self._pred[c] for c in order]
        cols = next((b[0].shape[1] for b in blocks if b), 1)
        pred = [np.concatenate(b) if b else np.zeros((0, cols)) for b in blocks]
        counts = [self._rows[c] for c in order]
        sizes = [p.shape[0] for p in pred]  # rows the KS is measured on (= counts below the cap)
        sampled = sizes != counts
        estimable = [n >= MIN_ESTIMABLE_ROWS for n in counts]
        if k == 2:
            counted = [0, 1]
        else:
            counted = [g for g in range(k) if estimable[g]]
            if len(counted) < 2:
                counted = [g for g in range(k) if counts[g] > 0]
        target = bool(self.has_target)

        ks_cols, pairs, overall = [], [], np.full(k, np.nan)
        for j in range(cols):
            value, pair = ks_max_pairwise([pred[g][:, j] for g in counted])
            ks_cols.append(value)
            pairs.append(pair)
            per = np.array(ks_to_overall([p[:, j] for p in pred], counts if sampled else None), dtype=np.float64)
            overall = np.where(np.isnan(overall) | (per > overall), per, overall)
        best = int(np.nanargmax(ks_cols)) if not np.all(np.isnan(ks_cols)) else 0
        pair = pairs[best] if pairs[best] is not None else (0, 1)
        g_a, g_h = (counted[pair[0]], counted[pair[1]]) if len(counted) > max(pair) else (0, 1)

        summaries = []
        for g, (label, c) in enumerate(zip(labels, order)):
            n, vals = self._rows[c], self._values[c]
            cells = n * cols
            summaries.append(GroupSummary(
                label=str(label), count=n,
                mean=vals.mean if vals.n else float("nan"),
                std=float(np.sqrt(vals.m2 / (vals.n - 1))) if vals.n > 1 else float("nan"),
                mse=self._sq_err[c] / cells if target and cells else None,
                mae=self._abs_err[c] / cells if target and cells else None,
                ks_overall=float(overall[g]), estimable=estimable[g],
            ))
        sums = [self._column_sum[order[g]] for g in counted]
        if all(x is not None for x in sums) and all(counts[g] for g in counted) and len(counted) >= 2:
            means = np.stack([sums[i] / counts[g] for i, g in enumerate(counted)])
            gaps = means.max(axis=0) - means.min(axis=0)
        else:
            gaps = np.array([np.nan])
        cells = sum(counts) * cols
        sq_total = sum(self._sq_err[c] for c in order)
        abs_total = sum(self._abs_err[c] for c in order)
        intervals = {}
        if bootstrap > 0:
            point = {"ks": float(np.nanmax(ks_cols)) if len(ks_cols) and not np.all(np.isnan(ks_cols)) else np.nan,
                     "mean_gap": float(np.max(gaps))}
            intervals = self._bootstrap(pred, order, counted, int(bootstrap), int(seed), point, counts)
        over_counted = [overall[g] for g in counted if not np.isnan(overall[g])]
        return OutputMetrics(
            ks=float(max(ks_cols)) if ks_cols else float("nan"),
            mean_gap=float(np.max(gaps)),
            mse=sq_total / cells if target and cells else None,
            mae=abs_total / cells if target and cells else None,
            rows=sum(counts),
            groups=tuple(summaries),
            ks_per_column=tuple(ks_cols),
            ks_pair=(str(labels[g_a]), str(labels[g_h])),
            ks_overall=float(max(over_counted)) if over_counted else float("nan"),
            ks_critical=ks_critical(sizes[g_a], sizes[g_h]),
            noise_floor=ks_noise_floor([sizes[g] for g in counted], seed,
                                       _floor_permutations(sum(sizes[g] for g in counted))),
            ks_rows=sum(sizes),
            intervals=intervals,
            not_estimable=tuple(str(labels[g]) for g in range(k) if not estimable[g]),
        )

    def _bootstrap(self, pred: list[np.ndarray], order: list[int], counted: list[int], resamples: int,
                   seed: int, point: dict[str, float] | None = None, counts: list[int] | None = None
                   ) -> dict[str, tuple[float, float]]:
        """95% bootstrap intervals of ks, mean_gap (counted groups) and mse (all groups), rows resampled
        within each group; `pred[g]: [n_g, cols]` float.

        KS and the mean gap are maxima over pairs, so the observed values over-state the population's, and
        resampled values sit higher still (more so the closer the groups are): their intervals are the basic
        (reflected) bootstrap around `point`, `[2 point - q97.5, 2 point - q2.5]` clipped at 0, an interval for
        the population value that reaches 0 when the groups agree (it may then lie below the observed value).
        MSE's is the percentile interval; with a capped sample (`counts`: every group's rows, `pred` a
        group-stratified sample of them) each group's squared errors count `counts[g] / n_g` times."""
        k, cols = len(pred), pred[0].shape[1]
        sizes = [p.shape[0] for p in pred]
        if any(sizes[g] == 0 for g in counted):
            return {}
        target = bool(self.has_target)
        row_sq = [np.concatenate(self._row_sq[c]) if self._row_sq[c] else np.zeros(0) for c in order]
        share = [1.0 if counts is None or not sizes[g] else counts[g] / sizes[g] for g in range(k)]
        cells = sum(share[g] * sizes[g] for g in range(k)) * cols
        vals = [[np.asarray(pred[g][:, j], dtype=np.float64) for g in counted] for j in range(cols)]
        pooled = [PooledOrder(v) for v in vals]
        rng = np.random.default_rng(seed)
        ks_b, gap_b, mse_b = np.empty(resamples), np.empty(resamples), np.empty(resamples)
        for b in range(resamples):
            mult = [np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64) if n else np.zeros(0)
                    for n in sizes]
            sub = [mult[g] for g in counted]
            ks_b[b] = max(po.max_pairwise(sub) for po in pooled)
            gap = 0.0
            for j in range(cols):
                means = [float(np.einsum("i,i->", m, v)) / v.size for m, v in zip(sub, vals[j])]
                gap = max(gap, max(means) - min(means))
            gap_b[b] = gap
            if target:
                mse_b[b] = sum(share[g] * float(np.einsum("i,i->", mult[g], row_sq[g]))
                               for g in range(k) if sizes[g]) / cells
        out = {"ks": ks_b, "mean_gap": gap_b}
        if target:
            out["mse"] = mse_b
        result = {}
        for name, x in out.items():
            lo, hi = (float(v) for v in quantile(x, [0.025, 0.975]))
            if point is not None and name in ("ks", "mean_gap") and np.isfinite(point.get(name, np.nan)):
                p = point[name]
                lo, hi = max(0.0, 2 * p - hi), max(0.0, 2 * p - lo)
            result[name] = (lo, hi)
        return result


def output_metrics(pred: np.ndarray, code: np.ndarray, labels: Sequence[str], target: np.ndarray | None = None, *,
                   bootstrap: int = 0, seed: int = 0) -> OutputMetrics:
    """Compute `OutputMetrics` of arrays in memory.

    Args:
        pred: [n] or [n, cols] model outputs.
        code: [n] group codes 0..k-1 (or a bool mask: True for group 1, False for group 0).
        labels: the k groups' labels, group 0 first.
        target: [n] or [n, cols] labels, or None.
        bootstrap, seed: see `OutputCollector.result`.
    """
    collector = OutputCollector()
    collector.add(pred, np.asarray(code).astype(np.int64), target)
    return collector.result(labels, bootstrap=bootstrap, seed=seed)
