"""The one interface every data source implements: `Table.batches` yields `Batch`es.

A table has a name (for messages) and ordered column names; a 2-D array `K` of width w counts as
the columns `K_0 ... K_{w-1}`. Numeric columns come back as one float64 matrix per batch; text
columns (group labels, string model inputs) as arrays of str, exactly as stored (numbers stored as
numbers are rendered the way `normalise_labels` renders them, so 1, 1.0 and "1" compare equal after it).

Missing values are NaN in a numeric column and an empty (or blank) string in a text column: every
source renders its own notion of missing (empty CSV field, NA/null text, NaN, None, pd.NA, Arrow
null) that way, and `Table.batches` either refuses the first one or drops the rows that hold one.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import DataError, OptionError

Keep = Callable[[int, int], np.ndarray]
Missing = Literal["error", "skip"]


@dataclass(frozen=True)
class Batch:
    """A block of rows.

    Attributes:
        start: global index of the first row of the block the batch came from (0-based).
        values: [n, len(numeric)] float64, the requested numeric columns in the requested order.
        text: {column: [n] str} for each requested text column, as stored ("" for a missing value).
        lines: [n] file line number of each row (CSV only; messages name lines, not rows).
        index: [n] global 0-based row index of each row when rows were selected or dropped.
        dropped: rows of this block (among those `keep` selected) dropped for missing values.
    """

    start: int
    values: np.ndarray
    text: dict[str, np.ndarray] = field(default_factory=dict)
    lines: np.ndarray | None = None
    index: np.ndarray | None = None
    dropped: int = 0

    def row_index(self) -> np.ndarray:
        """[n] int64: the global (0-based) index of each row of the batch."""
        if self.index is not None:
            return self.index
        return np.arange(self.start, self.start + self.values.shape[0], dtype=np.int64)

    def select(self, mask: np.ndarray, dropped: int = 0) -> "Batch":
        """The rows where `mask` ([n] bool) is True."""
        return Batch(self.start, self.values[mask], {k: v[mask] for k, v in self.text.items()},
                     None if self.lines is None else self.lines[mask], self.row_index()[mask],
                     self.dropped + dropped)


@runtime_checkable
class BatchReader(Protocol):
    """What `repair` accepts as a custom data source: something iterable more than once whose
    iterator yields mappings {column name: array [n] or [n, w]}. A zero-argument callable that
    returns such an iterator works too."""

    def __iter__(self) -> Iterator[Mapping[str, Any]]: ...


class Table:
    """Base of the data sources. Subclasses set `name` and `columns` and implement `_batches`."""

    name: str
    columns: tuple[str, ...]
    #: columns that are a stored row index (a named pandas index in a Parquet file): read when named
    #: (--group, --target, --features, NAME_j), never fed to a model input by position
    index_columns: tuple[str, ...] = ()

    def batches(self, numeric: Sequence[str], batch_size: int, *, text: Sequence[str] = (),
                keep: Keep | None = None, missing: Missing = "error") -> Iterator[Batch]:
        """Batches of at most about `batch_size` rows (readers keep their own sizes).

        numeric: columns parsed as float64 into `Batch.values` [n, len(numeric)], in this order.
        text: columns returned as strings in `Batch.text` (a column may be both numeric and text).
        keep(start, n) -> [n] bool, if given, selects the rows of each block [start, start + n)
            (a CSV then parses only those); `Batch.index` then holds the global indices.
        missing: "error" refuses the first missing value; "skip" drops rows with a missing value in
            any requested column and counts them in `Batch.dropped`. A non-finite number (inf) is
            an error either way.
        """
        numeric, text = [str(c) for c in numeric], [str(c) for c in text]
        if missing not in ("error", "skip"):
            raise OptionError(f"missing={missing!r} is invalid; use 'error' or 'skip'")
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise OptionError(f"batch_size={batch_size!r} is invalid; it must be a positive integer")
        absent = [c for c in numeric + text if c not in self.columns]
        if absent:
            raise DataError(f"{self.name}: no column '{absent[0]}' (columns: {', '.join(self.columns)})")
        for batch in self._batches(numeric, text, int(batch_size), keep):
            if keep is not None and batch.index is None:
                batch = batch.select(np.asarray(keep(batch.start, batch.values.shape[0]), dtype=bool))
            batch = _handle_missing(batch, numeric, text, missing, self.name)
            _check_finite(batch, numeric, self.name)
            yield batch

    def _batches(self, numeric: list[str], text: list[str], batch_size: int,
                 keep: Keep | None) -> Iterator[Batch]:
        """Blocks of consecutive rows, missing values as NaN / ""; may apply `keep` itself (then it sets
        `Batch.index`)."""
        raise NotImplementedError


def _place(batch: Batch, r: int) -> str:
    if batch.lines is not None:
        return f"line {int(batch.lines[r])}"
    return f"row {int(batch.row_index()[r]) + 1}"


def _blank(arr: np.ndarray) -> np.ndarray:
    """[n] bool: the strings that are empty or only whitespace."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "U":
        return (arr == "") | np.char.isspace(arr)  # isspace: non-empty and only whitespace
    return np.array([not str(s).strip() for s in arr], dtype=bool)


