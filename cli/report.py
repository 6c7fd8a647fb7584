"""Human-readable tables for the commands (plain text, no colours: they go into CI logs too)."""

from __future__ import annotations

from typing import Any, Sequence

from onnx_esvd.metrics import MIN_ESTIMABLE_ROWS


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain aligned text table; columns listed in `right` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]
    lines = []
    for i, r in enumerate(cells):
        parts = [c.rjust(widths[j]) if j in right else c.ljust(widths[j]) for j, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "nan"
    if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 10**6):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def change(before: float | None, after: float | None) -> str:
    if before is None or after is None or before != before or after != after or before == 0:
        return ""
    return f"{(after - before) / abs(before) * 100:+.1f}%"


def layers_table(found: Any) -> str:
    outputs = {o for lay in found.layers for o in lay.feeds}
    rows = [(lay.index, lay.name, lay.op, lay.weight, f"[{lay.in_features} -> {lay.out_features}]",
             lay.dtype.name, lay.input, "final" if lay.is_final else "") for lay in found.layers]
    headers = ["#", "node", "op", "weight", "shape", "dtype", "input", "role"]
    if len(outputs) > 1:  # several outputs: say which each node feeds
        headers.append("feeds")
        rows = [(*row, ", ".join(lay.feeds)) for row, lay in zip(rows, found.layers)]
    text = table(headers, rows, right=(0,))
    if len(outputs) > 1:
        text += ("\n\nscored output: " + (f"'{found.score_tensor}'" if found.score_tensor else
                                           "not chosen (pass --score NAME to mark its final node)"))
    if found.refused:
        text += "\n\nnot repairable:\n" + "\n".join(f"  {reason}" for reason in found.refused.values())
    return text


def groups_line(labels: Any, column: str) -> str:
    """`'a' (group 0) vs 'b' (group 1) in column 'g'`, or the k labels for k > 2."""
    if len(labels) == 2:
        return f"{labels[0]!r} (group 0) vs {labels[1]!r} (group 1) in column '{column}'"
    return f"{len(labels)} groups in column '{column}': {', '.join(repr(x) for x in labels)}"


def interval(m: Any, key: str) -> str:
    iv = m.intervals.get(key) if m.intervals else None
    return f"[{num(iv[0])}, {num(iv[1])}]" if iv else ""


def _std_gap(m: Any) -> float:
    stds = [g.std for g in m.groups if g.estimable or len(m.groups) == 2]
    return max(stds) - min(stds) if len(stds) >= 2 else float("nan")


