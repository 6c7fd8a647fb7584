"""k >= 2 groups through repair, audit and check (issue 13), and the refit modes through the pipeline
(issue 12), checked against direct computations on the rows."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import FIXTURES, invoke, load_table
from scipy.stats import ks_2samp

from onnx_esvd import repair
from onnx_esvd.rows import row_uniform
from onnx_esvd.errors import DataError, OptionError
from onnx_esvd.gate import check
from onnx_esvd.metrics import MIN_ESTIMABLE_ROWS

MODEL = FIXTURES / "gemm_transb0_alpha.onnx"
FEATURES = [f"x{j}" for j in range(6)]


@pytest.fixture(scope="module")
def five():
    """The gemm fixture's rows with five groups of different sizes and shifted features."""
    tab = load_table(FIXTURES / "gemm_transb0_alpha.csv")
    rng = np.random.default_rng(11)
    n = len(tab["g"])
    g = rng.choice(np.array(["p", "q", "r", "s", "t"]), size=n, p=[0.4, 0.25, 0.15, 0.12, 0.08])
    out = {c: np.asarray(tab[c], dtype=np.float64) for c in FEATURES + ["y"]}
    shift = {"p": 0.0, "q": 0.4, "r": -0.3, "s": 0.8, "t": 0.2}
    out["x0"] = out["x0"] + np.array([shift[v] for v in g])
    out["g"] = g
    return out


def predict(model, d):
    sess = ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else str(model),
                                providers=["CPUExecutionProvider"])
    x = np.stack([d[c] for c in FEATURES], axis=1).astype(np.float32)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].ravel().astype(np.float64)


def holdout_rows(n, h=0.2, seed=0):
    return row_uniform(seed, 0, n) < h


def test_k_group_repair_metrics_match_a_direct_computation(five):
    res = repair(MODEL, five, layer=1, group="g", target="y", bootstrap=0, refit="fair")
    assert res.groups == ("p", "q", "r", "s", "t")
    rep = holdout_rows(len(five["g"]))
    for metrics, model in ((res.before, MODEL), (res.after, res.model)):
        y = predict(model, five)[rep]
        g = five["g"][rep]
        sizes = {lab: int(np.sum(g == lab)) for lab in res.groups}
        counted = [lab for lab in res.groups if sizes[lab] >= MIN_ESTIMABLE_ROWS]
        pairs = [(a, b) for i, a in enumerate(counted) for b in counted[i + 1:]]
        ks = {p: ks_2samp(y[g == p[0]], y[g == p[1]]).statistic for p in pairs}
        best = max(ks, key=ks.get)
        assert metrics.ks == pytest.approx(ks[best], abs=1e-9)
        assert set(metrics.ks_pair) == set(best)
        means = [y[g == lab].mean() for lab in counted]
        assert metrics.mean_gap == pytest.approx(max(means) - min(means), rel=1e-5)
        overall = max(ks_2samp(y[g == lab], y).statistic for lab in counted)
        assert metrics.ks_overall == pytest.approx(overall, abs=1e-9)
        assert metrics.mse == pytest.approx(np.mean((y - five["y"][rep]) ** 2), rel=1e-5)
    # the k-group repair makes every group's mean output equal on the fit rows (the fair refit's k - 1 constraints)
    fit = ~rep
    y = predict(res.model, five)[fit]
    means = [y[five["g"][fit] == lab].mean() for lab in res.groups]
    assert max(means) - min(means) < 1e-3
    assert res.after.ks < res.before.ks


def test_groups_a_rest_compares_one_group_with_everyone_else(five):
    res = repair(MODEL, five, layer=1, group="g", groups=["s", "rest"], target="y", bootstrap=0)
    assert res.groups == ("s", "rest") and res.rows.skipped == 0
    rep = holdout_rows(len(five["g"]))
    y = predict(MODEL, five)[rep]
    g = five["g"][rep]
    assert res.before.ks == pytest.approx(ks_2samp(y[g == "s"], y[g != "s"]).statistic, abs=1e-9)


