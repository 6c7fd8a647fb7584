"""The fast paths of issue 14: the spill file, the three-stage pipeline, BLAS at one thread, and the
scipy-free root finder and refit solves. Each fast path must give the same answer as the slow one."""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import onnx
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import invoke
from onnx_esvd import repair
from onnx_esvd import spill as spill_mod
from onnx_esvd.rows import DataSpec, open_rows
from onnx_esvd.errors import OptionError
from onnx_esvd.esvd import brent_root
from onnx_esvd.refit import _constrained, _lstsq
from onnx_esvd.runtime import one_blas_thread, pipelined
from onnx_esvd.spill import SpillFile, spill_options


def _mlp(seed: int = 0, widths: tuple[int, ...] = (6, 12, 8, 1)) -> onnx.ModelProto:
    """A float32 Gemm/Relu MLP with these widths (input 6)."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [numpy_helper.from_array((rng.normal(size=(b, a)) / np.sqrt(a)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array((0.1 * rng.normal(size=b)).astype(np.float32), f"b{i}")]
        out = "y" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [out], transB=1))
        if out != "y":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def csv_case(tmp_path_factory):
    """A model and a CSV of 3,000 rows: three groups (one not compared), a missing value, a target."""
    root = tmp_path_factory.mktemp("spill")
    rng = np.random.default_rng(1)
    n = 3000
    g = rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.35, 0.15])
    x = rng.normal(size=(n, 6)) + (g == "b")[:, None] * 0.5
    y = x[:, :2].sum(axis=1) + rng.normal(size=n)
    lines = ["x_0,x_1,x_2,x_3,x_4,x_5,g,y"]
    for i in range(n):
        fields = [f"{v:.6g}" for v in x[i]] + [g[i], f"{y[i]:.6g}"]
        if i == 17:
            fields[3] = ""  # dropped with --dropna
        lines.append(",".join(fields))
    data = root / "rows.csv"
    data.write_text("\n".join(lines) + "\n")
    model = root / "m.onnx"
    onnx.save(_mlp(), str(model))
    return model, data


def _run(model, data, **kw):
    return repair(str(model), str(data), layer=-2, group="g", groups=["a", "b"], target="y", dropna=True,
                  bootstrap=0, batch_size=256, **kw)


def _weights(result) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in result.model.graph.initializer]


@pytest.fixture
def spills(monkeypatch):
    """Every SpillFile created during the test."""
    made: list[SpillFile] = []
    original = SpillFile.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(SpillFile, "__init__", init)
    return made


def test_spill_no_spill_and_capped_spill_give_identical_results(csv_case, spills, tmp_path):
    model, data = csv_case
    with spill_options(directory=tmp_path):
        spilled = _run(model, data)
    assert len(spills) == 1 and spills[0].size > 0  # the spill was really written and used
    with spill_options(enabled=False):
        parsed = _run(model, data)
    assert len(spills) == 1
    with spill_options(cap=20_000):  # past the cap after a few batches: later passes re-parse
        capped = _run(model, data)
    assert len(spills) == 2 and not spills[1].complete
    for other in (parsed, capped):
        assert all(np.array_equal(a, b) for a, b in zip(_weights(spilled), _weights(other)))
        assert np.array_equal(spilled.esvd.weight, other.esvd.weight)
        assert spilled.before.to_dict() == other.before.to_dict()
        assert spilled.after.to_dict() == other.after.to_dict()
        assert spilled.rows == other.rows
    assert spilled.rows.dropped == 1
    gc.collect()
    assert all(not f.open for f in spills)  # disk space freed after the repair
    assert os.listdir(tmp_path) == []  # and no file ever had a name there


def test_reader_passes_from_spill_equal_parsed_passes(csv_case):
    model, data = csv_case
    spec = DataSpec(group="g", groups=("a", "b"), target="y", dropna=True)
    m = onnx.load(str(model))
    readers = []
    for enabled in (True, False):
        with spill_options(enabled=enabled):
            r = open_rows(m, str(data), spec, batch_size=500, seed=3)
        list(r(first_pass=True))
        readers.append(r)
    assert readers[0]._spill is not None and readers[0]._spill.complete and readers[1]._spill is None
    for select, holdout in (("fit", 0.2), ("report", 0.2), ("report", 0.0), ("all", 0.3)):
        a, b = (list(r(select=select, holdout=holdout)) for r in readers)
        cat = lambda rows, f: np.concatenate([f(x) for x in rows])  # noqa: E731
        for f in (lambda x: x.feeds["x"], lambda x: x.code, lambda x: x.target, lambda x: x.u):
            assert np.array_equal(cat(a, f), cat(b, f))
    readers[0].close()
    assert readers[0]._spill is None


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_spill_freed_when_a_pass_is_interrupted(csv_case, spills, tmp_path, error):
    model, data = csv_case
    calls = []

    def progress(name, rows):
        calls.append(name)
        if name == "refit":  # pass 2 reads the spill
            raise error("stop")

    with pytest.raises(error), spill_options(directory=tmp_path):
        _run(model, data, progress=progress)
    assert "refit" in calls and len(spills) == 1
    assert not spills[0].open  # freed at once, before the exception reached the caller
    assert os.listdir(tmp_path) == []


def test_spill_freed_when_pass_one_fails(tmp_path, spills):
    model = tmp_path / "m.onnx"
    onnx.save(_mlp(), str(model))
    data = tmp_path / "bad.csv"
    rows = [",".join(["1"] * 6 + ["a" if i % 2 else "b", "1"]) for i in range(1200)]
    rows[1100] = rows[1100].replace("1,", "oops,", 1)  # a bad value late in pass 1
    data.write_text("x_0,x_1,x_2,x_3,x_4,x_5,g,y\n" + "\n".join(rows) + "\n")
    (tmp_path / "s").mkdir()
    with spill_options(directory=tmp_path / "s"), pytest.raises(Exception, match="oops"):
        _run(model, data)
    assert len(spills) == 1 and not spills[0].open and not spills[0].complete
    assert os.listdir(tmp_path / "s") == []


def test_cli_no_spill_and_spill_dir_write_identical_models(csv_case, tmp_path):
    model, data = csv_case
    outs = []
    for extra in ((), ("--no-spill",), ("--spill-dir", tmp_path)):
        out = tmp_path / f"out{len(outs)}.onnx"
        result = invoke("repair", model, "--layer", "-2", "--data", data, "--group", "g", "--groups", "a,b",
                        "--target", "y", "--dropna", "--bootstrap", "0", "-o", out, "--quiet", *extra)
        assert result.exit_code == 0, result.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out0.onnx", "out1.onnx", "out2.onnx"]


def test_spill_dir_must_exist(csv_case, tmp_path):
    with pytest.raises(OptionError, match="--spill-dir"):
        with spill_options(directory=tmp_path / "missing"):
            pass
    model, data = csv_case
    result = invoke("repair", model, "--layer", "-2", "--data", data, "--group", "g", "--groups", "a,b",
                    "--dropna", "--spill-dir", tmp_path / "missing", "-o", tmp_path / "o.onnx", "--quiet")
    assert result.exit_code == 2 and "--spill-dir" in result.stderr


def test_spill_file_round_trip_keeps_text_and_dtypes(tmp_path):
    f = SpillFile(2, ("s",), spill_mod.SpillSettings(directory=str(tmp_path)))
    batches = [(np.arange(6.0).reshape(3, 2), np.array([0, 5, 9]), np.array([0, 1, -1], np.int8),
                {"s": np.array(["é", "long text", ""])}),
               (np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.int8), {"s": np.zeros(0, str)})]
    for v, i, c, t in batches:
        assert f.append(v, i, c, t)
    f.finish()
    back = list(f.batches())
    for (v, i, c, t), (v2, i2, c2, t2) in zip(batches, back):
        assert np.array_equal(v, v2) and np.array_equal(i, i2) and np.array_equal(c, c2)
        assert list(t["s"]) == list(t2["s"])
    assert list(f.batches())[0][3]["s"][1] == "long text"  # read any number of times
    f.close()
    assert not f.open and not f.complete and os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# the pipeline and BLAS threads


def test_pipelined_keeps_order_and_runs_work_off_the_main_thread():
    main = threading.get_ident()
    seen = []

    def work(i):
        seen.append(threading.get_ident())
        return i * i

    assert [(i, r) for i, r in pipelined(iter(range(20)), work)] == [(i, i * i) for i in range(20)]
    assert main not in seen


def test_pipelined_closes_the_source_on_error():
    closed = []

    def source():
        try:
            for i in range(100):
                yield i
        finally:
            closed.append(True)

    def work(i):
        if i == 5:
            raise ValueError("bad batch")
        return i

    with pytest.raises(ValueError, match="bad batch"):
        for _ in pipelined(source(), work):
            pass
    assert closed == [True]


def test_blas_limited_to_one_thread_in_passes_and_restored():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    inside = []
    for _ in pipelined(iter(range(3)), lambda i: inside.append(blas_threads())):
        with one_blas_thread():  # nested use shares the limit
            inside.append(blas_threads())
    assert inside and all(all(n == 1 for n in t) for t in inside)
    assert blas_threads() == before


# ---------------------------------------------------------------------------------------------
# numerics without scipy


@settings(max_examples=60, deadline=None)
@given(st.floats(0.01, 50), st.floats(-3, 3), st.sampled_from([1, 3, 5]))
def test_brent_root_matches_scipy_brentq_to_the_bit(scale, shift, power):
    def f(t):
        return float(np.sinh(t - shift) * scale + (t - shift) ** power * 0.1)

    lo, hi = shift - 7.0, shift + 5.0
    ours = brent_root(f, lo, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
    theirs = scipy.optimize.brentq(f, lo, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
    assert ours == theirs


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1e-6, 1e-4, 1e-2]), st.integers(0, 3))
def test_schur_solve_equals_kkt_least_squares(seed, alpha, q):
    rng = np.random.default_rng(seed)
    p, m, n = 9, 2, 40
    z = rng.normal(size=(n, p))
    z[:, 0] = z[:, 1]  # a rank-deficient scatter: only the ridge makes lhs definite
    lhs = z.T @ z + alpha * n * np.eye(p)
    szt = z.T @ rng.normal(size=(n, m))
    e = rng.normal(size=(p, q))
    kkt = np.zeros((p + q, p + q))
    kkt[:p, :p], kkt[:p, p:], kkt[p:, :p] = lhs, e, e.T
    want = _lstsq(kkt, np.vstack([szt, np.zeros((q, m))]))[:p]
    got = _constrained(lhs, szt, e, alpha)
    assert np.allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    assert np.allclose(e.T @ got, 0.0, atol=1e-9 * np.abs(got).max())


def test_dependent_constraints_fall_back_to_least_squares():
    rng = np.random.default_rng(0)
    lhs = np.eye(4) * 3.0
    szt = rng.normal(size=(4, 1))
    e = np.ones((4, 2))  # two identical constraints: a singular Schur complement
    got = _constrained(lhs, szt, e, 1e-3)
    assert np.all(np.isfinite(got)) and np.allclose(e.T @ got, 0.0, atol=1e-12)


def test_no_temporary_file_means_parsing_in_every_pass(csv_case, monkeypatch):
    model, data = csv_case
    want = _run(model, data)

    def refuse(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spill_mod.tempfile, "TemporaryFile", refuse)
    got = _run(model, data)
    assert all(np.array_equal(a, b) for a, b in zip(_weights(want), _weights(got)))


def _wide_mlp(width: int) -> onnx.ModelProto:
    """6 -> width -> width -> 1, float32."""
    return _mlp(5, (6, width, width, 1))


def test_default_batch_size_shrinks_for_wide_inputs_only():
    from onnx_esvd.graph import find_layers
    from onnx_esvd.pipeline import pass_batch_size

    for width, rows in ((8, 4096), (256, 4096), (300, 3495), (512, 2048), (1024, 1024), (4096, 512)):
        found = find_layers(_wide_mlp(width))
        layer, final = found.layers[1], found.layers[2]  # inputs: width, width
        assert pass_batch_size(None, layer, final) == rows, width
        assert pass_batch_size(777, layer, final) == 777  # --batch-size wins


def test_repair_with_the_default_batch_uses_it_and_says_so(tmp_path, monkeypatch):
    """A 512-wide layer: the default repair runs 2,048-row batches (same weights as asking for them), and the
    JSON's options give the batch size that ran."""
    model = tmp_path / "wide.onnx"
    onnx.save(_wide_mlp(512), str(model))
    rng = np.random.default_rng(2)
    n = 5000
    g = np.where(rng.random(n) < 0.4, "a", "b")
    x = rng.normal(size=(n, 6)) + (g == "b")[:, None] * 0.7
    data = {**{f"x_{j}": x[:, j] for j in range(6)}, "g": g, "y": x[:, 0] + rng.normal(size=n)}
    import onnx_esvd.pipeline as pipeline_mod

    seen: list[int] = []
    real = pipeline_mod.open_rows
    monkeypatch.setattr(pipeline_mod, "open_rows", lambda *a, **kw: seen.append(kw["batch_size"]) or real(*a, **kw))
    auto = repair(str(model), data, layer=-2, group="g", target="y", refit="fair", bootstrap=0)
    assert seen == [2048]
    assert auto.to_dict()["options"]["batch_size"] == 2048
    fixed = repair(str(model), data, layer=-2, group="g", target="y", refit="fair", bootstrap=0, batch_size=2048)
    for a, b in zip(_weights(auto), _weights(fixed)):
        assert np.array_equal(a, b)


