"""Penalised refits (onnx_esvd.penalty), the layer chain (onnx_esvd.chain) and the row sample (onnx_esvd.rowsample)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_esvd.chain import Chain, activation
from onnx_esvd.errors import DataError, OptionError
from onnx_esvd.fitmoments import FitMoments
from onnx_esvd.metrics import ks_statistic
from onnx_esvd.penalty import (
    _Groups,
    _Objective,
    cdf_penalty,
    choose_lambda,
    fold_ids,
    max_pairwise_ks,
    penalised_fit,
    w2_penalty,
)
from onnx_esvd.refit import solve
from onnx_esvd.rowsample import StratifiedSample, water_level
from onnx_esvd.stats import Moments

H = 5
ACTIVATIONS = {
    "relu": "relu",
    "leaky_relu": ("leaky_relu", 0.1),
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "gelu": "gelu",
    "gelu_tanh": ("gelu", "tanh"),
    "batchnorm": ("batchnorm", [1.2, 0.5, 0.8, 1.5, 1.0], [0.1, -0.2, 0.0, 0.3, 0.5], [0.2, 0.1, -0.3, 0.0, 0.4],
                  [1.5, 0.7, 2.0, 0.9, 1.1], 1e-5),
    "add_const": ("add_const", [0.5, -1.0, 0.2, 0.0, 1.5]),
    "identity": "identity",
}


def synthetic(seed: int, n: int, d: int = 6, minority: float = 0.3):
    """Rows x whose distribution (mean and spread) depends on the group; t depends non-linearly on x."""
    rng = np.random.default_rng(seed)
    g = (rng.random(n) < minority).astype(np.int64)
    x = rng.normal(size=(n, d)) * (1.0 + 0.8 * g[:, None] * (np.arange(d) < 3)) + 0.6 * g[:, None]
    t = np.tanh(x @ rng.normal(size=d) / 2)[:, None] + 0.5 * x[:, :1] + 0.1 * rng.normal(size=(n, 1))
    return x, t, g


def two_layer(seed: int, act, d: int = 6, m: int = 1) -> Chain:
    rng = np.random.default_rng(seed)
    return Chain([(rng.normal(size=(H, d)) / 2, 0.1 * rng.normal(size=H), act),
                  (rng.normal(size=(m, H)), np.zeros(m), "identity")])


# ----------------------------------------------------------------------------- chain
def test_chain_forward_matches_direct_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 6))
    for name, spec in ACTIVATIONS.items():
        chain = two_layer(1, spec)
        w1, b1 = chain.layers[0].W, chain.layers[0].b
        a = x @ w1.T + b1
        if name == "batchnorm":
            sc, bi, mu, var, eps = (np.asarray(v) for v in spec[1:])
            h = (a - mu) / np.sqrt(var + eps) * sc + bi
        elif name == "gelu":
            h = a * 0.5 * (1 + scipy.special.erf(a / np.sqrt(2)))
        elif name == "gelu_tanh":
            h = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
        elif name == "add_const":
            h = a + np.asarray(spec[1])
        elif name == "leaky_relu":
            h = np.where(a > 0, a, 0.1 * a)
        else:
            h = {"relu": np.maximum(a, 0), "sigmoid": 1 / (1 + np.exp(-a)), "tanh": np.tanh(a), "identity": a}[name]
        want = h @ chain.layers[1].W.T + chain.layers[1].b
        assert np.allclose(chain.forward(x), want, rtol=1e-12, atol=1e-12), name


def test_bad_activation_and_shapes_are_refused():
    with pytest.raises(OptionError, match="unknown activation"):
        activation("swish")
    with pytest.raises(OptionError, match="width 5"):
        activation(("add_const", [1.0, 2.0]), width=5)
    with pytest.raises(OptionError, match="layer 1 takes"):
        Chain([(np.ones((3, 2)), None, "relu"), (np.ones((1, 4)), None)])


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("kind", ["cdf", "w2"])
def test_gradients_match_central_differences(act, kind):
    x, t, g = synthetic(3, 160)
    t2 = np.hstack([t, t ** 2])
    chain = two_layer(2, ACTIVATIONS[act], m=2)
    rng = np.random.default_rng(5)
    for k in (1, 2):  # tune final / all
        h_in = chain.forward(x, stop=len(chain) - k)
        obj = _Objective(chain, h_in, t2, _Groups(g, rng.uniform(0.5, 2.0, size=g.size)), k, lam=3.0, kind=kind,
                         ridge=0.05, score_column=1)
        theta = chain.params(k) + 0.01 * rng.normal(size=chain.params(k).size)
        obj.refix(theta)
        _, grad = obj(theta)
        step = 1e-6
        numeric = np.array([(obj(theta + e)[0] - obj(theta - e)[0]) / (2 * step)
                            for e in np.eye(theta.size) * step])
        assert np.max(np.abs(numeric - grad)) <= 1e-6 * np.max(np.abs(grad)), (act, kind, k)


# ----------------------------------------------------------------------------- moment-based fit term
def final_only(seed: int, m: int = 2, bias: bool = True) -> Chain:
    rng = np.random.default_rng(seed)
    return Chain([(rng.normal(size=(m, 6)), rng.normal(size=m) if bias else None, "identity")])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), bias=st.booleans(), shift=st.floats(-50, 50))
def test_moment_mse_equals_the_row_mse_and_its_gradient(seed, bias, shift):
    x, t, _ = synthetic(seed, 300)
    x = x + shift  # far-off means: the centred form must not cancel
    t2 = np.hstack([t, t ** 2])
    layer = final_only(seed, bias=bias).layers[0]
    mom = FitMoments.from_rows(x, t2)
    value, gw, gb = mom.mse(layer.W, layer.b)
    resid = x @ layer.W.T + (0.0 if layer.b is None else layer.b) - t2
    assert np.allclose(value, np.mean(resid ** 2, axis=0), rtol=1e-9, atol=1e-9 * np.var(t2, axis=0).max())
    assert np.allclose(gw, 2 * resid.T @ x / x.shape[0], rtol=1e-7, atol=1e-7 * np.abs(gw).max())
    assert np.allclose(gb, 2 * resid.mean(axis=0), rtol=1e-7, atol=1e-7 * (1 + np.abs(gb).max()))
    assert np.allclose(mom.tvar, np.var(t2, axis=0), rtol=1e-10)


@pytest.mark.parametrize("kind", ["cdf", "w2"])
@pytest.mark.parametrize("bias", [True, False])
def test_moment_objective_equals_the_row_objective_when_every_row_counts(kind, bias):
    """All rows, weights 1: the moment-based objective is the row-based one, value and gradient."""
    x, t, g = synthetic(7, 400)
    t2 = np.hstack([t, t ** 2])
    chain = final_only(3, bias=bias)
    groups = _Groups(g, np.ones(g.size))
    rows = _Objective(chain, x, t2, groups, 1, lam=2.0, kind=kind, ridge=0.05, score_column=1)
    exact = _Objective(chain, x, t2, groups, 1, lam=2.0, kind=kind, ridge=0.05, score_column=1,
                       moments=FitMoments.from_rows(x, t2))
    theta = chain.params(1) + 0.1 * np.random.default_rng(1).normal(size=chain.params(1).size)
    rows.refix(theta)
    exact.refix(theta)
    (v1, g1), (v2, g2) = rows(theta), exact(theta)
    assert v2 == pytest.approx(v1, rel=1e-10)
    assert np.allclose(g2, g1, rtol=1e-8, atol=1e-10 * np.abs(g1).max())
    assert exact.parts == pytest.approx(rows.parts, rel=1e-10)


@pytest.mark.parametrize("kind", ["cdf", "w2"])
def test_moment_objective_gradient_matches_central_differences_on_a_penalty_sample(kind):
    """Moments of all rows, the penalty on a weighted subsample: the gradient is the objective's."""
    x, t, g = synthetic(8, 900)
    t2 = np.hstack([t, t ** 2])
    chain = final_only(4)
    keep = np.random.default_rng(2).random(g.size) < 0.3
    obj = _Objective(chain, x[keep], t2[keep], _Groups(g[keep], np.random.default_rng(3).uniform(1, 4, keep.sum())),
                     1, lam=3.0, kind=kind, ridge=0.05, score_column=1, moments=FitMoments.from_rows(x, t2))
    theta = chain.params(1) + 0.01 * np.random.default_rng(5).normal(size=chain.params(1).size)
    obj.refix(theta)
    _, grad = obj(theta)
    step = 1e-6
    numeric = np.array([(obj(theta + e)[0] - obj(theta - e)[0]) / (2 * step) for e in np.eye(theta.size) * step])
    assert np.max(np.abs(numeric - grad)) <= 1e-6 * np.max(np.abs(grad)), kind


