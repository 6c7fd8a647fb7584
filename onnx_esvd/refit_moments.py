"""Exact mean AND variance parity refit of the final linear node, from streamed moments.

The final node computes `out = coef @ z + intercept` (`coef: [m, p]`). Like the `fair` refit of
`onnx_esvd.refit`, this refit needs only the per-group moments of `u = [z, t]` (`z: [p]` node input,
`t: [m]` refit target), so memory is O((p + m)^2) whatever the number of rows.

Problem, one output column at a time (`beta: [p]`, `r: [p]` the column of `Szt`):

    minimise   beta^T A beta - 2 r^T beta,         A = Szz + alpha_eff * n * I
    subject to d^T beta = 0                        (equal group output means, d = zbar_0 - zbar_1)
               beta^T D beta = kappa * g0          (D = C_0 - C_1, unbiased covariances of z)

where `g0` is the variance gap `beta^T D beta` of the mean-parity (`fair`) solution: `kappa = 1`
gives back `fair`, `kappa = 0` asks for equal group output variances. The problem is non-convex but
is solved to global optimality: in an orthonormal basis `P` of the complement of `d`, with
`Abar = P^T A P = L L^T`, `L^{-1} (P^T D P) L^{-T} = V diag(l) V^T` and `s = V^T L^{-1} P^T r`, the
Lagrangian minimiser for the multiplier mu is `c(mu) = L^{-T} V (s / (1 + mu l))` wherever
`Abar + mu Dbar` is positive definite, and `q(mu) = sum l_i s_i^2 / (1 + mu l_i)^2` falls strictly
across that interval. A bracketed root search (geometric bracket, then Brent) finds the one root of
`q(mu) = kappa g0`; the degenerate ends (unbounded interval, or a pole whose direction `r` does not
excite) are solved in closed form. Any feasible beta then has `f(beta) >= L(c(mu*), mu*)`.

Groups: exact for k = 2 only. With k > 2 groups one multiplier no longer suffices (one quadratic
constraint per group); `solve_moments` refuses k > 2 with an OptionError and the caller should use
the row-based penalised refit (`onnx_esvd.penalty`, whose pair-weighted penalty covers k groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.linalg
import scipy.optimize

from .errors import DataError, OptionError
from .refit import RefitSolution
from .stats import Moments

#: Ridge floor relative to the mean diagonal of the pooled second moment `Szz / n`: the ridge used is
#: `max(alpha, RIDGE_FLOOR * trace(Szz) / (p n))`. An unregularised exact solution put weights near 2e3
#: on a real network and broke once written in float32.
RIDGE_FLOOR = 1e-7

_EPS = np.finfo(np.float64).eps


@dataclass(frozen=True)
class MomentsDiagnostics:
    """Per output column: the fair solution's variance gap `g0: [m]`, the target `kappa * g0`, the
    multiplier `mu: [m]` (inf: limit case; nan: nothing to do), the case solved (`cases: [m]`) and the
    ridge actually used (`alpha_used`, after the floor)."""

    g0: np.ndarray
    target: np.ndarray
    mu: np.ndarray
    cases: tuple[str, ...]
    alpha_used: float


def _validate(groups: Sequence[Moments], p: int, kappa: float, weights: Sequence[float] | None) -> None:
    if len(groups) != 2:
        raise OptionError(f"the mean+variance parity refit is exact for 2 groups only, got {len(groups)}: "
                          "use the penalised refit (kind 'cdf' or 'w2') for more groups")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(groups),) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise OptionError(f"group weights {list(np.ravel(w))} must be {len(groups)} positive numbers")
    if not np.isfinite(kappa) or kappa < 0 or kappa > 1:
        raise OptionError(f"kappa={kappa!r} is outside [0, 1]: 0 asks for equal group output variances, 1 keeps the "
                          "mean-parity (fair) variance gap; kappa > 1 would widen that gap and is refused")
    for g, mo in enumerate(groups):
        if mo.dim <= p:
            raise DataError(f"group {g} moments have width {mo.dim}, need p + m > p = {p} (inputs then targets)")
        if mo.n < 2:
            raise DataError(f"group {g} has {mo.n} row(s): the variance parity refit needs at least 2 rows per group")
    if groups[0].dim != groups[1].dim:
        raise DataError(f"group moments differ in width ({groups[0].dim} vs {groups[1].dim})")


def _complement_basis(d: np.ndarray) -> np.ndarray:
    """Orthonormal basis `[p, p - 1]` of the complement of `d: [p]` (identity `[p, p]` when d == 0)."""
    p = d.shape[0]
    norm = np.linalg.norm(d)
    if norm == 0.0:
        return np.eye(p)
    q = np.linalg.qr(d.reshape(p, 1), mode="complete")[0]
    return q[:, 1:]


def _root(ell: np.ndarray, s: np.ndarray, target: float) -> tuple[np.ndarray, float, str]:
    """Whitened solution `y` with `sum l_i y_i^2 = target`, where `q(0) = sum l_i s_i^2 > target >= 0`.

    Returns (y, mu, case). `ell` has exact zeros where the eigenvalue is below round-off.
    """
    s2 = s * s

    def q(mu: float) -> float:
        return float(np.sum(ell * s2 / (1.0 + mu * ell) ** 2))

    def h(mu: float) -> float:
        return q(mu) - target

    lmin = float(ell.min())
    if lmin < 0.0:  # the PD interval ends at a pole mu_e = -1 / lmin
        mu_e = -1.0 / lmin
        hi = None
        for k in range(1, 53):  # mu_e (1 - 2^-52) is the last float below the pole
            cand = mu_e * (1.0 - 2.0 ** -k)
            if h(cand) <= 0.0:
                hi = cand
                break
        if hi is not None:
            mu = scipy.optimize.brentq(h, 0.0, hi, xtol=1e-300, rtol=4 * _EPS, maxiter=500)
            return s / (1.0 + mu * ell), mu, "root"
        # hard case: r does not excite the pole's direction(s); solve at the pole, add the null direction
        pole = np.abs(ell - lmin) <= 8 * _EPS * np.abs(ell).max()
        y = np.where(pole, 0.0, s / np.where(pole, 1.0, 1.0 + mu_e * ell))
        rest = float(np.sum(ell * y * y))
        extra = max(rest - target, 0.0) / -lmin
        y[np.flatnonzero(pole)[0]] = np.sqrt(extra)
        return y, mu_e, "pole"
    # interval unbounded above: q falls to its limit 0 (only l_i >= 0 terms) as mu -> inf
    positive = ell > 0.0
    if target > 0.0:
        mu_hi = 1.0 / float(ell[positive].max())
        for _ in range(2000):
            if h(mu_hi) <= 0.0:
                mu = scipy.optimize.brentq(h, 0.0, mu_hi, xtol=1e-300, rtol=4 * _EPS, maxiter=500)
                return s / (1.0 + mu * ell), mu, "root"
            mu_hi *= 2.0
    # target 0 with D semidefinite on d's complement: the limit keeps only the l_i = 0 components
    return np.where(positive, 0.0, s), float("inf"), "limit"


def solve_moments(groups: Sequence[Moments], p: int, *, alpha: float, fit_intercept: bool, kappa: float,
                  weights: Sequence[float] | None = None, return_diagnostics: bool = False
                  ) -> RefitSolution | tuple[RefitSolution, MomentsDiagnostics]:
    """Ridge least squares refit with exact output mean parity and (scaled) variance parity, k = 2.

    Args:
        groups: per-group `Moments` of `[z, t]` (width p + m), as `RefitAccumulator.groups` returns.
        p: width of the node input z; the remaining m columns are targets.
        alpha: ridge term (as in `refit.solve`: `alpha * n * ||beta||^2`), floored at `RIDGE_FLOOR` relative.
        fit_intercept: True: centred pooled second moment and intercept `tbar - zbar^T beta`;
            False: uncentred second moment and no intercept (the node has no bias).
        kappa: in [0, 1]; the variance gap kept, as a share of the fair solution's gap (0: equal
            group output variances; 1: the fair solution). kappa > 1 would widen the gap: refused.
        weights: accepted for symmetry with the k-group refits; with two groups the exact constraints
            do not depend on group weights, so they are only validated.
        return_diagnostics: also return a `MomentsDiagnostics`.

    Returns:
        `RefitSolution(coef: [m, p] float64, intercept: [m] float64 or None)`.

    Raises:
        OptionError: kappa outside [0, 1], more than 2 groups, bad weights.
        DataError: a group with fewer than 2 rows, or inconsistent widths.
    """
    _validate(groups, p, kappa, weights)
    g0m, g1m = groups
    pooled = g0m.copy()
    pooled.merge(g1m)
    n = pooled.n
    second = pooled.scatter if fit_intercept else pooled.gram()
    szz, szt = second[:p, :p], second[:p, p:]
    m = szt.shape[1]
    floor = RIDGE_FLOOR * float(np.trace(szz)) / (p * n)
    alpha_used = max(float(alpha), floor) if floor > 0 else max(float(alpha), RIDGE_FLOOR)
    a = szz + alpha_used * n * np.eye(p)
    d = g0m.mean[:p] - g1m.mean[:p]
    dmat = g0m.covariance()[:p, :p] - g1m.covariance()[:p, :p]

    basis = _complement_basis(d)                      # [p, p']
    abar = basis.T @ a @ basis
    chol = scipy.linalg.cholesky(abar, lower=True, check_finite=False)
    half = scipy.linalg.solve_triangular(chol, basis.T @ dmat @ basis, lower=True, check_finite=False)
    whitened = scipy.linalg.solve_triangular(chol, half.T, lower=True, check_finite=False)
    whitened = 0.5 * (whitened + whitened.T)          # L^{-1} Dbar L^{-T}
    ell, vecs = np.linalg.eigh(whitened)
    # eigenvalues of the gap below the round-off of C_0 - C_1 itself (relative to C_0 + C_1) are zero
    csum = basis.T @ (g0m.covariance()[:p, :p] + g1m.covariance()[:p, :p]) @ basis
    csum_w = scipy.linalg.solve_triangular(chol, scipy.linalg.solve_triangular(chol, csum, lower=True).T, lower=True)
    tol = 8 * max(ell.size, 1) * _EPS * max(np.linalg.norm(csum_w), np.abs(ell).max(initial=0.0))
    ell = np.where(np.abs(ell) <= tol, 0.0, ell)
    rhs = scipy.linalg.solve_triangular(chol, basis.T @ szt, lower=True, check_finite=False)
    s_all = vecs.T @ rhs                              # [p', m]

    ys = np.empty_like(s_all)
    g0s, targets, mus, cases = np.zeros(m), np.zeros(m), np.full(m, np.nan), []
    for j in range(m):
        s = s_all[:, j]
        g0 = float(np.sum(ell * s * s))
        scale = float(np.sum(np.abs(ell) * s * s))
        g0s[j], targets[j] = g0, kappa * g0
        if scale == 0.0 or abs(g0) <= 64 * _EPS * scale or kappa == 1.0:
            ys[:, j], mus[j] = s, 0.0
            cases.append("fair")
            continue
        sign = 1.0 if g0 > 0 else -1.0              # flip D so that the fair gap is positive
        y, mu, case = _root(sign * ell, s, sign * kappa * g0)
        ys[:, j], mus[j] = y, sign * mu
        cases.append(case)
    coefs = scipy.linalg.solve_triangular(chol, vecs @ ys, lower=True, trans="T", check_finite=False)
    beta = basis @ coefs                              # [p, m]
    intercept = (pooled.mean[p:] - pooled.mean[:p] @ beta) if fit_intercept else None
    sol = RefitSolution(coef=beta.T.copy(), intercept=intercept)
    if return_diagnostics:
        return sol, MomentsDiagnostics(g0=g0s, target=targets, mu=mus, cases=tuple(cases), alpha_used=alpha_used)
    return sol


def group_output_stats(sol: RefitSolution, groups: Sequence[Moments], p: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group output mean and standard deviation of a refitted node, from the moments of `[z, t]`.

    Returns `(mean: [k, m], std: [k, m])` float64; std is unbiased (`sqrt(coef C_g coef^T)`, C_g divides
    by n_g - 1) and nan for a group with fewer than 2 rows.
    """
    coef = np.asarray(sol.coef, dtype=np.float64)
    bias = np.zeros(coef.shape[0]) if sol.intercept is None else np.asarray(sol.intercept, dtype=np.float64)
    means, stds = [], []
    for mo in groups:
        means.append(coef @ mo.mean[:p] + bias)
        if mo.n >= 2:
            cov = mo.scatter[:p, :p] / (mo.n - 1)
            var = np.einsum("ij,jk,ik->i", coef, cov, coef)
            stds.append(np.sqrt(np.maximum(var, 0.0)))
        else:
            stds.append(np.full(coef.shape[0], np.nan))
    return np.array(means), np.array(stds)
