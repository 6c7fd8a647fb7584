"""`onnx-esvd audit`: the explainable-SVD view of every repairable layer, checked against a plain
onnxruntime capture + numpy, the bounds, the ranking, the JSON schema, the table and bad input."""

from __future__ import annotations

import itertools
import json
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
import scipy.stats
from onnx import helper

from conftest import (assert_bad_input, invoke,
                      CASES, FIXTURES, REPAIRABLE, copy_fixtures, dir_state, feeds_from_columns, group_label_text,
                      load_table, make_model, ort_session, run_tensors, tensor, write_csv)
from onnx_esvd import audit, check
from onnx_esvd.graph import find_layers, read_weight

LAW_FEATURES = ["dnn_bar_pass_prediction", "gender_female", "gender_male", "lsat", "pass_bar"]
HAND_FEATURES = [f"x{j}" for j in range(6)]
LEGACY = "law_school_mlp_legacy.onnx"
SMALL = "gemm_transb0_alpha"

#: fixtures whose per-layer view is recomputed from a plain onnxruntime capture
DIRECT = [LEGACY, "law_school_sklearn.onnx", "gemm_transb0_alpha.onnx", "matmul_bias_first.onnx",
          "float16_weights.onnx", "shared_initializer.onnx", "constant_weight.onnx", "float64_model.onnx"]


def features_of(data: str) -> list[str]:
    return LAW_FEATURES if data.startswith("law_school") else HAND_FEATURES




def rel_err(got: float, want: float, floor: float = 0.0) -> float:
    return abs(got - want) / max(abs(want), floor, 1e-300)


@cache
def _table(data: str) -> dict[str, np.ndarray]:
    return load_table(FIXTURES / data)


@cache
def audited(name: str):
    """Library `audit` of a fixture with its data, group and target columns."""
    case = CASES[name]
    return audit(case.path, case.data_path, group=case.group, target=case.target, features=features_of(case.data))


