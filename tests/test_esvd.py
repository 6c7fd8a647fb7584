"""The two ESVD steps (onnx_esvd.esvd) against ALGORITHM.md, a generic solver and the reference oracle."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_esvd.esvd import (
    cubic_shrink,
    esvd,
    first_moment_step,
    ridge_shrink,
    second_moment_factor,
    second_moment_step,
    solve_multiplier,
)
from onnx_esvd.stats import LayerStats, Moments

try:
    from reference_esvd import reference_esvd
except ImportError:  # tests/ imported as a package
    from tests.reference_esvd import reference_esvd

F64_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------------------------------
# helpers (independent of the library)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def make_problem(seed: int, m: int, d: int, n0: int | None = None, n1: int | None = None,
                 dead: tuple[int, ...] = (), rotate: bool = False):
    """Two groups of layer inputs with different means and covariances, and a weight W: [m, d]."""
    rng = np.random.default_rng(seed)
    n0 = n0 or 15 * d + 10
    n1 = n1 or 11 * d + 13
    a0 = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    a1 = 1.3 * (rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d))
    x0 = rng.normal(size=(n0, d)) @ a0 + rng.normal(size=d)
    x1 = rng.normal(size=(n1, d)) @ a1 + rng.normal(size=d)
    x0[:, list(dead)] = 0.0
    x1[:, list(dead)] = 0.0
    if rotate:
        r = np.linalg.qr(rng.normal(size=(d, d)))[0]
        x0, x1 = x0 @ r, x1 @ r
    w = rng.normal(size=(m, d))
    return w, x0, x1


def s_second(x0, x1):
    """S = Q_r |Lambda_r|^{1/2} of D = C0 - C1 (numpy's rank tolerance), [d, r]."""
    d = x0.shape[1]
    dmat = np.cov(x0, rowvar=False) - np.cov(x1, rowvar=False)
    lam, q = np.linalg.eigh(dmat)
    keep = np.abs(lam) > d * F64_EPS * np.max(np.abs(lam))
    return q[:, keep] * np.sqrt(np.abs(lam[keep])), dmat


def s_first(x0, x1, eps):
    """Lower Cholesky factor of delta delta^T + eps I, [d, d]."""
    delta = x0.mean(0) - x1.mean(0)
    return np.linalg.cholesky(np.outer(delta, delta) + eps * np.eye(len(delta))), delta


def gram(x0, x1):
    x = np.vstack([x0, x1])
    return x.T @ x


def sv(a):
    return np.linalg.svd(a, compute_uv=False)


SHAPES = [(3, 6), (8, 5), (1, 7), (5, 5), (12, 9)]


# --------------------------------------------------------------------------------------------------
# constraints


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("c1,c2", [(15.0, 150.0), (1.5, 3.0)])
def test_constraints_hold(seed, m, d, c1, c2):
    w, x0, x1 = make_problem(seed, m, d)
    res = esvd(w, LayerStats.from_arrays(x0, x1), c1=c1, c2=c2)
    s2, _ = s_second(x0, x1)
    before4 = np.sum(sv(w @ s2) ** 4)
    after4 = np.sum(sv(res.weight_step1 @ s2) ** 4)
    assert abs(after4 - before4 / c2) <= 1e-9 * before4 / c2
    s1, _ = s_first(x0, x1, 1e-5)
    before2 = np.sum(sv(res.weight_step1 @ s1) ** 2)
    after2 = np.sum(sv(res.weight @ s1) ** 2)
    assert abs(after2 - before2 / c1) <= 1e-9 * before2 / c1
    # the reports agree with the independent measurements
    assert res.second.bound_before == pytest.approx(before4, rel=1e-9)
    assert res.first.bound_before == pytest.approx(before2, rel=1e-9)
    assert res.second.bound_after == pytest.approx(before4 / c2, rel=1e-9)
    assert res.first.bound_after == pytest.approx(before2 / c1, rel=1e-9)


# --------------------------------------------------------------------------------------------------
# the cubic


def _mutant_cardano(sigma, k, lam):
    """Cardano's formula with `k` where `k^2` belongs in the discriminant (the public bug)."""
    p = k / (2 * lam)
    q = -k * sigma / (2 * lam)
    disc = k * sigma**2 / (16 * lam**2) + p**3 / 27  # correct: (q/2)^2 = k^2 sigma^2 / (16 lam^2)
    r = np.sqrt(disc)
    return np.cbrt(-q / 2 + r) + np.cbrt(-q / 2 - r)


def _cubic_residual(s, sigma, k, lam):
    return np.abs(2 * lam * s**3 + k * s - k * sigma) / (k * sigma)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_lam=st.floats(-12, 12),
    log_k_spread=st.floats(0.5, 6),
)
def test_cubic_shrink_solves_the_cubic(seed, log_lam, log_k_spread):
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.01, 10.0, size=7)
    k = 10.0 ** rng.uniform(-log_k_spread, log_k_spread, size=7)
    k[np.abs(k - 1.0) < 1e-3] = 2.0  # k_i != 1
    lam = 10.0**log_lam
    s = cubic_shrink(sigma, k, lam)
    assert np.all(s >= 0) and np.all(s <= sigma * (1 + 1e-15))
    assert np.max(_cubic_residual(s, sigma, k, lam)) <= 1e-12
    # agrees with the real root returned by np.roots
    for si, sg, kk in zip(s, sigma, k):
        roots = np.roots([2 * lam, 0.0, kk, -kk * sg])
        real = roots[np.argmin(np.abs(roots.imag))].real
        assert si == pytest.approx(real, rel=1e-7, abs=1e-12 * sg)