def test_moment_fit_matches_the_row_fit_when_every_row_is_kept_and_falls_monotonically():
    x, t, g = synthetic(9, 1500)
    chain = final_only(5, m=1)
    for kind in ("cdf", "w2"):
        rows, d1 = penalised_fit(x, t, g, chain, lam=1.0, kind=kind, rounds=2, maxiter=200)
        exact, d2 = penalised_fit(x, t, g, chain, lam=1.0, kind=kind, rounds=2, maxiter=200, record=True,
                                  moments=FitMoments.from_rows(x, t))
        assert np.allclose(exact.layers[0].W, rows.layers[0].W, rtol=1e-4, atol=1e-5), kind
        assert exact.layers[0].b == pytest.approx(rows.layers[0].b, rel=1e-4, abs=1e-5)
        assert d2.mse_term == pytest.approx(d1.mse_term, rel=1e-6) and d2.fit_ks == pytest.approx(d1.fit_ks, abs=1e-9)
        assert len(d2.history[0]) > 3, kind
        for trace in d2.history:
            assert np.all(np.diff(trace) <= 1e-12 * abs(trace[0])), kind


def test_moment_fit_at_lambda_zero_is_ridge_least_squares_of_all_rows_from_a_few_rows():
    """The fit term uses every row through the moments; the rows given (a few) do not change the solution."""
    x, t, g = synthetic(10, 3000)
    z = final_only(6, m=1)
    mo = [Moments(7), Moments(7)]
    for c in (0, 1):
        mo[c].add(np.hstack([x[g == c], t[g == c]]))
    want = solve(mo, 6, mode="plain", alpha=1e-2, fit_intercept=True)
    few = np.r_[np.flatnonzero(g == 0)[:40], np.flatnonzero(g == 1)[:40]]
    new, _ = penalised_fit(x[few], t[few], g[few], z, lam=0.0, ridge=1e-2, maxiter=500,
                           moments=FitMoments.from_groups(mo, 6))
    assert np.allclose(new.layers[0].W, want.coef, rtol=1e-5, atol=1e-7)
    assert np.allclose(new.layers[0].b, want.intercept, rtol=1e-5, atol=1e-7)


