"""Which model output is scored: resolved once into a `Score` that every command receives.

A model may have several outputs (two regression heads, a classifier's label and probabilities). The
scored output is the one whose distribution is measured and repaired:

- `--score NAME` or `--score NAME:COL` names it (and the column of an `[N, k]` output);
- by default it is the only floating-point output; with two or more, the command refuses and lists them;
- an `[N, 2]` output of class probabilities (computed by Softmax, by a Concat of a Sigmoid and its
  complement, by a classifier node, or read by a ZipMap) is scored on column 1, the positive class, and
  the report says so; any other `[N, 2]` output (two regression targets) and an `[N, k]` output with
  k > 2 need an explicit column;
- an output computed by a ZipMap node (scikit-learn classifiers converted with default options turn their
  probability tensor into a sequence of maps) is scored on the ZipMap's input tensor, which holds the same
  probabilities as a plain `[N, classes]` float tensor.

Columns are never averaged together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import ModelError, OptionError

_FLOAT_ELEMS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


@dataclass(frozen=True)
class Score:
    """The scored output.

    Attributes:
        output: the graph output's name, as the user sees it.
        tensor: the tensor the passes fetch (the output itself, or the input of the ZipMap producing it).
        column: the column scored, or None to decide from the width (1 column: 0; 2 columns: 1).
        width: number of values per row when the model declares it statically, else None.
        explicit_column: True when the user named the column.
        elem_type: ONNX element type of `tensor`.
        probability: True when the output holds class probabilities (so column 1 of two is the default).
    """

    output: str
    tensor: str
    column: int | None
    width: int | None
    explicit_column: bool = False
    elem_type: int = onnx.TensorProto.FLOAT
    probability: bool = False

    def pick(self, width: int) -> int:
        """The column to score in a `[n, width]` block (checked against the width actually produced)."""
        if self.column is not None:
            if not 0 <= self.column < width:
                raise OptionError(f"--score {self.output}:{self.column}: output '{self.output}' has {width} "
                                  f"column{'s' if width != 1 else ''} per row; choose a column in 0..{width - 1}")
            return self.column
        if width == 1:
            return 0
        if width == 2 and self.probability:
            return 1
        raise OptionError(_needs_column(self.output, width))

    def describe(self, width: int | None = None) -> str:
        """`'probabilities' column 1 (the positive class of [N, 2])` and the like, for reports."""
        w = width if width is not None else self.width
        via = f" (the probabilities behind ZipMap output '{self.output}')" if self.tensor != self.output else ""
        if w is None or w == 1:
            return f"'{self.output}'{via}"
        col = self.pick(w)
        why = "" if self.explicit_column else (" (the positive class)" if w == 2 else "")
        return f"'{self.output}' column {col}{why} of {w}{via}"

    def take(self, values: np.ndarray, n: int) -> np.ndarray:
        """The scored column of a fetched block: `values: [n, ...]` -> `[n, 1]` (float32/float64 kept)."""
        a = np.asarray(values)
        if a.ndim == 0 or a.shape[0] != n:
            raise ModelError(f"output '{self.output}' has shape {list(a.shape)}, which is not one row per data row "
                             f"({n} rows); only outputs with the batch as first dimension can be scored")
        a = a.reshape(n, -1)
        col = self.pick(a.shape[1])
        out = a[:, col:col + 1]
        return out if out.dtype in (np.float32, np.float64) else out.astype(np.float64)

    def to_dict(self) -> dict:
        known = self.width is not None and (self.width == 1 or (self.width == 2 and self.probability))
        return {"output": self.output, "tensor": self.tensor, "column": self.column if self.column is not None
                else (self.pick(self.width) if known else None), "width": self.width}


def _needs_column(output: str, width: int) -> str:
    what = ("is not a class-probability output (no Softmax, Sigmoid or classifier node computes it), so "
            "its columns are separate predictions" if width == 2 else "")
    return (f"output '{output}' has {width} values per row{' and ' + what if what else ''}; name the column to "
            f"score with --score {output}:COL (COL in 0..{width - 1})")


#: Ops that pass a tensor's values through unchanged (up to shape and dtype).
_PASS_THROUGH = ("Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Normalizer")


def _is_probability(tensor: str, producer: dict[str, onnx.NodeProto]) -> bool:
    """Whether `tensor` holds class probabilities: computed (through reshapes and casts) by Softmax, by a
    classifier node of ai.onnx.ml, or by a Concat of a Sigmoid output and its complement (scikit-learn's
    binary classifiers)."""

    def source(t: str) -> onnx.NodeProto | None:
        node = producer.get(t)
        for _ in range(64):
            if node is None or node.op_type not in _PASS_THROUGH or not node.input:
                return node
            node = producer.get(node.input[0])
        return None

    node = source(tensor)
    if node is None:
        return False
    if node.op_type == "Softmax" or (node.domain == "ai.onnx.ml" and node.op_type.endswith("Classifier")):
        return True
    if node.op_type == "Concat":
        for t in node.input:
            part = source(t)
            if part is not None and part.op_type == "Sub":  # 1 - p
                part = next((source(u) for u in part.input if source(u) is not None), None)
            if part is not None and part.op_type == "Sigmoid":
                return True
    return False


def _static_width(vi: onnx.ValueInfoProto) -> int | None:
    """Values per row of a tensor `[N, ...]` when every non-batch dimension is fixed, else None."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = list(vi.type.tensor_type.shape.dim)
    if len(dims) <= 1:
        return 1
    width = 1
    for d in dims[1:]:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            return None
        width *= d.dim_value
    return width


