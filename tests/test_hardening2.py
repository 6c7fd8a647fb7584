"""Hardening, round 2: non-finite numbers, output paths around external data, one stderr line, special files."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import FIXTURES, assert_bad_input, invoke, sha256
from onnx_esvd import LayerError, ModelError, OutputError, check, repair
from onnx_esvd.modelio import check_output_path, load_model, save_model

SMALL = FIXTURES / "gemm_transb0_alpha.onnx"
SMALL_CSV = FIXTURES / "gemm_transb0_alpha.csv"
F16 = FIXTURES / "float16_weights.onnx"
F16_CSV = FIXTURES / "float16_weights.csv"
COLS = ("--group", "g", "--target", "y")


def _csv_with(tmp_path: Path, src: Path, column: str, value: str, rows: range, name: str = "d.csv") -> Path:
    lines = src.read_text().splitlines()
    col = lines[0].split(",").index(column)
    for i in rows:
        cells = lines[i].split(",")
        cells[col] = value
        lines[i] = ",".join(cells)
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _with_weight(src: Path, name: str, fill: float, dest: Path) -> Path:
    model = onnx.load(str(src))
    for t in model.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            arr[...] = fill
            t.CopyFrom(numpy_helper.from_array(arr, name))
    dest.write_bytes(model.SerializeToString())
    return dest


def _repair_cli(tmp_path, model=SMALL, data=SMALL_CSV, *extra):
    return invoke("repair", model, "--layer", "-2", "--data", data, *COLS, "-q", *extra)


# --- 1. non-finite or unrepresentable numbers ------------------------------------------------------


def test_huge_target_is_refused_instead_of_writing_inf_weights(tmp_path):
    data = _csv_with(tmp_path, SMALL_CSV, "y", "1e200", range(1, 40))
    out = tmp_path / "o.onnx"
    line = assert_bad_input(_repair_cli(tmp_path, SMALL, data, "-o", out), "final node 'Gemm_2'",
                            "rescale the target column")
    assert "nothing was written" in line
    assert not out.exists()


def test_float16_overflow_of_the_refit_is_refused(tmp_path):
    data = _csv_with(tmp_path, F16_CSV, "y", "1e30", range(1, 40))
    out = tmp_path / "o.onnx"
    assert_bad_input(_repair_cli(tmp_path, F16, data, "-o", out), "beyond the largest float16")
    assert not out.exists()


def test_writer_never_stores_a_non_finite_or_overflowing_weight():
    from onnx_esvd.graph import find_layers, write_weight

    model = onnx.load(str(F16))
    layer = find_layers(model).layers[-1]
    before = model.SerializeToString()
    w = np.zeros((layer.out_features, layer.in_features))
    for bad in (np.inf, np.nan, 1e6):
        w[0, 0] = bad
        with pytest.raises(LayerError, match="nothing was written"):
            write_weight(model, layer, w)
    assert model.SerializeToString() == before


def test_check_on_a_nan_model_is_an_error_not_a_pass(tmp_path):
    path = _with_weight(SMALL, "W2", np.nan, tmp_path / "nan.onnx")
    line = assert_bad_input(invoke("check", path, "--data", SMALL_CSV, *COLS, "--max-ks", "0.5"),
                            "nan.onnx", "output 'output'", "NaN or infinite")
    assert "PASS" not in line
    with pytest.raises(ModelError, match="NaN or infinite"):
        check(path, SMALL_CSV, group="g", target="y", max_ks=0.5)


def test_repaired_output_that_is_not_finite_is_refused():
    from onnx_esvd.guards import outputs_finite
    from onnx_esvd.metrics import OutputCollector

    collector = OutputCollector()
    collector.add(np.array([[1.0], [np.inf], [2.0]], dtype=np.float32), np.array([0, 1, 1]))
    with pytest.raises(LayerError, match="repaired model's output 'y' is NaN or infinite on 1 of 3"):
        outputs_finite(collector, "m.onnx", "y", repaired=True)
    with pytest.raises(ModelError, match="m.onnx: output 'y'"):
        outputs_finite(collector, "m.onnx", "y")


def test_nan_weight_never_reaches_the_svd(tmp_path):
    from onnx_esvd.graph import find_layers, read_weight

    model = onnx.load(str(_with_weight(SMALL, "W1", np.inf, tmp_path / "inf.onnx")))
    layer = find_layers(model).layers[1]
    with pytest.raises(ModelError, match="weight 'W1' of node 'Gemm_1' holds .* NaN or infinite"):
        read_weight(model, layer)


def test_feature_beyond_float32_is_a_data_error_naming_the_column(tmp_path):
    data = _csv_with(tmp_path, SMALL_CSV, "x3", "1e300", range(5, 6))
    assert_bad_input(_repair_cli(tmp_path, SMALL, data, "-o", tmp_path / "o.onnx"), "d.csv: column 'x3'",
                     "1e+300", "float32")
    assert_bad_input(invoke("check", SMALL, "--data", data, *COLS, "--max-ks", "1"), "column 'x3'")


# --- 6. bad model input: one line, exit 2 ------------------------------------------------------------


def test_unknown_element_type_is_named_not_a_crash(tmp_path):
    model = onnx.load(str(SMALL))
    next(t for t in model.graph.initializer if t.name == "W1").data_type = 999
    path = tmp_path / "odd.onnx"
    path.write_bytes(model.SerializeToString())
    assert_bad_input(invoke("layers", path), "initializer 'W1' has element type 999")
    assert_bad_input(_repair_cli(tmp_path, path, SMALL_CSV, "-o", tmp_path / "o.onnx"), "element type 999")
    from onnx_esvd.graph import find_layers

    assert "unknown (999)" in find_layers(model).refused["Gemm_1"]  # the graph module names it too


def test_unknown_input_element_type_is_refused(tmp_path):
    model = onnx.load(str(SMALL))
    model.graph.input[0].type.tensor_type.elem_type = 77
    path = tmp_path / "odd_input.onnx"
    path.write_bytes(model.SerializeToString())
    assert_bad_input(invoke("check", path, "--data", SMALL_CSV, *COLS, "--max-ks", "1"),
                     "graph input 'input' has element type 77")


def test_model_without_outputs_is_refused(tmp_path):
    model = onnx.load(str(SMALL))
    del model.graph.output[:]
    path = tmp_path / "noout.onnx"
    path.write_bytes(model.SerializeToString())
    assert_bad_input(_repair_cli(tmp_path, path, SMALL_CSV, "-o", tmp_path / "o.onnx"), "noout.onnx", "no outputs")
    assert_bad_input(invoke("check", path, "--data", SMALL_CSV, *COLS, "--max-ks", "1"), "no outputs")


def test_non_utf8_node_name_is_refused(tmp_path):
    model = onnx.load(str(SMALL))
    model.graph.node[0].name = "QQQQ"
    raw = model.SerializeToString().replace(b"QQQQ", b"\xff\xfe\xfd\xfc")
    path = tmp_path / "bytes.onnx"
    path.write_bytes(raw)
    assert_bad_input(_repair_cli(tmp_path, path, SMALL_CSV, "-o", tmp_path / "o.onnx"), "bytes.onnx",
                     "is not valid UTF-8")
    assert_bad_input(invoke("layers", path), "is not valid UTF-8")


def _point_at(t: onnx.TensorProto, location: str) -> None:
    """Make `t` refer to external data at `location` (its own values dropped)."""
    for field in ("raw_data", "float_data", "int64_data"):
        t.ClearField(field)
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", location


@pytest.mark.parametrize("location", ["a\0b.data", "loop.data"])
def test_external_location_with_nul_or_a_loop_is_refused(tmp_path, location):
    os.symlink("loop.data", tmp_path / "loop.data")
    model = onnx.load(str(SMALL))
    t = next(t for t in model.graph.initializer if t.name == "W1")
    _point_at(t, location)
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="keeps its data"):
        load_model(path)


def test_sparse_initializer_location_is_checked_too(tmp_path):
    model = onnx.load(str(SMALL))
    values = numpy_helper.from_array(np.array([1.0], dtype=np.float32), "sp")
    _point_at(values, "../outside.data")
    indices = numpy_helper.from_array(np.array([0], dtype=np.int64), "sp_idx")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    model.graph.sparse_initializer.append(sparse)
    path = tmp_path / "sparse.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="'sp' keeps its data at '../outside.data', outside"):
        load_model(path)


def test_sparse_initializer_data_is_read_from_the_models_directory(tmp_path, monkeypatch):
    model = onnx.load(str(SMALL))
    values = numpy_helper.from_array(np.array([1.5, -2.0], dtype=np.float32), "sp")
    (tmp_path / "sp.bin").write_bytes(values.raw_data)
    _point_at(values, "sp.bin")
    indices = numpy_helper.from_array(np.array([0, 3], dtype=np.int64), "sp_idx")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    path = tmp_path / "sparse_ok.onnx"
    path.write_bytes(model.SerializeToString())
    monkeypatch.chdir(FIXTURES)  # not the model's directory: the data must still be found beside the model
    loaded = load_model(path)
    sparse = loaded.model.graph.sparse_initializer[0]
    assert not sparse.values.external_data
    assert np.array_equal(numpy_helper.to_array(sparse.values), [1.5, -2.0])
    assert tmp_path / "sp.bin" in loaded.files


@pytest.mark.parametrize("option, value, needle", [
    ("--batch-size", str(2**63), "--batch-size"),
    ("--eps", "1e-300", "--eps 1e-300 is too small"),
    ("--layer", "\u0663", "ASCII digits"),
    ("--seed", "abc", "'--seed'"),
])
def test_option_values_get_one_line(tmp_path, option, value, needle):
    args = ["repair", SMALL, "--data", SMALL_CSV, *COLS, "-o", tmp_path / "o.onnx", "-q"]
    if option != "--layer":
        args += ["--layer", "-2"]
    assert_bad_input(invoke(*args, option, value), needle)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("args, needle", [
    (("repair", "m.onnx"), "missing option"),
    (("repair", "m.onnx", "--layer", "1", "--data", "d.csv", "--group", "g", "--bogus"), "no such option"),
    (("nosuch",), "no such command"),
])
def test_usage_errors_are_one_line(args, needle):
    line = assert_bad_input(invoke(*args))
    assert needle in line.lower()


def test_disk_full_says_so(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "o.onnx"
    assert_bad_input(_repair_cli(tmp_path, SMALL, SMALL_CSV, "-o", out), "no space left on the device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_one_stderr_line_in_a_real_process_with_warnings_and_onnxruntime(tmp_path):
    """numpy's overflow warnings (huge target) and onnxruntime's logger never add lines."""
    data = _csv_with(tmp_path, SMALL_CSV, "y", "1e200", range(1, 40))
    proc = subprocess.run([sys.executable, "-m", "onnx_esvd_cli.main", "repair", str(SMALL), "--layer", "-2",
                           "--data", str(data), *COLS, "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    model = onnx.load(str(SMALL))  # onnxruntime logs a warning for an initializer listed as a graph input
    w0 = next(t for t in model.graph.initializer if t.name == "W0")
    model.graph.input.append(helper.make_tensor_value_info("W0", w0.data_type, list(w0.dims)))
    onnx.save(model, str(tmp_path / "init_input.onnx"))
    quiet = subprocess.run([sys.executable, "-m", "onnx_esvd_cli.main", "check", str(tmp_path / "init_input.onnx"),
                            "--data", str(SMALL_CSV), *COLS, "--max-ks", "1", "-q"],
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    usage = subprocess.run([sys.executable, "-m", "onnx_esvd_cli.main", "repair", str(SMALL), "--seed", "abc"],
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1, usage.stderr


# --- 8. special files ---------------------------------------------------------------------------------


def test_fifo_as_model_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "onnx_esvd_cli.main", "layers", str(fifo)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not a regular file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_fifo_or_device_output_is_refused_even_with_force(tmp_path):
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    for target in (fifo, Path(os.devnull)):
        with pytest.raises(OutputError, match="not a regular file"):
            check_output_path(target, force=True)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_dangling_symlink_output_needs_force(tmp_path):
    link = tmp_path / "out.onnx"
    os.symlink(tmp_path / "missing.onnx", link)
    assert_bad_input(_repair_cli(tmp_path, SMALL, SMALL_CSV, "-o", link), "already exists")
    assert os.path.islink(link)
    result = _repair_cli(tmp_path, SMALL, SMALL_CSV, "-o", link, "--force")
    assert result.exit_code == 0, result.stderr
    assert not os.path.islink(link) and onnx.load(str(link)).graph.node


def test_trailing_slash_output_is_refused(tmp_path):
    assert_bad_input(_repair_cli(tmp_path, SMALL, SMALL_CSV, "-o", f"{tmp_path}/newdir/"), "ends with '/'")
    assert list(tmp_path.iterdir()) == []


def test_second_writer_to_a_new_output_fails(tmp_path):
    res = repair(SMALL, SMALL_CSV, layer=-2, group="g", target="y")
    out = check_output_path(tmp_path / "o.onnx")
    out.write_bytes(b"the other run's model")  # another run finished first
    with pytest.raises(OutputError, match="already exists"):
        save_model(res.model, out)
    assert out.read_bytes() == b"the other run's model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


# --- 2-5. external data -------------------------------------------------------------------------------


def _external(tmp_path: Path, name: str, location: str) -> Path:
    model = onnx.load(str(SMALL))
    path = tmp_path / name
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    return path


def _hashes(tmp_path: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in tmp_path.iterdir() if p.is_file()}


def test_output_named_like_the_inputs_data_file_keeps_the_input_loadable(tmp_path):
    src = _external(tmp_path, "a.onnx", "b.onnx.data")
    before = _hashes(tmp_path)
    result = _repair_cli(tmp_path, src, SMALL_CSV, "-o", tmp_path / "b.onnx")
    assert result.exit_code == 0, result.stderr
    assert all(sha256(tmp_path / name) == h for name, h in before.items())
    onnx.checker.check_model(load_model(src).model)
    load_model(tmp_path / "b.onnx")


def test_output_or_junit_on_the_inputs_data_file_is_refused(tmp_path):
    src = _external(tmp_path, "m.onnx", "m.onnx.data")
    before = _hashes(tmp_path)
    assert_bad_input(_repair_cli(tmp_path, src, SMALL_CSV, "-o", tmp_path / "m.onnx.data", "--force"),
                     "reads its weights from this file")
    assert_bad_input(invoke("check", src, "--data", SMALL_CSV, *COLS, "--max-ks", "1", "--junit",
                            tmp_path / "m.onnx.data"), "reads its weights from this file")
    assert _hashes(tmp_path) == before


def test_unrelated_data_file_beside_the_output_is_left_alone(tmp_path):
    src = _external(tmp_path, "m.onnx", "m.onnx.data")
    (tmp_path / "x.onnx.data").write_bytes(b"someone else's weights")
    result = _repair_cli(tmp_path, src, SMALL_CSV, "-o", tmp_path / "x.onnx")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "x.onnx.data").read_bytes() == b"someone else's weights"
    load_model(tmp_path / "x.onnx")


def test_force_over_an_external_output_from_the_models_directory(tmp_path, monkeypatch):
    _external(tmp_path, "m.onnx", "m.onnx.data")
    monkeypatch.chdir(tmp_path)
    for c1 in ("15", "3"):
        result = invoke("repair", "m.onnx", "--layer", "-2", "--data", SMALL_CSV, *COLS, "-o", "out.onnx",
                        "--force", "-q", "--c1", c1)
        assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    data = [n for n in names if n.startswith("out.onnx.")]
    assert len(data) == 1 and data[0].endswith(".data"), names  # the first run's data file was removed
    onnx.checker.check_model(load_model(tmp_path / "out.onnx").model)


def test_external_data_file_gets_the_umask_mode(tmp_path):
    src = _external(tmp_path, "m.onnx", "m.onnx.data")
    res = repair(src, SMALL_CSV, layer=-2, group="g", target="y")
    old = os.umask(0o022)
    try:
        out = res.save(tmp_path / "o.onnx")
    finally:
        os.umask(old)
    for path in (out, *tmp_path.glob("o.onnx.*.data")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def test_kill_before_the_model_rename_leaves_the_old_pair(tmp_path, monkeypatch):
    import onnx_esvd.modelio as modelio

    src = _external(tmp_path, "m.onnx", "m.onnx.data")
    first = repair(src, SMALL_CSV, layer=-2, group="g", target="y", c1=3)
    first.save(tmp_path / "o.onnx")
    before = _hashes(tmp_path)
    second = repair(src, SMALL_CSV, layer=-2, group="g", target="y")
    real = modelio._place

    def interrupted(src_path, dest, *, exclusive):
        if Path(dest).name == "o.onnx":
            raise KeyboardInterrupt
        real(src_path, dest, exclusive=exclusive)

    monkeypatch.setattr(modelio, "_place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        second.save(tmp_path / "o.onnx", force=True)
    assert _hashes(tmp_path) == before  # the new data file was taken back, the old pair is intact
    load_model(tmp_path / "o.onnx")


def test_kill_after_the_model_rename_leaves_the_new_pair(tmp_path, monkeypatch):
    import onnx_esvd.modelio as modelio

    src = _external(tmp_path, "m.onnx", "m.onnx.data")
    repair(src, SMALL_CSV, layer=-2, group="g", target="y", c1=3).save(tmp_path / "o.onnx")
    second = repair(src, SMALL_CSV, layer=-2, group="g", target="y")

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(modelio, "_unlink_quietly", interrupted)
    with pytest.raises(KeyboardInterrupt):
        second.save(tmp_path / "o.onnx", force=True)
    loaded = load_model(tmp_path / "o.onnx").model
    w = next(t for t in loaded.graph.initializer if t.name == second.final.weight)
    assert np.array_equal(numpy_helper.to_array(w), numpy_helper.to_array(
        next(t for t in second.model.graph.initializer if t.name == second.final.weight)))


def test_ctrl_c_message_says_what_was_written(tmp_path, monkeypatch):
    import onnx_esvd_cli.report as report

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "repair_report", interrupt)  # after the save
    out = tmp_path / "o.onnx"
    result = _repair_cli(tmp_path, SMALL, SMALL_CSV, "-o", out)
    assert result.exit_code == 130
    assert result.stderr.strip() == f"interrupted after writing {out} (complete files)"
    import onnx_esvd.pipeline as pipeline

    monkeypatch.setattr(pipeline, "esvd", interrupt)  # before anything is written
    result = _repair_cli(tmp_path, SMALL, SMALL_CSV, "-o", tmp_path / "p.onnx")
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted; no output was written"


# --- 9. determinism ---------------------------------------------------------------------------------------


def test_output_bytes_do_not_depend_on_the_blas_thread_count(tmp_path):
    outs = []
    for threads in ("1", "2"):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        out = tmp_path / f"t{threads}.onnx"
        subprocess.run([sys.executable, "-m", "onnx_esvd_cli.main", "repair", str(FIXTURES / "law_school_mlp_legacy.onnx"),
                        "--layer", "-2", "--data", str(FIXTURES / "law_school.csv"), "--group", "race1", "--target",
                        "ugpa", "-o", str(out), "-q"], env=env, check=True, capture_output=True, timeout=300)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