def test_moment_fit_refuses_more_than_the_final_node_and_mismatched_moments():
    x, t, g = synthetic(11, 200)
    mom = FitMoments.from_rows(two_layer(1, "relu").forward(x, stop=1), t)
    with pytest.raises(OptionError, match="final node alone"):
        penalised_fit(x, t, g, two_layer(1, "relu"), lam=1.0, tune="all", moments=mom)
    with pytest.raises(DataError, match="fit moments"):
        penalised_fit(x, t, g, final_only(1, m=1), lam=1.0, moments=mom)


# ----------------------------------------------------------------------------- penalties
def test_cdf_penalty_k2_is_the_binary_sum_and_k3_the_pair_weighted_sum():
    rng = np.random.default_rng(0)
    s = rng.normal(size=300)
    u, width = np.linspace(-1, 1, 9), 0.1
    sig = scipy.special.expit((s[:, None] - u) / width)
    g2 = (rng.random(300) < 0.4).astype(int)
    binary = np.sum((sig[g2 == 0].mean(0) - sig[g2 == 1].mean(0)) ** 2)
    assert cdf_penalty(s, _Groups(g2, np.ones(300)), u, width)[0] == pytest.approx(binary, rel=1e-12)
    g3 = rng.integers(0, 3, size=300)
    grp = _Groups(g3, np.ones(300))
    f = [sig[g3 == c].mean(0) for c in range(3)]
    pairs = sum(grp.w[a] * grp.w[b] / grp.tau * np.sum((f[a] - f[b]) ** 2) for a in range(3) for b in range(a + 1, 3))
    assert cdf_penalty(s, grp, u, width)[0] == pytest.approx(pairs, rel=1e-12)


