"""Choosing the trade-off: `sweep` (every c1 x c2 x refit setting from one capture, Pareto-marked) and
`repair_within_budget` / `repair --max-ks --max-mean-gap` (the lowest-MSE setting inside a budget).

Every expectation is recomputed here from independent runs (a separate `repair` per setting) or from
the returned points, never read back from the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import onnx_esvd
from conftest import assert_bad_input, invoke, CASES, FIXTURES, LAW_GROUPS, copy_fixtures, dir_state
from onnx_esvd import OptionError, repair

sweep = onnx_esvd.sweep
sweep_mod = sys.modules["onnx_esvd.tradeoff"]  # the module whose helpers the pass-counting tests wrap
pipeline_mod = sys.modules["onnx_esvd.pipeline"]
pareto_flags, repair_within_budget = sweep_mod.pareto_flags, sweep_mod.repair_within_budget

GEMM = CASES["gemm_transb0_alpha.onnx"]
LAW = CASES["law_school_mlp_legacy.onnx"]
FEATURES = [f"x{j}" for j in range(6)]  # the hand-built fixture's feature columns (without --target)

#: small grids: 2 x 2 settings, in a deliberately unsorted order
C1, C2 = (15.0, 1.0), (1.0, 150.0)

TOL = 1e-12

#: the keys every point of `sweep --json` (and the budget's winner and runner-up) has
POINT_KEYS = {"c1", "c2", "refit", "ks", "mean_gap", "mse", "mae", "pareto"}




@pytest.fixture
def work(tmp_path):
    copy_fixtures(tmp_path, GEMM.model, GEMM.data)
    return tmp_path


def gemm_kwargs(**extra):
    return {"layer": 1, "group": GEMM.group, "target": GEMM.target, **extra}


def sweep_args(work, *extra, target=True):
    base = ["sweep", work / GEMM.model, "--layer", "1", "--data", work / GEMM.data, "--group", "g"]
    base += ["--target", "y"] if target else ["--features", ",".join(FEATURES)]
    return [*base, *extra]


def budget_args(work, *extra, out="out.onnx"):
    """A budget over the c1 x c2 grid with the fair refit (an explicit --refit keeps the c1 x c2 search), ranked
    on the holdout rows (--folds 0; the out-of-fold ranking has its own tests in test_oof.py)."""
    return ["repair", work / GEMM.model, "--layer", "1", "--data", work / GEMM.data, "--group", "g", "--target", "y",
            "--refit", "fair", "--folds", "0", "-o", work / out, *extra]


def assert_metrics_equal(a, b, tol=TOL):
    """Two OutputMetrics (or their dicts) agree field by field, per-group summaries included."""
    da, db = (m if isinstance(m, dict) else m.to_dict() for m in (a, b))
    assert da.keys() == db.keys()
    for key in da:
        if key == "intervals" and not (da[key] and db[key]):
            continue  # sweep points carry no bootstrap intervals; the repair written for a budget does
        if key == "groups":
            for ga, gb in zip(da[key], db[key], strict=True):
                assert ga["label"] == gb["label"] and ga["count"] == gb["count"]
                for f in ("mean", "std", "mse", "mae"):
                    _close(ga[f], gb[f], tol, f"groups.{ga['label']}.{f}")
        elif key == "rows":
            assert da[key] == db[key]
        else:
            _close(da[key], db[key], tol, key)


def _close(x, y, tol, what):
    if x is None or y is None:
        assert x is None and y is None, (what, x, y)
    elif isinstance(x, (str, bool, dict)):
        assert x == y, (what, x, y)
    elif isinstance(x, list):
        assert len(x) == len(y)
        for i, (u, v) in enumerate(zip(x, y)):
            _close(u, v, tol, f"{what}[{i}]")
    else:
        assert abs(x - y) <= tol, (what, x, y)


def dominates(p, q):
    """p beats q: lower-or-equal on both coordinates, strictly lower on one."""
    return p[0] <= q[0] and p[1] <= q[1] and (p[0] < q[0] or p[1] < q[1])


def reference_pareto(coords):
    return [not any(dominates(q, p) for j, q in enumerate(coords) if j != i) for i, p in enumerate(coords)]


def cost(m):
    return m.mse if m.mse is not None else m.mean_gap


# ------------------------------------------------------------------------------------------------
# the public names


@pytest.mark.parametrize("code", [
    # the README's style: attributes of the package, another name of the sweep module used first
    "import onnx_esvd\nonnx_esvd.repair_within_budget\nsweep = onnx_esvd.sweep\n",
    "from onnx_esvd import BudgetResult\nfrom onnx_esvd import sweep\n",
], ids=["attribute", "from-import"])
def test_public_sweep_is_the_function_whatever_the_import_order(code):
    """`onnx_esvd.sweep` must be the function even when another name of the same submodule was looked up
    first (a submodule named like the function would be bound over it by its import)."""
    code += "print(type(sweep).__name__, getattr(sweep, '__module__', '-'))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["function", "onnx_esvd.tradeoff"], done.stdout


def test_cli_sweep_after_a_budget_search_in_the_same_process(tmp_path):
    """The library used twice in one process (as a notebook or a test run would): `repair --max-ks` imports
    `repair_within_budget` first, then `sweep` must still run."""
    copy_fixtures(tmp_path, GEMM.model, GEMM.data)
    code = f"""
