"""Columns held in memory (mappings of arrays, pandas DataFrames, pyarrow Tables) and batch readers.

A DataFrame's named index levels (`df.set_index("race1")`) are columns too, read when asked for by name
(--group, --target, --features) but never fed to a model by position, as in a Parquet file pandas wrote.

Nothing is converted whole: each batch slices the columns it needs and converts only that slice
(numbers to float64, text columns to str). pandas and pyarrow are never imported here; their objects
are recognised by their type's module and handled with their own methods.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from ..errors import DataError
from .base import Batch, Keep, Table, as_float, render_text


def _family(obj: Any) -> str:
    """'pandas', 'pyarrow' or 'other' by the module of the object's type (no import needed)."""
    return type(obj).__module__.split(".")[0]


class _Frame:
    """One block of columns: a mapping {name: [n] or [n, w] array}, a DataFrame or an Arrow Table/RecordBatch."""

    def __init__(self, obj: Any, where: str) -> None:
        self.obj, self.where = obj, where
        self.family = _family(obj)
        self.column_of: dict[str, tuple[Any, int | None]] = {}
        self.arrays: dict[Any, Any] = {}
        self.index_names: list[str] = []  # a DataFrame's named index levels: read by name, never fed by position
        if self.family == "pandas":
            keys = list(obj.columns)
            self.arrays = {k: obj[k] for k in keys}
            for level, name in enumerate(getattr(obj.index, "names", [])):
                if name is not None and name not in self.arrays and str(name) not in map(str, keys):
                    self.arrays[name] = obj.index.get_level_values(level).to_series()
                    keys.append(name)
                    self.index_names.append(str(name))
        elif self.family == "pyarrow":
            keys = list(obj.column_names)
            self.arrays = {k: obj.column(i) for i, k in enumerate(keys)}
        else:
            keys = list(obj.keys())
            self.arrays = {k: np.asarray(obj[k]) for k in keys}
        names = [str(k) for k in keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"{where}: column '{dupes[0]}' appears twice; make column names unique")
        lengths = set()
        for key in keys:
            arr = self.arrays[key]
            ndim = getattr(arr, "ndim", 1)
            if ndim == 1:
                self.column_of[str(key)] = (key, None)
            elif ndim == 2:
                for j in range(arr.shape[1]):
                    self.column_of[f"{key}_{j}"] = (key, j)
            else:
                raise DataError(f"{where}: array '{key}' has {ndim} dimensions; give 1-D columns or 2-D blocks")
            lengths.add(len(arr))
        if len(lengths) > 1:
            raise DataError(f"{where}: arrays have different numbers of rows ({sorted(lengths)}); they must match")
        self.rows = lengths.pop() if lengths else 0

    def _slice(self, c: str, start: int, stop: int) -> Any:
        if c not in self.column_of:
            raise DataError(f"{self.where}: a batch has no column '{c}'; every batch must hold the same columns")
        key, j = self.column_of[c]
        arr = self.arrays[key]
        if self.family == "pandas":
            return arr.iloc[start:stop]
        if self.family == "pyarrow":
            return arr.slice(start, stop - start)
        return arr[start:stop] if j is None else arr[start:stop, j]

    def numeric(self, c: str, start: int, stop: int) -> np.ndarray:
        """[stop - start] float64 (missing -> NaN)."""
        col = self._slice(c, start, stop)
        if self.family == "pandas":
            return _pandas_numeric(col, self.where, c)
        if self.family == "pyarrow":
            return arrow_numeric(col, self.where, c)
        return as_float(col, self.where, c)

    def text(self, c: str, start: int, stop: int) -> np.ndarray:
        """[stop - start] str (missing -> "")."""
        col = self._slice(c, start, stop)
        try:
            if self.family == "pandas":
                return _pandas_text(col)
            if self.family == "pyarrow":
                return arrow_text(col)
            return render_text(col)
        except DataError as exc:
            raise DataError(f"{self.where}: column '{c}' {exc}") from None

    def batch(self, numeric: list[str], text: list[str], start: int, stop: int, offset: int) -> Batch:
        values = np.empty((stop - start, len(numeric)), dtype=np.float64)
        for j, c in enumerate(numeric):
            values[:, j] = self.numeric(c, start, stop)
        return Batch(offset + start, values, {c: self.text(c, start, stop) for c in text})