def test_intersectional_groups_from_two_columns(five):
    d = dict(five)
    d["sex"] = np.where(np.arange(len(d["g"])) % 3 == 0, "f", "m")
    d["g"] = np.where(np.isin(d["g"], ["p", "q"]), "p", "r")
    res = repair(MODEL, d, layer=1, group="g,sex", target="y", bootstrap=0)
    assert res.groups == ("g=p&sex=f", "g=p&sex=m", "g=r&sex=f", "g=r&sex=m")
    with pytest.raises(DataError, match="no group column 'nope'"):
        repair(MODEL, d, layer=1, group="g,nope", target="y")


def test_group_weights_change_the_k_group_repair(five):
    a = repair(MODEL, five, layer=1, group="g", target="y", bootstrap=0)
    b = repair(MODEL, five, layer=1, group="g", target="y", bootstrap=0, weights="equal")
    assert a.after.ks != b.after.ks
    with pytest.raises(OptionError, match="--weights"):
        repair(MODEL, five, layer=1, group="g", weights="bigger")


def test_small_groups_are_flagged_and_left_out_of_the_headline(five):
    d = {k: v[:1500] for k, v in five.items()}
    d["g"] = d["g"].astype("U8")
    d["g"][:12] = "tiny"  # 12 rows: a warning, and fewer than 30 report rows
    res = repair(MODEL, d, layer=1, group="g", target="y", bootstrap=0, holdout=0.5)
    assert "tiny" in res.after.not_estimable
    assert "tiny" not in res.after.ks_pair
    assert any("'tiny' has only" in w for w in res.warnings)
    d["g"][:12] = "t"
    d["g"][0] = "one"
    with pytest.raises(DataError, match="group 'one' has [01] fit row"):
        repair(MODEL, d, layer=1, group="g", target="y", holdout=0.5)


def test_bootstrap_intervals_in_the_report_and_json(five, tmp_path):
    res = repair(MODEL, five, layer=1, group="g", target="y", bootstrap=50, seed=1)
    for key in ("ks", "mean_gap", "mse"):
        lo, hi = res.after.intervals[key]
        assert 0 <= lo <= hi
    again = repair(MODEL, five, layer=1, group="g", target="y", bootstrap=50, seed=1)
    assert again.after.intervals == res.after.intervals  # seeded
    assert repair(MODEL, five, layer=1, group="g", target="y", bootstrap=0).after.intervals == {}


# ------------------------------------------------------------------------------------------------
# the gate


def _two_groups(tab):
    return {c: np.asarray(v) for c, v in tab.items()}


def test_check_upper_confidence_and_baseline(tmp_path):
    data = FIXTURES / "gemm_transb0_alpha.csv"
    point = check(MODEL, data, group="g", target="y", max_ks=1.0, bootstrap=100)
    ks, (lo, hi) = point.metrics.ks, point.metrics.intervals["ks"]
    assert point.thresholds[0].value == ks and point.thresholds[0].compared == "point"
    between = (ks + hi) / 2 if hi > ks else ks
    upper = check(MODEL, data, group="g", target="y", max_ks=between, bootstrap=100, confidence="upper")
    assert upper.thresholds[0].value == hi and upper.thresholds[0].compared == "upper"
    assert upper.passed == (hi <= between)
    with pytest.raises(OptionError, match="--bootstrap"):
        check(MODEL, data, group="g", target="y", max_ks=0.1, bootstrap=0, confidence="upper")
    # a baseline: the same model has a KS increase of exactly 0
    same = check(MODEL, data, group="g", target="y", baseline=MODEL, max_ks_increase=0.0, bootstrap=0)
    assert same.passed and same.thresholds[0].value == 0.0
    with pytest.raises(OptionError, match="--baseline and --max-ks-increase go together"):
        check(MODEL, data, group="g", target="y", max_ks_increase=0.01)


def test_check_cli_junit_names_metric_interval_and_threshold(tmp_path):
    junit = tmp_path / "gate.xml"
    result = invoke("check", MODEL, "--data", FIXTURES / "gemm_transb0_alpha.csv", "--group", "g", "--target", "y", "--max-ks",
                    "0.001", "--confidence", "upper", "--bootstrap", "50", "--junit", junit)
    assert result.exit_code == 1, result.stderr
    text = junit.read_text()
    assert 'name="upper 95% bound of ks &lt;= 0.001"' in text
    assert "95% CI" in text and "ThresholdExceeded" in text


