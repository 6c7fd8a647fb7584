"""Exact Kolmogorov-Smirnov distances between k >= 2 groups' outputs, their noise floor and bootstrap.

Everything is exact (no binning): an empirical CDF is evaluated at sample points by `searchsorted`
on sorted arrays, in float64.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

#: 95% two-sample KS critical value factor: the KS of two same-distribution samples of sizes n_g, n_h
#: stays below KS_CRITICAL * sqrt(1/n_g + 1/n_h) with probability about 0.95 (large samples).
KS_CRITICAL = 1.36


def _sorted(values: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(values, dtype=np.float64).ravel())


def ks_sorted(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 18) -> float:
    """KS statistic of two already sorted float64 samples `a: [n_a]`, `b: [n_b]` (nan if one is empty)."""
    if a.size == 0 or b.size == 0:
        return float("nan")
    best = 0.0
    for points in (a, b):
        for start in range(0, points.size, chunk):
            t = points[start:start + chunk]
            gap = np.abs(np.searchsorted(a, t, side="right") / a.size - np.searchsorted(b, t, side="right") / b.size)
            best = max(best, float(gap.max()))
    return best


def ks_statistic(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 18) -> float:
    """Exact two-sample Kolmogorov-Smirnov statistic sup_t |F_a(t) - F_b(t)| (no binning).

    Equals `scipy.stats.ks_2samp(a, b).statistic`. The supremum is attained at a sample point, so the
    two empirical CDFs are compared at every point of both samples, `chunk` points at a time (memory:
    the two sorted samples plus O(chunk)).
    """
    return ks_sorted(_sorted(a), _sorted(b), chunk)


def ks_max_pairwise(values_by_group: Sequence[np.ndarray]) -> tuple[float, tuple[int, int] | None]:
    """Largest pairwise KS max_{g<h} sup_t |F_g(t) - F_h(t)| over the groups' values `[n_g]` each.

    Groups without values are skipped. Returns (ks, (g, h)) with g < h the first pair attaining the
    maximum, or (nan, None) when fewer than two groups have values.
    """
    srt = [_sorted(v) for v in values_by_group]
    best, pair = float("nan"), None
    for g in range(len(srt)):
        for h in range(g + 1, len(srt)):
            if srt[g].size and srt[h].size:
                value = ks_sorted(srt[g], srt[h])
                if pair is None or value > best:
                    best, pair = value, (g, h)
    return best, pair


def ks_to_overall(values_by_group: Sequence[np.ndarray], counts: Sequence[int] | None = None,
                  chunk: int = 1 << 18) -> list[float]:
    """Per group, sup_t |F_g(t) - F(t)| with F the CDF of all groups' values pooled (nan for an empty group).

    With `counts` (each group's number of rows when `values_by_group` holds a sample of them), F is the
    mixture `sum_h counts[h] F_h / sum counts` of the groups' sample CDFs, as if every row had been kept."""
    srt = [_sorted(v) for v in values_by_group]
    if counts is None:
        pooled = np.sort(np.concatenate(srt))
        return [ks_sorted(v, pooled) for v in srt]
    live = [h for h in range(len(srt)) if srt[h].size]
    total = float(sum(counts[h] for h in live))
    best = [0.0 if v.size else float("nan") for v in srt]
    for points in (srt[h] for h in live):  # every jump of every F_g (and so of F)
        for start in range(0, points.size, chunk):
            t = points[start:start + chunk]
            cdf = {h: np.searchsorted(srt[h], t, side="right") / srt[h].size for h in live}
            mix = sum(counts[h] / total * cdf[h] for h in live)
            for h in live:
                best[h] = max(best[h], float(np.max(np.abs(cdf[h] - mix))))
    return best


def ks_critical(n_g: int, n_h: int) -> float:
    """KS_CRITICAL * sqrt(1/n_g + 1/n_h): about the 95% quantile of the KS of two same-distribution samples."""
    return KS_CRITICAL * float(np.sqrt(1.0 / n_g + 1.0 / n_h)) if n_g > 0 and n_h > 0 else float("nan")


def ks_noise_floor(sizes: Sequence[int], seed: int = 0, permutations: int = 200) -> float:
    """Mean max-pairwise KS with the group labels shuffled: the KS that group sizes `sizes` give by chance.

    Shuffling the labels of the pooled values makes the KS depend on the group sizes only (for values
    without ties), so each of the `permutations` draws (seeded) assigns the labels at random to the
    ranks 1..n and takes the exact max pairwise KS; the result is the mean over the draws. Ties in real
    data can only lower the permutation KS. Groups of size 0 are skipped; nan for fewer than two groups.
    """
    sizes = tuple(int(n) for n in sizes if int(n) > 0)
    if len(sizes) < 2 or permutations < 1:
        return float("nan")
    return _noise_floor(sizes, int(seed), int(permutations))


def _max_spread(cdfs: list[np.ndarray]) -> float:
    """max over points of max_g F_g - min_g F_g (= the max over pairs of |F_g - F_h|), `cdfs`: k arrays [n]."""
    if len(cdfs) == 2:
        return float(np.max(np.abs(cdfs[0] - cdfs[1])))
    hi, lo = cdfs[0].copy(), cdfs[0].copy()
    for c in cdfs[1:]:
        np.maximum(hi, c, out=hi)
        np.minimum(lo, c, out=lo)
    return float(np.max(hi - lo))


@lru_cache(maxsize=64)
def _noise_floor(sizes: tuple[int, ...], seed: int, permutations: int) -> float:
    rng = np.random.default_rng(seed)
    k = len(sizes)
    labels = np.repeat(np.arange(k), sizes)
    step = 1.0 / np.asarray(sizes, dtype=np.float64)
    total = 0.0
    for _ in range(permutations):
        lab = rng.permutation(labels)
        total += _max_spread([np.cumsum(lab == g) * step[g] for g in range(k)])  # F_g after each rank
    return total / permutations


class PooledOrder:
    """Sorted pooled values of several groups (one output column), for fast weighted KS on resamples.

    `values_by_group`: [n_g] per group. A resample is given as per-row multiplicities (bootstrap
    counts) per group; `max_pairwise(counts)` is the exact max pairwise KS of the resampled groups.
    """

    def __init__(self, values_by_group: Sequence[np.ndarray]) -> None:
        vals = [np.asarray(v, dtype=np.float64).ravel() for v in values_by_group]
        self.sizes = [v.size for v in vals]
        pooled = np.concatenate(vals)
        gid = np.repeat(np.arange(len(vals)), self.sizes)
        self.order = np.argsort(pooled, kind="stable")
        srt = pooled[self.order]
        self.gid = gid[self.order]
        # the CDFs are compared after the last copy of each distinct value
        self.run_end = np.flatnonzero(np.r_[srt[1:] != srt[:-1], True]) if srt.size else np.zeros(0, np.int64)
        # two groups with rows: F_0 - F_1 is one cumulative sum of +1/n_0 and -1/n_1 steps
        self._signed = np.where(self.gid == 0, 1.0 / self.sizes[0], -1.0 / self.sizes[1]) \
            if len(vals) == 2 and all(self.sizes) else None

    def max_pairwise(self, counts: Sequence[np.ndarray]) -> float:
        """Max pairwise KS of the groups with row multiplicities `counts` ([n_g] ints per group)."""
        k = len(self.sizes)
        w = np.concatenate(counts).astype(np.float64)[self.order]
        step = np.array([1.0 / n if n else 0.0 for n in self.sizes])
        live = [g for g in range(k) if self.sizes[g]]
        if len(live) < 2:
            return float("nan")
        if self._signed is not None:
            return float(np.max(np.abs(np.cumsum(w * self._signed)[self.run_end])))
        w = w * step[self.gid]
        return _max_spread([np.cumsum(np.where(self.gid == g, w, 0.0))[self.run_end] for g in live])
