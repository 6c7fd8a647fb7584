"""Out-of-fold scores of refit settings, for ranking them in the budget search (`repair --max-ks`).

One 20% holdout cannot tell settings apart when the minority group is small: with ~190 minority rows its
KS moves by ~0.065 from split to split, more than the settings differ. So the budget search ranks on
K-fold out-of-fold predictions instead: every fit row gets a fold id from a seeded hash of its global
row index (`rowsample.fold_of`: independent of batch sizes); for each refit setting and each fold, the
refit is fitted on the group-stratified row sample of the other folds and predicts the held-out fold;
the out-of-fold predictions of all sampled fit rows are pooled into one KS (max pairwise over groups, as
the report computes it), one mean gap and one MSE (weighted by the sample's row weights, so that a
subsampled large group counts with its full size).

What is and is not out of fold:
- the refit (every mode) is fitted without the held-out fold's rows. `fair`, `plain` and `moments` are
  fitted from the per-group moments of the sample rows of the other folds (weighted: exact when every
  row is kept, else the weighted sample's moments); `cdf`/`w2` start from that fold's `fair` solution
  and run the same penalised fit (`penalty.penalised_fit`, same chain and forward) as the full refit.
- NOT out of fold: the ESVD patch of the earlier node (fitted once on all fit rows; it uses only the
  groups' first and second moments) and the ridge term (chosen once on all fit rows, as the full refit
  chooses it). Both leak a little information from the held-out fold into its prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .chain import Chain
from .errors import DataError, OptionError
from .graph import read_bias, read_weight
from .penalty import MIN_KS_ROWS, max_pairwise_ks, penalised_fit
from .refits import RefitSpec
from .stats import Moments

#: Rows of the sample converted to float64 at once (the sample itself stays in its own dtype: 16,384 x 256 is
#: 32 MiB).
BLOCK_ROWS = 16_384

#: Folds of the budget search's out-of-fold ranking (`repair --max-ks ... --folds K`).
DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class OofScore:
    """One refit setting's out-of-fold metrics on the sampled fit rows.

    Attributes:
        folds: K. ks: max pairwise KS of the pooled out-of-fold predictions (groups with >= MIN_KS_ROWS rows).
        mean_gap: max - min of the groups' mean out-of-fold predictions (k >= 3: groups with >= MIN_KS_ROWS rows).
        mse: row-weighted mean squared error.
        fit_ks: max pairwise KS of the full refit's predictions on the same rows (fitted on them: optimistic).
        rows: sampled fit rows scored; minority: (label, rows) of the group with the fewest of them.
    """

    folds: int
    ks: float
    mean_gap: float
    mse: float
    fit_ks: float
    rows: int
    minority: tuple[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"folds": self.folds, "oof_ks": self.ks, "oof_mean_gap": self.mean_gap, "oof_mse": self.mse,
                "fit_row_ks": self.fit_ks, "rows": self.rows,
                "minority": {"group": self.minority[0], "rows": self.minority[1]}}


def weighted_group_moments(z: np.ndarray, t: np.ndarray, group: np.ndarray, weight: np.ndarray,
                           k: int, rows: np.ndarray | None = None, block: int = BLOCK_ROWS) -> list[Moments]:
    """Moments of `[z, t]` per group code 0..k-1 (`z: [n, p]` any float dtype, `t: [n, m]`) with row weights
    `weight: [n]`, over the row indices `rows` (default: every row).

    Rows of one group must share one weight (a `RowSample`'s are `seen / kept`): the group's count and
    scatter are scaled by it, its mean is unchanged. The rows are reduced `block` at a time in float64, so
    the only arrays of the rows' size are the caller's (on a 200,000-row sample of 256 inputs, building
    `[z, t]` in float64 for the fold first took 1.2 GiB more).
    """
    t2 = np.asarray(t, dtype=np.float64).reshape(len(z), -1)
    p, m = z.shape[1], t2.shape[1]
    idx = np.arange(len(z)) if rows is None else np.asarray(rows, dtype=np.int64)
    out = []
    for g in range(k):
        sel = idx[group[idx] == g]
        mom = Moments(p + m)
        if sel.size:
            w = weight[sel]
            if not np.allclose(w, w[0], rtol=1e-12, atol=0.0):
                raise DataError(f"rows of group code {g} carry different weights; the moment refits need one "
                                "weight per group")
            for a in range(0, sel.size, block):
                part = sel[a:a + block]
                u = np.empty((part.size, p + m))
                u[:, :p] = z[part]
                u[:, p:] = t2[part]
                mom.add(u)
            mom.n, mom.scatter = mom.n * float(w[0]), mom.scatter * float(w[0])
        out.append(mom)
    return out


def _moment_solution(moms: list[Moments], p: int, spec: RefitSpec, alpha: float, fit_intercept: bool):
    from . import refit as refit_mod

    base = "plain" if spec.mode == "plain" else "fair"
    if spec.mode != "moments":
        return refit_mod.solve(moms, p, mode=base, alpha=alpha, fit_intercept=fit_intercept)
    from .refit_moments import solve_moments

    present = [m for m in moms if m.n]
    if len(present) != 2:
        raise OptionError(f"--refit moments is exact for two groups only; a fold has {len(present)} groups")
    return solve_moments(present, p, alpha=alpha, fit_intercept=fit_intercept, kappa=float(spec.var_gap))


def chain_parts(model: Any, chain_layers: Any) -> list[tuple]:
    """The tuned layers of `model` (a GraphChain's layers and activations) as `Chain` parts; the final node's
    output is taken as it is (identity), as the penalised refit takes it."""
    acts = list(chain_layers.activations[:-1]) + ["identity"]
    return [(read_weight(model, lay), read_bias(model, lay), act) for lay, act in zip(chain_layers.layers, acts)]


def fold_predictions(x: np.ndarray, t: np.ndarray, group: np.ndarray, weight: np.ndarray, fold: np.ndarray,
                     fixed: Sequence[tuple], spec: RefitSpec, *, alpha: float, fit_intercept: bool, k: int,
                     folds: int) -> np.ndarray:
    """Out-of-fold score predictions `[n]` of the refit `spec`.

    Args:
        x: [n, d] input of the tuned chain; t: [n, 1] label; group: [n] codes 0..k-1; weight: [n] row weights;
            fold: [n] fold ids 0..folds-1.
        fixed: Chain parts (W, b, activation) of the tuned layers before the final node (empty for tune 1); the
            final node is refitted per fold.
        alpha: the ridge term. fit_intercept: the final node has a bias.

    Row i's prediction comes from a refit that never saw a row of fold `fold[i]`.
    """
    fixed = list(fixed)
    z = Chain(fixed).forward(x) if fixed else x  # the final node's input, in x's dtype (reduced in float64)
    p = z.shape[1]
    pred = np.full(x.shape[0], np.nan)
    for f in range(folds):
        te = fold == f
        if not te.any():
            continue
        tr = ~te
        if len(np.unique(group[tr])) < 2:
            raise DataError(f"fold {f}: the other folds hold rows of fewer than two groups; lower --folds")
        moms = weighted_group_moments(z, t, group, weight, k, rows=np.flatnonzero(tr))
        sol = _moment_solution(moms, p, spec, alpha, fit_intercept)
        if spec.needs_rows:
            start = Chain(fixed + [(sol.coef, sol.intercept, "identity")])
            new, _ = penalised_fit(_rows_float64(x, tr), t[tr], group[tr], start, lam=float(spec.lam),
                                   kind=spec.mode, tune=len(fixed) + 1, ridge=alpha, weights=weight[tr])
            pred[te] = new.forward(x[te])[:, 0]
        else:
            out = np.asarray(z[te], dtype=np.float64) @ sol.coef.T
            pred[te] = out[:, 0] + (0.0 if sol.intercept is None else sol.intercept[0])
    return pred


def _score_column(chain: Chain, x: np.ndarray, block: int = BLOCK_ROWS) -> np.ndarray:
    """`chain.forward(x)[:, 0]` `[n]`, block by block (the forward takes x to float64: a whole-sample copy)."""
    out = np.empty(x.shape[0])
    for a in range(0, x.shape[0], block):
        out[a:a + block] = chain.forward(x[a:a + block])[:, 0]
    return out


def _rows_float64(x: np.ndarray, mask: np.ndarray, block: int = BLOCK_ROWS) -> np.ndarray:
    """`x[mask]` in float64 `[m, d]`, built block by block: one array, where `x[mask].astype(float64)` holds a
    second copy in x's dtype beside it (on a 200,000-row float32 sample of 256 inputs, 164 MiB more)."""
    idx = np.flatnonzero(mask)
    out = np.empty((idx.size, x.shape[1]), dtype=np.float64)
    for a in range(0, idx.size, block):
        out[a:a + block] = x[idx[a:a + block]]
    return out


def score(pred: np.ndarray, fit_pred: np.ndarray, t: np.ndarray, group: np.ndarray, weight: np.ndarray,
          labels: Sequence[str], folds: int) -> OofScore:
    """Pool out-of-fold predictions `pred: [n]` (and the full refit's `fit_pred: [n]`) into an OofScore."""
    ks = max_pairwise_ks(pred, group)
    if not np.isfinite(ks):
        raise DataError(f"fewer than 2 groups have {MIN_KS_ROWS} sampled fit rows: the out-of-fold KS cannot be "
                        "measured; add rows or rank on the holdout (--folds 0)")
    codes, counts = np.unique(group, return_counts=True)
    counted = codes if codes.size == 2 else codes[counts >= MIN_KS_ROWS]  # as the KS: k >= 3 skips tiny groups
    means = [float(np.mean(pred[group == c])) for c in counted]
    err = pred - np.asarray(t, dtype=np.float64).reshape(-1)
    small = int(codes[np.argmin(counts)])
    name = labels[small] if 0 <= small < len(labels) else str(small)
    return OofScore(folds=folds, ks=float(ks), mean_gap=float(max(means) - min(means)),
                    mse=float(np.average(err * err, weights=weight)), fit_ks=float(max_pairwise_ks(fit_pred, group)),
                    rows=int(pred.size), minority=(str(name), int(counts.min())))


def oof_score(patched: Any, repaired: Any, chain_layers: Any, sample: Any, spec: RefitSpec, *, alpha: float,
              fit_intercept: bool, labels: Sequence[str], folds: int) -> OofScore:
    """The OofScore of `spec` from a refit pass's row sample (a StratifiedSample with fold ids).

    `patched`: the model after the ESVD patch, before any refit (the chain's earlier layers are taken from it);
    `repaired`: the same with this setting's full refit written (for the fit-row KS); `chain_layers`: the tuned
    layers (tuning.GraphChain; the final node last).
    """
    rows = sample.result()
    if rows.fold is None:
        raise OptionError("the row sample has no fold ids: collect it with folds > 0")
    fit_pred = _score_column(Chain(chain_parts(repaired, chain_layers)), rows.x)
    k = max(len(labels), int(rows.group.max()) + 1)
    fixed = chain_parts(patched, chain_layers)[:-1]
    if spec.mode == "none":  # nothing is refitted: the predictions are already out of fold (but the patch's)
        return score(fit_pred, fit_pred, rows.t, rows.group, rows.weight, labels, folds)
    pred = fold_predictions(rows.x, rows.t, rows.group, rows.weight, rows.fold, fixed, spec, alpha=alpha,
                            fit_intercept=fit_intercept, k=k, folds=folds)
    return score(pred, fit_pred, rows.t, rows.group, rows.weight, labels, folds)
