"""Exact mean + variance parity refit (onnx_esvd.refit_moments) against direct formulas and SLSQP."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_esvd.errors import DataError, OptionError
from onnx_esvd.refit import solve
from onnx_esvd.refit_moments import RIDGE_FLOOR, _root, group_output_stats, solve_moments
from onnx_esvd.stats import Moments


def make_rows(seed: int, p: int, m: int = 1, n0: int = 150, n1: int = 90, scales=None):
    """Two groups whose inputs differ in mean AND covariance (group 1's mixing columns scaled by
    `scales`, random in [0.4, 2] by default); targets depend on the inputs."""
    rng = np.random.default_rng(seed)
    mix0 = rng.normal(size=(p, p)) / np.sqrt(p) + np.eye(p)
    mix1 = mix0 * (rng.uniform(0.4, 2.0, size=p) if scales is None else np.asarray(scales))
    z0 = rng.normal(size=(n0, p)) @ mix0 + rng.normal(size=p)
    z1 = rng.normal(size=(n1, p)) @ mix1 + rng.normal(size=p) + 0.7
    beta = rng.normal(size=(p, m))
    t0 = z0 @ beta + 0.3 * rng.normal(size=(n0, m))
    t1 = z1 @ beta + 0.3 * rng.normal(size=(n1, m)) + 0.5
    return z0, z1, t0, t1


def moments(z, t):
    mo = Moments(z.shape[1] + t.shape[1])
    mo.add(np.hstack([z, t]))
    return mo


def problem(groups, p, alpha, fit_intercept):
    """A, r (all columns), d, D exactly as the module docstring defines them."""
    pooled = groups[0].copy()
    pooled.merge(groups[1])
    second = pooled.scatter if fit_intercept else pooled.gram()
    a = second[:p, :p] + alpha * pooled.n * np.eye(p)
    d = groups[0].mean[:p] - groups[1].mean[:p]
    dmat = groups[0].covariance()[:p, :p] - groups[1].covariance()[:p, :p]
    return a, second[:p, p:], d, dmat


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.integers(2, 7), m=st.integers(1, 2),
       kappa=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), fit_intercept=st.booleans())
def test_both_constraints_hold(seed, p, m, kappa, fit_intercept):
    z0, z1, t0, t1 = make_rows(seed, p, m)
    groups = [moments(z0, t0), moments(z1, t1)]
    sol, diag = solve_moments(groups, p, alpha=1e-3, fit_intercept=fit_intercept, kappa=kappa,
                              return_diagnostics=True)
    _, _, d, dmat = problem(groups, p, 1e-3, fit_intercept)
    c0, c1 = groups[0].covariance()[:p, :p], groups[1].covariance()[:p, :p]
    for j in range(m):
        beta = sol.coef[j]
        assert abs(d @ beta) <= 1e-9 * np.linalg.norm(d) * np.linalg.norm(beta)
        scale = beta @ (c0 + c1) @ beta + abs(diag.g0[j])
        assert abs(beta @ dmat @ beta - kappa * diag.g0[j]) <= 1e-9 * scale
    fair = solve([groups[0], groups[1]], p, mode="fair", alpha=1e-3, fit_intercept=fit_intercept)
    for j in range(m):  # g0 is the fair solution's variance gap
        bf = fair.coef[j]
        assert diag.g0[j] == pytest.approx(bf @ dmat @ bf, rel=1e-9, abs=1e-12)


def objective(beta, a, r):
    return beta @ a @ beta - 2 * r @ beta


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kappa", [0.0, 0.4])
def test_global_optimum_against_slsqp(seed, kappa):
    p = 4
    z0, z1, t0, t1 = make_rows(seed, p)
    groups = [moments(z0, t0), moments(z1, t1)]
    sol, diag = solve_moments(groups, p, alpha=1e-2, fit_intercept=True, kappa=kappa, return_diagnostics=True)
    a, r, d, dmat = problem(groups, p, 1e-2, True)
    r = r[:, 0]
    ours = objective(sol.coef[0], a, r)
    target = kappa * diag.g0[0]
    cons = [{"type": "eq", "fun": lambda b: d @ b}, {"type": "eq", "fun": lambda b: b @ dmat @ b - target}]
    rng = np.random.default_rng(seed)
    best = np.inf
    for _ in range(8):
        res = scipy.optimize.minimize(objective, rng.normal(size=p) * 2, args=(a, r), constraints=cons,
                                      method="SLSQP", options={"maxiter": 500, "ftol": 1e-14})
        b = res.x
        if abs(d @ b) < 1e-7 * np.linalg.norm(d) * (1 + np.linalg.norm(b)) and abs(b @ dmat @ b - target) < 1e-7 * (
                1 + abs(target)):
            best = min(best, res.fun)
    assert np.isfinite(best)
    assert ours <= best + 1e-8 * abs(best)


def test_kappa_one_reproduces_fair_and_is_continuous():
    p, m = 6, 2
    z0, z1, t0, t1 = make_rows(3, p, m)
    groups = [moments(z0, t0), moments(z1, t1)]
    fair = solve([groups[0], groups[1]], p, mode="fair", alpha=1e-3, fit_intercept=True)
    one = solve_moments(groups, p, alpha=1e-3, fit_intercept=True, kappa=1.0)
    assert np.max(np.abs(one.coef - fair.coef)) <= 1e-10 * np.max(np.abs(fair.coef))
    assert np.max(np.abs(one.intercept - fair.intercept)) <= 1e-10 * (1 + np.max(np.abs(fair.intercept)))
    near = solve_moments(groups, p, alpha=1e-3, fit_intercept=True, kappa=1 - 1e-9)
    assert np.max(np.abs(near.coef - fair.coef)) <= 1e-6 * np.max(np.abs(fair.coef))


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_kappa_zero_equalises_group_variances_and_means_on_fit_rows(fit_intercept):
    p = 5
    z0, z1, t0, t1 = make_rows(11, p)
    groups = [moments(z0, t0), moments(z1, t1)]
    sol = solve_moments(groups, p, alpha=1e-3, fit_intercept=fit_intercept, kappa=0.0)
    y0, y1 = z0 @ sol.coef.T, z1 @ sol.coef.T
    fair = solve([groups[0], groups[1]], p, mode="fair", alpha=1e-3, fit_intercept=fit_intercept)
    f0, f1 = z0 @ fair.coef.T, z1 @ fair.coef.T
    assert abs(np.std(f0, ddof=1) - np.std(f1, ddof=1)) > 0.1  # the fair solution does differ
    assert np.std(y0, ddof=1) == pytest.approx(np.std(y1, ddof=1), rel=1e-9)
    assert np.mean(y0) == pytest.approx(np.mean(y1), rel=1e-9, abs=1e-9)
    means, stds = group_output_stats(sol, groups, p)
    bias = 0.0 if sol.intercept is None else sol.intercept[0]
    assert means[:, 0] == pytest.approx([np.mean(y0) + bias, np.mean(y1) + bias], rel=1e-9)
    assert stds[:, 0] == pytest.approx([np.std(y0, ddof=1), np.std(y1, ddof=1)], rel=1e-9)


def test_row_order_and_group_swap_invariance():
    p = 5
    z0, z1, t0, t1 = make_rows(5, p)
    base = solve_moments([moments(z0, t0), moments(z1, t1)], p, alpha=1e-3, fit_intercept=True, kappa=0.2)
    rng = np.random.default_rng(0)
    i0, i1 = rng.permutation(len(z0)), rng.permutation(len(z1))
    shuffled = [Moments(p + 1), Moments(p + 1)]
    for mo, z, t, idx in ((shuffled[0], z0, t0, i0), (shuffled[1], z1, t1, i1)):
        for part in np.array_split(idx, 7):  # different batches too
            mo.add(np.hstack([z[part], t[part]]))
    again = solve_moments(shuffled, p, alpha=1e-3, fit_intercept=True, kappa=0.2)
    swapped = solve_moments([moments(z1, t1), moments(z0, t0)], p, alpha=1e-3, fit_intercept=True, kappa=0.2)
    for other in (again, swapped):
        assert np.max(np.abs(other.coef - base.coef)) <= 1e-9 * np.max(np.abs(base.coef))
        assert other.intercept == pytest.approx(base.intercept, rel=1e-9)


def test_equal_covariances_return_fair():
    p = 4
    z0, _, t0, _ = make_rows(2, p)
    z1 = z0[:100] + 3.0  # same rows shifted: the covariance gap is only round-off
    t1 = t0[:100] + 1.0
    z0b, t0b = z0[:100], t0[:100]
    groups = [moments(z0b, t0b), moments(z1, t1)]
    sol, diag = solve_moments(groups, p, alpha=1e-3, fit_intercept=True, kappa=0.0, return_diagnostics=True)
    fair = solve([groups[0], groups[1]], p, mode="fair", alpha=1e-3, fit_intercept=True)
    assert diag.cases == ("fair",)
    assert np.allclose(sol.coef, fair.coef, rtol=1e-9, atol=1e-12)


def test_semidefinite_gap_kappa_zero_takes_the_limit():
    """C_0 - C_1 >= 0 (group 1 is group 0 shrunk along one axis): equal variances need beta in its null space."""
    p = 4
    rng = np.random.default_rng(8)
    z0 = rng.normal(size=(300, p)) @ (np.eye(p) + 0.3 * rng.normal(size=(p, p)))
    z0 -= z0.mean(axis=0)
    rest = z0[:, 1:]
    z0[:, 0] -= rest @ np.linalg.lstsq(rest, z0[:, 0], rcond=None)[0]  # column 0 uncorrelated in-sample
    z1 = z0.copy()
    z1[:, 0] *= 0.5
    z1 += 0.4
    beta = rng.normal(size=(p, 1))
    t0, t1 = z0 @ beta + 0.1 * rng.normal(size=(300, 1)), z1 @ beta + 0.1 * rng.normal(size=(300, 1))
    groups = [moments(z0, t0), moments(z1, t1)]
    sol, diag = solve_moments(groups, p, alpha=1e-3, fit_intercept=True, kappa=0.0, return_diagnostics=True)
    assert diag.cases == ("limit",)
    y0, y1 = z0 @ sol.coef[0], z1 @ sol.coef[0]
    assert np.var(y0) == pytest.approx(np.var(y1), rel=1e-9)
    a, r, d, dmat = problem(groups, p, 1e-3, True)
    # the limit is the least squares fit restricted to {d^T b = 0, b_0 = 0} (the gap's null space here)
    basis = np.linalg.svd(np.vstack([d, np.eye(p)[0]]))[2][2:].T
    restricted = basis @ np.linalg.solve(basis.T @ a @ basis, basis.T @ r[:, 0])
    assert np.allclose(sol.coef[0], restricted, rtol=1e-8, atol=1e-10)


def test_hard_case_at_the_pole():
    """r does not excite the most negative eigen-direction: the optimum sits at the pole plus that direction."""
    ell = np.array([-1.0, 0.5, 2.0])
    s = np.array([0.0, 1.0, 1.0])
    target = 0.05  # q at the pole (mu = 1) is 0.5/1.5^2 + 2/9 = 0.444 > target
    y, mu, case = _root(ell, s, target)
    assert case == "pole" and mu == pytest.approx(1.0)
    assert ell @ (y * y) == pytest.approx(target, rel=1e-12)
    cons = [{"type": "eq", "fun": lambda v: ell @ (v * v) - target}]
    best = min(scipy.optimize.minimize(lambda v: v @ v - 2 * s @ v, x0, constraints=cons, method="SLSQP",
                                       options={"ftol": 1e-14}).fun
               for x0 in np.random.default_rng(0).normal(size=(8, 3)))
    assert y @ y - 2 * s @ y <= best + 1e-9


def test_rank_deficient_inputs_keep_the_ridge_floor():
    p = 6
    z0, z1, t0, t1 = make_rows(4, p, scales=[0.5, 1.8, 1.0, 0.6, 1.5, 1.0])  # an indefinite gap
    for z in (z0, z1):
        z[:, 2] = 0.0          # dead unit
        z[:, 5] = z[:, 1]      # duplicated unit
    groups = [moments(z0, t0), moments(z1, t1)]
    sol, diag = solve_moments(groups, p, alpha=0.0, fit_intercept=True, kappa=0.0, return_diagnostics=True)
    assert diag.alpha_used >= RIDGE_FLOOR * 0.1 and np.all(np.isfinite(sol.coef))
    assert sol.coef[0, 2] == pytest.approx(0.0, abs=1e-9)
    # duplicates act as one unit: what the solution puts on the pair's difference is round-off
    assert abs(sol.coef[0, 1] - sol.coef[0, 5]) <= 1e-6 * np.max(np.abs(sol.coef))
    assert diag.cases == ("root",) and np.max(np.abs(sol.coef)) > 0.1
    y0, y1 = z0 @ sol.coef[0], z1 @ sol.coef[0]
    assert np.var(y0, ddof=1) == pytest.approx(np.var(y1, ddof=1), rel=1e-7)


def test_refusals():
    p = 3
    z0, z1, t0, t1 = make_rows(1, p)
    groups = [moments(z0, t0), moments(z1, t1)]
    with pytest.raises(OptionError, match="kappa"):
        solve_moments(groups, p, alpha=1e-3, fit_intercept=True, kappa=1.5)
    with pytest.raises(OptionError, match="2 groups"):
        solve_moments(groups + [groups[0]], p, alpha=1e-3, fit_intercept=True, kappa=0.0)
    with pytest.raises(OptionError, match="weights"):
        solve_moments(groups, p, alpha=1e-3, fit_intercept=True, kappa=0.0, weights=[1.0, -1.0])
    with pytest.raises(DataError, match="group 1"):
        solve_moments([groups[0], moments(z1[:1], t1[:1])], p, alpha=1e-3, fit_intercept=True, kappa=0.0)
