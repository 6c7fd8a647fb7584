"""Calibration data tables (onnx_esvd.data): CSV, NPZ, arrays and readers agree; bad files are named."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, load_table, write_csv
from onnx_esvd.data import ArrayTable, CsvTable, NpzTable, ReaderTable, normalise_labels, open_table
from onnx_esvd.errors import DataError

LAW_FEATURES = ["dnn_bar_pass_prediction", "gender_female", "gender_male", "lsat", "pass_bar"]
LAW_NUMERIC = LAW_FEATURES + ["ugpa"]


def collect(table, numeric, label, batch_size):
    """Concatenate a table's batches; also checks batch starts are consecutive and sizes bounded."""
    values, labels, start = [], [], 0
    for batch in table.batches(numeric, batch_size, text=[label] if label else []):
        n = batch.values.shape[0]
        assert batch.start == start
        assert batch.values.dtype == np.float64 and batch.values.shape == (n, len(numeric))
        if label is None:
            assert batch.text == {}
        else:
            assert len(batch.text[label]) == n
            labels.append(normalise_labels(batch.text[label]))
        values.append(batch.values)
        start += n
    v = np.concatenate(values) if values else np.zeros((0, len(numeric)))
    lab = np.concatenate(labels) if labels else None
    return v, lab


@pytest.fixture(scope="module")
def law_npz_arrays():
    return load_table(FIXTURES / "law_school.npz")


@pytest.fixture(scope="module")
def law_reference(law_npz_arrays):
    """What every source must yield for the Law School rows (features as float32 values, target float64)."""
    vals = np.stack([np.asarray(law_npz_arrays[c], np.float64) for c in LAW_NUMERIC], axis=1)
    return vals, law_npz_arrays["race1"].astype(str)


# ------------------------------------------------------------------------------------------------
# all sources agree


def test_columns_in_file_order():
    cols = ("dnn_bar_pass_prediction", "gender_female", "gender_male", "lsat", "pass_bar", "race1", "ugpa")
    assert open_table(FIXTURES / "law_school.csv").columns == cols
    assert open_table(FIXTURES / "law_school.npz").columns == cols
    assert isinstance(open_table(FIXTURES / "law_school.csv"), CsvTable)
    assert isinstance(open_table(str(FIXTURES / "law_school.npz")), NpzTable)


def test_csv_matches_independent_parse():
    table = open_table(FIXTURES / "law_school.csv")
    values, labels = collect(table, LAW_NUMERIC, "race1", 4096)
    raw = load_table(FIXTURES / "law_school.csv")
    expected = np.stack([raw[c] for c in LAW_NUMERIC], axis=1)
    np.testing.assert_array_equal(values, expected)  # full float64 precision of the text
    np.testing.assert_array_equal(labels, raw["race1"])
    assert values.shape == (6018, 6)
    assert (labels == "black").sum() == 421 and (labels == "white").sum() == 5597


@pytest.mark.parametrize("batch_size", [7, 1000, 10**6])
def test_csv_and_npz_agree(batch_size, law_reference):
    ref_values, ref_labels = law_reference
    csv_v, csv_l = collect(open_table(FIXTURES / "law_school.csv"), LAW_NUMERIC, "race1", batch_size)
    npz_v, npz_l = collect(open_table(FIXTURES / "law_school.npz"), LAW_NUMERIC, "race1", batch_size)
    np.testing.assert_array_equal(npz_v, ref_values)
    np.testing.assert_array_equal(npz_l, ref_labels)
    np.testing.assert_array_equal(csv_l, npz_l)
    # the NPZ features are the CSV values cast to float32; the target is float64 in both
    np.testing.assert_array_equal(csv_v[:, :5].astype(np.float32), npz_v[:, :5].astype(np.float32))
    np.testing.assert_array_equal(csv_v[:, 5], npz_v[:, 5])


