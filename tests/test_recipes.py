"""The README's Spark and Ray recipes (examples/*_engine.py, included in the README verbatim) run every pass of
`repair` and `check` on the engine and equal the one-process run. Spark and Ray start slowly (measured: 68 s
and 52 s for these tests on this 2-core machine under load), so they run only when the engine is installed and
ONNX_ESVD_TEST_SPARK=1 / ONNX_ESVD_TEST_RAY=1 is set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from test_shards import DATA, MODEL, _split_csv

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
README = Path(__file__).resolve().parent.parent / "README.md"
KW = dict(layer=-2, group="race1", groups=["white", "black"], target="ugpa", seed=3, refit="fair", bootstrap=20)


def _engine_function(path: Path) -> str:
    """The recipe as the README shows it: the file up to its `if __name__ == "__main__":` demo."""
    return path.read_text().split('\n\nif __name__ == "__main__":')[0].split('"""\n\n', 1)[1].strip()


@pytest.mark.parametrize("name", ["spark_engine.py", "ray_engine.py"])
def test_readme_shows_the_tested_recipe(name):
    assert _engine_function(EXAMPLES / name) in README.read_text()


@pytest.fixture
def shard_glob(tmp_path):
    _split_csv(DATA, tmp_path, cuts=(0, 1500, 3000, 4500), gz_last=True)
    return str(tmp_path / "part-*")


def _same(one, other) -> None:
    assert np.linalg.norm(other.esvd.weight - one.esvd.weight) / np.linalg.norm(one.esvd.weight) < 1e-9
    assert other.before.ks == one.before.ks and other.after.ks == one.after.ks
    assert other.after.intervals == one.after.intervals and other.rows == one.rows


def _wanted(var: str) -> None:
    if os.environ.get(var) != "1":
        pytest.skip(f"slow engine start-up: set {var}=1 to run")


def test_spark_recipe_equals_one_process(shard_glob, monkeypatch):
    _wanted("ONNX_ESVD_TEST_SPARK")
    pytest.importorskip("pyspark")
    pytest.importorskip("pandas")
    from pyspark.sql import SparkSession

    import onnx_esvd

    sys.path.insert(0, str(EXAMPLES))
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)  # the executors run this interpreter
    from spark_engine import spark_engine

    spark = (SparkSession.builder.master("local[2]").appName("onnx-esvd-test").config("spark.ui.enabled", "false")
             .getOrCreate())
    try:
        engine = spark_engine(spark)
        _same(onnx_esvd.repair(MODEL, shard_glob, **KW), onnx_esvd.repair(MODEL, shard_glob, engine=engine, **KW))
        one = onnx_esvd.check(MODEL, DATA, group="race1", target="ugpa", max_ks=0.5)
        assert onnx_esvd.check(MODEL, shard_glob, group="race1", target="ugpa", max_ks=0.5,
                               engine=engine).measured.metrics.ks == one.measured.metrics.ks
    finally:
        spark.stop()
        sys.path.remove(str(EXAMPLES))


def test_ray_recipe_equals_one_process(shard_glob):
    _wanted("ONNX_ESVD_TEST_RAY")
    ray = pytest.importorskip("ray")
    import onnx_esvd

    sys.path.insert(0, str(EXAMPLES))
    from ray_engine import ray_engine

    # the actors import the recipe module and onnx_esvd from here
    paths = os.pathsep.join([str(EXAMPLES), str(EXAMPLES.parent)])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": paths}})
    try:
        _same(onnx_esvd.repair(MODEL, shard_glob, **KW), onnx_esvd.repair(MODEL, shard_glob, engine=ray_engine(), **KW))
    finally:
        ray.shutdown()
        sys.path.remove(str(EXAMPLES))
