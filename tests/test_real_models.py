"""The exporters' models and the real-world data files of fixtures/ (issue 10): each repaired through the API,
its before/after numbers checked against a plain onnxruntime run and scipy on the same holdout rows, and the same
layer weights from every equivalent form of the same data."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FIXTURES
from onnx import numpy_helper
from scipy.stats import ks_2samp

from onnx_esvd import repair
from onnx_esvd.rows import row_uniform
from onnx_esvd.errors import DataError
from onnx_esvd.pipeline import METADATA_KEY

SHUFFLED = FIXTURES / "law_named_shuffled.csv"


def read_csv(path, delimiter=","):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def scored(model_path, tab, output, column=None):
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in sess.get_inputs():
        if inp.type == "tensor(string)":
            feeds[inp.name] = tab[inp.name].astype(object).reshape(-1, 1)
            continue
        width = int(np.prod(inp.shape[1:])) if len(inp.shape) > 1 else 1
        cols = [inp.name] if width == 1 and inp.name in tab else [f"{inp.name}_{j}" for j in range(width)]
        feeds[inp.name] = np.stack([tab[c].astype(np.float32) for c in cols], 1).reshape(-1, *inp.shape[1:])
    n = len(next(iter(tab.values())))
    if sess.get_inputs()[0].shape[0] == 1:  # a fixed batch of one
        y = np.concatenate([sess.run([output], {k: v[i:i + 1] for k, v in feeds.items()})[0] for i in range(n)])
    else:
        y = sess.run([output], feeds)[0]
    y = np.asarray(y, dtype=np.float64).reshape(n, -1)
    return y[:, column if column is not None else (1 if y.shape[1] == 2 else 0)]


CASES = {
    # model, data, score (None: default), output fetched, layer
    "two heads": ("two_head_legacy.onnx", "two_head.csv", "a_hat", "a_hat", 2),
    "fixed batch 1": ("fixed_batch1.onnx", "law_bom.csv", None, "y", -2),
    "dynamo external data": ("dynamo_external/model.onnx", "law_named_shuffled.csv", None, "y", -2),
    "input [N, 1, 5]": ("input_n1d.onnx", "law.tsv", None, "y", -2),
    "softmax classifier": ("softmax_classifier.onnx", "law_named_shuffled.csv", None, "probs", -2),
    "sklearn classifier, ZipMap": ("sklearn_classifier.onnx", "law_named_shuffled.csv", None, "probs*", -2),
    "sklearn ColumnTransformer": ("sklearn_columntransformer.onnx", "law_columntransformer.csv", None, "variable", -2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_model_numbers_match_a_direct_computation(case, tmp_path):
    model, data, score, output, layer = CASES[case]
    path, data_path = FIXTURES / model, FIXTURES / data
    res = repair(path, data_path, layer=layer, group="race1", target="ugpa", score=score, bootstrap=0)
    tab = read_csv(data_path, "\t" if data.endswith(".tsv") else ",")
    rep = row_uniform(0, 0, len(tab["race1"])) < 0.2
    g = tab["race1"][rep]
    target = tab["ugpa"][rep].astype(np.float64)
    for metrics, model_path in ((res.before, path), (res.after, None)):
        if model_path is None:
            model_path = tmp_path / "repaired.onnx"
            onnx.save(res.model, str(model_path))
        if output == "probs*":  # ZipMap: score the probability tensor behind it
            m = onnx.load(str(model_path))
            zipmap = next(n for n in m.graph.node if n.op_type == "ZipMap")
            m.graph.output.append(onnx.helper.make_tensor_value_info(zipmap.input[0], onnx.TensorProto.FLOAT, None))
            tmp = tmp_path / "with_probabilities.onnx"
            onnx.save(m, str(tmp))
            y = scored(tmp, tab, zipmap.input[0])[rep]
        else:
            y = scored(model_path, tab, output)[rep]
        assert metrics.ks == pytest.approx(ks_2samp(y[g == "black"], y[g == "white"]).statistic, abs=1e-9), case
        assert metrics.mse == pytest.approx(np.mean((y - target) ** 2), rel=1e-5), case
    # (whether KS falls on ~40 minority holdout rows is noise-level here; the numbers above are what is tested)


def _weights(res):
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in res.model.graph.initializer}


def test_same_weights_from_every_equivalent_form_of_the_data():
    model = FIXTURES / "law_school_mlp_legacy.onnx"
    kw = dict(layer=-2, group="race1", target="ugpa", bootstrap=0)
    ref = repair(model, SHUFFLED, **kw)
    forms = [FIXTURES / f for f in ("law_bom.csv", "law.csv.gz", "law.tsv", "law_semicolon.csv")]
    results = [repair(model, f, **kw) for f in forms]
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    results.append(repair(model, FIXTURES / "law.parquet", **kw))
    frame = pd.read_csv(SHUFFLED)
    results.append(repair(model, frame, **kw))
    cat = frame.assign(race1=frame["race1"].astype("category"))
    results.append(repair(model, cat, **kw))
    results.append(repair(model, frame.assign(race1=frame["race1"].astype("string")), **kw))
    want = _weights(ref)
    for form, res in zip([*forms, "parquet", "DataFrame", "category", "string"], results):
        got = _weights(res)
        for name, w in want.items():
            scale = max(np.max(np.abs(w)), 1e-30)
            assert np.max(np.abs(got[name] - w)) <= 1e-6 * scale, (form, name)
        assert res.after.ks == pytest.approx(ref.after.ks, abs=1e-9), form


def test_decimal_commas_are_refused_with_one_line():
    with pytest.raises(DataError, match="decimal comma"):
        repair(FIXTURES / "law_school_mlp_legacy.onnx", FIXTURES / "law_semicolon_decimal_comma.csv", layer=-2,
               group="race1", target="ugpa")


def test_repairing_a_repaired_model_warns(tmp_path):
    first = repair(FIXTURES / "law_school_mlp_legacy.onnx", SHUFFLED, layer=-2, group="race1", target="ugpa",
                   bootstrap=0)
    assert any(p.key == METADATA_KEY for p in first.model.metadata_props)
    again = repair(first.model, SHUFFLED, layer=-2, group="race1", target="ugpa", bootstrap=0)
    assert any("already carries an onnx_esvd.repair record" in w for w in again.warnings)


def test_gram_route_of_the_esvd_steps_keeps_real_layers_to_1e9(monkeypatch):
    """The ESVD steps' thin SVD through the Gram matrix (used from GRAM_FROM singular values on) against LAPACK's
    SVD on every repairable layer of the fixtures' real, rank-deficient models (dead ReLU units)."""
    import onnx_esvd.esvd as esvd_mod
    import onnx_esvd.pipeline as pipeline_mod

    seen = []
    real_esvd = pipeline_mod.esvd
    monkeypatch.setattr(pipeline_mod, "esvd", lambda w, stats, **kw: seen.append((w, stats, kw)) or real_esvd(
        w, stats, **kw))
    for model in ("law_school_mlp_legacy.onnx", "law_school_mlp_dynamo.onnx"):
        for layer in (0, 1, -2):
            repair(FIXTURES / model, FIXTURES / "law_school.csv", layer=layer, group="race1", target="ugpa",
                   refit="fair", bootstrap=0)
    assert len(seen) == 6
    deficient = 0
    for w, stats, kw in seen:
        monkeypatch.setattr(esvd_mod, "GRAM_FROM", 10**9)
        by_svd = esvd_mod.esvd(w, stats, **kw)
        monkeypatch.setattr(esvd_mod, "GRAM_FROM", 1)
        by_gram = esvd_mod.esvd(w, stats, **kw)
        for got, want in ((by_gram.weight, by_svd.weight), (by_gram.weight_step1, by_svd.weight_step1)):
            assert np.max(np.abs(got - want)) <= 1e-9 * np.max(np.abs(want))
        assert not np.array_equal(by_gram.weight, by_svd.weight)  # the routes differ (so this compares two)
        deficient += by_svd.second.rank < w.shape[1]
    assert deficient  # some of these layers are rank deficient