def test_background_returns_the_value_or_raises_the_error_off_the_main_thread():
    from onnx_esvd.runtime import Background

    where = []
    job = Background(lambda a, b=0: where.append(threading.current_thread().name) or a + b, 2, b=3)
    assert job.get() == 5 and job.get() == 5
    assert where == ["onnx-esvd-metrics"]

    def fails():
        raise OptionError("bad value")

    with pytest.raises(OptionError, match="bad value"):
        Background(fails).get()


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 60), k=st.integers(2, 4), f32=st.booleans())
def test_refit_accumulator_equals_masked_moments_bit_for_bit(seed, n, k, f32):
    """The refit pass's one sorted gather gives every (part, group) accumulator exactly the rows, in the order, that
    a masked copy per part and group gives."""
    from onnx_esvd.refit import RefitAccumulator
    from onnx_esvd.stats import Moments

    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5)).astype(np.float32 if f32 else np.float64)
    t = rng.normal(size=(n, 2))
    code = rng.integers(0, k, size=n)
    in_val = rng.random(n) < 0.3
    acc = RefitAccumulator(5, 2, k)
    acc.add(z, t, code, in_val)
    u = np.hstack([z.astype(np.float64), t])
    for part, pmask in (("train", ~in_val), ("val", in_val)):
        for g in range(k):
            want = Moments(7)
            want.add(u[pmask & (code == g)])
            got = acc.parts[(part, g)]
            assert got.n == want.n
            assert np.array_equal(got.mean, want.mean) and np.array_equal(got.scatter, want.scatter)
