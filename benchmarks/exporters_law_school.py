"""Default repair on Law School models from every exporter, measured on a separate test split.

For each seed: split the Law School data 70/15/15 (seeded), train the paper's MLP with torch and
export it with the legacy and the dynamo exporter, train an scikit-learn MLPRegressor of the same
shape and convert it with skl2onnx; repair the second-last layer with the default options, using
the calibration split given by --calib; measure MSE and KS on the test split, which neither the
training nor the repair saw.

    pip install -e ".[bench]"      # torch==2.13.0, onnxscript, scikit-learn, skl2onnx
    python benchmarks/exporters_law_school.py --seeds 5 [--calib train|val] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

import _lawschool as law
import onnx_esvd


def _sklearn(X, y, seed) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    sk = MLPRegressor(hidden_layer_sizes=tuple(law.WIDTHS[1:-1]), batch_size=128, learning_rate_init=1e-3,
                      max_iter=20, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk.fit(X, y)
    return convert_sklearn(sk, name="mlp", initial_types=[("X", FloatTensorType([None, X.shape[1]]))],
                           target_opset=17)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--calib", choices=["train", "val"], default="train",
                    help="rows the repair is fitted on (train: the model's training rows, as in the paper)")
    ap.add_argument("--source", type=Path, default=law.DEFAULT_SOURCE)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    raw, y, race = law.load(args.source)
    rows: list[dict] = []
    t_start = time.perf_counter()
    for seed in range(args.seeds):
        data = law.split(raw, y, race, seed)
        net = law.train(torch, data, seed)
        models = {
            "torch legacy": law.export(torch, net, data.X[:4], dynamo=False),
            "torch dynamo": law.export(torch, net, data.X[:4], dynamo=True),
            "skl2onnx": _sklearn(data.X[data.train], data.y[data.train], seed),
        }
        calib = data.train if args.calib == "train" else data.val
        for name, model in models.items():
            t0 = time.perf_counter()
            result = onnx_esvd.repair(model, data.table(calib, model.graph.input[0].name), layer=-2,
                                      group="race1", target="ugpa")
            seconds = time.perf_counter() - t0
            mse0, ks0 = law.scores(law.predict(model, data.X[data.test]), data, data.test)
            mse1, ks1 = law.scores(law.predict(result.model, data.X[data.test]), data, data.test)
            row = dict(seed=seed, exporter=name, mse_before=mse0, mse_after=mse1, ks_before=ks0, ks_after=ks1,
                       ks_cut=1 - ks1 / ks0, mse_ratio=mse1 / mse0, repair_seconds=seconds)
            rows.append(row)
            print(f"seed {seed} {name:13s} MSE {mse0:.4f} -> {mse1:.4f} ({mse1 / mse0:.2f}x)  "
                  f"KS {ks0:.3f} -> {ks1:.3f} ({100 * (1 - ks1 / ks0):.0f}% cut)  repair {seconds:.1f}s  "
                  f"[{time.perf_counter() - t_start:.0f}s]", flush=True)
    print()
    print(f"summary over {args.seeds} seeds, calibration = {args.calib} split, test split = 15%:")
    print(f"{'exporter':13s}  {'MSE before':>10s}  {'MSE after':>9s}  {'ratio':>11s}  {'KS before':>9s}  "
          f"{'KS after':>8s}  {'KS cut (min)':>12s}")
    for name in ("torch legacy", "torch dynamo", "skl2onnx"):
        sel = [r for r in rows if r["exporter"] == name]
        a = {k: np.array([r[k] for r in sel]) for k in sel[0] if k != "exporter"}
        print(f"{name:13s}  {a['mse_before'].mean():10.4f}  {a['mse_after'].mean():9.4f}  "
              f"{a['mse_ratio'].mean():5.2f} ({a['mse_ratio'].max():.2f})  {a['ks_before'].mean():9.3f}  "
              f"{a['ks_after'].mean():8.3f}  {100 * a['ks_cut'].mean():5.0f}% ({100 * a['ks_cut'].min():.0f}%)")
    if args.json:
        args.json.write_text(json.dumps({"calib": args.calib, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
