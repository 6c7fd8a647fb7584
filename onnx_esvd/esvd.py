"""The two explainable-SVD steps of ALGORITHM.md, on arrays only (no ONNX here).

Conventions: `W: [m, d] float64` maps a layer input `x: [d]` to `W x`; statistics come from
`LayerStats` (group means, unbiased group covariances, uncentred Gram matrix of both groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.linalg
import scipy.optimize

from .errors import OptionError
from .stats import LayerStats


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


def second_moment_step(weight: np.ndarray, stats: LayerStats, c2: float) -> tuple[np.ndarray, StepReport]:
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
    try:
        return scipy.linalg.cholesky(m, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise OptionError(f"--eps {eps:g} is too small for this layer: delta delta^T + eps I is not positive "
                          "definite in float64; use a larger --eps (default 1e-5)") from None


def first_moment_step(weight: np.ndarray, stats: LayerStats, c1: float, eps: float) -> tuple[np.ndarray, StepReport]:
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


def esvd(weight: np.ndarray, stats: LayerStats, *, c1: float = 15.0, c2: float = 150.0,
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


def disparity_view(weight: np.ndarray, stats: LayerStats, *, eps: float = 1e-5,
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