def test_dict_of_arrays_and_readers_agree_with_npz(law_npz_arrays, law_reference):
    ref_values, ref_labels = law_reference
    arrays = dict(law_npz_arrays)
    n = len(arrays["race1"])
    chunks = [{k: v[i:i + 777] for k, v in arrays.items()} for i in range(0, n, 777)]

    class Reader:
        def __iter__(self):
            return iter(chunks)

    def factory():
        for c in chunks:
            yield c

    sources = {
        "dict": arrays,
        "list": chunks,
        "reader": Reader(),
        "factory": factory,
    }
    for name, src in sources.items():
        table = open_table(src)
        assert isinstance(table, ArrayTable if name == "dict" else ReaderTable), name
        assert set(table.columns) == set(arrays), name
        for batch_size in (5, 4096):
            v, lab = collect(table, LAW_NUMERIC, "race1", batch_size)
            np.testing.assert_array_equal(v, ref_values, err_msg=name)
            np.testing.assert_array_equal(lab, ref_labels, err_msg=name)
        # a second pass gives the same rows again (re-iterable)
        v2, _ = collect(table, LAW_NUMERIC, "race1", 4096)
        np.testing.assert_array_equal(v2, ref_values, err_msg=name)


def test_two_dimensional_blocks_are_columns(law_npz_arrays, law_reference, tmp_path):
    ref_values, ref_labels = law_reference
    block = np.stack([law_npz_arrays[c] for c in LAW_FEATURES], axis=1)
    arrays = {"X": block, "race1": law_npz_arrays["race1"], "ugpa": law_npz_arrays["ugpa"]}
    np.savez(tmp_path / "block.npz", **arrays)
    names = [f"X_{j}" for j in range(5)] + ["ugpa"]
    for src in (arrays, tmp_path / "block.npz"):
        table = open_table(src)
        assert table.columns[:5] == tuple(names[:5])
        v, lab = collect(table, names, "race1", 1000)
        np.testing.assert_array_equal(v, ref_values)
        np.testing.assert_array_equal(lab, ref_labels)


def test_fortran_ordered_npz_block(tmp_path):
    block = np.asfortranarray(np.arange(30, dtype=np.float64).reshape(10, 3))
    np.savez(tmp_path / "f.npz", X=block, g=np.array(["a", "b"] * 5))
    v, lab = collect(open_table(tmp_path / "f.npz"), ["X_0", "X_1", "X_2"], "g", 3)
    np.testing.assert_array_equal(v, np.ascontiguousarray(block))
    np.testing.assert_array_equal(lab, ["a", "b"] * 5)


@pytest.mark.parametrize("source", ["csv", "npz"])
def test_batch_size_does_not_change_the_rows(source, tmp_path):
    if source == "csv":
        table = open_table(FIXTURES / "gemm_transb0_alpha.csv")
        sizes = (3, 64, 1999, 2000, 2001)
    else:
        np.savez(tmp_path / "gemm.npz", **load_table(FIXTURES / "gemm_transb0_alpha.csv"))
        table = open_table(tmp_path / "gemm.npz")
        sizes = (1, 3, 64, 1999, 2000, 2001)
    cols = [f"x{j}" for j in range(6)] + ["y"]
    whole, lab = collect(table, cols, "g", 10**6)
    assert whole.shape == (2000, 7)
    for bs in sizes:
        v, lab_b = collect(table, cols, "g", bs)
        np.testing.assert_array_equal(v, whole)
        np.testing.assert_array_equal(lab_b, lab)


def test_csv_crlf_line_endings(tmp_path):
    raw = load_table(FIXTURES / "gemm_transb0_alpha.csv")
    cols = [f"x{j}" for j in range(6)] + ["y"]
    unix = write_csv(tmp_path / "unix.csv", raw)
    dos = write_csv(tmp_path / "dos.csv", raw, newline="\r\n")
    v1, l1 = collect(open_table(unix), cols, "g", 300)
    v2, l2 = collect(open_table(dos), cols, "g", 300)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(l1, l2)
    assert open_table(dos).columns == open_table(unix).columns


def test_csv_blank_lines_do_not_end_the_data(tmp_path):
    """Blank lines are skipped wherever they are; they must not cut the file short at any batch size."""
    path = tmp_path / "blank.csv"
    path.write_text("x0,x1,g\n1,2,a\n\n\n3,4,b\n5,6,a\n\n7,8,b\n\n", encoding="utf-8")
    table = open_table(path)
    for bs in (1, 2, 3, 100):
        v, lab = collect(table, ["x0", "x1"], "g", bs)
        np.testing.assert_array_equal(v, [[1, 2], [3, 4], [5, 6], [7, 8]], err_msg=f"batch_size={bs}")
        np.testing.assert_array_equal(lab, ["a", "b", "a", "b"])


# ------------------------------------------------------------------------------------------------
# group labels


