"""Keras models converted by tf2onnx (fixtures/keras_*.onnx, built by fixtures/make_fixtures_keras.py; TensorFlow
is not needed here): MatMul + Add layers, a batch norm folded into Mul + Add, outputs named `Identity:0`, batch
dimensions named `unk__N`. Every number the tool prints is compared with onnxruntime and scipy on the same rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from scipy.stats import ks_2samp

from conftest import FIXTURES, assert_bad_input, invoke

BN = FIXTURES / "keras_bn_dropout.onnx"
TWO = FIXTURES / "keras_two_head.onnx"
FEATURES = ["dnn_bar_pass_prediction", "gender_female", "gender_male", "lsat", "pass_bar"]
FIT_ROWS = 4800  # the first rows of law_school.csv fit, the others are the evaluation file


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """law_school.csv cut into a calibration file and an evaluation file; the evaluation rows as arrays."""
    tmp = tmp_path_factory.mktemp("keras")
    lines = (FIXTURES / "law_school.csv").read_text().splitlines()
    (tmp / "fit.csv").write_text("\n".join(lines[:FIT_ROWS + 1]) + "\n")
    (tmp / "eval.csv").write_text("\n".join([lines[0]] + lines[FIT_ROWS + 1:]) + "\n")
    with open(tmp / "eval.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    x = np.array([[float(r[c]) for c in FEATURES] for r in rows], dtype=np.float32)
    g = np.array([r["race1"] for r in rows])
    y = np.array([float(r["ugpa"]) for r in rows])
    return tmp, x, g, y


def _outputs(model, x):
    sess = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model),
                                providers=["CPUExecutionProvider"])
    return [o.reshape(len(x), -1).astype(np.float64) for o in sess.run(None, {"features": x})]


def _metrics(out, g, y):
    a, b = out[g == "black"], out[g == "white"]
    return {"ks": ks_2samp(a, b).statistic, "mean_gap": abs(a.mean() - b.mean()), "mse": np.mean((out - y) ** 2),
            "mae": np.mean(np.abs(out - y))}


def _repair(tmp, model, *extra):
    out = tmp / f"{model.stem}.{abs(hash(extra))}.onnx"
    result = invoke("repair", model, "--data", tmp / "fit.csv", "--eval", tmp / "eval.csv", "--group", "race1",
                    "--target", "ugpa", "--refit", "fair", "--bootstrap", "0", "-o", out, "--force", "--json", "-q",
                    *extra)
    return result, out


def test_layers_of_a_tf2onnx_keras_model():
    data = json.loads(invoke("layers", BN, "--json").stdout)
    layers = data["layers"]
    assert [la["op"] for la in layers] == ["MatMul"] * 3
    assert [(la["in_features"], la["out_features"]) for la in layers] == [(5, 64), (64, 32), (32, 1)]
    assert layers[0]["input"] == "features" and [la.get("final", False) for la in layers] == [False, False, True]


def test_repair_numbers_match_onnxruntime_and_scipy(split):
    tmp, x, g, y = split
    result, out = _repair(tmp, BN, "--layer", "-2")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["score"]["output"] == "Identity:0"
    for when, model in (("before", BN), ("after", out)):
        want = _metrics(_outputs(model, x)[0][:, 0], g, y)
        for key, value in want.items():
            assert report[when][key] == pytest.approx(value, abs=1e-9), (when, key)
        assert report[when]["rows"] == len(x)
    assert report["after"]["mean_gap"] < 0.6 * report["before"]["mean_gap"]  # the repair did something
    # only the repaired MatMul's weight and the final MatMul's weight and Add's bias changed
    old = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(BN)).graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    changed = sorted(k for k in old if not np.array_equal(old[k], new[k]))
    assert len(changed) == 3 and set(new) == set(old), changed


def test_two_head_keras_model(split):
    tmp, x, g, y = split
    result, _ = _repair(tmp, TWO, "--layer", "-2")
    assert_bad_input(result, "2 floating-point outputs ('Identity:0', 'Identity_1:0')", "--score")
    result, out = _repair(tmp, TWO, "--layer", "-2", "--score", "Identity_1:0")  # the aux head's own layer
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    before, after = _outputs(TWO, x), _outputs(onnx.load(str(out)), x)
    np.testing.assert_array_equal(before[0], after[0])  # the other head is untouched
    assert report["after"]["ks"] == pytest.approx(_metrics(after[1][:, 0], g, y)["ks"], abs=1e-12)
    same, _ = _repair(tmp, TWO, "--layer", "-2", "--score", "Identity_1:0:0")  # NAME:COL on a name with ':0'
    assert json.loads(same.stdout)["after"]["ks"] == report["after"]["ks"]
    shared, _ = _repair(tmp, TWO, "--layer", "1", "--score", "Identity:0")  # the shared body moves the aux head
    assert_bad_input(shared, "output 'Identity_1:0' would change", "--max-drift")


def test_layer_auto_says_why_no_layer_of_a_shared_body_is_tried(split):
    """--layer auto on the gpa head: its only earlier layers are the shared body, which auto never tries; the message
    said "the only linear node is a single-output final node", which is false for this model."""
    tmp, *_ = split
    result, _ = _repair(tmp, TWO, "--layer", "auto", "--score", "Identity:0")
    line = assert_bad_input(result, "--layer auto found no layer to try", "also feed other outputs", "give --layer N")
    assert "the only linear node" not in line


def test_budget_skips_settings_that_move_the_other_head(split):
    """A budget over the shared body's c1 x c2 grid: the settings that move the aux head beyond --max-drift are
    skipped (and said so), and the winner is one that repair accepts, instead of exit 2 after the search."""
    tmp, x, *_ = split
    out = tmp / "budget.onnx"
    result = invoke("repair", TWO, "--layer", "1", "--score", "Identity:0", "--data", tmp / "fit.csv", "--eval",
                    tmp / "eval.csv", "--group", "race1", "--target", "ugpa", "--refit", "fair", "--max-ks", "0.3",
                    "--max-drift", "0.3", "--bootstrap", "0", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and "output 'Identity_1:0' would change" in skipped[0], result.stdout
    before, after = _outputs(TWO, x), _outputs(onnx.load(str(out)), x)
    drift = np.sqrt(np.mean((after[1] - before[1]) ** 2)) / before[1].std()
    assert drift <= 0.3


def _normalised_model(x_batch="unk__0"):
    """tf2onnx's Keras Normalization layer left as an input: x [x_batch, 3], 'mean:0' [1, 3] -> Sub -> MatMul + Add
    (3 -> 4) -> Relu -> MatMul + Add (4 -> 1) -> Identity -> 'Identity:0'."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w0", (3, 4)), ("b0", (4,)), ("w1", (4, 1)), ("b1", (1,)))]
    nodes = [helper.make_node("Sub", ["x", "mean:0"], ["c"]), helper.make_node("MatMul", ["c", "w0"], ["m0"]),
             helper.make_node("Add", ["m0", "b0"], ["a0"]), helper.make_node("Relu", ["a0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Identity", ["a1"], ["Identity:0"])]
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x_batch, 3]),
                                              helper.make_tensor_value_info("mean:0", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, ["unk__0", 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_input_fixed_at_one_row_beside_free_ones(tmp_path):
    """Such a model ran into onnxruntime's "Got invalid dimensions ... for the following indices" (cut there);
    with the constant given as columns it must run row by row, and without them the message must say why."""
    from onnx_esvd import DataError, audit

    rng = np.random.default_rng(0)
    n = 300
    g = np.where(rng.random(n) < 0.4, "a", "b")
    x = (rng.normal(size=(n, 3)) + (g == "b")[:, None] * 0.7).astype(np.float32)
    mean = np.array([[0.1, -0.2, 0.3]], dtype=np.float32)
    data = {**{f"x_{j}": x[:, j] for j in range(3)}, "g": g}
    with pytest.raises(DataError, match=r"'mean:0_0' is missing \(the model's inputs: 'x', 'mean:0'\); its first "
                                        r"dimension is fixed at 1 .* likely a constant the exporter left as an input"):
        audit(_normalised_model(), data, group="g")
    data.update({f"mean:0_{j}": np.full(n, mean[0, j]) for j in range(3)})
    got = audit(_normalised_model(), data, group="g")
    sess = ort.InferenceSession(_normalised_model().SerializeToString(), providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {"x": x[i:i + 1], "mean:0": mean})[0][:, 0] for i in range(n)])
    assert got.metrics.ks == pytest.approx(ks_2samp(out[g == "a"], out[g == "b"]).statistic, abs=1e-12)
    from onnx_esvd.errors import ModelError

    with pytest.raises(ModelError, match=r"onnxruntime failed to run the model: .*Got invalid dimensions.*Expected"):
        audit(_normalised_model(x_batch=2), data, group="g")  # two different fixed sizes: onnxruntime's whole line