def test_cubic_residual_check_rejects_the_k_instead_of_k2_form():
    # The residual check above has teeth: the public implementation's form passes it only at k = 1.
    sigma = np.array([0.5, 1.0, 2.0, 3.0])
    lam = 0.7
    ones = np.ones(4)
    assert np.max(_cubic_residual(_mutant_cardano(sigma, ones, lam), sigma, ones, lam)) <= 1e-12
    k = np.array([0.2, 3.0, 7.0, 0.05])
    assert np.min(_cubic_residual(_mutant_cardano(sigma, k, lam), sigma, k, lam)) > 1e-3
    assert np.max(_cubic_residual(cubic_shrink(sigma, k, lam), sigma, k, lam)) <= 1e-12


def test_cubic_and_ridge_shrink_edge_cases():
    sigma = np.array([2.0, 1.0, 0.5])
    k = np.array([3.0, 0.0, 0.25])
    np.testing.assert_array_equal(cubic_shrink(sigma, k, 0.0), [2.0, 0.0, 0.5])
    assert cubic_shrink(sigma, k, 1.0)[1] == 0.0
    np.testing.assert_array_equal(ridge_shrink(sigma, k, 0.0), sigma)
    r = ridge_shrink(sigma, k, 0.5)
    np.testing.assert_allclose(r, [3 * 2 / 3.5, 0.0, 0.25 * 0.5 / 0.75], rtol=1e-15)


# --------------------------------------------------------------------------------------------------
# optimality of each step against a generic constrained solver


