"""The two explainable-SVD steps of ALGORITHM.md for k >= 2 groups, on arrays only (no ONNX here).

Conventions: `W: [m, d] float64` maps a layer input `x: [d]` to `W x`; statistics come from
`GroupStats` (group means, unbiased group covariances, uncentred Gram matrix of all rows). Group
weights `w_g` ("size": n_g / n, "equal": 1 / k), `tau = sum_{g<h} w_g w_h`, pair weights
`omega_gh = w_g w_h / tau`. For k = 2 every factor is built exactly as in the binary method
(`eig(C_0 - C_1)`, `delta delta^T`), so the result does not depend on the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import OptionError
from .stats import GroupStats, GroupWeights, median


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
    t = brent_root(f, lo, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
    return float(np.exp(t))


def brent_root(f: Callable[[float], float], a: float, b: float, *, xtol: float, rtol: float,
               maxiter: int = 500) -> float:
    """A root of `f` in the bracket [a, b] (f(a), f(b) of opposite signs) by Brent's method.

    The same iteration as scipy.optimize.brentq (inverse quadratic interpolation, secant or bisection),
    step for step, so results match it to the last bit; kept here so that `repair` never imports scipy.
    """
    xpre, xcur = float(a), float(b)
    xblk = fblk = spre = scur = 0.0
    fpre, fcur = float(f(xpre)), float(f(xcur))
    if fpre == 0.0:
        return xpre
    if fcur == 0.0:
        return xcur
    if np.signbit(fpre) == np.signbit(fcur):
        raise ValueError("brent_root: f(a) and f(b) must have opposite signs")
    for _ in range(maxiter):
        if fpre != 0.0 and fcur != 0.0 and np.signbit(fpre) != np.signbit(fcur):
            xblk, fblk = xpre, fpre
            spre = scur = xcur - xpre
        if abs(fblk) < abs(fcur):
            xpre, xcur, xblk = xcur, xblk, xcur
            fpre, fcur, fblk = fcur, fblk, fcur
        delta = (xtol + rtol * abs(xcur)) / 2
        sbis = (xblk - xcur) / 2
        if fcur == 0.0 or abs(sbis) < delta:
            return xcur
        if abs(spre) > delta and abs(fcur) < abs(fpre):
            if xpre == xblk:  # interpolate
                stry = -fcur * (xcur - xpre) / (fcur - fpre)
            else:  # extrapolate
                dpre = (fpre - fcur) / (xpre - xcur)
                dblk = (fblk - fcur) / (xblk - xcur)
                stry = -fcur * (fblk * dblk - fpre * dpre) / (dblk * dpre * (fblk - fpre))
            if 2 * abs(stry) < min(abs(spre), 3 * abs(sbis) - delta):  # a good short step
                spre, scur = scur, stry
            else:
                spre = scur = sbis
        else:
            spre = scur = sbis
        xpre, fpre = xcur, fcur
        xcur += scur if abs(scur) > delta else (delta if sbis > 0 else -delta)
        fcur = float(f(xcur))
    raise FloatingPointError(f"brent_root did not converge in {maxiter} iterations")


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


#: `thin_svd` goes through the Gram matrix from this many singular values on (below, LAPACK's SVD is cheap).
GRAM_FROM = 256


def thin_svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD `a = U diag(sigma) V^T` of `a: [m, r]`; from min(m, r) >= GRAM_FROM through the eigendecomposition
    of the smaller Gram matrix, below it LAPACK's SVD.

    Returns (U [m, p], sigma [p] descending, V^T [p, r]), p = min(m, r). For r <= m: `a^T a = V diag(sigma^2) V^T`
    (eigh), `U = a V / sigma` (columns with sigma = 0 are 0); else the same from `a a^T`. About half the cost
    of LAPACK's SVD at d = 1024. Squaring loses the relative accuracy of the smallest singular values, but the
    ESVD steps only use them through `U diag(sigma~ - sigma)`, where such directions change nothing: on the
    fixtures' real (rank-deficient) layers both steps agree with the SVD route to 7e-12 relative (the test
    pins 1e-9), but not to the last bits, so small problems (and the k = 2 vs binary check at 1e-12) keep the
    SVD. Not used where the spec forbids the round trip (the k-group stacked factor).
    """
    m, r = a.shape
    if min(m, r) < GRAM_FROM:
        return np.linalg.svd(a, full_matrices=False)
    tall = r <= m
    lam, vec = np.linalg.eigh(a.T @ a if tall else a @ a.T)
    lam, vec = lam[::-1], vec[:, ::-1]
    sigma = np.sqrt(np.maximum(lam, 0.0))
    live = sigma > 0
    inv = np.divide(1.0, sigma, out=np.zeros_like(sigma), where=live)
    if tall:
        return (a @ vec) * inv, sigma, np.ascontiguousarray(vec.T)
    return np.ascontiguousarray(vec), sigma, (vec.T @ a) * inv[:, None]


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


