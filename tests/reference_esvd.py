"""Slow, plain reference implementation of ALGORITHM.md steps 1, 2 and the step-3 refit.

This module is a test oracle. It deliberately does NOT import anything from `onnx_esvd` and it follows
the spec's formulas through different numerical routes than `onnx_esvd/esvd.py` and `onnx_esvd/refit.py`:

* statistics come straight from the raw rows (`np.cov`, `x.mean`, `X^T X`), not from streamed moments;
* step 1 builds `S = Q_r |Lambda_r|^{1/2}` as an explicit `[d, r]` matrix (eigenvectors from
  `scipy.linalg.eigh` with the QR-iteration driver) and takes `S^+ = np.linalg.pinv(S)`;
* step 2 inverts the Cholesky factor explicitly (`np.linalg.inv(np.linalg.cholesky(M))`);
* the per-direction weights `k_i` are read off the diagonal of the full matrix `V^T S^+ G S^+T V`;
* each step-1 singular value is the real root of the cubic `2 lam s^3 + k s - k sigma = 0`, found by
  `scipy.optimize.brentq` on the cubic itself in `[0, sigma]` (no closed form);
* the multiplier `lam` is found by `brentq` on the raw constraint in `lam` (linear scale), bracketed
  by an analytic upper bound grown geometrically if needed;
* the refit uses a null-space parameterisation `beta = N gamma` of the mean-parity constraint and a
  ridge-augmented `np.linalg.lstsq` on the explicitly centred data matrix (no KKT, no normal equations).

Public functions (their signatures are relied on by other test modules; keep them stable):

* `reference_esvd(W, x0, x1, c1, c2, eps) -> (W1, W2)`
* `reference_refit(z0, z1, t0, t1, mode, alpha, fit_intercept) -> (coef, intercept)`
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.optimize

__all__ = ["reference_esvd", "reference_refit", "raw_stats", "reference_step1", "reference_step2"]


# --------------------------------------------------------------------------------------------------
# statistics from raw rows


def raw_stats(x0: np.ndarray, x1: np.ndarray) -> dict:
    """Group statistics computed in one shot from raw rows `x0: [n0, d]`, `x1: [n1, d]`.

    Returns a dict with `mean0, mean1: [d]`, `cov0, cov1: [d, d]` (unbiased, `np.cov`) and
    `gram: [d, d]` = `X^T X` over all rows of both groups (not divided by n).
    """
    x0 = np.asarray(x0, dtype=np.float64)
    x1 = np.asarray(x1, dtype=np.float64)
    x = np.vstack([x0, x1])
    return {
        "mean0": x0.mean(axis=0),
        "mean1": x1.mean(axis=0),
        "cov0": np.atleast_2d(np.cov(x0, rowvar=False, ddof=1)),
        "cov1": np.atleast_2d(np.cov(x1, rowvar=False, ddof=1)),
        "gram": x.T @ x,
    }


# --------------------------------------------------------------------------------------------------
# scalar root finding


def _cubic_root(sigma: float, k: float, lam: float) -> float:
    """Real root in [0, sigma] of 2 lam s^3 + k s - k sigma = 0 (sigma >= 0, k >= 0, lam >= 0).

    The cubic is strictly increasing in s when k > 0, negative at 0 and non-negative at sigma.
    Returns 0 where k == 0 (spec: sigma~ = 0 there) and sigma where lam == 0.
    """
    if k <= 0.0:
        return 0.0
    if lam <= 0.0 or sigma <= 0.0:
        return float(sigma)

    def cubic(s: float) -> float:
        return 2.0 * lam * s**3 + k * s - k * sigma

    if cubic(sigma) == 0.0:
        return float(sigma)
    return float(scipy.optimize.brentq(cubic, 0.0, sigma, xtol=1e-300, rtol=4 * np.finfo(float).eps,
                                       maxiter=1000))


def _find_multiplier(phi, target: float, hi: float) -> float:
    """lam >= 0 with phi(lam) = target, phi decreasing; `hi` is a first guess of an upper bracket."""
    if phi(0.0) <= target:
        return 0.0
    hi = max(float(hi), np.finfo(float).tiny)
    while phi(hi) > target:  # grow the bracket geometrically if the analytic bound was not enough
        hi *= 10.0
        if not np.isfinite(hi):
            raise FloatingPointError("reference: could not bracket the multiplier")

    def f(lam: float) -> float:
        return phi(lam) - target

    return float(scipy.optimize.brentq(f, 0.0, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=2000))


# --------------------------------------------------------------------------------------------------
# the two steps


def _thin_svd(a: np.ndarray):
    # LAPACK gesvd (not numpy's gesdd) to take a different route than the library.
    return scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesvd")


def reference_step1(W: np.ndarray, cov0: np.ndarray, cov1: np.ndarray, gram: np.ndarray, c2: float) -> dict:
    """Step 1 (second moment) of ALGORITHM.md on explicit statistics.

    Args:
        W: [m, d] weight. cov0, cov1: [d, d] unbiased group covariances. gram: [d, d] uncentred Gram.
        c2: shrink constant >= 1 (1 means skip).
    Returns:
        dict with `W1 [m, d]`, `S [d, r]`, `S_pinv [r, d]`, `sigma`, `sigma_new`, `k`, `lam`.
    """
    W = np.asarray(W, dtype=np.float64)
    d = W.shape[1]
    D = cov0 - cov1
    D = (D + D.T) / 2.0
    evals, evecs = scipy.linalg.eigh(D, driver="ev")
    top = np.max(np.abs(evals)) if evals.size else 0.0
    keep = np.abs(evals) > d * np.finfo(np.float64).eps * top
    S = evecs[:, keep] @ np.diag(np.sqrt(np.abs(evals[keep])))  # [d, r]
    if c2 == 1.0 or S.shape[1] == 0:
        return {"W1": W.copy(), "S": S, "S_pinv": np.zeros((S.shape[1], d)), "sigma": np.zeros(0),
                "sigma_new": np.zeros(0), "k": np.zeros(0), "lam": 0.0}
    S_pinv = np.linalg.pinv(S)  # = |Lambda_r|^{-1/2} Q_r^T
    U, sigma, Vt = _thin_svd(W @ S)
    A = Vt @ S_pinv
    k = np.diag(A @ gram @ A.T).copy()
    k = np.maximum(k, 0.0)

    def shrunk(lam: float) -> np.ndarray:
        return np.array([_cubic_root(s, kk, lam) for s, kk in zip(sigma, k)])

    def phi(lam: float) -> float:
        return float(np.sum(shrunk(lam) ** 4))

    target = float(np.sum(sigma**4)) / c2
    # sigma~_i <= (k_i sigma_i / (2 lam))^{1/3}  =>  phi(lam) <= sum (k sigma / 2)^{4/3} lam^{-4/3}.
    hi = (np.sum((k * sigma / 2.0) ** (4.0 / 3.0)) / target) ** 0.75 if target > 0 else 1.0
    lam = _find_multiplier(phi, target, hi)
    sigma_new = shrunk(lam)
    W1 = W + U @ np.diag(sigma_new - sigma) @ Vt @ S_pinv
    return {"W1": W1, "S": S, "S_pinv": S_pinv, "sigma": sigma, "sigma_new": sigma_new, "k": k, "lam": lam}


def reference_step2(W1: np.ndarray, mean0: np.ndarray, mean1: np.ndarray, gram: np.ndarray, c1: float,
                    eps: float) -> dict:
    """Step 2 (first moment) of ALGORITHM.md on explicit statistics.

    Args:
        W1: [m, d] weight after step 1. mean0, mean1: [d] group means. gram: [d, d] uncentred Gram.
        c1: shrink constant >= 1 (1 means skip). eps: the ridge of M = delta delta^T + eps I.
    Returns:
        dict with `W2 [m, d]`, `S [d, d]` (lower Cholesky factor), `S_inv`, `sigma`, `sigma_new`, `k`, `lam`.
    """
    W1 = np.asarray(W1, dtype=np.float64)
    d = W1.shape[1]
    delta = np.asarray(mean0, dtype=np.float64) - np.asarray(mean1, dtype=np.float64)
    M = np.outer(delta, delta) + eps * np.eye(d)
    S = np.linalg.cholesky(M)
    S_inv = np.linalg.inv(S)
    if c1 == 1.0:
        return {"W2": W1.copy(), "S": S, "S_inv": S_inv, "sigma": np.zeros(0), "sigma_new": np.zeros(0),
                "k": np.zeros(0), "lam": 0.0}
    U, sigma, Vt = _thin_svd(W1 @ S)
    B = Vt @ S_inv
    k = np.maximum(np.diag(B @ gram @ B.T).copy(), 0.0)

    def shrunk(lam: float) -> np.ndarray:
        out = np.zeros_like(sigma)
        for i, (s, kk) in enumerate(zip(sigma, k)):
            # stationarity of k (x - s)^2 + lam x^2:  (k + lam) x = k s
            out[i] = (kk * s) / (kk + lam) if kk > 0 else (s if lam == 0 else 0.0)
        return out

    def phi(lam: float) -> float:
        return float(np.sum(shrunk(lam) ** 2))

    target = float(np.sum(sigma**2)) / c1
    # sigma~_i <= k_i sigma_i / lam  =>  phi(lam) <= sum (k sigma)^2 / lam^2.
    hi = np.sqrt(np.sum((k * sigma) ** 2) / target) if target > 0 else 1.0
    lam = _find_multiplier(phi, target, hi)
    sigma_new = shrunk(lam)
    W2 = W1 + U @ np.diag(sigma_new - sigma) @ Vt @ S_inv
    return {"W2": W2, "S": S, "S_inv": S_inv, "sigma": sigma, "sigma_new": sigma_new, "k": k, "lam": lam}


def reference_esvd(W: np.ndarray, x0: np.ndarray, x1: np.ndarray, c1: float, c2: float,
                   eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference ESVD repair of a linear layer, straight from raw rows.

    Args:
        W: [m, d] weight (maps a layer input x: [d] to W x).
        x0: [n0, d] raw layer inputs of group 0 (n0 >= 2).
        x1: [n1, d] raw layer inputs of group 1 (n1 >= 2).
        c1: first-moment shrink constant (>= 1; 1 skips step 2).
        c2: second-moment shrink constant (>= 1; 1 skips step 1).
        eps: ridge of M = delta delta^T + eps I in step 2 (> 0; the library default is 1e-5).
    Returns:
        (W1, W2): the weight after step 1 and after step 2, both [m, d] float64.
    """
    st = raw_stats(x0, x1)
    s1 = reference_step1(W, st["cov0"], st["cov1"], st["gram"], c2)
    s2 = reference_step2(s1["W1"], st["mean0"], st["mean1"], st["gram"], c1, eps)
    return s1["W1"], s2["W2"]