def _slsqp_best(sigma, k, target, power):
    scale = float(np.sum(k * sigma**2))

    def obj(s):
        return float(np.sum(k * (s - sigma) ** 2)) / scale

    def jac(s):
        return 2 * k * (s - sigma) / scale

    cons = {"type": "eq", "fun": lambda s: float(np.sum(s**power)) / target - 1.0,
            "jac": lambda s: power * s ** (power - 1) / target}
    best = np.inf
    rng = np.random.default_rng(0)
    starts = [sigma * (target / np.sum(sigma**power)) ** (1 / power)]
    starts += [sigma * rng.uniform(0.1, 1.0, size=sigma.size) for _ in range(4)]
    for x0 in starts:
        r = scipy.optimize.minimize(obj, x0, jac=jac, constraints=[cons], method="SLSQP",
                                    options={"ftol": 1e-15, "maxiter": 1000})
        if abs(cons["fun"](r.x)) < 1e-9:
            best = min(best, r.fun * scale)
    assert np.isfinite(best), "SLSQP found no feasible point"
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m,d", [(3, 5), (5, 4), (4, 8)])
def test_step1_is_optimal_against_slsqp(seed, m, d):
    w, x0, x1 = make_problem(seed + 10, m, d)
    c2 = 20.0
    _, rep = second_moment_step(w, LayerStats.from_arrays(x0, x1), c2)
    target = np.sum(rep.sigma**4) / c2
    ours = np.sum(rep.k * (rep.sigma_new - rep.sigma) ** 2)
    assert abs(np.sum(rep.sigma_new**4) / target - 1) <= 1e-9
    best = _slsqp_best(rep.sigma, rep.k, target, 4)
    assert ours <= best * (1 + 1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m,d", [(3, 5), (5, 4), (4, 8)])
def test_step2_is_optimal_against_slsqp(seed, m, d):
    w, x0, x1 = make_problem(seed + 20, m, d)
    c1 = 15.0
    _, rep = first_moment_step(w, LayerStats.from_arrays(x0, x1), c1, 1e-3)
    target = np.sum(rep.sigma**2) / c1
    ours = np.sum(rep.k * (rep.sigma_new - rep.sigma) ** 2)
    assert abs(np.sum(rep.sigma_new**2) / target - 1) <= 1e-9
    best = _slsqp_best(rep.sigma, rep.k, target, 2)
    assert ours <= best * (1 + 1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("m,d", SHAPES)
def test_objective_identity(seed, m, d):
    """sum k_i (s~_i - s_i)^2 = tr((W_new - W) G (W_new - W)^T) for both steps (k from the Gram)."""
    w, x0, x1 = make_problem(seed + 30, m, d)
    res = esvd(w, LayerStats.from_arrays(x0, x1), c1=15.0, c2=150.0)
    g = gram(x0, x1)
    for before, after, rep in ((w, res.weight_step1, res.second), (res.weight_step1, res.weight, res.first)):
        dw = after - before
        lhs = np.sum(rep.k * (rep.sigma_new - rep.sigma) ** 2)
        rhs = np.trace(dw @ g @ dw.T)
        assert lhs == pytest.approx(rhs, rel=1e-9)


# --------------------------------------------------------------------------------------------------
# special values, monotonicity and invariances


def test_c_equal_one_returns_w_unchanged_exactly():
    w, x0, x1 = make_problem(40, 4, 6)
    stats = LayerStats.from_arrays(x0, x1)
    res = esvd(w, stats, c1=1.0, c2=1.0)
    np.testing.assert_array_equal(res.weight, w)
    np.testing.assert_array_equal(res.weight_step1, w)
    assert not res.first.applied and not res.second.applied
    assert res.weight is not w  # a copy, not the caller's array
    only1 = esvd(w, stats, c1=5.0, c2=1.0)
    np.testing.assert_array_equal(only1.weight_step1, w)
    only2 = esvd(w, stats, c1=1.0, c2=5.0)
    np.testing.assert_array_equal(only2.weight, only2.weight_step1)


def test_identical_groups_skip_step1():
    w, x0, _ = make_problem(41, 3, 5)
    res = esvd(w, LayerStats.from_arrays(x0, x0.copy()), c1=15.0, c2=150.0)
    np.testing.assert_array_equal(res.weight_step1, w)
    assert not res.second.applied


@pytest.mark.parametrize("c1,c2,eps", [(0.5, 2.0, 1e-5), (2.0, 0.99, 1e-5), (2.0, 2.0, 0.0), (2.0, 2.0, -1.0)])
def test_invalid_arguments_raise(c1, c2, eps):
    w, x0, x1 = make_problem(42, 2, 3)
    with pytest.raises(ValueError):
        esvd(w, LayerStats.from_arrays(x0, x1), c1=c1, c2=c2, eps=eps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiplier_is_monotone_in_c(seed):
    w, x0, x1 = make_problem(seed + 50, 4, 6)
    stats = LayerStats.from_arrays(x0, x1)
    cs = [1.0001, 1.01, 1.5, 2.0, 5.0, 15.0, 150.0, 1e4]
    lam2 = [second_moment_step(w, stats, c)[1].lam for c in cs]
    lam1 = [first_moment_step(w, stats, c, 1e-5)[1].lam for c in cs]
    assert all(lam > 0 for lam in lam2 + lam1)
    assert np.all(np.diff(lam2) >= 0), lam2
    assert np.all(np.diff(lam1) >= 0), lam1


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m,d", [(3, 6), (8, 5), (1, 4)])
def test_invariant_to_group_swap_row_order_and_batching(seed, m, d):
    w, x0, x1 = make_problem(seed + 60, m, d)
    base = esvd(w, LayerStats.from_arrays(x0, x1)).weight
    swapped = esvd(w, LayerStats.from_arrays(x1, x0)).weight
    assert rel_err(swapped, base) <= 1e-9
    rng = np.random.default_rng(seed)
    p0, p1 = rng.permutation(len(x0)), rng.permutation(len(x1))
    permuted = esvd(w, LayerStats.from_arrays(x0[p0], x1[p1])).weight
    assert rel_err(permuted, base) <= 1e-9
    g0, g1 = Moments(d), Moments(d)
    for lo in range(0, len(x0), 7):
        g0.add(x0[p0][lo:lo + 7])
    for lo in range(0, len(x1), 3):
        g1.add(x1[lo:lo + 3])
    streamed = esvd(w, LayerStats.from_moments(g0, g1)).weight
    assert rel_err(streamed, base) <= 1e-9


@pytest.mark.parametrize("a", [1e-8, 1e-3, 1e3, 1e8])
def test_homogeneous_in_w_and_invariant_to_input_scale(a):
    """esvd(a W) = a esvd(W); esvd(W; b x, eps b^2) = esvd(W; x, eps). Also exercises extreme multipliers."""
    w, x0, x1 = make_problem(70, 3, 5)
    base = esvd(w, LayerStats.from_arrays(x0, x1)).weight
    scaled_w = esvd(a * w, LayerStats.from_arrays(x0, x1)).weight
    assert rel_err(scaled_w, a * base) <= 1e-9
    scaled_x = esvd(w, LayerStats.from_arrays(a * x0, a * x1), eps=1e-5 * a**2).weight
    assert rel_err(scaled_x, base) <= 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m,d", [(3, 6), (6, 4), (1, 5)])
def test_full_rank_step1_equals_papers_form(seed, m, d):
    """With S invertible, W1 = U diag(s~) V^T S^{-1} (U, V from an independent SVD of W S)."""
    w, x0, x1 = make_problem(seed + 80, m, d)
    s2, _ = s_second(x0, x1)
    assert s2.shape == (d, d)
    w1, rep = second_moment_step(w, LayerStats.from_arrays(x0, x1), 150.0)
    u, sigma, vt = np.linalg.svd(w @ s2, full_matrices=False)
    np.testing.assert_allclose(rep.sigma, sigma, rtol=1e-10)
    s_inv = np.linalg.inv(s2)
    paper = u @ np.diag(rep.sigma_new) @ vt @ s_inv
    # W1 = W + U diag(s~ - s) V^T S^{-1} collapses to the paper's form because the thin SVD
    # reconstructs W S, so nothing of W lies outside range(S) when S is invertible.
    assert np.linalg.norm(w - u @ np.diag(sigma) @ vt @ s_inv) <= 1e-10 * np.linalg.norm(w)
    assert rel_err(w1, paper) <= 1e-9


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("m,d,dead", [(3, 8, (1, 5)), (10, 6, (0, 3, 4)), (1, 7, (2,))])
def test_rank_deficient_d_keeps_component_outside_range_of_s(rotate, m, d, dead):
    """Dead units (coordinates zero in both groups): step 1 works on range(S) and keeps the rest of W."""
    w, x0, x1 = make_problem(90 + d, m, d, dead=dead, rotate=rotate)
    stats = LayerStats.from_arrays(x0, x1)
    res = esvd(w, stats, c1=15.0, c2=150.0)
    r = d - len(dead)
    assert res.second.rank == r
    s2, dmat = s_second(x0, x1)
    assert s2.shape[1] == r
    q, _ = second_moment_factor(stats.cov0, stats.cov1)
    assert q.shape == (d, r)
    # projector onto the null space of D (directions where both groups have the same covariance)
    p_perp = np.eye(d) - s2 @ np.linalg.pinv(s2)
    outside = w @ p_perp
    assert np.linalg.norm(outside) > 0.1 * np.linalg.norm(w)  # the test is not vacuous
    assert np.linalg.norm(res.weight_step1 @ p_perp - outside) <= 1e-12 * np.linalg.norm(w)
    # the paper's form U diag(s~) V^T S^+ would zero that component instead
    u, _, vt = np.linalg.svd(w @ s2, full_matrices=False)
    paper = u @ np.diag(res.second.sigma_new) @ vt @ np.linalg.pinv(s2)
    assert np.linalg.norm(paper @ p_perp) <= 1e-10 * np.linalg.norm(w)
    assert rel_err(res.weight_step1, paper + outside) <= 1e-9
    if not rotate:
        np.testing.assert_allclose(res.weight_step1[:, list(dead)], w[:, list(dead)], rtol=0,
                                   atol=1e-12 * np.linalg.norm(w))
    # the constraint still holds and the result matches the oracle
    before4 = np.sum(sv(w @ s2) ** 4)
    assert np.sum(sv(res.weight_step1 @ s2) ** 4) == pytest.approx(before4 / 150.0, rel=1e-9)
    w1_ref, w2_ref = reference_esvd(w, x0, x1, 15.0, 150.0, 1e-5)
    assert rel_err(res.weight_step1, w1_ref) <= 1e-8
    assert rel_err(res.weight, w2_ref) <= 1e-8


# --------------------------------------------------------------------------------------------------
# against the reference oracle


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m,d", [(2, 7), (4, 9), (9, 4), (12, 6), (1, 5), (1, 1), (3, 1)])
@pytest.mark.parametrize("c1,c2,eps", [(15.0, 150.0, 1e-5), (3.0, 1.2, 1e-2), (1.0, 40.0, 1e-5), (40.0, 1.0, 1e-5)])
def test_esvd_equals_reference(seed, m, d, c1, c2, eps):
    w, x0, x1 = make_problem(seed + 100, m, d)
    res = esvd(w, LayerStats.from_arrays(x0, x1), c1=c1, c2=c2, eps=eps)
    w1_ref, w2_ref = reference_esvd(w, x0, x1, c1, c2, eps)
    assert rel_err(res.weight_step1, w1_ref) <= 1e-8
    assert rel_err(res.weight, w2_ref) <= 1e-8


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 10), d=st.integers(2, 10),
       log_c1=st.floats(0.01, 3), log_c2=st.floats(0.01, 3))
def test_esvd_equals_reference_hypothesis(seed, m, d, log_c1, log_c2):
    w, x0, x1 = make_problem(seed, m, d)
    c1, c2 = 10.0**log_c1, 10.0**log_c2
    res = esvd(w, LayerStats.from_arrays(x0, x1), c1=c1, c2=c2)
    w1_ref, w2_ref = reference_esvd(w, x0, x1, c1, c2, 1e-5)
    assert rel_err(res.weight_step1, w1_ref) <= 1e-8
    assert rel_err(res.weight, w2_ref) <= 1e-8


# --------------------------------------------------------------------------------------------------
# the multiplier search


@pytest.mark.parametrize("log_k", [-250, -120, -30, 0, 30, 120, 250])
@pytest.mark.parametrize("scale_kind", ["matched", "one", "nan", "zero", "negative", "far"])
def test_solve_multiplier_brackets_any_scale(log_k, scale_kind):
    sigma = np.array([1.0])
    k = np.array([10.0**log_k])
    c = 15.0
    target = 1.0 / c

    def phi(lam):
        return float(np.sum((k * sigma / (k + lam)) ** 2))

    scale = {"matched": k[0], "one": 1.0, "nan": float("nan"), "zero": 0.0, "negative": -3.0,
             "far": k[0] * 1e12 if log_k < 0 else k[0] * 1e-12}[scale_kind]
    lam = solve_multiplier(phi, target, scale)
    assert lam == pytest.approx(k[0] * (np.sqrt(c) - 1.0), rel=1e-12)  # (k / (k + lam))^2 = 1 / c
    assert abs(phi(lam) / target - 1.0) <= 1e-12


@pytest.mark.parametrize("log_scale", [-150, -40, 40, 150])
def test_solve_multiplier_quartic_many_terms(log_scale):
    rng = np.random.default_rng(5)
    sigma = rng.uniform(0.1, 3.0, size=6)
    k = 10.0 ** (log_scale + rng.uniform(-2, 2, size=6))
    target = np.sum(sigma**4) / 150.0
    lam = solve_multiplier(lambda t: float(np.sum(cubic_shrink(sigma, k, t) ** 4)), target, 1.0)
    assert abs(np.sum(cubic_shrink(sigma, k, lam) ** 4) / target - 1.0) <= 1e-12


# --------------------------------------------------------------------------------------------------
# the bounds of the theory


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("m,d", [(3, 6), (8, 5), (1, 4)])
def test_disparity_bounds(seed, m, d):
    w, x0, x1 = make_problem(seed + 200, m, d)
    eps = 1e-5
    s2, dmat = s_second(x0, x1)
    s1, delta = s_first(x0, x1, eps)
    res = esvd(w, LayerStats.from_arrays(x0, x1), c1=15.0, c2=150.0, eps=eps)
    for v in (w, res.weight_step1, res.weight):
        # mean gap: ||V delta||^2 <= ||V S||_F^2, with slack exactly eps ||V||_F^2
        mean_gap2 = np.sum((v @ delta) ** 2)
        bound2 = np.sum(sv(v @ s1) ** 2)
        assert mean_gap2 <= bound2
        assert bound2 - mean_gap2 == pytest.approx(eps * np.sum(v**2), rel=1e-6)
        # covariance gap: ||V D V^T||_F <= ||V S||_{S4}^2 = sqrt(sum sigma^4)
        cov_gap = np.linalg.norm(v @ dmat @ v.T)
        bound4 = np.sum(sv(v @ s2) ** 4)
        assert cov_gap <= np.sqrt(bound4) * (1 + 1e-12)
        # and it is the empirical covariance gap of the layer outputs
        out_gap = np.cov(x0 @ v.T, rowvar=False) - np.cov(x1 @ v.T, rowvar=False)
        assert np.linalg.norm(np.atleast_2d(out_gap)) == pytest.approx(cov_gap, rel=1e-9, abs=1e-12)
    # the repair shrinks the bounds by the requested factors
    assert np.sum(sv(res.weight_step1 @ s2) ** 4) == pytest.approx(np.sum(sv(w @ s2) ** 4) / 150.0, rel=1e-9)


def test_covariance_bound_is_tight_for_definite_d():
    """When one group's covariance dominates (D > 0, J = I), ||W D W^T||_F^2 = sum sigma(W S)^4."""
    rng = np.random.default_rng(7)
    d = 5
    x1 = rng.normal(size=(400, d))
    x0 = 3.0 * x1[:300] + rng.normal(size=(300, d))
    s2, dmat = s_second(x0, x1)
    assert np.all(np.linalg.eigvalsh(dmat) > 0)
    w = rng.normal(size=(3, d))
    assert np.linalg.norm(w @ dmat @ w.T) ** 2 == pytest.approx(np.sum(sv(w @ s2) ** 4), rel=1e-10)


# --------------------------------------------------------------------------------------------------
# rank tolerance and degenerate inputs


def test_second_moment_factor_uses_numpys_rank_tolerance():
    """Eigenpairs of D above d * eps * max|lambda| are kept (both signs), those below are dropped."""
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    lam = np.array([1.0, -0.3, 1e-10, -1e-13, 0.0])
    dmat = q @ np.diag(lam) @ q.T
    base = np.eye(5) * 2.0  # D = cov0 - cov1 whatever cov1 is
    qr_, s_abs = second_moment_factor(base + dmat, base)
    assert qr_.shape == (5, 4) and s_abs.shape == (4,)
    assert qr_.shape[1] == np.linalg.matrix_rank(dmat, hermitian=True)
    np.testing.assert_allclose(np.sort(s_abs**2), np.sort(np.abs(lam[:4])), rtol=1e-2)
    np.testing.assert_allclose(qr_.T @ qr_, np.eye(4), atol=1e-12)
    # |D| is reproduced on the kept range
    np.testing.assert_allclose((qr_ * s_abs**2) @ qr_.T, q @ np.diag(np.abs(lam)) @ q.T, atol=1e-12)


@pytest.mark.parametrize("case", ["zero", "low_rank", "large_means", "mostly_dead"])
def test_degenerate_inputs_match_reference(case):
    w, x0, x1 = make_problem(300, 6, 8)
    if case == "zero":
        w = np.zeros_like(w)
    elif case == "low_rank":
        w = w[:, :2] @ np.random.default_rng(1).normal(size=(2, 8))
    elif case == "large_means":
        x0, x1 = x0 + 1e4, x1 + 1e4
    elif case == "mostly_dead":
        w, x0, x1 = make_problem(301, 12, 6, dead=(0, 1, 2, 3, 4))
    res = esvd(w, LayerStats.from_arrays(x0, x1), c1=15.0, c2=150.0)
    w1_ref, w2_ref = reference_esvd(w, x0, x1, 15.0, 150.0, 1e-5)
    if case == "zero":
        np.testing.assert_array_equal(res.weight, 0.0)
        np.testing.assert_array_equal(w2_ref, 0.0)
        return
    assert np.all(np.isfinite(res.weight))
    assert rel_err(res.weight_step1, w1_ref) <= 1e-8
    assert rel_err(res.weight, w2_ref) <= 1e-8


@pytest.mark.parametrize("m,d", [(3, 6), (7, 4), (1, 5)])
def test_reference_oracle_meets_the_spec_itself(m, d):
    """The oracle (also used by end-to-end tests) satisfies both constraints on its own."""
    w, x0, x1 = make_problem(400 + d, m, d)
    w1, w2 = reference_esvd(w, x0, x1, 15.0, 150.0, 1e-5)
    s2, _ = s_second(x0, x1)
    s1, _ = s_first(x0, x1, 1e-5)
    assert np.sum(sv(w1 @ s2) ** 4) == pytest.approx(np.sum(sv(w @ s2) ** 4) / 150.0, rel=1e-9)
    assert np.sum(sv(w2 @ s1) ** 2) == pytest.approx(np.sum(sv(w1 @ s1) ** 2) / 15.0, rel=1e-9)
    w1_skip, w2_skip = reference_esvd(w, x0, x1, 1.0, 1.0, 1e-5)
    np.testing.assert_array_equal(w1_skip, w)
    np.testing.assert_array_equal(w2_skip, w)


# --------------------------------------------------------------------------------------------------
# the first moment's factor: symmetric square root (wide layers) against Cholesky (the spec's route)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 10_000), d=st.integers(2, 12), q=st.integers(1, 4), rank=st.integers(0, 4),
       log_eps=st.floats(-8, 1), log_scale=st.floats(-3, 3))
