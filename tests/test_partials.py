"""Mergeable statistics of the refit and report passes (partials.py, passes.py, rowsample merge): every pass
mapped over shard files and merged equals the one-process pass over the concatenated file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_shards import DATA, MODEL, _split_csv, weight_rel

from onnx_esvd import refit as refit_mod
from onnx_esvd.rows import data_spec, open_rows
from onnx_esvd.data import open_table
from onnx_esvd.errors import DataError
from onnx_esvd.graph import find_layers, with_outputs
from onnx_esvd.metrics import output_metrics
from onnx_esvd.modelio import load_model
from onnx_esvd.partials import RefitPartial, ReportPartial, pack, unpack
from onnx_esvd.passes import PassTask, refit_batches, run_pass
from onnx_esvd.rowsample import StratifiedSample
from onnx_esvd.runtime import Runner
from onnx_esvd.score import resolve_score
from onnx_esvd.tuning import graph_chain

CUTS = (0, 700, 1500, 2600, 4000, 5000)


def _sample_equal(a, b) -> None:
    ra, rb = a.result(), b.result()
    for name in ("x", "t", "group", "index", "weight"):
        np.testing.assert_array_equal(getattr(ra, name), getattr(rb, name), err_msg=name)
    assert ra.seen == rb.seen and ra.kept == rb.kept


@settings(max_examples=40, deadline=None)
@given(n=st.integers(30, 400), k=st.integers(2, 3), capacity=st.integers(5, 120), floor=st.integers(0, 20),
       cuts=st.lists(st.integers(1, 399), max_size=5), seed=st.integers(0, 2**31), batch=st.integers(1, 64))
def test_stratified_sample_of_shards_merges_into_the_one_stream_sample(n, k, capacity, floor, cuts, seed, batch):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    t = rng.normal(size=(n, 1))
    group = np.minimum(rng.geometric(0.5, n) - 1, k - 1)  # skewed group sizes
    index = np.arange(n) + 1000  # global row indices (the shard starts anywhere)
    one = StratifiedSample(capacity, floor, seed)
    for a in range(0, n, batch):
        one.add(x[a:a + batch], t[a:a + batch], group[a:a + batch], index=index[a:a + batch])
    bounds = sorted({0, n, *[c for c in cuts if c < n]})
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        s = StratifiedSample(capacity, floor, seed)
        for c in range(a, b, batch):
            e = min(c + batch, b)
            s.add(x[c:e], t[c:e], group[c:e], index=index[c:e])
        seen, kept = s.parts()  # what a shard ships: trimmed to its own level, then rebuilt on the client
        parts.append(StratifiedSample.from_parts(capacity, floor, seed, seen, kept))
    merged = parts[-1]
    for p in reversed(parts[:-1]):  # any merge order
        merged = p.merge(merged)
    _sample_equal(merged, one)


def _report(rows: slice, pred, code, target, labels=("a", "b"), holdout=0.2) -> ReportPartial:
    head = {"kind": "report", "model_sha256": "m", "holdout": holdout, "labels": list(labels)}
    idx = np.arange(len(pred))[rows]
    return ReportPartial(head, list(labels), pred[rows], code[rows], idx, target[rows], {}, 1,
                         [(int(idx[0]), int(idx[-1]) + 1)], f"part {rows.start}")


def test_report_partials_merge_in_global_row_order_and_give_the_same_metrics():
    rng = np.random.default_rng(0)
    n = 900
    pred = rng.normal(size=(n, 1)).astype(np.float32)
    code = (rng.random(n) < 0.3).astype(np.int64)
    target = rng.normal(size=n)
    want = output_metrics(pred, code, ["a", "b"], target, bootstrap=40, seed=5)
    p0, p1, p2 = (_report(s, pred, code, target) for s in (slice(0, 300), slice(300, 650), slice(650, n)))
    p1 = ReportPartial.from_bytes(p1.to_bytes())  # through the file format
    merged = p2.merge(p0).merge(p1)  # out of order: rows still end up in global order
    np.testing.assert_array_equal(merged.index, np.arange(n))
    got = merged.collector(["a", "b"]).result(["a", "b"], bootstrap=40, seed=5)
    assert got.ks == want.ks and got.intervals["ks"] == want.intervals["ks"]
    assert got.mse == pytest.approx(want.mse, rel=1e-12)
    # labels seen in another order in another shard: merged by label, not by code
    flipped = ReportPartial(dict(p0.header), ["b", "a"], p0.pred, 1 - p0.code, p0.index, p0.target, {}, 1, p0.ranges)
    again = p2.merge(flipped).merge(p1).collector(["a", "b"]).result(["a", "b"])
    assert again.ks == want.ks
    with pytest.raises(DataError, match=r"'holdout' differs \(one has 0.2, the other has 0.3\)"):
        p0.merge(_report(slice(300, 650), pred, code, target, holdout=0.3))
    with pytest.raises(DataError, match=r"both cover global rows 300\.\.\.649"):
        merged.merge(p1)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("partial_shards")
    _split_csv(DATA, d, cuts=CUTS, gz_last=True)
    return d


def test_refit_pass_over_shard_files_equals_the_one_process_pass(shard_dir):
    """Refit moments to float64 rounding (so the solve to 1e-9) and the penalised refit's row sample exactly,
    with a sample small enough that every group is trimmed."""
    model = load_model(MODEL).model
    spec = data_spec("race1", ["white", "black"], "ugpa", None)
    score = resolve_score(model)
    found = find_layers(model, score.tensor)
    final = found.final
    chain = graph_chain(model, found, final, 1)
    labels = ("white", "black")
    capacity, floor = 300, 40
    blob = model.SerializeToString()
    task = PassTask("refit", model=blob, original=blob, spec=spec, score=score, holdout=0.2, seed=3, labels=labels,
                    finals=(final,), chain=chain, sample=(capacity, floor, 150))  # 150: the whole data's level
    table = open_table(str(shard_dir / "part-*"))
    offsets = table.file_offsets()
    results = [unpack(run_pass(task, part.path, first)) for part, first in zip(table.parts, offsets)]
    for r in results:  # a shard ships no more than the whole data's level per group
        assert all(len(index) <= 150 for _, _, index in r["refit"].sample.parts()[1].values())
    merged = results[0]["refit"]
    for r in results[1:]:
        merged = merged.merge(r["refit"])
    merged = RefitPartial.from_bytes(merged.to_bytes())

    reader = open_rows(model, open_table(DATA), spec, batch_size=4096, seed=3)
    for _ in reader(first_pass=True):
        pass
    acc = refit_mod.RefitAccumulator(final.in_features, final.out_features, 2)
    sample = StratifiedSample(capacity, floor, 3)
    runner = Runner(with_outputs(model, [(final.input, final.elem_type)]), [final.input])
    group_of = reader.group_of_code()
    refit_batches(((rows, group_of[rows.code]) for rows in reader(select="fit", holdout=0.2)), runner, None,
                  [final], [], {final.index: acc}, 0.2, chain=chain, sample=sample, sampled=final)
    got = merged.accs[final.index]
    for key, m in acc.parts.items():
        assert got.parts[key].n == m.n
        assert weight_rel(got.parts[key].mean, m.mean) < 1e-12 and weight_rel(got.parts[key].scatter, m.scatter) < 1e-12
    _sample_equal(merged.sample, sample)
    assert merged.sample.result().kept == {0: 150, 1: 150}  # trimmed: the test exercises the water level
    p = final.in_features
    sol = [refit_mod.solve(a.groups(("train", "val")), p, mode="fair", alpha=1e-6, fit_intercept=True)
           for a in (got, acc)]
    assert weight_rel(sol[0].coef, sol[1].coef) < 1e-9


def test_refit_partials_of_different_runs_are_not_merged(shard_dir):
    model = load_model(MODEL).model
    spec = data_spec("race1", ["white", "black"], "ugpa", None)
    score = resolve_score(model)
    final = find_layers(model, score.tensor).final
    blob = model.SerializeToString()
    base = dict(model=blob, original=blob, spec=spec, score=score, holdout=0.2, seed=3, finals=(final,))
    files = sorted(shard_dir.glob("part-*"))
    a = unpack(run_pass(PassTask("refit", labels=("white", "black"), **base), files[0], 0))["refit"]
    b = unpack(run_pass(PassTask("refit", labels=("white", "black"), **{**base, "seed": 4}), files[1], 700))["refit"]
    with pytest.raises(DataError, match=r"'seed' differs \(one has 3, the other has 4\)"):
        a.merge(b)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.producer_name = "something else"  # another model: another hash
    c = unpack(run_pass(PassTask("refit", labels=("white", "black"), **{**base, "model": other.SerializeToString()}),
                        files[1], 700))["refit"]
    with pytest.raises(DataError, match=r"'measured_sha256' differs"):
        a.merge(c)
    report = _report(slice(0, 3), np.zeros((3, 1)), np.zeros(3, dtype=np.int64), np.zeros(3))
    with pytest.raises(DataError, match=r"not an onnx-esvd.pass-result file"):
        unpack(report.to_bytes())
    assert unpack(pack({"rows": 7}))["rows"] == 7


def test_engine_errors_are_one_line_option_errors(shard_dir):
    import onnx_esvd
    from onnx_esvd.errors import OptionError

    kw = dict(layer=-2, group="race1", groups=["white", "black"], target="ugpa", seed=3, refit="fair", bootstrap=0)
    with pytest.raises(OptionError, match=r"the engine returned 0 results for 6 files"):
        onnx_esvd.repair(MODEL, str(shard_dir / "part-*"), engine=lambda task, files: [], **kw)
    rows = open_table(DATA)
    arrays = {c: np.asarray(v) for c, v in zip(rows.columns, np.loadtxt(DATA, delimiter=",", skiprows=1,
                                                                          dtype=str).T)}
    with pytest.raises(OptionError, match=r"give files, a directory or a glob pattern, not in-memory data"):
        onnx_esvd.repair(MODEL, arrays, engine=lambda task, files: [], **kw)
    with pytest.raises(OptionError, match=r"--engine 'spark' is invalid; choose local or dask"):
        onnx_esvd.check(MODEL, DATA, group="race1", target="ugpa", max_ks=0.5, engine="spark")


def test_repair_with_eval_files_runs_every_pass_on_the_engine(tmp_path):
    """--eval: the report passes measure the evaluation files on the workers, on the calibration's groups; rows of
    a group the calibration did not have are skipped and counted as in one process."""
    import onnx_esvd

    lines = DATA.read_text().splitlines(keepends=True)
    col = lines[0].strip().split(",").index("race1")
    ev = lines[4001:]
    cells = ev[10].rstrip("\n").split(",")
    cells[col] = "martian"  # a group only the evaluation data has
    ev[10] = ",".join(cells) + "\n"
    (tmp_path / "cal.csv").write_text("".join(lines[:4001]))
    (tmp_path / "ev.csv").write_text(lines[0] + "".join(ev))
    for d, cuts in (("cal", (0, 1500, 3000)), ("ev", (0, 900))):
        (tmp_path / d).mkdir()
        _split_csv(tmp_path / f"{d}.csv", tmp_path / d, cuts=cuts)

    def engine(task, files):
        return [run_pass(task, p, r) for p, r in files]

    kw = dict(layer=-2, group="race1", target="ugpa", seed=3, refit="fair", bootstrap=30,
              evaluate=str(tmp_path / "ev" / "part-*"))
    one = onnx_esvd.repair(MODEL, str(tmp_path / "cal" / "part-*"), **kw)
    eng = onnx_esvd.repair(MODEL, str(tmp_path / "cal" / "part-*"), engine=engine, **kw)
    assert eng.report_rows == "eval" and eng.rows == one.rows
    assert weight_rel(eng.esvd.weight, one.esvd.weight) < 1e-9
    assert (eng.before.ks, eng.after.ks, eng.after.intervals) == (one.before.ks, one.after.ks, one.after.intervals)
    skipped = [w for w in one.warnings if "martian" in w]
    assert skipped and skipped[0].startswith("1 rows of") and skipped[0] in eng.warnings


def test_eval_files_rows_dropped_for_a_missing_value_are_counted_on_the_engine(tmp_path):
    """--eval --dropna with an engine: the rows the evaluation files skip for a missing value are counted from
    their own report partials (not the calibration's count), so the note equals the one-process note."""
    import onnx_esvd

    lines = DATA.read_text().splitlines(keepends=True)
    col = lines[0].strip().split(",").index("ugpa")
    ev = lines[4001:]
    for i in (3, 7):  # two evaluation rows without a target; the calibration rows are complete
        cells = ev[i].rstrip("\n").split(",")
        cells[col] = ""
        ev[i] = ",".join(cells) + "\n"
    (tmp_path / "ev.csv").write_text(lines[0] + "".join(ev))
    (tmp_path / "cal.csv").write_text("".join(lines[:4001]))
    (tmp_path / "ev").mkdir()
    _split_csv(tmp_path / "ev.csv", tmp_path / "ev", cuts=(0, 500))

    def engine(task, files):
        return [run_pass(task, p, r) for p, r in files]

    kw = dict(layer=-2, group="race1", target="ugpa", seed=3, refit="fair", bootstrap=0, dropna=True,
              evaluate=str(tmp_path / "ev" / "part-*"))
    one = onnx_esvd.repair(MODEL, str(tmp_path / "cal.csv"), **kw)
    eng = onnx_esvd.repair(MODEL, str(tmp_path / "cal.csv"), engine=engine, **kw)
    dropped = [w for w in one.warnings if "--dropna" in w]
    assert len(dropped) == 1 and " 2 rows with a missing value" in dropped[0]
    assert [w for w in eng.warnings if "--dropna" in w] == dropped
    assert eng.after.ks == one.after.ks
