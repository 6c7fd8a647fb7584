"""The repair pipeline end to end on every fixture, checked against plain onnxruntime + numpy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import (CASES, FIXTURES, REPAIRABLE, assert_only_changed, dir_state, feeds_from_columns,
                      initializer_map, load_table, ort_session, run_tensors, sha256, write_csv)
from onnx_esvd import OutputError, repair
from onnx_esvd.errors import DataError, LayerError, OptionError
from onnx_esvd.graph import find_layers, read_bias, read_weight
from onnx_esvd.metrics import ks_statistic
from onnx_esvd.rows import row_uniform
from onnx_esvd.pipeline import METADATA_KEY

FEATURES_OF = {
    "law_school.csv": ["dnn_bar_pass_prediction", "gender_female", "gender_male", "lsat", "pass_bar"],
    "law_school.npz": ["dnn_bar_pass_prediction", "gender_female", "gender_male", "lsat", "pass_bar"],
}
HAND_FEATURES = [f"x{j}" for j in range(6)]

_TABLES: dict[str, dict[str, np.ndarray]] = {}


def table_of(data: str) -> dict[str, np.ndarray]:
    if data not in _TABLES:
        _TABLES[data] = load_table(FIXTURES / data)
    return _TABLES[data]


def features_of(data: str) -> list[str]:
    return FEATURES_OF.get(data, HAND_FEATURES)


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / name))


def run_case(name: str, data=None, **kw):
    """`repair` of a fixture with its data, group and target columns (keywords override)."""
    case = CASES[name]
    # the exact closed-form refit: these tests check invariances to round-off (the default cdf refit is an
    # optimisation, whose result moves at the 1e-5 level with the batch size; see test_default_refit_*)
    args = dict(layer=case.repair_layer, group=case.group, target=case.target, refit="fair")
    args.update(kw)
    return repair(case.path, case.data_path if data is None else data, **args)


def rel_close(got, want, rtol, what=""):
    """Elementwise |got - want| <= rtol * (|want| + max|want| * 1e-3): relative, with a floor for tiny entries."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    bound = rtol * (np.abs(want) + 1e-3 * np.abs(want).max())
    err = np.abs(got - want)
    worst = np.argmax(err / bound)
    assert np.all(err <= bound), (f"{what}: max |diff| / bound = {(err / bound).max():.3g} at {np.unravel_index(worst, err.shape)}"
                                  f" (got {got.flat[worst]!r}, want {want.flat[worst]!r}, rtol {rtol:g})")


def layer_of(model, index):
    return find_layers(model).layers[index]


def allowed_changes(res, refit_applied: bool) -> set[str]:
    names = {res.layer.weight}
    if refit_applied:
        names.add(res.final.weight)
        if res.final.bias is not None:
            names.add(res.final.bias)
    return names


def captured_inputs(model: onnx.ModelProto, data: str, tensor: str, groups: tuple[str, str]):
    """The input of a node for every data row, from a plain onnxruntime run, split by group."""
    tab = table_of(data)
    case_group = "race1" if data.startswith("law_school") else "g"
    feeds = feeds_from_columns(model, tab, features_of(data))
    x = np.asarray(run_tensors(model, feeds, [tensor])[tensor], np.float64)
    labels = _labels(tab[case_group])
    return x[labels == groups[0]], x[labels == groups[1]]


def _labels(col):
    out = []
    for v in np.asarray(col).tolist():
        try:
            f = float(v)
            out.append(str(int(f)) if f == int(f) else repr(f))
        except ValueError:
            out.append(str(v))
    return np.array(out)


# ------------------------------------------------------------------------------------------------
# every fixture: KS goes down, the model is valid, only the expected constants changed