import sys
from typer.testing import CliRunner
from onnx_esvd_cli.main import app
d = {str(tmp_path)!r}
base = [d + "/gemm_transb0_alpha.onnx", "--layer", "1", "--data", d + "/gemm_transb0_alpha.csv", "--group", "g",
        "--target", "y"]
r = CliRunner().invoke(app, ["repair", *base, "--max-ks", "0.2", "-o", d + "/out.onnx"])
assert r.exit_code == 0, r.stderr
r = CliRunner().invoke(app, ["sweep", *base, "--c1", "1", "--c2", "1"])
print(r.exit_code, r.stderr.strip().splitlines()[:1])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("0 "), done.stdout


# ------------------------------------------------------------------------------------------------
# sweep: the grid


def test_one_point_per_setting_in_grid_order():
    res = sweep(GEMM.path, GEMM.data_path, **gemm_kwargs(c1=[15, 1, 15.0], c2=[1, 150, 1], refit=["plain", "fair"]))
    got = [(p.c1, p.c2, p.refit) for p in res.points]
    # c1 outermost, then c2, then the refit mode; each in the order given, duplicates dropped
    assert got == [(a, b, m) for a in (15.0, 1.0) for b in (1.0, 150.0) for m in ("plain", "fair")]
    assert len(set(got)) == len(got) == 8
    assert res.report_rows == "holdout"


def test_default_grid():
    res = sweep(GEMM.path, GEMM.data_path, **gemm_kwargs())
    assert [(p.c1, p.c2, p.refit) for p in res.points] == \
        [(a, b, "fair") for a in (1, 5, 15, 50, 150) for b in (1, 10, 150, 1000)]


SWEEP_VS_REPAIR = {
    # fixture, layer, groups, refit modes, c1 grid, c2 grid, other options
    "gemm three modes": (GEMM, 1, None, ("fair", "plain", "none"), C1, C2,
                         {"holdout": 0.3, "seed": 3, "batch_size": 256}),
    "gemm fixed ridge, eps": (GEMM, 1, None, ("plain", "fair"), (1.0, 50.0), (1000.0,),
                              {"ridge": 1e-3, "eps": 1e-3, "seed": 1}),
    "gemm holdout 0": (GEMM, -2, None, ("fair",), (5.0,), (1.0, 10.0), {"holdout": 0.0}),
    "law school": (LAW, -2, LAW_GROUPS, ("fair", "plain"), (1.0, 15.0), (150.0,), {"seed": 2}),
}


@pytest.mark.parametrize("case", list(SWEEP_VS_REPAIR))
def test_each_point_equals_a_separate_repair(case):
    fx, layer, groups, modes, c1s, c2s, opts = SWEEP_VS_REPAIR[case]
    common = dict(layer=layer, group=fx.group, groups=groups, target=fx.target, **opts)
    res = sweep(fx.path, fx.data_path, c1=c1s, c2=c2s, refit=modes, **common)
    assert len(res.points) == len(c1s) * len(c2s) * len(modes)
    for point in res.points:
        # sweep points are measured without bootstrap intervals (they would cost 200 resamples a setting)
        single = repair(fx.path, fx.data_path, c1=point.c1, c2=point.c2, refit=point.refit, bootstrap=0, **common)
        assert_metrics_equal(point.metrics, single.after)
        assert_metrics_equal(res.before, single.before)
        assert res.groups == single.groups
        assert res.report_rows == single.report_rows
        assert res.layer.index == single.layer.index and res.layer.name == single.layer.name
    # the settings really differ (a sweep that ignored c1/c2/refit would give equal points)
    assert len({round(p.metrics.ks, 12) for p in res.points} | {round(p.metrics.mse, 12) for p in res.points}) > 2


