"""Streaming first and second moments in float64 (Chan et al. pairwise merge).

Memory is O(d^2) whatever the number of rows: each batch is reduced at once and merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    def add(self, rows: np.ndarray) -> None:
        """Reduce a batch `rows: [n, d]` (any float dtype; reduced in float64) and merge it in."""
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.mean(axis=0, dtype=np.float64)
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
class LayerStats:
    """What the ESVD math needs from a layer's inputs: per-group moments of x.

    Attributes:
        n0, n1: row counts of group 0 and group 1.
        mean0, mean1: [d] group means.
        cov0, cov1: [d, d] unbiased group covariances.
        gram: [d, d] uncentred Gram matrix of all rows of both groups (not divided by n).
    """

    n0: int
    n1: int
    mean0: np.ndarray
    mean1: np.ndarray
    cov0: np.ndarray
    cov1: np.ndarray
    gram: np.ndarray

    @classmethod
    def from_moments(cls, g0: Moments, g1: Moments) -> "LayerStats":
        return cls(
            n0=g0.n,
            n1=g1.n,
            mean0=g0.mean.copy(),
            mean1=g1.mean.copy(),
            cov0=g0.covariance(),
            cov1=g1.covariance(),
            gram=g0.gram() + g1.gram(),
        )

    @classmethod
    def from_arrays(cls, x0: np.ndarray, x1: np.ndarray) -> "LayerStats":
        """Direct (non-streaming) statistics of two row blocks `[n_g, d]`."""
        m0, m1 = Moments(x0.shape[1]), Moments(x1.shape[1])
        m0.add(x0)
        m1.add(x1)
        return cls.from_moments(m0, m1)
