"""Faults and hostile files: nothing half-written, nothing read from outside, clear messages."""

from __future__ import annotations

import os
import sys

import onnx
import pytest

from conftest import FIXTURES, external_data_copy, invoke
from onnx_esvd import DataError, ModelError, OptionError, OutputError, repair
from onnx_esvd.modelio import load_model, save_model

LEGACY = FIXTURES / "law_school_mlp_legacy.onnx"
SMALL = FIXTURES / "gemm_transb0_alpha.onnx"
SMALL_CSV = FIXTURES / "gemm_transb0_alpha.csv"


def test_absolute_external_location_is_refused_before_reading(tmp_path):
    proto = external_data_copy(tmp_path, lambda loc: str(tmp_path / loc))
    path = tmp_path / "abs.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelError, match="outside the model's directory"):
        load_model(path)


def test_symlink_out_of_the_model_directory_is_refused(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    proto = external_data_copy(tmp_path, lambda loc: "link.data")
    os.symlink(tmp_path / "base.onnx.data", inner / "link.data")
    path = inner / "sym.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelError, match="outside the model's directory"):
        load_model(path)


def test_internal_error_says_so_and_exits_1(monkeypatch, tmp_path):
    import onnx_esvd.pipeline as pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(pipeline, "esvd", boom)
    result = invoke("repair", SMALL, "--layer", "-2", "--data", SMALL_CSV, "--group", "g", "--target", "y", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 1
    assert "internal error: RuntimeError: simulated bug" in result.stderr
    assert "--debug" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.onnx").exists()
    debug = invoke("repair", SMALL, "--layer", "-2", "--data", SMALL_CSV, "--group", "g", "--target", "y",
                   "-o", tmp_path / "o.onnx", "--debug")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    res = repair(SMALL, SMALL_CSV, layer=-2, group="g", target="y")
    out = tmp_path / "fixed.onnx"
    out.write_bytes(b"old contents")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(res.model, out, force=True)
    assert out.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]


def test_checker_failure_writes_nothing(tmp_path):
    res = repair(SMALL, SMALL_CSV, layer=-2, group="g", target="y")
    broken = onnx.ModelProto()
    broken.CopyFrom(res.model)
    broken.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(ModelError, match="onnx.checker"):
        save_model(broken, tmp_path / "fixed.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_message(tmp_path, monkeypatch):
    """A directory os.access reports unwritable is refused (patched: CI runs as root, which ignores modes)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    from onnx_esvd.modelio import check_output_path

    with pytest.raises(OutputError, match="is not writable; choose another -o"):
        check_output_path(tmp_path / "o.onnx")


def test_opset_newer_than_onnxruntime_names_both_versions(tmp_path):
    model = onnx.load(str(SMALL))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 99
    path = tmp_path / "future.onnx"
    path.write_bytes(model.SerializeToString())
    result = invoke("repair", path, "--layer", "-2", "--data", SMALL_CSV, "--group", "g", "--target", "y", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line
    import onnxruntime

    assert f"onnxruntime {onnxruntime.__version__}" in line and "ai.onnx 99" in line
    assert not (tmp_path / "o.onnx").exists()


def test_zero_eps_is_refused():
    with pytest.raises(OptionError, match="--eps"):
        repair(SMALL, SMALL_CSV, layer=-2, group="g", eps=0.0)


def test_group_smaller_than_the_layer_width_warns(tmp_path):
    lines = SMALL_CSV.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    col = header.split(",").index("g")
    a_rows = [r for r in rows if r.split(",")[col] == "a"]
    b_rows = [r for r in rows if r.split(",")[col] == "b"][:12]
    path = tmp_path / "few.csv"
    path.write_text("\n".join([header, *a_rows, *b_rows]) + "\n")
    res = repair(SMALL, path, layer=-2, group="g", target="y", holdout=0)
    assert any("rank deficient" in w and "'b'" in w for w in res.warnings)


def test_one_row_group_is_an_error(tmp_path):
    lines = SMALL_CSV.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    col = header.split(",").index("g")
    keep = [r for r in rows if r.split(",")[col] == "a"] + [next(r for r in rows if r.split(",")[col] == "b")]
    path = tmp_path / "one.csv"
    path.write_text("\n".join([header, *keep]) + "\n")
    with pytest.raises(DataError, match="group 'b' has 1 fit row; at least 2"):
        repair(SMALL, path, layer=-2, group="g", target="y", holdout=0)


def test_same_inputs_give_byte_identical_files(tmp_path):
    a = repair(SMALL, SMALL_CSV, layer=-2, group="g", target="y").save(tmp_path / "a.onnx")
    b = repair(SMALL, SMALL_CSV, layer=-2, group="g", target="y").save(tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()


def test_killed_at_any_point_leaves_no_partial_output(tmp_path):
    """SIGKILL the CLI at several moments: the output is either absent or a complete, valid model."""
    import signal
    import subprocess

    out = tmp_path / "fixed.onnx"
    cmd = [sys.executable, "-m", "onnx_esvd_cli.main", "repair", str(LEGACY), "--layer", "-2",
           "--data", str(FIXTURES / "law_school.csv"), "--group", "race1", "--target", "ugpa", "-o", str(out),
           "--force", "--quiet"]
    outcomes = set()
    for delay in (0.3, 0.8, 1.2, 1.6, 2.0, 2.5, 30.0):
        if out.exists():
            out.unlink()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if out.exists():
            onnx.checker.check_model(onnx.load(str(out)))
            outcomes.add("complete")
        else:
            outcomes.add("absent")
    assert "complete" in outcomes  # the last run was given time to finish