def test_cdf_penalty_in_blocks_equals_the_whole_block(monkeypatch):
    """Past CDF_BLOCK_ROWS rows the tanh block is computed in bounded pieces (twice): same value and gradient."""
    import onnx_esvd.penalty as pen

    rng = np.random.default_rng(4)
    s, g3 = rng.normal(size=1000), rng.integers(0, 3, size=1000)
    u, width, weights = np.linspace(-1.5, 1.5, 11), 0.2, rng.uniform(0.5, 2.0, size=1000)
    whole_value, whole_grad = cdf_penalty(s, _Groups(g3, weights), u, width)
    monkeypatch.setattr(pen, "CDF_BLOCK_ROWS", 97)
    grp = _Groups(g3, weights)
    value, grad = cdf_penalty(s, grp, u, width)
    assert grp.workspace(u.size, 97).shape == (97, u.size)  # the buffer is bounded by the block size
    assert value == pytest.approx(whole_value, rel=1e-12)
    assert np.max(np.abs(grad - whole_grad)) <= 1e-12 * np.abs(whole_grad).max()


def test_w2_penalty_equal_sizes_is_matched_sorted_differences():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(1.0, 2.0, size=50)
    s = np.concatenate([a, b])
    g = np.repeat([0, 1], 50)
    assert w2_penalty(s, _Groups(g, np.ones(100)))[0] == pytest.approx(np.mean((np.sort(a) - np.sort(b)) ** 2))


def test_objective_falls_monotonically_within_each_round():
    x, t, g = synthetic(4, 600)
    chain = two_layer(3, "tanh")
    for kind in ("cdf", "w2"):
        _, diag = penalised_fit(x, t, g, chain, lam=2.0, kind=kind, tune="all", rounds=2, maxiter=30, record=True)
        for trace in diag.history:
            steps = np.diff(trace)
            assert len(trace) > 3 and np.all(steps <= 1e-12 * abs(trace[0])), kind


def test_lambda_zero_final_node_is_ridge_least_squares():
    x, t, g = synthetic(5, 800)
    chain = two_layer(4, "relu")
    z = chain.forward(x, stop=1)
    mo = [Moments(H + 1), Moments(H + 1)]
    for c in (0, 1):
        mo[c].add(np.hstack([z[g == c], t[g == c]]))
    want = solve([mo[0], mo[1]], H, mode="plain", alpha=1e-2, fit_intercept=True)
    new, _ = penalised_fit(x, t, g, chain, lam=0.0, tune="final", ridge=1e-2, maxiter=500)
    assert np.allclose(new.layers[1].W, want.coef, rtol=1e-4, atol=1e-6)
    assert np.allclose(new.layers[1].b, want.intercept, rtol=1e-4, atol=1e-6)
    assert np.array_equal(new.layers[0].W, chain.layers[0].W)  # frozen layer untouched


@pytest.mark.parametrize("kind", ["cdf", "w2"])
def test_penalty_reduces_held_out_ks(kind):
    x, t, g = synthetic(6, 4000)
    xt, tt, gt = synthetic(7, 4000)
    chain = two_layer(5, "relu")
    base, d0 = penalised_fit(x, t, g, chain, lam=0.0, tune="final", ridge=1e-3)
    fair, d1 = penalised_fit(x, t, g, base, lam=10.0, kind=kind, tune="final", ridge=1e-3, maxiter=60)
    ks0 = ks_statistic(base.forward(xt)[gt == 0, 0], base.forward(xt)[gt == 1, 0])
    ks1 = ks_statistic(fair.forward(xt)[gt == 0, 0], fair.forward(xt)[gt == 1, 0])
    assert ks0 > 0.2 and ks1 < 0.65 * ks0  # converged w2 optimum: 0.202 -> 0.119; cdf: -> 0.048
    assert d1.fit_ks < 0.6 * d0.fit_ks


