"""Data sources (onnx_esvd.sources): every equivalent input gives the same float64 batches; the CSV
dialects, compressions, Parquet, DataFrames and Arrow tables; missing values; broken files named."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from onnx_esvd.data import Batch, normalise_labels, open_table
from onnx_esvd.errors import DataError

N = 203
RNG = np.random.default_rng(7)
X0 = RNG.normal(size=N) * 1e3
X1 = RNG.normal(size=N) / 7
Y = RNG.integers(-5, 5, size=N).astype(np.float64)
G = np.where(RNG.random(N) < 0.4, "left", "right")
COLS = ["x0", "x1", "y"]
EXPECTED = np.stack([X0, X1, Y], axis=1)


def _text(delimiter=",", newline="\n", bom=False) -> str:
    lines = [delimiter.join(["x0", "x1", "g", "y"])]
    lines += [delimiter.join([repr(float(a)), repr(float(b)), g, str(int(y))]) for a, b, g, y in zip(X0, X1, G, Y)]
    return ("\ufeff" if bom else "") + newline.join(lines) + newline


def read_all(table, numeric=COLS, text=("g",), batch_size=50, **kw):
    """Concatenated values, {text column: values}, global row indices and the dropped count."""
    values, texts, index, dropped = [], {c: [] for c in text}, [], 0
    for b in table.batches(list(numeric), batch_size, text=list(text), **kw):
        assert isinstance(b, Batch) and b.values.dtype == np.float64 and b.values.shape[1] == len(numeric)
        values.append(b.values)
        index.append(b.row_index())
        dropped += b.dropped
        for c in text:
            assert len(b.text[c]) == b.values.shape[0]
            texts[c].append(np.asarray(b.text[c]).astype(str))
    cat = {c: np.concatenate(v) if v else np.zeros(0, str) for c, v in texts.items()}
    return np.concatenate(values), cat, np.concatenate(index), dropped


def _err(src, numeric=COLS, text=("g",), batch_size=50, **kw) -> str:
    with pytest.raises(DataError) as info:
        read_all(open_table(src), numeric, text, batch_size, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


# ------------------------------------------------------------------------------------------------
# every equivalent input gives identical float64 batches


def _text_sources(tmp: Path) -> dict[str, Path]:
    out = {}
    (tmp / "plain.csv").write_text(_text(), encoding="utf-8")
    out["plain"] = tmp / "plain.csv"
    (tmp / "excel.csv").write_bytes(_text(newline="\r\n", bom=True).encode("utf-8"))
    out["bom+crlf"] = tmp / "excel.csv"
    for suffix, opener in ((".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)):
        with opener(tmp / f"c.csv{suffix}", "wt", encoding="utf-8") as f:
            f.write(_text())
        out[suffix] = tmp / f"c.csv{suffix}"
    (tmp / "gzip_named.csv").write_bytes(gzip.compress(_text().encode()))
    out["gzip content, .csv name"] = tmp / "gzip_named.csv"
    (tmp / "t.tsv").write_text(_text("\t"))
    out["tsv"] = tmp / "t.tsv"
    (tmp / "semi.csv").write_text(_text(";"))
    out["semicolon"] = tmp / "semi.csv"
    (tmp / "pipe.txt").write_text(_text("|"))
    out["pipe"] = tmp / "pipe.txt"
    (tmp / "tab.csv").write_text(_text("\t"))
    out["tab in .csv"] = tmp / "tab.csv"
    with gzip.open(tmp / "t.tsv.gz", "wt") as f:
        f.write(_text("\t", bom=True))
    out["tsv.gz+bom"] = tmp / "t.tsv.gz"
    return out


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_every_text_dialect_gives_the_same_batches(tmp_path, batch_size):
    for name, path in _text_sources(tmp_path).items():
        table = open_table(path)
        assert table.columns == ("x0", "x1", "g", "y"), name
        values, text, index, dropped = read_all(table, batch_size=batch_size)
        np.testing.assert_array_equal(values, EXPECTED, err_msg=name)
        np.testing.assert_array_equal(text["g"], G, err_msg=name)
        np.testing.assert_array_equal(index, np.arange(N), err_msg=name)
        assert dropped == 0


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_binary_and_in_memory_sources_give_the_same_batches(tmp_path, batch_size):
    arrays = {"x0": X0, "x1": X1, "g": G, "y": Y.astype(np.int64)}
    np.savez(tmp_path / "a.npz", **arrays)
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    sources = {"dict": arrays, "npz": tmp_path / "a.npz", "npz deflated": tmp_path / "c.npz"}
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    df = pd.DataFrame(arrays)
    sources["DataFrame"] = df
    sources["DataFrame category"] = df.assign(g=df["g"].astype("category"))
    sources["DataFrame string"] = df.assign(g=df["g"].astype("string"), y=df["y"].astype("Int64"))
    table = pa.Table.from_pandas(df, preserve_index=False)
    sources["arrow"] = table
    sources["arrow RecordBatch"] = table.combine_chunks().to_batches()[0]
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=64)
    sources["parquet"] = tmp_path / "p.parquet"
    dict_table = table.set_column(2, "g", table.column("g").dictionary_encode())
    pq.write_table(dict_table, tmp_path / "d.pq", row_group_size=50)
    sources["parquet dictionary"] = tmp_path / "d.pq"
    df.to_parquet(tmp_path / "indexed.parquet", index=True)  # a stored pandas index is not a column
    sources["parquet with index"] = tmp_path / "indexed.parquet"
    for name, src in sources.items():
        t = open_table(src)
        assert set(t.columns) == {"x0", "x1", "g", "y"}, name
        values, text, index, _ = read_all(t, batch_size=batch_size)
        np.testing.assert_array_equal(values, EXPECTED, err_msg=name)
        np.testing.assert_array_equal(text["g"], G, err_msg=name)
        np.testing.assert_array_equal(index, np.arange(N), err_msg=name)


def test_numbers_as_text_compare_equal_after_normalising(tmp_path):
    """A group column stored as 1/0 numbers, 1.0/0.0 floats or "1"/"0" text gives the same labels."""
    g = np.array([1, 0, 1, 1, 0])
    (tmp_path / "g.csv").write_text("x,g\n" + "".join(f"{i},{v}\n" for i, v in enumerate(["1", "0", "1.0", "1", "0"])))
    sources = [tmp_path / "g.csv", {"x": np.arange(5.0), "g": g}, {"x": np.arange(5.0), "g": g.astype(float)}]
    pd = pytest.importorskip("pandas")
    sources.append(pd.DataFrame({"x": np.arange(5.0), "g": pd.Series(g).astype("category")}))
    for src in sources:
        _, text, _, _ = read_all(open_table(src), ["x"])
        assert list(normalise_labels(text["g"])) == ["1", "0", "1", "1", "0"], src


def test_integer_labels_above_2_53_stay_apart(tmp_path):
    big = np.array([2**53, 2**53 + 1, 2**53, 2**62 + 1], dtype=np.int64)
    np.savez(tmp_path / "big.npz", x=np.zeros(4), g=big)
    (tmp_path / "big.csv").write_text("x,g\n" + "".join(f"0,{v}\n" for v in big))
    want = [str(int(v)) for v in big]
    for src in (tmp_path / "big.npz", tmp_path / "big.csv", {"x": np.zeros(4), "g": big}):
        _, text, _, _ = read_all(open_table(src), ["x"])
        assert list(normalise_labels(text["g"])) == want, src


def test_text_comes_back_as_stored_and_a_column_can_be_both(tmp_path):
    (tmp_path / "q.csv").write_text('x,g,name\n1," b ","a, quoted"\n2,c ,"say ""hi"""\n')
    values, text, _, _ = read_all(open_table(tmp_path / "q.csv"), ["x"], ("g", "name", "x"))
    assert list(text["g"]) == [" b ", "c "]
    assert list(text["name"]) == ["a, quoted", 'say "hi"']
    assert list(text["x"]) == ["1", "2"] and list(values[:, 0]) == [1.0, 2.0]


