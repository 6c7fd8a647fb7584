"""Models stored with external data: load, repair and save with the data next to the output."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import FIXTURES, external_data_copy
from onnx_esvd import ModelError, repair
from onnx_esvd.modelio import load_model, save_model

LEGACY = FIXTURES / "law_school_mlp_legacy.onnx"
DATA = FIXTURES / "law_school.csv"


def _external_copy(tmp_path: Path) -> Path:
    model = onnx.load(str(LEGACY))
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    return path


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_external_data_round_trip(tmp_path):
    src = _external_copy(tmp_path)
    res = repair(src, DATA, layer=-2, group="race1", target="ugpa")
    assert res.external_data
    out = res.save(tmp_path / "fixed.onnx")
    assert [p.name for p in tmp_path.glob("fixed.onnx.*.data")] == [_data_file(out).name]
    # the graph file itself holds no weights: they live in the data file next to it
    assert os.path.getsize(out) < 50_000
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved)
    before, after = _arrays(onnx.load(str(LEGACY))), _arrays(saved)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert changed == {res.layer.weight, res.final.weight, res.final.bias}


def _data_file(model_path: Path) -> Path:
    """The one external data file a saved model refers to."""
    proto = onnx.load(str(model_path), load_external_data=False)
    names = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert len(names) == 1, names
    return model_path.parent / names.pop()


def test_stale_data_file_is_replaced_not_appended(tmp_path):
    src = _external_copy(tmp_path)
    res = repair(src, DATA, layer=-2, group="race1", target="ugpa")
    res.save(tmp_path / "fixed.onnx")
    size = os.path.getsize(_data_file(tmp_path / "fixed.onnx"))
    res.save(tmp_path / "fixed.onnx", force=True)
    assert os.path.getsize(_data_file(tmp_path / "fixed.onnx")) == size
    assert len(list(tmp_path.glob("fixed.onnx*.data"))) == 1
    saved = _arrays(onnx.load(str(tmp_path / "fixed.onnx")))
    assert np.array_equal(saved[res.layer.weight], numpy_helper.to_array(
        next(t for t in res.model.graph.initializer if t.name == res.layer.weight)))


def test_external_location_outside_the_model_directory_is_refused(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    escaped = external_data_copy(tmp_path, lambda location: "../" + location)
    path = inner / "escape.onnx"
    with open(path, "wb") as f:
        f.write(escaped.SerializeToString())
    with pytest.raises(ModelError, match="outside the model's directory"):
        load_model(path)


def test_save_leaves_no_temporary_files(tmp_path):
    res = repair(LEGACY, DATA, layer=-2, group="race1", target="ugpa")
    save_model(res.model, tmp_path / "fixed.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]