# ------------------------------------------------------------------------------------------------
# sweep: Pareto flags


def test_pareto_flags_against_mse():
    res = sweep(GEMM.path, GEMM.data_path, **gemm_kwargs(c1=C1, c2=C2, refit=["fair", "plain", "none"]))
    coords = [(p.metrics.ks, p.metrics.mse) for p in res.points]
    expected = reference_pareto(coords)
    assert [p.pareto for p in res.points] == expected
    assert 0 < sum(expected) < len(expected)  # some points are dominated, some are not
    # MSE, not the mean gap, is the cost with a target: the mean-gap front differs on these points
    assert reference_pareto([(p.metrics.ks, p.metrics.mean_gap) for p in res.points]) != expected


def test_pareto_flags_against_the_mean_gap_without_a_target():
    res = sweep(GEMM.path, GEMM.data_path, layer=1, group="g", features=FEATURES, c1=C1, c2=C2,
                refit=["fair", "plain", "none"])
    assert res.before.mse is None and all(p.metrics.mse is None for p in res.points)
    expected = reference_pareto([(p.metrics.ks, p.metrics.mean_gap) for p in res.points])
    assert [p.pareto for p in res.points] == expected
    assert 0 < sum(expected) < len(expected)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=12))
def test_pareto_flags_brute_force(points):
    # small integer coordinates force ties: equal points do not dominate each other
    assert pareto_flags([(float(a), float(b)) for a, b in points]) == reference_pareto(points)


def test_pareto_flags_ties_and_nan():
    assert pareto_flags([(1.0, 1.0), (1.0, 1.0)]) == [True, True]
    assert pareto_flags([(1.0, 1.0), (1.0, 2.0), (2.0, 1.0)]) == [True, False, False]
    assert pareto_flags([(0.1, 0.5), (0.2, 0.4), (0.3, 0.3)]) == [True, True, True]
    assert pareto_flags([(float("nan"), 0.1), (0.5, 0.5)]) == [False, True]


# ------------------------------------------------------------------------------------------------
# sweep: one capture, one refit pass per patched layer


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _passes(events):
    """Passes per name from progress events: a pass ends when the name changes or the row count drops."""
    out: dict[str, int] = {}
    last = None
    for name, rows in events:
        if last is None or name != last[0] or rows <= last[1]:
            out[name] = out.get(name, 0) + 1
        last = (name, rows)
    return out


@pytest.mark.parametrize("modes, refits_per_layer", [(("fair", "plain"), 1), (("none",), 0),
                                                     (("plain", "none", "fair"), 1)])
def test_one_capture_and_one_refit_pass_per_setting(monkeypatch, modes, refits_per_layer):
    prepares = _count_calls(monkeypatch, sweep_mod, "_prepare")
    captures = _count_calls(monkeypatch, pipeline_mod, "capture")
    refits = _count_calls(monkeypatch, sweep_mod, "_collect_refit")
    reports = _count_calls(monkeypatch, sweep_mod, "report_outputs")
    events = []
    res = sweep(GEMM.path, GEMM.data_path, **gemm_kwargs(c1=C1, c2=C2, refit=modes),
                progress=lambda name, rows: events.append((name, rows)))
    settings_ = len(C1) * len(C2)
    assert len(res.points) == settings_ * len(modes)
    assert len(prepares) == 1 and len(captures) == 1
    assert len(refits) == settings_ * refits_per_layer
    assert len(reports) == len(res.points)  # one report pass per point
    # the same, seen through the public progress hook
    assert _passes(events) == {k: v for k, v in {"capture": 1, "refit": settings_ * refits_per_layer,
                                                 "report": len(res.points)}.items() if v}


# ------------------------------------------------------------------------------------------------
# sweep: bad grids


