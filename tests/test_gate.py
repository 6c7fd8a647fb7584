"""`onnx-esvd check`, the fairness gate: metrics against plain onnxruntime + numpy/scipy, exit codes,
the JSON and JUnit reports, bad input, and start-up cost."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
import scipy.stats

from conftest import (assert_bad_input, invoke,
                      CASES, FIXTURES, copy_fixtures, dir_state, feeds_from_columns, group_label_text, load_table,
                      ort_session, sha256, write_csv)
from onnx_esvd import check

LAW_FEATURES = ["dnn_bar_pass_prediction", "gender_female", "gender_male", "lsat", "pass_bar"]
HAND_FEATURES = [f"x{j}" for j in range(6)]
METRICS = ("ks", "mean_gap", "mse", "mae")
FLAG = {"ks": "--max-ks", "mean_gap": "--max-mean-gap", "mse": "--max-mse", "mae": "--max-mae"}

#: fixtures the metric tests run on (model, data); numeric group labels in sigmoid_head.csv
METRIC_CASES = [
    ("law_school_mlp_legacy.onnx", "law_school.csv"),
    ("law_school_mlp_dynamo.onnx", "law_school.csv"),
    ("law_school_sklearn.onnx", "law_school.npz"),
    ("sigmoid_head.onnx", "sigmoid_head.csv"),
    ("matmul_bias_first.onnx", "matmul_bias_first.csv"),
    ("float16_weights.onnx", "float16_weights.csv"),
    ("float64_model.onnx", "float64_model.csv"),
    ("gemm_transb0_alpha.onnx", "gemm_transb0_alpha.csv"),
    ("shared_initializer.onnx", "shared_initializer.csv"),
]

SMALL = "gemm_transb0_alpha"  # the hand-built fixture most CLI tests use


def features_of(data: str) -> list[str]:
    return LAW_FEATURES if data.startswith("law_school") else HAND_FEATURES


@cache
def _table(data: str) -> dict[str, np.ndarray]:
    return load_table(FIXTURES / data)


def default_session(path: Path):
    """An onnxruntime session with the default options (graph optimisation on), one thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@cache
def reference(model_name: str, data: str, optimized: bool = True):
    """Plain onnxruntime outputs of every row ([n, k] float64), group label text per row, and the target.

    `optimized`: a session with onnxruntime's default options; otherwise graph optimisation off.
    """
    case = CASES[model_name]
    tab = _table(data)
    model = onnx.load(str(FIXTURES / model_name))
    feeds = feeds_from_columns(model, tab, features_of(data))
    sess = default_session(FIXTURES / model_name) if optimized else ort_session(model)
    out = sess.run([model.graph.output[0].name], feeds)[0]
    pred = np.asarray(out, dtype=np.float64).reshape(len(next(iter(feeds.values()))), -1)
    labels = group_label_text(tab[case.group])
    target = np.asarray(tab[case.target], dtype=np.float64)
    return pred, labels, target




@pytest.fixture
def work(tmp_path):
    """A tmp dir with copies of the small hand-built fixture and its CSV."""
    copy_fixtures(tmp_path, f"{SMALL}.onnx", f"{SMALL}.csv")
    return tmp_path


def small_args(work, *extra, target=True):
    args = ["check", work / f"{SMALL}.onnx", "--data", work / f"{SMALL}.csv", "--group", "g"]
    if target:
        args += ["--target", "y"]
    return [*args, *extra]