def pair_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs g < h of k groups and their weights omega_gh = w_g w_h / tau (summing to 1).

    Returns (first [K], second [K], omega [K]) with K = k (k - 1) / 2, pairs in lexicographic order.
    """
    g, h = np.triu_indices(w.shape[0], 1)
    prod = w[g] * w[h]
    return g, h, prod / prod.sum()


_PairEig = tuple[int, int, float, np.ndarray, np.ndarray]  # (g, h, omega_gh, Q_r, Lambda_r)


def pooled_second_moment_factor(stats: GroupStats, weights: GroupWeights = "size") -> tuple[np.ndarray, np.ndarray]:
    """Factor S = U_r diag(s_r) of P = sum_{g<h} omega_gh |C_g - C_h| (ALGORITHM.md, more than two groups).

    k = 2: exactly `second_moment_factor(C_0, C_1)` (eigenvectors of C_0 - C_1, any weights). k >= 3: the
    pairwise factors S_gh = Q_r |Lambda_r|^{1/2} (binary tolerance each) are stacked as
    [sqrt(omega_gh) S_gh] (d x R), whose thin SVD U s R^T gives U_r, s_r for s^2 > d eps max s^2; P is
    never formed. Returns (U_r [d, r] orthonormal, s_r [r] > 0): S = U_r diag(s_r), S^+ = diag(1/s_r) U_r^T.
    """
    if stats.k == 2:
        return second_moment_factor(stats.covs[0], stats.covs[1])
    return _stacked_factor(stats.dim, _pair_eigs(stats, weights))


def _pair_eigs(stats: GroupStats, weights: GroupWeights) -> list[_PairEig]:
    """(g, h, omega_gh, Q_r [d, r], Lambda_r [r]) of D_gh = C_g - C_h for every pair g < h."""
    return [(int(g), int(h), float(om), *second_moment_eig(stats.covs[g], stats.covs[h]))
            for g, h, om in zip(*pair_weights(stats.weights(weights)))]


def _stacked_factor(d: int, pairs: list[_PairEig]) -> tuple[np.ndarray, np.ndarray]:
    """Thin SVD of the stacked [sqrt(omega_gh) Q_r |Lambda_r|^{1/2}] (d x R), cut at s^2 > d eps max s^2."""
    blocks = [q * np.sqrt(om * np.abs(lam)) for _, _, om, q, lam in pairs if lam.size]
    if not blocks:
        return np.zeros((d, 0)), np.zeros(0)
    u, s, _ = np.linalg.svd(np.hstack(blocks), full_matrices=False)
    sq = s * s
    keep = sq > d * np.finfo(np.float64).eps * float(sq.max())
    return u[:, keep], s[keep]


def second_moment_step(weight: np.ndarray, stats: GroupStats, c2: float,
                       weights: GroupWeights = "size") -> tuple[np.ndarray, StepReport]:
    """Step 1: shrink the covariance disparity bound sum sigma_i(W S)^4 by the factor c2 (S: pooled factor)."""
    if c2 == 1.0:
        return weight.copy(), _skipped(c2, 4)
    q, s_abs = pooled_second_moment_factor(stats, weights)
    if s_abs.size == 0:
        return weight.copy(), _skipped(c2, 4)
    ws = (weight @ q) * s_abs  # W S, [m, r]
    u, sigma, vt = thin_svd(ws)
    if not np.any(sigma > 0):
        return weight.copy(), _skipped(c2, 4, sigma, q.shape[1])
    a = (vt / s_abs) @ q.T  # V^T S^+, [p, d]
    k = np.maximum(_row_quadratic(a, stats.gram), 0.0)
    before = float(np.sum(sigma**4))
    target = before / c2
    pos = (k > 0) & (sigma > 0)
    scale = median(k[pos] / sigma[pos] ** 2) if np.any(pos) else 1.0
    lam = solve_multiplier(lambda t: float(np.sum(cubic_shrink(sigma, k, t) ** 4)), target, scale)
    sigma_new = cubic_shrink(sigma, k, lam)
    new = weight + (u * (sigma_new - sigma)) @ a
    report = StepReport(True, float(c2), q.shape[1], sigma, sigma_new, k, lam, before, float(np.sum(sigma_new**4)))
    return new, report


@dataclass(frozen=True)
class MeanGapRoot:
    """M = B + eps I through its symmetric square root S = M^(1/2), never formed ([d, d] products cost O(d q)).

    B = Delta^T Delta with Delta: [q, d] (q = 1 for two groups: B = delta delta^T). With Delta Delta^T =
    R diag(lam) R^T and P = R^T Delta: [q, d] (orthogonal rows of squared norms lam),
    S = sqrt(eps) I + P^T diag(a) P and S^-1 = I / sqrt(eps) - P^T diag(b) P, where
    a = 1 / (sqrt(eps + lam) + sqrt(eps)) and b = a / sqrt(eps (eps + lam)) (no division by lam, so a rank
    deficient Delta needs nothing special). Any factor of M gives the same first-moment step (S Q for an
    orthogonal Q rotates V and leaves U, sigma and V^T S^-1 unchanged); this one replaces a Cholesky
    factor, a [d, d] product and an LU solve.

    Attributes:
        root_eps: sqrt(eps).
        p: P, [q, d].
        a, b: [q] the coefficients above.
    """

    root_eps: float
    p: np.ndarray
    a: np.ndarray
    b: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.p.shape[1])

    def times(self, w: np.ndarray) -> np.ndarray:
        """W S for `w: [m, d]`."""
        return self.root_eps * w + ((w @ self.p.T) * self.a) @ self.p

    def solve(self, v: np.ndarray) -> np.ndarray:
        """V S^-1 for `v: [r, d]`."""
        return v / self.root_eps - ((v @ self.p.T) * self.b) @ self.p

    def matrix(self) -> np.ndarray:
        """S, [d, d] (for checks and small problems)."""
        return self.times(np.eye(self.dim))


@dataclass(frozen=True)
class MeanGapCholesky:
    """M = B + eps I through its lower Cholesky factor L (the spec's S), for small d: `l: [d, d]`."""

    l: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.l.shape[0])

    def times(self, w: np.ndarray) -> np.ndarray:
        """W S for `w: [m, d]`."""
        return w @ self.l

    def solve(self, v: np.ndarray) -> np.ndarray:
        """V S^-1 for `v: [r, d]` (S^T X^T = V^T: LU of a triangular matrix, so back-substitution)."""
        return np.linalg.solve(self.l.T, v.T).T


