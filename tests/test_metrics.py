"""Output metrics (onnx_esvd.metrics) against scipy and direct numpy formulas."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_esvd.metrics import OutputCollector, ks_max_pairwise, ks_noise_floor, ks_statistic, output_metrics

try:
    import binary_v1
except ImportError:  # tests/ imported as a package
    from tests import binary_v1

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


def scipy_ks(a, b) -> float:
    """scipy's two-sample KS statistic (the method only affects the p-value)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # p-value noise for tiny samples; the statistic is unaffected
        return float(scipy.stats.ks_2samp(a, b, method="asymp").statistic)


tied = st.integers(-3, 3).map(float)  # few distinct values: many ties within and across samples


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(a=st.lists(st.one_of(finite, tied), min_size=1, max_size=60),
       b=st.lists(st.one_of(finite, tied), min_size=1, max_size=45))
def test_ks_equals_scipy(a, b):
    got = ks_statistic(np.array(a), np.array(b))
    want = scipy_ks(a, b)
    assert abs(got - want) <= 1e-12
    assert ks_statistic(np.array(b), np.array(a)) == pytest.approx(got, abs=1e-15)  # symmetric


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(a=st.lists(tied, min_size=1, max_size=80), b=st.lists(tied, min_size=1, max_size=7))
def test_ks_equals_scipy_heavy_ties_unequal_sizes(a, b):
    assert abs(ks_statistic(np.array(a), np.array(b)) - scipy_ks(a, b)) <= 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_ks_random_samples(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=rng.integers(5, 400))
    b = rng.normal(0.3, 1.5, size=rng.integers(5, 300))
    b[: len(b) // 4] = np.round(b[: len(b) // 4], 1)  # some ties
    a[: len(a) // 4] = np.round(a[: len(a) // 4], 1)
    assert abs(ks_statistic(a, b) - scipy_ks(a, b)) <= 1e-12


def test_ks_known_values():
    assert ks_statistic(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert ks_statistic(np.array([0.0, 0.0]), np.array([1.0, 1.0, 1.0])) == 1.0
    # F_a = 1/3 on [1, 2), 1 from 2 on; F_b = 1/2 on [1.5, 3): |F_a - F_b| is 1/3, 1/6, 1/2, 0 at 1, 1.5, 2, 3
    assert ks_statistic(np.array([1.0, 2.0, 2.0]), np.array([1.5, 3.0])) == pytest.approx(0.5, abs=1e-15)
    assert np.isnan(ks_statistic(np.array([]), np.array([1.0])))


def test_output_metrics_single_column():
    rng = np.random.default_rng(11)
    n = 300
    in_g1 = rng.uniform(size=n) < 0.35
    pred = rng.normal(size=n) + 0.7 * in_g1
    target = pred + rng.normal(0.1, 0.5, size=n)
    om = output_metrics(pred[:, None], in_g1, ("white", "black"), target=target)
    p0, p1 = pred[~in_g1], pred[in_g1]
    assert om.rows == n
    assert om.mean_gap == pytest.approx(abs(p0.mean() - p1.mean()), rel=1e-12)
    assert om.ks == pytest.approx(scipy_ks(p0, p1), abs=1e-12)
    err = pred - target
    assert om.mse == pytest.approx(np.mean(err**2), rel=1e-12)
    assert om.mae == pytest.approx(np.mean(np.abs(err)), rel=1e-12)
    g0, g1 = om.groups
    assert (g0.label, g1.label) == ("white", "black")
    assert (g0.count, g1.count) == (int((~in_g1).sum()), int(in_g1.sum()))
    assert g0.mean == pytest.approx(p0.mean(), rel=1e-12) and g1.mean == pytest.approx(p1.mean(), rel=1e-12)
    assert g0.std == pytest.approx(np.std(p0, ddof=1), rel=1e-12)
    assert g1.std == pytest.approx(np.std(p1, ddof=1), rel=1e-12)
    assert g0.mse == pytest.approx(np.mean(err[~in_g1] ** 2), rel=1e-12)
    assert g1.mae == pytest.approx(np.mean(np.abs(err[in_g1])), rel=1e-12)
    # a 1-D prediction gives the same result as a [n, 1] one
    flat = output_metrics(pred, in_g1, ("white", "black"), target=target[:, None])
    assert flat.ks == om.ks and flat.mean_gap == om.mean_gap and flat.mse == om.mse
    assert len(om.ks_per_column) == 1


def test_output_metrics_without_target():
    rng = np.random.default_rng(12)
    pred = rng.normal(size=50)
    in_g1 = np.arange(50) % 3 == 0
    om = output_metrics(pred, in_g1, ("a", "b"))
    assert om.mse is None and om.mae is None
    assert om.groups[0].mse is None and om.groups[1].mae is None
    assert om.groups[1].std == pytest.approx(np.std(pred[in_g1], ddof=1), rel=1e-12)


def test_output_metrics_multi_column_takes_max_ks_and_gap():
    rng = np.random.default_rng(13)
    n = 400
    in_g1 = rng.uniform(size=n) < 0.5
    pred = rng.normal(size=(n, 3))
    pred[:, 1] += 0.9 * in_g1  # the column with the large disparity is not the first one
    pred[:, 2] -= 0.3 * in_g1
    target = pred + rng.normal(size=(n, 3))
    om = output_metrics(pred, in_g1, ("0", "1"), target=target)
    ks_cols = [scipy_ks(pred[~in_g1, j], pred[in_g1, j]) for j in range(3)]
    np.testing.assert_allclose(om.ks_per_column, ks_cols, atol=1e-12)
    assert om.ks == pytest.approx(max(ks_cols), abs=1e-12)
    assert om.ks == pytest.approx(ks_cols[1], abs=1e-12)
    gaps = np.abs(pred[~in_g1].mean(0) - pred[in_g1].mean(0))
    assert om.mean_gap == pytest.approx(gaps.max(), rel=1e-12)
    assert om.mse == pytest.approx(np.mean((pred - target) ** 2), rel=1e-12)
    assert om.mae == pytest.approx(np.mean(np.abs(pred - target)), rel=1e-12)
    assert om.to_dict()["ks_per_column"] == list(om.ks_per_column)


# --------------------------------------------------------------------------------------------------
# k groups


def _feed(collectors, pred, code, target, batch=53):
    for lo in range(0, len(pred), batch):
        sl = slice(lo, lo + batch)
        for c in collectors:
            c.add(pred[sl], code[sl], None if target is None else target[sl])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cols", [1, 3])
@pytest.mark.parametrize("with_target", [True, False])
def test_two_groups_equal_the_binary_metrics(seed, cols, with_target):
    rng = np.random.default_rng(seed + 100)
    n = int(rng.integers(40, 400))
    code = (rng.uniform(size=n) < (0.05 if seed == 3 else 0.4)).astype(np.int8)  # seed 3: a group under 30
    pred = (rng.normal(size=(n, cols)) + 0.5 * code[:, None]).astype(np.float32 if seed % 2 else np.float64)
    pred[: n // 5] = np.round(pred[: n // 5], 1)  # ties
    target = pred + rng.normal(size=(n, cols)) if with_target else None
    new, old = OutputCollector(), binary_v1.OutputCollector()
    _feed([new, old], pred, code, target)
    for group_of_code in (None, np.array([1, 0])):
        got = new.result(("a", "b"), group_of_code).to_dict()
        want = old.result(("a", "b"), group_of_code).to_dict()
        for key, value in want.items():
            if key == "groups":
                for g_got, g_want in zip(got[key], value, strict=True):
                    assert {k: g_got[k] for k in g_want} == g_want
            else:
                assert got[key] == value, key
    om = new.result(("a", "b"))
    small = [g.label for g in om.groups if g.count < 30]
    assert list(om.not_estimable) == small
    assert om.ks_pair == ("a", "b")


def _brute(values, labels, counted):
    pairs = [(scipy_ks(values[g], values[h]), (g, h)) for i, g in enumerate(counted) for h in counted[i + 1:]]
    ks, pair = max(pairs, key=lambda x: x[0])
    pooled = np.concatenate(values)
    overall = [scipy_ks(v, pooled) for v in values]
    means = [values[g].mean() for g in counted]
    return ks, pair, overall, max(means) - min(means)


def test_k_groups_metrics_equal_brute_force_and_leave_small_groups_out():
    rng = np.random.default_rng(7)
    sizes, shifts = [120, 10, 80, 200, 45], [0.0, 3.0, 0.2, 0.5, -0.3]  # group 1 (10 rows) is not estimable
    values = [np.round(rng.normal(s, 1.0, size=n), 2) for n, s in zip(sizes, shifts)]
    code = np.repeat(np.arange(5), sizes)
    pred = np.concatenate(values)
    target = pred + rng.normal(size=len(pred))
    labels = ["v", "w", "x", "y", "z"]
    perm = rng.permutation(len(pred))
    om = output_metrics(pred[perm], code[perm], labels, target[perm])
    counted = [0, 2, 3, 4]
    ks, (g, h), overall, gap = _brute(values, labels, counted)
    assert om.ks == pytest.approx(ks, abs=1e-12) and om.ks_pair == (labels[g], labels[h])
    assert om.ks_overall == pytest.approx(max(overall[c] for c in counted), abs=1e-12)
    for c in range(5):
        assert om.groups[c].ks_overall == pytest.approx(overall[c], abs=1e-12)
        assert om.groups[c].estimable == (sizes[c] >= 30)
    assert om.mean_gap == pytest.approx(gap, rel=1e-12)
    assert om.ks_critical == pytest.approx(1.36 * np.sqrt(1 / sizes[g] + 1 / sizes[h]), rel=1e-12)
    assert om.not_estimable == ("w",)
    assert om.mse == pytest.approx(np.mean((pred - target) ** 2), rel=1e-12)
    assert om.rows == sum(sizes)
    # the tiny shifted group would dominate if it counted
    assert scipy_ks(values[1], values[0]) > om.ks
    # relabelling through group_of_code: code c is group mapping[c]
    mapping = np.array([2, 0, 4, 1, 3])
    col = OutputCollector()
    col.add(pred, code, target)
    relabelled = col.result([labels[int(np.flatnonzero(mapping == g)[0])] for g in range(5)], mapping)
    assert relabelled.ks == om.ks and relabelled.mean_gap == pytest.approx(om.mean_gap, rel=1e-14)
    assert set(relabelled.ks_pair) == set(om.ks_pair) and relabelled.not_estimable == ("w",)
    d = om.to_dict()
    assert d["ks_pair"] == list(om.ks_pair) and d["not_estimable"] == ["w"] and d["intervals"] == {}
    assert d["groups"][1]["estimable"] is False and d["noise_floor"] == om.noise_floor


def test_k_groups_with_fewer_than_two_estimable_groups_use_all_of_them():
    rng = np.random.default_rng(8)
    sizes = [50, 12, 9]
    values = [rng.normal(0.3 * g, 1, size=n) for g, n in enumerate(sizes)]
    om = output_metrics(np.concatenate(values), np.repeat(np.arange(3), sizes), ["a", "b", "c"])
    ks, _, _, gap = _brute(values, None, [0, 1, 2])
    assert om.ks == pytest.approx(ks, abs=1e-12) and om.mean_gap == pytest.approx(gap, rel=1e-12)
    assert om.not_estimable == ("b", "c")


def test_negative_codes_are_never_added():
    col = OutputCollector()
    col.add(np.arange(6.0), np.array([0, -1, 1, -1, 2, 0]), np.zeros(6))
    assert col.rows == 4 and col.rows_of(0) == 2 and col.rows_of(2) == 1
    np.testing.assert_array_equal(col.values(0)[:, 0], [0.0, 5.0])


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(groups=st.lists(st.lists(st.one_of(finite, tied), min_size=1, max_size=25), min_size=2, max_size=5))
def test_ks_max_pairwise_equals_brute_force(groups):
    ks, pair = ks_max_pairwise([np.array(g) for g in groups])
    brute = [scipy_ks(groups[g], groups[h]) for g in range(len(groups)) for h in range(g + 1, len(groups))]
    assert abs(ks - max(brute)) <= 1e-12
    assert abs(scipy_ks(groups[pair[0]], groups[pair[1]]) - ks) <= 1e-12


def _brute_bootstrap(values, sq, counted, resamples, seed):
    """The same resamples as the library (one rng.integers draw per group, in group order), scored directly.
    Percentile intervals; the library reflects those of KS and the mean gap around the point (basic bootstrap)."""
    rng = np.random.default_rng(seed)
    ks, gap, mse = [], [], []
    total = sum(len(v) for v in values)
    for _ in range(resamples):
        idx = [rng.integers(0, len(v), len(v)) for v in values]
        res = [values[g][idx[g]] for g in range(len(values))]
        ks.append(max(scipy_ks(res[g], res[h]) for i, g in enumerate(counted) for h in counted[i + 1:]))
        means = [res[g].mean() for g in counted]
        gap.append(max(means) - min(means))
        mse.append(sum(sq[g][idx[g]].sum() for g in range(len(values))) / total)
    return {name: (np.percentile(x, 2.5), np.percentile(x, 97.5)) for name, x in
            (("ks", ks), ("mean_gap", gap), ("mse", mse))}


@pytest.mark.parametrize("k", [2, 4])
def test_bootstrap_intervals_equal_brute_force_and_are_seeded(k):
    rng = np.random.default_rng(20 + k)
    sizes = [int(rng.integers(35, 90)) for _ in range(k)]
    values = [np.round(rng.normal(0.25 * g, 1, size=n), 1) for g, n in enumerate(sizes)]  # ties
    targets = [v + rng.normal(size=len(v)) for v in values]
    pred, target = np.concatenate(values), np.concatenate(targets)
    code = np.repeat(np.arange(k), sizes)
    labels = [str(g) for g in range(k)]
    om = output_metrics(pred, code, labels, target, bootstrap=60, seed=3)
    want = _brute_bootstrap(values, [(v - t) ** 2 for v, t in zip(values, targets)], list(range(k)), 60, 3)
    assert set(om.intervals) == {"ks", "mean_gap", "mse"}
    point = {"ks": om.ks, "mean_gap": om.mean_gap}
    for name, (lo, hi) in want.items():
        if name in point:  # basic bootstrap: [2p - q97.5, 2p - q2.5], clipped at 0
            lo, hi = max(0.0, 2 * point[name] - hi), max(0.0, 2 * point[name] - lo)
        assert om.intervals[name] == pytest.approx((lo, hi), abs=1e-12), name
    assert om.intervals == output_metrics(pred, code, labels, target, bootstrap=60, seed=3).intervals
    assert om.intervals != output_metrics(pred, code, labels, target, bootstrap=60, seed=4).intervals
    assert output_metrics(pred, code, labels, target).intervals == {}


def test_bootstrap_interval_contains_the_point_value():
    rng = np.random.default_rng(31)
    sizes = [400, 250, 150]
    values = [rng.normal(0.4 * g, 1 + 0.2 * g, size=n) for g, n in enumerate(sizes)]
    pred = np.concatenate(values)
    om = output_metrics(pred, np.repeat(np.arange(3), sizes), ["a", "b", "c"], pred + rng.normal(size=len(pred)),
                        bootstrap=200, seed=0)
    for name, point in (("ks", om.ks), ("mean_gap", om.mean_gap), ("mse", om.mse)):
        lo, hi = om.intervals[name]
        assert lo < point < hi, (name, lo, point, hi)


def test_ks_interval_is_for_the_population_ks_and_reaches_zero_when_groups_agree():
    # two groups from one distribution: the population KS is 0 and the observed KS is pure noise; resampled KS
    # values sit above the observed one, so a percentile interval would claim a gap. The reflected interval
    # covers 0 (and may sit below the observed, upward-biased value).
    rng = np.random.default_rng(5)
    pred = rng.normal(size=900)
    code = (rng.random(900) < 0.1).astype(int)
    om = output_metrics(pred, code, ["a", "b"], bootstrap=200, seed=0)
    lo, hi = om.intervals["ks"]
    assert lo == 0.0 and hi < 2 * om.ks


@pytest.mark.parametrize("sizes", [(60, 25), (40, 35, 50, 30)])
def test_noise_floor_matches_a_brute_force_permutation_estimate(sizes):
    rng = np.random.default_rng(sum(sizes))
    pooled = rng.normal(size=sum(sizes))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    draws = []
    for _ in range(200):
        lab = rng.permutation(labels)
        draws.append(ks_max_pairwise([pooled[lab == g] for g in range(len(sizes))])[0])
    floor = ks_noise_floor(sizes, seed=1, permutations=200)
    se = np.std(draws) * np.sqrt(2 / 200)  # standard error of the difference of two 200-draw means
    assert abs(floor - np.mean(draws)) <= 4 * se
    assert floor == ks_noise_floor(sizes, seed=1, permutations=200)  # seeded
    om = output_metrics(pooled, labels, [str(g) for g in range(len(sizes))], seed=1)
    assert om.noise_floor == floor  # the metrics report the same estimate
    assert np.isnan(ks_noise_floor([10, 0]))


# ----------------------------------------------------------------------------- capped report rows
def _capped_data(seed: int, n: int = 6000):
    rng = np.random.default_rng(seed)
    code = (rng.random(n) < 0.15).astype(np.int64)
    pred = (rng.normal(size=n) + 0.4 * code).astype(np.float32)
    target = pred + rng.normal(size=n)
    prio = rng.random(n)
    return pred, code, target, prio


def _feed_capped(collector, pred, code, target, prio, sizes):
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        collector.add(pred[sl], code[sl], target[sl], priority=prio[sl])
        start += size
    return collector


def test_capped_collector_below_its_cap_changes_nothing():
    pred, code, target, prio = _capped_data(0)
    full = _feed_capped(OutputCollector(), pred, code, target, prio, [1000] * 6).result(["a", "b"], bootstrap=50, seed=1)
    capped = _feed_capped(OutputCollector(cap=6000), pred, code, target, prio, [1000] * 6).result(["a", "b"], bootstrap=50,
                                                                                        seed=1)
    assert capped == full and capped.ks_rows == full.rows and not capped.ks_sampled


@settings(max_examples=10, deadline=None)
@given(cuts=st.lists(st.integers(1, 5999), max_size=5))
def test_capped_collector_keeps_a_stratified_sample_independent_of_batches(cuts):
    pred, code, target, prio = _capped_data(1)
    n = pred.size
    edges = list(np.diff(np.r_[0, sorted(set(cuts)), n]).astype(int))
    res = _feed_capped(OutputCollector(cap=2000), pred, code, target, prio, edges)
    m = res.result(["a", "b"], bootstrap=20, seed=0)
    minority = int(np.sum(code == 1))
    level = 2000 - minority
    kept_major = np.flatnonzero(code == 0)[np.argsort(prio[code == 0])[:level]]  # smallest priorities
    assert np.array_equal(np.sort(res.values(0)[:, 0]), np.sort(pred[kept_major]))
    assert np.array_equal(np.sort(res.values(1)[:, 0]), np.sort(pred[code == 1]))  # every minority row
    assert m.ks_rows == 2000 and m.rows == n and m.ks_sampled
    assert m.ks == ks_statistic(pred[kept_major], pred[code == 1])
    # means and MSE cover every row, not the sample
    assert m.groups[0].mean == pytest.approx(float(np.mean(pred[code == 0].astype(np.float64))), rel=1e-12)
    assert m.mse == pytest.approx(float(np.mean((pred.astype(np.float64) - target) ** 2)), rel=1e-12)
    assert m.ks_critical == pytest.approx(1.36 * np.sqrt(1 / level + 1 / minority))
    # KS against everyone: the groups' sample CDFs mixed by their full sizes
    t = np.sort(pred)
    f0 = np.searchsorted(np.sort(pred[kept_major]), t, side="right") / level
    f1 = np.searchsorted(np.sort(pred[code == 1]), t, side="right") / minority
    mix = ((n - minority) * f0 + minority * f1) / n
    assert m.groups[1].ks_overall == pytest.approx(float(np.max(np.abs(f1 - mix))), abs=1e-12)


def test_capped_collector_counts_non_finite_outputs_of_rows_it_did_not_keep():
    from onnx_esvd.errors import ModelError
    from onnx_esvd.guards import outputs_finite

    pred, code, target, prio = _capped_data(2)
    pred[np.argmax(prio * (code == 0))] = np.nan  # the majority row with the largest priority: never kept
    res = _feed_capped(OutputCollector(cap=2000), pred, code, target, prio, [1000] * 6)
    assert np.isfinite(res.values(0)).all() and res.nonfinite == 1 and res.cells == pred.size
    with pytest.raises(ModelError, match="1 of 6000 output values"):
        outputs_finite(res, "m.onnx", "y")


def test_capped_collector_needs_priorities():
    with pytest.raises(ValueError, match="priority"):
        OutputCollector(cap=10).add(np.zeros(3), np.zeros(3, dtype=np.int64))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 3), ties=st.booleans())
def test_pooled_order_resample_ks_is_the_ks_of_the_repeated_rows(seed, k, ties):
    """The bootstrap's KS of a resample (row multiplicities per group) equals the exact KS of the rows repeated."""
    from onnx_esvd.ks import PooledOrder

    rng = np.random.default_rng(seed)
    vals = [rng.integers(0, 5, rng.integers(1, 40)).astype(float) if ties else rng.normal(size=rng.integers(1, 40))
            for _ in range(k)]
    counts = [np.bincount(rng.integers(0, v.size, v.size), minlength=v.size) for v in vals]
    got = PooledOrder(vals).max_pairwise(counts)
    rep = [np.repeat(v, c) for v, c in zip(vals, counts)]
    want = max(ks_statistic(rep[g], rep[h]) for g in range(k) for h in range(g + 1, k))
    assert got == pytest.approx(want, abs=1e-12)
