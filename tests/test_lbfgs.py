"""The numpy L-BFGS of the penalised refits (onnx_esvd.lbfgs)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_esvd import lbfgs


def rosenbrock(x: np.ndarray) -> tuple[float, np.ndarray]:
    f = float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))
    g = np.zeros_like(x)
    g[:-1] = -400.0 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * (x[1:] - x[:-1] ** 2)
    return f, g


@pytest.mark.parametrize("n", [2, 10])
def test_rosenbrock_reaches_the_minimum(n):
    x0 = np.tile([-1.2, 1.0], n // 2)
    res = lbfgs.minimize(rosenbrock, x0, maxiter=1000, ftol=1e-15, gtol=1e-10)
    assert res.converged, res.message
    assert np.allclose(res.x, 1.0, atol=1e-5)


def spd(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), log_cond=st.floats(0.0, 4.0))
def test_convex_quadratic_solution_and_monotone_descent(seed, n, log_cond):
    rng = np.random.default_rng(seed)
    a, b = spd(rng, n, 10.0 ** log_cond), rng.normal(size=n)

    def fun(x):
        return 0.5 * float(x @ a @ x) - float(b @ x), a @ x - b

    trace = [fun(np.zeros(n))[0]]
    res = lbfgs.minimize(fun, np.zeros(n), maxiter=500, ftol=0.0, gtol=1e-10,
                         callback=lambda x: trace.append(fun(x)[0]))
    want = np.linalg.solve(a, b)
    # with ftol 0 it runs into rounding: then only the line search can stop it, never the iteration limit
    assert not res.message.startswith("STOP"), res.message
    assert np.max(np.abs(res.x - want)) <= 1e-6 * max(1.0, np.abs(want).max())
    assert np.all(np.diff(trace) <= 1e-12 * max(1.0, abs(trace[0])))  # every accepted step lowers f
    assert res.fun == pytest.approx(fun(res.x)[0])


def test_same_minimiser_as_scipy_on_logistic_regression():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 8))
    y = (x @ rng.normal(size=8) + rng.normal(size=500) > 0).astype(float)

    def fun(w):
        z = x @ w
        f = float(np.sum(np.logaddexp(0.0, z) - y * z)) / 500 + 1e-3 * float(w @ w)
        p = 0.5 * (1.0 + np.tanh(0.5 * z))
        return f, x.T @ (p - y) / 500 + 2e-3 * w

    ours = lbfgs.minimize(fun, np.zeros(8), ftol=1e-15, gtol=1e-12, maxiter=500)
    ref = scipy.optimize.minimize(fun, np.zeros(8), jac=True, method="L-BFGS-B",
                                  options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 500})
    assert np.allclose(ours.x, ref.x, atol=1e-7)


def test_iteration_limit_is_reported_and_the_point_is_never_worse_than_the_start():
    x0 = np.array([-1.2, 1.0])
    res = lbfgs.minimize(rosenbrock, x0, maxiter=3)
    assert res.nit == 3 and not res.converged and res.message.startswith("STOP")
    assert res.fun < rosenbrock(x0)[0]


def test_steps_into_non_finite_values_are_cut_back():
    """Outside the unit ball the objective is inf (like an overflow): the line search must shrink the step."""
    def fun(x):
        if x @ x >= 1.0:
            return np.inf, np.full_like(x, np.nan)
        return float(np.sum((x - 0.9 / np.sqrt(x.size)) ** 2)) - np.log1p(-x @ x), \
            2.0 * (x - 0.9 / np.sqrt(x.size)) + 2.0 * x / (1.0 - x @ x)

    res = lbfgs.minimize(fun, np.zeros(3), maxiter=200)
    assert res.converged and np.isfinite(res.fun) and res.x @ res.x < 1.0
    grad = fun(res.x)[1]
    assert np.max(np.abs(grad)) < 1e-4


def test_a_non_finite_start_is_refused_in_the_result():
    res = lbfgs.minimize(lambda x: (np.nan, x), np.ones(2))
    assert not res.converged and "not finite" in res.message and res.nit == 0