def test_mean_gap_root_is_the_square_root_of_m_and_inverts(seed, d, q, rank, log_eps, log_scale):
    """S = M^(1/2) symmetric with S S = Delta^T Delta + eps I and (V S^-1) S = V, also for a rank-deficient Delta
    (k groups: rank <= k - 1) and a zero one."""
    import onnx_esvd.esvd as esvd_mod

    rng = np.random.default_rng(seed)
    delta = rng.standard_normal((q, min(rank, q))) @ rng.standard_normal((min(rank, q), d)) * 10**log_scale
    eps = 10**log_eps
    m = delta.T @ delta + eps * np.eye(d)
    old = esvd_mod.GRAM_FROM
    try:
        esvd_mod.GRAM_FROM = 1
        root = esvd_mod.mean_gap_factor(delta, eps)
    finally:
        esvd_mod.GRAM_FROM = old
    assert isinstance(root, esvd_mod.MeanGapRoot)
    s = root.matrix()
    assert np.allclose(s, s.T, rtol=0, atol=1e-13 * np.abs(s).max())
    assert rel_err(s @ s, m) <= 1e-12
    v = rng.standard_normal((3, d))
    assert rel_err(root.solve(v) @ s, v) <= 1e-10 * np.sqrt(np.linalg.cond(m))
    chol = np.linalg.cholesky(m)  # any factor: S = L Q with Q orthogonal
    q_mat = np.linalg.solve(chol, s)
    assert np.abs(q_mat.T @ q_mat - np.eye(d)).max() <= 1e-9 * np.linalg.cond(m)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 6), d=st.integers(2, 10), log_c1=st.floats(0.05, 3),
       dead=st.booleans())
