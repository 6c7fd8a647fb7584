"""The spill file: pass 1's parsed rows kept in a binary temporary file, so that later passes over a
CSV read them back at memory speed instead of parsing the text again.

Each batch is one record of raw arrays (no pickle): `values: [n, c] float64`, the global row indices
`[n] int64`, the label codes `[n] int8` and each kept text column `[n]` as fixed-width unicode. The
file is created already unlinked (it never has a name in the directory, so nothing is left behind
whatever ends the process, Ctrl-C or a kill included) and its space is freed when it is closed: by
`close()`, or when its reader is garbage-collected, or at exit. A size cap (default 4 GiB) bounds
the disk used; past it, or when the disk is full, the spill is dropped and later passes re-parse.

Settings come from `spill_options` (the command line's `--spill-dir` and `--no-spill`).
"""

from __future__ import annotations

import contextvars
import os
import tempfile
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .errors import OptionError

#: Default cap of the spill file, in bytes.
DEFAULT_CAP = 4 * 2**30


@dataclass(frozen=True)
class SpillSettings:
    """enabled: spill at all; directory: where (None: the system's temporary directory); cap: bytes."""

    enabled: bool = True
    directory: str | None = None
    cap: int = DEFAULT_CAP


_settings: contextvars.ContextVar[SpillSettings] = contextvars.ContextVar("onnx_esvd_spill", default=SpillSettings())


def current_settings() -> SpillSettings:
    """The spill settings in force (readers take them when they are created)."""
    return _settings.get()


@contextmanager
def spill_options(*, enabled: bool = True, directory: str | os.PathLike | None = None,
                  cap: int = DEFAULT_CAP) -> Iterator[SpillSettings]:
    """Spill settings for the readers created inside (`--no-spill`: enabled=False; `--spill-dir`)."""
    if directory is not None:
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise OptionError(f"--spill-dir {directory}: no such directory; give an existing directory with free "
                              "space, or pass --no-spill")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise OptionError(f"--spill-dir {directory}: cannot write there (permission denied); give another "
                              "directory, or pass --no-spill")
    if not (isinstance(cap, int) and cap >= 0):
        raise OptionError(f"spill cap {cap!r} is invalid; give a number of bytes >= 0")
    token = _settings.set(SpillSettings(bool(enabled), directory, cap))
    try:
        yield _settings.get()
    finally:
        _settings.reset(token)


@dataclass(frozen=True)
class _Record:
    offset: int
    n: int
    text_widths: tuple[int, ...]  # unicode characters per text value, per text column

    def size(self, columns: int) -> int:
        return self.n * (8 * columns + 8 + 1 + 4 * sum(self.text_widths))


class SpillFile:
    """Rows written once in order (`append`), read back any number of times (`batches`).

    columns: numeric columns per row (c); text: names of the text columns kept.
    """

    def __init__(self, columns: int, text: Sequence[str], settings: SpillSettings) -> None:
        self.columns, self.text = int(columns), tuple(text)
        self.cap = settings.cap
        self.size = 0
        self.complete = False
        self._records: list[_Record] = []
        self._lock = threading.Lock()
        self._file = tempfile.TemporaryFile(prefix="onnx-esvd-spill-", dir=settings.directory)
        self._closer = weakref.finalize(self, self._file.close)

    @property
    def open(self) -> bool:
        return self._closer.alive

    def append(self, values: np.ndarray, index: np.ndarray, code: np.ndarray, text: dict[str, np.ndarray]) -> bool:
        """Write one batch: `values: [n, c] float64`, `index: [n] int64`, `code: [n] int8`, `text: {column: [n]}`.
        Returns False (and closes the file) when the cap would be passed or the disk is full."""
        n = int(values.shape[0])
        cols = [np.asarray(text[c]).astype(str) for c in self.text]
        record = _Record(self.size, n, tuple(int(a.dtype.itemsize // 4) for a in cols))
        nbytes = record.size(self.columns)
        if self.size + nbytes > self.cap:
            self.close()
            return False
        parts = [np.ascontiguousarray(values, dtype=np.float64), np.ascontiguousarray(index, dtype=np.int64),
                 np.ascontiguousarray(code, dtype=np.int8), *(np.ascontiguousarray(a) for a in cols)]
        try:
            with self._lock:
                self._file.seek(record.offset)
                for part in parts:
                    if part.size:
                        self._file.write(memoryview(part.reshape(-1)).cast("B"))
        except OSError:  # disk full or the like: re-parse instead
            self.close()
            return False
        self.size += nbytes
        self._records.append(record)
        return True

    def finish(self) -> None:
        """Pass 1 ended normally: the file holds every row and can replace the source."""
        if self.open:
            self._file.flush()
            self.complete = True

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        """(values [n, c] float64, index [n] int64, code [n] int8, {column: [n] str}) per written batch."""
        for record in self._records:
            buf = bytearray(record.size(self.columns))
            with self._lock:
                if not self.open:
                    raise RuntimeError("the spill file was closed while it was read")
                self._file.seek(record.offset)
                got = self._file.readinto(buf)
            if got != len(buf):
                raise OSError(f"the spill file is truncated ({got} of {len(buf)} bytes read back)")
            n, at = record.n, 0
            values = np.frombuffer(buf, np.float64, n * self.columns, at).reshape(n, self.columns)
            at += 8 * n * self.columns
            index = np.frombuffer(buf, np.int64, n, at)
            at += 8 * n
            code = np.frombuffer(buf, np.int8, n, at)
            at += n
            text = {}
            for name, width in zip(self.text, record.text_widths):
                text[name] = np.frombuffer(buf, f"U{width}", n, at) if width else np.full(n, "", dtype="U1")
                at += 4 * width * n
            yield values, index, code, text

    def close(self) -> None:
        """Free the disk space (idempotent)."""
        self.complete = False
        self._closer()
