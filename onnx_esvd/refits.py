"""The refit of the final node in every mode, from what the refit pass collected.

- `fair` (mean parity), `plain` (least squares): closed form from the streamed moments (refit.py);
- `moments`: mean parity and a variance gap of `var_gap` times fair's (0: equal variances), exact, from the same
  moments (refit_moments.py; two groups);
- `cdf`, `w2`: least squares plus `lam` times a distribution penalty between the groups' outputs (a smoothed
  KS-type CDF gap, or the squared 1-D Wasserstein distance), fitted by L-BFGS from the `fair` solution (penalty.py),
  over the final node or the last `tune` linear nodes (tuning.py). The final node alone (the default): the
  least-squares term is exact from the refit moments of every fit row (fitmoments.py) and the penalty is taken on
  a group-stratified sample of PENALTY_ROWS rows; more layers: both terms on a sample of SAMPLE_ROWS rows;
- `none`: the final node is left as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from . import refit as refit_mod
from .errors import OptionError
from .graph import LinearLayer, read_bias, read_weight, write_bias, write_weight
from .guards import refit_fits

MODES = ("fair", "plain", "none", "moments", "cdf", "w2")
PENALISED = ("cdf", "w2")

#: Rows the penalised refits keep (group-stratified: every row of a small group up to MIN_KEEP is kept) when the
#: fit term needs rows: more than the final node tuned (a non-linear chain), or the budget's out-of-fold ranking
#: (which fits and scores each fold on the sample alone).
SAMPLE_ROWS = 200_000
MIN_KEEP = 5_000

#: Rows kept for the distribution PENALTY alone when only the final node is tuned: the fit term is then exact
#: from the refit moments of all fit rows (fitmoments.py), and what limits the penalty is the number of
#: minority rows, which the water filling keeps whole up to PENALTY_ROWS / k per group and never below
#: PENALTY_MIN_KEEP. At 5,000 rows a group's smoothed CDF has a sampling sd of at most 0.007 (binomial,
#: 0.5 / sqrt(5000)); a two-group data set keeps up to 8,192 rows per group (sd 0.0055). Each L-BFGS evaluation
#: then costs a [16,384, 64] tanh block and two products over the [16,384, p] sample (about half of the
#: fit's time at 32,768 rows, which was a sixth of the whole repair of a 300,000-row CSV).
PENALTY_ROWS = 16_384
PENALTY_MIN_KEEP = 5_000


@dataclass(frozen=True)
class RefitSpec:
    """How the final node is refitted.

    Attributes:
        mode: one of MODES.
        ridge: ridge term, or "auto" (chosen on a seeded validation part of the fit rows).
        var_gap: `moments` only: the output variance gap kept, as a share of fair's (0 equal variances, 1 = fair).
        lam: `cdf`/`w2` only: weight of the distribution penalty.
        tune: `cdf`/`w2` only: how many linear nodes, ending at the final node, are tuned (an int or "all").
    """

    mode: str = "fair"
    ridge: float | str = "auto"
    var_gap: float = 0.0
    lam: float = 1.0
    tune: int | str = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OptionError(f"--refit {self.mode!r} is invalid; choose one of {', '.join(MODES)}")
        if not (isinstance(self.var_gap, (int, float)) and 0 <= self.var_gap <= 1):
            raise OptionError(f"--var-gap {self.var_gap} is invalid; it must be in [0, 1] (0: equal output "
                              "variances, 1: the fair refit)")
        if not (isinstance(self.lam, (int, float)) and np.isfinite(self.lam) and self.lam >= 0):
            raise OptionError(f"--lam {self.lam} is invalid; it must be a number >= 0")
        if not (self.tune == "all" or (isinstance(self.tune, int) and self.tune >= 1)):
            raise OptionError(f"--tune-layers {self.tune!r} is invalid; give a positive integer or 'all'")

    @property
    def needs_rows(self) -> bool:
        return self.mode in PENALISED

    def describe(self) -> str:
        if self.mode == "moments":
            return f"moments (var-gap {self.var_gap:g})"
        if self.mode in PENALISED:
            layers = "every linear node" if self.tune == "all" else (
                "final node" if self.tune == 1 else f"last {self.tune} linear nodes")
            return f"{self.mode} (lam {self.lam:g}, {layers})"
        return self.mode

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == "moments":
            out["var_gap"] = self.var_gap
        if self.mode in PENALISED:
            out.update(lam=self.lam, tune_layers=self.tune)
        return out


@dataclass(frozen=True)
class PenaltyReport:
    """What a penalised refit did: rows kept per group (of those seen), the fit-row KS (not a held-out number)
    and the objective's parts."""

    kept: dict[str, int]
    seen: dict[str, int]
    fit_ks: float
    mse_term: float
    penalty: float
    limited_rounds: tuple[int, ...] = ()  # rounds (1-based) that L-BFGS left at its iteration limit

    def to_dict(self) -> dict:
        return {"rows_kept": self.kept, "rows_seen": self.seen, "fit_row_ks": self.fit_ks,
                "mse_term": self.mse_term, "penalty": self.penalty, "iteration_limit_rounds": list(self.limited_rounds)}


