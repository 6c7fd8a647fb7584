"""Penalised refits that push the groups' output DISTRIBUTIONS together, fitted on a sample of rows.

Objective over the free layers' `(W, b)` of a `Chain` (the last K layers; K = 1 is the final node):

    f = (1/m) sum_c mean_v((yhat_c - t_c)^2) / var_v(t_c)            fit, each output column c
        + ridge * (1/m) sum_c ||W_final[c]||^2 / var_v(t_c)          the refit's ridge on the final node
        + ridge * sum_{free hidden layers} ||W - W_start||^2          keeps tuned hidden layers near the model
        + lam * P(yhat[:, score_column])

with row weights v (normalised to sum 1; `RowSample.weight` restores population shares). At lam = 0
and K = 1 this is exactly the ridge least squares of `refit.solve(mode="plain", alpha=ridge)`.

With K = 1 and `moments` (a `fitmoments.FitMoments` of ALL fit rows) the fit term and var(t_c) are exact,
from the moments, in O(p^2) per evaluation with no rows (the final node is linear, so the MSE is a
quadratic in (W, b)); the rows given then serve the penalty alone, so they can be a small group-stratified
sample (what limits the penalty is the number of minority rows, see rowsample.py).

Penalties P for k >= 2 groups use the k-group pair weights `omega_gh = w_g w_h / tau`,
`tau = sum_{g<h} w_g w_h`, `w_g` the group's share of the row weight (k = 2: omega = 1):

- "cdf" (default): `sum_{g<h} omega_gh sum_j (F_g(u_j) - F_h(u_j))^2`, with sigmoid-smoothed CDFs
  `F_g(u) = mean_g sigmoid((yhat - u) / s)`, 64 thresholds u_j at the pooled 1-99% quantiles of the
  current outputs and `s = 0.03 sd(yhat)`; thresholds and s are re-fixed at the start of each of
  `rounds` L-BFGS rounds. Computed through the identity
  `sum_{g<h} w_g w_h (F_g - F_h)^2 = sum_g w_g (F_g - Fbar)^2`, `Fbar = sum_g w_g F_g` (O(k)).
- "w2": `sum_{g<h} omega_gh W2^2(g, h)`, the 1-D Wasserstein-2 distance from matched quantiles (the
  larger group's sorted outputs against the smaller group's quantiles, linearly interpolated);
  differentiable almost everywhere. Rows count equally within a group (row weights do not enter W2).

Large lam trades everything for parity: the penalty is scale-free, so the cheapest parity is an
output squeezed towards a constant (seen at lam = 30 on a synthetic problem: sd 1.2 -> 6e-4). Choose
lam with `choose_lambda` (out-of-fold KS against a budget), not by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from . import lbfgs
from .chain import Chain
from .errors import DataError, OptionError
from .fitmoments import FitMoments
from .metrics import ks_statistic
from .stats import quantile

PenaltyKind = Literal["cdf", "w2"]
N_THRESHOLDS = 64
TAU_SHARE = 0.03
#: Rows of the float64 [rows, N_THRESHOLDS] block the CDF penalty works on at once (32 MiB).
CDF_BLOCK_ROWS = 1 << 16
#: Groups with fewer evaluation rows than this are left out of the max pairwise KS.
MIN_KS_ROWS = 30


# ----------------------------------------------------------------------------- penalties
class _Groups:
    """Group codes mapped to 0..k-1, the row weights v (sum 1), group shares w and pair normaliser tau."""

    def __init__(self, group: np.ndarray, weights: np.ndarray) -> None:
        self.codes, self.index = np.unique(group, return_inverse=True)
        self.k = self.codes.size
        if self.k < 2:
            raise DataError(f"the penalised refit needs rows of at least 2 groups, got codes {self.codes.tolist()}")
        self.v = weights / weights.sum()
        self.w = np.bincount(self.index, weights=self.v, minlength=self.k)
        self.tau = 0.5 * (1.0 - np.sum(self.w ** 2))
        self.members = [np.flatnonzero(self.index == g) for g in range(self.k)]
        self.order = np.concatenate(self.members)                  # rows sorted by group
        ends = np.cumsum([m.size for m in self.members])
        self.slices = [slice(e - m.size, e) for e, m in zip(ends, self.members)]
        self.within = (self.v / self.w[self.index])[self.order]   # weights within each group, sum 1
        self._buffer: np.ndarray | None = None
        self._blocks: tuple[int, list] | None = None

    def workspace(self, columns: int, rows: int) -> np.ndarray:
        """A reused float64 buffer [rows, columns] (contents undefined)."""
        if self._buffer is None or self._buffer.shape != (rows, columns):
            self._buffer = np.empty((rows, columns))
        return self._buffer

    def blocks(self, size: int) -> list[tuple[int, int, int]]:
        """(group, start, stop) ranges of the group-sorted rows, each within one group and at most `size` rows;
        one range per group when all rows fit in `size`."""
        if self._blocks is None or self._blocks[0] != size:
            out = []
            for g, sl in enumerate(self.slices):
                step = sl.stop - sl.start if self.v.size <= size else size
                out += [(g, a, min(a + step, sl.stop)) for a in range(sl.start, sl.stop, max(step, 1))]
            self._blocks = (size, out)
        return self._blocks[1]


def cdf_penalty(s: np.ndarray, groups: _Groups, thresholds: np.ndarray, width: float) -> tuple[float, np.ndarray]:
    """Smoothed-CDF penalty of scores `s: [n]` and its gradient `[n]` (thresholds `[J]`, sigmoid width).

    Works on the rows sorted by group with sigmoid(a) = (1 + tanh(a / 2)) / 2 and per-group einsum
    sums: no BLAS call on the [n, J] block (skinny BLAS products were 10-50x slower on a busy machine),
    and in one reused float64 buffer of at most CDF_BLOCK_ROWS rows (a fresh 100 MB array per call cost
    4x the tanh itself). Up to CDF_BLOCK_ROWS rows the tanh block is computed once; beyond, it is
    computed block by block twice (once for the CDFs, once for the gradient), so memory stays bounded.
    """
    n, J = s.size, thresholds.size
    scale = 0.5 / width
    ordered = s[groups.order]
    blocks = groups.blocks(CDF_BLOCK_ROWS)
    buf = groups.workspace(J, min(n, CDF_BLOCK_ROWS))
    whole = n <= CDF_BLOCK_ROWS

    def tanh_block(a: int, b: int) -> np.ndarray:
        th = buf[:b - a] if not whole else buf[a:b]
        np.subtract(ordered[a:b, None], thresholds[None, :], out=th)
        th *= scale
        np.tanh(th, out=th)
        return th

    if whole:
        tanh_block(0, n)
    acc = np.zeros((groups.k, J))
    for g, a, b in blocks:
        th = buf[a:b] if whole else tanh_block(a, b)
        acc[g] += np.einsum("i,ij->j", groups.within[a:b], th)
    cdf = 0.5 + 0.5 * acc
    dev = cdf - groups.w @ cdf                                                     # F_g - Fbar, [k, J]
    value = float(groups.w @ np.einsum("gj,gj->g", dev, dev)) / groups.tau
    inner = np.empty(n)
    for g, a, b in blocks:
        th = buf[a:b] if whole else tanh_block(a, b)
        th *= th                                                                   # sigmoid' = (1 - th^2) / 4
        inner[a:b] = dev[g].sum() - np.einsum("ij,j->i", th, dev[g])
    grad = np.empty(n)
    grad[groups.order] = (0.5 / (groups.tau * width)) * groups.v[groups.order] * inner
    return value, grad


def _w2_pair(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """W2^2 between samples a and b by matched quantiles; gradients w.r.t. a and b (original order)."""
    swap = a.size < b.size
    big, small = (b, a) if swap else (a, b)
    ib, is_ = np.argsort(big, kind="stable"), np.argsort(small, kind="stable")
    nb, ns = big.size, small.size
    pos = np.clip((np.arange(nb) + 0.5) * (ns / nb) - 0.5, 0.0, ns - 1.0)
    j0 = np.floor(pos).astype(np.int64)
    j1 = np.minimum(j0 + 1, ns - 1)
    frac = pos - j0
    ssorted = small[is_]
    diff = big[ib] - ((1.0 - frac) * ssorted[j0] + frac * ssorted[j1])
    value = float(np.mean(diff * diff))
    g_big = np.empty(nb)
    g_big[ib] = 2.0 * diff / nb
    gs = np.bincount(j0, weights=-2.0 * diff * (1.0 - frac) / nb, minlength=ns)
    gs += np.bincount(j1, weights=-2.0 * diff * frac / nb, minlength=ns)
    g_small = np.empty(ns)
    g_small[is_] = gs
    return (value, g_small, g_big) if swap else (value, g_big, g_small)


def w2_penalty(s: np.ndarray, groups: _Groups) -> tuple[float, np.ndarray]:
    """Pair-weighted squared W2 penalty of scores `s: [n]` and its gradient `[n]` (a.e.)."""
    value, grad = 0.0, np.zeros(s.size)
    for g in range(groups.k):
        for h in range(g + 1, groups.k):
            ig, ih = groups.members[g], groups.members[h]
            if ig.size == 0 or ih.size == 0:
                continue
            omega = groups.w[g] * groups.w[h] / groups.tau
            val, gg, gh = _w2_pair(s[ig], s[ih])
            value += omega * val
            grad[ig] += omega * gg
            grad[ih] += omega * gh
    return value, grad


def max_pairwise_ks(scores: np.ndarray, group: np.ndarray, min_rows: int = MIN_KS_ROWS) -> float:
    """Largest exact KS between any two groups with at least `min_rows` rows (nan if fewer than 2 such)."""
    codes, counts = np.unique(group, return_counts=True)  # (return_counts also keeps numpy.ma out)
    codes = codes[counts >= min_rows]
    best = float("nan")
    for i, a in enumerate(codes):
        for b in codes[i + 1:]:
            ks = ks_statistic(scores[group == a], scores[group == b])
            best = ks if not best >= ks else best
    return best


# ----------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class PenalisedDiagnostics:
    """What a penalised fit did. `history[r]`: objective after each L-BFGS iteration of round r
    (first entry: the round's start). `fit_ks`: max pairwise KS on the fit rows (not a held-out
    number: report it beside an out-of-fold or test KS, never alone)."""

    lam: float
    kind: str
    tuned_layers: int
    objective: float
    mse_term: float
    penalty: float
    fit_ks: float
    iterations: tuple[int, ...]
    messages: tuple[str, ...]
    history: tuple[tuple[float, ...], ...] = field(default=())


def _tune_count(tune: str | int, n_layers: int) -> int:
    if tune == "final":
        return 1
    if tune == "all":
        return n_layers
    if isinstance(tune, (int, np.integer)) and not isinstance(tune, bool) and 1 <= tune <= n_layers:
        return int(tune)
    raise OptionError(f"tune={tune!r} must be 'final', 'all' or a layer count in 1..{n_layers}")


class _Objective:
    """The objective of the module docstring on fixed rows; thresholds re-fixed by `refix`. With `moments`
    (k = 1 only) the fit term comes from them and the rows serve the penalty alone."""

    def __init__(self, chain: Chain, h_in: np.ndarray, t: np.ndarray, groups: _Groups, k: int, *, lam: float,
                 kind: str, ridge: float, score_column: int, moments: FitMoments | None = None) -> None:
        self.chain, self.h_in, self.t, self.groups, self.k = chain, h_in, t, groups, k
        self.lam, self.kind, self.ridge, self.col = lam, kind, ridge, score_column
        self.moments = moments
        if moments is not None:
            final = chain.layers[-1]
            if k != 1 or final.act.kind != "identity":
                raise OptionError("the moment-based fit term needs the final linear node alone (tune='final', "
                                  "identity activation)")
            if (moments.p, moments.m) != final.W.shape[::-1]:
                raise DataError(f"the fit moments are of {moments.p} inputs and {moments.m} targets; the final "
                                f"node takes {final.W.shape[1]} and gives {final.W.shape[0]}")
            self.tvar = moments.tvar
        else:
            v = groups.v
            tbar = v @ t
            self.tvar = v @ (t - tbar) ** 2
        if np.any(self.tvar <= 0):
            raise DataError(f"target column(s) {np.flatnonzero(self.tvar <= 0).tolist()} are constant on the fit "
                            "rows: nothing to fit")
        self.m = t.shape[1]
        self.start = chain.params(k)
        sizes = [(lay.W.size, 0 if lay.b is None else lay.b.size) for lay in chain.layers[len(chain) - k:]]
        self.masks = []  # (slice of W in theta, is_final)
        pos = 0
        for i, (sw, sb) in enumerate(sizes):
            self.masks.append((slice(pos, pos + sw), i == k - 1))
            pos += sw + sb
        self.thresholds = np.zeros(N_THRESHOLDS)
        self.width = 1.0
        self.parts = (0.0, 0.0)

    def refix(self, theta: np.ndarray) -> None:
        s = self.chain.with_params(self.k, theta).forward(self.h_in, start=len(self.chain) - self.k)[:, self.col]
        self.thresholds = quantile(s, np.linspace(0.01, 0.99, N_THRESHOLDS))
        sd = float(np.std(s))
        self.width = TAU_SHARE * (sd if sd > 0 else float(np.sqrt(self.tvar[self.col])))

    def _moment_fit(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """The fit term and its gradient from the moments (k = 1: theta = [W.ravel(), b])."""
        (w, b), = self.chain.unflatten(1, theta)
        scale = 1.0 / (self.m * self.tvar)
        value, grad_w, grad_b = self.moments.mse(w, b)
        grad = np.empty_like(theta)
        grad[:w.size] = (grad_w * scale[:, None]).ravel()
        if b is not None:
            grad[w.size:] = grad_b * scale
        return float(value @ scale), grad

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        parts = {}
        exact = self.moments is not None

        def loss_grad(out: np.ndarray):
            if exact:
                mse, g = 0.0, np.zeros_like(out)
            else:
                resid = out - self.t
                scale = 1.0 / (self.m * self.tvar)
                mse = float(np.sum(self.groups.v @ (resid * resid) * scale))
                g = (2.0 * self.groups.v)[:, None] * resid * scale
            pen = 0.0
            if self.lam:
                s = out[:, self.col]
                if self.kind == "cdf":
                    pen, gs = cdf_penalty(s, self.groups, self.thresholds, self.width)
                else:
                    pen, gs = w2_penalty(s, self.groups)
                g[:, self.col] += self.lam * gs
            parts["mse"], parts["pen"] = mse, pen
            return mse + self.lam * pen, g

        if exact and not self.lam:
            value, grad = 0.0, np.zeros_like(theta)
            parts["mse"], parts["pen"] = 0.0, 0.0
        else:
            value, grad = self.chain.value_and_grad(self.h_in, self.k, theta, loss_grad)
        if exact:
            fit, fit_grad = self._moment_fit(theta)
            value += fit
            grad += fit_grad
            parts["mse"] = fit
        for sl, final in self.masks:
            if not self.ridge:
                continue
            if final:
                w = theta[sl].reshape(self.m, -1)
                cw = (self.ridge / (self.m * self.tvar))[:, None]
                value += float(np.sum(cw * w * w))
                grad[sl] += (2.0 * cw * w).ravel()
            else:
                delta = theta[sl] - self.start[sl]
                value += self.ridge * float(delta @ delta)
                grad[sl] += 2.0 * self.ridge * delta
        self.parts = (parts["mse"], parts["pen"])
        return value, grad


def _prepare(x, t, group, chain: Chain, weights, score_column: int):
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    t = np.asarray(t, dtype=np.float64).reshape(n, -1)
    group = np.asarray(group).ravel()
    if x.ndim != 2 or x.shape[1] != chain.n_inputs:
        raise DataError(f"x has shape {x.shape}, the chain takes [n, {chain.n_inputs}]")
    if t.shape[1] != chain.n_outputs or group.shape[0] != n:
        raise DataError(f"t has {t.shape[1]} columns and group {group.shape[0]} rows; the chain gives "
                        f"{chain.n_outputs} outputs for {n} rows")
    if not 0 <= score_column < chain.n_outputs:
        raise OptionError(f"score_column={score_column} is not an output column of the chain "
                          f"(0..{chain.n_outputs - 1})")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"row weights must be {n} finite non-negative numbers with a positive sum")
    return x, t, group, w


class _Whitened:
    """The final node's parameters in coordinates where the fit term's Hessian is the identity.

    With one free layer (the final node, identity activation) the fit term plus the ridge is a quadratic in
    `(W[c], b[c])` with Hessian, for each output column c, `(2 / (m var(t_c))) [[M + ridge I, zbar], [zbar^T, 1]]`,
    `M = E[z z^T]` the uncentred second moment of the node's input (exact from `FitMoments`, or from the weighted
    rows) and `zbar = E[z]`. The fit is run in `phi` with `theta = theta0 + T phi`, `T = V diag(e)^-1/2` per column
    (`e`, `V` the eigen-pairs of that Hessian, e floored at EIG_FLOOR times the largest): plain L-BFGS on the raw
    weights meets the condition number of `M` (1e6 and more after ReLU layers) and stops at its iteration limit far
    from the optimum, where the result then depends on rounding (batch sizes, file splits); whitened, it converges
    in tens of iterations. The optimum is the same: only the coordinates change.
    """

    EIG_FLOOR = 1e-12
    BLOCK = 16_384

    def __init__(self, obj: "_Objective") -> None:
        final = obj.chain.layers[-1]
        m, p = final.W.shape
        bias = final.b is not None
        mom = obj.moments
        if mom is not None:
            zbar = mom.mean_z
            second = mom.szz / mom.n + np.outer(zbar, zbar)
        else:  # the weighted rows, in blocks (no second [n, p] array)
            v, h = obj.groups.v, obj.h_in
            zbar = v @ h
            second = np.zeros((p, p))
            for a in range(0, h.shape[0], self.BLOCK):
                blk = h[a:a + self.BLOCK]
                second += (blk * v[a:a + self.BLOCK, None]).T @ blk
        q = p + bias
        base = np.empty((q, q))
        base[:p, :p] = second + obj.ridge * np.eye(p)
        if bias:
            base[:p, p] = base[p, :p] = zbar
            base[p, p] = 1.0
        e, vec = np.linalg.eigh(0.5 * (base + base.T))
        e = np.maximum(e, self.EIG_FLOOR * max(float(e[-1]), np.finfo(float).tiny))
        self.unit = vec / np.sqrt(e)                                   # [q, q], for a Hessian of `base`
        self.scale = np.sqrt(0.5 * m * obj.tvar)                       # [m]: column c's Hessian is base * 2/(m tvar_c)
        cols = np.arange(m)[:, None]
        index = np.empty((m, q), dtype=np.int64)                        # theta positions of (W[c], b[c])
        index[:, :p] = cols * p + np.arange(p)[None, :]
        if bias:
            index[:, p] = m * p + np.arange(m)
        self.index, self.q, self.m = index, q, m

    def theta(self, theta0: np.ndarray, phi: np.ndarray) -> np.ndarray:
        out = theta0.copy()
        out[self.index] += (phi.reshape(self.m, self.q) @ self.unit.T) * self.scale[:, None]
        return out

    def grad(self, grad_theta: np.ndarray) -> np.ndarray:
        return ((grad_theta[self.index] @ self.unit) * self.scale[:, None]).ravel()


class _Raw:
    """The parameters as they are (`theta = theta0 + phi`): more than the final node, or a non-linear one."""

    @staticmethod
    def theta(theta0: np.ndarray, phi: np.ndarray) -> np.ndarray:
        return theta0 + phi

    @staticmethod
    def grad(grad_theta: np.ndarray) -> np.ndarray:
        return grad_theta


def _fit_free(chain: Chain, h_in, t, group, w, k: int, *, lam, kind, ridge, rounds, maxiter, score_column,
              record: bool, moments: FitMoments | None = None) -> tuple[Chain, PenalisedDiagnostics]:
    groups = _Groups(group, w)
    obj = _Objective(chain, h_in, t, groups, k, lam=lam, kind=kind, ridge=ridge, score_column=score_column,
                     moments=moments)
    theta = obj.start.copy()
    coords = _Whitened(obj) if k == 1 and chain.layers[-1].act.kind == "identity" else _Raw()
    iters, msgs, history = [], [], []
    n_rounds = rounds if lam else 1
    for _ in range(n_rounds):
        obj.refix(theta)
        anchor = theta

        def fun(phi: np.ndarray) -> tuple[float, np.ndarray]:
            value, grad = obj(coords.theta(anchor, phi))
            return value, coords.grad(grad)

        trace = [obj(theta)[0]] if record else []
        callback = (lambda xk: trace.append(obj(coords.theta(anchor, xk))[0])) if record else None
        res = lbfgs.minimize(fun, np.zeros_like(theta), maxiter=maxiter, memory=20, ftol=1e-12, gtol=1e-9,
                             callback=callback)
        theta = coords.theta(anchor, res.x)
        iters.append(int(res.nit))
        msgs.append(str(res.message))
        history.append(tuple(trace))
    value = obj(theta)[0]
    new = chain.with_params(k, theta)
    s = new.forward(h_in, start=len(chain) - k)[:, score_column]
    diag = PenalisedDiagnostics(lam=float(lam), kind=kind, tuned_layers=k, objective=float(value),
                                mse_term=obj.parts[0], penalty=obj.parts[1], fit_ks=max_pairwise_ks(s, group),
                                iterations=tuple(iters), messages=tuple(msgs), history=tuple(history))
    return new, diag


def penalised_fit(x: np.ndarray, t: np.ndarray, group: np.ndarray, chain: Chain, *, lam: float,
                  kind: PenaltyKind = "cdf", tune: str | int = "final", ridge: float = 1e-4,
                  weights: np.ndarray | None = None, rounds: int = 4, maxiter: int = 300, score_column: int = 0,
                  record: bool = False, moments: FitMoments | None = None) -> tuple[Chain, PenalisedDiagnostics]:
    """Fit the last layers of `chain` with a distribution-parity penalty (see the module docstring).

    Args:
        x: [n, d_0] input of the chain's first layer; t: [n, m] (or [n]) target; group: [n] int codes.
        chain: the starting point (pass the `fair` refit as its final layer); it is not changed.
        lam: penalty weight >= 0. kind: "cdf" or "w2". tune: "final" (the final node), "all" or K
            (the last K layers are free; the rest stay fixed). ridge: >= 0, see the module docstring.
        weights: [n] row weights (e.g. `RowSample.weight`), default equal.
        rounds: L-BFGS rounds (the CDF thresholds are re-fixed at each). maxiter: iterations per round.
        score_column: the output column whose distribution is penalised; every column is fitted.
        record: keep the objective after every iteration in `diagnostics.history` (costs one evaluation each).
        moments: the exact fit statistics of ALL fit rows (`FitMoments`, tune "final" or 1 only): the fit term
            and var(t) come from them, and x, t, group, weights serve the penalty (and `fit_ks`) alone.

    Returns:
        (new Chain, PenalisedDiagnostics).
    """
    if kind not in ("cdf", "w2"):
        raise OptionError(f"penalty kind {kind!r} is not 'cdf' or 'w2'")
    if not (np.isfinite(lam) and lam >= 0) or not (np.isfinite(ridge) and ridge >= 0):
        raise OptionError(f"lam={lam!r} and ridge={ridge!r} must be finite and >= 0")
    if rounds < 1 or maxiter < 1:
        raise OptionError(f"rounds={rounds} and maxiter={maxiter} must be >= 1")
    x, t, group, w = _prepare(x, t, group, chain, weights, score_column)
    k = _tune_count(tune, len(chain))
    h_in = chain.forward(x, stop=len(chain) - k)
    if moments is not None and k != 1:
        raise OptionError(f"tune={tune!r}: the moment-based fit term is for the final node alone (tune='final')")
    return _fit_free(chain, h_in, t, group, w, k, lam=float(lam), kind=kind, ridge=float(ridge), rounds=rounds,
                     maxiter=maxiter, score_column=score_column, record=record, moments=moments)


def fold_ids(group: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Group-stratified fold id `[n]` in 0..folds-1 (each group's rows shuffled with the seed, dealt round-robin)."""
    group = np.asarray(group).ravel()
    rng = np.random.default_rng(seed)
    out = np.empty(group.size, dtype=np.int64)
    start = 0
    for code in np.unique(group):
        idx = np.flatnonzero(group == code)
        out[rng.permutation(idx)] = (start + np.arange(idx.size)) % folds
        start = (start + idx.size) % folds
    return out


