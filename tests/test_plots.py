"""Pictures: `plot_tradeoff` (a sweep) and `plot_distributions` (a repair), and `--plot` on the command line.

matplotlib is an optional extra. The tests of the missing-matplotlib path run everywhere (matplotlib is
really absent from the CI test environment, and blocked here where it is installed); the tests of the PNG
files need matplotlib and skip without it (they run in the bench environment:
`.venv/bin/python -m pytest tests/test_plots.py`).
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

import onnx_esvd
from conftest import assert_bad_input, invoke, CASES, LAW_GROUPS, copy_fixtures, dir_state
from onnx_esvd import OptionError, repair
from onnx_esvd.plots import plot_distributions, plot_tradeoff

sweep = onnx_esvd.sweep

GEMM = CASES["gemm_transb0_alpha.onnx"]
LAW = CASES["law_school_mlp_legacy.onnx"]
FEATURES = [f"x{j}" for j in range(6)]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"




@pytest.fixture
def work(tmp_path):
    copy_fixtures(tmp_path, GEMM.model, GEMM.data)
    return tmp_path


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib unimportable: really absent in the CI test environment, blocked here where installed."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError


@pytest.fixture
def mpl():
    """The PNG tests need matplotlib (the `plot` extra)."""
    return pytest.importorskip("matplotlib")


def sweep_args(work, *extra, target=True):
    base = ["sweep", work / GEMM.model, "--layer", "1", "--data", work / GEMM.data, "--group", "g"]
    base += ["--target", "y"] if target else ["--features", ",".join(FEATURES)]
    return [*base, "--c1", "1,15", "--c2", "1,150", *extra]


def repair_args(work, *extra):
    return ["repair", work / GEMM.model, "--layer", "1", "--data", work / GEMM.data, "--group", "g", "--target", "y",
            "-o", work / "out.onnx", *extra]


def small_sweep(target=True, path=GEMM.path, data=GEMM.data_path):
    kwargs = {"target": "y"} if target else {"features": FEATURES}
    return sweep(path, data, layer=1, group="g", c1=[1, 15], c2=[1, 150], refit=["fair", "plain"], **kwargs)


def assert_png(path: Path, mpl_module, min_side: int = 300) -> tuple[int, int]:
    """A real PNG: signature, more than a few KB, decodes to a non-blank image larger than min_side."""
    import matplotlib.image as mpimg
    import numpy as np

    data = Path(path).read_bytes()
    assert data.startswith(PNG_SIGNATURE), data[:16]
    assert len(data) > 5_000, len(data)
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    height, width = img.shape[:2]
    assert width > min_side and height > min_side, img.shape
    assert float(np.ptp(img[..., :3])) > 0.5  # not a blank canvas
    return width, height


def assert_only(directory: Path, names: set[str]):
    """Exactly these files in the directory: no temp file (hidden or not) left behind."""
    assert {p.name for p in directory.iterdir()} == names


# ------------------------------------------------------------------------------------------------
# without matplotlib (runs everywhere)


@pytest.mark.parametrize("which", ["tradeoff", "distributions"])
def test_plot_functions_without_matplotlib(tmp_path, no_matplotlib, which):
    if which == "tradeoff":
        result, fn = small_sweep(), plot_tradeoff
    else:
        result, fn = repair(GEMM.path, GEMM.data_path, layer=1, group="g", target="y"), plot_distributions
    with pytest.raises(OptionError) as exc:
        fn(result, tmp_path / "plot.png")
    message = str(exc.value)
    assert "matplotlib" in message and "pip install" in message
    assert "\n" not in message
    assert_only(tmp_path, set())


def test_cli_sweep_plot_without_matplotlib(work, no_matplotlib):
    state = dir_state(work)
    assert_bad_input(invoke(*sweep_args(work, "--plot", work / "tradeoff.png")), "matplotlib", "pip install")
    assert dir_state(work) == state


def test_cli_repair_plot_without_matplotlib_message(work, no_matplotlib):
    assert_bad_input(invoke(*repair_args(work, "--plot", work / "dist.png")), "matplotlib", "pip install")
    assert not (work / "dist.png").exists()


@pytest.mark.parametrize("extra", [(), ("--max-ks", "0.2")], ids=["repair", "budget"])
def test_cli_repair_plot_without_matplotlib_writes_nothing(work, no_matplotlib, extra):
    """Exit 2 means bad input and nothing written (tests/test_cli.py::test_bad_input's contract): a missing
    matplotlib must be reported before the repair, not after the model file was written."""
    state = dir_state(work)
    result = invoke(*repair_args(work, *extra, "--plot", work / "dist.png"))
    assert result.exit_code == 2
    assert dir_state(work) == state, "the model was written although the command failed with exit 2"


@pytest.mark.parametrize("command, where", [
    ("sweep", "missing dir"), ("sweep", "the model"), ("sweep", "the data"),
    ("repair", "missing dir"), ("repair", "the model"), ("repair", "the data"), ("repair", "the output"),
])
def test_cli_plot_path_checked_before_any_work(work, monkeypatch, command, where):
    def no_pass(*args, **kwargs):
        raise AssertionError("the data was read before --plot was checked")

    monkeypatch.setattr(sys.modules["onnx_esvd.tradeoff"], "_prepare", no_pass)
    monkeypatch.setattr(sys.modules["onnx_esvd.pipeline"], "_prepare", no_pass)
    path = {"missing dir": work / "nodir" / "p.png", "the model": work / GEMM.model, "the data": work / GEMM.data,
            "the output": work / "out.onnx"}[where]
    state = dir_state(work)
    args = sweep_args(work, "--plot", path) if command == "sweep" else repair_args(work, "--plot", path)
    assert_bad_input(invoke(*args), "--plot")
    assert dir_state(work) == state


# ------------------------------------------------------------------------------------------------
# the PNG files (need matplotlib)


@pytest.mark.parametrize("target", [True, False], ids=["mse", "mean gap"])
def test_plot_tradeoff_png(tmp_path, mpl, target):
    out = tmp_path / "tradeoff.png"
    written = plot_tradeoff(small_sweep(target), out)
    assert Path(written) == out
    assert_png(out, mpl)
    assert_only(tmp_path, {"tradeoff.png"})


def test_plot_distributions_png(tmp_path, mpl):
    res = repair(GEMM.path, GEMM.data_path, layer=1, group="g", target="y")
    out = tmp_path / "dist.png"
    assert Path(plot_distributions(res, out)) == out
    width, height = assert_png(out, mpl)
    assert width > height  # two panels side by side
    assert_only(tmp_path, {"dist.png"})


def test_plot_distributions_png_law_school(tmp_path, mpl):
    res = repair(LAW.path, LAW.data_path, layer=-2, group=LAW.group, groups=LAW_GROUPS, target=LAW.target)
    out = tmp_path / "law.png"
    plot_distributions(res, out)
    assert_png(out, mpl)
    assert_only(tmp_path, {"law.png"})


def test_plot_replaces_an_existing_file(tmp_path, mpl):
    out = tmp_path / "tradeoff.png"
    out.write_bytes(b"old picture")
    plot_tradeoff(small_sweep(), out)
    assert_png(out, mpl)
    assert_only(tmp_path, {"tradeoff.png"})


def test_plot_failure_leaves_the_old_file_and_no_temp_file(tmp_path, mpl, monkeypatch):
    import matplotlib.figure

    out = tmp_path / "tradeoff.png"
    out.write_bytes(b"old picture")

    def broken_savefig(self, fname, *args, **kwargs):
        Path(fname).write_bytes(PNG_SIGNATURE + b"half")  # a partial file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    result = small_sweep()
    with pytest.raises(OSError):
        plot_tradeoff(result, out)
    assert out.read_bytes() == b"old picture"
    assert_only(tmp_path, {"tradeoff.png"})


def test_plot_file_mode_follows_the_umask(tmp_path, mpl):
    """The picture is an ordinary output file: readable like any file the user creates there (the atomic
    write goes through mkstemp, whose 0600 must not leak into the result)."""
    out = tmp_path / "tradeoff.png"
    plot_tradeoff(small_sweep(), out)
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert oct(stat.S_IMODE(out.stat().st_mode)) == oct(stat.S_IMODE(reference.stat().st_mode))


def test_cli_sweep_plot(work, mpl):
    state = dir_state(work)
    out = work / "tradeoff.png"
    result = invoke(*sweep_args(work, "--refit", "fair,plain", "--plot", out))
    assert result.exit_code == 0, result.stderr
    assert f"plotted {out}" in result.stdout
    assert "pareto" in result.stdout  # the table is still printed
    assert_png(out, mpl)
    assert_only(work, set(state) | {"tradeoff.png"})
    assert {k: v for k, v in dir_state(work).items() if k != "tradeoff.png"} == state


def test_cli_sweep_plot_without_target(work, mpl):
    out = work / "tradeoff.png"
    result = invoke(*sweep_args(work, "--plot", out, target=False))
    assert result.exit_code == 0, result.stderr
    assert_png(out, mpl)


def test_cli_sweep_plot_with_json_keeps_stdout_json(work, mpl):
    out = work / "tradeoff.png"
    result = invoke(*sweep_args(work, "--plot", out, "--json"))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but the JSON object on stdout
    assert len(data["points"]) == 4
    assert_png(out, mpl)


@pytest.mark.parametrize("extra", [(), ("--max-ks", "0.2")], ids=["repair", "budget"])
def test_cli_repair_plot(work, mpl, extra):
    state = dir_state(work)
    out = work / "dist.png"
    result = invoke(*repair_args(work, *extra, "--plot", out))
    assert result.exit_code == 0, result.stderr
    assert f"plotted {out}" in result.stdout
    assert (work / "out.onnx").is_file()
    assert_png(out, mpl)
    assert_only(work, set(state) | {"out.onnx", "dist.png"})


def test_cli_repair_plot_over_an_existing_picture(work, mpl):
    out = work / "dist.png"
    out.write_bytes(b"old picture")
    result = invoke(*repair_args(work, "--plot", out))  # no --force needed for the picture
    assert result.exit_code == 0, result.stderr
    assert_png(out, mpl)


def test_cli_plot_with_an_unsupported_extension_is_bad_input(work, mpl):
    """A --plot name matplotlib cannot write is the user's input error: exit 2 with one line (before the
    sweep runs), not 'internal error ... report it to the issue tracker' after it."""
    state = dir_state(work)
    assert_bad_input(invoke(*sweep_args(work, "--plot", work / "tradeoff.xyz")), "xyz")
    assert dir_state(work) == state


def test_cli_plot_svg(work, mpl):
    out = work / "tradeoff.svg"
    result = invoke(*sweep_args(work, "--plot", out))
    assert result.exit_code == 0, result.stderr
    text = out.read_text(encoding="utf-8")
    assert "<svg" in text and len(text) > 5_000
    assert_only(work, {GEMM.model, GEMM.data, "tradeoff.svg"})