def repair_report(res: Any, model_path: str, output: str | None) -> str:
    """The before/after table of `repair`."""
    lay, b, a = res.layer, res.before, res.after
    lines = [
        f"layer     {lay.index} '{lay.name}' ({lay.op}, {lay.in_features} -> {lay.out_features}) of {model_path}",
        f"score     {res.score_text}" if res.score is not None else "",
        f"groups    {groups_line(res.groups, res.data.group)}",
        f"rows      {res.rows.total} read, {res.rows.skipped} of other groups skipped, {res.rows.fit} used to fit"
        + (f", {res.rows.dropped} with missing values dropped" if res.rows.dropped else ""),
        f"esvd      c2={_g(res.options.c2)} (second moment), c1={_g(res.options.c1)} (first moment), "
        f"eps={_g(res.options.eps)}" + (f", group weights {res.options.weights}" if len(res.groups) > 2 else ""),
    ]
    if res.refit is not None:
        lines.append(f"refit     {res.options.refit_spec.describe()} on '{res.final.name}', {res.refit.target} "
                     f"target, ridge {_g(res.refit.alpha)} ({res.refit.alpha_source})")
        if res.penalty is not None:
            kept = ", ".join(f"{k} {res.penalty.kept[k]} of {res.penalty.seen[k]}" for k in res.penalty.kept)
            lines.append(f"          rows kept for the penalised fit: {kept}; KS on those fit rows "
                         f"{num(res.penalty.fit_ks)} (a fit-row number: the held-out KS is below)")
    else:
        lines.append(f"refit     {res.refit_note}")
    if res.report_rows == "holdout":
        lines.append(f"measured on {b.rows} holdout rows the fit did not use (--holdout {_g(res.options.holdout)})")
    elif res.report_rows == "eval":
        lines.append(f"measured on {b.rows} rows of the evaluation file (--eval), which the fit did not use")
    else:
        lines.append(f"measured on the {b.rows} rows the fit used (--holdout 0): expect the held-out gap to be larger")
    for o in res.others:
        how = "final node refitted to its original values" if o.how == "distilled" else "computed from the score"
        lines.append(f"output    '{o.name}' ({how}): relative RMS change {num(o.relative)}, largest change "
                     f"{num(o.max_abs)}")
    lines = [line for line in lines if line]
    lines.append("")
    ci = bool(a.intervals)
    k = len(res.groups)
    ks_name = "KS" if k == 2 else "KS (max pair)"
    rows = [(ks_name, num(b.ks), num(a.ks), change(b.ks, a.ks), interval(a, "ks")),
            ("mean gap", num(b.mean_gap), num(a.mean_gap), change(b.mean_gap, a.mean_gap), interval(a, "mean_gap")),
            ("std gap", num(_std_gap(b)), num(_std_gap(a)), change(_std_gap(b), _std_gap(a)), "")]
    if k > 2:
        rows.insert(1, ("KS vs all", num(b.ks_overall), num(a.ks_overall), change(b.ks_overall, a.ks_overall), ""))
    if b.mse is not None:
        rows += [("MSE", num(b.mse), num(a.mse), change(b.mse, a.mse), interval(a, "mse")),
                 ("MAE", num(b.mae), num(a.mae), change(b.mae, a.mae), "")]
    for gb, ga in zip(b.groups, a.groups):
        mark = "" if gb.estimable else " (*)"
        rows += [(f"rows {gb.label}{mark}", str(gb.count), str(ga.count), "", ""),
                 (f"mean {gb.label}", num(gb.mean), num(ga.mean), "", ""),
                 (f"std {gb.label}", num(gb.std), num(ga.std), "", "")]
        if gb.mse is not None:
            rows.append((f"MSE {gb.label}", num(gb.mse), num(ga.mse), change(gb.mse, ga.mse), ""))
    headers = ["metric", "before", "after", "change"] + (["95% CI after"] if ci else [])
    lines.append(table(headers, [r if ci else r[:4] for r in rows], right=(1, 2, 3)))
    if k > 2:
        lines.append(f"KS (max pair) after: {' vs '.join(repr(x) for x in a.ks_pair)}")
    lines += [line for line in (ks_noise_line(a), interval_note(a, res.options.bootstrap)) if line]
    for note in res.warnings:
        lines.append(f"warning: {note}")
    if output:
        lines.append("")
        lines.append(f"wrote {output}")
    return "\n".join(lines)


def interval_note(m: Any, resamples: int) -> str:
    if not m.intervals:
        return ""
    return (f"95% CI: bootstrap over {resamples} resamples of the report rows within groups (--bootstrap); it shows "
            "how far these numbers would move on other rows of the same kind")


def ks_noise_line(m: Any) -> str:
    """The KS's 95% critical value and permutation noise floor for the groups' sizes, and which groups are too
    small to estimate it."""
    if len(m.groups) < 2 or m.ks != m.ks:
        return ""
    text = (f"noise: KS critical value {num(m.ks_critical)} (95%, 1.36·sqrt(1/n_g + 1/n_h) for the pair), "
            f"permutation noise floor {num(m.noise_floor)} (the KS with the group labels shuffled)")
    small = list(m.not_estimable)
    if small:
        where = "left out of the headline KS and mean gap" if len(m.groups) > 2 else "KS not estimable"
        text += (f"; (*) fewer than {MIN_ESTIMABLE_ROWS} rows, {where}: "
                 f"{', '.join(repr(x) for x in small)}")
    if getattr(m, "ks_sampled", False):
        text += (f"\nKS, its noise and intervals measured on a group-stratified sample of {m.ks_rows} of the {m.rows} "
                 "rows (every row of a group up to a common level; the same rows before and after); means, std, "
                 "MSE and MAE on every row")
    return text


def _g(v: float) -> str:
    return f"{v:g}"


def _metric_rows(m: Any) -> list[tuple[str, str]]:
    rows = [("KS", num(m.ks)), ("mean gap", num(m.mean_gap))]
    if m.mse is not None:
        rows += [("MSE", num(m.mse)), ("MAE", num(m.mae))]
    return rows


