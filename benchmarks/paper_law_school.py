"""Reproduce the paper's Law School table with onnx-esvd's public API, and the refits' trade-off fronts.

For each seed: split the Law School data 70/15/15 (seeded), train the paper's 5-layer MLP with torch
(20 epochs of Adam, lr 1e-3 decayed by 0.8 per epoch, batch 128), export it with torch's legacy
exporter, and repair the second-last layer of the ONNX file from the training rows (as the paper
runs its Algorithm 2 on its training data; --holdout 0, so the fit uses every training row). Test
MSE and KS (black vs white) are measured on the 15% test split, which neither saw.

Rows: no repair; ESVD + plain least squares (the paper's Algorithm 2); ESVD + each refit of the
final node: `fair` (mean parity, the default), `moments` (mean and variance parity, var-gap 0),
`cdf` (least squares + lam x a CDF distance, lam 1 and 3), `w2` (lam 3); `cdf` tuning every linear
node (--tune-layers all: fine-tuning of the whole network, which gives up per-example fidelity to
the original model); the `fair` refit alone (c1 = c2 = 1); the budget search
`repair_within_budget(max_ks=0.06)`, fitted on every training row and ranking the settings on 5-fold
out-of-fold predictions on them (--budget-folds 0 --budget-holdout 0.2: the former ranking on a 20%
holdout of the training rows); and the Wasserstein-barycenter post-processor of Chzhen et al. (2020), which needs the
sensitive attribute at inference, fitted on the validation split.

The fronts (skip them with --no-sweep; --sweep-seeds N runs them on the first N seeds only): `fair`
over c1 in {1, 5, 15, 50, 150} x c2 in {1, 10, 150, 1000}; `moments` over var-gap in {0, 0.25, 0.5,
0.75, 1}; `cdf` over lam in {0.3, 1, 3, 10} (c1 = 15, c2 = 150).

    pip install -e ".[bench]"
    python benchmarks/paper_law_school.py [--seeds 10] [--sweep-seeds N] [--plot docs/law_school_tradeoff.png]
        [--cache DIR] [--json out.json] [--no-repairs] [--budget-folds K] [--budget-holdout H]

On a machine with few cores, run with OPENBLAS_NUM_THREADS=1: the penalised refits' skinny matrix
products were 10x slower with threaded BLAS on a busy machine.
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
VAR_GAPS = (0.0, 0.25, 0.5, 0.75, 1.0)
LAMS = (0.3, 1.0, 3.0, 10.0)
MAX_KS = 0.06
#: issue 12's bar for the budget row on Law School: test KS (budget + test-split noise) and test MSE.
BAR_KS, BAR_MSE = 0.085, 0.058

#: The paper's Table 1, Law School (MSE, KS), quoted.
PAPER = {
    "no post-processing (paper)": (0.055, 0.376),
    "Chzhen et al. (paper)": (0.061, 0.267),
    "Xian et al. (paper)": (0.062, 0.258),
    "ESVDFair (paper)": (0.088, 0.235),
}

NO_REPAIR = "no repair"
PLAIN = "ESVD + plain LS (Algorithm 2)"
FAIR = "ESVD + fair refit"
BUDGET_FOLDS, BUDGET_HOLDOUT = 5, 0.0
BUDGET = f"budget: repair_within_budget(max_ks={MAX_KS}), ranked out of fold"
CHZHEN = "Chzhen et al. barycenter (needs race at inference)"
TUNE_ALL = "ESVD + cdf lam 1, tune_layers=all (fine-tuning)"
#: The repaired rows: label -> repair options (c1 = 15, c2 = 150 unless given).
REPAIRS = {
    PLAIN: dict(refit="plain"),
    FAIR: dict(refit="fair"),
    "ESVD + moments refit (var_gap 0)": dict(refit="moments", var_gap=0.0),
    "ESVD + cdf refit (lam 1)": dict(refit="cdf", lam=1.0),
    "ESVD + cdf refit (lam 3)": dict(refit="cdf", lam=3.0),
    "ESVD + w2 refit (lam 3)": dict(refit="w2", lam=3.0),
    TUNE_ALL: dict(refit="cdf", lam=1.0, tune_layers="all"),
    "fair refit alone (c1 = c2 = 1)": dict(refit="fair", c1=1, c2=1),
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


def _summary(values: list) -> str:
    a = np.asarray(values, dtype=np.float64).reshape(-1, 2)
    return (f"{a[:, 0].mean():.4f} ± {a[:, 0].std(ddof=1):.4f}   {a[:, 1].mean():.3f} ± {a[:, 1].std(ddof=1):.3f}"
            if len(a) > 1 else f"{a[0, 0]:.4f}            {a[0, 1]:.3f}")


def _pareto(points: np.ndarray) -> np.ndarray:
    """The (MSE, KS) points no other point beats on both, sorted by KS; `points`: [n, 2]."""
    keep = [p for p in points if not any((q[0] <= p[0] and q[1] <= p[1]) and (q != p).any() for q in points)]
    return np.array(sorted(keep, key=lambda p: p[1]))


def _plot(path: Path, fronts: dict, methods: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    n_front = len(next(iter(fronts["fair"].values())))
    fair = {key: np.mean(v, axis=0) for key, v in fronts["fair"].items()}
    grid = np.array(list(fair.values()))
    front = _pareto(grid)
    for axis in (ax, zoom):
        axis.scatter(grid[:, 1], grid[:, 0], s=10, color="tab:blue", alpha=0.35)
        axis.plot(front[:, 1], front[:, 0], marker="o", ms=4, color="tab:blue",
                  label="fair: c1 x c2 grid (dots), its Pareto front (line)")
    for (c1, c2), (mse, ks) in fair.items():
        if any((front == (mse, ks)).all(axis=1)):
            zoom.annotate(f"{c1:g}/{c2:g}", (ks, mse), fontsize=6, color="tab:blue", xytext=(3, -8),
                          textcoords="offset points")
    for family, knob, color in (("moments", "var_gap", "tab:green"), ("cdf", "lam", "tab:orange")):
        keys = sorted(fronts[family])
        pts = np.array([np.mean(fronts[family][k], axis=0) for k in keys])
        for axis in (ax, zoom):
            axis.plot(pts[:, 1], pts[:, 0], marker="o", ms=4, color=color,
                      label=f"{family} over {knob} {', '.join(f'{k:g}' for k in keys)}")
        for k, (mse, ks) in zip(keys, pts):
            zoom.annotate(f"{k:g}", (ks, mse), fontsize=7, color=color, xytext=(3, 2), textcoords="offset points")
    marks = {NO_REPAIR: ("k", "s"), PLAIN: ("tab:gray", "v"), "ESVD + w2 refit (lam 3)": ("tab:brown", "P"),
             TUNE_ALL: ("tab:pink", "X"), BUDGET: ("tab:red", "o"), CHZHEN: ("tab:purple", "D")}
    for name, (color, marker) in marks.items():  # the rows on the seeds the fronts ran on
        values = [v for v in methods[name][:n_front] if v is not None]
        if not values:
            continue
        mse, ks = np.mean(values, axis=0)
        label = name if name != BUDGET else f"{name}, {len(values)} of {n_front} seeds met it"
        for axis in ((ax, zoom) if name not in (NO_REPAIR, PLAIN) else (ax,)):
            axis.scatter([ks], [mse], color=color, marker=marker, s=60, zorder=5,
                         label=label if axis is ax else None)
    mse, ks = PAPER["ESVDFair (paper)"]
    ax.scatter([ks], [mse], color="tab:red", marker="*", s=140, zorder=5, label="ESVDFair, the paper's Table 1")
    ax.set_title(f"Law School, paper MLP, test split, mean of {n_front} seed{'s' if n_front > 1 else ''}",
                 fontsize=9)
    zoom.set_title("the fronts up close (labels: c1/c2, var_gap, lam)", fontsize=9)
    for axis in (ax, zoom):
        axis.set_xlabel("KS between the groups' predictions (lower is fairer)")
        axis.set_ylabel("test MSE")
        axis.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper right")
    zoom.legend(fontsize=6.5, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def _fronts_from_json(saved: dict) -> dict:
    return {"fair": {tuple(float(c) for c in k.split(",")): v for k, v in saved["fronts"]["fair"].items()},
            "moments": {float(k): v for k, v in saved["fronts"]["moments"].items()},
            "cdf": {float(k): v for k, v in saved["fronts"]["cdf"].items()}}


def _report(methods: dict, budget_info: list, fronts: dict, elapsed: float) -> None:
    """Print the tables: the rows (mean ± std over seeds), the budget per seed, the fronts."""
    n = len(methods[NO_REPAIR])
    print()
    print(f"Law School (black vs white), paper MLP, legacy export, repair fitted on the training rows, "
          f"test split, mean ± std over {n} seeds ({datetime.date.today().isoformat()}, run time {elapsed:.0f}s):")
    print(f"{'method':72s}  {'MSE':>15s}  {'KS':>13s}")
    for name, values in methods.items():
        got = [v for v in values if v is not None]
        label = (f"{name} [{len(got)}/{n} seeds met it]" if name == BUDGET
                 else f"{name} [{len(got)} seeds]" if len(got) != n else name)
        print(f"{label:72s}  {_summary(got) if got else 'no seed met the budget' if name == BUDGET else 'not run'}")
    for name, (mse, ks) in PAPER.items():
        print(f"{name:72s}  {mse:.3f}            {ks:.3f}")
    print()
    print(f"tune_layers=all retrains every linear node (fine-tuning): the repaired model no longer tracks the")
    print(f"original one example by example, unlike the other rows, which change one node and refit the final one.")
    met = [(b, v) for b, v in zip(budget_info, methods[BUDGET]) if b["met"]]
    bar = [v for v in methods[BUDGET] if v is not None and v[1] <= BAR_KS and v[0] <= BAR_MSE]
    print()
    ranked = {b.get("ranked_on", "the holdout rows (20% of the training rows)") for b in budget_info}
    print(f"budget max_ks={MAX_KS}, settings ranked on {', '.join(sorted(ranked))}: a setting met the budget for "
          f"{len(met)} of {n} seeds; issue 12's bar (test KS <= {BAR_KS}, test MSE <= {BAR_MSE}) met for "
          f"{len(bar)} of {n}")
    print("  (OOF: pooled out-of-fold KS/MSE on the training rows; fit KS: the full refit on the rows it was fitted "
          "on; minority: black rows among them)")
    for b, v in zip(budget_info, methods[BUDGET]):
        oof = (f"OOF KS {b['oof_ks']:.3f} MSE {b['oof_mse']:.4f}, fit KS {b['fit_ks']:.3f}, minority "
               f"{b['minority']}" if b.get("oof_ks") is not None else f"holdout KS {b['holdout_ks']:.3f}")
        if b["met"]:
            runner = f"; runner-up {b['runner_up']}" if b.get("runner_up") else ""
            print(f"  seed {b['seed']}: {b['setting']:16s} {oof}  test MSE {v[0]:.4f}  test KS {v[1]:.3f}  "
                  f"{'meets' if v[1] <= BAR_KS and v[0] <= BAR_MSE else 'misses'} the bar{runner}")
        else:
            print(f"  seed {b['seed']}: no setting met the budget (closest: {b['closest']}, {oof})")
    if fronts["fair"]:
        m = len(next(iter(fronts["fair"].values())))
        print()
        print(f"fronts, mean test MSE / KS over {m} seeds (c1 = 15, c2 = 150 for moments and cdf):")
        print("fair, c1 \\ c2 " + "".join(f"{c2:>17d}" for c2 in C2_GRID))
        for c1 in C1_GRID:
            cells = "".join("   {:.4f} / {:.3f}".format(*np.mean(fronts["fair"][(c1, c2)], axis=0)) for c2 in C2_GRID)
            print(f"{c1:>13d} {cells}")
        print("moments var_gap " + "".join("   {:>4g}: {:.4f} / {:.3f}".format(g, *np.mean(fronts["moments"][g], axis=0))
                                           for g in VAR_GAPS))
        print("cdf lam         " + "".join("   {:>4g}: {:.4f} / {:.3f}".format(g, *np.mean(fronts["cdf"][g], axis=0))
                                           for g in LAMS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--no-sweep", action="store_true", help="skip the fronts (fair c1 x c2, moments, cdf)")
    ap.add_argument("--sweep-seeds", type=int, default=None, help="run the fronts on the first N seeds only")
    ap.add_argument("--plot", type=Path, default=None, help="write the trade-off plot (PNG) there")
    ap.add_argument("--json", type=Path, default=None, help="write every measured value there")
    ap.add_argument("--source", type=Path, default=law.DEFAULT_SOURCE)
    ap.add_argument("--cache", type=Path, default=None, help="keep/reuse the trained torch weights there")
    ap.add_argument("--tune-all-seeds", type=int, default=None,
                    help="run the tune_layers=all row (the slowest) on the first N seeds only")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new seed after this many minutes; the tables cover the seeds done")
    ap.add_argument("--seed-from", type=int, default=0, help="run seeds seed-from .. seeds-1")
    ap.add_argument("--no-repairs", action="store_true",
                    help="skip the fixed-setting repair rows (keep no repair, the budget and the barycenter)")
    ap.add_argument("--budget-folds", type=int, default=BUDGET_FOLDS,
                    help="folds of the budget's out-of-fold ranking (0: rank on the holdout)")
    ap.add_argument("--budget-holdout", type=float, default=BUDGET_HOLDOUT,
                    help="share of the training rows the budget holds out of the fit")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="only print the tables (and --plot) of earlier runs' --json files together")
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON",
                    help="only redraw --plot from the values an earlier run wrote with --json")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        _plot(args.plot or Path("docs/law_school_tradeoff.png"), _fronts_from_json(saved), saved["methods"])
        return
    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        methods = {k: [v for r in runs for v in r["methods"][k]] for k in runs[0]["methods"]}
        fronts = {fam: {} for fam in ("fair", "moments", "cdf")}
        for r in runs:
            for fam, points in _fronts_from_json(r).items():
                for key, v in points.items():
                    fronts[fam].setdefault(key, []).extend(v)
        print(f"merged {len(args.merge)} runs: seeds " + ", ".join(str(b["seed"]) for r in runs for b in r["budget"]))
        _report(methods, [b for r in runs for b in r["budget"]], fronts, sum(r.get("elapsed", 0) for r in runs))
        if args.plot and fronts["fair"]:
            _plot(args.plot, fronts, methods)
        return

    import torch

    torch.set_num_threads(1)
    raw, y, race = law.load(args.source)
    methods: dict[str, list] = {k: [] for k in (NO_REPAIR, *REPAIRS, BUDGET, CHZHEN)}
    budget_info: list[dict] = []
    fronts: dict[str, dict] = {"fair": {}, "moments": {}, "cdf": {}}
    sweep_seeds = 0 if args.no_sweep else min(args.seeds, args.sweep_seeds or args.seeds)
    started = time.perf_counter()
    for seed in range(args.seed_from, args.seeds):
        data = law.split(raw, y, race, seed)
        model = law.export(torch, law.trained(torch, data, seed, args.cache), data.X[:4])
        test = data.test
        base = law.predict(model, data.X[test])
        methods[NO_REPAIR].append(law.scores(base, data, test))
        calib = data.table(data.train)
        done: dict[tuple, tuple[float, float]] = {}

        def repaired(c1: float = 15, c2: float = 150, **options) -> tuple[float, float]:
            key = (c1, c2, *sorted(options.items()))
            if key not in done:
                res = onnx_esvd.repair(model, calib, layer=-2, group="race1", target="ugpa", holdout=0, bootstrap=0,
                                       c1=c1, c2=c2, **options)
                done[key] = law.scores(law.predict(res.model, data.X[test]), data, test)
            return done[key]

        for name, options in ({} if args.no_repairs else REPAIRS).items():
            if name != TUNE_ALL or seed < (args.tune_all_seeds if args.tune_all_seeds is not None else args.seeds):
                methods[name].append(repaired(**options))
        t_budget = time.perf_counter()
        budget = onnx_esvd.repair_within_budget(model, calib, layer=-2, group="race1", target="ugpa", max_ks=MAX_KS,
                                                holdout=args.budget_holdout, folds=args.budget_folds, bootstrap=0)
        knob = {"moments": " var_gap {:g}", "cdf": " lam {:g}", "w2": " lam {:g}"}

        def named(point) -> str:
            spec = point.setting
            return spec.mode + knob.get(spec.mode, "").format(spec.var_gap if spec.mode == "moments" else spec.lam)

        def ranks(point) -> dict:
            o = point.oof
            return ({"holdout_ks": point.metrics.ks} if o is None else
                    {"oof_ks": o.ks, "oof_mse": o.mse, "fit_ks": o.fit_ks, "minority": o.minority[1]})

        info = {"seed": seed, "ranked_on": budget.ranked_on, "seconds": time.perf_counter() - t_budget,
                "table": [{"setting": named(p), **ranks(p)} for p in budget.sweep.points]}
        if budget.result is not None:
            methods[BUDGET].append(law.scores(law.predict(budget.result.model, data.X[test]), data, test))
            budget_info.append({**info, "met": True, "setting": named(budget.winner), **ranks(budget.winner),
                                "runner_up": None if budget.runner_up is None else named(budget.runner_up)})
        else:
            methods[BUDGET].append(None)
            budget_info.append({**info, "met": False, "closest": named(budget.closest), **ranks(budget.closest)})
        bary = WassersteinBarycenter(seed).fit(law.predict(model, data.X[data.val]), data.race[data.val])
        methods[CHZHEN].append(law.scores(bary.transform(base, data.race[test]), data, test))
        if seed < sweep_seeds:
            for c1 in C1_GRID:
                for c2 in C2_GRID:
                    fronts["fair"].setdefault((c1, c2), []).append(repaired(c1=c1, c2=c2, refit="fair"))
            for g in VAR_GAPS:
                fronts["moments"].setdefault(g, []).append(repaired(refit="moments", var_gap=g))
            for lam in LAMS:
                fronts["cdf"].setdefault(lam, []).append(repaired(refit="cdf", lam=lam))
        b = budget_info[-1]
        rk = (f"OOF KS {b['oof_ks']:.3f}, fit KS {b['fit_ks']:.3f}, minority {b['minority']}" if "oof_ks" in b
              else f"holdout KS {b['holdout_ks']:.3f}")
        btxt = (f"budget {b['setting']} ({rk}; {b['seconds']:.0f}s)" if b["met"]
                else f"budget not met (closest {b['closest']}, {rk}; {b['seconds']:.0f}s)")
        print("  budget table: " + "; ".join(
            f"{r['setting']} " + (f"OOF {r['oof_ks']:.3f}/{r['oof_mse']:.4f} fit {r['fit_ks']:.3f}" if "oof_ks" in r
                                  else f"holdout {r['holdout_ks']:.3f}") for r in b["table"]), flush=True)
        line = "  ".join(f"{name.split(' (')[0].replace('ESVD + ', '')} {v[-1][0]:.4f}/{v[-1][1]:.3f}"
                         for name, v in methods.items() if len(v) == seed + 1 - args.seed_from and v[-1] is not None)
        print(f"seed {seed}: {line}  {btxt}  [{time.perf_counter() - started:.0f}s]", flush=True)
        if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes and \
                seed + 1 < args.seeds:
            print(f"--max-minutes {args.max_minutes:g} reached: stopping after {seed + 1 - args.seed_from} of "
                  f"{args.seeds - args.seed_from} seeds")
            break

    elapsed = time.perf_counter() - started
    _report(methods, budget_info, fronts, elapsed)
    if args.plot and fronts["fair"]:
        _plot(args.plot, fronts, methods)
    if args.json:
        args.json.write_text(json.dumps({
            "seeds": len(methods[NO_REPAIR]), "elapsed": elapsed, "methods": methods, "budget": budget_info,
            "fronts": {"fair": {f"{c1},{c2}": v for (c1, c2), v in fronts["fair"].items()},
                       "moments": {f"{k:g}": v for k, v in fronts["moments"].items()},
                       "cdf": {f"{k:g}": v for k, v in fronts["cdf"].items()}}}, indent=1))


if __name__ == "__main__":
    main()
