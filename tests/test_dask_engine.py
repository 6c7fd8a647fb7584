"""The layer pass on a real Dask LocalCluster (two worker processes) equals the one-process pass."""

from __future__ import annotations

import sys

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from conftest import assert_bad_input, invoke  # noqa: E402
from test_shards import CUTS, DATA, MODEL, OPTS, _split_csv, assert_same_stats, reference_stats, weight_rel  # noqa: E402

from onnx_esvd.rows import data_spec  # noqa: E402
from onnx_esvd.errors import DataError, OptionError  # noqa: E402
from onnx_esvd.esvd import esvd  # noqa: E402
from onnx_esvd.graph import read_weight  # noqa: E402
from onnx_esvd.shards import LayerPartial  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    cl = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50)
    client = distributed.Client(cl)
    yield client
    client.close()
    cl.close()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dask_shards")
    _split_csv(DATA, d, cuts=(0, 700, 1500, 2600, 4000, 5000), gz_last=True)
    (d / "part-9.csv").write_text(DATA.read_text().splitlines(keepends=True)[0])  # an empty shard: no rows
    return d


SPEC = data_spec(OPTS["group"], OPTS["groups"], OPTS["target"], None)


def test_dask_layer_pass_equals_one_process(cluster, shard_dir):
    from onnx_esvd.engines.dask_engine import layer_pass_dask

    want, lin, model = reference_stats()
    partial = layer_pass_dask(MODEL, str(shard_dir / "part-*"), lin, SPEC, holdout=0.2, seed=3, scheduler=cluster)
    assert partial.ranges == [(0, 6018)] and len(partial.sources) == 7
    got = partial.to_group_stats()
    assert_same_stats(got, want)
    w = read_weight(model, lin)
    assert weight_rel(esvd(w, got).weight, esvd(w, want).weight) < 1e-9
    # both tasks' processes did work: the per-worker session cache lives in the workers, not here
    from onnx_esvd.engines import dask_engine

    assert not dask_engine._SESSIONS


def test_dask_by_scheduler_address_and_errors_from_workers(cluster, shard_dir, tmp_path):
    from onnx_esvd.engines.dask_engine import layer_pass_dask

    address = cluster.scheduler.address
    partial = layer_pass_dask(MODEL, shard_dir, -2, SPEC, holdout=0.2, seed=3, scheduler=address)
    assert partial.rows == 6018
    # a bad value in one file: the worker's one-line DataError reaches the client, naming the file and line
    bad = tmp_path / "bad"
    bad.mkdir()
    files = _split_csv(DATA, bad, cuts=CUTS)
    lines = files[1].read_text().splitlines(keepends=True)
    lines[5] = ",".join([""] + lines[5].split(",")[1:])
    files[1].write_text("".join(lines))
    with pytest.raises(DataError, match=r"part-1.csv: line 6, column 'dnn_bar_pass_prediction' is empty"):
        layer_pass_dask(MODEL, bad, -2, SPEC, holdout=0.2, seed=3, scheduler=address)


def test_capture_command_with_dask_engine(cluster, shard_dir, tmp_path):
    address = cluster.scheduler.address
    common = ["--layer", "-2", "--group", "race1", "--groups", "white,black", "--target", "ugpa", "--seed", "3", "-q"]
    r = invoke("capture", MODEL, "--data", str(shard_dir / "part-*"), *common, "--engine", "dask",
               "--scheduler", address, "-o", tmp_path / "d.npz")
    assert r.exit_code == 0, r.stderr
    want, _, _ = reference_stats()
    assert_same_stats(LayerPartial.load(tmp_path / "d.npz").to_group_stats(), want)
    assert_bad_input(invoke("capture", MODEL, "--data", DATA, *common, "--scheduler", address,
                            "-o", tmp_path / "e.npz"), "--scheduler needs --engine dask")


def test_missing_dask_says_how_to_install(monkeypatch):
    from onnx_esvd.engines.dask_engine import require_dask

    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(OptionError, match=r"pip install 'onnx-esvd\[dask\]'"):
        require_dask()


