"""Reproduce the paper's Law School table with onnx-esvd's public API, and the c1/c2 trade-off.

For each seed: split the Law School data 70/15/15 (seeded), train the paper's 5-layer MLP with torch
(20 epochs of Adam, lr 1e-3 decayed by 0.8 per epoch, batch 128), export it with torch's legacy
exporter, and repair the second-last layer of the ONNX file from the training rows (as the paper
runs its Algorithm 2 on its training data; --holdout 0, so the fit uses every training row). Test
MSE and KS (black vs white) are measured on the 15% test split, which neither saw.

Rows: no repair; ESVD + plain least squares (the paper's Algorithm 2); ESVD + `fair` refit (our
default); the `fair` refit alone (c1 = c2 = 1); and the Wasserstein-barycenter post-processor of
Chzhen et al. (2020), which needs the sensitive attribute at inference, fitted on the validation
split. The sweep repairs with every c1 in {1, 5, 15, 50, 150} and c2 in {1, 10, 150, 1000}.

    pip install -e ".[bench]"
    python benchmarks/paper_law_school.py [--seeds 10] [--plot docs/law_school_tradeoff.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np

import _lawschool as law
import onnx_esvd

C1_GRID = (1, 5, 15, 50, 150)
C2_GRID = (1, 10, 150, 1000)

#: The paper's Table 1, Law School (MSE, KS), quoted.
PAPER = {
    "no post-processing (paper)": (0.055, 0.376),
    "Chzhen et al. (paper)": (0.061, 0.267),
    "Xian et al. (paper)": (0.062, 0.258),
    "ESVDFair (paper)": (0.088, 0.235),
}


class WassersteinBarycenter:
    """Chzhen, Denis, Hebiri, Oneto, Pontil (2020), "Fair regression with Wasserstein barycenters".

    The fair prediction for a person of group s with score f is sum_s' p_s' Q_s'(F_s(f)): their
    score's rank within their own group, read off as the barycenter of the groups' quantile
    functions. F_s is the jittered empirical CDF of group s's scores on unlabeled calibration rows
    (ties broken uniformly at random, as in the paper), Q_s' the empirical quantile function.
    Needs the group of every person at inference.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def fit(self, scores: np.ndarray, groups: np.ndarray) -> "WassersteinBarycenter":
        self.labels = sorted(set(groups.tolist()))
        self.sorted = {g: np.sort(scores[groups == g]) for g in self.labels}
        n = len(scores)
        self.weight = {g: float(np.sum(groups == g)) / n for g in self.labels}
        return self

    def _cdf(self, g, values: np.ndarray) -> np.ndarray:
        ref = self.sorted[g]
        below = np.searchsorted(ref, values, side="left")
        ties = np.searchsorted(ref, values, side="right") - below
        return (below + self.rng.uniform(0.0, 1.0, len(values)) * (ties + 1)) / (len(ref) + 1)

    def _quantile(self, g, u: np.ndarray) -> np.ndarray:
        ref = self.sorted[g]
        idx = np.clip(np.ceil(u * len(ref)).astype(int) - 1, 0, len(ref) - 1)
        return ref[idx]

    def transform(self, scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
        out = np.empty_like(scores, dtype=np.float64)
        for g in self.labels:
            mask = groups == g
            u = self._cdf(g, scores[mask])
            out[mask] = sum(self.weight[h] * self._quantile(h, u) for h in self.labels)
        return out


def _summary(values: list[tuple[float, float]]) -> str:
    a = np.asarray(values)
    return (f"{a[:, 0].mean():.4f} ± {a[:, 0].std(ddof=1):.4f}   {a[:, 1].mean():.3f} ± {a[:, 1].std(ddof=1):.3f}"
            if len(a) > 1 else f"{a[0, 0]:.4f}            {a[0, 1]:.3f}")


def _plot(path: Path, sweep: dict, methods: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    colors = dict(zip(C2_GRID, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for c2 in C2_GRID:
        pts = np.array([np.mean(sweep[(c1, c2)], axis=0) for c1 in C1_GRID])
        for axis in (ax, zoom):
            axis.plot(pts[:, 1], pts[:, 0], marker="o", ms=4, color=colors[c2], label=f"ESVD + fair, c2 = {c2}")
        for c1, (mse, ks) in zip(C1_GRID, pts):
            zoom.annotate(f"{c1}", (ks, mse), fontsize=7, color=colors[c2], xytext=(3, 2), textcoords="offset points")
    marks = {"no repair": ("k", "s"), "ESVD + plain LS (Algorithm 2)": ("tab:gray", "v"),
             "Chzhen et al. barycenter (needs race at inference)": ("tab:purple", "D")}
    for name, (color, marker) in marks.items():
        mse, ks = np.mean(methods[name], axis=0)
        ax.scatter([ks], [mse], color=color, marker=marker, s=60, zorder=5, label=name)
    mse, ks = PAPER["ESVDFair (paper)"]
    ax.scatter([ks], [mse], color="tab:red", marker="*", s=140, zorder=5, label="ESVDFair, the paper's Table 1")
    ax.set_title(f"Law School, paper MLP, test split, mean of {len(methods['no repair'])} seeds")
    zoom.set_title("the sweep up close (labels: c1)")
    for axis in (ax, zoom):
        axis.set_xlabel("KS between the groups' predictions (lower is fairer)")
        axis.set_ylabel("test MSE")
        axis.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--no-sweep", action="store_true", help="skip the c1 x c2 trade-off sweep")
    ap.add_argument("--plot", type=Path, default=None, help="write the trade-off plot (PNG) there")
    ap.add_argument("--json", type=Path, default=None, help="write every measured value there")
    ap.add_argument("--source", type=Path, default=law.DEFAULT_SOURCE)
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON",
                    help="only redraw --plot from the values an earlier run wrote with --json")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        sweep = {tuple(int(c) for c in key.split(",")): v for key, v in saved["sweep"].items()}
        _plot(args.plot or Path("docs/law_school_tradeoff.png"), sweep, saved["methods"])
        return

    import torch

    torch.set_num_threads(2)
    raw, y, race = law.load(args.source)
    methods: dict[str, list[tuple[float, float]]] = {k: [] for k in (
        "no repair", "ESVD + plain LS (Algorithm 2)", "ESVD + fair refit (default)", "fair refit alone (c1 = c2 = 1)",
        "Chzhen et al. barycenter (needs race at inference)")}
    sweep: dict[tuple[int, int], list[tuple[float, float]]] = {}
    started = time.perf_counter()
    for seed in range(args.seeds):
        data = law.split(raw, y, race, seed)
        net = law.train(torch, data, seed)
        model = law.export(torch, net, data.X[:4])
        test = data.test
        base = law.predict(model, data.X[test])
        methods["no repair"].append(law.scores(base, data, test))
        calib = data.table(data.train)

        def repaired(**options) -> tuple[float, float]:
            res = onnx_esvd.repair(model, calib, layer=-2, group="race1", target="ugpa", holdout=0, **options)
            return law.scores(law.predict(res.model, data.X[test]), data, test)

        methods["ESVD + plain LS (Algorithm 2)"].append(repaired(c1=15, c2=150, refit="plain"))
        methods["ESVD + fair refit (default)"].append(repaired(c1=15, c2=150, refit="fair"))
        methods["fair refit alone (c1 = c2 = 1)"].append(repaired(c1=1, c2=1, refit="fair"))
        bary = WassersteinBarycenter(seed).fit(law.predict(model, data.X[data.val]), data.race[data.val])
        methods["Chzhen et al. barycenter (needs race at inference)"].append(
            law.scores(bary.transform(base, data.race[test]), data, test))
        if not args.no_sweep:
            for c1 in C1_GRID:
                for c2 in C2_GRID:
                    point = methods["ESVD + fair refit (default)"][-1] if (c1, c2) == (15, 150) else \
                        methods["fair refit alone (c1 = c2 = 1)"][-1] if (c1, c2) == (1, 1) else repaired(c1=c1, c2=c2)
                    sweep.setdefault((c1, c2), []).append(point)
        line = "  ".join(f"{name.split(' (')[0]} {v[-1][0]:.4f}/{v[-1][1]:.3f}" for name, v in methods.items())
        print(f"seed {seed}: {line}  [{time.perf_counter() - started:.0f}s]", flush=True)

    n = args.seeds
    print()
    print(f"Law School, test split, mean ± std over {n} seeds "
          f"({datetime.date.today().isoformat()}, {time.perf_counter() - started:.0f}s):")
    print(f"{'method':52s}  {'MSE':>15s}  {'KS':>13s}")
    for name, values in methods.items():
        print(f"{name:52s}  {_summary(values)}")
    for name, (mse, ks) in PAPER.items():
        print(f"{name:52s}  {mse:.3f}            {ks:.3f}")
    if sweep:
        print()
        print(f"trade-off, ESVD + fair refit, mean test MSE / KS over {n} seeds:")
        print("c1 \\ c2 " + "".join(f"{c2:>17d}" for c2 in C2_GRID))
        for c1 in C1_GRID:
            cells = "".join(f"   {np.mean(sweep[(c1, c2)], axis=0)[0]:.4f} / {np.mean(sweep[(c1, c2)], axis=0)[1]:.3f}"
                            for c2 in C2_GRID)
            print(f"{c1:>7d} {cells}")
    if args.plot and sweep:
        _plot(args.plot, sweep, methods)
    if args.json:
        args.json.write_text(json.dumps({"seeds": n, "methods": methods,
                                         "sweep": {f"{c1},{c2}": v for (c1, c2), v in sweep.items()}}, indent=2))


if __name__ == "__main__":
    main()