def fit_final(acc: refit_mod.RefitAccumulator, final: LinearLayer, spec: RefitSpec, kind: str
              ) -> tuple[refit_mod.RefitSolution, refit_mod.RefitReport]:
    """fair, plain or moments from the refit moments (moments: the ridge is the one fair chooses)."""
    fit_intercept = final.bias is not None
    base = "fair" if spec.mode in ("moments", *PENALISED) else spec.mode
    sol, report = refit_mod.fit(acc, mode=base, ridge=spec.ridge, fit_intercept=fit_intercept, target_kind=kind)
    if spec.mode != "moments":
        return sol, report
    from .refit_moments import solve_moments

    groups = acc.groups(("train", "val"))
    present = [g for g in groups if g.n]
    if len(present) != 2:
        raise OptionError(f"--refit moments is exact for two groups only; this data has {len(present)} groups: use "
                          "--refit cdf or w2 (their penalty covers every pair of groups), or compare two groups "
                          "with --groups A,B or --groups A,rest")
    sol = solve_moments(present, acc.p, alpha=report.alpha, fit_intercept=fit_intercept, kappa=float(spec.var_gap))
    return sol, dataclasses.replace(report, mode="moments", parity_gap=refit_mod.parity_gap(present, sol.coef))


def write_solution(model: onnx.ModelProto, final: LinearLayer, sol: refit_mod.RefitSolution) -> None:
    refit_fits(sol.coef, sol.intercept, final)
    write_weight(model, final, sol.coef)
    if sol.intercept is not None:
        write_bias(model, final, sol.intercept)


def penalised(model: onnx.ModelProto, chain_layers: Any, sample: Any, start: refit_mod.RefitSolution,
              report: refit_mod.RefitReport, spec: RefitSpec, labels: tuple[str, ...],
              acc: refit_mod.RefitAccumulator | None = None) -> tuple[refit_mod.RefitReport, PenaltyReport]:
    """Tune the chain's layers from the fair solution `start` with the distribution penalty and write them into
    `model`. `sample` is the StratifiedSample of the chain's input rows, targets and group indices. With the final
    node alone and `acc` (the refit moments of all fit rows), the fit term is exact from `acc` and the sample
    serves the penalty alone."""
    from .chain import Chain
    from .fitmoments import FitMoments
    from .penalty import penalised_fit

    layers = chain_layers.layers
    final = layers[-1]
    if final.out_features != 1:
        raise OptionError(f"--refit {spec.mode} needs a final node with one output ('{final.name}' has "
                          f"{final.out_features}); use --refit fair or moments")
    parts = [(read_weight(model, lay), read_bias(model, lay), act)
             for lay, act in zip(layers[:-1], chain_layers.activations[:-1])]
    parts.append((start.coef, start.intercept, "identity"))
    rows = sample.result(np.float64)  # the rows are handed over in float64 (no float32 copy kept beside them)
    moments = FitMoments.from_groups(acc.groups(("train", "val")), acc.p) if acc is not None and len(layers) == 1 \
        else None
    new, diag = penalised_fit(rows.x, rows.t, rows.group, Chain(parts), lam=float(spec.lam), kind=spec.mode,
                              tune=len(layers), ridge=float(report.alpha), weights=rows.weight, moments=moments)
    for lay, fitted in zip(layers, new.layers):
        refit_fits(fitted.W, fitted.b if lay.bias is not None else None, lay)
        write_weight(model, lay, fitted.W)
        if fitted.b is not None and lay.bias is not None:
            write_bias(model, lay, fitted.b)
    name = dict(enumerate(labels))
    info = PenaltyReport(kept={name.get(g, str(g)): int(c) for g, c in rows.kept.items()},
                         seen={name.get(g, str(g)): int(c) for g, c in rows.seen.items()},
                         fit_ks=float(diag.fit_ks), mse_term=float(diag.mse_term), penalty=float(diag.penalty),
                         limited_rounds=tuple(r + 1 for r, msg in enumerate(diag.messages) if msg.startswith("STOP")))
    return dataclasses.replace(report, mode=spec.mode, parity_gap=float("nan")), info
