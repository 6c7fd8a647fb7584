"""Finding, reading and writing linear nodes (onnx_esvd.graph), checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import (CASES, FIXTURES, NP_OF_ONNX, constant_tensor, gemm_model, initializer_map, make_model,
                      matmul_model, random_feeds, run_tensors, tensor)
from onnx_esvd.errors import LayerError
from onnx_esvd.graph import (find_layers, output_path_is_value_preserving, read_bias, read_weight, select_layer,
                             with_outputs, write_bias, write_weight)

#: relative tolerance of `x @ W.T + b` against onnxruntime, per weight dtype (scaled by |x| @ |W|.T + |b|)
RUNTIME_TOL = {np.dtype(np.float16): 4e-3, np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-13}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / name))


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def assert_affine(x, out, w, b, dtype, what=""):
    """out ≈ x @ w.T + b, elementwise, with an error bound scaled by |x| @ |w|.T + |b|."""
    x = np.asarray(x, np.float64)
    out = np.asarray(out, np.float64).reshape(x.shape[0], -1)
    ref = x @ w.T + (0.0 if b is None else b)
    scale = np.abs(x) @ np.abs(w).T + (0.0 if b is None else np.abs(b)) + np.finfo(np.float64).tiny
    err = np.abs(out - ref) / scale
    tol = RUNTIME_TOL[np.dtype(dtype)]
    assert err.max() <= tol, f"{what}: max scaled error {err.max():.3g} > {tol:g}"


def check_runtime(model: onnx.ModelProto, layer, n: int = 64, seed: int = 0, w=None, b="read"):
    """Run the model with the layer's input and output exposed; compare with read_weight/read_bias."""
    feeds = random_feeds(model, n, seed)
    aug = with_outputs(model, [(layer.input, layer.elem_type), (layer.output, layer.elem_type)])
    vals = run_tensors(aug, feeds, [layer.input, layer.output])
    w = read_weight(model, layer) if w is None else w
    b = read_bias(model, layer) if isinstance(b, str) else b
    assert_affine(vals[layer.input], vals[layer.output], w, b, layer.dtype, f"layer {layer.index} '{layer.name}'")


# ------------------------------------------------------------------------------------------------
# finding layers in the fixtures


@pytest.mark.parametrize("name", list(CASES))
def test_find_layers_matches_fixture_readme(name):
    case = CASES[name]
    found = find_layers(load(name))
    got = [(la.name, la.op, la.weight, la.in_features, la.out_features) for la in found.layers]
    assert got == list(case.layers)
    assert [la.index for la in found.layers] == list(range(len(case.layers)))
    assert [la.is_final for la in found.layers] == [False] * (len(case.layers) - 1) + [True]
    assert found.final is found.layers[-1]
    assert found.layers[0].input == case.first_input
    assert all(la.dtype == np.dtype(case.dtype) for la in found.layers)
    # graph order: node indices increase
    idx = [la.node_index for la in found.layers]
    assert idx == sorted(idx)
    assert set(found.refused) == set(case.refused)
    for node in case.refused:
        assert node in found.refused[node], found.refused[node]


@pytest.mark.parametrize("name", list(CASES))
def test_read_weight_and_bias_match_runtime(name):
    model = load(name)
    found = find_layers(model)
    for layer in found.layers:
        w = read_weight(model, layer)
        assert w.dtype == np.float64 and w.shape == (layer.out_features, layer.in_features)
        b = read_bias(model, layer)
        if b is not None:
            assert b.dtype == np.float64 and b.shape == (layer.out_features,)
        check_runtime(model, layer)


