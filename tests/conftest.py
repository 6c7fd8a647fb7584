"""Shared fixtures and helpers of the graph, data, pipeline and CLI tests.

Everything here is independent of `onnx_esvd` except where a test deliberately goes through it:
CSV files are parsed with the `csv` module, models are run with a plain onnxruntime session, and
tiny models are built with `onnx.helper`.
"""

from __future__ import annotations

import os
import sys

# One BLAS thread: the tests run on 2 cores and oversubscription makes the timings erratic.
# (Must happen before numpy is imported; users can still override these from the environment.)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import csv  # noqa: E402
import hashlib  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

REPO = TESTS_DIR.parent
FIXTURES = REPO / "fixtures"

NP_OF_ONNX = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}
ONNX_OF_NP = {np.dtype(v): k for k, v in NP_OF_ONNX.items()}


# ------------------------------------------------------------------------------------------------
# the committed fixtures (see fixtures/README.md)


@dataclass(frozen=True)
class Case:
    """One fixture model with its data: which columns are what, and what its layers look like."""

    model: str
    data: str | None
    group: str | None
    target: str | None
    groups: tuple[str, str] | None
    #: (node name, op, weight tensor, in, out) of every repairable node in graph order.
    layers: tuple[tuple[str, str, str, int, int], ...]
    #: input tensor of the first linear node
    first_input: str
    #: names of linear nodes that must be refused
    refused: tuple[str, ...] = ()
    #: the layer the pipeline tests repair (the shared one for shared_initializer)
    repair_layer: int = -2
    #: weight dtype
    dtype: type = np.float32

    @property
    def path(self) -> Path:
        return FIXTURES / self.model

    @property
    def data_path(self) -> Path | None:
        return None if self.data is None else FIXTURES / self.data


def _hand(model, dtype=np.float32, op="Gemm", weights=("W0", "W1", "W2"), first_input="input", **kw):
    names = [f"{op}_{i}" for i in range(3)]
    shapes = [(6, 24), (24, 16), (16, 1)]
    layers = tuple((n, op, w, a, b) for n, w, (a, b) in zip(names, weights, shapes))
    stem = model[:-5]
    return Case(model, f"{stem}.csv", "g", "y", ("a", "b"), layers, first_input, dtype=dtype, **kw)


LAW_GROUPS = ("black", "white")

CASES: dict[str, Case] = {c.model: c for c in [
    Case("law_school_mlp_legacy.onnx", "law_school.csv", "race1", "ugpa", LAW_GROUPS,
         (("/0/Gemm", "Gemm", "0.weight", 5, 256), ("/2/Gemm", "Gemm", "2.weight", 256, 256),
          ("/4/Gemm", "Gemm", "4.weight", 256, 256), ("/6/Gemm", "Gemm", "6.weight", 256, 256),
          ("/8/Gemm", "Gemm", "8.weight", 256, 1)), "x"),
    Case("law_school_mlp_dynamo.onnx", "law_school.csv", "race1", "ugpa", LAW_GROUPS,
         (("node_linear", "Gemm", "net.0.weight", 5, 64), ("node_linear_1", "Gemm", "net.2.weight", 64, 64),
          ("node_linear_2", "Gemm", "net.4.weight", 64, 64), ("node_linear_3", "Gemm", "net.6.weight", 64, 64),
          ("node_linear_4", "Gemm", "net.8.weight", 64, 1)), "x"),
    Case("law_school_sklearn.onnx", "law_school.npz", "race1", "ugpa", LAW_GROUPS,
         (("MatMul", "MatMul", "coefficient", 5, 64), ("MatMul1", "MatMul", "coefficient1", 64, 64),
          ("MatMul2", "MatMul", "coefficient2", 64, 1)), "cast_input"),
    _hand("gemm_transb0_alpha.onnx"),
    _hand("matmul_bias_first.onnx", op="MatMul", first_input="x_f32"),
    _hand("float16_weights.onnx", dtype=np.float16, op="MatMul", first_input="x_f16"),
    Case("shared_initializer.onnx", "shared_initializer.csv", "g", "y", ("a", "b"),
         (("Gemm_0", "Gemm", "W0", 6, 16), ("Gemm_1", "Gemm", "W_shared", 16, 16),
          ("Gemm_2", "Gemm", "W_shared", 16, 16), ("Gemm_3", "Gemm", "W3", 16, 1)), "input", repair_layer=1),
    Case("sigmoid_head.onnx", "sigmoid_head.csv", "g", "y", ("0", "1"),
         _hand("sigmoid_head.onnx").layers, "input"),
    _hand("constant_weight.onnx", op="MatMul"),
    _hand("float64_model.onnx", dtype=np.float64),
    _hand("gemm_no_bias.onnx"),
    Case("runtime_weight.onnx", None, None, None, None,
         (("Gemm_0", "Gemm", "W0", 6, 16), ("Gemm_2", "Gemm", "W2", 16, 1)), "input", refused=("MatMul_1",)),
    Case("subgraph_linear.onnx", None, None, None, None,
         (("Gemm_0", "Gemm", "W0", 6, 16), ("Gemm_2", "Gemm", "W2", 16, 1)), "input",
         refused=("Gemm_then", "Gemm_else")),
]}

