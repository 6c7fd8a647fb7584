"""The last K linear nodes of a graph as a `Chain` for the penalised refits (`--tune-layers K`).

Between two consecutive tuned linear nodes the graph may hold at most one elementwise activation (Relu,
LeakyRelu, Sigmoid, Tanh, Gelu, BatchNormalization in inference form, Add of a constant), plus ops that only
change shape or pass values on (Identity, Reshape, Flatten, Squeeze, Unsqueeze). Anything else on that path, or
an intermediate tensor that other nodes also read (a skip connection), is refused by name: tuning the layer
would change more than the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import LayerError
from .graph import SHAPE_ONLY_OPS, GraphLayers, LinearLayer, node_label

_SIMPLE = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}


@dataclass(frozen=True)
class GraphChain:
    """The tuned layers in order (the last is the final node) and the activation after each."""

    layers: tuple[LinearLayer, ...]
    activations: tuple[Any, ...]

    @property
    def input(self) -> str:
        """The tensor feeding the first tuned layer (what the refit pass captures)."""
        return self.layers[0].input


def _const(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t).astype(np.float64)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t).astype(np.float64)
    return None


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _activation(model: onnx.ModelProto, node: onnx.NodeProto, position: int, width: int) -> tuple[Any, str]:
    """(activation spec, the tensor it reads) for one elementwise node, or refuse it."""
    label = f"'{node_label(node, position)}' ({node.op_type})"
    op = node.op_type
    if op in _SIMPLE:
        return _SIMPLE[op], node.input[0]
    if op == "LeakyRelu":
        return ("leaky_relu", float(_attr(node, "alpha", 0.01))), node.input[0]
    if op == "Gelu":
        approx = _attr(node, "approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else str(approx)
        return ("gelu", "tanh" if approx == "tanh" else "none"), node.input[0]
    if op == "BatchNormalization":
        if int(_attr(node, "training_mode", 0)):
            raise LayerError(f"node {label} runs in training mode; only inference batch normalisation can be tuned")
        parts = [_const(model, n) for n in node.input[1:5]]
        if any(p is None for p in parts):
            raise LayerError(f"node {label} has statistics computed at run time; they must be constants to tune "
                             "through it")
        scale, bias, mean, var = (np.broadcast_to(p.reshape(-1), (width,)) for p in parts)
        return ("batchnorm", scale, bias, mean, var, float(_attr(node, "epsilon", 1e-5))), node.input[0]
    if op == "Add" and len(node.input) == 2:
        for i in (0, 1):
            c = _const(model, node.input[1 - i])
            if c is not None and c.size in (1, width):
                return ("add_const", np.broadcast_to(c.reshape(-1), (width,)).copy()), node.input[i]
    raise LayerError(f"node {label} sits between two tuned linear nodes; --tune-layers goes through Relu, LeakyRelu, "
                     "Sigmoid, Tanh, Gelu, BatchNormalization (inference), Add of a constant and shape-only ops "
                     "only: lower --tune-layers")


def graph_chain(model: onnx.ModelProto, found: GraphLayers, final: LinearLayer, count: int | str) -> GraphChain:
    """The last `count` linear nodes ending at `final` ("all": as many as the path allows)."""
    graph = model.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    by_output = {layer.output: layer for layer in found.layers}
    want = None if count == "all" else int(count)
    if want is not None and want < 1:
        raise LayerError(f"--tune-layers {count} is invalid; give a positive number or 'all'")
    layers, acts = [final], ["identity"]
    while want is None or len(layers) < want:
        tensor, act = layers[0].input, None
        while tensor not in by_output:
            i = producer.get(tensor)
            if i is None:  # a graph input: no earlier linear node
                break
            node = graph.node[i]
            if consumers.get(tensor, 0) > 1 or tensor in outputs:
                raise LayerError(f"tensor '{tensor}' feeds more than the tuned path (a skip connection or another "
                                 f"output); --tune-layers {count} cannot tune through it: lower --tune-layers")
            if node.op_type in SHAPE_ONLY_OPS and node.op_type != "Cast":
                tensor = node.input[0]
                continue
            if act is not None:
                raise LayerError(f"two activations ('{node_label(node, i)}' and the one after it) sit between two "
                                 f"linear nodes; --tune-layers supports one: lower --tune-layers")
            act, tensor = _activation(model, node, i, layers[0].in_features)
        if tensor not in by_output:
            if want is None:
                break
            raise LayerError(f"--tune-layers {count}: the path to the final node '{final.name}' has only "
                             f"{len(layers)} linear node{'s' if len(layers) != 1 else ''}; lower --tune-layers")
        prev = by_output[tensor]
        if consumers.get(prev.output, 0) > 1 or prev.output in outputs:
            raise LayerError(f"the output of '{prev.name}' feeds more than the tuned path; --tune-layers {count} "
                             "cannot tune it: lower --tune-layers")
        layers.insert(0, prev)
        acts.insert(0, act if act is not None else "identity")
    return GraphChain(tuple(layers), tuple(acts))