def mean_gap_factor(delta: np.ndarray, eps: float) -> MeanGapRoot | MeanGapCholesky:
    """A factor S of M = B + eps I (S S^T = M): the symmetric square root (`MeanGapRoot`) from d >= GRAM_FROM,
    below it the lower Cholesky factor (the spec's route, and round 1's bits; both give the same step).

    `delta: [d]` gives B = delta delta^T (two groups); `delta: [q, d]` (the stacked Delta) gives
    B = Delta^T Delta. Refuses an `eps` below the rounding of B's largest eigenvalue (M is then singular in
    float64).
    """
    rows = np.atleast_2d(np.asarray(delta, dtype=np.float64))
    d = rows.shape[1]
    lam, r = np.linalg.eigh(rows @ rows.T)
    lam = np.maximum(lam, 0.0)
    top = float(lam.max()) if lam.size else 0.0
    refuse = OptionError(f"--eps {eps:g} is too small for this layer: delta delta^T + eps I is not positive "
                         "definite in float64; use a larger --eps (default 1e-5)")
    if not eps > np.finfo(np.float64).eps * top:
        raise refuse
    if d < GRAM_FROM:
        m = rows.T @ rows
        m[np.diag_indices(d)] += eps
        try:
            return MeanGapCholesky(np.linalg.cholesky(m))
        except np.linalg.LinAlgError:
            raise refuse from None
    root = float(np.sqrt(eps))
    a = 1.0 / (np.sqrt(eps + lam) + root)
    with np.errstate(over="ignore"):
        b = a / (root * np.sqrt(eps + lam))
    if not np.all(np.isfinite(b)):  # ~eps^-1.5 past float64's range: S^-1 cannot be applied
        raise refuse
    return MeanGapRoot(root, r.T @ rows, a, b)