def test_bias_detection_in_fixtures():
    """Which layers carry a bias: Gemm's C, the Add after MatMul in either order, none without C."""
    assert all(la.bias is None for la in find_layers(load("gemm_no_bias.onnx")).layers)
    assert [la.bias for la in find_layers(load("matmul_bias_first.onnx")).layers] == ["b0", "b1", "b2"]
    assert [la.bias for la in find_layers(load("law_school_sklearn.onnx")).layers] == [
        "intercepts", "intercepts1", "intercepts2"]
    assert [la.bias for la in find_layers(load("gemm_transb0_alpha.onnx")).layers] == ["b0", "b1", "b2"]
    sk = find_layers(load("matmul_bias_first.onnx")).layers[0]
    assert sk.output == "add0"  # the Add's output carries W x + b


# ------------------------------------------------------------------------------------------------
# write then read back, and the runtime agrees


def _eff(rng, out_f=3, in_f=4):
    return rng.normal(size=(out_f, in_f)), rng.normal(size=out_f)


FORMS = {
    "gemm_transB0_alpha_beta": dict(kind="gemm", trans_b=0, alpha=0.7, beta=1.5),
    "gemm_transB1": dict(kind="gemm", trans_b=1),
    "gemm_transB1_alpha_noC": dict(kind="gemm", trans_b=1, alpha=2.5, bias=False),
    "gemm_transB0_bias_row": dict(kind="gemm", trans_b=0, beta=0.25, bias_shape=(1, 3)),
    "gemm_fp16": dict(kind="gemm", trans_b=0, alpha=0.3, dtype=np.float16),
    "gemm_fp64": dict(kind="gemm", trans_b=1, alpha=1.7, beta=3.0, dtype=np.float64),
    "matmul_add": dict(kind="matmul"),
    "matmul_bias_first": dict(kind="matmul", bias_first=True),
    "matmul_constant_node": dict(kind="matmul", constant_weight=True),
    "matmul_no_bias_fp64": dict(kind="matmul", bias=False, dtype=np.float64),
    "matmul_fp16_bias_row": dict(kind="matmul", dtype=np.float16, bias_shape=(1, 3)),
    "matmul_constant_fp16_bias_first": dict(kind="matmul", constant_weight=True, bias_first=True,
                                            dtype=np.float16),
}


def build(form: dict, w, b):
    form = dict(form)
    kind = form.pop("kind")
    if not form.pop("bias", True):
        b = None
    if kind == "gemm":
        return gemm_model(w, b, **form)
    return matmul_model(w, b, **form)


def stored_form(model):
    """(name, data_type, dims) of every initializer and Constant-node tensor, in order."""
    out = [(t.name, t.data_type, tuple(t.dims)) for t in model.graph.initializer]
    for n in model.graph.node:
        if n.op_type == "Constant":
            t = n.attribute[0].t
            out.append((n.output[0], t.data_type, tuple(t.dims)))
    return out


@pytest.mark.parametrize("form", list(FORMS))
def test_tiny_forms_read_as_built(form):
    rng = np.random.default_rng(1)
    w, b = _eff(rng)
    dtype = FORMS[form].get("dtype", np.float32)
    model = build(FORMS[form], w, b)
    (layer,) = find_layers(model).layers
    assert (layer.in_features, layer.out_features) == (4, 3)
    assert layer.is_final and layer.dtype == np.dtype(dtype)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(read_weight(model, layer), w, rtol=2 * eps, atol=0)
    if FORMS[form].get("bias", True):
        np.testing.assert_allclose(read_bias(model, layer), b, rtol=2 * eps, atol=0)
    else:
        assert read_bias(model, layer) is None
    check_runtime(model, layer)


