"""Streaming first and second moments in float64 (Chan et al. pairwise merge), per group for k >= 2 groups.

Memory is O(d^2) per group whatever the number of rows: each batch is reduced at once and merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

#: Group weights: "size" w_g = n_g / n, "equal" w_g = 1 / k.
GroupWeights = Literal["size", "equal"]


def present_codes(code: np.ndarray) -> np.ndarray:
    """The distinct values of non-negative integer codes `code: [n]`, ascending (np.unique's answer, for the
    per-batch loops: a bincount costs microseconds where np.unique sorts or hashes, and numpy 2's np.unique
    imports numpy.ma on its first call)."""
    c = np.asarray(code).reshape(-1)
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.bincount(c.astype(np.int64, copy=False)))


def quantile(x: np.ndarray, q: float | np.ndarray) -> np.ndarray:
    """np.quantile(x, q) of a 1-d `x: [n]` (n >= 1) with numpy's default linear method, bit for bit, without
    numpy.ma: numpy's own quantile calls np.unique, which imports numpy.ma (about 50 ms) on its first call.
    Returns a float for a scalar `q`, else `[len(q)]`."""
    a = np.sort(np.asarray(x, dtype=np.float64).ravel())
    qs = np.asarray(q, dtype=np.float64)
    virtual = (a.size - 1) * qs
    prev = np.floor(virtual)
    gamma = virtual - prev
    lo = np.clip(prev.astype(np.intp), 0, a.size - 1)
    hi = np.clip(lo + 1, 0, a.size - 1)
    below, above = a[lo], a[hi]
    diff = above - below
    out = np.asarray(below + diff * gamma, dtype=np.float64)
    np.subtract(above, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out[()] if out.ndim == 0 else out


def median(x: np.ndarray) -> float:
    """np.median of a 1-d `x: [n]` (n >= 1), bit for bit, without numpy.ma (see `quantile`)."""
    a = np.asarray(x).ravel()
    half = a.size // 2
    kth = [half - 1, half] if a.size % 2 == 0 else [half]
    return float(np.mean(np.partition(a, kth)[kth]))


def code_masks(code: np.ndarray, fit: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(code, row mask) of every code present among a batch's fit rows: `code: [n]` non-negative ints, `fit: [n]`
    bool; each mask is `fit & (code == c)`, shared by every layer reduced from the batch."""
    return [(int(c), fit & (code == c)) for c in present_codes(code[fit])]


def add_by_code(by_code: list["Moments"], x: np.ndarray, masks: list[tuple[int, np.ndarray]], dim: int) -> None:
    """Reduce a batch's rows `x: [n, dim]` into the accumulator of each code in `masks` (`code_masks`), growing
    `by_code` (one Moments per label code) as new codes appear."""
    for c, mask in masks:
        while len(by_code) <= c:
            by_code.append(Moments(dim))
        by_code[c].add(x[mask], scratch=True)


