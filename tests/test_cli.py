"""The `onnx-esvd` command line: tables, JSON, output paths, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import (CASES, FIXTURES, assert_bad_input, copy_fixtures, dir_state, invoke, load_table, sha256,
                      write_csv)

CONSOLE_SCRIPT = Path(sys.executable).with_name("onnx-esvd")




@pytest.fixture
def work(tmp_path):
    """A tmp dir with copies of a hand-built fixture and its CSV, plus the Law School files."""
    copy_fixtures(tmp_path, "gemm_transb0_alpha.onnx", "gemm_transb0_alpha.csv", "law_school_mlp_dynamo.onnx",
                  "law_school.csv", "runtime_weight.onnx")
    return tmp_path


def gemm_args(work, *extra):
    return ["repair", work / "gemm_transb0_alpha.onnx", "--layer", "1", "--data", work / "gemm_transb0_alpha.csv",
            "--group", "g", "--target", "y", *extra]


# ------------------------------------------------------------------------------------------------
# layers


def test_layers_table():
    result = invoke("layers", FIXTURES / "law_school_mlp_legacy.onnx")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    lines = out.strip().splitlines()
    for i, (name, op, weight, d_in, d_out) in enumerate(CASES["law_school_mlp_legacy.onnx"].layers):
        row = next(line for line in lines if f" {name} " in line)
        assert row.split()[0] == str(i)
        assert op in row and weight in row and f"[{d_in} -> {d_out}]" in row and "float32" in row
    assert out.count("final") == 1
    final_row = next(line for line in lines if "final" in line)
    assert "/8/Gemm" in final_row and "/7/Relu_output_0" in final_row


def test_layers_table_lists_refusals():
    result = invoke("layers", FIXTURES / "runtime_weight.onnx")
    assert result.exit_code == 0
    assert "MatMul_1" in result.stdout and "run time" in result.stdout
    result = invoke("layers", FIXTURES / "subgraph_linear.onnx")
    assert "Gemm_then" in result.stdout and "Gemm_else" in result.stdout


@pytest.mark.parametrize("name", list(CASES))
def test_layers_json(name):
    result = invoke("layers", FIXTURES / name, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    case = CASES[name]
    assert [(la["name"], la["op"], la["weight"], la["in_features"], la["out_features"]) for la in data["layers"]] \
        == list(case.layers)
    assert [la["index"] for la in data["layers"]] == list(range(len(case.layers)))
    assert [la["final"] for la in data["layers"]] == [False] * (len(case.layers) - 1) + [True]
    assert data["layers"][0]["input"] == case.first_input
    assert {r["name"] for r in data["refused"]} == set(case.refused)
    for r in data["refused"]:
        assert r["name"] in r["reason"]


def test_layers_bad_model(tmp_path):
    assert_bad_input(invoke("layers", tmp_path / "nosuch.onnx"), "nosuch.onnx")
    (tmp_path / "text.onnx").write_text("not a model")
    assert_bad_input(invoke("layers", tmp_path / "text.onnx"), "text.onnx")


# ------------------------------------------------------------------------------------------------
# repair: output


def test_repair_table_and_default_output(work):
    before = dir_state(work)
    result = invoke(*gemm_args(work))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for word in ("KS", "MSE", "MAE", "mean gap", "before", "after", "holdout", "Gemm_1"):
        assert word in out, word
    ks_row = next(line for line in out.splitlines() if line.startswith("KS"))
    ks_before, ks_after = (float(v) for v in ks_row.split()[1:3])
    assert ks_after < ks_before
    target = work / "gemm_transb0_alpha.esvd.onnx"
    assert str(target) in out
    assert target.is_file()
    onnx.checker.check_model(onnx.load(str(target)))
    after = dir_state(work)
    assert {k: v for k, v in after.items() if k != target.name} == before  # inputs untouched, nothing else new


def test_repair_json(work):
    out_path = work / "sub" / "fixed.onnx"
    out_path.parent.mkdir()
    result = invoke(*gemm_args(work, "--json", "-o", out_path))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert isinstance(data, dict)
    for key in ("layer", "options", "before", "after", "output"):
        assert key in data, key
    for part in ("before", "after"):
        for key in ("ks", "mean_gap", "mse", "mae"):
            assert isinstance(data[part][key], float), (part, key)
    assert data["after"]["ks"] < data["before"]["ks"]
    assert data["layer"]["name"] == "Gemm_1" and data["layer"]["index"] == 1
    assert data["options"]["c1"] == 15.0 and data["options"]["group"] == "g"
    assert Path(data["output"]) == out_path and out_path.is_file()
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out_path)).metadata_props}
    assert meta["onnx_esvd.repair"]["after"]["ks"] == pytest.approx(data["after"]["ks"])


def test_repair_json_without_target(work):
    result = invoke("repair", work / "gemm_transb0_alpha.onnx", "--layer", "-2", "--data",
                    work / "gemm_transb0_alpha.csv", "--group", "g", "--features", "x0,x1,x2,x3,x4,x5", "--json",
                    "--holdout", "0")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["before"]["mse"] is None and data["report_rows"] == "fit"


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity, which are not JSON (RFC 8259) and break jq and browsers."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_repair_json_is_strict_json_when_a_group_has_one_report_row(work):
    """One group with a single held-out row has no std: the JSON must still be valid (null, not NaN)."""
    from onnx_esvd.rows import row_uniform

    tab = load_table(work / "gemm_transb0_alpha.csv")
    lab = tab["g"]
    a_rows, b_rows = list(np.flatnonzero(lab == "a")), list(np.flatnonzero(lab == "b"))
    n = 1000
    report = row_uniform(0, 0, n) < 0.2  # the default split (--seed 0, --holdout 0.2)
    order = []
    first = True
    for i in range(n):
        if report[i]:
            order.append(b_rows.pop() if first else a_rows.pop())
            first = False
        else:
            order.append(b_rows.pop() if i % 2 else a_rows.pop())
    cols = [f"x{j}" for j in range(6)] + ["g", "y"]
    write_csv(work / "oneb.csv", {k: np.asarray(v)[order] for k, v in tab.items()}, order=cols)
    out = work / "oneb.onnx"
    result = invoke("repair", work / "gemm_transb0_alpha.onnx", "--layer", "1", "--data", work / "oneb.csv",
                    "--group", "g", "--target", "y", "--json", "-o", out)
    assert result.exit_code == 0, result.stderr
    data = _strict_json(result.stdout)
    assert data["before"]["groups"][1]["count"] == 1
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    _strict_json(meta["onnx_esvd.repair"])


def test_repair_default_output_is_next_to_the_model(work, tmp_path_factory, monkeypatch):
    elsewhere = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(elsewhere)
    result = invoke(*gemm_args(work))
    assert result.exit_code == 0, result.stderr
    assert (work / "gemm_transb0_alpha.esvd.onnx").is_file()
    assert list(elsewhere.iterdir()) == []


def test_repair_layer_by_negative_index_and_name(work):
    result = invoke("repair", work / "law_school_mlp_dynamo.onnx", "--layer", "-2", "--data", work / "law_school.csv",
                    "--group", "race1", "--target", "ugpa", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["layer"]["name"] == "node_linear_3"
    result = invoke("repair", work / "law_school_mlp_dynamo.onnx", "--layer", "node_linear_1", "--data",
                    work / "law_school.csv", "--group", "race1", "--target", "ugpa", "--json", "--force")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["layer"]["index"] == 1


def test_repair_refuses_to_overwrite_without_force(work):
    target = work / "gemm_transb0_alpha.esvd.onnx"
    target.write_bytes(b"precious")
    state = dir_state(work)
    line = assert_bad_input(invoke(*gemm_args(work)), "gemm_transb0_alpha.esvd.onnx", "--force")
    assert dir_state(work) == state
    result = invoke(*gemm_args(work, "--force"))
    assert result.exit_code == 0, result.stderr
    onnx.checker.check_model(onnx.load(str(target)))
    assert line


@pytest.mark.parametrize("which", ["model", "model_dotted", "data"])
def test_repair_never_overwrites_an_input(work, which):
    target = {"model": work / "gemm_transb0_alpha.onnx",
              "model_dotted": work / "." / "sub" / ".." / "gemm_transb0_alpha.onnx",
              "data": work / "gemm_transb0_alpha.csv"}[which]
    (work / "sub").mkdir()
    state = dir_state(work)
    assert_bad_input(invoke(*gemm_args(work, "-o", target, "--force")))
    assert dir_state(work) == state


# ------------------------------------------------------------------------------------------------
# bad inputs: exit 2, one line, no traceback, no output, inputs untouched


def _bad_cases(work: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    (work / "text.onnx").write_text("this is not an onnx model\n")
    raw = (work / "gemm_transb0_alpha.onnx").read_bytes()
    (work / "trunc.onnx").write_bytes(raw[: len(raw) // 2])
    tab = load_table(work / "gemm_transb0_alpha.csv")
    g = tab["g"].copy()
    g[::5] = "c"
    write_csv(work / "three.csv", {**tab, "g": g}, order=[f"x{j}" for j in range(6)] + ["g", "y"])
    model, data = work / "gemm_transb0_alpha.onnx", work / "gemm_transb0_alpha.csv"

    def rep(m=model, d=data, *extra, layer="1", group="g"):
        return ["repair", m, "--layer", layer, "--data", d, "--group", group, "--target", "y", *extra]

    return {
        "missing model": (rep(work / "nosuch.onnx"), ("nosuch.onnx",)),
        "not onnx": (rep(work / "text.onnx"), ("text.onnx",)),
        "truncated onnx": (rep(work / "trunc.onnx"), ("trunc.onnx",)),
        "layer 99": (rep(layer="99"), ("99", "out of range")),
        "layer name": (rep(layer="nosuchnode"), ("nosuchnode", "Gemm_0")),
        "refused layer": (["repair", work / "runtime_weight.onnx", "--layer", "MatMul_1", "--data", data,
                           "--group", "g"], ("MatMul_1",)),
        "missing data": (rep(d=work / "nosuch.csv"), ("nosuch.csv",)),
        "missing group column": (rep(group="grp"), ("'grp'",)),
        "missing target column": (["repair", model, "--layer", "1", "--data", data, "--group", "g", "--target",
                                   "tgt"], ("'tgt'",)),
        "feature count": (["repair", model, "--layer", "1", "--data", work / "law_school.csv", "--group", "race1",
                           "--target", "ugpa"], ("law_school.csv", "6", "5")),
        "unknown feature": (rep(model, data, "--features", "x0,x1,x2,x3,x4,nope"), ("'nope'",)),
        "groups value absent": (rep(model, data, "--groups", "a,zz"), ("zz",)),
        "groups not two": (rep(model, data, "--groups", "a"), ("--groups",)),
        "c1": (rep(model, data, "--c1", "0.5"), ("--c1", "0.5")),
        "c2": (rep(model, data, "--c2", "0"), ("--c2",)),
        "eps": (rep(model, data, "--eps", "-1"), ("--eps",)),
        "holdout": (rep(model, data, "--holdout", "1.0"), ("--holdout", "1")),
        "refit": (rep(model, data, "--refit", "bogus"), ("--refit", "bogus")),
        "ridge": (rep(model, data, "--ridge", "lots"), ("--ridge", "lots")),
        "batch size": (rep(model, data, "--batch-size", "0"), ("--batch-size",)),
        "output dir": (rep(model, data, "-o", work / "nodir" / "x.onnx"), ("nodir",)),
    }


BAD = ["missing model", "not onnx", "truncated onnx", "layer 99", "layer name", "refused layer", "missing data",
       "missing group column", "missing target column", "feature count", "unknown feature",
       "groups value absent", "groups not two", "c1", "c2", "eps", "holdout", "refit", "ridge", "batch size",
       "output dir"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input(work, case):
    args, needles = _bad_cases(work)[case]
    state = dir_state(work)
    result = invoke(*args)
    assert_bad_input(result, *needles)
    assert dir_state(work) == state  # no output file, no temp file, inputs byte-identical
    assert not any(p.name.endswith(".esvd.onnx") for p in work.iterdir())


def test_debug_shows_the_traceback(work):
    state = dir_state(work)
    result = invoke(*gemm_args(work, "--layer", "99", "--debug"))
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "LayerError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    result = invoke("layers", work / "nosuch.onnx", "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr
    assert dir_state(work) == state


def test_all_commands_keep_inputs_intact(work):
    hashes = {p.name: sha256(p) for p in work.iterdir()}
    invoke("layers", work / "gemm_transb0_alpha.onnx")
    invoke("layers", work / "gemm_transb0_alpha.onnx", "--json")
    invoke(*gemm_args(work, "--json"))
    invoke(*gemm_args(work, "--force", "--refit", "plain"))
    invoke(*gemm_args(work, "--force", "--refit", "none", "--holdout", "0"))
    for name, digest in hashes.items():
        assert sha256(work / name) == digest, name


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("onnx-esvd ")
    result = invoke("repair", "--help")
    assert result.exit_code == 0 and "--layer" in result.stdout and "--groups" in result.stdout


# ------------------------------------------------------------------------------------------------
# the installed console script


def test_console_script(tmp_path):
    copy_fixtures(tmp_path, "gemm_transb0_alpha.onnx", "gemm_transb0_alpha.csv")
    script = str(CONSOLE_SCRIPT) if CONSOLE_SCRIPT.exists() else "onnx-esvd"
    env = dict(os.environ)
    ok = subprocess.run([script, "repair", "gemm_transb0_alpha.onnx", "--layer", "-2", "--data",
                         "gemm_transb0_alpha.csv", "--group", "g", "--target", "y", "--json"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["output"] == "gemm_transb0_alpha.esvd.onnx"
    assert data["after"]["ks"] < data["before"]["ks"]
    assert (tmp_path / "gemm_transb0_alpha.esvd.onnx").is_file()
    state = dir_state(tmp_path)
    bad = subprocess.run([script, "repair", "gemm_transb0_alpha.onnx", "--layer", "99", "--data",
                          "gemm_transb0_alpha.csv", "--group", "g", "-o", "other.onnx"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and "99" in bad.stderr
    assert dir_state(tmp_path) == state