def _pandas_numeric(s: Any, where: str, name: str) -> np.ndarray:
    import pandas as pd  # already loaded: `s` is a pandas object

    if pd.api.types.is_bool_dtype(s.dtype) or pd.api.types.is_numeric_dtype(s.dtype):
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    return as_float(s.to_numpy(dtype=object), where, name)


def _pandas_text(s: Any) -> np.ndarray:
    import pandas as pd

    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = render_text(s.cat.categories.to_numpy())
        return np.append(cats, "")[s.cat.codes.to_numpy()]  # code -1 (missing) -> ""
    if isinstance(s.dtype, np.dtype):
        return render_text(s.to_numpy())
    return render_text(s.to_numpy(dtype=object, na_value=None))


def arrow_numeric(col: Any, where: str, name: str) -> np.ndarray:
    """[n] float64 of an Arrow (chunked) array of numbers or bools; nulls -> NaN."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.dictionary_decode()
        t = col.type
    if pa.types.is_null(t):
        return np.full(len(col), np.nan)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        return np.asarray(pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False), dtype=np.float64)
    raise DataError(f"{where}: column '{name}' holds {t} values, not numbers")


def arrow_text(col: Any) -> np.ndarray:
    """[n] str of an Arrow (chunked) array; numbers rendered like `normalise_labels`; nulls -> ""."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    t = col.type
    if pa.types.is_null(t):
        return np.full(len(col), "", dtype="U1")
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t):
        return np.asarray(pc.fill_null(col, "").to_numpy(zero_copy_only=False)).astype(str)
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t):
        if col.null_count:
            return render_text(np.array(col.to_pylist(), dtype=object))  # Python ints stay exact
        return render_text(col.to_numpy(zero_copy_only=False))
    try:
        as_text = pc.cast(col, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"holds {t} values; give strings or numbers") from None
    return np.asarray(pc.fill_null(as_text, "").to_numpy(zero_copy_only=False)).astype(str)


class ArrayTable(Table):
    """Columns held in memory: a mapping {name: array} (a dict, a loaded npz), a pandas DataFrame or a
    pyarrow Table / RecordBatch; each batch converts only its slice of the requested columns."""

    def __init__(self, data: Mapping[str, Any] | Any, name: str = "<arrays>") -> None:
        self.name = name
        self._frame = _Frame(data, name)
        self.columns = tuple(self._frame.column_of)
        self.index_columns = tuple(self._frame.index_names)
        self.rows = self._frame.rows

    def _batches(self, numeric: list[str], text: list[str], batch_size: int,
                 keep: Keep | None) -> Iterator[Batch]:
        for start in range(0, self.rows, batch_size):
            yield self._frame.batch(numeric, text, start, min(start + batch_size, self.rows), 0)


class ReaderTable(Table):
    """A re-iterable (or factory) of batches: mappings of arrays, DataFrames or Arrow RecordBatches.
    Batch sizes are the reader's own."""

    def __init__(self, reader: Iterable[Any] | Callable[[], Iterator[Any]], name: str = "<reader>") -> None:
        self.name = name
        self._open = reader if callable(reader) and not hasattr(reader, "__iter__") else (lambda: iter(reader))
        it = self._open()
        if it is reader and not callable(reader):
            raise DataError(f"{name}: a one-shot iterator cannot be read twice; pass a list, an object with "
                            "__iter__ that starts over, or a function returning a new iterator")
        first = next(iter(it), None)
        if first is None:
            raise DataError(f"{name}: the reader yielded no batches")
        frame = _Frame(first, name)
        self.columns = tuple(frame.column_of)
        self.index_columns = tuple(frame.index_names)

    def _batches(self, numeric: list[str], text: list[str], batch_size: int,
                 keep: Keep | None) -> Iterator[Batch]:
        start = 0
        for obj in self._open():
            frame = _Frame(obj, self.name)
            yield frame.batch(numeric, text, 0, frame.rows, start)
            start += frame.rows