def _handle_missing(batch: Batch, numeric: list[str], text: list[str], missing: str, where: str) -> Batch:
    n = batch.values.shape[0]
    if n == 0:
        return batch
    nan = np.isnan(batch.values)
    bad_rows = nan.any(axis=1)
    text_blank = {c: _blank(batch.text[c]) for c in text}
    for mask in text_blank.values():
        bad_rows = bad_rows | mask
    if not bad_rows.any():
        return batch
    if missing == "skip":
        return batch.select(~bad_rows, dropped=int(bad_rows.sum()))
    r = int(np.flatnonzero(bad_rows)[0])
    cols = [numeric[j] for j in np.flatnonzero(nan[r])] + [c for c in text if text_blank[c][r]]
    raise DataError(f"{where}: {_place(batch, r)}, column '{cols[0]}' is empty or NaN (a missing value); fill it, "
                    "or pass --dropna (missing='skip') to drop rows with a missing value")


def _check_finite(batch: Batch, columns: Sequence[str], where: str) -> None:
    bad = ~np.isfinite(batch.values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"{where}: {_place(batch, int(r))}, column '{columns[int(c)]}' is {batch.values[r, c]}; "
                        "clean or drop that row (features and target must be finite numbers)")


# ---------------------------------------------------------------------------------------------
# text rendering and label normalisation


def normalise_labels(values: np.ndarray) -> np.ndarray:
    """[n] str: group labels; numbers print the same whatever their storage (1, 1.0, "1" -> "1").

    Integers are rendered exactly (no detour through float64, so ids above 2**53 stay apart)."""
    arr = np.asarray(values)
    if arr.dtype.kind == "O":
        if not all(isinstance(x, str) for x in arr):
            raise DataError("group labels are Python objects; pass strings or numbers")
        arr = arr.astype(str)
    if arr.dtype.kind in "US":
        arr = arr.astype(str)
        uniq, inverse = np.unique(arr, return_inverse=True)
        return np.array([_label_text(u) for u in uniq] + [""], dtype=str)[inverse.reshape(-1)]
    if arr.dtype.kind in "biuf":
        return render_text(arr)
    raise DataError(f"group labels of dtype {arr.dtype} are not supported; pass strings or numbers")