@pytest.mark.parametrize("kwargs, needles", [
    ({"c1": [0.5]}, ("--c1", "0.5")),
    ({"c1": [1, 15, 0]}, ("--c1", "0")),
    ({"c2": [float("nan")]}, ("--c2", "nan")),
    ({"c2": [float("inf")]}, ("--c2",)),
    ({"refit": ["fair", "bogus"]}, ("--refit", "bogus")),
])
def test_bad_grid_raises_before_any_pass(monkeypatch, kwargs, needles):
    def no_pass(*args, **kw):
        raise AssertionError("the data was read before the options were checked")

    monkeypatch.setattr(sweep_mod, "_prepare", no_pass)
    with pytest.raises(OptionError) as exc:
        sweep(GEMM.path, GEMM.data_path, **gemm_kwargs(**kwargs))
    for needle in needles:
        assert needle in str(exc.value)


@pytest.mark.parametrize("extra, needles", [
    (("--c1", "0.5"), ("--c1", "0.5")),
    (("--c1", "abc"), ("--c1", "abc")),
    (("--c1", "1,x,15"), ("--c1", "1,x,15")),
    (("--c2", "1,0"), ("--c2", "0")),
    (("--c2", "nan"), ("--c2",)),
    (("--refit", "fair,bogus"), ("--refit", "bogus")),
    (("--holdout", "1"), ("--holdout",)),
])
def test_cli_sweep_bad_grid(work, extra, needles):
    state = dir_state(work)
    assert_bad_input(invoke(*sweep_args(work, *extra)), *needles)
    assert dir_state(work) == state


# ------------------------------------------------------------------------------------------------
# sweep: the command


def _table_rows(text):
    """(c1, c2, refit, ks, mean gap, mse, starred) of each row of the sweep table."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["c1", "c2", "refit"])
    assert set(lines[header + 1].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[header + 2:]:
        if not line.strip() or line.startswith("* "):
            break
        cells = line.split()
        assert len(cells) in (6, 7), line
        assert len(cells) == 6 or cells[6] == "*", line
        rows.append((float(cells[0]), float(cells[1]), cells[2], float(cells[3]), float(cells[4]),
                     None if cells[5] == "-" else float(cells[5]), len(cells) == 7))
    return rows


@pytest.mark.parametrize("target", [True, False])
def test_cli_sweep_table_marks_the_pareto_rows(work, target):
    extra = ("--c1", "15,1", "--c2", "1,150", "--refit", "fair,plain,none")
    result = invoke(*sweep_args(work, *extra, target=target))
    assert result.exit_code == 0, result.stderr
    rows = _table_rows(result.stdout)
    lib = sweep(work / GEMM.model, work / GEMM.data, layer=1, group="g", c1=C1, c2=C2,
                refit=["fair", "plain", "none"], **({"target": "y"} if target else {"features": FEATURES}))
    assert len(rows) == len(lib.points) == 12
    expected = reference_pareto([(p.metrics.ks, cost(p.metrics)) for p in lib.points])
    for row, point, star in zip(rows, lib.points, expected):
        assert row[:3] == (point.c1, point.c2, point.refit)
        assert row[3] == pytest.approx(point.metrics.ks, abs=6e-5)
        assert row[4] == pytest.approx(point.metrics.mean_gap, abs=6e-5)
        assert (row[5] is None) == (not target)
        if target:
            assert row[5] == pytest.approx(point.metrics.mse, abs=6e-5)
        assert row[6] is star
    assert 0 < sum(expected) < len(expected)
    assert ("lower MSE" if target else "lower mean gap") in result.stdout


def test_cli_sweep_json(work):
    result = invoke(*sweep_args(work, "--c1", "15,1", "--c2", "1,150", "--refit", "fair,plain", "--json"))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert {"layer", "before", "points"} <= data.keys()
    assert data["layer"]["index"] == 1 and data["layer"]["name"] == "Gemm_1"
    lib = sweep(work / GEMM.model, work / GEMM.data, **gemm_kwargs(c1=C1, c2=C2, refit=["fair", "plain"]))
    assert_metrics_equal(data["before"], lib.before)
    assert len(data["points"]) == 8
    for got, point in zip(data["points"], lib.points):
        assert POINT_KEYS <= set(got)
        assert got.get("layer", 1) == 1
        assert (got["c1"], got["c2"], got["refit"]) == (point.c1, point.c2, point.refit)
        for key in ("ks", "mean_gap", "mse", "mae"):
            assert got[key] == pytest.approx(getattr(point.metrics, key), abs=TOL)
        assert isinstance(got["pareto"], bool)
    coords = [(p["ks"], p["mse"]) for p in data["points"]]
    assert [p["pareto"] for p in data["points"]] == reference_pareto(coords)


def test_cli_sweep_json_without_target(work):
    result = invoke(*sweep_args(work, "--c1", "1,15", "--c2", "1", "--json", target=False))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["before"]["mse"] is None
    assert all(p["mse"] is None and p["mae"] is None for p in data["points"])
    coords = [(p["ks"], p["mean_gap"]) for p in data["points"]]
    assert [p["pareto"] for p in data["points"]] == reference_pareto(coords)


def test_cli_sweep_writes_nothing(work):
    state = dir_state(work)
    result = invoke(*sweep_args(work, "--c1", "1", "--c2", "1,150"))
    assert result.exit_code == 0, result.stderr
    assert dir_state(work) == state


# ------------------------------------------------------------------------------------------------
# budget: the library


def _feasible(points, budget):
    return [p for p in points if all(getattr(p.metrics, k) <= v for k, v in budget.items())]


def _by_mse(points):
    return sorted(points, key=lambda p: p.metrics.mse)


def _same_point(a, b):
    return a is not None and b is not None and (a.c1, a.c2, a.refit) == (b.c1, b.c2, b.refit)


@pytest.fixture(scope="module")
def gemm_sweep():
    """The default grid with both refit modes, for choosing budgets that bind."""
    return sweep(GEMM.path, GEMM.data_path, **gemm_kwargs(refit=["fair", "plain"]))


def _boundary_budget(points):
    """A KS budget equal to one point's KS (that point must count as inside it) that leaves >= 3 points in."""
    front = sorted((p for p in points if p.pareto), key=lambda p: p.metrics.ks)
    for p in front[1:]:
        if len(_feasible(points, {"ks": p.metrics.ks})) >= 3:
            return p.metrics.ks
    raise AssertionError("no usable budget")