@pytest.mark.parametrize("name", REPAIRABLE)
def test_repair_every_fixture(name):
    case = CASES[name]
    original = load(name)
    raw = original.SerializeToString()
    res = run_case(name)
    assert res.model is not original
    # held-out KS drops
    assert res.report_rows == "holdout"
    assert res.after.ks < res.before.ks, (res.before.ks, res.after.ks)
    assert res.groups == case.groups
    n_rows = len(table_of(case.data)[case.group])
    assert res.rows.total == n_rows and res.rows.skipped == 0
    assert res.rows.fit + res.rows.report == n_rows
    assert 0.1 * n_rows < res.rows.report < 0.3 * n_rows
    # a valid model that onnxruntime runs
    onnx.checker.check_model(res.model, full_check=True)
    feeds = feeds_from_columns(res.model, table_of(case.data), features_of(case.data), rows=np.arange(50))
    out = ort_session(res.model).run(None, feeds)[0]
    assert out.shape[0] == 50 and np.all(np.isfinite(out))
    # only the repaired weight and the refitted final node changed
    refit_applied = res.refit is not None
    assert refit_applied, res.refit_note
    changed = assert_only_changed(original, res.model, allowed_changes(res, refit_applied))
    if name == "shared_initializer.onnx":
        new = [t.name for t in res.model.graph.initializer if t.name not in initializer_map(original)]
        assert len(new) == 1
        assert res.model.graph.node[res.layer.node_index].input[1] == new[0]
        assert initializer_map(res.model)["W_shared"].SerializeToString() == \
            initializer_map(original)["W_shared"].SerializeToString()
        assert changed >= {new[0], res.final.weight}
    else:
        assert res.layer.weight in changed and res.final.weight in changed
    # dtypes are kept
    for layer in find_layers(res.model).layers:
        assert layer.dtype == np.dtype(case.dtype)
    # the metadata record
    meta = {p.key: p.value for p in res.model.metadata_props}
    record = json.loads(meta[METADATA_KEY])
    assert record["layer"]["name"] == res.layer.name and record["layer"]["index"] == res.layer.index
    assert record["options"]["c1"] == 15.0 and record["options"]["c2"] == 150.0
    assert record["before"]["ks"] == pytest.approx(res.before.ks)
    assert record["after"]["ks"] == pytest.approx(res.after.ks)
    assert record["groups"] == list(case.groups)
    # the input was not touched
    assert load(name).SerializeToString() == raw


@pytest.mark.parametrize("name", ["gemm_transb0_alpha.onnx", "sigmoid_head.onnx", "law_school_sklearn.onnx"])
def test_before_metrics_are_the_original_models(name):
    """The "before" numbers are those of a plain onnxruntime run of the original model on the report rows."""
    case = CASES[name]
    res = run_case(name)
    tab = table_of(case.data)
    n = len(tab[case.group])
    report = row_uniform(0, 0, n) < 0.2
    feeds = feeds_from_columns(load(name), tab, features_of(case.data), rows=np.flatnonzero(report))
    pred = np.asarray(ort_session(load(name)).run(None, feeds)[0], np.float64).reshape(-1)
    lab = _labels(tab[case.group])[report]
    ks = ks_statistic(pred[lab == case.groups[0]], pred[lab == case.groups[1]])
    assert res.rows.report == int(report.sum())
    assert res.before.ks == pytest.approx(ks, abs=1e-12)
    tgt = np.asarray(tab[case.target], np.float64)[report]
    assert res.before.mse == pytest.approx(np.mean((pred - tgt) ** 2), rel=1e-6)
    after = np.asarray(ort_session(res.model).run(None, feeds)[0], np.float64).reshape(-1)
    assert res.after.ks == pytest.approx(ks_statistic(after[lab == case.groups[0]], after[lab == case.groups[1]]),
                                         abs=1e-12)


# ------------------------------------------------------------------------------------------------
# the repaired weight equals the reference computed from a plain capture


REFERENCE_CASES = [
    ("gemm_transb0_alpha.onnx", 1, 1e-5),
    ("matmul_bias_first.onnx", 1, 1e-5),
    ("constant_weight.onnx", 0, 1e-5),
    ("shared_initializer.onnx", 2, 1e-5),
    ("gemm_no_bias.onnx", 1, 1e-5),
    ("sigmoid_head.onnx", 1, 1e-5),
    ("law_school_sklearn.onnx", 1, 1e-5),
    ("law_school_mlp_dynamo.onnx", 3, 1e-5),
    ("law_school_mlp_legacy.onnx", 3, 1e-5),
    ("float16_weights.onnx", 1, 2e-3),
    ("float64_model.onnx", 1, 1e-9),
]