@pytest.mark.parametrize("form", list(FORMS))
def test_write_weight_round_trip(form):
    rng = np.random.default_rng(2)
    w, b = _eff(rng)
    dtype = np.dtype(FORMS[form].get("dtype", np.float32))
    model = build(FORMS[form], w, b)
    before_inits = {t.name: t.SerializeToString() for t in model.graph.initializer}
    before_form = stored_form(model)
    (layer,) = find_layers(model).layers
    w_new = rng.normal(size=w.shape) * 3.0
    write_weight(model, layer, w_new)
    onnx.checker.check_model(model)
    # same tensors, same dtypes and shapes: only the values changed
    assert stored_form(model) == before_form
    (again,) = find_layers(model).layers
    assert again == layer
    got = read_weight(model, again)
    np.testing.assert_allclose(got, w_new, rtol=2 * np.finfo(dtype).eps, atol=0)
    # the stored values are the rounding of the float64 ones (computed in float64, stored in the dtype)
    stored = constant_tensor(model, layer.weight)
    assert stored.dtype == dtype
    # the bias is untouched
    for name, data in before_inits.items():
        if name != layer.weight:
            assert initializer_map(model)[name].SerializeToString() == data, name
    # onnxruntime computes with the new weight
    check_runtime(model, again, w=w_new, b=None if not FORMS[form].get("bias", True) else b)


@pytest.mark.parametrize("form", [f for f in FORMS if FORMS[f].get("bias", True)])
def test_write_bias_round_trip(form):
    rng = np.random.default_rng(3)
    w, b = _eff(rng)
    dtype = np.dtype(FORMS[form].get("dtype", np.float32))
    model = build(FORMS[form], w, b)
    before_form = stored_form(model)
    (layer,) = find_layers(model).layers
    weight_bytes = onnx.numpy_helper.from_array(constant_tensor(model, layer.weight)).SerializeToString()
    b_new = rng.normal(size=b.shape) * 5.0
    write_bias(model, layer, b_new)
    onnx.checker.check_model(model)
    assert stored_form(model) == before_form
    (again,) = find_layers(model).layers
    np.testing.assert_allclose(read_bias(model, again), b_new, rtol=2 * np.finfo(dtype).eps, atol=0)
    assert onnx.numpy_helper.from_array(constant_tensor(model, layer.weight)).SerializeToString() == weight_bytes
    check_runtime(model, again, w=w, b=b_new)


def test_write_bias_without_bias_is_refused():
    rng = np.random.default_rng(4)
    w, _ = _eff(rng)
    model = gemm_model(w, None)
    (layer,) = find_layers(model).layers
    with pytest.raises(LayerError, match="Gemm_0"):
        write_bias(model, layer, np.zeros(3))


def test_fixture_forms_round_trip_through_runtime():
    """Write into every layer of the hand-built fixtures, check onnxruntime sees exactly the new values."""
    rng = np.random.default_rng(5)
    for name in ("gemm_transb0_alpha.onnx", "matmul_bias_first.onnx", "constant_weight.onnx",
                 "float16_weights.onnx", "float64_model.onnx", "law_school_sklearn.onnx",
                 "law_school_mlp_dynamo.onnx"):
        model = load(name)
        layers = find_layers(model).layers
        new = {}
        for layer in layers:
            w = rng.normal(size=(layer.out_features, layer.in_features)) / np.sqrt(layer.in_features)
            b = None if layer.bias is None else rng.normal(size=layer.out_features)
            write_weight(model, layer, w)
            if b is not None:
                write_bias(model, layer, b)
            new[layer.index] = (w, b)
        onnx.checker.check_model(model)
        again = find_layers(model).layers
        assert [la.weight for la in again] == [la.weight for la in layers]
        for layer in again:
            w, b = new[layer.index]
            eps = np.finfo(layer.dtype).eps
            np.testing.assert_allclose(read_weight(model, layer), w, rtol=2 * eps, atol=0, err_msg=name)
            check_runtime(model, layer, w=w, b=b if b is not None else read_bias(model, layer))


# ------------------------------------------------------------------------------------------------
# shared constants