#: fixtures that come with calibration data (the pipeline and CLI can repair them)
REPAIRABLE = [name for name, c in CASES.items() if c.data is not None]


@pytest.fixture
def fixture_dir() -> Path:
    return FIXTURES


def copy_fixtures(dest: Path, *names: str) -> list[Path]:
    """Copy fixture files into `dest` (a tmp dir) and return the copies' paths."""
    out = []
    for name in names:
        target = dest / name
        shutil.copyfile(FIXTURES / name, target)
        out.append(target)
    return out


@pytest.fixture
def tmp_fixtures(tmp_path):
    """`tmp_fixtures("a.onnx", "a.csv")` -> paths of fresh copies inside the test's tmp dir."""

    def make(*names: str) -> list[Path]:
        return copy_fixtures(tmp_path, *names)

    return make


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dir_state(path: Path) -> dict[str, str]:
    """{file name: sha256} of every file in a directory (hidden temp files included)."""
    return {p.name: sha256(p) for p in sorted(Path(path).iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# data without the library


def read_csv_columns(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Header and raw text columns of a CSV file (plain `csv` module)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    body = [r for r in rows[1:] if r]
    return header, {h: [r[j] for r in body] for j, h in enumerate(header)}


def load_table(path: Path) -> dict[str, np.ndarray]:
    """A fixture CSV or NPZ as {column: array}; numeric columns float64, the others str."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    header, cols = read_csv_columns(path)
    out = {}
    for h in header:
        try:
            out[h] = np.array([float(v) for v in cols[h]], dtype=np.float64)
        except ValueError:
            out[h] = np.array(cols[h])
    return out


def write_csv(path: Path, columns: dict[str, Sequence], order: Sequence[str] | None = None,
              newline: str = "\n") -> Path:
    order = list(order or columns)
    n = len(columns[order[0]])
    lines = [",".join(order)]
    for i in range(n):
        lines.append(",".join(_fmt(columns[c][i]) for c in order))
    Path(path).write_text(newline.join(lines) + newline, encoding="utf-8")
    return Path(path)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v)


def group_label_text(values: np.ndarray) -> np.ndarray:
    """Group labels as the library should normalise them: numbers without a trailing '.0'."""
    out = []
    for v in np.asarray(values).tolist():
        try:
            f = float(v)
        except (TypeError, ValueError):
            out.append(str(v).strip())
            continue
        out.append(str(int(f)) if f == int(f) else repr(f))
    return np.array(out)


# ------------------------------------------------------------------------------------------------
# onnxruntime without the library


def ort_session(model: onnx.ModelProto | Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def expose(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the given intermediate tensors (type left to inference)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output} | {i.name for i in out.graph.input}
    for name in names:
        if name not in present:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return out


def run_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Values of `names` (graph inputs, intermediate tensors or outputs) for the given feeds."""
    inputs = {i.name for i in model.graph.input}
    fetch = [n for n in names if n not in inputs]
    sess = ort_session(expose(model, fetch))
    values = sess.run(fetch, feeds) if fetch else []
    out = dict(zip(fetch, values))
    for n in names:
        if n in inputs:
            out[n] = feeds[n]
    return out


def graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    ins = [i for i in model.graph.input if i.name not in inits]
    assert len(ins) == 1
    return ins[0]


def feeds_from_columns(model: onnx.ModelProto, table: dict[str, np.ndarray], features: Sequence[str],
                       rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    inp = graph_input(model)
    dtype = NP_OF_ONNX[inp.type.tensor_type.elem_type]
    x = np.stack([np.asarray(table[c], dtype=np.float64) for c in features], axis=1)
    if rows is not None:
        x = x[rows]
    return {inp.name: x.astype(dtype)}


def random_feeds(model: onnx.ModelProto, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    inp = graph_input(model)
    dtype = NP_OF_ONNX[inp.type.tensor_type.elem_type]
    width = inp.type.tensor_type.shape.dim[1].dim_value
    rng = np.random.default_rng(seed)
    return {inp.name: rng.normal(size=(n, width)).astype(dtype)}


# ------------------------------------------------------------------------------------------------
# tiny models


def make_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], in_dim: int, out_name: str,
               dtype=np.float32, in_name: str = "x", opset: int = 17, out_dtype=None) -> onnx.ModelProto:
    """A single-input, single-output model [batch, in_dim] -> out_name; shapes left to inference."""
    elem = ONNX_OF_NP[np.dtype(dtype)]
    out_elem = elem if out_dtype is None else ONNX_OF_NP[np.dtype(out_dtype)]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(in_name, elem, ["batch", in_dim])],
        [helper.make_tensor_value_info(out_name, out_elem, ["batch", None])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tensor(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def gemm_model(w_eff: np.ndarray, b_eff: np.ndarray | None, *, trans_b: int = 1, alpha: float = 1.0,
               beta: float = 1.0, dtype=np.float32, bias_shape: tuple[int, ...] | None = None) -> onnx.ModelProto:
    """x -> Gemm(x, B, C) = x @ w_eff.T + b_eff, with B/C stored in the given form and dtype."""
    out_f, in_f = w_eff.shape
    # Gemm's alpha and beta are float32 attributes: store B and C for the values the node really has
    alpha, beta = float(np.float32(alpha)), float(np.float32(beta))
    b_store = (w_eff / alpha) if trans_b else (w_eff / alpha).T
    inits = [tensor("B", b_store.astype(dtype))]
    inputs = ["x", "B"]
    if b_eff is not None:
        c = (b_eff / beta).astype(dtype)
        inits.append(tensor("C", c.reshape(bias_shape or (out_f,))))
        inputs.append("C")
    attrs = {"transB": trans_b}
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    node = helper.make_node("Gemm", inputs, ["y"], name="Gemm_0", **attrs)
    return make_model([node], inits, in_f, "y", dtype)


def matmul_model(w_eff: np.ndarray, b_eff: np.ndarray | None, *, bias_first: bool = False,
                 constant_weight: bool = False, dtype=np.float32,
                 bias_shape: tuple[int, ...] | None = None) -> onnx.ModelProto:
    """x -> MatMul(x, W[in, out]) (-> Add with a constant bias, in either operand order)."""
    out_f, in_f = w_eff.shape
    w_store = w_eff.T.astype(dtype)
    nodes, inits = [], []
    if constant_weight:
        nodes.append(helper.make_node("Constant", [], ["W"], name="Constant_W", value=tensor("W_value", w_store)))
    else:
        inits.append(tensor("W", w_store))
    out = "y" if b_eff is None else "mm"
    nodes.append(helper.make_node("MatMul", ["x", "W"], [out], name="MatMul_0"))
    if b_eff is not None:
        inits.append(tensor("b", b_eff.astype(dtype).reshape(bias_shape or (out_f,))))
        nodes.append(helper.make_node("Add", ["b", "mm"] if bias_first else ["mm", "b"], ["y"], name="Add_0"))
    return make_model(nodes, inits, in_f, "y", dtype)


# ------------------------------------------------------------------------------------------------
# model comparison


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def constant_tensor(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Value of an initializer or Constant-node output, read with numpy_helper only."""
    inits = initializer_map(model)
    if name in inits:
        return numpy_helper.to_array(inits[name])
    for node in model.graph.node:
        if node.op_type == "Constant" and list(node.output) == [name]:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    raise KeyError(name)


def assert_only_changed(original: onnx.ModelProto, repaired: onnx.ModelProto, allowed: set[str],
                        metadata_key: str | None = "onnx_esvd.repair") -> set[str]:
    """Check that `repaired` equals `original` byte for byte except for the constants named in `allowed`
    (initializers or Constant-node outputs), initializers newly appended for a node that used a shared
    constant (that node's input renamed to it), and one metadata entry `metadata_key`.

    Returns the set of names whose bytes really changed (new initializers included).
    """
    expected = onnx.ModelProto()
    expected.CopyFrom(original)
    exp_inits = initializer_map(expected)
    new_inits = initializer_map(repaired)
    changed: set[str] = set()
    for name in allowed:
        if name in exp_inits:
            assert name in new_inits, f"initializer '{name}' vanished from the repaired model"
            if exp_inits[name].SerializeToString() != new_inits[name].SerializeToString():
                changed.add(name)
            exp_inits[name].CopyFrom(new_inits[name])
            continue
        for i, node in enumerate(expected.graph.node):
            if node.op_type == "Constant" and list(node.output) == [name]:
                if node.SerializeToString() != repaired.graph.node[i].SerializeToString():
                    changed.add(name)
                node.CopyFrom(repaired.graph.node[i])
                break
    # initializers appended for a shared constant: the node that now reads them may have that input renamed
    added = [t for t in repaired.graph.initializer if t.name not in exp_inits]
    for t in added:
        expected.graph.initializer.append(t)
        changed.add(t.name)
        for i, node in enumerate(repaired.graph.node):
            for slot, inp in enumerate(node.input):
                if inp == t.name and i < len(expected.graph.node):
                    expected.graph.node[i].input[slot] = inp
    if metadata_key is not None:
        extra = [p for p in repaired.metadata_props if p.key == metadata_key]
        assert len(extra) == 1, f"expected one metadata_props entry '{metadata_key}', found {len(extra)}"
        props = [p for p in expected.metadata_props if p.key != metadata_key]
        del expected.metadata_props[:]
        for p in props:
            expected.metadata_props.add().CopyFrom(p)
        expected.metadata_props.add().CopyFrom(extra[0])
    if expected.SerializeToString() != repaired.SerializeToString():
        raise AssertionError("repaired model differs beyond the allowed constants: " + describe_diff(expected, repaired))
    return changed


def describe_diff(a: onnx.ModelProto, b: onnx.ModelProto) -> str:
    parts = []
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if getattr(a, field) != getattr(b, field):
            parts.append(f"{field}: {getattr(a, field)!r} != {getattr(b, field)!r}")
    if [x.SerializeToString() for x in a.opset_import] != [x.SerializeToString() for x in b.opset_import]:
        parts.append("opset_import differs")
    if [(p.key, p.value) for p in a.metadata_props] != [(p.key, p.value) for p in b.metadata_props]:
        parts.append("metadata_props differ")
    ga, gb = a.graph, b.graph
    for field in ("input", "output", "value_info"):
        if [x.SerializeToString() for x in getattr(ga, field)] != [x.SerializeToString() for x in getattr(gb, field)]:
            parts.append(f"graph.{field} differs")
    if len(ga.node) != len(gb.node):
        parts.append(f"node count {len(ga.node)} != {len(gb.node)}")
    for i, (na, nb) in enumerate(zip(ga.node, gb.node)):
        if na.SerializeToString() != nb.SerializeToString():
            parts.append(f"node {i} '{na.name}' ({na.op_type}) differs")
    ia, ib = initializer_map(a), initializer_map(b)
    if [t.name for t in ga.initializer] != [t.name for t in gb.initializer]:
        parts.append(f"initializer names {[t.name for t in ga.initializer]} != {[t.name for t in gb.initializer]}")
    for name in ia:
        if name in ib and ia[name].SerializeToString() != ib[name].SerializeToString():
            parts.append(f"initializer '{name}' differs")
    return "; ".join(parts) or "(other fields differ)"


def invoke(*args):
    """Run the CLI in-process (typer's CliRunner); arguments may be paths."""
    from typer.testing import CliRunner

    from onnx_esvd_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_bad_input(result, *needles):
    """Exit 2, exactly one line on stderr starting with 'error:', no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout.strip() == ""
    return lines[0]


def external_data_copy(tmp_path: Path, location_of) -> onnx.ModelProto:
    """The legacy Law School model saved with external data in `tmp_path` (`base.onnx` + `base.onnx.data`),
    returned unloaded with every tensor's data location rewritten by `location_of(location)`."""
    model = onnx.load(str(FIXTURES / "law_school_mlp_legacy.onnx"))
    onnx.save(model, str(tmp_path / "base.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="base.onnx.data", size_threshold=0)
    proto = onnx.load(str(tmp_path / "base.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location_of(entry.value)
    return proto
