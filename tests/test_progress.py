"""The progress line: shown on a terminal for passes longer than the delay, never with --quiet or a pipe."""

from __future__ import annotations

import io
import subprocess
import sys

from conftest import FIXTURES
from onnx_esvd_cli.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_rows_and_rate_on_a_terminal_after_the_delay():
    out = FakeTerminal()
    progress = Progress(stream=out, delay=0.0, interval=0.0)
    progress("capture", 4096)
    progress("capture", 8192)
    progress("refit", 100)
    progress.close()
    text = out.getvalue()
    assert "capture: 8,192 rows" in text and "rows/s" in text
    assert "refit: 100 rows" in text
    assert text.endswith("\n") and text.count("\n") == 2  # one finished line per pass


def test_silent_before_the_delay():
    out = FakeTerminal()
    progress = Progress(stream=out, delay=3600.0)
    progress("capture", 10)
    progress.close()
    assert out.getvalue() == ""


def test_silent_with_quiet_and_when_not_a_terminal():
    for progress in (Progress(stream=FakeTerminal(), quiet=True, delay=0.0), Progress(stream=io.StringIO(), delay=0.0)):
        progress("capture", 10)
        progress.close()
        assert progress.stream.getvalue() == ""


def test_repair_through_a_pipe_prints_no_progress(tmp_path):
    """stderr of a CLI run through a pipe holds no progress line (not a terminal)."""
    result = subprocess.run(
        [sys.executable, "-m", "onnx_esvd_cli.main", "repair", str(FIXTURES / "gemm_transb0_alpha.onnx"),
         "--layer", "-2", "--data", str(FIXTURES / "gemm_transb0_alpha.csv"), "--group", "g", "--target", "y",
         "-o", str(tmp_path / "out.onnx")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "rows/s" not in result.stderr


def test_top_level_help_imports_no_numeric_stack():
    code = ("import sys; sys.argv = ['onnx-esvd', '--help']\n"
            "from onnx_esvd_cli.main import run\n"
            "try:\n    run()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('numpy', 'onnx', 'onnxruntime', 'scipy') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
