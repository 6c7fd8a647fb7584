"""Frozen copy of the binary (two-group) implementation before k-group support: the k = 2 oracle.

Copied verbatim from onnx_esvd/esvd.py, refit.py (`solve`, `fit`) and metrics.py as they were when the
library handled two groups only, so that the k-group code can be checked to reproduce every binary
result (ESVD weights to round-off, the refit bit for bit, the metrics exactly). Do not edit the math
here; it is a fixed point of comparison. `fit` returns a dict instead of a RefitReport.
"""

# ruff: noqa
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import scipy.linalg
import scipy.optimize

from onnx_esvd.stats import Moments

_RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_FALLBACK_RIDGE = 1e-4
RefitMode = str


@dataclass(frozen=True)
class RefitSolution:
    coef: np.ndarray
    intercept: np.ndarray | None

# ---- esvd.py ----


@dataclass(frozen=True)
class StepReport:
    """Diagnostics of one ESVD step.

    Attributes:
        applied: False when the step was skipped (c = 1, or no disparity to shrink).
        c: the shrink constant.
        rank: number of directions of S kept (second moment: eigenpairs of D above tolerance).
        sigma: singular values of W S before the step, descending.
        sigma_new: the shrunk singular values.
        k: per-direction weights of the objective.
        lam: the Lagrange multiplier found (0.0 when skipped).
        bound_before, bound_after: sum sigma^p (p = 4 second moment, 2 first moment).
    """

    applied: bool
    c: float
    rank: int
    sigma: np.ndarray
    sigma_new: np.ndarray
    k: np.ndarray
    lam: float
    bound_before: float
    bound_after: float


@dataclass(frozen=True)
class EsvdResult:
    """Output of `esvd`: the repaired weight and what each step did.

    Attributes:
        weight: W2, [m, d] float64.
        weight_step1: W1 (after the second-moment step), [m, d] float64.
        second: report of step 1 (second moment, constant c2).
        first: report of step 2 (first moment, constant c1).
    """

    weight: np.ndarray
    weight_step1: np.ndarray
    second: StepReport
    first: StepReport


def _skipped(c: float, p: int, sigma: np.ndarray | None = None, rank: int = 0) -> StepReport:
    s = np.zeros(0) if sigma is None else sigma
    bound = float(np.sum(s**p))
    return StepReport(False, float(c), rank, s, s.copy(), np.zeros_like(s), 0.0, bound, bound)


