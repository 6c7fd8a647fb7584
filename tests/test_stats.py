"""Streaming moments (onnx_esvd.stats) against one-shot numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_esvd.stats import GroupStats, LayerStats, Moments, median, quantile

RTOL = 1e-10


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Norm-wise relative error ||got - want|| / ||want||."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def make_rows(seed: int, n: int, d: int, offset: float) -> np.ndarray:
    """Correlated rows [n, d] with means around `offset` and unit-order spread."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    return offset * (1.0 + 0.1 * rng.normal(size=d)) + rng.normal(size=(n, d)) @ mix


def one_shot(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1), x.T @ x


def stream(x: np.ndarray, cuts: list[int]) -> Moments:
    acc = Moments(x.shape[1])
    bounds = [0, *sorted(cuts), x.shape[0]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc.add(x[lo:hi])  # includes empty batches when cuts repeat
    return acc


def check_matches(acc: Moments, x: np.ndarray) -> None:
    mean, cov, gram = one_shot(x)
    assert acc.n == x.shape[0]
    assert rel_err(acc.mean, mean) <= RTOL
    assert rel_err(acc.covariance(), cov) <= RTOL
    assert rel_err(acc.gram(), gram) <= RTOL
    # the scatter is the centred sum itself, not something proportional to it
    assert rel_err(acc.scatter, cov * (x.shape[0] - 1)) <= RTOL


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 120),
    d=st.integers(1, 6),
    offset=st.sampled_from([0.0, 1.0, 1e4]),
    cut_fracs=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=8),
)
def test_streaming_over_random_splits_matches_one_shot(seed, n, d, offset, cut_fracs):
    x = make_rows(seed, n, d, offset)
    cuts = [int(f * n) for f in cut_fracs]
    check_matches(stream(x, cuts), x)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_single_row_batches_large_mean(offset):
    # Welford-like extreme: every batch is one row; the centred scatter must survive means of 1e4.
    x = make_rows(7, 500, 4, offset)
    check_matches(stream(x, list(range(1, 500))), x)


def test_large_mean_unit_spread_covariance_exact_digits():
    # Rows with mean 1e4 and unit spread: the naive sum x x^T - n mu mu^T loses ~8 digits here.
    rng = np.random.default_rng(3)
    base = rng.normal(size=(2000, 3))
    x = 1e4 + base
    acc = stream(x, [17, 500, 501, 1999])
    want = np.cov(base, rowvar=False)  # shift-invariant: computed on the unshifted rows
    assert rel_err(acc.covariance(), want) <= 1e-10
    naive = (x.T @ x - x.shape[0] * np.outer(x.mean(0), x.mean(0))) / (x.shape[0] - 1)
    # sanity of the test: the naive formula is measurably worse, so the check above has teeth
    assert rel_err(naive, want) > 1e-10


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 150),
    split=st.floats(0.0, 1.0),
    offset=st.sampled_from([0.0, 1e4]),
    batch_a=st.integers(1, 40),
    batch_b=st.integers(1, 40),
)
def test_merge_of_two_accumulators_equals_accumulating_all(seed, n, split, offset, batch_a, batch_b):
    x = make_rows(seed, n, 3, offset)
    k = int(split * n)
    a = stream(x[:k], list(range(batch_a, k, batch_a)))
    b = stream(x[k:], list(range(batch_b, n - k, batch_b)))
    a_before = a.copy()
    a.merge(b)
    whole = Moments(3)
    whole.add(x)
    assert a.n == whole.n == n
    assert rel_err(a.mean, whole.mean) <= RTOL
    assert rel_err(a.scatter, whole.scatter) <= RTOL
    assert rel_err(a.gram(), whole.gram()) <= RTOL
    # merge does not modify its argument; copy is independent of the original
    assert b.n == n - k
    assert a_before.n == k


def test_merge_into_empty_and_of_empty():
    x = make_rows(11, 30, 2, 5.0)
    full = Moments(2)
    full.add(x)
    empty = Moments(2)
    empty.merge(full)
    assert empty.n == 30
    np.testing.assert_array_equal(empty.mean, full.mean)
    np.testing.assert_array_equal(empty.scatter, full.scatter)
    # the merged-into accumulator must not alias the source's arrays
    empty.add(x[:3])
    assert full.n == 30
    np.testing.assert_array_equal(full.scatter, moments_of(x).scatter)
    before = full.copy()
    full.merge(Moments(2))
    np.testing.assert_array_equal(full.mean, before.mean)
    np.testing.assert_array_equal(full.scatter, before.scatter)


def moments_of(x: np.ndarray) -> Moments:
    acc = Moments(x.shape[1])
    acc.add(x)
    return acc