def groups_table(m: Any) -> str:
    """Per-group rows, mean, std, KS against everyone (and MSE, MAE with a target)."""
    has_target = m.mse is not None
    headers = ["group", "rows", "mean", "std", "KS vs all"] + (["MSE", "MAE"] if has_target else [])
    rows = []
    for g in m.groups:
        row = [g.label + ("" if g.estimable else " (*)"), str(g.count), num(g.mean), num(g.std), num(g.ks_overall)]
        if has_target:
            row += [num(g.mse), num(g.mae)]
        rows.append(row)
    return table(headers, rows, right=tuple(range(1, len(headers))))


def audit_report(res: Any) -> str:
    """The output metrics and the per-layer explainable-SVD view, ranked."""
    m = res.metrics
    lines = [f"model     {res.model}",
             f"score     {res.score}",
             f"data      {res.data}: {res.rows} rows, {res.skipped} of other groups skipped",
             f"groups    {groups_line(res.groups, res.group_column)}",
             "",
             "output: " + ", ".join(f"{k} {v}" for k, v in _metric_rows(m)),
             groups_table(m),
             ks_noise_line(m),
             ""]
    if not res.layers:
        lines.append("no repairable linear node (Gemm or MatMul with a constant 2-D weight)")
    else:
        lines.append(f"layers by disparity score (gap relative to the layer output's within-group spread; "
                     f"top-{res.top} = share of the bound in the top {res.top} singular directions):")
        rows = []
        for a in res.ranked():
            rows.append((a.rank if a.rank is not None else "-", a.layer.index, a.layer.name,
                         f"{a.layer.in_features}->{a.layer.out_features}",
                         num(a.first.gap, 3), num(a.first.bound, 3), f"{100 * a.first.top_share:.0f}%",
                         num(a.second.gap, 3), num(a.second.bound, 3), f"{100 * a.second.top_share:.0f}%",
                         num(a.score, 3)))
        lines.append(table(["rank", "#", "node", "shape", "mean gap", "bound", f"top-{res.top}", "cov gap",
                            "bound", f"top-{res.top}", "score"], rows, right=(0, 1, 4, 5, 6, 7, 8, 9, 10)))
        lines.append("mean gap = ||W delta||^2 <= sum sigma(W S)^2;  cov gap = ||W D W^T||_F <= ||W S||_S4^2")
        best = next((a for a in res.ranked() if a.rank == 1), None)
        if best is not None:
            lines.append(f"largest disparity: layer {best.layer.index} '{best.layer.name}' "
                         f"(onnx-esvd repair ... --layer {best.layer.index})")
        if any(a.rank is None for a in res.layers):
            lines.append("'-': a single-output final node; repairing it only rescales it (KS unchanged) and "
                         "leaves nothing to refit")
    for name, reason in res.refused.items():
        lines.append(f"not repairable: {reason}")
    for note in res.warnings:
        lines.append(f"warning: {note}")
    return "\n".join(lines)


def check_report(res: Any) -> str:
    """Each metric, its value, its threshold and PASS/FAIL, then the verdict."""
    mz = res.measured
    lines = [f"check     {res.model} on {res.data}: {mz.rows} rows ({mz.skipped} of other groups skipped); "
             f"score {mz.score}",
             f"groups    {groups_line(mz.groups, mz.group_column)}"]
    rows = [(t.metric, num(t.point if t.point is not None else t.value),
             f"[{num(t.interval[0])}, {num(t.interval[1])}]" if t.interval else "",
             ("upper " if t.compared == "upper" else "") + f"<= {t.threshold:g}", "PASS" if t.passed else "FAIL")
            for t in res.thresholds]
    lines.append(table(["metric", "value", "95% CI", "threshold", "result"], rows, right=(1,)))
    if res.baseline is not None:
        lines.append(f"baseline  {res.baseline_model}: KS {num(res.baseline.metrics.ks)} on the same rows")
    noise = ks_noise_line(mz.metrics)
    if noise:
        lines.append(noise)
    failed = [t for t in res.thresholds if not t.passed]
    if failed:
        lines.append(f"FAIL: {len(failed)} of {len(res.thresholds)} thresholds exceeded "
                     f"({', '.join(t.metric for t in failed)})")
    else:
        lines.append(f"PASS: all {len(res.thresholds)} thresholds hold")
    for note in mz.warnings:
        lines.append(f"warning: {note}")
    return "\n".join(lines)