# --------------------------------------------------------------------------------------------------
# refit


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1)


def reference_refit(z0: np.ndarray, z1: np.ndarray, t0: np.ndarray, t1: np.ndarray, mode: str, alpha: float,
                    fit_intercept: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference refit of the final linear node, straight from raw rows.

    Solves, independently for each output column j,
        min_b ||Z b - t_j||^2 + alpha * n * ||b||^2     (n = n0 + n1)
    where Z, t are centred on the pooled means when `fit_intercept` (raw otherwise), and for
    mode == "fair" subject to (zbar_0 - zbar_1)^T b = 0 (zbar_g: raw group means of z). The
    constraint is handled by b = N gamma with N an orthonormal basis of the orthogonal complement of
    (zbar_0 - zbar_1); each problem is solved by np.linalg.lstsq on [Z N; sqrt(alpha n) I].

    Args:
        z0: [n0, p], z1: [n1, p] node inputs of group 0 / group 1.
        t0: [n0] or [n0, m], t1: [n1] or [n1, m] refit targets.
        mode: "fair" or "plain".
        alpha: ridge >= 0. fit_intercept: fit an intercept (centred problem) or not (uncentred).
    Returns:
        (coef, intercept): coef [m, p] so that out = coef @ z + intercept; intercept [m] or None.
    """
    z0, z1, t0, t1 = _as_2d(z0), _as_2d(z1), _as_2d(t0), _as_2d(t1)
    z = np.vstack([z0, z1])
    t = np.vstack([t0, t1])
    n, p = z.shape
    m = t.shape[1]
    if fit_intercept:
        zbar, tbar = z.mean(axis=0), t.mean(axis=0)
        zc, tc = z - zbar, t - tbar
    else:
        zc, tc = z, t
    if mode == "fair":
        gap = z0.mean(axis=0) - z1.mean(axis=0)
        if np.linalg.norm(gap) > 0:
            N = scipy.linalg.null_space(gap[None, :])  # [p, p - 1], orthonormal columns
        else:
            N = np.eye(p)
    elif mode == "plain":
        N = np.eye(p)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    q = N.shape[1]
    design = np.vstack([zc @ N, np.sqrt(alpha * n) * np.eye(q)])
    coef = np.zeros((m, p))
    for j in range(m):
        rhs = np.concatenate([tc[:, j], np.zeros(q)])
        gamma = np.linalg.lstsq(design, rhs, rcond=None)[0]
        coef[j] = N @ gamma
    intercept = (tbar - coef @ zbar) if fit_intercept else None
    return coef, intercept