# ------------------------------------------------------------------------------------------------
# refit modes through the pipeline


def test_moments_refit_equalises_the_groups_output_variance_on_the_fit_rows():
    data = FIXTURES / "gemm_transb0_alpha.csv"
    tab = load_table(data)
    d = {c: np.asarray(v) for c, v in tab.items()}
    fair = repair(MODEL, d, layer=1, group="g", target="y", bootstrap=0, refit="fair")
    mom = repair(MODEL, d, layer=1, group="g", target="y", bootstrap=0, refit="moments", var_gap=0.0)
    fit = ~holdout_rows(len(d["g"]))
    for res, equal_var in ((fair, False), (mom, True)):
        y = predict(res.model, d)[fit]
        ya, yb = y[d["g"][fit] == "a"], y[d["g"][fit] == "b"]
        assert ya.mean() == pytest.approx(yb.mean(), abs=1e-4)
        if equal_var:
            assert ya.var(ddof=1) == pytest.approx(yb.var(ddof=1), rel=1e-3)
        else:
            assert abs(ya.var(ddof=1) - yb.var(ddof=1)) > 1e-3 * ya.var(ddof=1)
    assert mom.refit.mode == "moments" and mom.to_dict()["refit"]["var_gap"] == 0.0


def test_moments_refit_is_refused_for_more_than_two_groups(five):
    with pytest.raises(OptionError, match="exact for two groups only.*--refit cdf"):
        repair(MODEL, five, layer=1, group="g", target="y", refit="moments")


def test_cdf_refit_lowers_the_fit_row_ks_below_fair_and_reports_its_sample():
    d = {c: np.asarray(v) for c, v in load_table(FIXTURES / "gemm_transb0_alpha.csv").items()}
    fair = repair(MODEL, d, layer=1, group="g", target="y", bootstrap=0, holdout=0.0)
    cdf = repair(MODEL, d, layer=1, group="g", target="y", bootstrap=0, holdout=0.0, refit="cdf", lam=3.0)
    assert cdf.after.ks < fair.after.ks
    assert cdf.penalty is not None and sum(cdf.penalty.kept.values()) == len(d["g"])
    info = cdf.to_dict()["refit"]
    assert info["mode"] == "cdf" and info["lam"] == 3.0 and "fit_row_ks" in info


def test_tune_layers_refuses_an_op_it_cannot_tune_through():
    d = {c: np.asarray(v) for c, v in load_table(FIXTURES / "gemm_transb0_alpha.csv").items()}
    res = repair(MODEL, d, layer=0, group="g", target="y", bootstrap=0, refit="cdf", tune_layers=2)
    assert res.penalty is not None
    with pytest.raises(Exception, match="tune-layers"):
        repair(MODEL, d, layer=0, group="g", target="y", refit="cdf", tune_layers=9)


def test_sweep_cli_takes_var_gap_and_lam_lists(tmp_path):
    result = invoke("sweep", MODEL, "--layer", "1", "--data", FIXTURES / "gemm_transb0_alpha.csv", "--group", "g",
                    "--target", "y", "--c1", "15", "--c2", "150", "--refit", "fair,moments,cdf",
                    "--var-gap", "0,0.5", "--lam", "1,3", "--json")
    assert result.exit_code == 0, result.stderr
    points = json.loads(result.stdout)["points"]
    assert [(p["refit"], p.get("var_gap"), p.get("lam")) for p in points] == [
        ("fair", None, None), ("moments", 0.0, None), ("moments", 0.5, None), ("cdf", None, 1.0), ("cdf", None, 3.0)]


def test_three_listed_groups(five):
    # --groups with three values (codes 0..2 from the list): every listed group is repaired, others skipped
    res = repair(MODEL, five, layer=1, group="g", groups=["p", "q", "s"], target="y", bootstrap=0)
    assert res.groups == ("p", "q", "s")
    assert res.rows.skipped == int(np.isin(five["g"], ["r", "t"]).sum())