def test_covariance_needs_two_rows():
    acc = Moments(3)
    acc.add(np.ones((1, 3)))
    with pytest.raises(ValueError):
        acc.covariance()


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_layerstats_from_arrays_matches_numpy(offset):
    x0 = make_rows(21, 57, 5, offset)
    x1 = make_rows(22, 83, 5, -offset)
    s = LayerStats.from_arrays(x0, x1)
    assert (s.n0, s.n1) == (57, 83)
    assert rel_err(s.mean0, x0.mean(axis=0)) <= RTOL
    assert rel_err(s.mean1, x1.mean(axis=0)) <= RTOL
    assert rel_err(s.cov0, np.cov(x0, rowvar=False)) <= RTOL
    assert rel_err(s.cov1, np.cov(x1, rowvar=False)) <= RTOL
    x = np.vstack([x0, x1])
    assert rel_err(s.gram, x.T @ x) <= RTOL
    np.testing.assert_array_equal(s.cov0, s.cov0.T)


def test_layerstats_from_moments_equals_from_arrays_streamed():
    x0 = make_rows(31, 64, 4, 3.0)
    x1 = make_rows(32, 41, 4, -2.0)
    s_stream = LayerStats.from_moments(stream(x0, [5, 9, 40]), stream(x1, [1, 2, 3]))
    s_direct = LayerStats.from_arrays(x0, x1)
    for name in ("mean0", "mean1", "cov0", "cov1", "gram"):
        assert rel_err(getattr(s_stream, name), getattr(s_direct, name)) <= RTOL, name


# --------------------------------------------------------------------------------------------------
# k groups


@pytest.mark.parametrize("k", [2, 3, 5])
def test_groupstats_streamed_matches_numpy(k):
    blocks = [make_rows(40 + g, 30 + 7 * g, 4, float(g)) for g in range(k)]
    s = GroupStats.from_moments([stream(x, [3, 11]) for x in blocks], labels=[f"g{g}" for g in range(k)])
    assert s.k == k and s.dim == 4 and s.labels == tuple(f"g{g}" for g in range(k))
    assert s.counts.tolist() == [len(x) for x in blocks]
    assert s.means.shape == (k, 4) and s.covs.shape == (k, 4, 4)
    for g, x in enumerate(blocks):
        assert rel_err(s.means[g], x.mean(axis=0)) <= RTOL
        assert rel_err(s.covs[g], np.cov(x, rowvar=False)) <= RTOL
    x = np.vstack(blocks)
    assert rel_err(s.gram, x.T @ x) <= RTOL
    assert GroupStats.from_arrays(*blocks).labels == tuple(str(g) for g in range(k))


def test_groupstats_weights():
    s = GroupStats.from_arrays(make_rows(1, 10, 2, 0.0), make_rows(2, 30, 2, 0.0), make_rows(3, 60, 2, 0.0))
    np.testing.assert_allclose(s.weights("size"), [0.1, 0.3, 0.6], rtol=1e-15)
    np.testing.assert_allclose(s.weights("equal"), [1 / 3] * 3, rtol=1e-15)
    assert s.weights().sum() == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match="unknown group weights"):
        s.weights("bogus")


def test_layerstats_is_the_two_group_case_bit_for_bit():
    x0, x1 = make_rows(51, 33, 3, 2.0), make_rows(52, 47, 3, -1.0)
    two = LayerStats.from_moments(moments_of(x0), moments_of(x1))
    gen = GroupStats.from_moments([moments_of(x0), moments_of(x1)])
    assert isinstance(two, GroupStats)
    for name in ("counts", "means", "covs", "gram"):
        np.testing.assert_array_equal(getattr(two, name), getattr(gen, name))
    assert (two.n0, two.n1) == (33, 47)
    np.testing.assert_array_equal(two.mean1, gen.means[1])
    np.testing.assert_array_equal(two.cov0, moments_of(x0).covariance())
    three = GroupStats.from_arrays(x0, x1, make_rows(53, 5, 3, 0.0))
    with pytest.raises(ValueError, match="two groups only"):
        _ = three.mean0


def test_groupstats_refuses_a_group_with_one_row():
    with pytest.raises(ValueError):
        GroupStats.from_arrays(make_rows(1, 10, 2, 0.0), make_rows(2, 1, 2, 0.0), make_rows(3, 6, 2, 0.0))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 7), max_size=60), st.sampled_from([np.int8, np.int32, np.int64]))
def test_present_codes_is_np_unique(codes, dtype):
    from onnx_esvd.stats import present_codes

    c = np.array(codes, dtype=dtype)
    assert np.array_equal(present_codes(c), np.unique(c).astype(np.int64))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(x=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40),
       q=st.lists(st.floats(0, 1), min_size=1, max_size=5), ties=st.booleans())
def test_quantile_and_median_equal_numpys_bit_for_bit(x, q, ties):
    """stats.quantile / stats.median (which keep numpy.ma out of the import) give numpy's linear-method answer."""
    a = np.round(np.asarray(x)) if ties else np.asarray(x)
    assert np.array_equal(quantile(a, np.asarray(q)), np.quantile(a, np.asarray(q)))
    for v in (*q, 0.025, 0.975, 0.0, 1.0):
        assert quantile(a, v) == np.quantile(a, v)
        assert isinstance(quantile(a, v), float | np.floating)
    assert median(a) == np.median(a)