# ------------------------------------------------------------------------------------------------
# CSV dialect details


def test_decimal_comma_is_refused_with_a_hint(tmp_path):
    (tmp_path / "eu.csv").write_text("x0;x1;g;y\n1,5;2;a;1\n3;4,25;b;0\n")
    msg = _err(tmp_path / "eu.csv")
    assert "eu.csv" in msg and "line 2" in msg and "'x0'" in msg and "decimal" in msg


def test_quoted_newlines_span_lines_and_keep_line_numbers(tmp_path):
    path = tmp_path / "ml.csv"
    path.write_text('x0,note,g\n1,"two\nlines",a\n2,plain,b\n3,"three\n\nlines",a\n4,x,b\n5,ok,zz\n')
    for bs in (1, 2, 100):
        values, text, index, _ = read_all(open_table(path), ["x0"], ("note", "g"), batch_size=bs)
        assert list(values[:, 0]) == [1, 2, 3, 4, 5]
        assert list(text["note"]) == ["two\nlines", "plain", "three\n\nlines", "x", "ok"]
        assert list(index) == [0, 1, 2, 3, 4]
    path.write_text('x0,note,g\n1,"two\nlines",a\n2,plain,b\n3,"three\n\nlines",a\nbad,x,b\n')
    assert "line 8" in _err(path, ["x0"], ("g",), batch_size=2)


