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


#: The five values of the raw `race1` column (rows with an empty value are dropped).
RACES = ("white", "black", "hisp", "asian", "other")


def load_all_races(source: Path = DEFAULT_SOURCE):
    """Every row whose `race1` is one of RACES, with the fixture loader's five features and target.

    Returns (raw [n, 5] float64, y [n] float64, race [n] str, dropped rows).
    """
    import csv

    with open(source, newline="", encoding="utf-8") as f:
        every = list(csv.DictReader(f))
    rows = [r for r in every if r["race1"] in RACES]
    gender = [r["gender"] for r in rows]
    raw = np.empty((len(rows), 5), dtype=np.float64)
    raw[:, 0] = [float(r["dnn_bar_pass_prediction"]) for r in rows]
    raw[:, 1] = [1.0 if gd == "female" else 0.0 for gd in gender]
    raw[:, 2] = [1.0 if gd == "male" else 0.0 for gd in gender]
    raw[:, 3] = [float(r["lsat"]) for r in rows]
    raw[:, 4] = [float(r["pass_bar"]) for r in rows]
    y = np.array([float(r["ugpa"]) for r in rows], dtype=np.float64)
    race = np.array([r["race1"] for r in rows], dtype="<U5")
    return raw, y, race, len(every) - len(rows)


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


def trained(torch, data: Split, seed: int, cache: Path | None = None, tag: str = "bw"):
    """The paper MLP for `seed` trained on `data`'s training rows (`train`).

    With `cache`, the weights are kept there as `{tag}_seed{seed}.pt` and read back on the next call, so
    several benchmarks share one training run per seed (`tag` names the data the split was drawn from).
    """
    path = cache / f"{tag}_seed{seed}.pt" if cache else None
    if path is not None and path.exists():
        net = torch_mlp(torch, seed)
        net.load_state_dict(torch.load(path))
        return net.eval()
    net = train(torch, data, seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    return net


def predict(model: onnx.ModelProto, X: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: X})[0].reshape(-1).astype(np.float64)


def scores(pred: np.ndarray, data: Split, rows: np.ndarray) -> tuple[float, float]:
    """(MSE, KS between black and white) of predictions for `rows`."""
    black = data.race[rows] == "black"
    return float(np.mean((pred - data.y[rows]) ** 2)), onnx_esvd.ks_statistic(pred[black], pred[~black])
