"""Mergeable layer statistics (shards.py, layer_pass.py), many files as one table (sources/multi.py), and the
`capture` / `merge` commands: shards captured apart and merged equal the one-process pass."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, assert_bad_input, invoke

from onnx_esvd.capture import capture, group_stats
from onnx_esvd.rows import data_spec, open_rows
from onnx_esvd.data import open_table
from onnx_esvd.errors import DataError, OptionError
from onnx_esvd.esvd import esvd
from onnx_esvd.graph import read_weight
from onnx_esvd.layer_pass import capture_layer, layer_stats_for_repair, open_data, resolve_layer
from onnx_esvd.modelio import load_model
from onnx_esvd.score import resolve_score
from onnx_esvd.shards import LayerPartial, merge_all
from onnx_esvd.sources.multi import ConcatTable, count_rows
from onnx_esvd.stats import Moments

MODEL = FIXTURES / "law_school_mlp_legacy.onnx"
DATA = FIXTURES / "law_school.csv"
OPTS = dict(group="race1", groups=["white", "black"], target="ugpa", holdout=0.2, seed=3)
CUTS = (0, 1000, 2500)  # first rows of the three shards


def _split_csv(path: Path, out: Path, cuts=CUTS, gz_last: bool = False) -> list[Path]:
    lines = path.read_text().splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    bounds = [*cuts, len(body)]
    files = []
    for i in range(len(cuts)):
        text = header + "".join(body[bounds[i]:bounds[i + 1]])
        if gz_last and i == len(cuts) - 1:
            f = out / f"part-{i}.csv.gz"
            f.write_bytes(gzip.compress(text.encode()))
        else:
            f = out / f"part-{i}.csv"
            f.write_text(text)
        files.append(f)
    return files


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    return _split_csv(DATA, d)


def reference_stats(data=DATA, layer=-2, **opts):
    """The repair's own first pass (capture + group_stats) in one process."""
    opts = {**OPTS, **opts}
    model = load_model(MODEL).model
    spec = data_spec(opts["group"], opts["groups"], opts["target"], None)
    score = resolve_score(model)
    lin = resolve_layer(model, layer)
    reader = open_rows(model, data, spec, batch_size=4096, seed=opts["seed"])
    cap = capture(model, [lin], reader, opts["holdout"], lambda *_: None, score, report=False)
    stats = group_stats(cap, lin, reader, [])
    return dataclasses.replace(stats, labels=tuple(reader.group_labels())), lin, model


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-300))