def test_multi_output_penalises_the_named_column_and_fits_all():
    x, t, g = synthetic(8, 2000)
    t2 = np.hstack([t, 2 * t + 0.3 * x[:, 2:3]])
    chain = two_layer(6, "tanh", m=2)
    base, _ = penalised_fit(x, t2, g, chain, lam=0.0, tune="final", ridge=1e-3)
    new, _ = penalised_fit(x, t2, g, base, lam=3.0, tune="final", ridge=1e-3, score_column=1, maxiter=60)
    out0, out1 = base.forward(x), new.forward(x)
    ks = lambda y, c: ks_statistic(y[g == 0, c], y[g == 1, c])  # noqa: E731
    assert ks(out1, 1) < 0.5 * ks(out0, 1)
    assert np.allclose(out1[:, 0], out0[:, 0], atol=1e-3 * np.std(out0[:, 0]))  # column 0 unpenalised: same LS fit


def test_fit_refuses_bad_options():
    x, t, g = synthetic(9, 100)
    chain = two_layer(7, "relu")
    with pytest.raises(OptionError, match="tune"):
        penalised_fit(x, t, g, chain, lam=1.0, tune=3)
    with pytest.raises(OptionError, match="kind"):
        penalised_fit(x, t, g, chain, lam=1.0, kind="ks")
    with pytest.raises(DataError, match="at least 2 groups"):
        penalised_fit(x, t, np.zeros(100, dtype=int), chain, lam=1.0)
    with pytest.raises(OptionError, match="score_column"):
        penalised_fit(x, t, g, chain, lam=1.0, score_column=1)


# ----------------------------------------------------------------------------- lambda choice
def test_choose_lambda_takes_the_smallest_lambda_meeting_the_budget():
    x, t, g = synthetic(10, 1500)
    chain = two_layer(8, "relu")
    base, _ = penalised_fit(x, t, g, chain, lam=0.0, tune="final", ridge=1e-3)
    grid = [0.0, 1.0, 10.0, 100.0]
    _, table = choose_lambda(x, t, g, base, grid, budget_ks=1.0, folds=3, ridge=1e-3, maxiter=40, full_table=True)
    ks = [row.oof_ks for row in table]
    assert [row.lam for row in table] == grid and ks[0] > ks[-1]
    budget = 0.5 * (ks[0] + min(ks))
    lam, short = choose_lambda(x, t, g, base, grid, budget_ks=budget, folds=3, ridge=1e-3, maxiter=40)
    first = next(row.lam for row in table if row.oof_ks <= budget)
    assert lam == first and lam > 0
    assert [row.oof_ks for row in short] == ks[:len(short)] and short[-1].lam == lam  # deterministic, stops there
    assert all(row.fit_ks <= 1 and row.oof_mse > 0 for row in table)
    none, _ = choose_lambda(x, t, g, base, [0.0, 0.1], budget_ks=1e-4, folds=3, ridge=1e-3, maxiter=20)
    assert none is None


def test_fold_ids_are_stratified():
    g = np.array([0] * 50 + [1] * 7)
    f = fold_ids(g, 5, seed=0)
    assert set(np.bincount(f[g == 0])) == {10}
    assert max(np.bincount(f[g == 1], minlength=5)) - min(np.bincount(f[g == 1], minlength=5)) <= 1


def test_max_pairwise_ks_skips_small_groups():
    s = np.r_[np.zeros(40), np.ones(40), np.full(5, 9.0)]
    g = np.r_[np.zeros(40), np.ones(40), np.full(5, 2)].astype(int)
    assert max_pairwise_ks(s, g) == 1.0
    assert np.isnan(max_pairwise_ks(s[:45], g[:45]))


# ----------------------------------------------------------------------------- row sample
def feed(sample, x, t, g, sizes):
    start = 0
    for size in sizes:
        sample.add(x[start:start + size], t[start:start + size], g[start:start + size])
        start += size
    assert start == len(x)
    return sample.result()