@pytest.mark.parametrize("name,index,rtol", REFERENCE_CASES)
def test_repaired_weight_matches_reference(name, index, rtol):
    from reference_esvd import reference_esvd

    case = CASES[name]
    original = load(name)
    layer = layer_of(original, index)
    res = run_case(name, layer=index, holdout=0.0, refit="none")
    assert res.report_rows == "fit" and res.refit is None
    x0, x1 = captured_inputs(original, case.data, layer.input, case.groups)
    assert len(x0) + len(x1) == res.rows.fit == len(table_of(case.data)[case.group])
    w = read_weight(original, layer)
    _, w2 = reference_esvd(w, x0, x1, 15.0, 150.0, 1e-5)
    got = read_weight(res.model, layer_of(res.model, index))
    rel_close(got, w2, rtol, f"{name} layer {index}")
    # and the model changed only there
    assert_only_changed(original, res.model, {layer.weight})


def test_constants_reach_the_reference():
    """Non-default c1, c2, eps go through to the math."""
    from reference_esvd import reference_esvd

    name = "gemm_transb0_alpha.onnx"
    case = CASES[name]
    original = load(name)
    layer = layer_of(original, 0)
    res = run_case(name, layer=0, holdout=0.0, refit="none", c1=3.0, c2=7.5, eps=1e-3)
    x0, x1 = captured_inputs(original, case.data, layer.input, case.groups)
    _, w2 = reference_esvd(read_weight(original, layer), x0, x1, 3.0, 7.5, 1e-3)
    rel_close(read_weight(res.model, layer_of(res.model, 0)), w2, 1e-5, name)
    # c1 = c2 = 1 skips both steps: the weight stays as it was
    res = run_case(name, layer=0, holdout=0.0, refit="none", c1=1, c2=1)
    np.testing.assert_array_equal(read_weight(res.model, layer_of(res.model, 0)), read_weight(original, layer))


# ------------------------------------------------------------------------------------------------
# invariances


def weights_of(model, indices):
    layers = find_layers(model).layers
    out = []
    for i in indices:
        out.append(read_weight(model, layers[i]))
        b = read_bias(model, layers[i])
        if b is not None:
            out.append(b)
    return out


def assert_same_weights(a, b, rtol, what):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        rel_close(x, y, rtol, what)


# float32 storage: a float64 result within 1e-9 can still round to neighbouring float32 values
F32_RTOL = 3e-7


@pytest.mark.parametrize("name", ["gemm_transb0_alpha.onnx", "float64_model.onnx", "sigmoid_head.onnx"])
def test_batch_size_does_not_change_the_result(name):
    case = CASES[name]
    rtol = 1e-9 if case.dtype is np.float64 else F32_RTOL
    a = run_case(name, batch_size=7)
    b = run_case(name, batch_size=4096)
    idx = [case.repair_layer, -1]
    assert_same_weights(weights_of(a.model, idx), weights_of(b.model, idx), rtol, f"{name} batch size")
    assert a.rows == b.rows
    assert a.before.ks == pytest.approx(b.before.ks, abs=1e-9)
    assert a.after.ks == pytest.approx(b.after.ks, abs=1e-3)
    assert a.refit.alpha == b.refit.alpha


@pytest.mark.parametrize("name", ["gemm_transb0_alpha.onnx", "float64_model.onnx", "sigmoid_head.onnx"])
def test_swapping_the_groups_does_not_change_the_result(name):
    case = CASES[name]
    rtol = 1e-9 if case.dtype is np.float64 else F32_RTOL
    a = run_case(name)
    b = run_case(name, groups=(case.groups[1], case.groups[0]))
    assert b.groups == (case.groups[1], case.groups[0])
    idx = [case.repair_layer, -1]
    assert_same_weights(weights_of(a.model, idx), weights_of(b.model, idx), rtol, f"{name} group swap")
    assert a.before.ks == pytest.approx(b.before.ks, abs=1e-12)
    assert a.after.ks == pytest.approx(b.after.ks, abs=1e-3)


def test_row_order_does_not_change_the_fit(tmp_path):
    """With every row in the fit (--holdout 0), shuffling the rows gives the same weights."""
    name = "gemm_transb0_alpha.onnx"
    tab = table_of("gemm_transb0_alpha.csv")
    perm = np.random.default_rng(0).permutation(len(tab["g"]))
    shuffled = write_csv(tmp_path / "shuffled.csv", {k: v[perm] for k, v in tab.items()},
                         order=HAND_FEATURES + ["g", "y"])
    # (the ridge is fixed: "auto" picks it on a seeded split of row positions, which a shuffle changes)
    a = run_case(name, holdout=0.0, ridge=1e-4)
    b = run_case(name, holdout=0.0, ridge=1e-4, data=shuffled)
    assert_same_weights(weights_of(a.model, [1, -1]), weights_of(b.model, [1, -1]), F32_RTOL, "row order")