def test_repair_with_every_pass_on_dask_equals_the_one_process_repair(cluster, shard_dir, monkeypatch):
    """Layer, refit and report passes on the workers: the ESVD weights equal the one-process repair of the
    concatenated file to 1e-9 (float64), the KS before and after and their bootstrap intervals exactly (the
    report rows are merged in global row order). The client reads no data row."""
    from onnx_esvd import repair
    from onnx_esvd.rows import RowReader

    kw = dict(layer=-2, group="race1", groups=["white", "black"], target="ugpa", holdout=0.2, seed=3, bootstrap=50,
              refit="fair")
    one = repair(MODEL, DATA, **kw)
    glob_one = repair(MODEL, str(shard_dir / "part-*"), **kw)

    def no_reading(*args, **kwargs):
        raise AssertionError("the client read data rows")

    monkeypatch.setattr(RowReader, "__call__", no_reading)
    dist = repair(MODEL, str(shard_dir / "part-*"), engine="dask", scheduler=cluster, **kw)
    assert weight_rel(dist.esvd.weight, one.esvd.weight) < 1e-9
    assert dist.before.ks == one.before.ks and dist.before.intervals == one.before.intervals
    assert dist.rows == one.rows
    # the refitted final node: the same float32 weights as one process over the same files; against the single
    # file the refit's conditioning turns 1e-10 differences of the patched layer into ~1e-6
    final = dist.final
    assert weight_rel(read_weight(dist.model, final), read_weight(glob_one.model, final)) < 1e-7
    assert weight_rel(read_weight(dist.model, final), read_weight(one.model, final)) < 1e-4
    assert dist.after.ks == glob_one.after.ks and dist.after.intervals == glob_one.after.intervals
    assert dist.after.ks == one.after.ks
    assert any("every pass ran on the engine's workers (7 files" in w for w in dist.warnings)


def test_check_and_audit_on_dask_equal_one_process(cluster, shard_dir):
    from onnx_esvd import audit, check

    kw = dict(group="race1", target="ugpa", bootstrap=30, seed=1)
    one = check(MODEL, DATA, max_ks=0.5, **kw)
    dist = check(MODEL, str(shard_dir / "part-*"), max_ks=0.5, engine="dask", scheduler=cluster, **kw)
    assert dist.measured.metrics.ks == one.measured.metrics.ks
    assert dist.measured.metrics.intervals["ks"] == one.measured.metrics.intervals["ks"]
    assert (dist.measured.rows, dist.measured.skipped, dist.measured.groups) == \
        (one.measured.rows, one.measured.skipped, one.measured.groups)
    a1 = audit(MODEL, DATA, **kw)
    a2 = audit(MODEL, str(shard_dir / "part-*"), engine="dask", scheduler=cluster.scheduler.address, **kw)
    assert a2.metrics.ks == a1.metrics.ks and [x.rank for x in a2.layers] == [x.rank for x in a1.layers]
    for x, y in zip(a2.layers, a1.layers):
        assert x.first.relative == pytest.approx(y.first.relative, rel=1e-9)
        assert x.second.relative == pytest.approx(y.second.relative, rel=1e-9)
    r = invoke("check", MODEL, "--data", str(shard_dir / "part-*"), "--group", "race1", "--target", "ugpa",
               "--max-ks", "0.5", "--engine", "dask", "--scheduler", cluster.scheduler.address, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    import json

    assert json.loads(r.stdout)["metrics"]["ks"] == one.measured.metrics.ks
    assert_bad_input(invoke("audit", MODEL, "--data", DATA, "--group", "race1", "--scheduler", "tcp://x:1"),
                     "--scheduler needs --engine dask")


def test_sweep_with_every_pass_on_dask_equals_the_one_process_sweep(cluster, shard_dir, monkeypatch):
    """`sweep --engine dask`: the capture, each patched layer's refit pass and each setting's report pass run on
    the workers; every setting's KS equals the one-process sweep over the same files exactly, and the client
    reads no data row. The CLI takes --engine too."""
    from onnx_esvd import sweep
    from onnx_esvd.rows import RowReader

    kw = dict(layer=-2, group="race1", groups=["white", "black"], target="ugpa", holdout=0.2, seed=3,
              c1=[1, 15], c2=[150], refit=["fair", "moments"], var_gap=[0.0])
    files = str(shard_dir / "part-*")
    one = sweep(MODEL, files, **kw)

    def no_reading(*args, **kwargs):
        raise AssertionError("the client read data rows")

    with monkeypatch.context() as m:
        m.setattr(RowReader, "__call__", no_reading)
        dist = sweep(MODEL, files, engine="dask", scheduler=cluster, **kw)
    assert len(dist.points) == len(one.points) == 4
    assert dist.before.ks == one.before.ks
    for p, q in zip(dist.points, one.points):
        assert (p.c1, p.c2, p.setting) == (q.c1, q.c2, q.setting)
        assert p.metrics.ks == q.metrics.ks
        assert p.metrics.mse == pytest.approx(q.metrics.mse, rel=1e-6)
    assert any("every pass ran on the engine's workers" in w for w in dist.warnings)
    r = invoke("sweep", MODEL, "--layer", "-2", "--data", files, "--group", "race1", "--groups", "white,black",
               "--target", "ugpa", "--c1", "15", "--c2", "150", "--refit", "fair", "--holdout", "0.2", "--seed", "3",
               "--engine", "dask", "--scheduler", cluster.scheduler.address, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    import json

    assert one.points[2].setting.mode == "fair" and one.points[2].c1 == 15
    assert json.loads(r.stdout)["points"][0]["ks"] == one.points[2].metrics.ks