def test_budget_picks_the_lowest_mse_setting_within_the_ks_budget(gemm_sweep):
    max_ks = _boundary_budget(gemm_sweep.points)
    res = repair_within_budget(GEMM.path, GEMM.data_path, max_ks=max_ks, refit=["fair", "plain"], folds=0,
                               **gemm_kwargs())
    ranked = _by_mse(_feasible(res.sweep.points, {"ks": max_ks}))
    assert len(ranked) >= 3
    assert ranked[0].metrics.mse < ranked[1].metrics.mse < ranked[2].metrics.mse  # no ties to break
    assert _same_point(res.winner, ranked[0])
    assert _same_point(res.runner_up, ranked[1])
    assert res.closest is None and res.budget == {"ks": max_ks}
    # the returned sweep is the full grid
    assert [(p.c1, p.c2, p.refit) for p in res.sweep.points] == [(p.c1, p.c2, p.refit) for p in gemm_sweep.points]
    # the repair really is the winner's setting, measured on the same holdout rows
    chosen = res.result
    assert (chosen.options.c1, chosen.options.c2, chosen.options.refit) == (res.winner.c1, res.winner.c2,
                                                                            res.winner.refit)
    assert_metrics_equal(chosen.after, res.winner.metrics)
    assert_metrics_equal(chosen.before, res.sweep.before)
    assert chosen.after.ks <= max_ks
    # the lowest-KS setting is a different, costlier one: the budget is not "minimise KS"
    lowest_ks = min(res.sweep.points, key=lambda p: p.metrics.ks)
    assert not _same_point(lowest_ks, res.winner)


def test_budget_on_law_school():
    kwargs = {"layer": -2, "group": LAW.group, "groups": LAW_GROUPS, "target": LAW.target, "c1": (1.0, 15.0),
              "c2": (1.0, 150.0), "refit": ["fair"], "folds": 0}
    probe = sweep(LAW.path, LAW.data_path, **kwargs)
    ks = sorted(p.metrics.ks for p in probe.points)
    max_ks = ks[2]  # three of the four settings are inside
    res = repair_within_budget(LAW.path, LAW.data_path, max_ks=max_ks, **kwargs)
    ranked = _by_mse(_feasible(res.sweep.points, {"ks": max_ks}))
    assert len(ranked) >= 3
    assert _same_point(res.winner, ranked[0]) and _same_point(res.runner_up, ranked[1])
    assert_metrics_equal(res.result.after, res.winner.metrics)
    assert res.result.after.ks <= max_ks < res.result.before.ks


