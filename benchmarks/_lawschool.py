"""Shared pieces of the Law School benchmarks: seeded split, the paper's MLP, export, evaluation.

The data loading and the training loop are the fixture script's own (fixtures/make_fixtures.py), so
the benchmarks train exactly as the committed fixtures were trained.
"""

from __future__ import annotations

import io
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared/data/law_school/bar_pass_prediction.csv"
sys.path.insert(0, str(ROOT / "fixtures"))

from make_fixtures import load_law_school, train_torch  # noqa: E402

import onnx_esvd  # noqa: E402

#: The paper's architecture: 4 x 256 ReLU + 1.
WIDTHS = (5, 256, 256, 256, 256, 1)


@dataclass(frozen=True)
class Split:
    """One seeded 70/15/15 split, features standardised with the training rows' statistics."""

    X: np.ndarray  # [n, 5] float32
    y: np.ndarray  # [n] float64 (ugpa)
    race: np.ndarray  # [n] str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def table(self, rows: np.ndarray, input_name: str = "x") -> dict[str, np.ndarray]:
        return {input_name: self.X[rows], "race1": self.race[rows], "ugpa": self.y[rows]}


def load(source: Path = DEFAULT_SOURCE):
    raw, y, race, _ = load_law_school(source)
    return raw, y, race


def split(raw: np.ndarray, y: np.ndarray, race: np.ndarray, seed: int) -> Split:
    perm = np.random.default_rng(seed).permutation(len(y))
    n_tr, n_va = int(0.70 * len(y)), int(0.15 * len(y))
    tr, va, te = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
    mean, std = raw[tr].mean(0), raw[tr].std(0)
    X = ((raw - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    return Split(X, y, race, tr, va, te)


def torch_mlp(torch, seed: int):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(WIDTHS) - 1):
        layers.append(torch.nn.Linear(WIDTHS[i], WIDTHS[i + 1]))
        if i < len(WIDTHS) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def train(torch, data: Split, seed: int):
    """The paper's recipe: 20 epochs of Adam (lr 1e-3, decay 0.8 per epoch), batch 128."""
    net = torch_mlp(torch, seed)
    return train_torch(net, data.X[data.train], data.y[data.train].reshape(-1, 1), seed=seed)


def export(torch, net, sample: np.ndarray, dynamo: bool = False) -> onnx.ModelProto:
    """ONNX export with torch's legacy exporter, or the dynamo one (output squeezed to [N])."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    class Squeezed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).squeeze(-1)

    x = torch.from_numpy(sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(Squeezed(), (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                     dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, report=False,
                                     verbose=False)
            return prog.model_proto
        buf = io.BytesIO()
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        return onnx.load_from_string(buf.getvalue())


def predict(model: onnx.ModelProto, X: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: X})[0].reshape(-1).astype(np.float64)


def scores(pred: np.ndarray, data: Split, rows: np.ndarray) -> tuple[float, float]:
    """(MSE, KS between black and white) of predictions for `rows`."""
    black = data.race[rows] == "black"
    return float(np.mean((pred - data.y[rows]) ** 2)), onnx_esvd.ks_statistic(pred[black], pred[~black])