def test_first_moment_step_is_the_same_through_either_factor(seed, m, d, log_c1, dead):
    """The step through the symmetric root equals the step through the Cholesky factor (the spec's S): any factor
    of M rotates V and leaves U, sigma and V^T S^-1 unchanged."""
    import onnx_esvd.esvd as esvd_mod

    w, x0, x1 = make_problem(seed, m, d, dead=(0,) if dead else ())
    stats = LayerStats.from_arrays(x0, x1)
    c1 = 10**log_c1
    old = esvd_mod.GRAM_FROM
    try:
        esvd_mod.GRAM_FROM = 10**9
        by_chol, rep_chol = first_moment_step(w, stats, c1, 1e-5)
        esvd_mod.GRAM_FROM = 1
        by_root, rep_root = first_moment_step(w, stats, c1, 1e-5)
    finally:
        esvd_mod.GRAM_FROM = old
    assert rel_err(by_root, by_chol) <= 1e-9
    assert rel_err(rep_root.sigma, rep_chol.sigma) <= 1e-9
    assert abs(rep_root.bound_after - rep_chol.bound_after) <= 1e-9 * rep_chol.bound_after


def test_mean_gap_root_refuses_an_eps_whose_inverse_power_overflows():
    """Equal group means (delta = 0) escape the rounding test; eps = 1e-300 would make S^-1 infinite: refused
    with the --eps line, not NaN weights."""
    import onnx_esvd.esvd as esvd_mod
    from onnx_esvd.errors import OptionError

    old = esvd_mod.GRAM_FROM
    try:
        esvd_mod.GRAM_FROM = 1
        with pytest.raises(OptionError, match="--eps 1e-300 is too small"):
            esvd_mod.mean_gap_factor(np.zeros(4), 1e-300)
        assert np.all(np.isfinite(esvd_mod.mean_gap_factor(np.zeros(4), 1e-5).solve(np.eye(4))))
    finally:
        esvd_mod.GRAM_FROM = old