def _number_text(value: Any) -> str:
    """A number as text: integers without a decimal point ("1"), others by repr ("0.5")."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    v = float(value)
    if np.isfinite(v) and v == int(v):
        return str(int(v))
    return repr(v)


def _label_text(text: str) -> str:
    """A label as stored in text: stripped, and numbers in their canonical form ("1.0" -> "1")."""
    s = text.strip()
    try:
        return str(int(s))  # exact for integer literals of any size
    except ValueError:
        pass
    try:
        return _number_text(float(s))
    except ValueError:
        return s


def _is_na_object(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, (float, np.floating)):
        return bool(np.isnan(v))
    return type(v).__name__ in ("NAType", "NaTType")  # pandas' NA / NaT, without importing pandas


def _object_text(v: Any) -> str:
    if _is_na_object(v):
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, float, np.integer, np.floating)):
        return _number_text(v)
    raise DataError(f"holds a Python object of type {type(v).__name__} ({v!r:.40}); give strings or numbers")


def render_text(arr: Any) -> np.ndarray:
    """[n] str: a column as text; numbers as `_number_text` renders them, missing values as ""."""
    arr = np.asarray(arr)
    kind = arr.dtype.kind
    if kind == "U":
        return arr
    if kind == "S":
        try:
            return arr.astype(str)
        except UnicodeDecodeError:
            return np.array([b.decode("utf-8", errors="replace") for b in arr], dtype=str)
    if kind == "b":
        return np.where(arr, "True", "False")
    if kind in "iuf":
        uniq, inverse = np.unique(arr, return_inverse=True)
        names = ["" if (kind == "f" and np.isnan(u)) else _number_text(u) for u in uniq]
        return np.array(names + [""], dtype=str)[inverse.reshape(-1)]
    if kind in "mM":
        return np.where(np.isnat(arr), "", arr.astype(str))
    if kind == "O":
        cache: dict[Any, str] = {}  # keyed by (type, value): True, 1 and 1.0 hash alike
        out = []
        for v in arr:
            key = (type(v), v)
            try:
                out.append(cache[key])
            except (KeyError, TypeError):
                s = _object_text(v)
                try:
                    cache[key] = s
                except TypeError:
                    pass
                out.append(s)
        return np.array(out + [""], dtype=str)[:-1]
    raise DataError(f"holds values of dtype {arr.dtype}; give strings or numbers")


def as_float(arr: Any, where: str, column: str) -> np.ndarray:
    """[n] float64: a numeric column (bool -> 0/1, missing -> NaN); text or objects are refused."""
    arr = np.asarray(arr)
    kind = arr.dtype.kind
    if kind in "biuf":
        return arr.astype(np.float64, copy=False)
    if kind == "O":
        out = np.empty(len(arr), dtype=np.float64)
        for i, v in enumerate(arr):
            if _is_na_object(v):
                out[i] = np.nan
            elif isinstance(v, (int, float, np.integer, np.floating, np.bool_)):
                out[i] = float(v)
            else:
                raise DataError(f"{where}: column '{column}' holds {v!r:.40}, not a number; give numeric columns "
                                "(convert it, e.g. df[col].astype(float))")
        return out
    raise DataError(f"{where}: column '{column}' holds {arr.dtype} values, not numbers")


# ---------------------------------------------------------------------------------------------
# dispatch

_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")
_TEXT_SUFFIXES = (".csv", ".txt", ".tsv", ".tab", "")


def open_table(data: Any) -> Table:
    """Turn data into a `Table`.

    data: a path (.csv/.tsv/.txt, optionally .gz/.bz2/.xz; .npz; .parquet/.pq), a directory or glob pattern of
    such files (read as one table, see `multi`), a mapping of arrays,
    a pandas DataFrame, a pyarrow Table or RecordBatch, or a re-iterable reader (or factory) of batches.
    """
    from .frames import ArrayTable, ReaderTable

    if isinstance(data, Table):
        return data
    if isinstance(data, (str, os.PathLike)):
        from .multi import is_many, open_many  # a directory or glob pattern: many files as one table

        return open_many(data) if is_many(data) else _open_path(Path(data))
    family, kind = type(data).__module__.split(".")[0], type(data).__name__
    if family == "pandas":
        if kind == "DataFrame":
            return ArrayTable(data, "<DataFrame>")
        raise DataError(f"cannot read a pandas {kind}; pass a DataFrame with one column per feature")
    if family == "pyarrow":
        if kind in ("Table", "RecordBatch"):
            return ArrayTable(data, f"<pyarrow.{kind}>")
        if kind == "RecordBatchReader":
            raise DataError("a pyarrow RecordBatchReader can be read only once and the data is read 2-3 times; "
                            "pass a pyarrow Table, or a function that returns a new reader")
    if hasattr(data, "keys") and hasattr(data, "__getitem__"):
        return ArrayTable(data)
    if callable(data) or isinstance(data, Iterable):
        return ReaderTable(data)
    raise DataError(f"cannot read data of type {type(data).__name__}; give a .csv/.npz/.parquet path, a mapping of "
                    "arrays, a DataFrame or a re-iterable reader of batch mappings")


def _open_path(path: Path) -> Table:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the --data path") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); check the path and permissions") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a directory; give a .csv or .npz file")
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: is not a regular file (a pipe, socket or device); save the data to a file and "
                        "pass that")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: cannot be read (permission denied)")
    suffixes = [s.lower() for s in path.suffixes]
    last = suffixes[-1] if suffixes else ""
    if last == ".npz":
        from .npz import NpzTable

        return NpzTable(path)
    if last in (".parquet", ".pq"):
        from .parquet import ParquetTable

        return ParquetTable(path)
    inner = (suffixes[-2] if len(suffixes) > 1 else "") if last in _COMPRESSION_SUFFIXES else last
    if inner in _TEXT_SUFFIXES:
        from .csv import CsvTable

        return CsvTable(path)
    shown = "".join(path.suffixes[-2:]) if last in _COMPRESSION_SUFFIXES else path.suffix
    raise DataError(f"{path}: unknown data format '{shown}'; give a .csv/.tsv (optionally .gz/.bz2/.xz), .npz or "
                    ".parquet file")