def test_shared_initializer_is_duplicated_for_the_target_node():
    model = load("shared_initializer.onnx")
    original = copy(model)
    layers = find_layers(model).layers
    first, second = layers[1], layers[2]
    assert first.weight == second.weight == "W_shared"
    old = read_weight(model, second)
    w_new = np.random.default_rng(6).normal(size=old.shape)
    write_weight(model, first, w_new)
    onnx.checker.check_model(model)
    inits = initializer_map(model)
    # the shared initializer is byte-identical, a new one was added for the target node only
    assert inits["W_shared"].SerializeToString() == initializer_map(original)["W_shared"].SerializeToString()
    assert len(model.graph.initializer) == len(original.graph.initializer) + 1
    target = model.graph.node[first.node_index]
    other = model.graph.node[second.node_index]
    assert target.input[1] != "W_shared" and target.input[1] in inits
    assert other.input[1] == "W_shared"
    assert inits[target.input[1]].data_type == inits["W_shared"].data_type
    assert list(inits[target.input[1]].dims) == list(inits["W_shared"].dims)
    # every other node and initializer unchanged
    for i, (a, b) in enumerate(zip(original.graph.node, model.graph.node)):
        if i != first.node_index:
            assert a.SerializeToString() == b.SerializeToString()
    again = find_layers(model).layers
    assert again[1].weight == target.input[1] and again[2].weight == "W_shared"
    np.testing.assert_allclose(read_weight(model, again[1]), w_new, rtol=2e-7)
    np.testing.assert_array_equal(read_weight(model, again[2]), old)
    # onnxruntime: node 1 uses the new weight, node 2 still the old one
    check_runtime(model, again[1], w=w_new)
    check_runtime(model, again[2], w=old)
    # writing the second user now changes only that (no longer shared) tensor
    w_two = np.random.default_rng(7).normal(size=old.shape)
    write_weight(model, again[2], w_two)
    final = find_layers(model).layers
    np.testing.assert_allclose(read_weight(model, final[1]), w_new, rtol=2e-7)
    np.testing.assert_allclose(read_weight(model, final[2]), w_two, rtol=2e-7)
    check_runtime(model, final[1], w=w_new)
    check_runtime(model, final[2], w=w_two)


def test_shared_bias_and_shared_constant_node_are_duplicated():
    """Two MatMul+Add layers reading one Constant-node weight and one bias initializer."""
    rng = np.random.default_rng(8)
    w = rng.normal(size=(4, 4))
    b = rng.normal(size=4)
    nodes = [
        helper.make_node("Constant", [], ["W"], name="Constant_W", value=tensor("Wv", w.T.astype(np.float32))),
        helper.make_node("MatMul", ["x", "W"], ["mm0"], name="MatMul_0"),
        helper.make_node("Add", ["mm0", "b"], ["a0"], name="Add_0"),
        helper.make_node("Relu", ["a0"], ["r0"], name="Relu_0"),
        helper.make_node("MatMul", ["r0", "W"], ["mm1"], name="MatMul_1"),
        helper.make_node("Add", ["b", "mm1"], ["y"], name="Add_1"),
    ]
    model = make_model(nodes, [tensor("b", b.astype(np.float32))], 4, "y")
    first, second = find_layers(model).layers
    assert first.bias == second.bias == "b" and first.weight == second.weight == "W"
    w_new, b_new = rng.normal(size=(4, 4)), rng.normal(size=4)
    write_weight(model, first, w_new)
    write_bias(model, first, b_new)
    onnx.checker.check_model(model)
    l0, l1 = find_layers(model).layers
    assert l0.weight != "W" and l0.bias != "b" and l1.weight == "W" and l1.bias == "b"
    np.testing.assert_allclose(read_weight(model, l0), w_new, rtol=2e-7)
    np.testing.assert_allclose(read_bias(model, l0), b_new, rtol=2e-7)
    np.testing.assert_allclose(read_weight(model, l1), w, rtol=2e-7)
    np.testing.assert_allclose(read_bias(model, l1), b, rtol=2e-7)
    check_runtime(model, l0, w=w_new, b=b_new)
    check_runtime(model, l1, w=w, b=b)