def test_unclosed_quote_names_its_line(tmp_path):
    (tmp_path / "open.csv").write_text('x0,note,g\n1,ok,a\n2,"never closed,b\n3,x,a\n')
    msg = _err(tmp_path / "open.csv", ["x0"])
    assert "open.csv" in msg and "line 3" in msg and "quote" in msg


def test_huge_header_field_is_one_line(tmp_path):
    (tmp_path / "huge.csv").write_text('"' + "h" * 200_000 + '",g\n1,a\n')
    assert "huge.csv" in _err(tmp_path / "huge.csv", ["g"], ())


@pytest.mark.parametrize("compress", [False, True])
def test_invalid_utf8_names_the_line(tmp_path, compress):
    body = _text().encode().splitlines(keepends=True)
    body[150] = body[150].replace(b"left", b"l\xe9ft").replace(b"right", b"r\xe9ght")
    data = b"".join(body)
    path = tmp_path / ("bad.csv.gz" if compress else "bad.csv")
    path.write_bytes(gzip.compress(data) if compress else data)
    msg = _err(path, batch_size=64)
    assert "bad.csv" in msg and "line 151" in msg and "UTF-8" in msg


def test_corrupt_compressed_files(tmp_path):
    data = gzip.compress(_text().encode())
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) // 2])
    assert "cut.csv.gz" in _err(tmp_path / "cut.csv.gz")
    (tmp_path / "fake.csv.gz").write_text(_text())
    assert "fake.csv.gz" in _err(tmp_path / "fake.csv.gz")
    (tmp_path / "cut.csv.xz").write_bytes(lzma.compress(_text().encode())[:300])
    assert "cut.csv.xz" in _err(tmp_path / "cut.csv.xz")


def test_utf16_file_is_refused(tmp_path):
    (tmp_path / "u16.csv").write_bytes(_text().encode("utf-16"))
    assert "UTF-16" in _err(tmp_path / "u16.csv")