@pytest.mark.parametrize("values,expected", [
    (np.array([1, 0, 1]), ["1", "0", "1"]),
    (np.array([1.0, 0.0, 1.0]), ["1", "0", "1"]),
    (np.array([1, 0], dtype=np.int8), ["1", "0"]),
    (np.array([1.0, 0.0], dtype=np.float32), ["1", "0"]),
    (np.array(["1", "1.0", " 1", "0"]), ["1", "1", "1", "0"]),
    (np.array([b"1", b"0"]), ["1", "0"]),
    (np.array([0.5, 2.0]), ["0.5", "2"]),
    (np.array(["0.5", "2.00"]), ["0.5", "2"]),
    (np.array(["a", "b ", "a"]), ["a", "b", "a"]),
    (np.array(["black", "white"]), ["black", "white"]),
])
def test_label_normalisation(values, expected):
    got = normalise_labels(values)
    assert [str(x) for x in got] == expected


def test_labels_agree_across_storages(tmp_path):
    """1 (int in an NPZ), 1.0 (float in a dict) and "1" (text in a CSV) are the same group."""
    x = np.arange(6, dtype=np.float64)
    write_csv(tmp_path / "a.csv", {"x": x, "g": ["1", "0", "1.0", "0.0", "1", "0"]})
    np.savez(tmp_path / "b.npz", x=x, g=np.array([1, 0, 1, 0, 1, 0], dtype=np.int64))
    sources = [tmp_path / "a.csv", tmp_path / "b.npz", {"x": x, "g": np.array([1.0, 0.0] * 3)}]
    for src in sources:
        _, lab = collect(open_table(src), ["x"], "g", 4)
        assert list(lab) == ["1", "0"] * 3, src


def test_numeric_group_column_of_fixture():
    _, lab = collect(open_table(FIXTURES / "sigmoid_head.csv"), ["x0"], "g", 500)
    assert set(lab) == {"0", "1"}


def test_object_labels_refused():
    with pytest.raises(DataError):
        normalise_labels(np.array([1, "a"], dtype=object))


# ------------------------------------------------------------------------------------------------
# bad files: one clear message naming the file / line / column


def _err(src, numeric=("x0", "x1"), label="g", batch_size=2) -> str:
    with pytest.raises(DataError) as info:
        table = open_table(src)
        collect(table, list(numeric), label, batch_size)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def test_missing_file(tmp_path):
    msg = _err(tmp_path / "nosuch.csv")
    assert "nosuch.csv" in msg and "no such file" in msg


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "d.csv").mkdir()
    assert "d.csv" in _err(tmp_path / "d.csv")


def test_empty_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    msg = _err(tmp_path / "empty.csv")
    assert "empty.csv" in msg and "empty" in msg.replace("empty.csv", "")


def test_headerless_file(tmp_path):
    (tmp_path / "nohead.csv").write_text("1,2,3\n4,5,6\n")
    msg = _err(tmp_path / "nohead.csv")
    assert "nohead.csv" in msg and "header" in msg


def test_not_utf8(tmp_path):
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81x,y\n")
    assert "bin.csv" in _err(tmp_path / "bin.csv")