def add_counts(seen: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Rows seen per label code `[c]` after adding a batch's non-negative `code: [n]` (grown to the largest code)."""
    counts = np.bincount(code, minlength=len(seen))
    return np.concatenate([seen, np.zeros(len(counts) - len(seen), dtype=np.int64)]) + counts


class Moments:
    """Running count, mean and centred scatter of d-dimensional rows.

    Attributes:
        n: number of rows seen.
        mean: [d] float64.
        scatter: [d, d] float64, sum of (x - mean)(x - mean)^T.
    """

    __slots__ = ("n", "mean", "scatter")

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.scatter = np.zeros((dim, dim), dtype=np.float64)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def add(self, rows: np.ndarray, *, scratch: bool = False) -> None:
        """Reduce a batch `rows: [n, d]` (any float dtype; reduced in float64) and merge it in.

        `scratch=True`: `rows` is a temporary of the caller's (e.g. a masked copy), which a float64 batch is
        centred in place instead of copied again."""
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.mean(axis=0, dtype=np.float64)
        if scratch and rows.dtype == np.float64 and rows.flags.writeable:
            xc = np.subtract(rows, mean_b, out=rows)
        else:
            xc = np.subtract(rows, mean_b, dtype=np.float64)  # centred in float64: one copy
        self._merge(n_b, mean_b, xc.T @ xc)

    def merge(self, other: "Moments") -> None:
        """Merge another accumulator of the same width into this one."""
        if other.n:
            self._merge(other.n, other.mean, other.scatter)

    def _merge(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> None:
        n_a = self.n
        if n_a == 0:
            self.n, self.mean, self.scatter = n_b, mean_b.copy(), scatter_b.copy()
            return
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.scatter += scatter_b
        self.scatter += np.outer(delta, delta) * (n_a * n_b / n)
        self.n = n

    def covariance(self) -> np.ndarray:
        """Unbiased covariance [d, d] (divides by n - 1)."""
        if self.n < 2:
            raise ValueError("covariance needs at least 2 rows")
        return self.scatter / (self.n - 1)

    def gram(self) -> np.ndarray:
        """Uncentred Gram matrix sum x x^T, [d, d]."""
        return self.scatter + self.n * np.outer(self.mean, self.mean)

    def copy(self) -> "Moments":
        out = Moments(self.dim)
        out.n, out.mean, out.scatter = self.n, self.mean.copy(), self.scatter.copy()
        return out


@dataclass(frozen=True)
class GroupStats:
    """What the ESVD math needs from a layer's inputs: per-group moments of x, for k >= 2 groups.

    Memory O(k d^2). Every group needs at least 2 rows (callers refuse smaller groups first; here
    `Moments.covariance` raises ValueError).

    Attributes:
        counts: [k] int64 row counts.
        means: [k, d] float64 group means.
        covs: [k, d, d] float64 unbiased group covariances (divided by n_g - 1).
        gram: [d, d] uncentred Gram matrix sum x x^T of all rows of all groups (not divided by n).
        labels: the k group labels, in group order.
    """

    counts: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    gram: np.ndarray
    labels: tuple[str, ...]

    @property
    def k(self) -> int:
        """Number of groups."""
        return int(self.counts.shape[0])

    @property
    def dim(self) -> int:
        """Width d of the rows."""
        return int(self.means.shape[1])

    @classmethod
    def from_moments(cls, moments: Sequence[Moments], labels: Sequence[str] | None = None) -> "GroupStats":
        """Statistics of k >= 2 groups from their streamed moments (one `Moments` per group, in group order).

        `labels` defaults to "0", "1", ...; the Gram matrix sums the groups' Gram matrices in order.
        """
        moments = list(moments)
        assert len(moments) >= 2, "GroupStats needs at least two groups"
        names = tuple(str(x) for x in labels) if labels is not None else tuple(str(g) for g in range(len(moments)))
        assert len(names) == len(moments), "one label per group"
        gram = moments[0].gram()
        for m in moments[1:]:
            gram = gram + m.gram()
        return cls(
            counts=np.array([m.n for m in moments], dtype=np.int64),
            means=np.stack([m.mean for m in moments]),
            covs=np.stack([m.covariance() for m in moments]),
            gram=gram,
            labels=names,
        )

    @classmethod
    def from_arrays(cls, *blocks: np.ndarray, labels: Sequence[str] | None = None) -> "GroupStats":
        """Direct (non-streaming) statistics of k row blocks `[n_g, d]`, one per group."""
        moments = []
        for x in blocks:
            m = Moments(x.shape[1])
            m.add(x)
            moments.append(m)
        return GroupStats.from_moments(moments, labels)

    def weights(self, kind: GroupWeights = "size") -> np.ndarray:
        """Group weights w: [k] float64 summing to 1: "size" w_g = n_g / n, "equal" w_g = 1 / k."""
        if kind == "size":
            return self.counts / float(self.counts.sum())
        if kind == "equal":
            return np.full(self.k, 1.0 / self.k)
        raise ValueError(f"unknown group weights {kind!r}; use 'size' or 'equal'")

    # two-group views (k = 2 only), kept for binary callers
    def _two(self) -> None:
        if self.k != 2:
            raise ValueError(f"n0/n1/mean0/mean1/cov0/cov1 exist for two groups only (this has {self.k})")

    @property
    def n0(self) -> int:
        self._two()
        return int(self.counts[0])

    @property
    def n1(self) -> int:
        self._two()
        return int(self.counts[1])

    @property
    def mean0(self) -> np.ndarray:
        self._two()
        return self.means[0]

    @property
    def mean1(self) -> np.ndarray:
        self._two()
        return self.means[1]

    @property
    def cov0(self) -> np.ndarray:
        self._two()
        return self.covs[0]

    @property
    def cov1(self) -> np.ndarray:
        self._two()
        return self.covs[1]


class LayerStats(GroupStats):
    """The two-group case of `GroupStats` (binary callers): `from_moments(g0, g1)`, `from_arrays(x0, x1)`."""

    @classmethod
    def from_moments(  # type: ignore[override]
            cls, g0: Moments, g1: Moments, labels: Sequence[str] | None = None) -> GroupStats:
        return GroupStats.from_moments([g0, g1], labels)

    @classmethod
    def from_arrays(  # type: ignore[override]
            cls, x0: np.ndarray, x1: np.ndarray, labels: Sequence[str] | None = None) -> GroupStats:
        return GroupStats.from_arrays(x0, x1, labels=labels)