def test_non_regular_files_are_refused_without_reading(tmp_path):
    import signal

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)

    def hang(*_):
        raise AssertionError("reading a FIFO or device blocked")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)  # opening a FIFO for reading blocks forever; fail instead of hanging
    try:
        msg = _err(fifo)
        assert "pipe.csv" in msg and "regular file" in msg
        if os.path.exists("/dev/zero"):
            assert "regular file" in _err("/dev/zero")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_bad_options_are_option_errors(tmp_path):
    from onnx_esvd.errors import OptionError

    (tmp_path / "p.csv").write_text(_text())
    with pytest.raises(OptionError, match="missing"):
        list(open_table(tmp_path / "p.csv").batches(COLS, 10, missing="drop"))
    with pytest.raises(OptionError, match="batch_size"):
        list(open_table(tmp_path / "p.csv").batches(COLS, 0))


# ------------------------------------------------------------------------------------------------
# missing values


def _holey_csv(tmp: Path) -> Path:
    rows = ["x0,x1,g,y", "1,2,a,0", ",3,b,1", "4,NA,a,0", "5,6,,1", "7,null,b,0", "8,9,b, nan ", "10,11,a,1",
            "", "12,13,b,0", "14,N/A,a,1"]
    (tmp / "holes.csv").write_text("\n".join(rows) + "\n")
    return tmp / "holes.csv"


def test_missing_value_error_names_line_and_column(tmp_path):
    msg = _err(_holey_csv(tmp_path))
    assert "holes.csv" in msg and "line 3" in msg and "'x0'" in msg and "--dropna" in msg


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_skip_drops_rows_with_any_missing_value(tmp_path, batch_size):
    path = _holey_csv(tmp_path)
    values, text, index, dropped = read_all(open_table(path), batch_size=batch_size, missing="skip")
    assert list(index) == [0, 6, 7]  # the blank line is not a row
    np.testing.assert_array_equal(values, [[1, 2, 0], [10, 11, 1], [12, 13, 0]])
    assert list(text["g"]) == ["a", "a", "b"] and dropped == 6
    # only the requested columns count: without g and y, rows 3 (empty g) and 5 (nan y) stay
    _, _, index, dropped = read_all(open_table(path), ["x0"], (), batch_size=batch_size, missing="skip")
    assert list(index) == [0, 2, 3, 4, 5, 6, 7, 8] and dropped == 1


def test_skip_with_keep_counts_only_kept_rows(tmp_path):
    path = _holey_csv(tmp_path)

    def keep(start, n):
        return np.arange(start, start + n) % 2 == 0

    for bs in (2, 100):
        _, _, index, dropped = read_all(open_table(path), batch_size=bs, keep=keep, missing="skip")
        assert list(index) == [0, 6] and dropped == 3  # kept rows 0, 2, 4, 6, 8; 2, 4, 8 have holes


def test_inf_is_an_error_even_when_skipping(tmp_path):
    (tmp_path / "inf.csv").write_text("x0,x1,g,y\n1,2,a,0\n,2,a,0\n3,inf,b,1\n")
    msg = _err(tmp_path / "inf.csv", missing="skip")
    assert "line 4" in msg and "'x1'" in msg


def test_missing_in_binary_and_in_memory_sources(tmp_path):
    x0 = np.array([1.0, np.nan, 3.0, 4.0, 5.0])
    g = np.array(["a", "b", "", "a", "b"])
    arrays = {"x0": x0, "x1": np.arange(5.0), "g": g, "y": np.zeros(5)}
    np.savez(tmp_path / "m.npz", **arrays)
    sources = {"dict": arrays, "npz": tmp_path / "m.npz"}
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    df = pd.DataFrame({"x0": pd.array([1, None, 3, 4, 5], dtype="Int64"), "x1": np.arange(5.0),
                       "g": pd.array(["a", "b", None, "a", "b"], dtype="string"), "y": np.zeros(5)})
    sources["DataFrame NA"] = df
    sources["DataFrame object None"] = df.assign(g=np.array(["a", "b", None, "a", "b"], dtype=object))
    sources["DataFrame category"] = df.assign(g=df["g"].astype("category"))
    table = pa.table({"x0": pa.array([1, None, 3, 4, 5], pa.int32()), "x1": np.arange(5.0),
                      "g": pa.array(["a", "b", None, "a", "b"]).dictionary_encode(), "y": np.zeros(5)})
    sources["arrow"] = table
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=2)
    sources["parquet"] = tmp_path / "m.parquet"
    for name, src in sources.items():
        msg = _err(src, batch_size=2)
        assert "row 2" in msg and "'x0'" in msg, name
        for bs in (1, 2, 10):
            values, text, index, dropped = read_all(open_table(src), batch_size=bs, missing="skip")
            assert list(index) == [0, 3, 4] and dropped == 2, name
            assert list(values[:, 0]) == [1, 4, 5] and list(text["g"]) == ["a", "a", "b"], name


