"""Files as users export them (pandas `to_csv` / `to_parquet`, Excel, booleans): each is read right or refused
with a line that says what to do, and every report says when the features were fed by position.

The expected metrics are computed here from the CSV module's parse and a plain onnxruntime session."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnxruntime as ort
import pytest
from scipy.stats import ks_2samp

from conftest import CASES, assert_bad_input, invoke
from onnx_esvd import DataError, audit, check

GEMM = CASES["gemm_transb0_alpha.onnx"]
COLUMNS = [f"x{j}" for j in range(6)]


def _rows():
    with open(GEMM.data_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    x = np.array([[float(r[c]) for c in COLUMNS] for r in rows], dtype=np.float32)
    return rows, x, np.array([r["g"] for r in rows]), np.array([float(r["y"]) for r in rows])


def _expected_ks():
    _rows_, x, g, _y = _rows()
    sess = ort.InferenceSession(str(GEMM.path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0][:, 0].astype(np.float64)
    return ks_2samp(out[g == "a"], out[g == "b"]).statistic


# ------------------------------------------------------------------------------------------------
# every report says the columns were fed by position (audit and check said nothing)


def test_audit_and_check_say_when_features_were_fed_in_file_order(tmp_path):
    note = "no columns are named after model input 'input', so it was fed the columns in file order (x0, x1, x2"
    report = audit(GEMM.path, GEMM.data_path, group="g", target="y")
    assert any(note in w for w in report.warnings), report.warnings
    gate = check(GEMM.path, GEMM.data_path, group="g", target="y", max_ks=1.0, bootstrap=0)
    assert any(note in w for w in gate.to_dict()["warnings"])
    cli = invoke("check", GEMM.path, "--data", GEMM.data_path, "--group", "g", "--target", "y", "--max-ks", "1",
                 "-q", "--bootstrap", "0")
    assert cli.exit_code == 0 and f"warning: {GEMM.data_path}: {note}" in cli.stdout
    text = invoke("audit", GEMM.path, "--data", GEMM.data_path, "--group", "g", "--target", "y", "-q")
    assert text.exit_code == 0 and note in text.stdout
    named = tmp_path / "named.csv"  # columns named after the input: no warning
    lines = GEMM.data_path.read_text().splitlines()
    named.write_text("\n".join([",".join([f"input_{j}" for j in range(6)] + ["g", "y"])] + lines[1:]) + "\n")
    assert check(GEMM.path, named, group="g", target="y", max_ks=1.0, bootstrap=0).to_dict()["warnings"] == []


def test_check_counts_rows_dropped_for_a_missing_value(tmp_path):
    lines = GEMM.data_path.read_text().splitlines()
    cells = lines[5].split(",")
    cells[2] = ""
    lines[5] = ",".join(cells)
    data = tmp_path / "gap.csv"
    data.write_text("\n".join(lines) + "\n")
    gate = check(GEMM.path, data, group="g", features=COLUMNS, max_ks=1.0, bootstrap=0, dropna=True)
    assert any("1 rows with a missing value were skipped (--dropna)" in w for w in gate.to_dict()["warnings"])


# ------------------------------------------------------------------------------------------------
# pandas' index, in CSV and Parquet


def test_pandas_to_csv_index_column_is_refused_with_the_fix(tmp_path):
    pd = pytest.importorskip("pandas")
    data = tmp_path / "index.csv"
    pd.read_csv(GEMM.data_path).to_csv(data)  # pandas' default: the row index as an unnamed first column
    result = invoke("audit", GEMM.path, "--data", data, "--group", "g", "--target", "y", "-q")
    assert_bad_input(result, "column 1 of the header has no name", "save with index=False")


def test_parquet_with_a_named_pandas_index_reads_it_by_name_only(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frame = pd.read_csv(GEMM.data_path)
    by_group = tmp_path / "by_group.parquet"
    frame.set_index("g").to_parquet(by_group)  # the group column became the index
    expected = _expected_ks()
    got = audit(GEMM.path, by_group, group="g", target="y")
    assert got.metrics.ks == pytest.approx(expected, abs=1e-12) and got.rows == len(frame)
    ids = tmp_path / "ids.parquet"
    indexed = frame.copy()
    indexed.index = pd.Index(np.arange(len(frame)) * 7 + 1000, name="row_id")
    indexed.to_parquet(ids)  # a named id index: never a feature, even when features go by position
    measured = check(GEMM.path, ids, group="g", target="y", max_ks=1.0, bootstrap=0)
    assert measured.metrics.ks == pytest.approx(expected, abs=1e-12)
    assert "(x0, x1, x2, x3, x4, x5)" in " ".join(measured.to_dict()["warnings"])
    filtered = tmp_path / "filtered.parquet"
    frame[frame["x0"] > -10].to_parquet(filtered)  # pandas stores this index as '__index_level_0__': not a column
    assert check(GEMM.path, filtered, group="g", target="y", max_ks=1.0, bootstrap=0).metrics.ks == \
        pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# booleans


def test_true_false_in_a_csv_number_column_says_to_write_1_and_0(tmp_path):
    rows, *_ = _rows()
    data = tmp_path / "bool.csv"
    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS + ["g", "passed"])
        for r in rows:
            w.writerow([r[c] for c in COLUMNS] + [r["g"], float(r["y"]) > 0])
    with pytest.raises(DataError, match=r"line 2, column 'passed' holds '(True|False)', not a number; write a "
                                        r"yes/no column as 1 and 0"):
        audit(GEMM.path, data, group="g", target="passed")


def test_boolean_target_in_parquet_is_read_as_1_and_0(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    rows, x, g, y = _rows()
    frame = pd.DataFrame(x.astype(np.float64), columns=COLUMNS).assign(g=g, passed=y > 0)
    frame.to_parquet(tmp_path / "bool.parquet")
    sess = ort.InferenceSession(str(GEMM.path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0][:, 0].astype(np.float64)
    got = audit(GEMM.path, tmp_path / "bool.parquet", group="g", target="passed")
    assert got.metrics.mse == pytest.approx(np.mean((out - (y > 0)) ** 2), rel=1e-9)
    assert json.loads(json.dumps(got.to_dict()))["metrics"]["mse"] == pytest.approx(got.metrics.mse)


# ------------------------------------------------------------------------------------------------
# Excel


def test_excel_sep_line_names_the_delimiter(tmp_path):
    """Excel may write `sep=;` before the header; it was taken for the header ("no group column 'g' (columns:
    sep=;)")."""
    lines = GEMM.data_path.read_text().splitlines()
    data = tmp_path / "excel.csv"
    data.write_bytes(("sep=;\r\n" + "\r\n".join(line.replace(",", ";") for line in lines) + "\r\n").encode())
    got = audit(GEMM.path, data, group="g", target="y")
    assert got.metrics.ks == pytest.approx(_expected_ks(), abs=1e-12) and got.rows == len(lines) - 1
    semi = [line.replace(",", ";") for line in lines]
    semi[3] = semi[3].replace(".", ",", 1)  # a decimal comma on the file's line 5 (after the sep line)
    data.write_text("sep=;\n" + "\n".join(semi) + "\n")
    with pytest.raises(DataError, match=r"line 5, column 'x0' holds '[-\d]+,\d+', a decimal comma"):
        audit(GEMM.path, data, group="g", target="y")