@cache
def small_metrics() -> dict:
    """The small fixture's metrics as `check --json` reports them (from the fixtures dir)."""
    result = invoke("check", FIXTURES / f"{SMALL}.onnx", "--data", FIXTURES / f"{SMALL}.csv", "--group", "g",
                    "--target", "y", "--max-ks", "1", "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["metrics"]


def rel_err(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-300)


# ------------------------------------------------------------------------------------------------
# metrics against plain onnxruntime + numpy / scipy


@pytest.mark.parametrize("model_name,data", METRIC_CASES, ids=[m for m, _ in METRIC_CASES])
def test_check_metrics_equal_plain_onnxruntime(model_name, data):
    case = CASES[model_name]
    # every command runs onnxruntime with graph optimisation off, so that they all see the same outputs
    pred, labels, target = reference(model_name, data, optimized=False)
    kw = {"features": features_of(data)} if data.endswith(".npz") else {}
    res = check(FIXTURES / model_name, FIXTURES / data, group=case.group, target=case.target, max_ks=1.0, **kw)
    g0, g1 = res.measured.groups
    assert sorted((g0, g1)) == sorted(case.groups)
    m0, m1 = labels == g0, labels == g1
    assert m0.sum() + m1.sum() == len(labels)
    m = res.metrics

    want_ks = max(scipy.stats.ks_2samp(pred[m0, j], pred[m1, j]).statistic for j in range(pred.shape[1]))
    assert abs(m.ks - want_ks) <= 1e-9, (m.ks, want_ks)

    want_gap = float(np.max(np.abs(pred[m0].mean(axis=0) - pred[m1].mean(axis=0))))
    assert rel_err(m.mean_gap, want_gap) <= 1e-9, (m.mean_gap, want_gap)
    err = pred - target[:, None]
    assert rel_err(m.mse, float(np.mean(err**2))) <= 1e-9
    assert rel_err(m.mae, float(np.mean(np.abs(err)))) <= 1e-9

    for summary, mask in zip(m.groups, (m0, m1)):
        assert summary.count == int(mask.sum())
        assert rel_err(summary.mean, float(pred[mask].mean())) <= 1e-9
        assert rel_err(summary.std, float(pred[mask].std(ddof=1))) <= 1e-9
        assert rel_err(summary.mse, float(np.mean(err[mask] ** 2))) <= 1e-9
        assert rel_err(summary.mae, float(np.mean(np.abs(err[mask])))) <= 1e-9
    assert res.measured.rows == len(labels) and res.measured.skipped == 0
    assert res.passed  # ks <= 1 always holds

    # on these fixtures no near-tie flips with onnxruntime's default (optimised) session either
    opt, _, _ = reference(model_name, data, optimized=True)
    want_opt = max(scipy.stats.ks_2samp(opt[m0, j], opt[m1, j]).statistic for j in range(opt.shape[1]))
    assert abs(m.ks - want_opt) <= 1e-9, (m.ks, want_opt)


def test_check_ks_with_numeric_group_labels_via_cli():
    """sigmoid_head.csv has group labels 0/1 written as numbers: KS over the CLI equals scipy's."""
    pred, labels, _ = reference("sigmoid_head.onnx", "sigmoid_head.csv")
    result = invoke("check", FIXTURES / "sigmoid_head.onnx", "--data", FIXTURES / "sigmoid_head.csv", "--group", "g",
                    "--target", "y", "--max-ks", "1", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["groups"] == ["0", "1"]
    want = scipy.stats.ks_2samp(pred[labels == "0", 0], pred[labels == "1", 0]).statistic
    assert abs(data["metrics"]["ks"] - want) <= 1e-9
    # the same pair named explicitly, in the other order, and as floats
    for groups in ("1,0", "1.0,0.0"):
        result = invoke("check", FIXTURES / "sigmoid_head.onnx", "--data", FIXTURES / "sigmoid_head.csv", "--group",
                        "g", "--groups", groups, "--target", "y", "--max-ks", "1", "--json")
        assert result.exit_code == 0, result.stderr
        other = json.loads(result.stdout)
        assert other["groups"] == ["1", "0"]
        assert abs(other["metrics"]["ks"] - want) <= 1e-9
        assert other["metrics"]["mean_gap"] == pytest.approx(data["metrics"]["mean_gap"], rel=1e-12)


def test_check_with_groups_skips_other_rows(tmp_path):
    """A third group value is skipped with --groups; the metrics are those of the two groups only."""
    tab = dict(_table(f"{SMALL}.csv"))
    n = len(tab["g"])
    extra = 300
    rng = np.random.default_rng(7)
    cols = HAND_FEATURES + ["g", "y"]
    big = {}
    for c in cols:
        if c == "g":
            big[c] = np.concatenate([tab[c], np.array(["c"] * extra)])
        else:
            new = rng.normal(size=extra).astype(np.float32).astype(np.float64) * 5.0
            big[c] = np.concatenate([tab[c], new])
    order = rng.permutation(n + extra)
    path = write_csv(tmp_path / "three.csv", {k: v[order] for k, v in big.items()}, order=cols)
    model = copy_fixtures(tmp_path, f"{SMALL}.onnx")[0]

    # without --groups every value is a group (issue 13): the third is measured, not refused
    without = invoke("check", model, "--data", path, "--group", "g", "--target", "y", "--max-ks", "1", "--json")
    assert without.exit_code == 0, without.stderr
    assert [g["label"] for g in json.loads(without.stdout)["metrics"]["groups"]] == ["a", "b", "c"]

    result = invoke("check", model, "--data", path, "--group", "g", "--groups", "a,b", "--target", "y",
                    "--max-ks", "1", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rows"] == {"total": n + extra, "skipped": extra}
    pred, labels, target = reference(f"{SMALL}.onnx", f"{SMALL}.csv")
    want = scipy.stats.ks_2samp(pred[labels == "a", 0], pred[labels == "b", 0]).statistic
    assert abs(data["metrics"]["ks"] - want) <= 1e-9
    assert data["metrics"]["mse"] == pytest.approx(float(np.mean((pred[:, 0] - target) ** 2)), rel=1e-9)
    assert [g["count"] for g in data["metrics"]["groups"]] == [int((labels == "a").sum()), int((labels == "b").sum())]


# ------------------------------------------------------------------------------------------------
# exit codes 0 / 1


@pytest.mark.parametrize("metric", METRICS)
def test_exit_code_at_the_threshold(work, metric):
    """value <= threshold passes (equality too); the next threshold below fails."""
    value = small_metrics()[metric]
    assert value > 0
    above = float(np.nextafter(value, np.inf)) * (1 + 1e-9)
    below = float(np.nextafter(value, -np.inf)) * (1 - 1e-9)
    for threshold, code in ((above, 0), (value, 0), (float(np.nextafter(value, -np.inf)), 1), (below, 1)):
        result = invoke(*small_args(work, FLAG[metric], repr(threshold), "--json"))
        assert result.exit_code == code, (metric, threshold, value, result.stdout, result.stderr)
        data = json.loads(result.stdout)
        assert data["passed"] is (code == 0)
        [t] = data["thresholds"]
        assert t["metric"] == metric and t["threshold"] == threshold and t["value"] == value
        assert t["passed"] is (code == 0)


def test_exit_code_one_when_any_threshold_is_exceeded(work):
    m = small_metrics()
    loose = {k: m[k] * 1.01 for k in METRICS}
    passing = [arg for k in METRICS for arg in (FLAG[k], repr(loose[k]))]
    result = invoke(*small_args(work, *passing))
    assert result.exit_code == 0, (result.stdout, result.stderr)
    for failing in METRICS:
        args = [arg for k in METRICS
                for arg in (FLAG[k], repr(loose[k] if k != failing else m[k] * 0.99))]
        result = invoke(*small_args(work, *args))
        assert result.exit_code == 1, (failing, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr


def test_exit_code_one_for_every_exceeded_threshold(work):
    m = small_metrics()
    args = [arg for k in METRICS for arg in (FLAG[k], repr(m[k] / 2))]
    result = invoke(*small_args(work, *args, "--json"))
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert [t["passed"] for t in data["thresholds"]] == [False] * 4


def test_zero_threshold_is_valid(work):
    result = invoke(*small_args(work, "--max-ks", "0"))
    assert result.exit_code == 1, result.stderr  # KS > 0 on this data: a real FAIL, not bad input


def test_summary_names_metric_value_threshold_and_verdict(work):
    m = small_metrics()
    result = invoke(*small_args(work, "--max-ks", "0.9", "--max-mse", repr(m["mse"] / 2)))
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    ks_line = next(line for line in lines if line.split() and line.split()[0] == "ks")
    mse_line = next(line for line in lines if line.split() and line.split()[0] == "mse")
    assert "0.9" in ks_line and "PASS" in ks_line and "FAIL" not in ks_line
    assert f"{m['ks']:.4f}" in ks_line
    assert "FAIL" in mse_line and "PASS" not in mse_line
    assert f"{m['mse']:.4f}" in mse_line
    assert not any(line.split() and line.split()[0] in ("mean_gap", "mae") for line in lines)

    result = invoke(*small_args(work, "--max-ks", "0.9"))
    assert result.exit_code == 0
    assert "PASS" in result.stdout and "FAIL" not in result.stdout


# ------------------------------------------------------------------------------------------------
# --json


def test_json_schema(work):
    m = small_metrics()
    result = invoke(*small_args(work, "--max-ks", "0.9", "--max-mean-gap", repr(m["mean_gap"] / 2),
                                "--max-mse", "1", "--max-mae", "1", "--json"))
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    assert data["passed"] is False
    for key in METRICS:
        assert isinstance(data["metrics"][key], float), key
    assert [t["metric"] for t in data["thresholds"]] == list(METRICS)
    for t in data["thresholds"]:
        assert set(t) >= {"metric", "value", "threshold", "passed"}
        assert t["value"] == data["metrics"][t["metric"]]
        assert t["passed"] is (t["value"] <= t["threshold"])
    assert [t["passed"] for t in data["thresholds"]] == [True, False, True, True]
    assert [t["threshold"] for t in data["thresholds"]] == [0.9, m["mean_gap"] / 2, 1.0, 1.0]


def test_json_without_target_has_null_errors(work):
    result = invoke(*small_args(work, "--max-ks", "0.9", "--features", ",".join(HAND_FEATURES), "--json",
                                target=False))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["passed"] is True
    assert data["metrics"]["mse"] is None and data["metrics"]["mae"] is None
    assert data["metrics"]["ks"] == small_metrics()["ks"]
    assert [t["metric"] for t in data["thresholds"]] == ["ks"]


@pytest.mark.parametrize("name", ["gemm_no_bias", "law_school_mlp_dynamo", "sigmoid_head", "float16_weights"])
def test_json_metrics_match_repair_before(tmp_path, name):
    """check's metrics use the same key names and values as `repair --json`'s `before` (--holdout 0):
    the same model on the same rows gives the same numbers whichever command measures them."""
    data_name = "law_school.csv" if name.startswith("law") else f"{name}.csv"
    group, target = ("race1", "ugpa") if name.startswith("law") else ("g", "y")
    model, data = copy_fixtures(tmp_path, f"{name}.onnx", data_name)
    rep = invoke("repair", model, "--layer", "-2", "--data", data, "--group", group, "--target", target,
                 "--holdout", "0", "--json", "-o", tmp_path / "out.onnx")
    assert rep.exit_code == 0, rep.stderr
    before = json.loads(rep.stdout)["before"]
    res = invoke("check", model, "--data", data, "--group", group, "--target", target, "--max-ks", "1", "--json")
    assert res.exit_code == 0, res.stderr
    metrics = json.loads(res.stdout)["metrics"]
    for key in METRICS:
        assert key in before and key in metrics, key
        assert metrics[key] == pytest.approx(before[key], rel=1e-12, abs=1e-15), (key, metrics[key], before[key])
    assert abs(metrics["ks"] - before["ks"]) <= 1e-12
    assert [g["count"] for g in metrics["groups"]] == [g["count"] for g in before["groups"]]


def near_tie_csv(path: Path, model_name: str = "float16_weights.onnx", k: int = 50) -> Path:
    """Data on which the model's two outputs of a pair of rows nearly tie.

    Group a: the k rows of the fixture with the lowest outputs plus row p; group b: row q plus the k rows
    with the highest outputs, where p and q are two nearby inputs whose output order onnxruntime's graph
    optimiser changes (found by a seeded search; if there is none, any close pair). KS is then 1 when
    p's output is below q's and k/(k+1) otherwise: it depends on the rounding of one pair of outputs.
    """
    model = onnx.load(str(FIXTURES / model_name))
    rng = np.random.default_rng(0)
    x = (np.array([0.3, -0.2, 0.5, 0.1, -0.4, 0.2]) + 1e-4 * rng.normal(size=(4000, 6))).astype(np.float32)
    name = model.graph.input[0].name
    plain = ort_session(model).run(None, {name: x})[0].ravel().astype(np.float64)
    opt = default_session(FIXTURES / model_name).run(None, {name: x})[0].ravel().astype(np.float64)
    order = np.argsort(plain, kind="stable")
    pair = (order[0], order[1])
    for a, b in itertools.pairwise(order):
        if (plain[a] < plain[b]) != (opt[a] < opt[b]):
            pair = (a, b)
            break
    pred, _, _ = reference(model_name, f"{model_name[:-5]}.csv", optimized=False)
    tab = _table(f"{model_name[:-5]}.csv")
    by_out = np.argsort(pred[:, 0], kind="stable")
    low, high = by_out[:k], by_out[-k:]
    assert pred[low, 0].max() < plain[list(pair)].min() and pred[high, 0].min() > plain[list(pair)].max()
    feats = np.vstack([np.stack([tab[c] for c in HAND_FEATURES], axis=1)[low], x[list(pair)].astype(np.float64),
                       np.stack([tab[c] for c in HAND_FEATURES], axis=1)[high]])
    groups = ["a"] * (k + 1) + ["b"] * (k + 1)
    target = np.concatenate([tab["y"][low], plain[list(pair)], tab["y"][high]])
    cols = {c: feats[:, j] for j, c in enumerate(HAND_FEATURES)}
    cols.update(g=np.array(groups), y=target)
    return write_csv(path, cols, order=[*HAND_FEATURES, "g", "y"])


def test_check_ks_equals_repair_before_on_near_ties(tmp_path):
    """The gate's KS is the one `repair` reports as `before` (and KS of the plain graph), even when one pair
    of outputs nearly ties: both commands must run the model the same way."""
    model = copy_fixtures(tmp_path, "float16_weights.onnx")[0]
    data = near_tie_csv(tmp_path / "ties.csv")
    rep = invoke("repair", model, "--layer", "1", "--data", data, "--group", "g", "--target", "y", "--holdout", "0",
                 "--json", "-o", tmp_path / "out.onnx")
    assert rep.exit_code == 0, rep.stderr
    before = json.loads(rep.stdout)["before"]
    res = invoke("check", model, "--data", data, "--group", "g", "--target", "y", "--max-ks", "0.99", "--json")
    assert res.exit_code in (0, 1), res.stderr
    got = json.loads(res.stdout)
    assert got["metrics"]["ks"] == before["ks"], (got["metrics"]["ks"], before["ks"])
    assert got["passed"] is (before["ks"] <= 0.99)


# ------------------------------------------------------------------------------------------------
# --junit


def parse_junit(path: Path):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    assert len(suites) == 1
    cases = suites[0].findall("testcase")
    return root, suites[0], cases


def test_junit_report_failing_gate(work):
    m = small_metrics()
    junit = work / "reports" / "check.xml"
    junit.parent.mkdir()
    args = ["--max-ks", "0.9", "--max-mean-gap", repr(m["mean_gap"] / 2), "--max-mse", repr(m["mse"] * 2),
            "--max-mae", repr(m["mae"] / 2)]
    result = invoke(*small_args(work, *args, "--junit", junit))
    assert result.exit_code == 1
    root, suite, cases = parse_junit(junit)
    assert len(cases) == 4
    failed = {i for i, c in enumerate(cases) if c.find("failure") is not None}
    assert failed == {1, 3}
    names = [c.get("name") for c in cases]
    for name, metric in zip(names, METRICS):
        assert metric in name
    for c in cases:
        assert len(c.findall("failure")) <= 1
        assert c.find("error") is None and c.find("skipped") is None
    for node in (root, suite):
        assert node.get("tests") == "4"
        assert node.get("failures") == "2"
        assert node.get("errors", "0") == "0"
    for i in failed:
        failure = cases[i].find("failure")
        assert METRICS[i] in (failure.get("message") or "") + (failure.text or "")


def test_junit_report_passing_gate(work):
    junit = work / "check.xml"
    junit.write_text("stale content")
    result = invoke(*small_args(work, "--max-ks", "0.9", "--max-mse", "10", "--junit", junit))
    assert result.exit_code == 0, result.stderr
    root, suite, cases = parse_junit(junit)
    assert len(cases) == 2
    assert all(c.find("failure") is None for c in cases)
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    assert root.get("tests") == "2" and root.get("failures") == "0"
    # the file holds the report and nothing else is left in the directory
    assert sorted(p.name for p in work.iterdir()) == sorted([f"{SMALL}.onnx", f"{SMALL}.csv", "check.xml"])


def test_junit_and_json_together(work):
    junit = work / "check.xml"
    m = small_metrics()
    result = invoke(*small_args(work, "--max-mae", repr(m["mae"] / 2), "--json", "--junit", junit))
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    _, _suite, cases = parse_junit(junit)
    assert len(cases) == len(data["thresholds"]) == 1
    assert (cases[0].find("failure") is not None) is (not data["thresholds"][0]["passed"])


# ------------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written


def _bad_cases(work):
    model, data = work / f"{SMALL}.onnx", work / f"{SMALL}.csv"
    (work / "text.onnx").write_text("this is not an onnx model\n")
    base = ["check", model, "--data", data, "--group", "g"]
    return {
        "no threshold": ([*base, "--target", "y"], ("--max-ks",)),
        "mse without target": ([*base, "--max-mse", "1", "--features", ",".join(HAND_FEATURES)], ("--target",)),
        "mae without target": ([*base, "--max-mae", "1", "--features", ",".join(HAND_FEATURES)], ("--target",)),
        "negative threshold": ([*base, "--target", "y", "--max-ks", "-0.1"], ("--max-ks",)),
        "negative mean gap": ([*base, "--target", "y", "--max-ks", "0.5", "--max-mean-gap", "-1"],
                              ("--max-mean-gap",)),
        "nan threshold": ([*base, "--target", "y", "--max-ks", "nan"], ("--max-ks",)),
        "missing data file": (["check", model, "--data", work / "nosuch.csv", "--group", "g", "--max-ks", "1"],
                              ("nosuch.csv",)),
        "missing group column": (["check", model, "--data", data, "--group", "race", "--target", "y",
                                  "--max-ks", "1"], ("race",)),
        "groups with one value": ([*base, "--target", "y", "--groups", "a", "--max-ks", "1"], ("--groups",)),
        "groups with the same value twice": ([*base, "--target", "y", "--groups", "a,a", "--max-ks", "1"],
                                             ("--groups",)),
        "groups value not in the data": ([*base, "--target", "y", "--groups", "a,zz", "--max-ks", "1"], ("zz",)),
        "not an onnx model": (["check", work / "text.onnx", "--data", data, "--group", "g", "--target", "y",
                               "--max-ks", "1"], ("text.onnx",)),
        "csv as the model": (["check", data, "--data", data, "--group", "g", "--target", "y", "--max-ks", "1"],
                             (f"{SMALL}.csv",)),
        "missing model file": (["check", work / "nosuch.onnx", "--data", data, "--group", "g", "--target", "y",
                                "--max-ks", "1"], ("nosuch.onnx",)),
        "missing target column": ([*base, "--target", "label", "--max-ks", "1"], ("label",)),
    }


BAD = ["no threshold", "mse without target", "mae without target", "negative threshold", "negative mean gap",
       "nan threshold", "missing data file", "missing group column", "groups with one value",
       "groups with the same value twice", "groups value not in the data", "not an onnx model", "csv as the model",
       "missing model file", "missing target column"]


@pytest.mark.parametrize("what", BAD)
def test_bad_input_exits_2_with_one_line(work, what):
    args, needles = _bad_cases(work)[what]
    result = invoke(*args)
    assert_bad_input(result, *needles)


@pytest.mark.parametrize("what", BAD)
def test_bad_input_leaves_files_and_junit_alone(work, what):
    """Bad input writes no JUnit file (neither a new one nor over an old one) and touches no input."""
    args, _ = _bad_cases(work)[what]
    old = work / "old.xml"
    old.write_text("<previous report/>\n")
    state = dir_state(work)
    assert_bad_input(invoke(*args, "--junit", old))
    assert dir_state(work) == state
    new = work / "new.xml"
    assert_bad_input(invoke(*args, "--junit", new))
    assert not new.exists()
    assert dir_state(work) == state


def test_junit_onto_an_input_is_refused(work):
    data = work / f"{SMALL}.csv"
    model = work / f"{SMALL}.onnx"
    digests = (sha256(data), sha256(model))
    for target in (data, model):
        assert_bad_input(invoke(*small_args(work, "--max-ks", "1", "--junit", target)))
    assert (sha256(data), sha256(model)) == digests


def test_junit_errors_name_the_junit_option(work):
    """`check` has no -o option: a refused --junit path must be explained in terms of --junit."""
    for target in (work / f"{SMALL}.csv", work):
        line = assert_bad_input(invoke(*small_args(work, "--max-ks", "1", "--junit", target)))
        assert "--junit" in line and not re.search(r"(^|\s)-o\b", line), line


def test_junit_with_xml_special_characters_in_paths(tmp_path):
    odd = tmp_path / "a&b <c>"
    odd.mkdir()
    model, data = copy_fixtures(odd, f"{SMALL}.onnx", f"{SMALL}.csv")
    junit = odd / "r&<>.xml"
    result = invoke("check", model, "--data", data, "--group", "g", "--target", "y", "--max-ks", "0",
                    "--junit", junit)
    assert result.exit_code == 1
    _root, suite, cases = parse_junit(junit)
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props.get("model") == str(model) and props.get("data") == str(data)
    assert len(cases) == 1 and cases[0].find("failure") is not None


def test_group_column_with_one_value_is_bad_input(tmp_path):
    tab = _table(f"{SMALL}.csv")
    keep = tab["g"] == "a"
    data = write_csv(tmp_path / "one.csv", {k: v[keep] for k, v in tab.items()}, order=[*HAND_FEATURES, "g", "y"])
    model = copy_fixtures(tmp_path, f"{SMALL}.onnx")[0]
    assert_bad_input(invoke("check", model, "--data", data, "--group", "g", "--target", "y", "--max-ks", "1"), "'g'")
    # naming the missing group explicitly is bad input too
    assert_bad_input(invoke("check", model, "--data", data, "--group", "g", "--groups", "a,b", "--target", "y",
                            "--max-ks", "1"), "'b'")


def test_junit_in_missing_directory_is_bad_input(work):
    assert_bad_input(invoke(*small_args(work, "--max-ks", "1", "--junit", work / "nodir" / "j.xml")), "nodir")
    assert not (work / "nodir").exists()


def test_library_check_needs_a_threshold():
    from onnx_esvd import OptionError

    with pytest.raises(OptionError):
        check(FIXTURES / f"{SMALL}.onnx", FIXTURES / f"{SMALL}.csv", group="g", target="y")
    with pytest.raises(OptionError):
        check(FIXTURES / f"{SMALL}.onnx", FIXTURES / f"{SMALL}.csv", group="g", max_mse=1.0,
              features=HAND_FEATURES)


def test_library_junit_xml_round_trip():
    res = check(FIXTURES / f"{SMALL}.onnx", FIXTURES / f"{SMALL}.csv", group="g", target="y", max_ks=0.0,
                max_mse=1.0)
    root = ET.fromstring(res.junit_xml(1.5).split("\n", 1)[1])
    [suite] = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert [c.find("failure") is not None for c in cases] == [True, False]
    assert suite.get("failures") == "1" and suite.get("tests") == "2"
    assert float(suite.get("time")) == pytest.approx(1.5)


# ------------------------------------------------------------------------------------------------
# start-up cost


def _imported_modules(stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    out = set()
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+\s+\|\s+\d+\s+\|\s*(\S+)\s*$", line)
        if m:
            out.add(m.group(1))
    return out


def _run_importtime(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = ("import sys; sys.argv = " + repr(["onnx-esvd", *argv]) +
            "; from onnx_esvd_cli.main import run; run()")
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def _top_packages(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


def test_check_on_a_small_model_does_not_import_scipy(work):
    proc = _run_importtime(["check", str(work / f"{SMALL}.onnx"), "--data", str(work / f"{SMALL}.csv"), "--group",
                            "g", "--target", "y", "--max-ks", "0.9", "--max-mse", "1", "--json"], work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["passed"] is True
    mods = _imported_modules(proc.stderr)
    assert "onnxruntime" in _top_packages(mods)  # the scan sees the imports at all
    assert "scipy" not in _top_packages(mods), sorted(m for m in mods if m.startswith("scipy"))[:10]
    assert not re.search(r"\|\s+scipy(\.|\s*$)", proc.stderr, re.MULTILINE)
    assert "numpy.ma" not in mods  # np.median / np.percentile import it (about 50 ms); stats.quantile does not


def test_check_failing_gate_and_bad_input_do_not_import_scipy(work):
    proc = _run_importtime(["check", str(work / f"{SMALL}.onnx"), "--data", str(work / f"{SMALL}.csv"), "--group",
                            "g", "--target", "y", "--max-ks", "0"], work)
    assert proc.returncode == 1
    assert "scipy" not in _top_packages(_imported_modules(proc.stderr))
    proc = _run_importtime(["check", str(work / f"{SMALL}.onnx"), "--data", str(work / "nosuch.csv"), "--group",
                            "g", "--max-ks", "1"], work)
    assert proc.returncode == 2
    assert "scipy" not in _top_packages(_imported_modules(proc.stderr))


def test_check_help_imports_no_heavy_library(tmp_path):
    proc = _run_importtime(["check", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--max-ks", "--max-mean-gap", "--max-mse", "--junit", "--json"):
        assert flag in proc.stdout, flag
    mods = _top_packages(_imported_modules(proc.stderr))
    assert "onnx_esvd_cli" in mods
    heavy = mods & {"onnx", "onnxruntime", "numpy", "scipy"}
    assert not heavy, heavy


def test_check_via_module_entry_point(work):
    proc = subprocess.run([sys.executable, "-m", "onnx_esvd_cli.main", "check", str(work / f"{SMALL}.onnx"),
                           "--data", str(work / f"{SMALL}.csv"), "--group", "g", "--target", "y", "--max-ks", "0"],
                          cwd=work, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL" in proc.stdout


def test_repair_with_the_default_cdf_refit_does_not_import_scipy(work):
    """The penalised refit runs our own L-BFGS: scipy's import (a quarter to half a second) stays out of repair."""
    out = work / "no_scipy.onnx"
    proc = _run_importtime(["repair", str(work / f"{SMALL}.onnx"), "--layer", "-2", "--data", str(work / f"{SMALL}.csv"),
                            "--group", "g", "--target", "y", "-o", str(out), "--quiet"], work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists()
    mods = _imported_modules(proc.stderr)
    assert "onnx_esvd.penalty" in mods and "onnx_esvd.lbfgs" in mods  # the cdf refit ran
    assert "scipy" not in _top_packages(mods), sorted(m for m in mods if m.startswith("scipy"))[:10]
    assert "numpy.ma" not in mods  # the ESVD's medians, the cdf thresholds and the bootstrap's percentiles


@pytest.mark.parametrize("argv", [["layers", f"{SMALL}.onnx"], ["check", "--help"]], ids=["layers", "check-help"])
def test_commands_do_not_import_pydantic(work, argv):
    """typer 0.29 imports pydantic (about 0.1 s) whenever a command's parameters are converted; pyproject
    holds typer below 0.29, and no command may pull pydantic in by another way."""
    proc = _run_importtime(argv, work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("Gemm_2" in proc.stdout) if argv[0] == "layers" else ("--max-ks" in proc.stdout)
    mods = _top_packages(_imported_modules(proc.stderr))
    assert "typer" in mods  # the scan sees the imports at all
    assert "pydantic" not in mods and "pydantic_core" not in mods, sorted(m for m in mods if "pydantic" in m)