def test_budget_without_a_runner_up(gemm_sweep):
    lowest = min(gemm_sweep.points, key=lambda p: p.metrics.ks)
    assert sum(p.metrics.ks <= lowest.metrics.ks for p in gemm_sweep.points) == 1
    res = repair_within_budget(GEMM.path, GEMM.data_path, max_ks=lowest.metrics.ks, refit=["fair", "plain"],
                               folds=0, **gemm_kwargs())
    assert _same_point(res.winner, lowest) and res.runner_up is None
    assert_metrics_equal(res.result.after, lowest.metrics)


def test_infeasible_budget_returns_the_closest_setting():
    res = repair_within_budget(GEMM.path, GEMM.data_path, max_ks=1e-4, folds=0, **gemm_kwargs(c1=C1, c2=C2))
    assert res.result is None and res.winner is None and res.runner_up is None
    closest = min(res.sweep.points, key=lambda p: p.metrics.ks)  # one budget: the smallest excess is the lowest KS
    assert _same_point(res.closest, closest)
    assert res.to_dict()["met"] is False


@pytest.mark.parametrize("kwargs, needles", [
    ({"max_ks": 0.1, "target": None}, ("--target",)),
    ({}, ("--max-ks",)),
    ({"max_ks": -0.1}, ("--max-ks",)),
    ({"max_mean_gap": float("nan")}, ("--max-mean-gap",)),
])
def test_budget_bad_options_raise_before_any_pass(monkeypatch, kwargs, needles):
    def no_pass(*args, **kw):
        raise AssertionError("the data was read before the options were checked")

    monkeypatch.setattr(sweep_mod, "_prepare", no_pass)
    options = {**gemm_kwargs(), **kwargs}
    with pytest.raises(OptionError) as exc:
        repair_within_budget(GEMM.path, GEMM.data_path, **options)
    for needle in needles:
        assert needle in str(exc.value)


# ------------------------------------------------------------------------------------------------
# budget: the command


@pytest.fixture(scope="module")
def cli_grid():
    """What `repair --max-ks --refit fair` searches: the default c1 x c2 grid with the fair refit."""
    return sweep(GEMM.path, GEMM.data_path, **gemm_kwargs()).points


def _winner(points, budget):
    ranked = _by_mse(_feasible(points, budget))
    return (ranked[0] if ranked else None), (ranked[1] if len(ranked) > 1 else None)


def _key(p):
    return (p["c1"], p["c2"], p["refit"]) if isinstance(p, dict) else (p.c1, p.c2, p.refit)


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


#: KS alone, mean gap alone, both: three budgets whose winners differ on the fixture
BUDGETS = {"ks": {"ks": 0.17}, "mean gap": {"mean_gap": 0.02}, "both": {"ks": 0.17, "mean_gap": 0.02}}


def _budget_flags(budget):
    flags = []
    if "ks" in budget:
        flags += ["--max-ks", repr(budget["ks"])]
    if "mean_gap" in budget:
        flags += ["--max-mean-gap", repr(budget["mean_gap"])]
    return flags


def test_budgets_under_test_bind(cli_grid):
    winners = {name: _winner(cli_grid, b)[0] for name, b in BUDGETS.items()}
    assert all(w is not None for w in winners.values())
    assert len({_key(w) for w in winners.values()}) == 3  # each constraint changes the choice


