"""Which output is scored (issue 10): several outputs, classifiers, ZipMap, final-node refusal, other outputs
kept by distillation, fixed batch sizes, inputs with extra unit dimensions, inputs fed by column name."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_esvd import repair
from onnx_esvd.errors import LayerError, OptionError
from onnx_esvd.gate import measure
from onnx_esvd.graph import list_layers
from onnx_esvd.metrics import ks_statistic
from onnx_esvd.score import resolve_score

RNG = np.random.default_rng(7)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _gemm(x, w, b, out, name):
    return helper.make_node("Gemm", [x, w, b], [out], name=name, transB=1)


def _weights(prefix, n_in, n_out, rng):
    return [_init(f"{prefix}.w", rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in))),
            _init(f"{prefix}.b", rng.normal(0, 0.1, n_out))]


def two_head_model(batch="N", width=4) -> onnx.ModelProto:
    """x [N, 3] -> body Gemm(3->6) Relu -> head a: Gemm(6->5) Relu Gemm(5->1) -> a_hat; head b likewise -> b_hat."""
    rng = np.random.default_rng(0)
    inits = (_weights("body", 3, 6, rng) + _weights("a1", 6, 5, rng) + _weights("a2", 5, 1, rng)
             + _weights("b1", 6, 5, rng) + _weights("b2", 5, 1, rng))
    nodes = [
        _gemm("x", "body.w", "body.b", "h0", "body"), helper.make_node("Relu", ["h0"], ["h"], name="relu0"),
        _gemm("h", "a1.w", "a1.b", "a0", "a1"), helper.make_node("Relu", ["a0"], ["ar"], name="relu_a"),
        _gemm("ar", "a2.w", "a2.b", "a_hat", "a2"),
        _gemm("h", "b1.w", "b1.b", "b0", "b1"), helper.make_node("Relu", ["b0"], ["br"], name="relu_b"),
        _gemm("br", "b2.w", "b2.b", "b_hat", "b2"),
    ]
    graph = helper.make_graph(nodes, "two_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
                              [helper.make_tensor_value_info("a_hat", TensorProto.FLOAT, [batch, 1]),
                               helper.make_tensor_value_info("b_hat", TensorProto.FLOAT, [batch, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def classifier_model(zipmap: bool = False) -> onnx.ModelProto:
    """x [N, 3] -> Gemm(3->6) Relu -> Gemm(6->5) Relu -> Gemm(5->2) -> Softmax -> probs [N, 2]; ArgMax -> label."""
    rng = np.random.default_rng(1)
    inits = _weights("l0", 3, 6, rng) + _weights("l1", 6, 5, rng) + _weights("l2", 5, 2, rng)
    nodes = [_gemm("x", "l0.w", "l0.b", "h0", "l0"), helper.make_node("Relu", ["h0"], ["h0r"]),
             _gemm("h0r", "l1.w", "l1.b", "h1", "l1"), helper.make_node("Relu", ["h1"], ["h1r"]),
             _gemm("h1r", "l2.w", "l2.b", "logits", "l2"),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
             helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0)]
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])]
    opsets = [helper.make_opsetid("", 17)]
    if zipmap:
        nodes.append(helper.make_node("ZipMap", ["probs"], ["output_probability"], domain="ai.onnx.ml",
                                      classlabels_int64s=[0, 1]))
        seq = helper.make_sequence_type_proto(helper.make_map_type_proto(
            TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
        outputs.append(helper.make_value_info("output_probability", seq))
        opsets.append(helper.make_opsetid("ai.onnx.ml", 1))
    else:
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2]))
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=opsets)


def data(n=1500, shift=0.8):
    g = np.where(RNG.random(n) < 0.3, "b", "a")
    x = RNG.normal(size=(n, 3)) + np.where(g == "b", shift, 0.0)[:, None]
    return {"x": x.astype(np.float32), "g": g, "y": x @ np.array([0.5, -0.2, 0.3]) + RNG.normal(0, 0.1, n)}


def run(model, x, names):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, {"x": x})))


# ------------------------------------------------------------------------------------------------
# resolving the scored output


def test_two_float_outputs_need_score():
    with pytest.raises(OptionError, match=r"2 floating-point outputs \('a_hat', 'b_hat'\).*--score"):
        resolve_score(two_head_model())
    assert resolve_score(two_head_model(), "b_hat").output == "b_hat"
    with pytest.raises(OptionError, match="no output 'c_hat'.*'a_hat', 'b_hat'"):
        resolve_score(two_head_model(), "c_hat")


def test_classifier_scores_probability_column_1():
    s = resolve_score(classifier_model())
    assert (s.output, s.width) == ("probs", 2) and s.pick(2) == 1
    assert "column 1 (the positive class)" in s.describe()
    with pytest.raises(OptionError, match="not a floating-point tensor"):
        resolve_score(classifier_model(), "label")
    assert resolve_score(classifier_model(), "probs:0").pick(2) == 0
    with pytest.raises(OptionError, match="choose a column in 0..1"):
        resolve_score(classifier_model(), "probs:2")


def test_zipmap_output_is_scored_through_its_input():
    s = resolve_score(classifier_model(zipmap=True))
    assert (s.output, s.tensor, s.width) == ("output_probability", "probs", 2)


def test_classifier_metrics_are_the_positive_class_column_never_an_average():
    d = data()
    model = classifier_model()
    m = measure(model, d, group="g")
    p = run(model, d["x"], ["probs"])["probs"][:, 1]
    a, b = p[d["g"] == "a"], p[d["g"] == "b"]
    assert m.metrics.ks == pytest.approx(ks_statistic(a, b), abs=1e-12)
    assert m.metrics.groups[0].mean == pytest.approx(a.mean(), rel=1e-6)
    assert abs(m.metrics.groups[0].mean - 0.5) > 1e-3  # the two columns averaged would give exactly 0.5
    zm = measure(classifier_model(zipmap=True), d, group="g")
    assert zm.metrics.ks == m.metrics.ks and "output_probability" in zm.score


# ------------------------------------------------------------------------------------------------
# which nodes are repairable, the final node, other outputs


def test_only_nodes_feeding_the_scored_output_are_repairable():
    model = two_head_model()
    found = list_layers(model, score="a_hat")
    assert [x.name for x in found.layers if x.feeds_score] == ["body", "a1", "a2"]
    assert found.final.name == "a2"
    with pytest.raises(LayerError, match=r"'b1'\) does not feed the scored output 'a_hat' \(it feeds 'b_hat'\)"):
        repair(model, data(), layer="b1", group="g", score="a_hat")
    res = repair(model, data(), layer=-2, group="g", score="a_hat", holdout=0.3)
    assert res.layer.name == "a1" and res.final.name == "a2"
    assert res.others == ()  # b_hat does not depend on a1


def test_other_output_is_distilled_back_and_its_drift_reported():
    model, d = two_head_model(), data(n=3000)
    with pytest.raises(LayerError, match=r"output 'b_hat' would change: after refitting its final node 'b2'.*"
                                         r"--max-drift 0.05"):
        repair(model, d, layer="body", group="g", score="a_hat", target="y", holdout=0.3)
    res = repair(model, d, layer="body", group="g", score="a_hat", target="y", holdout=0.3, max_drift=10)
    assert res.score.output == "a_hat" and res.final.name == "a2"
    (other,) = res.others
    assert other.name == "b_hat" and other.how == "distilled"
    before = run(model, d["x"], ["b_hat"])["b_hat"].ravel()
    after = run(res.model, d["x"], ["b_hat"])["b_hat"].ravel()
    rel = np.sqrt(np.mean((after - before) ** 2)) / before.std()
    # the report's drift is measured on the holdout rows; on all rows it must be of the same size
    assert other.relative == pytest.approx(rel, rel=0.2)
    # the distillation refit moved b_hat back towards its original values: with b2's original weights restored
    # (the body repair alone) it moves further
    undistilled = onnx.ModelProto()
    undistilled.CopyFrom(res.model)
    originals = {t.name: t for t in model.graph.initializer}
    for t in undistilled.graph.initializer:
        if t.name in ("b2.w", "b2.b"):
            t.CopyFrom(originals[t.name])
    moved = run(undistilled, d["x"], ["b_hat"])["b_hat"].ravel()
    assert np.sqrt(np.mean((moved - before) ** 2)) / before.std() > 1.2 * rel
    assert res.to_dict()["score"]["output"] == "a_hat"
    assert res.to_dict()["other_outputs"][0]["name"] == "b_hat"


def test_output_without_its_own_final_node_is_refused():
    # b_hat = Identity(h): depends on the body with no linear node of its own
    model = two_head_model()
    g = model.graph
    keep = [n for n in g.node if n.name not in ("b1", "relu_b", "b2")]
    del g.node[:]
    g.node.extend(keep + [helper.make_node("ReduceSum", ["h"], ["b_hat"], keepdims=1, name="sum_b")])
    with pytest.raises(LayerError, match="output 'b_hat' depends on the repaired node 'body'"):
        repair(model, data(), layer="body", group="g", score="a_hat")


def test_classifier_label_output_is_derived_from_the_score():
    res = repair(classifier_model(), data(), layer=1, group="g", holdout=0.3)
    assert res.score_text.startswith("'probs' column 1")
    assert [(o.name, o.how) for o in res.others] == [("label", "derived")]


def test_final_node_with_several_outputs_needs_refit_none():
    with pytest.raises(LayerError, match="final node, so nothing downstream can be refitted.*--refit none"):
        repair(classifier_model(), data(), layer=-1, group="g")
    res = repair(classifier_model(), data(), layer=-1, group="g", refit="none", holdout=0.3)
    assert res.refit is None


# ------------------------------------------------------------------------------------------------
# model inputs


def test_fixed_batch_of_one_is_fed_row_by_row_transparently():
    d = data(n=300)
    dynamic = repair(two_head_model(), d, layer="body", group="g", score="a_hat", target="y", holdout=0.3, max_drift=10,
                     batch_size=64)
    fixed = repair(two_head_model(batch=1), d, layer="body", group="g", score="a_hat", target="y", holdout=0.3, max_drift=10,
                   batch_size=64)
    np.testing.assert_allclose(fixed.before.ks, dynamic.before.ks)
    w = [numpy_helper.to_array(t) for t in dynamic.model.graph.initializer]
    v = [numpy_helper.to_array(t) for t in fixed.model.graph.initializer]
    for a, b in zip(w, v):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_input_with_an_extra_unit_dimension_is_reshaped():
    model = two_head_model()
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x3", TensorProto.FLOAT, ["N", 1, 3]))
    model.graph.node.insert(0, helper.make_node("Reshape", ["x3", "shape2"], ["x"], name="flat"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "shape2"))
    d = data(n=600)
    cols = {"x3_0": d["x"][:, 0], "x3_1": d["x"][:, 1], "x3_2": d["x"][:, 2], "g": d["g"]}
    res = repair(model, cols, layer="body", group="g", score="a_hat", holdout=0.3, max_drift=10)
    ref = repair(two_head_model(), d, layer="body", group="g", score="a_hat", holdout=0.3, max_drift=10)
    assert res.before.ks == ref.before.ks and res.after.ks == pytest.approx(ref.after.ks, abs=1e-6)


def test_columns_matched_by_name_whatever_their_order():
    d = data(n=800)
    ordered = {"x_0": d["x"][:, 0], "x_1": d["x"][:, 1], "x_2": d["x"][:, 2], "g": d["g"], "y": d["y"]}
    shuffled = {"id": np.arange(800), "x_2": d["x"][:, 2], "y": d["y"], "x_0": d["x"][:, 0], "other": d["y"] * 2,
                "g": d["g"], "x_1": d["x"][:, 1]}
    a = repair(two_head_model(), ordered, layer="body", group="g", score="a_hat", target="y", max_drift=10)
    b = repair(two_head_model(), shuffled, layer="body", group="g", score="a_hat", target="y", max_drift=10)
    assert a.after.ks == b.after.ks and a.after.mse == b.after.mse
    for ta, tb in zip(a.model.graph.initializer, b.model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb))


# ------------------------------------------------------------------------------------------------
# string inputs, a separate evaluation file, missing values


def string_input_model() -> onnx.ModelProto:
    """Inputs `num` float [N, 2] and `cat` string [N, 1] (one-hot encoded in the graph) -> MLP -> y [N, 1]."""
    rng = np.random.default_rng(3)
    inits = _weights("l0", 4, 6, rng) + _weights("l1", 6, 5, rng) + _weights("l2", 5, 1, rng)
    inits.append(numpy_helper.from_array(np.array([-1, 2], dtype=np.int64), "shape2"))
    nodes = [helper.make_node("OneHotEncoder", ["cat"], ["onehot"], domain="ai.onnx.ml",
                              cats_strings=["female", "male"], zeros=1),
             helper.make_node("Reshape", ["onehot", "shape2"], ["oh2"]),
             helper.make_node("Concat", ["num", "oh2"], ["x"], axis=1),
             _gemm("x", "l0.w", "l0.b", "h0", "l0"), helper.make_node("Relu", ["h0"], ["h0r"]),
             _gemm("h0r", "l1.w", "l1.b", "h1", "l1"), helper.make_node("Relu", ["h1"], ["h1r"]),
             _gemm("h1r", "l2.w", "l2.b", "y", "l2")]
    graph = helper.make_graph(nodes, "strings", [helper.make_tensor_value_info("num", TensorProto.FLOAT, ["N", 2]),
                                                 helper.make_tensor_value_info("cat", TensorProto.STRING, ["N", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)])


def string_data(n=900):
    g = np.where(RNG.random(n) < 0.35, "b", "a")
    cat = np.where(RNG.random(n) < np.where(g == "b", 0.7, 0.3), "female", "male")
    num = RNG.normal(size=(n, 2)) + np.where(g == "b", 0.6, 0.0)[:, None]
    return {"num_0": num[:, 0], "num_1": num[:, 1], "cat": cat, "g": g, "t": num[:, 0] + (cat == "male")}


def test_string_model_input_is_fed_strings(tmp_path):
    d = string_data()
    model = string_input_model()
    res = repair(model, d, layer=1, group="g", target="t", holdout=0.3)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(["y"], {"num": np.stack([d["num_0"], d["num_1"]], 1).astype(np.float32),
                         "cat": d["cat"].reshape(-1, 1).astype(object)})[0].ravel()
    u = __import__("onnx_esvd.rows", fromlist=["row_uniform"]).row_uniform(0, 0, len(y))
    rep = u < 0.3
    a, b = y[rep & (d["g"] == "a")], y[rep & (d["g"] == "b")]
    assert res.before.ks == pytest.approx(ks_statistic(a, b), abs=1e-12)
    # the same data as a CSV file gives the same repair
    path = tmp_path / "strings.csv"
    with open(path, "w") as f:
        f.write("g,cat,t,num_1,num_0\n")
        for i in range(len(d["g"])):
            f.write(f"{d['g'][i]},{d['cat'][i]},{float(d['t'][i])!r},{float(d['num_1'][i])!r},"
                    f"{float(d['num_0'][i])!r}\n")
    res_csv = repair(model, path, layer=1, group="g", target="t", holdout=0.3)
    assert res_csv.after.ks == res.after.ks and res_csv.after.mse == pytest.approx(res.after.mse, rel=1e-12)


def test_eval_file_measures_before_and_after_on_all_its_rows():
    calib, ev = data(n=1200), data(n=700)
    res = repair(two_head_model(), calib, layer="a1", group="g", score="a_hat", target="y", evaluate=ev)
    assert res.report_rows == "eval" and res.before.rows == 700 and res.rows.fit == 1200
    before = run(two_head_model(), ev["x"], ["a_hat"])["a_hat"].ravel()
    after = run(res.model, ev["x"], ["a_hat"])["a_hat"].ravel()
    for m, y in ((res.before, before), (res.after, after)):
        assert m.ks == pytest.approx(ks_statistic(y[ev["g"] == "a"], y[ev["g"] == "b"]), abs=1e-12)
        assert m.mse == pytest.approx(np.mean((y - ev["y"]) ** 2), rel=1e-6)
    with pytest.raises(OptionError, match="--holdout 0.3 and --eval are alternatives"):
        repair(two_head_model(), calib, layer="a1", group="g", score="a_hat", evaluate=ev, holdout=0.3)


def test_eval_rows_of_an_unseen_group_are_not_measured():
    calib, ev = data(n=800), data(n=500)
    ev["g"] = ev["g"].copy()
    ev["g"][:40] = "c"
    res = repair(two_head_model(), calib, layer="a1", group="g", score="a_hat", evaluate=ev)
    assert res.before.rows == 460
    assert any("40 rows" in w and "'c'" in w for w in res.warnings)


def test_dropna_skips_and_counts_rows_with_missing_values(tmp_path):
    d = data(n=600)
    lines = ["x_0,x_1,x_2,g,y"] + [f"{float(a)!r},{float(b)!r},{float(c)!r},{g},{float(y)!r}"
                                   for (a, b, c), g, y in zip(d["x"], d["g"], d["y"])]
    lines[5] = lines[5].replace(lines[5].split(",")[1], "", 1)  # a blank feature
    lines[9] = ",".join(lines[9].split(",")[:3] + ["", lines[9].split(",")[4]])  # a blank group
    path = tmp_path / "holes.csv"
    path.write_text("\n".join(lines) + "\n")
    from onnx_esvd.errors import DataError
    with pytest.raises(DataError, match="--dropna"):
        repair(two_head_model(), path, layer="a1", group="g", score="a_hat", target="y")
    res = repair(two_head_model(), path, layer="a1", group="g", score="a_hat", target="y", dropna=True)
    assert res.rows.dropped == 2 and res.rows.total == 598
    clean = {k: np.delete(v, [3, 7], axis=0) for k, v in d.items()}
    ref = repair(two_head_model(), clean, layer="a1", group="g", score="a_hat", target="y")
    # row indices (and so the holdout split) stay those of the file, so compare the fit through the weights' shape
    assert res.rows.fit + res.rows.report == ref.rows.fit + ref.rows.report


def two_target_model() -> onnx.ModelProto:
    """tf2onnx's shape of a Keras Dense(2) regressor: x [N, 3] -> MatMul+Add(3->6) Relu -> MatMul+Add(6->2) ->
    Identity -> 'Identity:0' [unk__0, 2]: two regression targets, not class probabilities."""
    rng = np.random.default_rng(3)
    inits = [_init("w0", rng.normal(size=(3, 6))), _init("b0", rng.normal(size=6)),
             _init("w1", rng.normal(size=(6, 2))), _init("b1", rng.normal(size=2))]
    nodes = [helper.make_node("MatMul", ["x:0", "w0"], ["m0"]), helper.make_node("Add", ["m0", "b0"], ["a0"]),
             helper.make_node("Relu", ["a0"], ["r0"]), helper.make_node("MatMul", ["r0", "w1"], ["m1"]),
             helper.make_node("Add", ["m1", "b1"], ["a1"]), helper.make_node("Identity", ["a1"], ["Identity:0"])]
    graph = helper.make_graph(nodes, "keras", [helper.make_tensor_value_info("x:0", TensorProto.FLOAT, ["unk__0", 3])],
                              [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, ["unk__0", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_two_column_regression_output_is_not_taken_for_probabilities():
    """A Keras Dense(2) regressor's [N, 2] output was scored on column 1 as 'the positive class' (and its MSE taken
    against the target) with exit 0; without Softmax/Sigmoid/classifier behind it, the column must be named."""
    with pytest.raises(OptionError, match=r"'Identity:0' has 2 values per row and is not a class-probability output"
                                          r".*--score Identity:0:COL"):
        resolve_score(two_target_model())
    s = resolve_score(two_target_model(), "Identity:0:0")
    assert (s.output, s.pick(2)) == ("Identity:0", 0) and "positive class" not in s.describe()
    assert resolve_score(two_target_model(), "Identity:0").pick  # the output's own name, ':0' and all
    with pytest.raises(OptionError, match="not a class-probability output"):
        resolve_score(two_target_model(), "Identity:0").pick(2)  # width known only at run time: same refusal
    d = data()
    m = measure(two_target_model(), {"x:0": d["x"], "g": d["g"]}, group="g", score="Identity:0:0")
    y = run_named(two_target_model(), {"x:0": d["x"]}, "Identity:0")[:, 0]
    assert m.metrics.ks == pytest.approx(ks_statistic(y[d["g"] == "a"], y[d["g"] == "b"]), abs=1e-12)


def test_sigmoid_and_complement_concat_is_a_probability_output():
    """scikit-learn's binary classifiers: Concat(1 - sigmoid(z), sigmoid(z)) keeps column 1 as the default."""
    rng = np.random.default_rng(4)
    inits = [_init("w0", rng.normal(size=(3, 1))), _init("one", [1.0])]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["z"]), helper.make_node("Sigmoid", ["z"], ["p"]),
             helper.make_node("Sub", ["one", "p"], ["q"]), helper.make_node("Concat", ["q", "p"], ["probabilities"],
                                                                            axis=1)]
    graph = helper.make_graph(nodes, "lr", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])], inits)
    s = resolve_score(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert s.pick(2) == 1 and "(the positive class)" in s.describe()


def run_named(model, feeds, name):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([name], feeds)[0]