def test_sample_is_bounded_stratified_and_keeps_minority_rows():
    rng = np.random.default_rng(0)
    n = 20_000
    g = (rng.random(n) < 0.05).astype(np.int64)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    t = rng.normal(size=n)
    res = feed(StratifiedSample(capacity=3000, min_keep_per_group=500, seed=1), x, t, g, [4000] * 5)
    assert res.seen == {0: int(np.sum(g == 0)), 1: int(np.sum(g == 1))}
    assert res.kept[1] == res.seen[1]                 # every minority row
    assert res.kept[0] == 3000 - res.seen[1]          # the majority fills the rest
    assert len(res.x) == 3000 and res.x.dtype == np.float32
    assert np.array_equal(res.x, x[res.index]) and np.array_equal(res.group, g[res.index])
    assert np.all(np.diff(res.index) > 0)
    assert np.allclose(res.weight[res.group == 0], res.seen[0] / res.kept[0])
    assert np.all(res.weight[res.group == 1] == 1)


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 2999), max_size=6), seed=st.integers(0, 3))
def test_sample_does_not_depend_on_batch_boundaries(cuts, seed):
    rng = np.random.default_rng(seed)
    n = 3000
    g = rng.integers(0, 3, size=n) * (rng.random(n) < 0.7)
    x, t = rng.normal(size=(n, 2)), rng.normal(size=(n, 1))
    edges = np.diff(np.r_[0, sorted(set(cuts)), n]).astype(int)
    one = feed(StratifiedSample(capacity=700, min_keep_per_group=50, seed=seed), x, t, g, [n])
    many = feed(StratifiedSample(capacity=700, min_keep_per_group=50, seed=seed), x, t, g, list(edges))
    assert np.array_equal(one.index, many.index)
    other = feed(StratifiedSample(capacity=700, min_keep_per_group=50, seed=seed + 10), x, t, g, [n])
    assert not np.array_equal(one.index, other.index)