def test_csv_npz_dict_and_reader_give_the_same_repair(tmp_path):
    name = "law_school_sklearn.onnx"
    npz = table_of("law_school.npz")
    n = len(npz["race1"])
    chunks = [{k: v[i:i + 500] for k, v in npz.items()} for i in range(0, n, 500)]
    results = {
        "npz": run_case(name, data=FIXTURES / "law_school.npz"),
        "csv": run_case(name, data=FIXTURES / "law_school.csv"),
        "dict": run_case(name, data=dict(npz)),
        "reader": run_case(name, data=chunks),
    }
    ref = weights_of(results["npz"].model, [1, 2])
    for key, res in results.items():
        assert res.rows.total == n
        assert_same_weights(weights_of(res.model, [1, 2]), ref, F32_RTOL, key)
        assert res.before.ks == pytest.approx(results["npz"].before.ks, abs=1e-12), key


def test_default_features_are_the_other_columns_in_file_order(tmp_path):
    name = "gemm_transb0_alpha.onnx"
    tab = table_of("gemm_transb0_alpha.csv")
    base = run_case(name)
    # group and target anywhere: they are left out, the rest keeps its order
    moved = write_csv(tmp_path / "moved.csv", tab, order=["y", "x0", "x1", "g", "x2", "x3", "x4", "x5"])
    res = run_case(name, data=moved)
    assert_same_weights(weights_of(res.model, [1, -1]), weights_of(base.model, [1, -1]), F32_RTOL, "moved")
    assert res.before.ks == base.before.ks
    # permuted feature columns: --features restores the model's order; without it the model sees them permuted
    permuted = write_csv(tmp_path / "permuted.csv", tab, order=["x5", "x4", "x3", "x2", "x1", "x0", "g", "y"])
    res = run_case(name, data=permuted, features=HAND_FEATURES)
    assert_same_weights(weights_of(res.model, [1, -1]), weights_of(base.model, [1, -1]), F32_RTOL, "features")
    res = run_case(name, data=permuted)
    assert res.before.ks != pytest.approx(base.before.ks, abs=1e-6)


def test_feature_count_mismatch_is_refused():
    with pytest.raises(DataError) as info:
        repair(FIXTURES / "gemm_transb0_alpha.onnx", FIXTURES / "law_school.csv", layer=1, group="race1",
               target="ugpa")
    msg = str(info.value)
    assert "6" in msg and "5" in msg and "'input'" in msg and "law_school.csv" in msg
    with pytest.raises(DataError, match="3"):
        run_case("gemm_transb0_alpha.onnx", features=["x0", "x1", "x2"])
    with pytest.raises(DataError, match="'nosuch'"):
        run_case("gemm_transb0_alpha.onnx", features=["x0", "x1", "x2", "x3", "x4", "nosuch"])


# ------------------------------------------------------------------------------------------------
# group selection


@pytest.fixture
def three_groups(tmp_path):
    tab = dict(table_of("gemm_transb0_alpha.csv"))
    g = tab["g"].copy()
    third = np.arange(len(g)) % 7 == 3
    g[third] = "c"
    tab["g"] = g
    path = write_csv(tmp_path / "three.csv", tab, order=HAND_FEATURES + ["g", "y"])
    kept = write_csv(tmp_path / "two.csv", {k: v[~third] for k, v in tab.items()}, order=HAND_FEATURES + ["g", "y"])
    return path, kept, int(third.sum())


def test_groups_pick_two_of_three_values(three_groups):
    path, kept, n_third = three_groups
    name = "gemm_transb0_alpha.onnx"
    res = run_case(name, data=path, groups=("a", "b"), holdout=0.0, refit="none")
    assert res.rows.total == 2000 and res.rows.skipped == n_third
    assert res.rows.fit == 2000 - n_third
    assert res.groups == ("a", "b")
    # the skipped rows play no part: same as the file without them
    ref = run_case(name, data=kept, holdout=0.0, refit="none")
    assert_same_weights(weights_of(res.model, [1]), weights_of(ref.model, [1]), F32_RTOL, "skipped rows")
    assert res.before.ks == pytest.approx(ref.before.ks, abs=1e-12)
    # with a holdout too
    res = run_case(name, data=path, groups=("b", "c"))
    assert res.rows.skipped == int(np.sum(table_of("gemm_transb0_alpha.csv")["g"][np.arange(2000) % 7 != 3] == "a"))