@pytest.mark.parametrize("name", list(BUDGETS))
def test_cli_budget_json(work, cli_grid, name):
    budget = BUDGETS[name]
    result = invoke(*budget_args(work, *_budget_flags(budget), "--json"))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    winner, runner_up = _winner(cli_grid, budget)
    assert data["budget"]["budget"] == budget and data["budget"]["met"] is True
    assert _key(data["budget"]["winner"]) == _key(winner)
    if runner_up is None:
        assert data["budget"]["runner_up"] is None
    else:
        assert _key(data["budget"]["runner_up"]) == _key(runner_up)
    assert POINT_KEYS <= set(data["budget"]["winner"])
    # the repair that was written is the winner's
    assert (data["options"]["c1"], data["options"]["c2"], data["options"]["refit"]) == _key(winner)
    assert_metrics_equal(data["after"], winner.metrics)
    for key, limit in budget.items():
        assert data["after"][key] <= limit
    out = work / "out.onnx"
    assert data["output"] == str(out) and out.is_file()
    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    single = repair(work / GEMM.model, work / GEMM.data, c1=winner.c1, c2=winner.c2, refit=winner.refit,
                    **gemm_kwargs())
    expected = _weights(single.model)
    got = _weights(written)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_cli_budget_table(work, cli_grid):
    budget = BUDGETS["ks"]
    result = invoke(*budget_args(work, *_budget_flags(budget)))
    assert result.exit_code == 0, result.stderr
    winner, runner_up = _winner(cli_grid, budget)
    lines = result.stdout.splitlines()
    win = next(line for line in lines if line.startswith("winner"))
    assert f"c1={winner.c1:g}, c2={winner.c2:g}" in win
    run = next(line for line in lines if line.startswith("runner-up"))
    assert f"c1={runner_up.c1:g}, c2={runner_up.c2:g}" in run
    assert f"c2={winner.c2:g} (second moment), c1={winner.c1:g} (first moment)" in result.stdout
    assert (work / "out.onnx").is_file()


@pytest.mark.parametrize("json_out", [False, True])
def test_cli_infeasible_budget_writes_nothing(work, cli_grid, json_out):
    state = dir_state(work)
    result = invoke(*budget_args(work, "--max-ks", "0.0001", *(["--json"] if json_out else [])))
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert not (work / "out.onnx").exists()
    assert dir_state(work) == state  # no temp file either
    closest = min(cli_grid, key=lambda p: p.metrics.ks)
    if json_out:
        data = json.loads(result.stdout)
        assert data["met"] is False and data["winner"] is None
        assert _key(data["closest"]) == _key(closest)
    else:
        assert "closest" in result.stdout and "nothing was written" in result.stdout
        assert f"c1={closest.c1:g}, c2={closest.c2:g}" in result.stdout


def test_cli_infeasible_budget_with_the_default_output(work):
    state = dir_state(work)
    args = ["repair", work / GEMM.model, "--layer", "1", "--data", work / GEMM.data, "--group", "g", "--target", "y",
            "--max-ks", "0.0001", "--max-mean-gap", "0.0001"]
    result = invoke(*args)
    assert result.exit_code == 1
    assert dir_state(work) == state
    assert not (work / "gemm_transb0_alpha.esvd.onnx").exists()


@pytest.mark.parametrize("extra, needles", [
    (("--max-ks", "0.1"), ("--target",)),
    (("--max-mean-gap", "0.1"), ("--target",)),
])
def test_cli_budget_without_target(work, extra, needles):
    state = dir_state(work)
    args = ["repair", work / GEMM.model, "--layer", "1", "--data", work / GEMM.data, "--group", "g",
            "-o", work / "out.onnx", *extra]
    assert_bad_input(invoke(*args), *needles)
    assert dir_state(work) == state


@pytest.mark.parametrize("extra, needles", [
    (("--max-ks", "-0.1"), ("--max-ks",)),
    (("--max-mean-gap", "nan"), ("--max-mean-gap",)),
])
def test_cli_bad_budget(work, extra, needles):
    state = dir_state(work)
    assert_bad_input(invoke(*budget_args(work, *extra)), *needles)
    assert dir_state(work) == state


def test_cli_budget_refuses_an_existing_output_before_searching(work, monkeypatch):
    (work / "out.onnx").write_bytes(b"precious")
    state = dir_state(work)
    monkeypatch.setattr(sweep_mod, "_prepare", lambda *a, **k: pytest.fail("searched before checking -o"))
    assert_bad_input(invoke(*budget_args(work, "--max-ks", "0.2")), "out.onnx", "--force")
    assert dir_state(work) == state


# ------------------------------------------------------------------------------------------------
# a setting that fails is skipped and marked (issue 11's leftover)


def _huge_target_csv(tmp_path):
    """GEMM's data with a finite but huge target (1e200) in 39 rows: the `fair` refit's weight overflows float32,
    while `--refit none` (no refit) still gives a model."""
    lines = (FIXTURES / GEMM.data).read_text().splitlines()
    col = lines[0].split(",").index("y")
    for i in range(1, 40):
        cells = lines[i].split(",")
        cells[col] = "1e200"
        lines[i] = ",".join(cells)
    path = tmp_path / "huge.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the 1e200 targets