def test_constant_node_weight_written_in_place():
    rng = np.random.default_rng(9)
    model = load("constant_weight.onnx")
    n_init, n_node = len(model.graph.initializer), len(model.graph.node)
    layer = find_layers(model).layers[1]
    w_new = rng.normal(size=(layer.out_features, layer.in_features))
    write_weight(model, layer, w_new)
    assert len(model.graph.initializer) == n_init and len(model.graph.node) == n_node
    np.testing.assert_allclose(constant_tensor(model, "W1").astype(np.float64), w_new.T, rtol=2e-7)
    check_runtime(model, find_layers(model).layers[1], w=w_new)


# ------------------------------------------------------------------------------------------------
# refusals and layer selection


def test_runtime_weight_is_refused_by_name():
    found = find_layers(load("runtime_weight.onnx"))
    with pytest.raises(LayerError) as info:
        select_layer(found, "MatMul_1")
    msg = str(info.value)
    assert "MatMul_1" in msg and "W1" in msg and "run time" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("node", ["Gemm_then", "Gemm_else"])
def test_subgraph_linear_is_refused_by_name(node):
    found = find_layers(load("subgraph_linear.onnx"))
    with pytest.raises(LayerError) as info:
        select_layer(found, node)
    msg = str(info.value)
    assert node in msg and "subgraph" in msg and "If_0" in msg


def test_refused_layer_through_repair_names_the_node():
    from onnx_esvd import repair

    rng = np.random.default_rng(0)
    data = {f"x{j}": rng.normal(size=50) for j in range(6)}
    data["g"] = np.array(["a", "b"] * 25)
    with pytest.raises(LayerError, match="MatMul_1"):
        repair(FIXTURES / "runtime_weight.onnx", data, layer="MatMul_1", group="g")
    with pytest.raises(LayerError, match="Gemm_then"):
        repair(FIXTURES / "subgraph_linear.onnx", data, layer="Gemm_then", group="g")