def solve_multiplier(phi: Callable[[float], float], target: float, scale: float) -> float:
    """Find lam > 0 with phi(lam) = target for phi falling from phi(0) > target towards 0.

    Brackets by geometric growth from `scale`, then Brent on log(lam) so that the relative
    error of the constraint is at round-off level.
    """
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0

    def f(t: float) -> float:
        return phi(float(np.exp(t))) / target - 1.0

    hi = np.log(scale)
    f_hi = f(hi)
    while f_hi > 0.0:
        hi += np.log(10.0)
        if hi > 690.0:  # exp overflows beyond this; phi did not fall below the target
            raise FloatingPointError("could not bracket the multiplier: the constraint is unreachable")
        f_hi = f(hi)
    lo = hi - np.log(10.0)
    f_lo = f(lo)
    while f_lo <= 0.0:
        if f_lo == 0.0:
            return float(np.exp(lo))
        lo -= np.log(10.0)
        if lo < -690.0:
            return float(np.exp(lo))  # phi(0+) already meets the target
        f_lo = f(lo)
    if f_hi == 0.0:
        return float(np.exp(hi))
    t = scipy.optimize.brentq(f, lo, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
    return float(np.exp(t))


def cubic_shrink(sigma: np.ndarray, k: np.ndarray, lam: float) -> np.ndarray:
    """The unique real root s of 2 lam s^3 + k s - k sigma = 0, elementwise; 0 where k = 0.

    Uses the stable form s = 2a sinh(arcsinh(1.5 sigma / a) / 3), a = sqrt(k / (6 lam)).
    """
    out = np.zeros_like(sigma)
    pos = k > 0
    if lam <= 0.0:
        out[pos] = sigma[pos]
        return out
    a = np.sqrt(k[pos] / (6.0 * lam))
    out[pos] = 2.0 * a * np.sinh(np.arcsinh(1.5 * sigma[pos] / a) / 3.0)
    return out


def ridge_shrink(sigma: np.ndarray, k: np.ndarray, lam: float) -> np.ndarray:
    """sigma~ = k sigma / (k + lam), elementwise; 0 where k = 0 and lam > 0."""
    out = np.zeros_like(sigma)
    pos = k > 0
    out[pos] = k[pos] * sigma[pos] / (k[pos] + lam)
    if lam <= 0.0:
        out[~pos] = sigma[~pos]
    return out


def _row_quadratic(a: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """diag(A G A^T) for A: [q, d], G: [d, d], without forming the q x q product."""
    return np.einsum("ij,ij->i", a @ gram, a)


def second_moment_eig(cov0: np.ndarray, cov1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of D = C0 - C1 on its numerical range: (Q_r [d, r], Lambda_r [r]).

    Eigenpairs with |lambda| <= d * eps * max|lambda| are dropped (numpy's rank tolerance).
    """
    d = cov0.shape[0]
    diff = cov0 - cov1
    diff = 0.5 * (diff + diff.T)
    lam, q = np.linalg.eigh(diff)
    top = float(np.max(np.abs(lam))) if lam.size else 0.0
    keep = np.abs(lam) > d * np.finfo(np.float64).eps * top
    return q[:, keep], lam[keep]


def second_moment_factor(cov0: np.ndarray, cov1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Factor D = C0 - C1 = S J S^T on its numerical range.

    Returns (q, s_abs): Q_r [d, r] orthonormal eigenvectors kept and |Lambda_r|^{1/2} [r], so that
    S = Q_r diag(s_abs) and S^+ = diag(1 / s_abs) Q_r^T.
    """
    q, lam = second_moment_eig(cov0, cov1)
    return q, np.sqrt(np.abs(lam))


def second_moment_step(weight: np.ndarray, stats: Any, c2: float) -> tuple[np.ndarray, StepReport]:
    """Step 1: shrink the covariance disparity bound sum sigma_i(W S)^4 by the factor c2."""
    if c2 == 1.0:
        return weight.copy(), _skipped(c2, 4)
    q, s_abs = second_moment_factor(stats.cov0, stats.cov1)
    if s_abs.size == 0:
        return weight.copy(), _skipped(c2, 4)
    ws = (weight @ q) * s_abs  # W S, [m, r]
    u, sigma, vt = np.linalg.svd(ws, full_matrices=False)
    if not np.any(sigma > 0):
        return weight.copy(), _skipped(c2, 4, sigma, q.shape[1])
    a = (vt / s_abs) @ q.T  # V^T S^+, [p, d]
    k = np.maximum(_row_quadratic(a, stats.gram), 0.0)
    before = float(np.sum(sigma**4))
    target = before / c2
    pos = (k > 0) & (sigma > 0)
    scale = float(np.median(k[pos] / sigma[pos] ** 2)) if np.any(pos) else 1.0
    lam = solve_multiplier(lambda t: float(np.sum(cubic_shrink(sigma, k, t) ** 4)), target, scale)
    sigma_new = cubic_shrink(sigma, k, lam)
    new = weight + (u * (sigma_new - sigma)) @ a
    report = StepReport(True, float(c2), q.shape[1], sigma, sigma_new, k, lam, before, float(np.sum(sigma_new**4)))
    return new, report


def mean_gap_factor(delta: np.ndarray, eps: float) -> np.ndarray:
    """Lower Cholesky factor S of M = delta delta^T + eps I, [d, d]."""
    d = delta.shape[0]
    m = np.outer(delta, delta)
    m[np.diag_indices(d)] += eps
    return scipy.linalg.cholesky(m, lower=True, check_finite=False)


def first_moment_step(weight: np.ndarray, stats: Any, c1: float, eps: float) -> tuple[np.ndarray, StepReport]:
    """Step 2: shrink the mean disparity bound sum sigma_i(W S)^2 by the factor c1."""
    if c1 == 1.0:
        return weight.copy(), _skipped(c1, 2)
    delta = stats.mean0 - stats.mean1
    s = mean_gap_factor(delta, eps)
    ws = weight @ s
    u, sigma, vt = np.linalg.svd(ws, full_matrices=False)
    if not np.any(sigma > 0):
        return weight.copy(), _skipped(c1, 2, sigma, s.shape[0])
    # B = V^T S^{-1}: solve S^T B^T = V with S lower triangular.
    b = scipy.linalg.solve_triangular(s, vt.T, lower=True, trans="T", check_finite=False).T
    k = np.maximum(_row_quadratic(b, stats.gram), 0.0)
    before = float(np.sum(sigma**2))
    target = before / c1
    pos = k > 0
    scale = float(np.median(k[pos])) if np.any(pos) else 1.0
    lam = solve_multiplier(lambda t: float(np.sum(ridge_shrink(sigma, k, t) ** 2)), target, scale)
    sigma_new = ridge_shrink(sigma, k, lam)
    new = weight + (u * (sigma_new - sigma)) @ b
    report = StepReport(True, float(c1), s.shape[0], sigma, sigma_new, k, lam, before, float(np.sum(sigma_new**2)))
    return new, report


def esvd(weight: np.ndarray, stats: Any, *, c1: float = 15.0, c2: float = 150.0,
         eps: float = 1e-5) -> EsvdResult:
    """Run step 1 (second moment, c2) then step 2 (first moment, c1) on `weight: [m, d]`."""
    if c1 < 1 or c2 < 1:
        raise ValueError(f"c1 and c2 must be >= 1 (got c1={c1}, c2={c2})")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 so that delta delta^T + eps I is invertible (got {eps})")
    w = np.asarray(weight, dtype=np.float64)
    w1, second = second_moment_step(w, stats, float(c2))
    w2, first = first_moment_step(w1, stats, float(c1), float(eps))
    return EsvdResult(weight=w2, weight_step1=w1, second=second, first=first)


@dataclass(frozen=True)
class MomentGap:
    """The explainable-SVD view of one moment's between-group gap at a layer's output.

    Attributes:
        gap: first moment ||W delta||^2; second moment ||W D W^T||_F (D on its numerical range).
        bound: the SVD bound of `gap`: sum sigma_i(W S)^2 (first moment, = gap + eps ||W||_F^2) or
            ||W S||_{S4}^2 = (sum sigma_i^4)^(1/2) (second moment); gap <= bound.
        top_share: share of sum sigma^p (p = 2, 4) carried by the top `top` singular directions.
        relative: gap relative to the layer output's within-group spread: ||W delta||^2 / tr(W C W^T)
            or ||W D W^T||_F / ||W C W^T||_F, with C the pooled within-group covariance.
        sigma: the leading singular values of W S (at most `top`).
    """

    gap: float
    bound: float
    top_share: float
    relative: float
    sigma: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"gap": self.gap, "bound": self.bound, "top_share": self.top_share, "relative": self.relative,
                "top_sigma": list(self.sigma)}


def _share(power: np.ndarray, top: int) -> float:
    total = float(np.sum(power))
    return float(np.sum(power[:top]) / total) if total > 0 else 0.0


def disparity_view(weight: np.ndarray, stats: Any, *, eps: float = 1e-5,
                   top: int = 3) -> tuple[MomentGap, MomentGap]:
    """First- and second-moment gaps of the output of `W: [m, d]` and their SVD bounds (ALGORITHM.md).

    Returns (first moment, second moment).
    """
    w = np.asarray(weight, dtype=np.float64)
    pooled = ((stats.n0 - 1) * stats.cov0 + (stats.n1 - 1) * stats.cov1) / max(stats.n0 + stats.n1 - 2, 1)
    spread = w @ pooled @ w.T

    delta = stats.mean0 - stats.mean1
    wd = w @ delta
    gap1 = float(wd @ wd)
    sigma1 = np.linalg.svd(w @ mean_gap_factor(delta, eps), compute_uv=False)
    trace = float(np.trace(spread))
    first = MomentGap(gap=gap1, bound=gap1 + eps * float(np.sum(w * w)), top_share=_share(sigma1**2, top),
                      relative=gap1 / trace if trace > 0 else 0.0, sigma=tuple(float(v) for v in sigma1[:top]))

    q, lam = second_moment_eig(stats.cov0, stats.cov1)
    a = (w @ q) * np.sqrt(np.abs(lam))  # W S, [m, r]
    gap2 = float(np.linalg.norm((a * np.sign(lam)) @ a.T))
    bound2 = float(np.linalg.norm(a @ a.T))  # = (sum sigma^4)^(1/2); equal to gap2 when D is semidefinite
    sigma2 = np.linalg.svd(a, compute_uv=False) if a.size else np.zeros(0)
    norm_spread = float(np.linalg.norm(spread))
    second = MomentGap(gap=gap2, bound=bound2, top_share=_share(sigma2**4, top),
                       relative=gap2 / norm_spread if norm_spread > 0 else 0.0,
                       sigma=tuple(float(v) for v in sigma2[:top]))
    return first, second


# ---- refit.py ----

def solve(g0: Moments, g1: Moments, p: int, *, mode: RefitMode, alpha: float, fit_intercept: bool) -> RefitSolution:
    """Solve the ridge least squares (with the mean-parity constraint for `fair`) in closed form.

    fair:  min ||Z_c b - t_c||^2 + alpha n ||b||^2  s.t. (zbar_0 - zbar_1)^T b = 0, per output column,
    through the KKT system; plain: the same without the constraint. Without an intercept the
    uncentred moments are used instead of the centred ones.
    """
    pooled = g0.copy()
    pooled.merge(g1)
    n = pooled.n
    second = pooled.scatter if fit_intercept else pooled.gram()
    szz, szt = second[:p, :p], second[:p, p:]
    m = szt.shape[1]
    lhs = szz + alpha * n * np.eye(p)
    if mode == "fair":
        gap = g0.mean[:p] - g1.mean[:p]
        kkt = np.zeros((p + 1, p + 1))
        kkt[:p, :p] = lhs
        kkt[:p, p] = gap
        kkt[p, :p] = gap
        rhs = np.vstack([szt, np.zeros((1, m))])
        sol = scipy.linalg.lstsq(kkt, rhs, check_finite=False, lapack_driver="gelsd")[0]
        beta = sol[:p]
    elif mode == "plain":
        beta = scipy.linalg.lstsq(lhs, szt, check_finite=False, lapack_driver="gelsd")[0]
    else:
        raise ValueError(f"unknown refit mode {mode!r}")
    intercept = (pooled.mean[p:] - pooled.mean[:p] @ beta) if fit_intercept else None
    return RefitSolution(coef=beta.T.copy(), intercept=intercept)


def validation_mse(sol: RefitSolution, val: Moments, p: int) -> float:
    """Mean squared error of `sol` on rows summarised by `val` (moments of [z, t]), averaged over outputs."""
    if val.n == 0:
        return float("nan")
    beta = sol.coef.T
    m = beta.shape[1]
    a = np.vstack([beta, -np.eye(m)])
    bias = sol.intercept if sol.intercept is not None else np.zeros(m)
    mean_err = val.mean[:p] @ beta - val.mean[p:] + bias
    spread = np.einsum("ij,ij->j", val.scatter @ a, a) / val.n
    return float(np.mean(mean_err**2 + spread))


def fit(acc: Any, *, mode: RefitMode, ridge: float | Literal["auto"], fit_intercept: bool,
        target_kind: str) -> tuple[RefitSolution, Any]:
    """Choose the ridge term (if `ridge == "auto"`) on the validation part, then fit on all fit rows."""
    p = acc.p
    scores: dict[float, float] = {}
    if ridge == "auto":
        t0, t1 = acc.groups(("train",))
        v0, v1 = acc.groups(("val",))
        val = v0.copy()
        val.merge(v1)
        if min(t0.n, t1.n) >= 2 and val.n >= 10:
            for a in _RIDGE_GRID:
                scores[a] = validation_mse(solve(t0, t1, p, mode=mode, alpha=a, fit_intercept=fit_intercept), val, p)
            finite = {a: s for a, s in scores.items() if np.isfinite(s)}
            alpha = min(finite, key=finite.get) if finite else _FALLBACK_RIDGE
            source = "auto"
        else:
            alpha, source = _FALLBACK_RIDGE, "fallback (too few rows to choose)"
    else:
        alpha, source = float(ridge), "fixed"
    g0, g1 = acc.groups(("train", "val"))
    sol = solve(g0, g1, p, mode=mode, alpha=alpha, fit_intercept=fit_intercept)
    gap = (g0.mean[:p] - g1.mean[:p]) @ sol.coef.T
    report = dict(mode=mode, target=target_kind, alpha=alpha, alpha_source=source, validation_mse=scores,
                         fit_rows=g0.n + g1.n, parity_gap=float(np.max(np.abs(gap))) if gap.size else 0.0)
    return sol, report


# ---- metrics.py ----


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