def test_sweep_skips_a_failing_setting_and_goes_on(tmp_path):
    huge = _huge_target_csv(tmp_path)
    res = onnx_esvd.sweep(GEMM.path, huge, evaluate=GEMM.data_path, c1=(1, 15), c2=(1,), refit=["none", "fair"],
                          **gemm_kwargs())
    assert [(p.c1, p.refit, p.metrics is None) for p in res.points] == \
        [(1, "none", False), (1, "fair", True), (15, "none", False), (15, "fair", True)]
    for p in res.points:
        if p.metrics is None:
            assert "beyond the largest float32" in p.failed and "nothing was written" not in p.failed
            assert not p.pareto
            d = p.to_dict()
            assert d["failed"] == p.failed and d["ks"] is None and d["mse"] is None
        else:
            assert p.failed is None and p.to_dict()["failed"] is None
    assert res.measured == (res.points[0], res.points[2])
    alone = repair(GEMM.path, huge, evaluate=GEMM.data_path, c1=15, c2=1, refit="none", bootstrap=0, **gemm_kwargs())
    assert_metrics_equal(res.points[2].metrics, alone.after)
    expected = reference_pareto([(p.metrics.ks, p.metrics.mse) for p in res.measured])
    assert [res.points[0].pareto, res.points[2].pareto] == expected


def test_cli_sweep_marks_failed_settings_and_exits_2_only_when_all_fail(tmp_path):
    huge = _huge_target_csv(tmp_path)
    base = ["sweep", GEMM.path, "--layer", "1", "--data", huge, "--eval", GEMM.data_path, "--group", "g",
            "--target", "y", "--c1", "1,15", "--c2", "1", "-q"]
    text = invoke(*base, "--refit", "none,fair")
    assert text.exit_code == 0, text.stderr
    rows = [line.split() for line in text.stdout.splitlines() if line.split()[:1] in (["1"], ["15"])]
    assert [r[2] for r in rows] == ["none", "fair", "none", "fair"]
    assert [r[3] for r in rows[1::2]] == ["failed", "failed"] and all(0 <= float(r[3]) <= 1 for r in rows[::2])
    assert "failed: 2 of 4 settings were skipped:" in text.stdout
    assert "c1=15, c2=1, refit fair: the repair computed" in text.stdout
    data = json.loads(invoke(*base, "--refit", "none,fair", "--json").stdout)
    assert [p["failed"] is not None for p in data["points"]] == [False, True, False, True]
    assert all(p["ks"] is None for p in data["points"] if p["failed"])
    assert_bad_input(invoke(*base, "--refit", "fair"), "beyond the largest float32", "final node 'Gemm_2'")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the 1e200 targets
def test_budget_never_chooses_a_failed_setting(tmp_path):
    huge = _huge_target_csv(tmp_path)
    res = repair_within_budget(GEMM.path, huge, evaluate=GEMM.data_path, c1=(1, 15), c2=(1,), refit=["none", "fair"],
                               max_ks=1.0, **gemm_kwargs())
    assert res.winner is not None and res.winner.refit == "none" and res.result is not None
    assert res.runner_up is not None and res.runner_up.refit == "none"


def test_sweep_marks_settings_that_repair_would_refuse_for_another_outputs_drift():
    """A Keras two-head model's shared layer: `sweep` listed settings that moved the other head by half its spread,
    which `repair` with the same setting refuses (--max-drift); the sweep must mark them failed the same way."""
    from test_score import data as two_head_data, two_head_model

    model, d = two_head_model(), two_head_data(n=3000)
    kwargs = dict(layer="body", group="g", score="a_hat", target="y", holdout=0.3, refit=["fair"])
    res = onnx_esvd.sweep(model, d, c1=(1, 15), c2=(1, 150), **kwargs)
    for p in res.points:
        try:
            repair(model, d, c1=p.c1, c2=p.c2, bootstrap=0, **{**kwargs, "refit": "fair"})
            refused = None
        except onnx_esvd.LayerError as exc:
            refused = str(exc)
        assert (p.failed is None) == (refused is None), (p.c1, p.c2, p.failed, refused)
        if refused:
            assert "output 'b_hat' would change" in p.failed and p.metrics is None
    assert any(p.failed for p in res.points) and any(p.metrics for p in res.points)
    loose = onnx_esvd.sweep(model, d, c1=(1, 15), c2=(1, 150), max_drift=10, **kwargs)
    assert all(p.failed is None for p in loose.points)