def _refusal_models():
    rng = np.random.default_rng(10)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    cases = {}
    # weight is a graph input
    g = helper.make_graph([helper.make_node("MatMul", ["x", "Wrt"], ["y"], name="MM_in")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
                           helper.make_tensor_value_info("Wrt", TensorProto.FLOAT, [4, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    cases["MM_in"] = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    # transA = 1
    cases["Gemm_tA"] = make_model([helper.make_node("Gemm", ["xt", "B"], ["y"], name="Gemm_tA", transA=1),
                                   helper.make_node("Transpose", ["x"], ["xt"], name="T")][::-1],
                                  [tensor("B", w.T.copy())], 4, "y")
    # 3-D weight
    cases["MM_3d"] = make_model([helper.make_node("MatMul", ["x", "W3"], ["y"], name="MM_3d")],
                                [tensor("W3", rng.normal(size=(2, 4, 3)).astype(np.float32))], 4, "y")
    # constant first operand
    cases["MM_const_x"] = make_model([helper.make_node("MatMul", ["C", "x"], ["y"], name="MM_const_x")],
                                     [tensor("C", rng.normal(size=(3, 5)).astype(np.float32))], 5, "y")
    return cases


@pytest.mark.parametrize("node", ["MM_in", "Gemm_tA", "MM_3d", "MM_const_x"])
def test_unsupported_forms_are_refused_by_name(node):
    model = _refusal_models()[node]
    found = find_layers(model)
    assert found.layers == ()
    assert node in found.refused and node in found.refused[node]
    with pytest.raises(LayerError, match="no repairable linear node"):
        select_layer(found, 0)
    with pytest.raises(LayerError, match=node):
        select_layer(_with_ok_layer(model), node)


def _with_ok_layer(model):
    """The refusing model plus one ordinary Gemm downstream, so that selection by name reaches the refusal."""
    m = copy(model)
    out = m.graph.output[0].name
    m.graph.node.append(helper.make_node("Gemm", [out, "Bok"], ["z"], name="Gemm_ok", transB=1))
    m.graph.initializer.append(tensor("Bok", np.ones((2, 3), np.float32)))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    found = find_layers(m)
    assert [la.name for la in found.layers] == ["Gemm_ok"]
    return found


def test_select_layer_by_index_name_and_negative_index():
    found = find_layers(load("gemm_transb0_alpha.onnx"))
    layers = found.layers
    assert select_layer(found, 0) is layers[0]
    assert select_layer(found, 2) is layers[2]
    assert select_layer(found, -1) is layers[2]
    assert select_layer(found, -3) is layers[0]
    assert select_layer(found, "1") is layers[1]
    assert select_layer(found, "-2") is layers[1]
    assert select_layer(found, "Gemm_2") is layers[2]
    assert select_layer(found, " Gemm_0 ") is layers[0]


@pytest.mark.parametrize("spec", [3, -4, 99, "3", "-4"])
def test_select_layer_out_of_range(spec):
    found = find_layers(load("gemm_transb0_alpha.onnx"))
    with pytest.raises(LayerError) as info:
        select_layer(found, spec)
    msg = str(info.value)
    assert str(spec).strip() in msg and "out of range" in msg and "3" in msg and "layers" in msg
    assert not msg.startswith(("'", '"'))  # not KeyError's quoted repr
    assert isinstance(info.value, KeyError)


def test_select_layer_unknown_name_lists_the_choices():
    found = find_layers(load("law_school_mlp_dynamo.onnx"))
    with pytest.raises(LayerError) as info:
        select_layer(found, "nosuchnode")
    msg = str(info.value)
    assert "nosuchnode" in msg
    for la in found.layers:
        assert la.name in msg


# ------------------------------------------------------------------------------------------------
# what follows the final node


@pytest.mark.parametrize("name,expected", [
    ("law_school_mlp_legacy.onnx", True),     # Gemm is the output
    ("law_school_mlp_dynamo.onnx", True),     # Squeeze
    ("law_school_sklearn.onnx", True),        # Add -> Reshape
    ("matmul_bias_first.onnx", True),         # bias-first Add -> Reshape
    ("float16_weights.onnx", True),           # Add -> Cast
    ("sigmoid_head.onnx", False),             # Sigmoid
])
def test_output_path_is_value_preserving(name, expected):
    model = load(name)
    layers = find_layers(model).layers
    assert output_path_is_value_preserving(model, layers[-1]) is expected
    for layer in layers[:-1]:  # ReLU follows every other layer
        assert output_path_is_value_preserving(model, layer) is False


@pytest.mark.parametrize("head,expected", [
    (["Identity"], True), (["Flatten"], True), (["Reshape"], True), (["Sigmoid"], False),
    (["Reshape", "Sigmoid"], False), (["Softmax"], False), (["Neg"], False),
])
def test_output_path_heads_on_tiny_models(head, expected):
    w = np.ones((1, 3), np.float32)
    nodes = [helper.make_node("Gemm", ["x", "B"], ["t0"], name="Gemm_0", transB=1)]
    inits = [tensor("B", w)]
    for i, op in enumerate(head):
        ins = [f"t{i}"]
        if op == "Reshape":
            ins.append("shape")
            inits.append(tensor("shape", np.array([-1, 1], np.int64)))
        nodes.append(helper.make_node(op, ins, [f"t{i + 1}"], name=f"{op}_{i}"))
    model = make_model(nodes, inits, 3, f"t{len(head)}")
    (layer,) = find_layers(model).layers
    assert layer.is_final
    assert output_path_is_value_preserving(model, layer) is expected


def test_with_outputs_leaves_model_alone():
    model = load("gemm_transb0_alpha.onnx")
    raw = model.SerializeToString()
    layer = find_layers(model).layers[1]
    aug = with_outputs(model, [(layer.input, layer.elem_type), ("output", TensorProto.FLOAT)])
    assert model.SerializeToString() == raw
    assert [o.name for o in aug.graph.output] == ["output", layer.input]
    assert aug.graph.output[1].type.tensor_type.elem_type == TensorProto.FLOAT
    assert NP_OF_ONNX[layer.elem_type] is np.float32
