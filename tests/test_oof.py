"""Out-of-fold ranking of the budget search (`repair --max-ks --folds K`, onnx_esvd/oof.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CASES, assert_bad_input, copy_fixtures, dir_state, invoke
from onnx_esvd import OptionError, tradeoff
from onnx_esvd.metrics import OutputMetrics
from onnx_esvd.oof import OofScore, fold_predictions, weighted_group_moments
from onnx_esvd.refits import RefitSpec
from onnx_esvd.rowsample import StratifiedSample, fold_of

GEMM = CASES["gemm_transb0_alpha.onnx"]


# ------------------------------------------------------------------------------------------ folds
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 400), cuts=st.lists(st.integers(1, 399), max_size=6), seed=st.integers(0, 2**31),
       folds=st.integers(2, 7))
def test_fold_ids_do_not_depend_on_batches(n, cuts, seed, folds):
    """A row's fold is a function of (seed, global row index) only: a sample fed in any batches keeps the same
    fold for the same row."""
    rng = np.random.default_rng(seed % 1000)
    x, group = rng.normal(size=(n, 2)), rng.integers(0, 2, n)
    whole = StratifiedSample(capacity=10_000, min_keep_per_group=10, seed=seed)
    whole.add(x, x[:, :1], group, fold_of(np.arange(n), seed, folds))
    parts = StratifiedSample(capacity=10_000, min_keep_per_group=10, seed=seed)
    edges = [0, *sorted(c for c in set(cuts) if c < n), n]
    for a, b in zip(edges[:-1], edges[1:]):
        parts.add(x[a:b], x[a:b, :1], group[a:b], fold_of(np.arange(a, b), seed, folds))
    r1, r2 = whole.result(), parts.result()
    np.testing.assert_array_equal(r1.index, r2.index)
    np.testing.assert_array_equal(r1.fold, r2.fold)
    assert r1.fold.min() >= 0 and r1.fold.max() < folds


def test_fold_ids_are_balanced_and_seeded():
    f = fold_of(np.arange(50_000), 3, 5)
    counts = np.bincount(f, minlength=5)
    assert np.all(np.abs(counts - 10_000) < 400)
    assert not np.array_equal(f, fold_of(np.arange(50_000), 4, 5))


def test_pipeline_folds_do_not_depend_on_batch_size():
    """The whole budget path: the out-of-fold scores are the same whatever the batch size."""
    kw = dict(layer=1, group=GEMM.group, target=GEMM.target, c1=(15.0,), c2=(150.0,), refit=["fair", "moments"],
              var_gap=[0.0], folds=3)
    a = tradeoff.sweep(GEMM.path, GEMM.data_path, batch_size=97, **kw)
    b = tradeoff.sweep(GEMM.path, GEMM.data_path, batch_size=2000, **kw)
    for p, q in zip(a.points, b.points):
        assert p.oof is not None and p.oof.folds == 3
        assert p.oof.ks == pytest.approx(q.oof.ks, abs=1e-12) and p.oof.mse == pytest.approx(q.oof.mse, rel=1e-9)


# ------------------------------------------------------------------------------------------ no leakage
def _problem(n=600, p=4, seed=0):
    rng = np.random.default_rng(seed)
    group = (rng.random(n) < 0.3).astype(np.int64)
    z = rng.normal(size=(n, p)) + group[:, None] * np.array([0.8, -0.3, 0.2, 0.0])[:p]
    t = (z @ rng.normal(size=p) + 0.3 * rng.normal(size=n)).reshape(n, 1)
    weight = np.where(group == 1, 1.0, 2.5)  # a subsampled majority
    return z, t, group, weight, fold_of(np.arange(n), seed, 4)


@pytest.mark.parametrize("spec", [RefitSpec("fair"), RefitSpec("plain"), RefitSpec("moments", var_gap=0.0),
                                  RefitSpec("cdf", lam=1.0)], ids=lambda s: s.describe())
def test_a_folds_predictions_never_use_its_own_rows(spec):
    """Corrupting the targets of fold 0's rows leaves fold 0's out-of-fold predictions exactly as they were (and
    moves every other fold's): a refit that saw fold 0's rows would predict them differently."""
    z, t, group, weight, fold = _problem()
    kw = dict(alpha=1e-3, fit_intercept=True, k=2, folds=4)
    before = fold_predictions(z, t, group, weight, fold, [], spec, **kw)
    bad = t.copy()
    bad[fold == 0] = 50.0 - 7.0 * bad[fold == 0]
    after = fold_predictions(z, bad, group, weight, fold, [], spec, **kw)
    assert np.all(np.isfinite(before))
    np.testing.assert_array_equal(before[fold == 0], after[fold == 0])
    assert np.all(np.abs(before[fold != 0] - after[fold != 0]) > 1e-6)


def test_weighted_moments_count_the_subsampled_group_fully():
    z, t, group, weight, _ = _problem()
    moms = weighted_group_moments(z, t, group, weight, 2)
    assert moms[0].n == pytest.approx(2.5 * np.sum(group == 0)) and moms[1].n == np.sum(group == 1)
    np.testing.assert_allclose(moms[0].scatter / moms[0].n, np.cov(np.hstack([z, t])[group == 0].T, bias=True),
                               rtol=1e-10)


def test_moment_refits_refuse_mixed_weights_in_a_group():
    z, t, group, weight, _ = _problem()
    weight[0] += 1.0
    with pytest.raises(Exception, match="weight"):
        weighted_group_moments(z, t, group, weight, 2)


# ------------------------------------------------------------------------------------------ ranking
def _metrics(ks, mse, gap=0.01):
    return OutputMetrics(ks=ks, mean_gap=gap, mse=mse, mae=None, rows=100, groups=(), ks_per_column=(ks,))


def _oof(ks, mse, gap=0.01):
    return OofScore(folds=5, ks=ks, mean_gap=gap, mse=mse, fit_ks=ks / 2, rows=100, minority=("b", 30))


def _fake(points, monkeypatch):
    """repair_within_budget over fabricated sweep points; returns the settings `repair` was called with."""
    result = tradeoff.SweepResult(layer=None, groups=("a", "b"), before=_metrics(0.3, 0.04), points=tuple(points),
                                  report_rows="holdout", warnings=())
    monkeypatch.setattr(tradeoff, "sweep", lambda *a, **k: result)
    calls = []
    monkeypatch.setattr(tradeoff, "repair", lambda *a, **k: calls.append(k) or "repaired")
    return calls


def _point(name, lam, holdout, oof):
    spec = RefitSpec("cdf", lam=lam)
    return tradeoff.SweepPoint(15.0, 150.0, "cdf", _metrics(*holdout), layer=1, spec=spec, oof=_oof(*oof))


def test_the_budget_ranks_on_the_out_of_fold_metrics(monkeypatch):
    """Holdout and out-of-fold metrics disagree on purpose: the winner is the lowest out-of-fold MSE among the
    settings whose out-of-fold KS meets the budget."""
    points = [_point("a", 0.3, holdout=(0.05, 0.040), oof=(0.09, 0.041)),   # holdout says yes, oof says no
              _point("b", 1.0, holdout=(0.08, 0.050), oof=(0.055, 0.047)),  # oof: feasible, cheapest
              _point("c", 3.0, holdout=(0.04, 0.045), oof=(0.050, 0.049)),  # oof: feasible, runner-up
              _point("d", 10.0, holdout=(0.03, 0.046), oof=(0.040, 0.052))]
    calls = _fake(points, monkeypatch)
    res = tradeoff.repair_within_budget("m.onnx", "d.csv", layer=1, group="g", target="y", max_ks=0.06)
    assert res.winner is points[1] and res.runner_up is points[2] and res.folds == 5
    assert calls[0]["lam"] == 1.0 and calls[0]["refit"] == "cdf"
    assert "out-of-fold" in res.ranked_on and res.winner.to_dict()["out_of_fold"]["oof_ks"] == 0.055


def test_the_budget_on_the_mean_gap_uses_the_out_of_fold_gap(monkeypatch):
    points = [_point("a", 0.3, holdout=(0.05, 0.040, 0.001), oof=(0.05, 0.041, 0.05)),
              _point("b", 1.0, holdout=(0.05, 0.050, 0.09), oof=(0.05, 0.047, 0.01))]
    _fake(points, monkeypatch)
    res = tradeoff.repair_within_budget("m.onnx", "d.csv", layer=1, group="g", target="y", max_ks=0.06,
                                        max_mean_gap=0.02)
    assert res.winner is points[1] and res.runner_up is None


def test_no_setting_within_the_budget_names_the_closest_out_of_fold(monkeypatch):
    points = [_point("a", 0.3, holdout=(0.01, 0.040), oof=(0.09, 0.041)),
              _point("b", 1.0, holdout=(0.02, 0.050), oof=(0.07, 0.047))]
    calls = _fake(points, monkeypatch)
    res = tradeoff.repair_within_budget("m.onnx", "d.csv", layer=1, group="g", target="y", max_ks=0.06)
    assert res.result is None and res.winner is None and res.closest is points[1] and not calls


def test_budget_with_folds_on_a_fixture_repairs_with_the_out_of_fold_winner():
    """End to end: every point carries out-of-fold scores; the winner is the lowest out-of-fold MSE among the
    points meeting the budget, and the written repair is that setting refitted on all fit rows."""
    kw = dict(layer=1, group=GEMM.group, target=GEMM.target, bootstrap=0)
    probe = tradeoff.sweep(GEMM.path, GEMM.data_path, refits=tradeoff.BUDGET_REFITS[:3], c1=(15.0,), c2=(150.0,),
                           folds=3, layer=1, group=GEMM.group, target=GEMM.target)
    budget = sorted(p.oof.ks for p in probe.points)[1]
    res = tradeoff.repair_within_budget(GEMM.path, GEMM.data_path, max_ks=budget, refit=["fair", "moments"],
                                        var_gap=[0.5, 0.0], folds=3, **kw)
    inside = sorted((p for p in res.sweep.points if p.oof.ks <= budget), key=lambda p: p.oof.mse)
    assert res.winner.setting == inside[0].setting
    assert res.result.options.refit_spec.mode == res.winner.setting.mode
    assert res.result.after.ks == pytest.approx(res.winner.metrics.ks, abs=1e-12)
    assert 30 <= res.winner.oof.minority[1] <= res.winner.oof.rows / 2


# ------------------------------------------------------------------------------------------ options and CLI
@pytest.mark.parametrize("folds", [1, -1, 2.5, True])
def test_bad_folds_are_refused(folds):
    with pytest.raises(OptionError, match="--folds"):
        tradeoff.check_folds(folds)


def test_explicit_folds_are_refused_where_out_of_fold_scores_are_impossible(monkeypatch):
    prep = dataclasses.make_dataclass("P", ["final", "spec", "notes"])(None, None, [])
    with pytest.raises(OptionError, match="--folds 0"):
        tradeoff._usable_folds(5, prep)
    assert tradeoff._usable_folds(None, prep) == 0 and "holdout" in prep.notes[0]


@pytest.fixture()
def work(tmp_path):
    copy_fixtures(tmp_path, GEMM.model, GEMM.data)
    return tmp_path


def _args(work, *extra):
    return ["repair", work / GEMM.model, "--layer", "1", "--data", work / GEMM.data, "--group", "g", "--target", "y",
            "-o", work / "out.onnx", *extra]


@pytest.mark.parametrize("extra, needles", [
    (("--max-ks", "0.2", "--folds", "1"), ("--folds 1", "K >= 2")),
    (("--max-ks", "0.2", "--folds", "-3"), ("--folds -3",)),
    (("--folds", "3"), ("--folds 3", "--max-ks")),
])
def test_cli_folds_validation(work, extra, needles):
    state = dir_state(work)
    assert_bad_input(invoke(*_args(work, *extra)), *needles)
    assert dir_state(work) == state


def test_cli_budget_with_folds_reports_oof_fit_and_holdout(work):
    result = invoke(*_args(work, "--max-ks", "0.5", "--refit", "moments", "--folds", "3", "--json"))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)["budget"]
    assert data["folds"] == 3 and "out-of-fold" in data["ranked_on"]
    win = data["winner"]["out_of_fold"]
    assert {"oof_ks", "oof_mse", "fit_row_ks", "minority"} <= set(win) and win["minority"]["rows"] > 0
    text = invoke(*_args(work, "--max-ks", "0.5", "--refit", "moments", "--folds", "3", "--force"))
    assert text.exit_code == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.startswith("winner"))
    assert "out-of-fold KS" in line and "fit-row KS" in line and "holdout KS" in line and "of group" in line


def test_weighted_moments_of_a_row_subset_in_blocks_equal_the_whole_subset_at_once():
    """The fold moments are reduced in blocks from the sample's own array (float32 here): same moments as
    the fold's rows taken out in float64."""
    z, t, group, weight, _ = _problem()
    rows = np.flatnonzero(np.arange(len(z)) % 3 != 1)
    got = weighted_group_moments(z.astype(np.float32), t, group, weight, 2, rows=rows, block=7)
    want = weighted_group_moments(z.astype(np.float32)[rows].astype(np.float64), t[rows], group[rows], weight[rows],
                                  2, block=10**9)
    for a, b in zip(got, want):
        assert a.n == pytest.approx(b.n, rel=1e-12)
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a.scatter, b.scatter, rtol=1e-10, atol=1e-10 * np.abs(b.scatter).max())
