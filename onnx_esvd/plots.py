"""Pictures of the trade-off and of the two groups' output distributions (matplotlib, optional)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OptionError
from .modelio import readable_by_others

INSTALL_HINT = ("--plot needs matplotlib, which is not installed: pip install 'onnx-esvd[plot]' "
                "(or pip install matplotlib)")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError(INSTALL_HINT) from None
    return plt


def check_plot_path(path: str | os.PathLike) -> None:
    """Before any work: matplotlib is installed and can write this file type (else a one-line OptionError)."""
    _pyplot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    supported = FigureCanvasAgg.get_supported_filetypes()
    if suffix not in supported:
        raise OptionError(f"--plot {path}: matplotlib cannot write '.{suffix}' files; use .png, .svg or .pdf")


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """Write the figure atomically (temp file in the target directory, then rename)."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OptionError(f"{out}: directory '{parent}' does not exist; create it or choose another --plot path")
    suffix = out.suffix or ".png"
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, format=suffix.lstrip(".") or "png")
        readable_by_others(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def plot_tradeoff(result: Any, path: str | os.PathLike) -> Path:
    """MSE (or the mean gap without a target) against KS for every setting of a sweep; the Pareto front
    is highlighted and the original model marked."""
    plt = _pyplot()
    has_mse = result.before.mse is not None
    cost = (lambda m: m.mse) if has_mse else (lambda m: m.mean_gap)
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=110)
    for mode, marker in (("fair", "o"), ("moments", "D"), ("cdf", "v"), ("w2", "P"), ("plain", "s"),
                         ("none", "^")):
        pts = [p for p in result.points if p.refit == mode and p.metrics is not None]
        if pts:
            ax.scatter([p.metrics.ks for p in pts], [cost(p.metrics) for p in pts], marker=marker, s=28, alpha=0.6,
                       label=f"refit {mode}")
    front = sorted((p for p in result.points if p.pareto), key=lambda p: p.metrics.ks)
    ax.plot([p.metrics.ks for p in front], [cost(p.metrics) for p in front], color="tab:red", lw=1.5, marker="o",
            ms=7, mfc="none", label="Pareto front")
    for p in front:
        ax.annotate(f"c1={p.c1:g}, c2={p.c2:g}, {p.setting.describe()}", (p.metrics.ks, cost(p.metrics)), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.scatter([result.before.ks], [cost(result.before)], color="k", marker="*", s=140, label="original model")
    ax.set_xlabel(f"KS between the groups' outputs ({result.report_rows} rows)")
    ax.set_ylabel("MSE" if has_mse else "mean gap")
    ax.set_title(f"trade-off at layer {result.layer.index} '{result.layer.name}'")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_distributions(result: Any, path: str | os.PathLike) -> Path:
    """The groups' output ECDFs before and after a repair (the KS is the largest vertical gap between two)."""
    plt = _pyplot()
    before, after = result.values
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharex=True, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["tab:blue", "tab:orange"])
    for ax, values_by_group, title, metrics in ((axes[0], before, "before", result.before),
                                                (axes[1], after, "after", result.after)):
        for i, (values, label) in enumerate(zip(values_by_group, result.groups)):
            v = np.sort(np.asarray(values, dtype=np.float64)[:, 0]) if len(values) else np.zeros(0)
            ax.step(v, np.arange(1, v.size + 1) / max(v.size, 1), where="post", color=colors[i % len(colors)],
                    label=f"{label} (n={v.size})")
        ax.set_title(f"{title}: KS {metrics.ks:.3f}, mean gap {metrics.mean_gap:.3f}")
        ax.set_xlabel("model output")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel(f"ECDF ({result.report_rows} rows)")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