def test_unknown_extension(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    assert "data.parquet" in _err(tmp_path / "data.parquet")


@pytest.mark.parametrize("batch_size", [1, 2, 100])
@pytest.mark.parametrize("bad,what", [("abc", "abc"), ("", "empty"), ("1.2.3", "1.2.3")])
def test_non_numeric_value_names_line_and_column(tmp_path, batch_size, bad, what):
    path = tmp_path / "bad.csv"
    path.write_text(f"x0,x1,g\n1,2,a\n3,4,b\n5,6,a\n7,{bad},b\n9,10,a\n")
    msg = _err(path, batch_size=batch_size)
    assert "bad.csv" in msg and "line 5" in msg and "'x1'" in msg and what in msg


@pytest.mark.parametrize("batch_size", [1, 2, 100])
def test_line_numbers_count_blank_lines(tmp_path, batch_size):
    path = tmp_path / "bad.csv"
    path.write_text("x0,x1,g\n1,2,a\n\n3,4,b\n5,zz,a\n")
    msg = _err(path, batch_size=batch_size)
    assert "line 5" in msg and "'x1'" in msg and "zz" in msg


@pytest.mark.parametrize("batch_size", [1, 2, 100])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_value_in_csv_names_row_and_column(tmp_path, batch_size, bad):
    path = tmp_path / "nan.csv"
    path.write_text(f"x0,x1,g\n1,2,a\n3,4,b\n5,6,a\n7,{bad},b\n9,10,a\n")
    msg = _err(path, batch_size=batch_size)
    # line 5 of the file; in a spreadsheet that is row 5 too
    assert "nan.csv" in msg and ("line 5" in msg or "row 5" in msg) and "'x1'" in msg


@pytest.mark.parametrize("batch_size", [1, 2, 100])
def test_non_finite_value_in_npz_names_row_and_column(tmp_path, batch_size):
    x1 = np.arange(6, dtype=np.float64)
    x1[3] = np.inf
    np.savez(tmp_path / "nan.npz", x0=np.zeros(6), x1=x1, g=np.array(["a", "b"] * 3))
    msg = _err(tmp_path / "nan.npz", batch_size=batch_size)
    # row 3 counted from 0, or row 4 counted from 1
    assert "nan.npz" in msg and ("row 3" in msg or "row 4" in msg) and "'x1'" in msg


def test_non_finite_target_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("x0,x1,g,y\n1,2,a,1\n3,4,b,nan\n")
    msg = _err(path, numeric=("x0", "x1", "y"))
    assert "'y'" in msg and ("line 3" in msg or "row 3" in msg)


def test_missing_column(tmp_path):
    path = write_csv(tmp_path / "c.csv", {"x0": [1.0, 2.0], "g": ["a", "b"]})
    msg = _err(path, numeric=("x0", "nosuchcol"))
    assert "nosuchcol" in msg and "c.csv" in msg and "x0" in msg
    msg = _err(path, numeric=("x0",), label="grp")
    assert "grp" in msg


def test_missing_column_in_npz_and_arrays(tmp_path):
    np.savez(tmp_path / "c.npz", x0=np.zeros(3), g=np.array(["a", "b", "a"]))
    assert "nosuchcol" in _err(tmp_path / "c.npz", numeric=("nosuchcol",))
    assert "nosuchcol" in _err({"x0": np.zeros(3), "g": np.array(["a", "b", "a"])}, numeric=("nosuchcol",))


def test_too_few_fields(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("x0,x1,g\n1,2,a\n3,4\n")
    msg = _err(path)
    assert "short.csv" in msg and "line 3" in msg


def test_duplicate_and_unnamed_header_columns(tmp_path):
    (tmp_path / "dup.csv").write_text("x0,x0,g\n1,2,a\n")
    assert "x0" in _err(tmp_path / "dup.csv")
    (tmp_path / "unnamed.csv").write_text("x0,,g\n1,2,a\n")
    assert "unnamed.csv" in _err(tmp_path / "unnamed.csv")


def test_text_feature_column_in_npz_and_dict(tmp_path):
    np.savez(tmp_path / "s.npz", x0=np.array(["u", "v"]), x1=np.zeros(2), g=np.array(["a", "b"]))
    assert "x0" in _err(tmp_path / "s.npz")
    assert "x0" in _err({"x0": np.array(["u", "v"]), "x1": np.zeros(2), "g": np.array(["a", "b"])})


def test_npz_arrays_of_different_lengths(tmp_path):
    np.savez(tmp_path / "len.npz", x0=np.zeros(3), x1=np.zeros(4), g=np.array(["a", "b", "a"]))
    msg = _err(tmp_path / "len.npz")
    assert "len.npz" in msg and "x1" in msg


def test_not_an_npz(tmp_path):
    (tmp_path / "fake.npz").write_text("x0,x1,g\n")
    assert "fake.npz" in _err(tmp_path / "fake.npz")


UNPICKLED: list[str] = []


def _mark(value):
    UNPICKLED.append(value)
    return value


class _Payload:
    def __reduce__(self):
        return (_mark, ("unpickled",))


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "obj.npz"
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(), _Payload()], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x0.npy", _npy(np.zeros(2)))
        zf.writestr("x1.npy", buf.getvalue())
        zf.writestr("g.npy", _npy(np.array(["a", "b"])))
    UNPICKLED.clear()
    msg = _err(path)
    assert "obj.npz" in msg and "x1" in msg
    assert UNPICKLED == []
    # also when the object array is only the group column
    with zipfile.ZipFile(tmp_path / "objg.npz", "w") as zf:
        zf.writestr("x0.npy", _npy(np.zeros(2)))
        zf.writestr("x1.npy", _npy(np.zeros(2)))
        zf.writestr("g.npy", buf.getvalue())
    msg = _err(tmp_path / "objg.npz")
    assert "objg.npz" in msg and "'g'" in msg
    assert UNPICKLED == []


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_one_shot_iterator_refused():
    batches = [{"x0": np.zeros(3), "x1": np.ones(3), "g": np.array(["a", "b", "a"])}]
    for one_shot in (iter(batches), (b for b in batches), map(dict, batches)):
        with pytest.raises(DataError) as info:
            open_table(one_shot)
        assert "one-shot" in str(info.value) or "once" in str(info.value)


def test_one_shot_iterator_refused_by_repair():
    from onnx_esvd import repair

    rng = np.random.default_rng(0)
    batch = {f"x{j}": rng.normal(size=40) for j in range(6)}
    batch["g"] = np.array(["a", "b"] * 20)
    with pytest.raises(DataError, match="one-shot"):
        repair(FIXTURES / "gemm_transb0_alpha.onnx", iter([batch]), layer=1, group="g")


def test_empty_reader_refused():
    with pytest.raises(DataError):
        open_table([])


def test_reader_with_inconsistent_batch(tmp_path):
    good = {"x0": np.zeros(3), "x1": np.ones(3), "g": np.array(["a", "b", "a"])}
    bad = {"x0": np.zeros(2), "g": np.array(["a", "b"])}
    assert "x1" in _err([good, bad])


def test_unsupported_data_type():
    with pytest.raises(DataError):
        open_table(42)


# ------------------------------------------------------------------------------------------------
# property: any small table written as CSV reads back the same at any batch size

_finite = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e300, max_value=1e300)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_finite, _finite, st.sampled_from(["a", "b", "1", "2.0", "x y"])), min_size=1,
                     max_size=30),
       batch_size=st.integers(min_value=1, max_value=40))
