"""Unconstrained L-BFGS with a strong-Wolfe line search, in numpy (so that `repair` never imports scipy).

The penalised refits (penalty.py) minimise a smooth objective of a few hundred to a few hundred thousand
parameters with an analytic gradient. scipy's L-BFGS-B does the job, but importing `scipy.optimize` takes
about half a second, which is a sixth of one plain inference pass over a 300,000-row file; this is the
textbook method (Nocedal & Wright, Numerical Optimization, 2nd ed.: two-loop recursion, Algorithm 7.4;
line search, Algorithms 3.5 and 3.6 with cubic interpolation), with scipy's stopping rules:

- `ftol`: stop when `(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= ftol`;
- `gtol`: stop when `max |grad| <= gtol`;
- `maxiter`: at most this many iterations (one iteration = one accepted line-search step).

Every point returned has the lowest objective seen; a failed line search (no step satisfying the Wolfe
conditions within `max_line_evals` evaluations, e.g. on a kink of a non-smooth penalty) ends the run at
the best point so far with a message saying so, as scipy's "ABNORMAL_TERMINATION_IN_LNSRCH" does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

Objective = Callable[[np.ndarray], "tuple[float, np.ndarray]"]

C1, C2 = 1e-4, 0.9


@dataclass(frozen=True)
class Result:
    """`x: [n]` the final point, `fun` its objective, `nit` iterations, `nfev` evaluations, `message` why it
    stopped; `converged` is True when a tolerance (not the iteration limit or the line search) stopped it."""

    x: np.ndarray
    fun: float
    nit: int
    nfev: int
    message: str
    converged: bool


class _Line:
    """The objective along `x + a d`, counting evaluations and keeping the best point seen."""

    def __init__(self, fun: Objective, x: np.ndarray, d: np.ndarray) -> None:
        self.fun, self.x, self.d = fun, x, d
        self.evals = 0

    def __call__(self, a: float) -> tuple[float, np.ndarray, float]:
        self.evals += 1
        f, g = self.fun(self.x + a * self.d)
        f = float(f)
        if not np.isfinite(f) or not np.all(np.isfinite(g)):
            return np.inf, g, np.nan
        return f, g, float(g @ self.d)


def _cubic_min(a: float, fa: float, da: float, b: float, fb: float, db: float) -> float | None:
    """Minimiser of the cubic through (a, fa, da), (b, fb, db), or None when it has none."""
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    disc = d1 * d1 - da * db
    if disc < 0 or not np.isfinite(disc):
        return None
    d2 = np.copysign(np.sqrt(disc), b - a)
    denom = db - da + 2.0 * d2
    if denom == 0:
        return None
    return float(b - (b - a) * (db + d2 - d1) / denom)


def _zoom(line: _Line, f0: float, d0: float, lo: tuple, hi: tuple, max_evals: int):
    """Algorithm 3.6: a step in the bracket [lo, hi] (tuples (a, f, g, dphi)) meeting the strong Wolfe conditions,
    or None."""
    while line.evals < max_evals:
        a_lo, f_lo, _, d_lo = lo
        a_hi, f_hi, _, d_hi = hi
        width = a_hi - a_lo
        if abs(width) <= 1e-16 * max(abs(a_lo), 1.0):
            return None
        trial = _cubic_min(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi) if np.isfinite(f_hi) and np.isfinite(d_hi) else None
        left, right = min(a_lo, a_hi), max(a_lo, a_hi)
        if trial is None or not (left + 0.1 * abs(width) <= trial <= right - 0.1 * abs(width)):
            trial = a_lo + 0.5 * width                                 # bisection when the cubic is no help
        f, g, d = line(trial)
        point = (trial, f, g, d)
        if f > f0 + C1 * trial * d0 or f >= f_lo:
            hi = point
        else:
            if abs(d) <= -C2 * d0:
                return point
            if d * (a_hi - a_lo) >= 0:
                hi = lo
            lo = point
    return None


def _line_search(line: _Line, f0: float, g0: np.ndarray, d0: float, a1: float, max_evals: int):
    """Algorithm 3.5: a step along the descent direction meeting the strong Wolfe conditions ((a, f, g) or None)."""
    prev = (0.0, f0, g0, d0)
    a = a1
    for i in range(max_evals):
        f, g, d = line(a)
        point = (a, f, g, d)
        if f > f0 + C1 * a * d0 or (i > 0 and f >= prev[1]) or not np.isfinite(f):
            found = _zoom(line, f0, d0, prev, point, max_evals)
            return None if found is None else found[:3]
        if abs(d) <= -C2 * d0:
            return point[:3]
        if d >= 0:
            found = _zoom(line, f0, d0, point, prev, max_evals)
            return None if found is None else found[:3]
        prev = point
        a *= 4.0
    return None


def minimize(fun: Objective, x0: np.ndarray, *, maxiter: int = 100, memory: int = 20, ftol: float = 1e-12,
             gtol: float = 1e-9, max_line_evals: int = 20,
             callback: Callable[[np.ndarray], None] | None = None) -> Result:
    """Minimise `fun(x) -> (f, grad: [n])` from `x0: [n]` (float64) by L-BFGS; see the module docstring."""
    x = np.array(x0, dtype=np.float64, copy=True).ravel()
    f, g = fun(x)
    f, g = float(f), np.asarray(g, dtype=np.float64).ravel()
    nfev = 1
    if not np.isfinite(f) or not np.all(np.isfinite(g)):
        return Result(x, f, 0, nfev, "the objective or its gradient is not finite at the start", False)
    pairs: deque[tuple[np.ndarray, np.ndarray, float]] = deque(maxlen=memory)
    for it in range(maxiter):
        if np.max(np.abs(g), initial=0.0) <= gtol:
            return Result(x, f, it, nfev, "CONVERGENCE: NORM OF GRADIENT <= GTOL", True)
        d = _direction(g, pairs)
        slope = float(g @ d)
        if not slope < 0:                                               # not a descent direction: restart
            pairs.clear()
            d, slope = -g, -float(g @ g)
        a1 = 1.0 if pairs else min(1.0, 1.0 / max(float(np.linalg.norm(g)), 1e-300))
        line = _Line(fun, x, d)
        step = _line_search(line, f, g, slope, a1, max_line_evals)
        nfev += line.evals
        if step is None:
            return Result(x, f, it, nfev, "ABNORMAL: LINE SEARCH FOUND NO WOLFE STEP", False)
        a, f_new, g_new = step
        g_new = np.asarray(g_new, dtype=np.float64).ravel()
        s, y = a * d, g_new - g
        sy = float(s @ y)
        if sy > 1e-10 * float(y @ y):                                   # keep the curvature pair only if positive
            pairs.append((s, y, 1.0 / sy))
        reduction = (f - f_new) / max(abs(f), abs(f_new), 1.0)
        x, f, g = x + s, f_new, g_new
        if callback is not None:
            callback(x)
        if reduction <= ftol:
            return Result(x, f, it + 1, nfev, "CONVERGENCE: RELATIVE REDUCTION OF F <= FTOL", True)
    return Result(x, f, maxiter, nfev, "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT", False)


def _direction(g: np.ndarray, pairs: deque) -> np.ndarray:
    """Two-loop recursion: `-H g` with the L-BFGS inverse-Hessian estimate H of the stored pairs."""
    q = -g.copy()
    alphas = []
    for s, y, rho in reversed(pairs):
        alpha = rho * float(s @ q)
        q -= alpha * y
        alphas.append(alpha)
    if pairs:
        s, y, rho = pairs[-1]
        q *= 1.0 / (rho * float(y @ y))                                  # gamma = s'y / y'y
    for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
        beta = rho * float(y @ q)
        q += (alpha - beta) * s
    return q