def test_three_groups_without_groups_are_all_repaired(three_groups):
    # issue 13: every value of the group column is a group (before: refused, asking for --groups)
    path, _, _ = three_groups
    res = run_case("gemm_transb0_alpha.onnx", data=path)
    assert res.groups == ("a", "b", "c") and res.rows.skipped == 0
    assert [g.label for g in res.after.groups] == ["a", "b", "c"]


def test_groups_value_not_present_is_refused(three_groups):
    path, _, _ = three_groups
    with pytest.raises(DataError) as info:
        run_case("gemm_transb0_alpha.onnx", data=path, groups=("a", "zz"))
    assert "'zz'" in str(info.value)
    with pytest.raises(DataError, match="zz"):
        run_case("gemm_transb0_alpha.onnx", groups=("zz", "a"))


def test_groups_match_numeric_labels():
    res = run_case("sigmoid_head.onnx", groups=("1.0", "0"))
    assert res.groups == ("1", "0")
    base = run_case("sigmoid_head.onnx")
    assert_same_weights(weights_of(res.model, [1, -1]), weights_of(base.model, [1, -1]), F32_RTOL, "numeric")


@pytest.mark.parametrize("groups", [("a",), ("rest", "a"), ("a", "a"), ("1", "1.0")])
def test_groups_option_validation(groups):
    with pytest.raises(OptionError):
        run_case("gemm_transb0_alpha.onnx", groups=groups)


def test_single_group_is_refused(tmp_path):
    tab = dict(table_of("gemm_transb0_alpha.csv"))
    tab["g"] = np.array(["a"] * len(tab["g"]))
    path = write_csv(tmp_path / "one.csv", tab, order=HAND_FEATURES + ["g", "y"])
    with pytest.raises(DataError, match="'g'"):
        run_case("gemm_transb0_alpha.onnx", data=path)


# ------------------------------------------------------------------------------------------------
# refit modes


def final_outputs(model, data, rows=None):
    """Output of the final linear node (before any head) for the given rows, and the rows' labels."""
    tab = table_of(data)
    final = find_layers(model).final
    feeds = feeds_from_columns(model, tab, features_of(data), rows=rows)
    out = np.asarray(run_tensors(model, feeds, [final.output])[final.output], np.float64).reshape(-1)
    lab = _labels(tab["g"])
    return out, lab if rows is None else lab[rows]


@pytest.mark.parametrize("name,target_kind", [("gemm_transb0_alpha.onnx", "label"),
                                              ("sigmoid_head.onnx", "distillation"),
                                              ("matmul_bias_first.onnx", "label")])
def test_fair_refit_gives_mean_parity_on_fit_rows(name, target_kind):
    case = CASES[name]
    res = run_case(name, holdout=0.0, refit="fair")
    assert res.refit.mode == "fair" and res.refit.target == target_kind
    out, lab = final_outputs(res.model, case.data)
    gap = abs(out[lab == case.groups[0]].mean() - out[lab == case.groups[1]].mean())
    before, _ = final_outputs(load(name), case.data)
    gap_before = abs(before[lab == case.groups[0]].mean() - before[lab == case.groups[1]].mean())
    assert gap <= 1e-5 * out.std() + 1e-6, (gap, gap_before)
    assert gap_before > 0.1 * before.std()


def test_fair_refit_parity_on_fit_rows_with_holdout():
    name = "gemm_transb0_alpha.onnx"
    case = CASES[name]
    res = run_case(name, holdout=0.3, seed=5)
    fit = row_uniform(5, 0, 2000) >= 0.3
    out, lab = final_outputs(res.model, case.data, rows=np.flatnonzero(fit))
    gap = abs(out[lab == "a"].mean() - out[lab == "b"].mean())
    assert gap <= 1e-5 * out.std() + 1e-6
    assert res.rows.fit == int(fit.sum())