def test_csv_round_trip_property(tmp_path, rows, batch_size):
    path = tmp_path / "prop.csv"
    text = "u,v,g\n" + "".join(f"{u!r},{v!r},{g}\n" for u, v, g in rows)
    path.write_text(text, encoding="utf-8")
    values, labels = collect(open_table(path), ["u", "v"], "g", batch_size)
    np.testing.assert_array_equal(values, np.array([[u, v] for u, v, _ in rows], dtype=np.float64))
    expected = [{"2.0": "2"}.get(g, g) for _, _, g in rows]
    assert list(labels) == expected
    # the same rows through the dict-of-arrays path
    arrays = {"u": values[:, 0], "v": values[:, 1], "g": np.array([g for _, _, g in rows])}
    v2, l2 = collect(open_table(arrays), ["u", "v"], "g", batch_size)
    np.testing.assert_array_equal(v2, values)
    assert list(l2) == expected


def test_keep_reads_only_the_selected_rows_with_their_indices(tmp_path):
    """Later passes ask for some rows only: a CSV parses just those, with the right global indices and
    line numbers, and every table type returns the same rows as a full read."""
    from onnx_esvd.data import ArrayTable, open_table

    lines = ["a,b,g"] + [f"{i},{2 * i},{'x' if i % 3 else 'y'}" for i in range(50)]
    lines.insert(10, "")  # a blank line is not a row
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    full = np.concatenate([b.values for b in open_table(path).batches(["a", "b"], 7, text=["g"])])

    def keep(start, n):
        return (np.arange(start, start + n) % 4) == 1

    for table in (open_table(path), ArrayTable({"a": full[:, 0], "b": full[:, 1], "g": np.array(["x"] * 50)})):
        batches = list(table.batches(["a", "b"], 7, keep=keep))
        index = np.concatenate([b.row_index() for b in batches])
        values = np.concatenate([b.values for b in batches])
        assert np.array_equal(index, np.flatnonzero(np.arange(50) % 4 == 1))
        assert np.array_equal(values, full[index])
    csv_lines = np.concatenate([b.lines for b in open_table(path).batches(["a"], 7, keep=keep)])
    # rows 0..8 are on lines 2..10, the blank line is line 11, so row r >= 9 is on line r + 3
    assert np.array_equal(csv_lines, [r + 2 if r < 9 else r + 3 for r in np.flatnonzero(np.arange(50) % 4 == 1)])
