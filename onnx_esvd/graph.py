"""Linear nodes of an ONNX graph in all their stored forms, read as `W: [out, in]` and written back.

Forms: Gemm (any transB, alpha, beta, with or without C); MatMul with a 2-D constant weight
(initializer or Constant node), with or without a following bias Add in either operand order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import LayerError, ModelError
from .guards import model_weight_finite, weight_fits

#: Ops that pass a tensor's values on unchanged (shape or dtype only).
SHAPE_ONLY_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast"})

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}


@dataclass(frozen=True)
class LinearLayer:
    """A repairable linear node `y = W x + b`, `W: [out_features, in_features]`.

    Attributes:
        index: position among the repairable nodes, in graph order.
        name: the node's name (or `Op#position` when the node has none).
        node_index: position of the Gemm/MatMul node in `graph.node`.
        op: "Gemm" or "MatMul".
        weight: name of the weight tensor (initializer or Constant output).
        weight_slot: which input of the node holds the weight (1).
        bias: name of the bias tensor (Gemm's C or the Add's constant operand), or None.
        bias_node_index: position of the bias Add node (MatMul form), or None.
        input: the activation tensor x feeding the node.
        output: the tensor carrying W x + b (the Add's output when a bias Add follows).
        in_features, out_features: the effective shape [in -> out].
        elem_type: ONNX element type of the weight (and of x).
        alpha, beta, trans_b: Gemm attributes (1, 1, 0 for MatMul).
        is_final: True for the last repairable node that the scored output depends on.
        feeds: names of the graph outputs that depend on this node.
        feeds_score: True when the scored output depends on this node (only such nodes are repaired).
    """

    index: int
    name: str
    node_index: int
    op: str
    weight: str
    weight_slot: int
    bias: str | None
    bias_node_index: int | None
    input: str
    output: str
    in_features: int
    out_features: int
    elem_type: int
    alpha: float
    beta: float
    trans_b: int
    is_final: bool
    feeds: tuple[str, ...] = ()
    feeds_score: bool = True

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_FLOAT_TYPES[self.elem_type])

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "op": self.op, "weight": self.weight,
                "bias": self.bias, "in_features": self.in_features, "out_features": self.out_features,
                "dtype": self.dtype.name, "input": self.input, "output": self.output, "final": self.is_final,
                "feeds": list(self.feeds)}


@dataclass(frozen=True)
class GraphLayers:
    """The repairable layers of a model plus the reasons other linear nodes were refused."""

    layers: tuple[LinearLayer, ...]
    refused: dict[str, str]
    score_tensor: str | None = None

    @property
    def final(self) -> LinearLayer | None:
        for layer in self.layers:
            if layer.is_final:
                return layer
        return None


def _type_name(elem_type: int) -> str:
    """The ONNX name of an element type, or 'unknown (N)' for a number no ONNX version defines."""
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"unknown ({elem_type})"


def node_label(node: onnx.NodeProto, position: int) -> str:
    """A node's name, or `Op#position` when it has none."""
    return node.name or f"{node.op_type}#{position}"


class _Constants:
    """Constant tensors of the main graph: initializers and Constant node outputs."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            if node.op_type == "Constant" and len(node.output) == 1:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self.constant_nodes[node.output[0]] = node

    def tensor(self, name: str) -> onnx.TensorProto | None:
        if name in self.initializers:
            return self.initializers[name]
        node = self.constant_nodes.get(name)
        if node is not None:
            return next(a.t for a in node.attribute if a.name == "value")
        return None

    def __contains__(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes


def _attr(node: onnx.NodeProto, name: str, default):
    """A numeric attribute (transA, transB, alpha, beta) of the node, or `default` when absent."""
    for a in node.attribute:
        if a.name == name:
            try:
                value = onnx.helper.get_attribute_value(a)
            except Exception:  # noqa: BLE001 - an attribute type no ONNX version defines
                value = None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ModelError(f"node '{node.name or node.op_type}' has attribute '{name}' that is not a number; "
                                 "the model is corrupt, export it again")
            return value
    return default


def _consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                out.setdefault(name, []).append(i)
    return out


def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Tensor names read by nodes inside subgraphs (If/Loop/Scan bodies), recursively."""
    names: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        for node in g.node:
            names.update(n for n in node.input if n)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    visit(sub)

    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                visit(sub)
    return names


def _subgraph_linear_nodes(graph: onnx.GraphProto) -> dict[str, str]:
    found: dict[str, str] = {}

    def visit(g: onnx.GraphProto, owner: str) -> None:
        for i, node in enumerate(g.node):
            if node.op_type in ("Gemm", "MatMul"):
                found[node_label(node, i)] = (
                    f"node '{node_label(node, i)}' ({node.op_type}) is inside a subgraph of node '{owner}'; "
                    "only nodes of the main graph can be repaired")
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    visit(sub, owner)

    for i, node in enumerate(graph.node):
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                visit(sub, node_label(node, i))
    return found


def ancestors(graph: onnx.GraphProto, tensor: str, stop: Iterable[str] = ()) -> set[int]:
    """Indices of the nodes `tensor` depends on; the walk does not go past the tensors in `stop`."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    blocked = set(stop)
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in blocked:
            continue
        i = producer.get(name)
        if i is None or i in seen:
            continue
        seen.add(i)
        stack.extend(n for n in graph.node[i].input if n)
    return seen



def _bias_size_ok(tensor: onnx.TensorProto, out_features: int) -> bool:
    dims = list(tensor.dims)
    size = int(np.prod(dims)) if dims else 1
    return size == out_features and (len(dims) <= 1 or all(d == 1 for d in dims[:-1]))


def find_layers(model: onnx.ModelProto, score_tensor: str | None = None) -> GraphLayers:
    """List the repairable linear nodes of the main graph in graph order.

    `score_tensor` is the tensor of the scored output (default: the first graph output); the final node is
    the last linear node it depends on, and `feeds_score` marks the nodes it depends on.
    """
    graph = model.graph
    consts = _Constants(graph)
    consumers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    refused = _subgraph_linear_nodes(graph)
    found: list[dict] = []
    for i, node in enumerate(graph.node):
        if node.op_type not in ("Gemm", "MatMul"):
            continue
        label = node_label(node, i)
        if len(node.input) < 2:
            refused[label] = f"node '{label}' ({node.op_type}) has fewer than two inputs"
            continue
        x_name, w_name = node.input[0], node.input[1]
        w_tensor = consts.tensor(w_name)
        if w_tensor is None:
            where = ("a graph input" if any(inp.name == w_name for inp in graph.input)
                     else "a tensor computed at run time")
            refused[label] = (f"node '{label}' ({node.op_type}) takes its weight '{w_name}' from {where}; "
                              "only constant weights (initializers or Constant nodes) can be repaired")
            continue
        if x_name in consts:
            refused[label] = (f"node '{label}' ({node.op_type}) has a constant first operand '{x_name}'; "
                              "only layers of the form x @ W can be repaired")
            continue
        if w_tensor.data_type not in _FLOAT_TYPES:
            refused[label] = (f"node '{label}' ({node.op_type}) has a weight of type "
                              f"{_type_name(w_tensor.data_type)}; only float16, float32 "
                              "and float64 weights can be repaired")
            continue
        if len(w_tensor.dims) != 2:
            refused[label] = (f"node '{label}' ({node.op_type}) has a {len(w_tensor.dims)}-D weight '{w_name}'; "
                              "only 2-D weights can be repaired")
            continue
        rows, cols = int(w_tensor.dims[0]), int(w_tensor.dims[1])
        info = dict(name=label, node_index=i, op=node.op_type, weight=w_name, weight_slot=1, input=x_name,
                    elem_type=w_tensor.data_type, alpha=1.0, beta=1.0, trans_b=0, bias=None,
                    bias_node_index=None, output=node.output[0])
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                refused[label] = f"node '{label}' (Gemm) has transA=1; only Gemm with transA=0 can be repaired"
                continue
            alpha = float(_attr(node, "alpha", 1.0))
            if alpha == 0.0:
                refused[label] = f"node '{label}' (Gemm) has alpha=0, so its weight has no effect"
                continue
            trans_b = int(_attr(node, "transB", 0))
            info.update(alpha=alpha, beta=float(_attr(node, "beta", 1.0)), trans_b=trans_b,
                        in_features=cols if trans_b else rows, out_features=rows if trans_b else cols)
            if len(node.input) > 2 and node.input[2]:
                c_name = node.input[2]
                c_tensor = consts.tensor(c_name)
                if c_tensor is not None and info["beta"] != 0.0 and _bias_size_ok(c_tensor, info["out_features"]):
                    info["bias"] = c_name
        else:
            info.update(in_features=rows, out_features=cols)
            users = consumers.get(node.output[0], [])
            if len(users) == 1 and node.output[0] not in graph_outputs:
                add = graph.node[users[0]]
                if add.op_type == "Add" and len(add.input) == 2:
                    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
                    b_tensor = consts.tensor(other)
                    if (b_tensor is not None and other != node.output[0]
                            and _bias_size_ok(b_tensor, info["out_features"])):
                        info.update(bias=other, bias_node_index=users[0], output=add.output[0])
        found.append(info)
    final_index = None
    if score_tensor is None and graph.output:
        score_tensor = graph.output[0].name
    needed = ancestors(graph, score_tensor) if score_tensor else set()
    for j, info in enumerate(found):
        if info["node_index"] in needed:
            final_index = j
    feeds: dict[int, list[str]] = {}
    for out in graph.output:
        for i in ancestors(graph, out.name):
            feeds.setdefault(i, []).append(out.name)
    layers = tuple(LinearLayer(index=j, is_final=(j == final_index), feeds=tuple(feeds.get(info["node_index"], ())),
                               feeds_score=info["node_index"] in needed, **info) for j, info in enumerate(found))
    return GraphLayers(layers=layers, refused=refused, score_tensor=score_tensor)


def list_layers(model: "str | os.PathLike | onnx.ModelProto", score: str | None = None) -> GraphLayers:
    """The repairable linear nodes of a model file or ModelProto (and the linear nodes refused, with reasons).

    `score` names the scored output (see `resolve_score`); the final node and `feeds_score` refer to it. With
    several candidate outputs and no `score`, no node is marked final.
    """
    from .errors import OptionError
    from .modelio import load_model
    from .score import resolve_score

    proto = load_model(model).model
    try:
        tensor = resolve_score(proto, score).tensor
    except (OptionError, ModelError):
        if score is not None:
            raise
        tensor = ""
    return find_layers(proto, tensor)


def select_layer(found: GraphLayers, spec: int | str) -> LinearLayer:
    """Pick a layer by index, by negative index, or by node name.

    Non-negative indices count every linear node of the graph (as `onnx-esvd layers` lists them); negative
    indices count from the end among the nodes the scored output depends on (-1 is its final node). A node
    the scored output does not depend on is refused.
    """
    layers = found.layers
    if not layers:
        detail = f" ({next(iter(found.refused.values()))})" if found.refused else ""
        raise LayerError(f"the model has no repairable linear node (Gemm or MatMul with a constant weight){detail}")
    scored = [layer for layer in layers if layer.feeds_score]
    if isinstance(spec, str):
        text = spec.strip()
        if re.fullmatch(r"[+-]?[0-9]+", text):
            spec = int(text)
        else:
            for layer in layers:
                if layer.name == text:
                    return _feeds_score(found, layer)
            if text in found.refused:
                raise LayerError(found.refused[text]) from None
            names = ", ".join(layer.name for layer in scored or layers)
            raise LayerError(f"--layer '{text}' names no repairable node; choose an index 0..{len(layers) - 1} "
                             f"or one of: {names}") from None
    if spec < 0:
        if not scored:
            raise LayerError(f"no repairable linear node feeds the scored output '{found.score_tensor}'")
        if spec < -len(scored):
            raise LayerError(f"--layer {spec} is out of range: the scored output depends on {len(scored)} repairable "
                             f"linear nodes (-{len(scored)}..-1 from the end); run `onnx-esvd layers MODEL` to list "
                             "them")
        return scored[spec]
    if spec >= len(layers):
        raise LayerError(f"--layer {spec} is out of range: the model has {len(layers)} repairable linear nodes "
                         f"(indices 0..{len(layers) - 1}, or -{len(scored)}..-1 from the end); "
                         "run `onnx-esvd layers MODEL` to list them")
    return _feeds_score(found, layers[spec])


def _feeds_score(found: GraphLayers, layer: LinearLayer) -> LinearLayer:
    if layer.feeds_score:
        return layer
    feeds = ", ".join(f"'{o}'" for o in layer.feeds) or "no output"
    usable = ", ".join(str(x.index) for x in found.layers if x.feeds_score)
    raise LayerError(f"--layer {layer.index} ('{layer.name}') does not feed the scored output "
                     f"'{found.score_tensor}' (it feeds {feeds}); choose one of the layers {usable} or another "
                     "--score")


def _tensor_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    tensor = _Constants(model.graph).tensor(name)
    if tensor is None:
        raise ModelError(f"tensor '{name}' is not a constant of the main graph")
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # external data missing, corrupt raw_data, ...
        raise ModelError(f"cannot read tensor '{name}': {exc}") from exc


def read_weight(model: onnx.ModelProto, layer: LinearLayer) -> np.ndarray:
    """The effective weight `W: [out, in] float64` of the layer (alpha and transB applied)."""
    stored = _tensor_array(model, layer.weight).astype(np.float64)
    model_weight_finite(stored, layer.weight, layer.name)
    if layer.op == "Gemm":
        b_eff = stored.T if layer.trans_b else stored  # [in, out]
        return layer.alpha * b_eff.T
    return stored.T


def read_bias(model: onnx.ModelProto, layer: LinearLayer) -> np.ndarray | None:
    """The effective bias `b: [out] float64` (beta applied), or None when the node has none."""
    if layer.bias is None:
        return None
    stored = _tensor_array(model, layer.bias).astype(np.float64).reshape(-1)
    return layer.beta * stored if layer.op == "Gemm" else stored


def _fill(tensor: onnx.TensorProto, values: np.ndarray, what: str) -> None:
    """Replace a tensor's data in place; its name, shape, type and doc string stay.

    Refuses (LayerError) values that are not finite or do not fit the stored dtype: a model is never
    written with an inf or NaN weight. `what` names the tensor and its node for the message.
    """
    dtype = _FLOAT_TYPES.get(tensor.data_type)
    if dtype is None:
        raise LayerError(f"{what} has element type {_type_name(tensor.data_type)}; only float16, float32 and "
                         "float64 tensors can be rewritten")
    weight_fits(values, dtype, what, "check the calibration data for extreme values, or use --refit none")
    dims = list(tensor.dims)
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float64).astype(dtype).reshape(dims))
    fresh = numpy_helper.from_array(arr, tensor.name)
    doc = tensor.doc_string
    tensor.CopyFrom(fresh)
    if doc:
        tensor.doc_string = doc


def _unique_name(model: onnx.ModelProto, base: str) -> str:
    taken = {t.name for t in model.graph.initializer}
    taken.update(o for n in model.graph.node for o in n.output)
    taken.update(i.name for i in model.graph.input)
    name, k = f"{base}.esvd", 1
    while name in taken:
        k += 1
        name = f"{base}.esvd{k}"
    return name


def _write_constant(model: onnx.ModelProto, node_index: int, slot: int, values: np.ndarray) -> None:
    """Write `values` into the constant feeding `graph.node[node_index].input[slot]`.

    A constant read anywhere else too (another node, a graph output, a subgraph) is first duplicated
    into a new initializer so that only this node changes.
    """
    graph = model.graph
    node = graph.node[node_index]
    name = node.input[slot]
    uses = sum(1 for n in graph.node for inp in n.input if inp == name)
    shared = (uses > 1 or any(o.name == name for o in graph.output) or name in _subgraph_names(graph))
    consts = _Constants(graph)
    source = consts.tensor(name)
    if source is None:
        raise ModelError(f"tensor '{name}' of node '{node_label(node, node_index)}' is not a constant")
    what = f"tensor '{name}' of node '{node_label(node, node_index)}'"
    if shared:
        copy = onnx.TensorProto()
        copy.CopyFrom(source)
        copy.name = _unique_name(model, name)
        copy.ClearField("doc_string")
        _fill(copy, values, what)
        graph.initializer.append(copy)
        node.input[slot] = copy.name
        return
    _fill(source, values, what)


def write_weight(model: onnx.ModelProto, layer: LinearLayer, weight: np.ndarray) -> None:
    """Store `W: [out, in]` back in the layer's own form and dtype (in place on `model`)."""
    w = np.asarray(weight, dtype=np.float64)
    if layer.op == "Gemm":
        b_eff = w.T / layer.alpha  # [in, out]
        stored = b_eff.T if layer.trans_b else b_eff
    else:
        stored = w.T
    _write_constant(model, layer.node_index, layer.weight_slot, stored)


def write_bias(model: onnx.ModelProto, layer: LinearLayer, bias: np.ndarray) -> None:
    """Store the effective bias `b: [out]` back (divided by beta for Gemm), in place on `model`."""
    if layer.bias is None:
        raise LayerError(f"node '{layer.name}' has no constant bias to write")
    b = np.asarray(bias, dtype=np.float64)
    stored = b / layer.beta if layer.op == "Gemm" else b
    if layer.op == "Gemm":
        _write_constant(model, layer.node_index, 2, stored)
    else:
        add = model.graph.node[layer.bias_node_index]
        slot = 0 if add.input[0] == layer.bias else 1
        _write_constant(model, layer.bias_node_index, slot, stored)


def output_path_is_value_preserving(model: onnx.ModelProto, layer: LinearLayer, goal: str | None = None) -> bool:
    """True when the layer's output reaches `goal` (default: the first graph output) through shape-only ops alone."""
    graph = model.graph
    if goal is None:
        if not graph.output:
            return False
        goal = graph.output[0].name
    consumers = _consumers(graph)
    tensor = layer.output
    for _ in range(len(graph.node) + 1):
        if tensor == goal:
            return True
        users = consumers.get(tensor, [])
        if len(users) != 1:
            return False
        node = graph.node[users[0]]
        if node.op_type not in SHAPE_ONLY_OPS or node.input[0] != tensor:
            return False
        tensor = node.output[0]
    return False


def with_outputs(model: onnx.ModelProto, tensors: Iterable[tuple[str, int]]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs the given (name, element type) tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name, elem_type in tensors:
        if name not in present:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
            present.add(name)
    return out


def upstream(model: onnx.ModelProto, tensors: Iterable[tuple[str, int]]) -> onnx.ModelProto | None:
    """A copy of `model` cut down to the nodes that the given (name, element type) tensors depend on, with those
    tensors as its only outputs and only the initializers those nodes read; None when the cut would drop no node,
    or when a node holds a subgraph (If, Loop, Scan: their bodies read outer tensors that the walk does not see).

    onnxruntime runs every node of a graph whatever is fetched, so a pass that needs a layer's input only runs
    this cut."""
    graph = model.graph
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attr in node.attribute):
        return None
    wanted = list(dict.fromkeys(tensors))
    keep: set[int] = set()
    for name, _ in wanted:
        keep |= ancestors(graph, name)
    if len(keep) == len(graph.node):
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = [graph.node[i] for i in sorted(keep)]
    read = {name for node in nodes for name in node.input if name}
    dropped = {t.name for t in graph.initializer} - read
    for field, kept in ((g.node, nodes), (g.initializer, [t for t in graph.initializer if t.name in read]),
                        # an initializer listed as a graph input goes with it
                        (g.input, [i for i in graph.input if i.name not in dropped])):
        del field[:]
        field.extend(kept)
    del g.output[:]
    g.output.extend(onnx.helper.make_tensor_value_info(name, elem_type, None) for name, elem_type in wanted)
    return out


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]
