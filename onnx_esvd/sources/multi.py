"""Many files as one table: a directory or a glob pattern, and a table shifted to a global first row.

The files are read in sorted order (plain string order of their paths: name shards `part-00001`,
`part-00002`, ... so that this is the order you mean) as ONE table whose global row indices are the
concatenation order. The holdout split draws a uniform per global row index, so it does not depend
on how the rows are cut into files: `calib/*.csv` and the concatenated `calib.csv` split alike.

Every file must have the same columns in the same order. Names starting with `.` or `_` in a
directory (Spark's `_SUCCESS`, `.crc` files) are not data and are left out.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import DataError
from .base import Batch, Keep, Missing, Table

_GLOB_CHARS = ("*", "?", "[")


def is_many(data: Any) -> bool:
    """True when `data` names a directory or is a glob pattern (not an existing file's literal name)."""
    if not isinstance(data, (str, os.PathLike)):
        return False
    text = os.fspath(data)
    if os.path.isdir(text):
        return True
    return any(c in text for c in _GLOB_CHARS) and not os.path.exists(text)


def expand(data: str | os.PathLike) -> list[Path]:
    """The data files a directory or glob pattern names, in sorted order; refuses when there are none."""
    text = os.fspath(data)
    if os.path.isdir(text):
        names = [p for p in Path(text).iterdir() if not p.name.startswith((".", "_"))]
        files = sorted((p for p in names if p.is_file()), key=lambda p: str(p))
        if not files:
            raise DataError(f"{text}: the directory holds no data files; put the .csv/.npz/.parquet shards there")
        return files
    matches = sorted(glob.glob(text))
    files = [Path(m) for m in matches if os.path.isfile(m)]
    if not files:
        raise DataError(f"{text}: no file matches this pattern; check the path (quote the pattern so that the "
                        "shell does not expand it)")
    return files


def count_rows(table: Table) -> int:
    """Data rows of a table, cheaply: Parquet metadata and .npz headers say it; a CSV is split into records
    (quoted newlines and blank lines handled exactly as when reading) without parsing a field."""
    rows = getattr(table, "rows", None)
    if isinstance(rows, int):
        return rows
    end = 0

    def keep(start: int, n: int):
        nonlocal end
        end = max(end, start + n)
        import numpy as np

        return np.zeros(n, dtype=bool)

    for _ in table.batches([], 1 << 16, keep=keep):
        pass
    return end


class ConcatTable(Table):
    """Tables read one after the other as one table; part i's rows have global indices from `offsets[i]` on.

    parts: the tables, in order (same columns, same order). name: for messages.
    first_row: the global index of the first row of the first part (a shard of a larger data set).
    Row counts are taken lazily, on the first read or `file_offsets()`.
    """

    def __init__(self, parts: Sequence[Table], name: str, *, first_row: int = 0) -> None:
        if not parts:
            raise DataError(f"{name}: no data files")
        if not (isinstance(first_row, int) and first_row >= 0):
            raise DataError(f"{name}: first row {first_row!r} is invalid; it must be an integer >= 0")
        self.parts = list(parts)
        self.name = name
        self.first_row = first_row
        self.columns = tuple(self.parts[0].columns)
        self.index_columns = tuple(self.parts[0].index_columns)
        for part in self.parts[1:]:
            if tuple(part.columns) != self.columns:
                raise DataError(f"{part.name}: its columns differ from {self.parts[0].name}'s "
                                f"({_difference(self.columns, tuple(part.columns))}); every file must have the same "
                                "columns in the same order")
        self._offsets: list[int] | None = None

    def file_offsets(self) -> list[int]:
        """[len(parts) + 1] global index of each part's first row, then one past the last row."""
        if self._offsets is None:
            offsets = [self.first_row]
            for part in self.parts:
                offsets.append(offsets[-1] + count_rows(part))
            self._offsets = offsets
        return list(self._offsets)

    def set_row_counts(self, counts: Sequence[int]) -> list[int]:
        """Take each part's row count from elsewhere (counted in parallel, e.g. on Dask workers); returns
        `file_offsets()`."""
        if len(counts) != len(self.parts):
            raise ValueError(f"{len(counts)} row counts for {len(self.parts)} files")
        offsets = [self.first_row]
        for n in counts:
            offsets.append(offsets[-1] + int(n))
        self._offsets = offsets
        return list(offsets)

    @property
    def rows(self) -> int:
        offsets = self.file_offsets()
        return offsets[-1] - offsets[0]

    def batches(self, numeric: Sequence[str], batch_size: int, *, text: Sequence[str] = (),
                keep: Keep | None = None, missing: Missing = "error") -> Iterator[Batch]:
        """`Table.batches` over every part in turn with global row indices; each part checks its own rows, so
        messages name the file and line of a bad value."""
        offsets = self.file_offsets() if (len(self.parts) > 1 or self.first_row) else [0]
        for part, off in zip(self.parts, offsets):
            shifted = None if keep is None else _shifted_keep(keep, off)
            for batch in part.batches(numeric, batch_size, text=text, keep=shifted, missing=missing):
                if off:
                    batch = Batch(batch.start + off, batch.values, batch.text, batch.lines,
                                  None if batch.index is None else batch.index + off, batch.dropped)
                yield batch


def _shifted_keep(keep: Keep, off: int) -> Keep:
    return lambda start, n: keep(start + off, n)


def _difference(a: tuple[str, ...], b: tuple[str, ...]) -> str:
    missing = [c for c in a if c not in b]
    if missing:
        return f"no column '{missing[0]}'"
    extra = [c for c in b if c not in a]
    if extra:
        return f"an extra column '{extra[0]}'"
    j = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"column {j + 1} is '{b[j]}' where the first file has '{a[j]}'"


def open_many(data: str | os.PathLike) -> ConcatTable:
    """A directory or glob pattern as one `ConcatTable` (files in sorted order)."""
    from .base import _open_path

    files = expand(data)
    return ConcatTable([_open_path(p) for p in files], os.fspath(data))


def shifted(table: Table, first_row: int) -> Table:
    """`table` with global row indices starting at `first_row` (a shard of a larger data set: its holdout
    split is then the one the whole data set would get); `first_row` 0 returns the table itself."""
    if first_row == 0:
        return table
    return ConcatTable([table], table.name, first_row=first_row)