def test_sample_buffers_stay_near_the_level_and_float64_result_is_exact():
    """Rows above a group's cut are dropped on arrival: the buffer never holds much more than the level, and the
    rows handed over (float64 on request) are exactly the rows an unbuffered sample keeps."""
    rng = np.random.default_rng(7)
    n = 40_000
    g = (rng.random(n) < 0.2).astype(np.int64)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    t = rng.normal(size=n)
    sample = StratifiedSample(capacity=2000, min_keep_per_group=100, seed=3)
    for start in range(0, n, 500):
        sample.add(x[start:start + 500], t[start:start + 500], g[start:start + 500])
        level = sample.level()
        assert all(b <= level + max(level // 4, 500) for b in sample._buffered.values())
    res = sample.result(np.float64)
    one = feed(StratifiedSample(capacity=2000, min_keep_per_group=100, seed=3), x, t, g, [n])
    assert res.x.dtype == np.float64 and np.array_equal(res.index, one.index)
    assert np.array_equal(res.x, x[res.index].astype(np.float64)) and np.array_equal(res.weight, one.weight)
    assert sample._chunks == {}  # handed over: no buffered copy is left beside the result
    again = sample.result(np.float64)
    assert again.x is res.x and np.array_equal(sample.result().index, res.index)  # later calls: the same rows


def test_water_level_and_floor():
    assert water_level([10, 1000], 500, 0) == 490
    assert water_level([10, 20], 500, 0) == 20
    assert water_level([400, 1000, 1000], 600, 300) == 300  # the floor wins over the capacity


# ----------------------------------------------------------------------------- end to end
def final_node_rows(seed: int, n: int, p: int = 10):
    """Final-node inputs z whose groups differ in mean AND spread; targets carry the group signal."""
    rng = np.random.default_rng(seed)
    g = (rng.random(n) < 0.3).astype(np.int64)
    spread = 1.0 + g[:, None] * np.linspace(-0.5, 1.0, p)
    z = rng.normal(size=(n, p)) * spread + 0.5 * g[:, None] * np.linspace(1, 0, p)
    t = z @ np.linspace(1.0, -0.5, p)[:, None] + 0.5 * g[:, None] + 0.5 * rng.normal(size=(n, 1))
    return z, t, g


def end_to_end(n_fit: int = 6000, n_test: int = 20000, lam: float = 1.0):
    """Fit fair, mean+variance (kappa = 0) and CDF-penalised refits; (name -> (test MSE, test KS))."""
    from onnx_esvd.refit_moments import solve_moments

    p = 10
    z, t, g = final_node_rows(0, n_fit, p)
    zt, tt, gt = final_node_rows(1, n_test, p)
    mo = [Moments(p + 1), Moments(p + 1)]
    for c in (0, 1):
        mo[c].add(np.hstack([z[g == c], t[g == c]]))
    fair = solve([mo[0], mo[1]], p, mode="fair", alpha=1e-4, fit_intercept=True)
    var = solve_moments(mo, p, alpha=1e-4, fit_intercept=True, kappa=0.0)
    cdf, _ = penalised_fit(z, t, g, Chain([(fair.coef, fair.intercept, "identity")]), lam=lam, kind="cdf",
                           ridge=1e-4)
    out = {}
    for name, predict in (("fair", lambda a: a @ fair.coef.T + fair.intercept),
                          ("moments", lambda a: a @ var.coef.T + var.intercept), ("cdf", cdf.forward)):
        y = predict(zt)[:, 0]
        out[name] = (float(np.mean((y - tt[:, 0]) ** 2)), ks_statistic(y[gt == 0], y[gt == 1]))
    return out


def test_end_to_end_distribution_parity_beats_mean_parity_on_test_rows():
    res = end_to_end()
    assert res["moments"][1] < 0.6 * res["fair"][1]
    assert res["cdf"][1] < 0.6 * res["fair"][1]
    assert res["moments"][0] < 1.5 * res["fair"][0] and res["cdf"][0] < 1.5 * res["fair"][0]


def test_three_groups_penalty_reduces_max_pairwise_ks():
    rng = np.random.default_rng(12)
    n = 3000
    g = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    x = rng.normal(size=(n, 4)) * (1 + 0.5 * g[:, None]) + 0.4 * g[:, None]
    t = x @ np.array([[1.0], [0.5], [-0.3], [0.2]]) + 0.3 * rng.normal(size=(n, 1))
    chain = Chain([(np.zeros((1, 4)), np.zeros(1), "identity")])
    base, _ = penalised_fit(x, t, g, chain, lam=0.0, ridge=1e-4)
    for kind in ("cdf", "w2"):
        new, diag = penalised_fit(x, t, g, base, lam=3.0, kind=kind, ridge=1e-4, maxiter=60)
        # 4 linear features with group-dependent shapes: a linear refit cannot reach parity, only approach it
        assert max_pairwise_ks(new.forward(x)[:, 0], g) < 0.85 * max_pairwise_ks(base.forward(x)[:, 0], g), kind


def test_choose_lambda_refuses_when_ks_cannot_be_measured():
    x, t, g = synthetic(13, 200, minority=0.05)  # about 10 minority rows: fewer than 30
    with pytest.raises(DataError, match="fewer than 2 groups"):
        choose_lambda(x, t, g, two_layer(9, "relu"), [0.0], budget_ks=0.5, folds=2, maxiter=5)


def test_sample_keeps_fold_ids_and_refuses_mixed_batches():
    rng = np.random.default_rng(2)
    x, t, g, f = rng.normal(size=(100, 2)), rng.normal(size=100), rng.integers(0, 2, 100), rng.integers(0, 5, 100)
    sample = StratifiedSample(capacity=60, min_keep_per_group=10, seed=0)
    sample.add(x[:50], t[:50], g[:50], fold=f[:50])
    with pytest.raises(DataError, match="fold ids"):
        sample.add(x[50:], t[50:], g[50:])
    sample.add(x[50:], t[50:], g[50:], fold=f[50:])
    res = sample.result()
    assert np.array_equal(res.fold, f[res.index]) and np.allclose(res.t[:, 0], t[res.index])
    assert sum(res.kept.values()) == 60


def test_pipeline_final_node_fit_term_is_exact_from_moments_with_a_small_penalty_sample(monkeypatch):
    """repair: with only the final node tuned, the penalty sample is PENALTY_ROWS (here shrunk to 120 rows) and the
    fit term still covers every fit row: at lam 0 the cdf refit is the plain ridge refit of all fit rows."""
    from conftest import FIXTURES, load_table

    from onnx_esvd import pipeline, repair

    model = FIXTURES / "gemm_transb0_alpha.onnx"
    d = {c: np.asarray(v) for c, v in load_table(FIXTURES / "gemm_transb0_alpha.csv").items()}
    monkeypatch.setattr(pipeline, "PENALTY_ROWS", 120)
    monkeypatch.setattr(pipeline, "PENALTY_MIN_KEEP", 40)
    opts = dict(layer=1, group="g", target="y", bootstrap=0, holdout=0.0, ridge=1e-3)
    plain = repair(model, d, refit="plain", **opts)
    cdf = repair(model, d, refit="cdf", lam=0.0, **opts)
    assert sum(cdf.penalty.seen.values()) == len(d["g"]) > 3 * 120
    assert sum(cdf.penalty.kept.values()) <= 120 and min(cdf.penalty.kept.values()) >= 40

    def final(res):
        inits = {i.name: i for i in res.model.graph.initializer}
        node = [n for n in res.model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
        return [onnx.numpy_helper.to_array(inits[name]).astype(np.float64) for name in node.input[1:] if name in inits]

    for a, b in zip(final(cdf), final(plain)):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("kind", ["cdf", "w2"])
def test_final_node_fit_does_not_depend_on_the_units_of_its_inputs(kind):
    """Rescaling the hidden units (relu is positively homogeneous: W0 rows by c, the final columns by 1/c) gives
    the same function; the penalised fit of the final node (ridge 0) must then find the same outputs. Plain
    L-BFGS on the raw weights stops at its iteration limit at a point that depends on the units (1e-3..1e3)."""
    x, t, g = synthetic(11, 3000)
    chain = two_layer(12, "relu")
    c = np.array([1e-3, 3e-2, 1.0, 30.0, 1e3])
    (w0, b0), (w1, b1) = [(lay.W, lay.b) for lay in chain.layers]
    scaled = Chain([(w0 * c[:, None], b0 * c, "relu"), (w1 / c[None, :], b1, "identity")])
    assert np.allclose(scaled.forward(x), chain.forward(x), rtol=1e-12, atol=1e-12)
    outs = []
    for ch in (chain, scaled):
        new, diag = penalised_fit(x, t, g, ch, lam=3.0, kind=kind, tune="final", ridge=0.0, maxiter=100)
        # never stopped by the iteration limit (w2 may end on a kink, where no step meets the Wolfe conditions)
        assert not any(m.startswith("STOP") for m in diag.messages), diag.messages
        outs.append(new.forward(x)[:, 0])
    tol = 1e-5 if kind == "cdf" else 1e-2  # w2 is differentiable almost everywhere only (sorted outputs)
    assert np.max(np.abs(outs[0] - outs[1])) <= tol * np.std(outs[0])


def test_repair_says_when_the_penalised_fit_stops_at_its_iteration_limit(monkeypatch):
    """A cdf refit whose L-BFGS rounds end at the iteration limit (here forced to 1) is reported, in the notes and
    the JSON; a converged one says nothing."""
    import functools

    from conftest import FIXTURES, load_table

    import onnx_esvd.penalty as penalty_mod
    from onnx_esvd import repair

    model = FIXTURES / "gemm_transb0_alpha.onnx"
    d = {c: np.asarray(v) for c, v in load_table(FIXTURES / "gemm_transb0_alpha.csv").items()}
    opts = dict(layer=1, group="g", target="y", bootstrap=0, refit="cdf")
    done = repair(model, d, **opts)
    assert done.penalty.limited_rounds == () and not any("iteration limit" in n for n in done.warnings)
    monkeypatch.setattr(penalty_mod, "penalised_fit", functools.partial(penalty_mod.penalised_fit, maxiter=1))
    cut = repair(model, d, **opts)
    assert cut.penalty.limited_rounds == (1, 2, 3, 4)
    assert cut.penalty.to_dict()["iteration_limit_rounds"] == [1, 2, 3, 4]
    assert any("iteration limit in round 1, 2, 3, 4" in n for n in cut.warnings)