def mean_gap_rows(stats: GroupStats, weights: GroupWeights = "size") -> np.ndarray:
    """The first moment's gap: `delta = mu_0 - mu_1: [d]` for k = 2, else Delta: [k, d] with rows
    sqrt(w_g / tau) (mu_g - mubar), mubar = sum w_g mu_g, so that Delta^T Delta =
    sum_{g<h} omega_gh (mu_g - mu_h)(mu_g - mu_h)^T (= delta delta^T at k = 2)."""
    if stats.k == 2:
        return stats.means[0] - stats.means[1]
    w = stats.weights(weights)
    tau = 0.5 * (1.0 - float(np.sum(w * w)))
    return np.sqrt(w / tau)[:, None] * (stats.means - w @ stats.means)


def first_moment_step(weight: np.ndarray, stats: GroupStats, c1: float, eps: float,
                      weights: GroupWeights = "size") -> tuple[np.ndarray, StepReport]:
    """Step 2: shrink the mean disparity bound sum sigma_i(W S)^2 by the factor c1."""
    if c1 == 1.0:
        return weight.copy(), _skipped(c1, 2)
    s = mean_gap_factor(mean_gap_rows(stats, weights), eps)
    u, sigma, vt = thin_svd(s.times(weight))
    if not np.any(sigma > 0):
        return weight.copy(), _skipped(c1, 2, sigma, s.dim)
    b = s.solve(vt)  # B = V^T S^-1
    k = np.maximum(_row_quadratic(b, stats.gram), 0.0)
    before = float(np.sum(sigma**2))
    target = before / c1
    pos = k > 0
    scale = median(k[pos]) if np.any(pos) else 1.0
    lam = solve_multiplier(lambda t: float(np.sum(ridge_shrink(sigma, k, t) ** 2)), target, scale)
    sigma_new = ridge_shrink(sigma, k, lam)
    new = weight + (u * (sigma_new - sigma)) @ b
    report = StepReport(True, float(c1), s.dim, sigma, sigma_new, k, lam, before, float(np.sum(sigma_new**2)))
    return new, report


def esvd(weight: np.ndarray, stats: GroupStats, *, c1: float = 15.0, c2: float = 150.0,
         eps: float = 1e-5, weights: GroupWeights = "size") -> EsvdResult:
    """Run step 1 (second moment, c2) then step 2 (first moment, c1) on `weight: [m, d]`, k >= 2 groups.

    `weights`: group weights "size" (n_g / n) or "equal" (1 / k); no effect for k = 2.
    """
    if c1 < 1 or c2 < 1:
        raise ValueError(f"c1 and c2 must be >= 1 (got c1={c1}, c2={c2})")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 so that delta delta^T + eps I is invertible (got {eps})")
    stats.weights(weights)  # validates the name
    w = np.asarray(weight, dtype=np.float64)
    w1, second = second_moment_step(w, stats, float(c2), weights)
    w2, first = first_moment_step(w1, stats, float(c1), float(eps), weights)
    return EsvdResult(weight=w2, weight_step1=w1, second=second, first=first)


