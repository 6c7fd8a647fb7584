"""Output metrics (onnx_esvd.metrics) against scipy and direct numpy formulas."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_esvd.metrics import ks_statistic, output_metrics

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