def _tensor_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos of every tensor whose type is known (shape inference where it works)."""
    infos = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a convenience; declared shapes still apply
        return infos
    for vi in inferred.graph.value_info:
        infos.setdefault(vi.name, vi)
    return infos


def candidates(model: onnx.ModelProto) -> list[Score]:
    """Outputs that can be scored, in graph-output order: float tensors, and ZipMap outputs (via their input)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output if out}
    infos: dict[str, onnx.ValueInfoProto] | None = None
    found = []
    for out in graph.output:
        tt = out.type.tensor_type if out.type.HasField("tensor_type") else None
        if tt is not None and tt.elem_type in _FLOAT_ELEMS:
            width = _static_width(out)
            if width is None:
                infos = infos if infos is not None else _tensor_infos(model)
                vi = infos.get(out.name)
                width = _static_width(vi) if vi is not None else None
            found.append(Score(out.name, out.name, None, width, elem_type=tt.elem_type,
                               probability=_is_probability(out.name, producer)))
            continue
        node = producer.get(out.name)
        if node is not None and node.op_type == "ZipMap" and node.input:
            infos = infos if infos is not None else _tensor_infos(model)
            vi = infos.get(node.input[0])
            width = _static_width(vi) if vi is not None else None
            if width is None:
                for attr in node.attribute:  # one probability per class label
                    if attr.name in ("classlabels_int64s", "classlabels_strings"):
                        width = len(attr.ints) or len(attr.strings) or None
            elem = vi.type.tensor_type.elem_type if vi is not None and vi.type.HasField("tensor_type") else 0
            found.append(Score(out.name, node.input[0], None, width, elem_type=elem or onnx.TensorProto.FLOAT,
                               probability=True))
    return found


def _output_kinds(model: onnx.ModelProto) -> str:
    parts = []
    for out in model.graph.output:
        if out.type.HasField("tensor_type"):
            parts.append(f"'{out.name}' ({onnx.TensorProto.DataType.Name(out.type.tensor_type.elem_type).lower()})")
        else:
            parts.append(f"'{out.name}' ({out.type.WhichOneof('value')})")
    return ", ".join(parts)


def resolve_score(model: onnx.ModelProto, spec: str | None = None) -> Score:
    """The scored output for `--score spec` (NAME or NAME:COL), or the default one."""
    if not model.graph.output:
        raise ModelError("the model has no graph outputs; export it with at least one output")
    found = candidates(model)
    by_name = {s.output: s for s in found}
    if spec is not None:
        text = str(spec).strip()
        name, column = text, None
        if text not in by_name and ":" in text:
            head, _, tail = text.rpartition(":")
            if tail.isascii() and tail.isdigit():
                name, column = head, int(tail)
        if name not in by_name:
            names = {o.name for o in model.graph.output}
            if name in names:
                raise OptionError(f"--score {text}: output '{name}' is not a floating-point tensor (outputs: "
                                  f"{_output_kinds(model)}); score a float output")
            choices = ", ".join(f"'{s.output}'" for s in found) or "none"
            raise OptionError(f"--score {text}: the model has no output '{name}'; scoreable outputs: {choices}")
        s = by_name[name]
        if column is not None and s.width is not None and not 0 <= column < s.width:
            raise OptionError(f"--score {text}: output '{name}' has {s.width} values per row; choose a column in "
                              f"0..{s.width - 1}")
        return Score(s.output, s.tensor, column, s.width, column is not None, s.elem_type, s.probability)
    if not found:
        raise ModelError(f"the model has no floating-point output to score (outputs: {_output_kinds(model)})")
    if len(found) > 1:
        listed = ", ".join(f"'{s.output}'" + (f" [N, {s.width}]" if s.width and s.width > 1 else "") for s in found)
        raise OptionError(f"the model has {len(found)} floating-point outputs ({listed}); choose the one to score "
                          f"with --score NAME (or NAME:COL)")
    s = found[0]
    if s.width is not None and (s.width > 2 or (s.width == 2 and not s.probability)):
        raise OptionError(_needs_column(s.output, s.width))
    return s


@dataclass(frozen=True)
class OtherOutput:
    """A graph output other than the scored one that the repaired node feeds.

    Attributes:
        name: the output's name.
        how: "derived" (computed from the scored output's final node, e.g. a class label: it changes with the
            score) or "distilled" (its own final linear node is refitted to reproduce its original values).
        final: the linear node refitted for a distilled output, else None.
    """

    name: str
    how: str
    final: object | None = None


def other_outputs(model: onnx.ModelProto, found, layer, final, score: Score) -> list[OtherOutput]:
    """Every other graph output the repaired `layer` feeds, and how it is kept; refuses the ones that cannot be.

    `found` is the model's GraphLayers, `layer` the repaired node and `final` the scored output's final node
    (both LinearLayer). An output that depends on `layer` only through its own last linear node F (which the
    scored output does not depend on) is distilled: F is refitted to reproduce the original values.
    """
    from .errors import LayerError
    from .graph import ancestors

    graph = model.graph
    out: list[OtherOutput] = []
    for o in graph.output:
        if o.name in (score.output, score.tensor):
            continue
        up = ancestors(graph, o.name)
        if layer.node_index not in up:
            continue
        if final is not None and final.node_index in up:
            out.append(OtherOutput(o.name, "derived"))
            continue
        own = [f for f in found.layers if f.node_index in up and not f.feeds_score
               and layer.node_index in ancestors(graph, f.output)]
        chosen = None
        for f in reversed(own):  # the last linear node through which alone the repair reaches the output
            if layer.node_index not in ancestors(graph, o.name, stop=[f.output]):
                chosen = f
                break
        if chosen is None:
            raise LayerError(f"output '{o.name}' depends on the repaired node '{layer.name}' but has no linear node of "
                             f"its own to refit, so the repair would change it; choose a layer that only the scored "
                             f"output '{score.output}' depends on")
        out.append(OtherOutput(o.name, "distilled", chosen))
    return out