@dataclass(frozen=True)
class MomentGap:
    """The explainable-SVD view of one moment's between-group gap at a layer's output.

    Attributes:
        gap: first moment ||W Delta^T||_F^2 = sum_{g<h} omega_gh ||W (mu_g - mu_h)||^2 (k = 2: ||W delta||^2);
            second moment max_{g<h} omega_gh ||W D_gh W^T||_F with D_gh = C_g - C_h on its numerical
            range (k = 2: ||W D W^T||_F).
        bound: the SVD bound of `gap`: sum sigma_i(W S)^2 (first moment, = gap + eps ||W||_F^2) or
            ||W S||_{S4}^2 = (sum sigma_i^4)^(1/2) with S the pooled factor (second moment); gap <= bound.
        top_share: share of sum sigma^p (p = 2, 4) carried by the top `top` singular directions.
        relative: gap relative to the layer output's within-group spread: gap / tr(W C W^T) (first moment)
            or gap / ||W C W^T||_F (second), with C the pooled within-group covariance
            sum_g (n_g - 1) C_g / (n - k).
        sigma: the leading singular values of W S (at most `top`).
        pair: second moment with k >= 3 groups: the labels of the pair attaining `gap`; else None.
    """

    gap: float
    bound: float
    top_share: float
    relative: float
    sigma: tuple[float, ...]
    pair: tuple[str, str] | None = None

    def to_dict(self) -> dict:
        out = {"gap": self.gap, "bound": self.bound, "top_share": self.top_share, "relative": self.relative,
               "top_sigma": list(self.sigma)}
        if self.pair is not None:
            out["pair"] = list(self.pair)
        return out


def _share(power: np.ndarray, top: int) -> float:
    total = float(np.sum(power))
    return float(np.sum(power[:top]) / total) if total > 0 else 0.0


def disparity_view(weight: np.ndarray, stats: GroupStats, *, eps: float = 1e-5, top: int = 3,
                   weights: GroupWeights = "size") -> tuple[MomentGap, MomentGap]:
    """First- and second-moment gaps of the output of `W: [m, d]` and their SVD bounds (ALGORITHM.md).

    k >= 2 groups; for k = 2 the values are the binary ones (and do not depend on `weights`).
    Returns (first moment, second moment).
    """
    w = np.asarray(weight, dtype=np.float64)
    n, covs, k = stats.counts, stats.covs, stats.k
    pooled = (int(n[0]) - 1) * covs[0]
    for g in range(1, k):
        pooled = pooled + (int(n[g]) - 1) * covs[g]
    pooled = pooled / max(int(n.sum()) - k, 1)
    spread = w @ pooled @ w.T

    rows = mean_gap_rows(stats, weights)
    if rows.ndim == 1:
        wd = w @ rows
        gap1 = float(wd @ wd)
    else:
        wd = w @ rows.T
        gap1 = float(np.sum(wd * wd))
    sigma1 = np.linalg.svd(mean_gap_factor(rows, eps).times(w), compute_uv=False)
    trace = float(np.trace(spread))
    first = MomentGap(gap=gap1, bound=gap1 + eps * float(np.sum(w * w)), top_share=_share(sigma1**2, top),
                      relative=gap1 / trace if trace > 0 else 0.0, sigma=tuple(float(v) for v in sigma1[:top]))

    pair = None
    if k == 2:
        q, lam = second_moment_eig(covs[0], covs[1])
        a = (w @ q) * np.sqrt(np.abs(lam))  # W S, [m, r]
        gap2 = float(np.linalg.norm((a * np.sign(lam)) @ a.T))
    else:
        gap2 = 0.0
        eigs = _pair_eigs(stats, weights)
        for g, h, om, qg, lg in eigs:
            b = w @ qg
            value = om * float(np.linalg.norm((b * lg) @ b.T))
            if pair is None or value > gap2:
                gap2, pair = value, (stats.labels[g], stats.labels[h])
        q, s_abs = _stacked_factor(stats.dim, eigs)
        a = (w @ q) * s_abs
    bound2 = float(np.linalg.norm(a @ a.T))  # = (sum sigma^4)^(1/2); k = 2: equal to gap2 when D is semidefinite
    sigma2 = np.linalg.svd(a, compute_uv=False) if a.size else np.zeros(0)
    norm_spread = float(np.linalg.norm(spread))
    second = MomentGap(gap=gap2, bound=bound2, top_share=_share(sigma2**4, top),
                       relative=gap2 / norm_spread if norm_spread > 0 else 0.0,
                       sigma=tuple(float(v) for v in sigma2[:top]), pair=pair)
    return first, second