@pytest.mark.parametrize("mode", ["fair", "plain"])
@pytest.mark.parametrize("name", ["gemm_transb0_alpha.onnx", "sigmoid_head.onnx", "gemm_no_bias.onnx"])
def test_refit_matches_reference(name, mode):
    """Fixed ridge, all rows in the fit: the final node equals the reference refit of the captured inputs."""
    from reference_esvd import reference_refit

    case = CASES[name]
    original = load(name)
    res = run_case(name, holdout=0.0, refit=mode, ridge=1e-3)
    final = res.final
    assert res.refit.alpha == 1e-3 and res.refit.alpha_source == "fixed"
    z0, z1 = captured_inputs(res.model, case.data, final.input, case.groups)
    if res.refit.target == "label":
        y = np.asarray(table_of(case.data)["y"], np.float64)
        lab = _labels(table_of(case.data)["g"])
        t0, t1 = y[lab == case.groups[0]], y[lab == case.groups[1]]
    else:
        t0, t1 = captured_inputs(original, case.data, final.output, case.groups)
    coef, intercept = reference_refit(z0, z1, t0, t1, mode, 1e-3, final.bias is not None)
    new_final = find_layers(res.model).final
    rel_close(read_weight(res.model, new_final), coef, 2e-5, f"{name} {mode} coef")
    if final.bias is None:
        assert intercept is None and read_bias(res.model, new_final) is None
    else:
        np.testing.assert_allclose(read_bias(res.model, new_final), intercept,
                                   rtol=2e-5, atol=2e-5 * np.abs(coef).max())


def test_refit_none_leaves_the_final_node_alone():
    name = "gemm_transb0_alpha.onnx"
    original = load(name)
    res = run_case(name, refit="none")
    assert res.refit is None and "none" in res.refit_note
    changed = assert_only_changed(original, res.model, {res.layer.weight})
    assert changed == {res.layer.weight}
    orig = initializer_map(original)
    new = initializer_map(res.model)
    for t in (res.final.weight, res.final.bias):
        assert new[t].SerializeToString() == orig[t].SerializeToString()


@pytest.mark.parametrize("name", ["gemm_transb0_alpha.onnx", "matmul_bias_first.onnx", "float16_weights.onnx"])
def test_repairing_a_single_output_final_node_is_refused(name):
    # Issue 10: `--layer -1` on a one-output final node wrote a model with 65x the MSE and an unchanged KS.
    with pytest.raises(LayerError, match=r"final node with a single output.*--layer \d+ \(the second-last"):
        run_case(name, layer=-1, refit="fair")
    with pytest.raises(LayerError, match="final node with a single output"):
        run_case(name, layer=-1, refit="none")


def test_plain_and_fair_differ():
    a = run_case("gemm_transb0_alpha.onnx", refit="fair", ridge=1e-4)
    b = run_case("gemm_transb0_alpha.onnx", refit="plain", ridge=1e-4)
    assert b.refit.mode == "plain"
    np.testing.assert_array_equal(weights_of(a.model, [1])[0], weights_of(b.model, [1])[0])
    assert not np.allclose(weights_of(a.model, [-1])[0], weights_of(b.model, [-1])[0])


# ------------------------------------------------------------------------------------------------
# the caller's model, determinism, saving


def test_caller_model_proto_is_not_modified():
    for name in ("shared_initializer.onnx", "constant_weight.onnx"):
        case = CASES[name]
        model = load(name)
        raw = model.SerializeToString()
        res = repair(model, case.data_path, layer=case.repair_layer, group=case.group, target=case.target)
        assert model.SerializeToString() == raw, name
        assert res.model is not model
        assert res.model.SerializeToString() != raw


def test_repairing_twice_keeps_one_record():
    first = run_case("gemm_transb0_alpha.onnx")
    case = CASES["gemm_transb0_alpha.onnx"]
    second = repair(first.model, case.data_path, layer=0, group="g", target="y")
    records = [p for p in second.model.metadata_props if p.key == METADATA_KEY]
    assert len(records) == 1
    assert json.loads(records[0].value)["layer"]["index"] == 0
    assert_only_changed(first.model, second.model, allowed_changes(second, True))