@dataclass(frozen=True)
class LambdaRow:
    """One grid point: out-of-fold max pairwise KS and MSE (score column), mean fit-row KS over folds."""

    lam: float
    oof_ks: float
    oof_mse: float
    fit_ks: float


def choose_lambda(x: np.ndarray, t: np.ndarray, group: np.ndarray, chain: Chain, grid: Sequence[float], *,
                  budget_ks: float, folds: int = 5, kind: PenaltyKind = "cdf", tune: str | int = "final",
                  ridge: float = 1e-4, weights: np.ndarray | None = None, rounds: int = 4, maxiter: int = 300,
                  score_column: int = 0, seed: int = 0, full_table: bool = False
                  ) -> tuple[float | None, list[LambdaRow]]:
    """Smallest lam of `grid` whose pooled k-fold out-of-fold KS is <= `budget_ks`.

    For each lam (ascending) and each fold, fit on the other folds from `chain`, predict the held-out
    fold; pool the out-of-fold predictions and take the max pairwise KS over groups with at least
    `MIN_KS_ROWS` rows. Stops at the first lam meeting the budget unless `full_table`. The caller
    refits on all rows with the chosen lam. Folds are group-stratified (`fold_ids(group, folds, seed)`).

    Returns:
        (lam or None when no lam meets the budget, [LambdaRow] for the grid points evaluated).
    """
    grid = sorted(float(g) for g in grid)
    if not grid or grid[0] < 0 or not np.all(np.isfinite(grid)):
        raise OptionError(f"lambda grid {grid} must be non-empty, finite and >= 0")
    if not 0 < budget_ks <= 1:
        raise OptionError(f"budget_ks={budget_ks!r} must be in (0, 1]")
    if folds < 2:
        raise OptionError(f"folds={folds} must be >= 2")
    if kind not in ("cdf", "w2"):
        raise OptionError(f"penalty kind {kind!r} is not 'cdf' or 'w2'")
    x, t, group, w = _prepare(x, t, group, chain, weights, score_column)
    k = _tune_count(tune, len(chain))
    h_in = chain.forward(x, stop=len(chain) - k)
    fold = fold_ids(group, folds, seed)
    table: list[LambdaRow] = []
    chosen = None
    for lam in grid:
        oof = np.empty(x.shape[0])
        fit_ks = []
        for f in range(folds):
            tr, te = fold != f, fold == f
            new, diag = _fit_free(chain, h_in[tr], t[tr], group[tr], w[tr], k, lam=lam, kind=kind, ridge=ridge,
                                  rounds=rounds, maxiter=maxiter, score_column=score_column, record=False)
            oof[te] = new.forward(h_in[te], start=len(chain) - k)[:, score_column]
            fit_ks.append(diag.fit_ks)
        err = oof - t[:, score_column]
        if not np.isfinite(max_pairwise_ks(oof, group)):
            raise DataError(f"fewer than 2 groups have {MIN_KS_ROWS} rows: the out-of-fold KS cannot be measured")
        row = LambdaRow(lam=lam, oof_ks=max_pairwise_ks(oof, group), oof_mse=float(np.average(err * err, weights=w)),
                        fit_ks=float(np.nanmean(fit_ks)))
        table.append(row)
        if chosen is None and row.oof_ks <= budget_ks:
            chosen = lam
            if not full_table:
                break
    return chosen, table
