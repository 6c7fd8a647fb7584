"""The exact least-squares term of a final-node refit from streamed moments, with no rows.

When only the final linear node is tuned (`out = z @ W^T + b`), the mean squared error over ALL fit rows
is a quadratic in `(W, b)` that the refit pass's moments of `[z, t]` give exactly:

    mean((z W_c + b_c - t_c)^2) = (W_c Szz W_c - 2 W_c Szt_c + Stt_c) / n + (zbar W_c + b_c - tbar_c)^2

with `Szz, Szt, Stt` the pooled centred scatters and `zbar, tbar` the pooled means (the centred form
avoids the cancellation of raw second moments). Each evaluation costs O(m p^2), whatever the number
of rows, so a penalised refit needs rows only for its distribution penalty (penalty.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import DataError
from .stats import Moments


@dataclass(frozen=True)
class FitMoments:
    """Pooled moments of the fit rows: `n` rows, `mean_z: [p]`, `mean_t: [m]`, centred scatters `szz: [p, p]`,
    `szt: [p, m]` and `stt: [m]` (the diagonal of the targets' scatter), all float64."""

    n: int
    mean_z: np.ndarray
    mean_t: np.ndarray
    szz: np.ndarray
    szt: np.ndarray
    stt: np.ndarray

    @classmethod
    def from_groups(cls, groups: Sequence[Moments], p: int) -> "FitMoments":
        """Pool per-group moments of `[z, t]` (dim p + m; `refit.RefitAccumulator.groups`)."""
        pooled = groups[0].copy()
        for g in groups[1:]:
            pooled.merge(g)
        if pooled.n < 2:
            raise DataError(f"the refit saw {pooled.n} fit rows: at least 2 are needed")
        s = pooled.scatter
        return cls(n=int(pooled.n), mean_z=pooled.mean[:p].copy(), mean_t=pooled.mean[p:].copy(),
                   szz=s[:p, :p].copy(), szt=s[:p, p:].copy(), stt=np.diag(s[p:, p:]).copy())

    @classmethod
    def from_rows(cls, z: np.ndarray, t: np.ndarray) -> "FitMoments":
        """From rows `z: [n, p]`, `t: [n, m]` (or [n]), all counted once."""
        z = np.asarray(z, dtype=np.float64)
        t = np.asarray(t, dtype=np.float64).reshape(z.shape[0], -1)
        mom = Moments(z.shape[1] + t.shape[1])
        mom.add(np.hstack([z, t]))
        return cls.from_groups([mom], z.shape[1])

    @property
    def p(self) -> int:
        return self.mean_z.size

    @property
    def m(self) -> int:
        return self.mean_t.size

    @property
    def tvar(self) -> np.ndarray:
        """Population variance of each target column `[m]` over the fit rows."""
        return self.stt / self.n

    def mse(self, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-column MSE `[m]` of `z @ w^T + b` (`w: [m, p]`, `b: [m]` or None: no bias) over the fit rows, and
        its gradients with respect to `w` (`[m, p]`, row c only through column c) and `b` (`[m]`)."""
        shift = w @ self.mean_z - self.mean_t + (0.0 if b is None else b)  # [m] mean error
        sw = w @ self.szz                                                 # [m, p]
        quad = np.einsum("cp,cp->c", sw, w) - 2.0 * np.einsum("cp,pc->c", w, self.szt) + self.stt
        value = quad / self.n + shift * shift
        grad_w = 2.0 * (sw - self.szt.T) / self.n + 2.0 * shift[:, None] * self.mean_z[None, :]
        return value, grad_w, 2.0 * shift