@cache
def legacy_json() -> dict:
    case = CASES[LEGACY]
    result = invoke("audit", case.path, "--data", case.data_path, "--group", "race1", "--target", "ugpa", "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------------------
# the view computed independently: plain onnxruntime capture + numpy


def layer_input_name(model: onnx.ModelProto, name: str, weight: str) -> str:
    """The data input of the named Gemm/MatMul node (the operand that is not the weight)."""
    node = next(n for n in model.graph.node if n.name == name)
    if node.op_type == "Gemm":
        return node.input[0]
    producers = {o: n for n in model.graph.node for o in n.output}

    def is_weight(t: str) -> bool:
        return t == weight or (t in producers and producers[t].op_type == "Constant") or \
            t in {i.name for i in model.graph.initializer}

    [x] = [t for t in node.input if not is_weight(t)]
    return x


def expected_view(w: np.ndarray, x0: np.ndarray, x1: np.ndarray, eps: float, top: int) -> dict:
    """The explainable-SVD view of ALGORITHM.md from raw rows, by routes other than the library's."""
    x0, x1 = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    n0, n1 = len(x0), len(x1)
    d = x0.shape[1]
    delta = x0.mean(axis=0) - x1.mean(axis=0)
    c0 = np.atleast_2d(np.cov(x0, rowvar=False, ddof=1))
    c1 = np.atleast_2d(np.cov(x1, rowvar=False, ddof=1))
    pooled = ((n0 - 1) * c0 + (n1 - 1) * c1) / (n0 + n1 - 2)
    spread = w @ pooled @ w.T

    # first moment: ||W delta||^2 <= tr(W (delta delta^T + eps I) W^T) = sum sigma_i(W S)^2
    gap1 = float(np.sum((w @ delta) ** 2))
    m = np.outer(delta, delta) + eps * np.eye(d)
    s1 = np.sort(np.clip(np.linalg.eigvalsh(w @ m @ w.T), 0, None))[::-1]  # sigma_i(W S)^2
    bound1 = float(np.trace(w @ m @ w.T))
    first = {"gap": gap1, "bound": bound1, "top_share": float(s1[:top].sum() / s1.sum()),
             "relative": gap1 / float(np.trace(spread)), "sigma": np.sqrt(s1[:top])}

    # second moment: ||W D W^T||_F <= (sum sigma_i(W S)^4)^(1/2), S = Q_r |Lambda_r|^(1/2)
    dd = c0 - c1
    gap2 = float(np.linalg.norm(w @ dd @ w.T))
    lam, q = np.linalg.eigh(0.5 * (dd + dd.T))
    keep = np.abs(lam) > d * np.finfo(np.float64).eps * np.abs(lam).max() if lam.size and np.abs(lam).max() > 0 \
        else np.zeros(lam.shape, bool)
    s = q[:, keep] * np.sqrt(np.abs(lam[keep]))
    sig2 = np.linalg.svd(w @ s, compute_uv=False) if keep.any() else np.zeros(0)
    p4 = sig2**4
    bound2 = float(np.sqrt(p4.sum()))
    second = {"gap": gap2, "bound": bound2, "top_share": float(p4[:top].sum() / p4.sum()) if p4.sum() > 0 else 0.0,
              "relative": gap2 / float(np.linalg.norm(spread)), "sigma": sig2[:top]}
    return {"first": first, "second": second, "score": first["relative"] + second["relative"]}


def assert_view_matches(got, want: dict, rtol: float, what: str) -> None:
    for part in ("first", "second"):
        g, w = getattr(got, part), want[part]
        for key in ("gap", "bound", "relative"):
            assert rel_err(getattr(g, key), w[key]) <= rtol, (what, part, key, getattr(g, key), w[key])
        assert abs(g.top_share - w["top_share"]) <= rtol, (what, part, "top_share", g.top_share, w["top_share"])
        assert len(g.sigma) == len(w["sigma"]), (what, part, g.sigma, w["sigma"])
        if len(w["sigma"]):
            scale = float(np.max(w["sigma"]))
            assert np.all(np.abs(np.asarray(g.sigma) - w["sigma"]) <= 1e-6 * scale), (what, part, g.sigma, w["sigma"])
    assert rel_err(got.score, want["score"]) <= rtol, (what, "score", got.score, want["score"])


@cache
def plain_capture(name: str):
    """Inputs of every repairable layer and the model output from a plain onnxruntime session."""
    case = CASES[name]
    model = onnx.load(str(case.path))
    tab = _table(case.data)
    feeds = feeds_from_columns(model, tab, features_of(case.data))
    layers = find_layers(model).layers
    inputs = [layer_input_name(model, layer.name, layer.weight) for layer in layers]
    out = model.graph.output[0].name
    values = run_tensors(model, feeds, [*dict.fromkeys(inputs), out])
    n = len(tab[case.group])
    xs = [np.asarray(values[t], np.float64).reshape(n, -1) for t in inputs]
    pred = np.asarray(values[out], np.float64).reshape(n, -1)
    return model, layers, inputs, xs, pred, group_label_text(tab[case.group])


@pytest.mark.parametrize("name", DIRECT)
def test_layer_view_equals_direct_computation(name):
    model, layers, inputs, xs, _pred, labels = plain_capture(name)
    res = audited(name)
    assert [a.layer.name for a in res.layers] == [layer.name for layer in layers]
    g0, g1 = res.groups
    for a, layer, tname, x in zip(res.layers, layers, inputs, xs):
        assert a.layer.input == tname
        w = read_weight(model, layer)
        want = expected_view(w, x[labels == g0], x[labels == g1], eps=1e-5, top=3)
        assert_view_matches(a, want, 1e-8, f"{name} {layer.name}")


def test_legacy_output_metrics_equal_plain_onnxruntime():
    _model, _layers, _inputs, _xs, pred, labels = plain_capture(LEGACY)
    data = legacy_json()
    target = _table("law_school.csv")["ugpa"]
    g0, g1 = data["groups"]
    assert (g0, g1) == ("black", "white")
    m = data["metrics"]
    assert abs(m["ks"] - scipy.stats.ks_2samp(pred[labels == g0, 0], pred[labels == g1, 0]).statistic) <= 1e-9
    assert rel_err(m["mean_gap"], abs(pred[labels == g0].mean() - pred[labels == g1].mean())) <= 1e-9
    assert rel_err(m["mse"], float(np.mean((pred[:, 0] - target) ** 2))) <= 1e-9
    assert rel_err(m["mae"], float(np.mean(np.abs(pred[:, 0] - target)))) <= 1e-9
    for grp, label in zip(m["groups"], (g0, g1)):
        mask = labels == label
        assert grp["label"] == label and grp["count"] == int(mask.sum())
        assert rel_err(grp["mean"], float(pred[mask].mean())) <= 1e-9
        assert rel_err(grp["std"], float(pred[mask].std(ddof=1))) <= 1e-9
        assert rel_err(grp["mse"], float(np.mean((pred[mask, 0] - target[mask]) ** 2))) <= 1e-9
        assert rel_err(grp["mae"], float(np.mean(np.abs(pred[mask, 0] - target[mask])))) <= 1e-9
    assert data["rows"] == {"total": 6018, "skipped": 0}


# ------------------------------------------------------------------------------------------------
# JSON schema, bounds and ranking on the Law School model


def test_legacy_json_has_one_entry_per_layer_in_layers_order():
    data = legacy_json()
    listed = invoke("layers", FIXTURES / LEGACY, "--json")
    assert listed.exit_code == 0
    layers = json.loads(listed.stdout)["layers"]
    assert len(data["layers"]) == len(layers) == len(CASES[LEGACY].layers) == 5
    for entry, layer in zip(data["layers"], layers):
        for key, value in layer.items():
            assert entry[key] == value, (key, entry[key], value)
        for part in ("first_moment", "second_moment"):
            for key in ("gap", "bound", "top_share", "relative"):
                assert isinstance(entry[part][key], float), (part, key)
        assert "rank" in entry and "score" in entry
        assert isinstance(entry["score"], float)
    assert data["refused"] == []
    for key in ("ks", "mean_gap", "mse", "mae"):
        assert isinstance(data["metrics"][key], float), key
    assert [g["label"] for g in data["metrics"]["groups"]] == ["black", "white"]


def _assert_ranking(entries: list[dict]) -> None:
    """Ranks 1..k over the ranked layers, by score descending; only a single-output final node unranked."""
    ranked = [e for e in entries if e["rank"] is not None]
    for e in entries:
        single_final = e["final"] and e["out_features"] == 1
        assert (e["rank"] is None) is single_final, (e["name"], e["rank"])
    assert sorted(e["rank"] for e in ranked) == list(range(1, len(ranked) + 1))
    by_rank = sorted(ranked, key=lambda e: e["rank"])
    scores = [e["score"] for e in by_rank]
    assert scores == sorted(scores, reverse=True), scores


def test_legacy_ranking():
    entries = legacy_json()["layers"]
    _assert_ranking(entries)
    assert [e["rank"] is None for e in entries] == [False] * 4 + [True]
    # the score is the sum of the two relative gaps
    for e in entries:
        assert e["score"] == pytest.approx(e["first_moment"]["relative"] + e["second_moment"]["relative"], rel=1e-12)


@pytest.mark.parametrize("name", REPAIRABLE)
def test_gap_within_bound_and_shares_in_unit_interval(name):
    res = audited(name)
    assert len(res.layers) == len(CASES[name].layers)
    entries = res.to_dict()["layers"]
    _assert_ranking(entries)
    for a in res.layers:
        for part in (a.first, a.second):
            assert part.gap >= 0 and part.bound >= 0
            assert part.gap <= part.bound * (1 + 1e-12), (name, a.layer.name, part)
            assert 0.0 <= part.top_share <= 1.0, (name, a.layer.name, part.top_share)
            assert part.relative >= 0
            assert list(part.sigma) == sorted(part.sigma, reverse=True) and len(part.sigma) <= res.top
        # the first-moment bound is exact: ||W delta||^2 + eps ||W||_F^2
        w = read_weight(onnx.load(str(CASES[name].path)), a.layer)
        assert rel_err(a.first.bound - a.first.gap, 1e-5 * float(np.sum(w * w))) <= 1e-6


def test_legacy_json_gap_within_bound():
    for e in legacy_json()["layers"]:
        for part in ("first_moment", "second_moment"):
            p = e[part]
            assert p["gap"] <= p["bound"] * (1 + 1e-12), (e["name"], part, p)
            assert 0 <= p["top_share"] <= 1


@pytest.mark.parametrize("name", ["law_school_mlp_legacy.onnx", "law_school_mlp_dynamo.onnx", "sigmoid_head.onnx",
                                  "gemm_transb0_alpha.onnx", "float16_weights.onnx", "matmul_bias_first.onnx"])
def test_output_metrics_equal_checks(name):
    """audit and check measure the same model on the same rows: the same numbers."""
    case = CASES[name]
    a = audited(name).metrics.to_dict()
    c = check(case.path, case.data_path, group=case.group, target=case.target, features=features_of(case.data),
              max_ks=1.0).metrics.to_dict()
    assert a["ks"] == c["ks"]
    for key in ("mean_gap", "mse", "mae"):
        assert a[key] == pytest.approx(c[key], rel=1e-12, abs=1e-15), (key, a[key], c[key])
    for ga, gc in zip(a["groups"], c["groups"]):
        assert ga["label"] == gc["label"] and ga["count"] == gc["count"]
        for key in ("mean", "std", "mse", "mae"):
            assert ga[key] == pytest.approx(gc[key], rel=1e-12, abs=1e-15), (key, ga[key], gc[key])


def test_cli_output_metrics_equal_check_json():
    case = CASES[LEGACY]
    res = invoke("check", case.path, "--data", case.data_path, "--group", "race1", "--target", "ugpa", "--max-ks",
                 "1", "--json")
    assert res.exit_code == 0, res.stderr
    want = json.loads(res.stdout)["metrics"]
    got = legacy_json()["metrics"]
    assert got["ks"] == want["ks"]
    for key in ("mean_gap", "mse", "mae"):
        assert got[key] == pytest.approx(want[key], rel=1e-12)


def test_output_metrics_equal_checks_on_near_ties(tmp_path):
    """Where the rounding of one pair of outputs decides KS, audit and check still agree."""
    model = onnx.load(str(FIXTURES / "float16_weights.onnx"))
    rng = np.random.default_rng(0)
    x = (np.array([0.3, -0.2, 0.5, 0.1, -0.4, 0.2]) + 1e-4 * rng.normal(size=(4000, 6))).astype(np.float32)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    plain = ort_session(model).run(None, {"input": x})[0].ravel()
    opt = ort.InferenceSession(str(FIXTURES / "float16_weights.onnx"), opts,
                               providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].ravel()
    order = np.argsort(plain, kind="stable")
    pair = [order[0], order[1]]
    for p, q in itertools.pairwise(order):
        if (plain[p] < plain[q]) != (opt[p] < opt[q]):
            pair = [p, q]
            break
    _, _, _, _, pred, _ = plain_capture("float16_weights.onnx")
    tab = _table("float16_weights.csv")
    by_out = np.argsort(pred[:, 0], kind="stable")
    k = 50
    low, high = by_out[:k], by_out[-k:]
    feats = np.stack([tab[c] for c in HAND_FEATURES], axis=1)
    rows = np.vstack([feats[low], x[pair].astype(np.float64), feats[high]])
    cols = {c: rows[:, j] for j, c in enumerate(HAND_FEATURES)}
    cols["g"] = np.array(["a"] * (k + 1) + ["b"] * (k + 1))
    data = write_csv(tmp_path / "ties.csv", cols, order=[*HAND_FEATURES, "g"])
    a = audit(FIXTURES / "float16_weights.onnx", data, group="g")
    c = check(FIXTURES / "float16_weights.onnx", data, group="g", max_ks=1.0)
    assert a.metrics.ks == c.metrics.ks, (a.metrics.ks, c.metrics.ks)


# ------------------------------------------------------------------------------------------------
# toy models: a hand computation and the equality case


def toy_model(w0: np.ndarray, b0: np.ndarray | None, w1: np.ndarray, b1: np.ndarray | None,
              dtype=np.float64) -> onnx.ModelProto:
    """x -> Gemm(W0, b0, transB=1) -> Relu -> Gemm(W1, b1, transB=1) -> y."""
    inits = [tensor("W0", w0.astype(dtype)), tensor("W1", w1.astype(dtype))]
    in0, in1 = ["x", "W0"], ["h", "W1"]
    if b0 is not None:
        inits.append(tensor("b0", b0.astype(dtype)))
        in0.append("b0")
    if b1 is not None:
        inits.append(tensor("b1", b1.astype(dtype)))
        in1.append("b1")
    nodes = [helper.make_node("Gemm", in0, ["z"], name="first", transB=1),
             helper.make_node("Relu", ["z"], ["h"], name="relu"),
             helper.make_node("Gemm", in1, ["y"], name="second", transB=1)]
    return make_model(nodes, inits, w0.shape[1], "y", dtype)


def _write_toy(tmp_path: Path, model: onnx.ModelProto, x: np.ndarray, groups: list[str],
               target: np.ndarray | None = None) -> tuple[Path, Path]:
    mpath = tmp_path / "toy.onnx"
    onnx.save(model, str(mpath))
    cols = {f"f{j}": x[:, j] for j in range(x.shape[1])}
    cols["grp"] = np.array(groups)
    order = [*cols]
    if target is not None:
        cols["label"] = target
        order.append("label")
    return mpath, write_csv(tmp_path / "toy.csv", cols, order=order)


def test_toy_model_view_equals_hand_computation(tmp_path):
    rng = np.random.default_rng(3)
    d, m = 3, 4
    w0 = rng.normal(size=(m, d))
    b0 = np.array([0.3, -0.1, 0.5, 0.2])
    w1 = rng.normal(size=(1, m))
    b1 = np.array([0.7])
    n0, n1 = 23, 17
    x = np.vstack([rng.normal(size=(n0, d)), rng.normal(size=(n1, d)) @ np.diag([2.0, 0.5, 1.0]) + 0.8])
    groups = ["u"] * n0 + ["v"] * n1
    perm = rng.permutation(n0 + n1)
    x, groups = x[perm], [groups[i] for i in perm]
    target = rng.normal(size=n0 + n1)
    mpath, dpath = _write_toy(tmp_path, toy_model(w0, b0, w1, b1), x, groups, target)

    eps, top = 1e-3, 2
    res = audit(mpath, dpath, group="grp", target="label", eps=eps, top=top, batch_size=8)
    assert res.groups == ("u", "v") and res.rows == n0 + n1 and res.skipped == 0
    assert res.top == top and res.eps == eps
    g = np.array(groups)
    h = np.maximum(x @ w0.T + b0, 0)
    y = h @ w1.T + b1
    for a, w, inp in zip(res.layers, (w0, w1), (x, h)):
        want = expected_view(w, inp[g == "u"], inp[g == "v"], eps=eps, top=top)
        assert_view_matches(a, want, 1e-9, a.layer.name)
    # hand formulas, spelled out for the first layer
    first = res.layers[0]
    delta = x[g == "u"].mean(axis=0) - x[g == "v"].mean(axis=0)
    assert rel_err(first.first.gap, float((w0 @ delta) @ (w0 @ delta))) <= 1e-12
    assert rel_err(first.first.bound, float((w0 @ delta) @ (w0 @ delta)) + eps * float((w0**2).sum())) <= 1e-12
    xc0 = x[g == "u"] - x[g == "u"].mean(axis=0)
    xc1 = x[g == "v"] - x[g == "v"].mean(axis=0)
    dd = xc0.T @ xc0 / (n0 - 1) - xc1.T @ xc1 / (n1 - 1)
    assert rel_err(first.second.gap, float(np.sqrt(((w0 @ dd @ w0.T) ** 2).sum()))) <= 1e-10
    lam, q = np.linalg.eigh(dd)
    ws = w0 @ q @ np.diag(np.sqrt(np.abs(lam)))
    assert rel_err(first.second.bound, float(np.sqrt((np.linalg.svd(ws, compute_uv=False) ** 4).sum()))) <= 1e-10
    # ranks: the hidden layer is ranked, the single-output final node is not
    assert [a.rank for a in res.layers] == [1, None]
    assert [a.layer.name for a in res.ranked()] == ["first", "second"]
    # output metrics by hand
    yu, yv = y[g == "u", 0], y[g == "v", 0]
    assert abs(res.metrics.ks - scipy.stats.ks_2samp(yu, yv).statistic) <= 1e-12
    assert rel_err(res.metrics.mean_gap, abs(yu.mean() - yv.mean())) <= 1e-12
    assert rel_err(res.metrics.mse, float(np.mean((y[:, 0] - target) ** 2))) <= 1e-12


def test_toy_two_ranked_layers(tmp_path):
    """With a two-output final node both layers are ranked, by score."""
    rng = np.random.default_rng(11)
    w0, w1 = rng.normal(size=(5, 3)), rng.normal(size=(2, 5))
    x = np.vstack([rng.normal(size=(30, 3)), rng.normal(size=(30, 3)) * 1.5 + 0.4])
    groups = ["p"] * 30 + ["q"] * 30
    mpath, dpath = _write_toy(tmp_path, toy_model(w0, np.zeros(5), w1, np.zeros(2)), x, groups)
    res = audit(mpath, dpath, group="grp", score="y:1")  # two outputs of a Gemm, not probabilities: name one
    _assert_ranking(res.to_dict()["layers"])
    assert sorted(a.rank for a in res.layers) == [1, 2]
    best = max(res.layers, key=lambda a: a.score)
    assert best.rank == 1
    g = np.array(groups)
    h = np.maximum(x @ w0.T, 0)
    for a, w, inp in zip(res.layers, (w0, w1), (x, h)):
        assert_view_matches(a, expected_view(w, inp[g == "p"], inp[g == "q"], 1e-5, 3), 1e-9, a.layer.name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equality_when_covariance_gap_is_semidefinite(tmp_path, dtype):
    """Group b's inputs are group a's times 2: D = C0 - 4 C0 = -3 C0 is semidefinite at both layers (no bias,
    ReLU commutes with scaling by 2), and then the second-moment gap equals its bound."""
    rng = np.random.default_rng(5)
    d, m = 4, 6
    w0, w1 = rng.normal(size=(m, d)), rng.normal(size=(1, m))
    xa = rng.normal(size=(40, d)).astype(dtype).astype(np.float64)
    x = np.vstack([xa, 2 * xa])
    groups = ["a"] * 40 + ["b"] * 40
    mpath, dpath = _write_toy(tmp_path, toy_model(w0, None, w1, None, dtype=dtype), x, groups)
    res = audit(mpath, dpath, group="grp")
    assert len(res.layers) == 2
    for a in res.layers:
        assert a.second.gap > 0
        assert rel_err(a.second.gap, a.second.bound) <= 1e-9, (a.layer.name, a.second)
        assert a.first.gap <= a.first.bound
    # hand check of the first layer: ||W (-3 C0) W^T||_F
    c0 = np.cov(xa, rowvar=False, ddof=1)
    w = w0.astype(dtype).astype(np.float64)
    tol = 1e-6 if dtype == np.float32 else 1e-9
    assert rel_err(res.layers[0].second.gap, 3 * float(np.linalg.norm(w @ c0 @ w.T))) <= tol


def test_identical_groups_have_zero_gaps(tmp_path):
    rng = np.random.default_rng(9)
    w0, w1 = rng.normal(size=(4, 3)), rng.normal(size=(1, 4))
    xa = rng.normal(size=(25, 3))
    x = np.vstack([xa, xa[::-1]])
    mpath, dpath = _write_toy(tmp_path, toy_model(w0, np.full(4, 0.1), w1, None), x, ["a"] * 25 + ["b"] * 25)
    res = audit(mpath, dpath, group="grp", eps=1e-4)
    assert res.metrics.ks == 0.0 and res.metrics.mean_gap <= 1e-12
    for a, w in zip(res.layers, (w0, w1)):
        assert a.first.gap <= 1e-20
        assert rel_err(a.first.bound, 1e-4 * float((w**2).sum())) <= 1e-9
        assert a.second.gap <= 1e-9 * max(a.second.bound, 1.0)
        assert a.second.bound <= 1e-9
        assert 0.0 <= a.second.top_share <= 1.0 and 0.0 <= a.first.top_share <= 1.0


# ------------------------------------------------------------------------------------------------
# one pass, invariances


def test_one_capture_pass_for_all_layers(monkeypatch):
    import onnx_esvd.capture as capture_mod

    sessions, runs = [], []
    real = capture_mod.Runner

    class Counting(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(self)

        def run(self, feeds):
            runs.append(len(next(iter(feeds.values()))))
            return super().run(feeds)

    monkeypatch.setattr(capture_mod, "Runner", Counting)
    case = CASES[f"{SMALL}.onnx"]
    res = audit(case.path, case.data_path, group="g", target="y", batch_size=512)
    assert len(res.layers) == 3
    assert len(sessions) == 1
    assert runs == [512, 512, 512, 464]  # every row exactly once


def test_batch_size_row_order_and_group_order_do_not_matter(tmp_path):
    case = CASES[f"{SMALL}.onnx"]
    base = audited(f"{SMALL}.onnx")
    tab = _table(case.data)
    perm = np.random.default_rng(1).permutation(len(tab["g"]))
    shuffled = write_csv(tmp_path / "shuffled.csv", {k: v[perm] for k, v in tab.items()},
                         order=[*HAND_FEATURES, "g", "y"])
    variants = [audit(case.path, case.data_path, group="g", target="y", batch_size=7),
                audit(case.path, shuffled, group="g", target="y", batch_size=333),
                audit(case.path, case.data_path, group="g", groups=["b", "a"], target="y")]
    for res in variants:
        for a, b in zip(res.layers, base.layers):
            for part in ("first", "second"):
                for key in ("gap", "bound", "relative", "top_share"):
                    assert rel_err(getattr(getattr(a, part), key), getattr(getattr(b, part), key)) <= 1e-9, \
                        (a.layer.name, part, key)
            assert a.rank == b.rank
        assert res.metrics.ks == base.metrics.ks
    assert variants[2].groups == ("b", "a")


# ------------------------------------------------------------------------------------------------
# refused layers, the table


def test_json_lists_only_repairable_layers(tmp_path):
    """runtime_weight.onnx has a MatMul with a run-time weight: audit's `layers` are `layers --json`'s."""
    rng = np.random.default_rng(4)
    x = np.vstack([rng.normal(size=(60, 6)), rng.normal(size=(40, 6)) + 0.7]).astype(np.float32).astype(np.float64)
    cols = {f"x{j}": x[:, j] for j in range(6)}
    cols["g"] = np.array(["a"] * 60 + ["b"] * 40)
    data = write_csv(tmp_path / "rw.csv", cols)
    model = FIXTURES / "runtime_weight.onnx"
    res = invoke("audit", model, "--data", data, "--group", "g", "--json")
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    listed = json.loads(invoke("layers", model, "--json").stdout)
    assert [e["name"] for e in got["layers"]] == [e["name"] for e in listed["layers"]] == ["Gemm_0", "Gemm_2"]
    for entry, layer in zip(got["layers"], listed["layers"]):
        assert {k: entry[k] for k in layer} == layer
    assert [r["name"] for r in got["refused"]] == [r["name"] for r in listed["refused"]] == ["MatMul_1"]
    assert got["metrics"]["mse"] is None
    for e in got["layers"]:
        for part in ("first_moment", "second_moment"):
            assert e[part]["gap"] <= e[part]["bound"] * (1 + 1e-12)


def test_table_names_every_layer_and_the_largest_disparity():
    case = CASES[LEGACY]
    res = invoke("audit", case.path, "--data", case.data_path, "--group", "race1", "--target", "ugpa")
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    for name, *_ in case.layers:
        assert any(f" {name} " in f" {line} " for line in out.splitlines()), name
    best = next(e for e in legacy_json()["layers"] if e["rank"] == 1)
    line = next(line for line in out.splitlines() if "largest disparity" in line)
    assert best["name"] in line and str(best["index"]) in line
    for other in legacy_json()["layers"]:
        if other["name"] != best["name"]:
            assert other["name"] not in line
    for word in ("KS", "MSE", "black", "white"):
        assert word in out, word


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def work(tmp_path):
    copy_fixtures(tmp_path, f"{SMALL}.onnx", f"{SMALL}.csv")
    (tmp_path / "text.onnx").write_text("not an onnx model\n")
    return tmp_path


BAD = {
    "missing data file": (lambda w: ["--data", w / "nosuch.csv", "--group", "g"], "nosuch.csv"),
    "missing group column": (lambda w: ["--data", w / f"{SMALL}.csv", "--group", "race", "--target", "y"], "race"),
    "missing target column": (lambda w: ["--data", w / f"{SMALL}.csv", "--group", "g", "--target", "label"],
                              "label"),
    "groups with one value": (lambda w: ["--data", w / f"{SMALL}.csv", "--group", "g", "--target", "y", "--groups",
                                         "a"], "--groups"),
    "groups value not in the data": (lambda w: ["--data", w / f"{SMALL}.csv", "--group", "g", "--target", "y",
                                                "--groups", "a,zz"], "zz"),
    "zero eps": (lambda w: ["--data", w / f"{SMALL}.csv", "--group", "g", "--target", "y", "--eps", "0"], "--eps"),
    "negative eps": (lambda w: ["--data", w / f"{SMALL}.csv", "--group", "g", "--target", "y", "--eps", "-1"],
                     "--eps"),
    "zero top": (lambda w: ["--data", w / f"{SMALL}.csv", "--group", "g", "--target", "y", "--top", "0"], "--top"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input_exits_2_with_one_line(work, what):
    make, needle = BAD[what]
    state = dir_state(work)
    assert_bad_input(invoke("audit", work / f"{SMALL}.onnx", *make(work)), needle)
    assert dir_state(work) == state


def test_group_with_one_row_is_bad_input(work):
    tab = _table(f"{SMALL}.csv")
    keep = (tab["g"] == "a") | (np.cumsum(tab["g"] == "b") == 1) & (tab["g"] == "b")
    data = write_csv(work / "oneb.csv", {k: v[keep] for k, v in tab.items()}, order=[*HAND_FEATURES, "g", "y"])
    assert_bad_input(invoke("audit", work / f"{SMALL}.onnx", "--data", data, "--group", "g", "--target", "y"), "'b'")


@pytest.mark.parametrize("model", ["text.onnx", "nosuch.onnx", f"{SMALL}.csv"])
def test_bad_model_exits_2_with_one_line(work, model):
    state = dir_state(work)
    assert_bad_input(invoke("audit", work / model, "--data", work / f"{SMALL}.csv", "--group", "g", "--target", "y",
                            "--json"), model)
    assert dir_state(work) == state