def test_same_inputs_give_byte_identical_files(tmp_path):
    name = "law_school_mlp_dynamo.onnx"
    a = run_case(name).save(tmp_path / "a.onnx")
    b = run_case(name).save(tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    assert onnx.load(str(a)).SerializeToString() == run_case(name).model.SerializeToString()


def test_save_refuses_overwrites(tmp_path, tmp_fixtures):
    model, data = tmp_fixtures("gemm_transb0_alpha.onnx", "gemm_transb0_alpha.csv")
    res = repair(model, data, layer=1, group="g", target="y")
    source_hash = sha256(model)
    # never the input, even with force
    for force in (False, True):
        with pytest.raises(OutputError):
            res.save(model, force=force, source=model)
        with pytest.raises(OutputError):
            res.save(tmp_path / "." / model.name, force=force, source=model)
    assert sha256(model) == source_hash
    # an existing file only with force
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="force"):
        res.save(out, source=model)
    assert out.read_bytes() == b"keep me"
    res.save(out, force=True, source=model)
    onnx.checker.check_model(onnx.load(str(out)))
    # a missing directory
    with pytest.raises(OutputError):
        res.save(tmp_path / "nodir" / "x.onnx")
    # nothing but the expected files in the directory (no temp files)
    assert sorted(dir_state(tmp_path)) == ["gemm_transb0_alpha.csv", "gemm_transb0_alpha.onnx", "out.onnx"]
    assert sha256(model) == source_hash


def test_save_is_atomic(tmp_path, monkeypatch):
    res = run_case("gemm_transb0_alpha.onnx")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    import onnx_esvd.modelio as modelio

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modelio.os, "replace", broken_replace)
    with pytest.raises(OSError):
        res.save(out, force=True)
    monkeypatch.undo()
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_bad_options_are_refused_before_any_work():
    for kw in (dict(c1=0.5), dict(c2=0.0), dict(c1=float("nan")), dict(eps=-1.0), dict(eps=0.0),
               dict(holdout=1.0), dict(holdout=-0.1), dict(refit="bogus"), dict(batch_size=0),
               dict(ridge=-1.0), dict(seed=-1)):
        with pytest.raises(OptionError):
            run_case("gemm_transb0_alpha.onnx", **kw)


def test_layer_errors_through_repair():
    with pytest.raises(LayerError, match="out of range"):
        run_case("gemm_transb0_alpha.onnx", layer=99)
    with pytest.raises(LayerError, match="nosuchnode"):
        run_case("gemm_transb0_alpha.onnx", layer="nosuchnode")
    res = run_case("gemm_transb0_alpha.onnx", layer="Gemm_1", refit="none")
    assert res.layer.index == 1


def test_missing_group_and_target_columns_are_named():
    with pytest.raises(DataError, match="'grp'"):
        run_case("gemm_transb0_alpha.onnx", group="grp")
    with pytest.raises(DataError, match="'target_col'"):
        run_case("gemm_transb0_alpha.onnx", target="target_col")


def test_progress_callback_reports_rows():
    seen = []
    run_case("gemm_transb0_alpha.onnx", progress=lambda name, rows: seen.append((name, rows)), batch_size=500)
    names = {n for n, _ in seen}
    assert "capture" in names
    assert max(r for n, r in seen if n == "capture") == 2000


def test_default_refit_is_cdf_and_stable_across_batch_sizes():
    # the default (--refit auto) is the CDF-penalised refit on a one-output final node; an optimisation, so batch
    # sizes move its weights at round-off amplified by L-BFGS's tolerance, far below anything the metrics show
    a = run_case("gemm_transb0_alpha.onnx", refit="auto", bootstrap=0)
    b = run_case("gemm_transb0_alpha.onnx", refit="auto", bootstrap=0, batch_size=97)
    assert a.options.refit == "cdf" and a.refit.mode == "cdf"
    wa, wb = weights_of(a.model, [-1])[0], weights_of(b.model, [-1])[0]
    assert np.max(np.abs(wa - wb)) <= 1e-4 * np.max(np.abs(wa))
    assert abs(a.after.ks - b.after.ks) <= 0.01


def test_default_refit_falls_back_to_fair_for_a_final_node_with_several_outputs():
    from test_score import classifier_model, data  # tests/ is on sys.path (conftest)

    res = repair(classifier_model(), data(), layer=1, group="g", holdout=0.3, bootstrap=0)
    assert res.options.refit == "fair"
    assert any("default refit (cdf) needs a final node with one output" in w for w in res.warnings)
