"""`repair --max-ks` on held-out Law School models: is the test KS near the budget, at what MSE?

For each seed: the paper's split, MLP and legacy export (as benchmarks/paper_law_school.py); the
repair is fitted on the training rows with the default holdout of 0.2. The KS budget is searched
over the default grid (20 settings, `fair` refit) and compared with the single default run
(c1 = 15, c2 = 150). Both models are measured on the test split, which neither saw.

    python benchmarks/budget_law_school.py [--seeds 5] [--max-ks 0.15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import _lawschool as law
import onnx_esvd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--max-ks", type=float, default=0.15)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    raw, y, race = law.load()
    rows = []
    started = time.perf_counter()
    for seed in range(args.seeds):
        data = law.split(raw, y, race, seed)
        model = law.export(torch, law.train(torch, data, seed), data.X[:4])
        calib = data.table(data.train)
        budget = onnx_esvd.repair_within_budget(model, calib, layer=-2, group="race1", target="ugpa",
                                                max_ks=args.max_ks)
        default = onnx_esvd.repair(model, calib, layer=-2, group="race1", target="ugpa")
        row = {"seed": seed, "default_holdout_ks": default.after.ks}
        row["default_test"] = law.scores(law.predict(default.model, data.X[data.test]), data, data.test)
        if budget.result is not None:
            row["budget_test"] = law.scores(law.predict(budget.result.model, data.X[data.test]), data, data.test)
            row["setting"] = f"c1={budget.winner.c1:g}, c2={budget.winner.c2:g}"
            row["budget_holdout_ks"] = budget.winner.metrics.ks
        rows.append(row)
        b = row.get("budget_test")
        print(f"seed {seed}: budget {row.get('setting', 'not met')}: "
              + (f"holdout KS {row['budget_holdout_ks']:.3f}, test KS {b[1]:.3f}, test MSE {b[0]:.4f}; " if b else "")
              + f"default: holdout KS {row['default_holdout_ks']:.3f}, test KS {row['default_test'][1]:.3f}, "
              f"test MSE {row['default_test'][0]:.4f}  [{time.perf_counter() - started:.0f}s]", flush=True)
    met = [r for r in rows if "budget_test" in r]
    print()
    print(f"--max-ks {args.max_ks}: met on the holdout for {len(met)} of {len(rows)} seeds")
    if met:
        test_ks = np.array([r["budget_test"][1] for r in met])
        mse = np.array([r["budget_test"][0] for r in met])
        dmse = np.array([r["default_test"][0] for r in met])
        both = [r for r in met if r["default_holdout_ks"] <= args.max_ks]
        print(f"budget model: test KS {test_ks.mean():.3f} ± {test_ks.std(ddof=1) if len(met) > 1 else 0:.3f} "
              f"(max {test_ks.max():.3f}), test MSE {mse.mean():.4f}; default run: test MSE {dmse.mean():.4f}")
        print(f"seeds where the default run also meets the budget on the holdout: {len(both)}; budget MSE <= "
              f"default MSE on the test split in {sum(r['budget_test'][0] <= r['default_test'][0] for r in both)}"
              f" of them")


if __name__ == "__main__":
    main()