def weight_rel(a, b) -> float:
    """||a - b||_F / ||b||_F."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_same_stats(got, want, tol=1e-12):
    assert tuple(got.labels) == tuple(want.labels)
    np.testing.assert_array_equal(got.counts, want.counts)
    assert _rel(got.means, want.means) < tol
    assert _rel(got.covs, want.covs) < tol
    assert _rel(got.gram, want.gram) < tol


# ---------------------------------------------------------------------------------------------
# the statistics file


def test_save_load_round_trip_is_exact(tmp_path, shards):
    part = capture_layer(MODEL, shards[1], -2, first_row=CUTS[1], **OPTS)
    path = part.save(tmp_path / "p.npz")
    back = LayerPartial.load(path)
    assert back.header == part.header
    assert back.seen == part.seen and back.ranges == part.ranges == [(1000, 2500)]
    assert back.sources == [str(shards[1])]
    for label, m in part.moments.items():
        assert back.moments[label].n == m.n
        np.testing.assert_array_equal(back.moments[label].mean, m.mean)
        np.testing.assert_array_equal(back.moments[label].scatter, m.scatter)
    with np.load(path, allow_pickle=False) as z:  # plain arrays and a JSON header, nothing pickled
        head = json.loads(str(z["header"]))
        assert z["scatter"].dtype == np.float64 and z["n"].dtype == np.int64
    assert head["format"] == "onnx-esvd.layer-stats" and head["format_version"] == 1
    assert head["groups"] == ["white", "black"] and head["columns"]["x"][0] == "dnn_bar_pass_prediction"


def test_load_refuses_other_files_and_versions(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz: not a readable statistics file"):
        LayerPartial.load(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="not an onnx-esvd statistics file"):
        LayerPartial.load(tmp_path / "other.npz")
    part = capture_layer(MODEL, DATA, -2, **OPTS)
    part.save(tmp_path / "v.npz")
    with np.load(tmp_path / "v.npz") as z:
        arrays = dict(z)
    head = json.loads(str(arrays["header"]))
    head["format_version"] = 99
    arrays["header"] = np.array(json.dumps(head))
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(DataError, match="format version 99"):
        LayerPartial.load(tmp_path / "v99.npz")


# ---------------------------------------------------------------------------------------------
# merge == one pass


def test_merged_shards_equal_the_one_process_pass(tmp_path, shards):
    want, lin, model = reference_stats()
    parts = [capture_layer(MODEL, f, -2, first_row=first, **OPTS) for f, first in zip(shards, CUTS)]
    for i, p in enumerate(parts):
        p.save(tmp_path / f"p{i}.npz")
    merged = merge_all(LayerPartial.load(tmp_path / f"p{i}.npz") for i in (2, 0, 1))  # any order
    assert merged.ranges == [(0, 6018)]
    got = merged.to_group_stats()
    assert_same_stats(got, want)
    # and so the repaired layer, to 1e-9 relative in norm (the one-process pass itself moves by ~3e-10 when only
    # its --batch-size changes: the ESVD amplifies the last bits of the moments)
    w = read_weight(model, lin)
    assert weight_rel(esvd(w, got).weight, esvd(w, want).weight) < 1e-9
    # the glob as one table gives the same statistics as the shards
    assert_same_stats(capture_layer(MODEL, str(tmp_path / "shards" / "part-*.csv"), -2, **OPTS).to_group_stats(),
                      want)


def test_shards_without_first_row_would_split_differently(shards):
    """--first-row matters: shard 1 captured as if it started at row 0 gets another holdout split."""
    right = capture_layer(MODEL, shards[1], -2, first_row=CUTS[1], **OPTS)
    wrong = capture_layer(MODEL, shards[1], -2, **OPTS)
    assert right.seen == wrong.seen
    assert right.fit_rows("white") != wrong.fit_rows("white")


def _partial(rows_by_label: dict, first: int, end: int, d: int) -> LayerPartial:
    p = LayerPartial({"layer": {"index": 0, "name": "n", "in_features": d}}, ranges=[(first, end)])
    for label, x in rows_by_label.items():  # insertion order = this shard's first-seen order
        m = Moments(d)
        m.add(x)
        p.moments[label] = m
        p.seen[label] = len(x)
    return p


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_shards=st.integers(1, 5), k=st.integers(2, 4))
def test_merge_is_independent_of_split_order_and_label_order(seed, n_shards, k):
    rng = np.random.default_rng(seed)
    d, n = 3, 200
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 100, size=d) + rng.normal(size=d) * 50
    lab = rng.integers(0, k, size=n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=n_shards - 1, replace=False)) if n_shards > 1 else []
    bounds = [0, *cuts, n]
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        order = [f"g{g}" for g in rng.permutation(k)]
        parts.append(_partial({g: x[a:b][lab[a:b] == int(g[1:])] for g in order}, int(a), int(b), d))
    merged = merge_all([parts[i] for i in rng.permutation(len(parts))])
    assert merged.ranges == [(0, n)]
    for g in range(k):
        rows = x[lab == g]
        m = merged.moments[f"g{g}"]
        assert m.n == len(rows) and merged.seen[f"g{g}"] == len(rows)
        if len(rows):
            np.testing.assert_allclose(m.mean, rows.mean(axis=0), rtol=1e-12, atol=1e-9)
            c = rows - rows.mean(axis=0)
            np.testing.assert_allclose(m.scatter, c.T @ c, rtol=1e-10, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def base_part():
    return capture_layer(MODEL, DATA, -2, first_row=0, **OPTS)


def _other_model(tmp_path) -> Path:
    model = onnx.load(str(MODEL))
    t = model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(t).copy()
    arr.flat[0] += 1.0
    t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    return path


FEATURES = ["gender_female", "dnn_bar_pass_prediction", "gender_male", "lsat", "pass_bar"]


@pytest.mark.parametrize("change, needles", [
    ({"seed": 4}, ["--seed differs", "3", "4"]),
    ({"holdout": 0.3}, ["--holdout differs", "0.2", "0.3"]),
    ({"groups": ["black", "white"]}, ["--groups differs", '["white", "black"]', '["black", "white"]']),
    ({"layer": -3}, ["layer differs", "'/6/Gemm'", "'/4/Gemm'"]),
    ({"features": FEATURES}, ["columns of model input 'x' differ", "dnn_bar_pass_prediction", "gender_female"]),
    ({"dropna": True}, ["--dropna differs", "false", "true"]),
    ({"model": "other"}, ["model (sha256 of the ModelProto) differs"]),
])
def test_merge_refuses_different_models_layers_columns_options(tmp_path, base_part, change, needles):
    opts = {**OPTS, "first_row": 10_000}
    layer = change.pop("layer", -2) if "layer" in change else -2
    model = _other_model(tmp_path) if change.pop("model", None) else MODEL
    other = capture_layer(model, DATA, layer, **{**opts, **change})
    with pytest.raises(DataError) as info:
        base_part.merge(other)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_merge_refuses_overlapping_rows(base_part, shards):
    again = capture_layer(MODEL, shards[1], -2, first_row=CUTS[1], **OPTS)
    with pytest.raises(DataError, match="both cover global rows 1000...2499"):
        base_part.merge(again)


def test_layer_stats_for_repair_checks_the_run(base_part):
    want, lin, model = reference_stats()
    spec = data_spec("race1", ["white", "black"], "ugpa", None)
    reader = open_rows(model, DATA, spec, batch_size=4096, seed=3)
    notes: list[str] = []
    got, labels = layer_stats_for_repair(base_part, model, lin, spec, holdout=0.2, seed=3, columns=reader,
                                         notes=notes)
    assert labels == ("white", "black")
    assert_same_stats(got, want)
    assert any("6018 rows" in n for n in notes)
    with pytest.raises(DataError, match=r"does not fit this repair: the --seed differs \(the statistics have 3, "
                                        r"this run has 0\)"):
        layer_stats_for_repair(base_part, model, lin, spec, holdout=0.2, seed=0, columns=reader)
    other = resolve_layer(model, -3)
    with pytest.raises(DataError, match="the layer differs"):
        layer_stats_for_repair(base_part, model, other, spec, holdout=0.2, seed=3, columns=reader)
    with pytest.raises(DataError, match="holds rows of group 'black', which is not among the groups"):
        base_part.to_group_stats(["white", "asian"])


def test_bad_split_options_are_refused():
    with pytest.raises(OptionError, match="--holdout 1.5"):
        capture_layer(MODEL, DATA, -2, **{**OPTS, "holdout": 1.5})
    with pytest.raises(OptionError, match="--first-row -1"):
        open_data(DATA, -1)


# ---------------------------------------------------------------------------------------------
# many files as one table


def _rows(table, keep=None):
    vals, idx = [], []
    for b in table.batches(["lsat", "ugpa"], 700, text=["race1"], keep=keep):
        vals.append(np.column_stack([b.values, b.text["race1"].astype(object)]))
        idx.append(b.row_index())
    return np.concatenate(vals), np.concatenate(idx)


@pytest.mark.parametrize("how", ["glob", "directory"])
def test_many_files_read_as_the_concatenated_file(tmp_path, how):
    d = tmp_path / "calib"
    d.mkdir()
    _split_csv(DATA, d, gz_last=True)
    (d / "_SUCCESS").write_text("")  # Spark's marker and hidden files are not data
    (d / ".part-0.csv.crc").write_text("x")
    source = str(d / "part-*") if how == "glob" else str(d)
    many, one = open_table(source), open_table(DATA)
    assert isinstance(many, ConcatTable) and [p.name for p in many.parts] == [
        str(d / "part-0.csv"), str(d / "part-1.csv"), str(d / "part-2.csv.gz")]
    assert many.columns == one.columns
    assert many.file_offsets() == [0, 1000, 2500, 6018]
    for keep in (None, lambda s, n: np.arange(s, s + n) % 7 != 3):
        a, ia = _rows(many, keep)
        b, ib = _rows(one, keep)
        np.testing.assert_array_equal(ia, ib)
        assert (a == b).all()
    # the holdout split and the group codes of the row reader are the same
    spec = data_spec("race1", ["white", "black"], "ugpa", None)
    model = load_model(MODEL).model
    r1, r2 = (open_rows(model, src, spec, batch_size=512, seed=5) for src in (source, DATA))
    u1 = np.concatenate([r.u for r in r1(first_pass=True)])
    u2 = np.concatenate([r.u for r in r2(first_pass=True)])
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(r1.row_codes, r2.row_codes)
    f1 = np.concatenate([r.u for r in r1(select="fit", holdout=0.2)])
    f2 = np.concatenate([r.u for r in r2(select="fit", holdout=0.2)])
    np.testing.assert_array_equal(f1, f2)


def test_many_files_refusals(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.csv").write_text("x,y,g\n1,2,a\n")
    (d / "b.csv").write_text("x,z,g\n1,2,a\n")
    with pytest.raises(DataError, match=r"b.csv: its columns differ from .*a.csv's \(no column 'y'\)"):
        open_table(d)
    (d / "b.csv").write_text("y,x,g\n1,2,a\n")
    with pytest.raises(DataError, match="column 1 is 'y' where the first file has 'x'"):
        open_table(str(d / "*.csv"))
    with pytest.raises(DataError, match="no file matches this pattern"):
        open_table(str(d / "*.parquet"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        open_table(empty)
    (d / "b.csv").write_text("x,y,g\n1,2,a\n3,,b\n")  # a missing value: named by file and line
    with pytest.raises(DataError, match=r"b.csv: line 3, column 'y' is empty"):
        list(open_table(d).batches(["x", "y"], 10, text=["g"]))


def test_count_rows_matches_the_reader(tmp_path):
    f = tmp_path / "q.csv"
    f.write_text('a,b\n1,"two\nlines"\n\n3,x\n\n\n5,"y"\n')
    table = open_table(f)
    read = sum(len(b.values) for b in table.batches(["a"], 2, text=["b"]))
    assert count_rows(table) == read == 3
    shifted = open_data(f, first_row=100)
    assert [list(b.row_index()) for b in shifted.batches(["a"], 10)] == [[100, 101, 102]]


# ---------------------------------------------------------------------------------------------
# the commands


def test_capture_and_merge_commands(tmp_path, shards):
    common = ["--layer", "-2", "--group", "race1", "--groups", "white,black", "--target", "ugpa", "--seed", "3",
              "-q"]
    r0 = invoke("capture", MODEL, "--data", shards[0], *common, "-o", tmp_path / "a.npz")
    assert r0.exit_code == 0, r0.stderr
    assert "1000 rows" in r0.stdout
    r1 = invoke("capture", MODEL, "--data", shards[1], "--data", shards[2], "--first-row", "1000", *common,
                "-o", tmp_path / "b.npz")
    assert r1.exit_code == 0, r1.stderr
    rm = invoke("merge", tmp_path / "a.npz", tmp_path / "b.npz", "-o", tmp_path / "all.npz", "--json")
    assert rm.exit_code == 0, rm.stderr
    summary = json.loads(rm.stdout)
    assert summary["rows"] == 6018 and summary["ranges"] == [[0, 6018]]
    want, _, _ = reference_stats()
    assert_same_stats(LayerPartial.load(tmp_path / "all.npz").to_group_stats(), want)
    # the same shard twice, and statistics of another seed: exit 2, one line
    assert_bad_input(invoke("merge", tmp_path / "a.npz", tmp_path / "a.npz", "-o", tmp_path / "x.npz"),
                     "both cover global rows 0...999")
    r2 = invoke("capture", MODEL, "--data", shards[2], *common[:-3], "--seed", "4", "-q", "--first-row", "2500",
                "-o", tmp_path / "c.npz")
    assert r2.exit_code == 0, r2.stderr
    assert_bad_input(invoke("merge", tmp_path / "a.npz", tmp_path / "c.npz", "-o", tmp_path / "x.npz"),
                     "--seed differs (one has 3, the other has 4)")
    assert not (tmp_path / "x.npz").exists()
    # an existing output needs --force; the output may not be a data file
    assert_bad_input(invoke("merge", tmp_path / "a.npz", "-o", tmp_path / "b.npz"), "already exists")
    assert_bad_input(invoke("capture", MODEL, "--data", shards[0], *common, "-o", shards[0], "--force"),
                     "would overwrite the input")


# ---------------------------------------------------------------------------------------------
# k groups


RACE5 = FIXTURES / "law_race5.csv"


@pytest.mark.parametrize("groups", [None, ["black", "rest"], ["hisp", "asian", "white"]])
def test_k_group_shards_equal_the_one_process_pass(tmp_path, groups):
    """Five race values (or A against the rest, or three of them): shards see the labels in different first-seen
    orders, and the merge (keyed by label) still equals the one-process pass."""
    opts = {**OPTS, "groups": groups}
    want, lin, model = reference_stats(RACE5, **opts)
    files = _split_csv(RACE5, tmp_path, cuts=(0, 3, 1700))  # shard 1 starts with other labels than shard 0
    parts = [capture_layer(MODEL, f, -2, first_row=first, **opts) for f, first in zip(files, (0, 3, 1700))]
    firsts = [list(p.moments) for p in parts]
    merged = merge_all(parts)
    got = merged.to_group_stats(list(want.labels))
    assert_same_stats(got, want)
    assert tuple(merged.labels) == tuple(want.labels)  # the default order is the run's group order
    if groups is None:
        assert want.k == 5 and len({tuple(f) for f in firsts}) > 1
    if groups and groups[-1] == "rest":
        assert set(merged.seen) == {"black", "rest"} and merged.skipped == 0
    w = read_weight(model, lin)
    # three listed groups amplify the merge's float64 round-off a little more (measured 1.3e-9; changing only
    # --batch-size in the one-process pass moves the weights as much)
    assert weight_rel(esvd(w, got).weight, esvd(w, want).weight) < (5e-9 if groups and len(groups) == 3 else 1e-9)


def test_parquet_shards_with_an_empty_file_read_as_one_table(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import csv

    with open(DATA, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, (a, b) in enumerate([(0, 1000), (1000, 1000), (1000, 6018)]):  # the middle file has no rows
        cols = {c: [r[c] for r in rows[a:b]] for c in rows[0]}
        table = {c: (pa.array(v, pa.string()) if c == "race1" else pa.array([float(x) for x in v], pa.float64()))
                 for c, v in cols.items()}
        pq.write_table(pa.table(table), tmp_path / f"part-{i}.parquet")
    many = open_table(str(tmp_path / "part-*.parquet"))
    assert many.file_offsets() == [0, 1000, 1000, 6018]
    keep = lambda s, n: np.arange(s, s + n) % 5 != 0  # noqa: E731
    a, ia = _rows(many, keep)
    b, ib = _rows(open_table(DATA), keep)
    np.testing.assert_array_equal(ia, ib)
    assert (a == b).all()
    want, _, _ = reference_stats()
    assert_same_stats(capture_layer(MODEL, str(tmp_path / "part-*.parquet"), -2, **OPTS).to_group_stats(), want)


# ------------------------------------------------------------------------------------------------
# repair --layer-stats / --engine dask through the pipeline


def test_repair_with_merged_layer_stats_equals_the_one_process_repair(tmp_path, shards):
    from onnx_esvd import repair

    parts = [capture_layer(MODEL, f, -2, first_row=start, group="race1", groups=["white", "black"], target="ugpa",
                           holdout=0.2, seed=3) for f, start in zip(shards, CUTS)]
    stats = tmp_path / "all.npz"
    merge_all(parts).save(stats)
    kw = dict(layer=-2, group="race1", groups=["white", "black"], target="ugpa", holdout=0.2, seed=3, bootstrap=0,
              refit="fair")
    one = repair(MODEL, DATA, **kw)
    merged = repair(MODEL, DATA, layer_stats=stats, **kw)
    w_one, w_merged = read_weight(one.model, one.layer), read_weight(merged.model, merged.layer)
    assert weight_rel(w_merged, w_one) < 1e-6  # stored float32: equal up to the last bit of a few entries
    assert merged.after.ks == pytest.approx(one.after.ks, abs=1e-6)
    assert any("layer statistics come from" in w for w in merged.warnings)
    with pytest.raises(DataError, match="--seed differs"):
        repair(MODEL, DATA, layer_stats=stats, **{**kw, "seed": 4})
    with pytest.raises(OptionError, match="alternatives"):
        repair(MODEL, DATA, layer_stats=stats, engine="dask", **kw)