# ------------------------------------------------------------------------------------------------
# NPZ details


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_fortran_npz_is_streamed_by_column(tmp_path, save):
    block = np.asfortranarray(RNG.normal(size=(1001, 4)))
    save(tmp_path / "f.npz", X=block, g=np.array(["a", "b", "c"] * 333 + ["a", "b"]))
    for bs in (1, 64, 5000):
        values, _, index, _ = read_all(open_table(tmp_path / "f.npz"), ["X_3", "X_0"], ("g",), batch_size=bs)
        np.testing.assert_array_equal(values, block[:, [3, 0]])
        assert list(index) == list(range(1001))


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_npz_header_claiming_more_than_stored_is_refused(tmp_path):
    header = _npy(np.zeros((2**28, 2)))[:128]  # the header of a 4 GiB array, with 8 bytes of data
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as zf:
        zf.writestr("X.npy", header + b"\0" * 8)
    msg = _err(tmp_path / "liar.npz", ["X_0"], ())
    assert "liar.npz" in msg and "'X'" in msg


def test_corrupt_npz_members(tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.arange(1000.0), g=np.array(["a", "b"] * 500))
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    assert "cut.npz" in _err(tmp_path / "cut.npz", ["x"])
    flipped = bytearray(raw)
    pos = raw.index(np.arange(1000.0)[500:501].tobytes())
    flipped[pos] ^= 0xFF  # the data changes but the CRC stored in the archive does not
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    msg = _err(tmp_path / "crc.npz", ["x"], batch_size=100)
    assert "crc.npz" in msg and "'x'" in msg
    with zipfile.ZipFile(tmp_path / "hdr.npz", "w") as zf:
        zf.writestr("x.npy", b"\x93NUMPY\x01\x00" + b"garbage")
    assert "hdr.npz" in _err(tmp_path / "hdr.npz", ["x"])


# ------------------------------------------------------------------------------------------------
# Parquet / DataFrame / Arrow specifics


def test_parquet_without_pyarrow_gives_the_install_hint(tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    msg = _err(tmp_path / "p.parquet")
    assert "pip install 'onnx-esvd[parquet]'" in msg


def test_parquet_is_read_batch_by_batch(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"x0": X0, "x1": X1, "g": G, "y": Y}), tmp_path / "p.parquet", row_group_size=40)
    sizes = [b.values.shape[0] for b in open_table(tmp_path / "p.parquet").batches(COLS, 16, text=["g"])]
    assert max(sizes) <= 16 and sum(sizes) == N
    assert "p.parquet" in _err(tmp_path / "p.parquet", ["g"], ())  # text is not a number


def test_one_shot_arrow_reader_is_refused_but_a_factory_works():
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"x0": X0, "x1": X1, "g": G, "y": Y})
    with pytest.raises(DataError, match="Table"):
        open_table(pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=50)))
    factory = lambda: pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=50))  # noqa
    for _ in range(2):
        values, text, _, _ = read_all(open_table(factory))
        np.testing.assert_array_equal(values, EXPECTED)
        np.testing.assert_array_equal(text["g"], G)


