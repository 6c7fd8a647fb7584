"""Turn library errors into one line and an exit code; only this layer decides exit codes."""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager
from typing import Iterator

import typer

#: Exit codes: 0 success, 1 internal error (or a failed gate), 2 bad input or usage.
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


@contextmanager
def handled(debug: bool) -> Iterator[None]:
    """Run a command body: EsvdError -> one line + exit 2; anything unexpected -> exit 1."""
    from onnx_esvd.errors import EsvdError

    try:
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
        typer.echo("interrupted; no output was written", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence, reported as such
        if debug:
            traceback.print_exc()
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            typer.echo(f"internal error: {type(exc).__name__}: {first}", err=True)
            typer.echo("rerun with --debug for the traceback, and report it with the command line to the "
                       "onnx-esvd issue tracker", err=True)
        sys.stderr.flush()
        raise typer.Exit(EXIT_INTERNAL) from None