def sweep_report(res: Any) -> str:
    """The sweep's table, Pareto-optimal rows marked."""
    b = res.before
    has_mse = b.mse is not None
    lines = [f"layer     {res.layer.index} '{res.layer.name}' ({res.layer.op}, {res.layer.in_features} -> "
             f"{res.layer.out_features}); groups {', '.join(repr(x) for x in res.groups)}",
             f"measured on the {b.rows} {res.report_rows} rows; original model: KS {num(b.ks)}, mean gap "
             f"{num(b.mean_gap)}" + (f", MSE {num(b.mse)}" if has_mse else ""), ""]
    rows = [(f"{p.c1:g}", f"{p.c2:g}", p.setting.describe(), "failed", "-", "-", "") if p.metrics is None else
            (f"{p.c1:g}", f"{p.c2:g}", p.setting.describe(), num(p.metrics.ks), num(p.metrics.mean_gap),
             num(p.metrics.mse), "*" if p.pareto else "") for p in res.points]
    lines.append(table(["c1", "c2", "refit", "KS", "mean gap", "MSE", "pareto"], rows, right=(0, 1, 3, 4, 5)))
    lines.append(f"* Pareto-optimal: no other setting has both a lower KS and a lower "
                 f"{'MSE' if has_mse else 'mean gap'}")
    failed = [p for p in res.points if p.metrics is None]
    if failed:
        lines.append(f"failed: {len(failed)} of {len(res.points)} settings were skipped:")
        lines += [f"  c1={p.c1:g}, c2={p.c2:g}, refit {p.setting.describe()}: {p.failed}" for p in failed]
    for note in res.warnings:
        lines.append(f"warning: {note}")
    return "\n".join(lines)


def budget_report(budget: Any) -> str:
    """Which setting met the budget (and the runner-up), or the closest one when none did. With an out-of-fold
    ranking, each named setting shows its out-of-fold KS (what was ranked), the KS on the rows it was fitted on
    and on the report rows, side by side, with the minority group's row count behind each."""
    limits = ", ".join(f"{k} <= {v:g}" for k, v in budget.budget.items())
    tried = len(budget.sweep.points)
    failed = [p for p in budget.sweep.points if p.metrics is None]
    note = ""
    if failed:
        first = failed[0]
        note = (f"\nskipped   {len(failed)} of the {tried} settings failed, e.g. c1={first.c1:g}, c2={first.c2:g}, "
                f"refit {first.setting.describe()}: {first.failed}")
    report_rows = budget.sweep.report_rows

    def describe(p: Any) -> str:
        m = p.metrics
        where = f"layer {p.layer}, " if p.layer is not None else ""
        head = f"{where}c1={p.c1:g}, c2={p.c2:g}, refit {p.setting.describe()}: "
        if p.oof is None:
            return head + f"KS {num(m.ks)}, mean gap {num(m.mean_gap)}, MSE {num(m.mse)}"
        o = p.oof
        small = min(m.groups, key=lambda g: g.count) if m.groups else None
        text = (f"out-of-fold KS {num(o.ks)}, mean gap {num(o.mean_gap)}, MSE {num(o.mse)} ({o.rows} fit rows, "
                f"{o.minority[1]} of group '{o.minority[0]}'); fit-row KS {num(o.fit_ks)}")
        if report_rows != "fit" and small is not None:
            text += (f"; {report_rows} KS {num(m.ks)}, MSE {num(m.mse)} ({m.rows} rows, {small.count} of group "
                     f"'{small.label}')")
        return head + text

    if budget.winner is None:
        return (f"no setting of the {tried} tried meets {limits} on {budget.ranked_on}; closest: "
                f"{describe(budget.closest)}{note}\nnothing was written")
    lines = [f"budget    {limits}: {tried} settings tried, ranked on {budget.ranked_on}",
             f"winner    {describe(budget.winner)}"]
    if budget.runner_up is not None:
        lines.append(f"runner-up {describe(budget.runner_up)}")
    if budget.folds:
        lines.append("          (the fit-row KS is measured on the rows the refit was fitted on: optimistic, not "
                     "the result)")
    return "\n".join(lines) + note
