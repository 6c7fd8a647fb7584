"""NumPy .npz archives, streamed: 1-D arrays are columns, a 2-D array `K` [rows, w] is the columns K_0...

Members are read in chunks of rows straight from the archive (stored or deflated), never whole.
A Fortran-ordered (column-major) 2-D member is read column by column, one forward-only stream per
needed column. Object arrays are refused without unpickling; a member whose header claims more data
than it holds, a bad header, a CRC error or a short read is a one-line DataError.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from ..errors import DataError
from .base import Batch, Keep, Table, as_float, render_text

_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


class _Member:
    """Layout of one .npy member: shape, dtype, order and where its data starts."""

    def __init__(self, zf: zipfile.ZipFile, member: str, where: str) -> None:
        self.member, self.where = member, where
        fmt = np.lib.format
        try:
            with zf.open(member) as f:
                version = fmt.read_magic(f)
                if version not in ((1, 0), (2, 0), (3, 0)):
                    raise ValueError(f"unknown .npy version {version}")
                reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = reader(f)
                self.offset = f.tell()
        except (ValueError, *_READ_ERRORS) as exc:
            raise DataError(f"{where}: not a valid .npy member ({exc}); save the archive again with numpy.savez") \
                from None
        if dtype.hasobject:
            raise DataError(f"{where}: array holds Python objects, which are never unpickled; save it as numbers "
                            "or fixed-width strings")
        self.shape, self.dtype, self.fortran = tuple(shape), dtype, bool(fortran) and len(shape) > 1
        self.items = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        size = zf.getinfo(member).file_size
        if self.offset + self.items * dtype.itemsize != size:
            raise DataError(f"{where}: the header claims shape {self.shape} of {dtype} "
                            f"({self.items * dtype.itemsize} bytes) but the member holds {size - self.offset} "
                            "bytes; the archive is truncated or corrupt")


class _Reader:
    """Consecutive rows of one member: [n] or [n, w] per `read(n)`; forward-only streams."""

    def __init__(self, zf: zipfile.ZipFile, m: _Member) -> None:
        self.m = m
        if m.fortran:  # column j is the contiguous run of rows [j * rows, (j + 1) * rows)
            rows, width = m.shape
            self.files = []
            for j in range(width):
                f = zf.open(m.member)
                _skip(f, m.offset + j * rows * m.dtype.itemsize, m.where)
                self.files.append(f)
        else:
            f = zf.open(m.member)
            _skip(f, m.offset, m.where)
            self.files = [f]

    def read(self, n: int) -> np.ndarray:
        m = self.m
        if not m.fortran:
            width = m.items // m.shape[0] if m.shape[0] else 1
            data = _read_exact(self.files[0], n * width * m.dtype.itemsize, m.where)
            return np.frombuffer(data, dtype=m.dtype).reshape((n,) + m.shape[1:])
        cols = [np.frombuffer(_read_exact(f, n * m.dtype.itemsize, m.where), dtype=m.dtype) for f in self.files]
        return np.stack(cols, axis=1)

    def close(self) -> None:
        for f in self.files:
            f.close()


def _skip(f: IO[bytes], nbytes: int, where: str) -> None:
    while nbytes > 0:
        got = len(_read_exact(f, min(nbytes, 1 << 22), where))
        nbytes -= got


def _read_exact(f: IO[bytes], nbytes: int, where: str) -> bytes:
    try:
        data = f.read(nbytes)
    except _READ_ERRORS as exc:
        raise DataError(f"{where}: cannot read the member ({exc}); the archive is truncated or corrupt") from None
    if len(data) != nbytes:
        raise DataError(f"{where}: the member ends early; the archive is truncated or corrupt")
    return data


class NpzTable(Table):
    """A NumPy .npz archive: 1-D arrays are columns, a 2-D array `K` is columns K_0...; streamed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = str(path)
        self._members: dict[str, _Member] = {}
        try:
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    if not member.endswith(".npy"):
                        continue
                    key = member[:-4]
                    m = _Member(zf, member, f"{path}: array '{key}'")
                    if len(m.shape) not in (1, 2):
                        raise DataError(f"{path}: array '{key}' has {len(m.shape)} dimensions; store 1-D columns "
                                        "or 2-D [rows, width] blocks")
                    self._members[key] = m
        except DataError:
            raise
        except zipfile.BadZipFile:
            raise DataError(f"{path}: not a valid .npz archive; save it with numpy.savez") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check the path and permissions") from None
        except ValueError as exc:
            raise DataError(f"{path}: not a valid .npz archive ({exc})") from None
        if not self._members:
            raise DataError(f"{path}: the archive holds no arrays")
        lengths = {m.shape[0] for m in self._members.values()}
        if len(lengths) > 1:
            detail = ", ".join(f"'{k}' {m.shape[0]}" for k, m in self._members.items())
            raise DataError(f"{path}: arrays have different numbers of rows ({detail}); they must all match")
        self.rows = lengths.pop()
        self._column_of: dict[str, tuple[str, int | None]] = {}
        for key, m in self._members.items():
            if len(m.shape) == 1:
                self._column_of[key] = (key, None)
            else:
                for j in range(m.shape[1]):
                    self._column_of[f"{key}_{j}"] = (key, j)
        self.columns = tuple(self._column_of)

    def _batches(self, numeric: list[str], text: list[str], batch_size: int,
                 keep: Keep | None) -> Iterator[Batch]:
        keys = sorted({self._column_of[c][0] for c in numeric + text})
        for c in numeric:
            m = self._members[self._column_of[c][0]]
            if m.dtype.kind not in "biuf":
                raise DataError(f"{self.path}: column '{c}' holds {m.dtype} values, not numbers")
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.path}: cannot read ({exc})") from None
        readers: dict[str, _Reader] = {}
        try:
            for k in keys:
                readers[k] = _Reader(zf, self._members[k])
            start = 0
            while start < self.rows:
                n = min(batch_size, self.rows - start)
                block = {k: r.read(n) for k, r in readers.items()}

                def column(c: str) -> np.ndarray:
                    key, j = self._column_of[c]
                    return block[key] if j is None else block[key][:, j]

                values = np.empty((n, len(numeric)), dtype=np.float64)
                for j, c in enumerate(numeric):
                    values[:, j] = as_float(column(c), self.name, c)
                texts = {c: render_text(column(c)) for c in text}
                yield Batch(start, values, texts)
                start += n
        finally:
            for r in readers.values():
                r.close()
            zf.close()
