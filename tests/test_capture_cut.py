"""Pass 1 runs the graph cut after the repaired layer's input on fit rows (graph.upstream, capture.FirstPass):
onnxruntime runs every node of a graph whatever is fetched, so this is where the first pass saves inference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import FIXTURES

import onnx_esvd.capture as capture_mod
from onnx_esvd.capture import capture
from onnx_esvd.graph import find_layers, upstream, with_outputs
from onnx_esvd.modelio import load_model
from onnx_esvd.rows import data_spec, open_rows
from onnx_esvd.runtime import Runner
from onnx_esvd.score import resolve_score

DATA = FIXTURES / "law_school.csv"
FEATURES = ["decile1b", "decile3", "lsat", "ugpa", "zfygpa", "zgpa", "fulltime", "fam_inc", "male", "tier"]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["law_school_mlp_legacy.onnx", "law_school_mlp_dynamo.onnx",
                                  "keras_two_head.onnx", "float64_model.onnx"])
def test_the_cut_computes_the_layer_input_of_the_whole_model_bit_for_bit(name):
    model = load_model(FIXTURES / name).model
    found = find_layers(model)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    rng = np.random.default_rng(0)
    feeds = {}
    for i in inputs:
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 64
                for d in i.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds[i.name] = rng.standard_normal(dims).astype(dtype)
    cut_any = False
    for layer in found.layers:
        want_model = with_outputs(model, [(layer.input, layer.elem_type)])
        cut = upstream(model, [(layer.input, layer.elem_type)])
        if layer.input in feeds:  # the model's own input: nothing to run
            assert cut is not None and len(cut.graph.node) == 0
            continue
        if cut is None:
            continue
        cut_any = True
        assert 0 < len(cut.graph.node) < len(model.graph.node)
        read = {n for node in cut.graph.node for n in node.input}
        assert {t.name for t in cut.graph.initializer} <= read  # the downstream weights are gone
        assert [o.name for o in cut.graph.output] == [layer.input]
        got = _session(cut).run([layer.input], feeds)[0]
        want = _session(want_model).run([layer.input], feeds)[0]
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert cut_any


def _tiny(initializers_as_inputs: bool = False, with_if: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w0 = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w0")
    w1 = numpy_helper.from_array(rng.standard_normal((4, 1)).astype(np.float32), "w1")
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["y"])]
    if with_if:
        branch = helper.make_graph([helper.make_node("Identity", ["r"], ["b_out"])], "b", [],
                                   [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)])
        cond = numpy_helper.from_array(np.array(True), "cond")
        nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info("w0", TensorProto.FLOAT, [3, 4]),
                   helper.make_tensor_value_info("w1", TensorProto.FLOAT, [4, 1])]
    inits = [w0, w1] + ([cond] if with_if else [])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])]
    if with_if:
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_cut_drops_an_initializer_listed_as_an_input_with_it():
    """Old exporters list initializers as graph inputs: a dropped weight must leave the inputs too, or onnxruntime
    would ask for it as a feed."""
    cut = upstream(_tiny(initializers_as_inputs=True), [("r", TensorProto.FLOAT)])
    assert [n.op_type for n in cut.graph.node] == ["MatMul", "Relu"]
    assert [i.name for i in cut.graph.input] == ["x", "w0"]
    x = np.ones((2, 3), dtype=np.float32)
    assert _session(cut).run(["r"], {"x": x})[0].shape == (2, 4)


def test_no_cut_when_nothing_is_dropped_or_a_subgraph_could_read_outer_tensors():
    assert upstream(_tiny(), [("y", TensorProto.FLOAT)]) is None  # every node is needed
    assert upstream(_tiny(with_if=True), [("h", TensorProto.FLOAT)]) is None  # the If body reads 'r'


def _capture(holdout: float, *, cut: bool, report: bool, monkeypatch, layer: int = -2):
    """Pass 1 on the bundled model and data, counting the rows each onnxruntime session ran."""
    runs: dict[tuple[str, ...], int] = {}

    class Counting(Runner):  # the real one: a second call must not count through the first's
        def _run(self, feeds):  # each onnxruntime call (outputs read from the feeds make none)
            key = tuple(self.outputs)
            runs[key] = runs.get(key, 0) + len(next(iter(feeds.values())))
            return super()._run(feeds)

    monkeypatch.setattr(capture_mod, "Runner", Counting)
    monkeypatch.setattr(capture_mod, "upstream", upstream if cut else (lambda *a: None))
    model = load_model(FIXTURES / "law_school_mlp_legacy.onnx").model
    found = find_layers(model)
    lin = found.layers[layer]
    reader = open_rows(model, DATA, data_spec("race1", ["white", "black"], "ugpa", None), batch_size=700, seed=3)
    cap = capture(model, [lin], reader, holdout, lambda *_: None, resolve_score(model), report=report)
    return cap, lin, runs, reader


@pytest.mark.parametrize("holdout, report", [(0.3, True), (0.0, False), (0.3, False)])
def test_first_pass_through_the_cut_equals_the_whole_models(holdout, report, monkeypatch):
    cap, lin, runs, reader = _capture(holdout, cut=True, report=report, monkeypatch=monkeypatch)
    ref, _, ref_runs, _ = _capture(holdout, cut=False, report=report, monkeypatch=monkeypatch)
    assert len(cap.moments[lin.index]) == len(ref.moments[lin.index])
    for got, want in zip(cap.moments[lin.index], ref.moments[lin.index]):
        assert got.n == want.n
        assert np.array_equal(got.mean, want.mean) and np.array_equal(got.scatter, want.scatter)
    if report:
        assert cap.report.rows == ref.report.rows > 0
        for code in range(2):
            assert np.array_equal(cap.report.values(code), ref.report.values(code))
        assert cap.width == ref.width
    fit = sum(m.n for m in cap.moments[lin.index])
    total = reader.total
    (whole_key,) = [k for k in ref_runs]
    assert ref_runs[whole_key] == total  # without the cut every row runs the whole model
    cut_rows = runs.get((lin.input,), 0)
    assert cut_rows == fit  # the cut ran on the fit rows, and only on them
    assert runs.get(whole_key, 0) == (total - fit if report else 0)


def test_layer_zero_needs_no_inference_on_fit_rows(monkeypatch):
    """Layer 0 reads the model's input: the fit rows are reduced straight from the feeds."""
    cap, lin, runs, reader = _capture(0.3, cut=True, report=True, monkeypatch=monkeypatch, layer=0)
    assert lin.input == "x"
    fit = sum(m.n for m in cap.moments[lin.index])
    assert 0 < fit < reader.total
    assert sum(runs.values()) == reader.total - fit  # only the report rows ran onnxruntime