def test_dataframe_text_column_as_a_number_is_refused():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"x0": ["1", "2"], "x1": [1.0, 2.0], "g": ["a", "b"], "y": [0, 1]})
    msg = _err(df)
    assert "x0" in msg and "DataFrame" in msg


def test_plain_runs_do_not_import_pandas_or_pyarrow(tmp_path):
    (tmp_path / "p.csv").write_text(_text())
    code = ("import sys, numpy as np; from onnx_esvd.data import open_table; "
            f"t = open_table({str(tmp_path / 'p.csv')!r}); list(t.batches(['x0'], 10, text=['g'])); "
            "list(open_table({'x0': np.zeros(3), 'g': np.array(['a', 'b', 'a'])}).batches(['x0'], 2, text=['g'])); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pandas', 'pyarrow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_rows_with_extra_or_missing_fields_are_refused(tmp_path):
    """An unquoted decimal comma in a comma file would shift the fields of its row: never read it."""
    (tmp_path / "shift.csv").write_text("x0,x1,g,y\n1,2,a,0\n1,5,2,b,1\n3,4,a,0\n")
    msg = _err(tmp_path / "shift.csv", ["x0"], (), batch_size=10)
    assert "line 3" in msg and "5 fields" in msg and "4" in msg
    (tmp_path / "short.csv").write_text("x0,x1,g,y\n1,2,a,0\n1,2,b\n")
    assert "line 3" in _err(tmp_path / "short.csv", ["x0"], ())


def test_parquet_nested_column_is_refused_in_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"x0": [1.0, 2.0], "g": pa.array([[1], [2, 3]])}), tmp_path / "n.parquet")
    assert "'g'" in _err(tmp_path / "n.parquet", ["x0"], ("g",))
    assert "'g'" in _err(tmp_path / "n.parquet", ["g"], ())


# ------------------------------------------------------------------------------------------------
# property: any small table, written in any dialect the csv module produces, reads back the same

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
_labels = st.sampled_from(["a", "b b", "x,y", "p;q", "t\tu", "pipe|d", 'say "hi"', "two\nlines", "1", "é"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_finite, _finite, _labels), min_size=1, max_size=25),
       delimiter=st.sampled_from([",", ";", "\t", "|"]), newline=st.sampled_from(["\n", "\r\n"]),
       bom=st.booleans(), compression=st.sampled_from(["", ".gz", ".bz2", ".xz"]),
       batch_size=st.integers(min_value=1, max_value=30))
def test_csv_dialect_round_trip_property(tmp_path, rows, delimiter, newline, bom, compression, batch_size):
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator=newline)
    writer.writerow(["u", "v", "g"])
    writer.writerows([repr(u), repr(v), g] for u, v, g in rows)
    data = (("\ufeff" if bom else "") + buf.getvalue()).encode("utf-8")
    compress = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[compression]
    path = tmp_path / f"prop.csv{compression}"
    path.write_bytes(compress(data))
    values, text, index, _ = read_all(open_table(path), ["u", "v"], ("g",), batch_size=batch_size)
    np.testing.assert_array_equal(values, np.array([[u, v] for u, v, _ in rows], dtype=np.float64))
    assert list(text["g"]) == [g for _, _, g in rows]
    assert list(index) == list(range(len(rows)))


def test_fortran_npz_is_never_read_whole(tmp_path, monkeypatch):
    block = np.asfortranarray(np.arange(300_000 * 4, dtype=np.float64).reshape(300_000, 4))
    np.savez(tmp_path / "big.npz", X=block)
    requests = []
    original = zipfile.ZipExtFile.read

    def read(self, n=-1):
        requests.append(n)
        return original(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    total = 0
    for b in open_table(tmp_path / "big.npz").batches(["X_2"], 1000):
        np.testing.assert_array_equal(b.values[:, 0], block[b.start:b.start + 1000, 2])
        total += len(b.values)
    assert total == 300_000
    assert -1 not in requests and max(requests) < block.nbytes // 2