def test_dataframe_with_a_named_index_reads_it_by_name_only():
    """`repair(model, df.set_index("g"), group="g")` said "no group column 'g'"; a named id index must never be fed
    as a feature."""
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(GEMM.data_path)
    expected = _expected_ks()
    assert audit(GEMM.path, frame.set_index("g"), group="g", target="y").metrics.ks == pytest.approx(expected,
                                                                                                    abs=1e-12)
    assert audit(GEMM.path, frame.set_index(["g", "y"]), group="g", target="y").metrics.ks == \
        pytest.approx(expected, abs=1e-12)
    ids = frame.rename_axis("row_id")
    got = audit(GEMM.path, ids, group="g", target="y")
    assert got.metrics.ks == pytest.approx(expected, abs=1e-12)
    assert "(x0, x1, x2, x3, x4, x5)" in " ".join(got.warnings)


def test_a_column_name_with_a_trailing_space_is_named_in_the_message():
    """A Parquet or DataFrame column 'g ' (a space the list of columns hides): "no group column 'g' (columns: ...,
    g , ...)" looked like a lie; the message must point at the near miss."""
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(GEMM.data_path).rename(columns={"g": "g "})
    with pytest.raises(DataError, match=r"no group column 'g' .*; the data has 'g ', which differs only in spaces or "
                                        r"case"):
        audit(GEMM.path, frame, group="g", target="y")
    with pytest.raises(DataError, match=r"no feature column 'X0' .*the data has 'x0'"):
        audit(GEMM.path, frame.rename(columns={"g ": "g"}), group="g", target="y", features=["X0"] + COLUMNS[1:])
