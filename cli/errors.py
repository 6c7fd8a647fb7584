"""Turn library errors into one line and an exit code; only this layer decides exit codes."""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager
from typing import Iterator

import typer
from typer.core import TyperGroup

from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # typer >= 0.26 vendors click

#: Exit codes: 0 success, 1 internal error (or a failed gate), 2 bad input or usage.
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


def usage_line(exc: ClickException) -> str:
    """A usage error as one line: `error: invalid value for '--seed': 'abc' is not a valid int; see ...`."""
    text = " ".join(part.strip() for part in exc.format_message().splitlines() if part.strip()).rstrip(".")
    text = text[:1].lower() + text[1:]
    ctx = getattr(exc, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "onnx-esvd --help"
    return f"error: {text}; see '{where}'"


class OneLineErrors(TyperGroup):
    """The command group, with click's usage errors (a usage block plus an error box) printed as one line.

    `onnx-esvd` alone still prints the help (exit 2, as before).
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
            code = rv if isinstance(rv, int) else 0
        except NoArgsIsHelpError as exc:
            exc.show()
            code = exc.exit_code
        except ClickException as exc:
            typer.echo(usage_line(exc) if isinstance(exc, UsageError) else f"error: {exc.format_message()}",
                       err=True)
            code = EXIT_BAD_INPUT if isinstance(exc, UsageError) else exc.exit_code
        except typer.Abort:
            typer.echo("interrupted; no output was written", err=True)
            code = 130
        if standalone_mode:
            sys.exit(code)
        return code


def quiet_numerics() -> None:
    """No numpy RuntimeWarning (overflow in a sum of squares, NaN compare) ever reaches stderr: the
    library checks the values that matter and reports them as errors."""
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)


def _interrupted_line() -> str:
    from onnx_esvd.modelio import written_files

    written = written_files()
    if not written:
        return "interrupted; no output was written"
    return "interrupted after writing " + ", ".join(str(p) for p in written) + " (complete files)"


def _os_error_line(exc: OSError) -> str | None:
    """ENOSPC and friends raised outside the writers (temporary files of large models, stdout)."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {exc.filename}" if exc.filename else ""
        return f"error: no space left on the device{where}; free some space (or set TMPDIR) and run again"
    return None


@contextmanager
def handled(debug: bool) -> Iterator[None]:
    """Run a command body: EsvdError -> one line + exit 2; anything unexpected -> exit 1.

    The body runs with BLAS limited to one thread, so that float64 reductions (and so the written
    weights) do not depend on the machine's core count.
    """
    from onnx_esvd.errors import EsvdError
    from onnx_esvd.modelio import forget_written

    forget_written()
    quiet_numerics()
    return_freed_memory()
    try:
        with _single_thread_blas():
            yield
    except typer.Exit:
        raise
    except BrokenPipeError:  # the reader of our stdout went away (`| head`): not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except EsvdError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        typer.echo(_interrupted_line(), err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence, reported as such
        line = _os_error_line(exc) if isinstance(exc, OSError) else None
        if line is not None:
            if debug:
                traceback.print_exc()
            typer.echo(line, err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        if debug:
            traceback.print_exc()
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            typer.echo(f"internal error: {type(exc).__name__}: {first}", err=True)
            typer.echo("rerun with --debug for the traceback, and report it with the command line to the "
                       "onnx-esvd issue tracker", err=True)
        sys.stderr.flush()
        raise typer.Exit(EXIT_INTERNAL) from None


#: Blocks from this size on come straight from the OS and go back to it when freed (glibc's mallopt).
MMAP_THRESHOLD = 1 << 24


def return_freed_memory() -> None:
    """On glibc, fix malloc's mmap threshold (and the heap trim threshold) at MMAP_THRESHOLD (16 MiB).

    By default glibc raises the threshold each time a large block is freed (up to 32 MiB per block), so the
    large arrays of the refit and the report come from heaps that keep the memory after it is freed: peak RSS
    then grew with the rows although the live arrays did not (measured on 2M rows: 426 MiB by default, 352
    with 16 MiB, 301 with 1 MiB). Below 16 MiB, the per-batch arrays stay in the heaps, which is faster (a
    1 MiB threshold made a `--refit fair` repair 25-35% slower). Elsewhere this does nothing."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's name; absent on macOS, Windows and musl
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, MMAP_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return


@contextmanager
def _single_thread_blas() -> Iterator[None]:
    """Limit BLAS to one thread: the libraries loaded now through threadpoolctl, those loaded later
    (scipy's own OpenBLAS, imported only by the commands that need it) through the environment
    variables they read when they load. Restored afterwards."""
    import os

    import numpy  # noqa: F401 - loads numpy's BLAS so that threadpoolctl can see it
    from threadpoolctl import threadpool_limits

    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
