"""Calibration data as column tables read in batches: CSV (streamed), NPZ (streamed), arrays, readers.

Every source exposes ordered column names and yields `Batch`es holding the requested numeric
columns as one float64 matrix plus the group labels. A 2-D array named `K` of width w counts as the
columns `K_0 ... K_{w-1}`.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import DataError


@dataclass(frozen=True)
class Batch:
    """A block of consecutive rows.

    Attributes:
        start: index of the first row in the whole data (0-based).
        values: [n, k] float64, the requested numeric columns in the requested order.
        labels: [n] str, the group label of each row (None when no label column was asked for).
        lines: [n] file line number of each row (CSV only; messages name lines, not rows).
        index: [n] global row index of each row when only some rows were read (see `keep`).
    """

    start: int
    values: np.ndarray
    labels: np.ndarray | None
    lines: np.ndarray | None = None  # [n] file line numbers (CSV), used in messages
    index: np.ndarray | None = None  # [n] global row indices when rows were selected; None: start + arange(n)

    def row_index(self) -> np.ndarray:
        """Global (0-based) index of each row of the batch."""
        if self.index is not None:
            return self.index
        return np.arange(self.start, self.start + self.values.shape[0], dtype=np.int64)

    def select(self, mask: np.ndarray) -> "Batch":
        """The rows where `mask` is True."""
        return Batch(self.start, self.values[mask], None if self.labels is None else self.labels[mask],
                     None if self.lines is None else self.lines[mask], self.row_index()[mask])


@runtime_checkable
class BatchReader(Protocol):
    """What `repair` accepts as a custom data source: something iterable more than once whose
    iterator yields mappings {column name: array [n] or [n, w]}. A zero-argument callable that
    returns such an iterator works too."""

    def __iter__(self) -> Iterator[Mapping[str, Any]]: ...


def normalise_labels(values: np.ndarray) -> np.ndarray:
    """Group labels as strings; numbers print the same whatever their storage (1, 1.0, "1" -> "1")."""
    arr = np.asarray(values)
    if arr.dtype.kind in "US":
        arr = arr.astype(str)
        uniq, inverse = np.unique(arr, return_inverse=True)
        return np.array([_label_text(u) for u in uniq], dtype=object)[inverse].astype(str)
    if arr.dtype.kind in "biuf":
        uniq, inverse = np.unique(arr, return_inverse=True)
        return np.array([_number_text(u) for u in uniq], dtype=object)[inverse].astype(str)
    if arr.dtype.kind == "O":
        raise DataError("group labels are Python objects; pass strings or numbers")
    raise DataError(f"group labels of dtype {arr.dtype} are not supported; pass strings or numbers")


def _number_text(value: Any) -> str:
    v = float(value)
    if np.isfinite(v) and v == int(v):
        return str(int(v))
    return repr(v)


def _label_text(text: str) -> str:
    s = text.strip()
    try:
        return _number_text(float(s))
    except ValueError:
        return s


def _expand(name: str, arr: np.ndarray) -> list[str]:
    if arr.ndim == 1:
        return [name]
    return [f"{name}_{j}" for j in range(arr.shape[1])]


def _check_finite(batch: Batch, columns: Sequence[str], where: str) -> None:
    bad = ~np.isfinite(batch.values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        place = f"line {batch.lines[r]}" if batch.lines is not None else f"row {batch.start + int(r) + 1}"
        raise DataError(f"{where}: {place}, column '{columns[int(c)]}' is {batch.values[r, c]}; clean or drop "
                        "that row (features and target must be finite numbers)")


class Table:
    """Base of the data sources. Subclasses set `name` and `columns` and implement `_batches`."""

    name: str
    columns: tuple[str, ...]

    def batches(self, numeric: Sequence[str], label: str | None, batch_size: int,
                keep: Callable[[int, int], np.ndarray] | None = None) -> Iterator[Batch]:
        """Batches of about `batch_size` rows. `keep(start, n)` -> bool [n], if given, selects the rows of
        each block of rows [start, start + n) to return (a CSV then parses only those)."""
        missing = [c for c in list(numeric) + ([label] if label else []) if c not in self.columns]
        if missing:
            raise DataError(f"{self.name}: no column '{missing[0]}' (columns: {', '.join(self.columns)})")
        for batch in self._batches(list(numeric), label, batch_size, keep):
            if keep is not None and batch.index is None:
                batch = batch.select(keep(batch.start, batch.values.shape[0]))
            _check_finite(batch, numeric, self.name)
            yield batch

    def _batches(self, numeric: list[str], label: str | None, batch_size: int,
                 keep: Callable[[int, int], np.ndarray] | None) -> Iterator[Batch]:
        """Blocks of consecutive rows; may apply `keep` itself (then it sets `Batch.index`)."""
        raise NotImplementedError


class CsvTable(Table):
    """A CSV file with a header line, streamed in chunks of lines (never loaded whole)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        try:
            with open(path, newline="", encoding="utf-8") as f:
                first = f.readline()
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a UTF-8 text file; give a CSV with a header line or an .npz") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from None
        if not first.strip():
            raise DataError(f"{path}: the file is empty; give a CSV with a header line and data rows")
        header = [h.strip() for h in next(csv.reader([first]))]
        if all(_is_number(h) for h in header):
            raise DataError(f"{path}: the first line holds numbers, not column names; add a header line")
        if any(not h for h in header):
            raise DataError(f"{path}: column {header.index('') + 1} of the header has no name; name every column")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DataError(f"{path}: column '{dupes[0]}' appears twice in the header; make column names unique")
        self.columns = tuple(header)

    def _batches(self, numeric: list[str], label: str | None, batch_size: int,
                 keep: Callable[[int, int], np.ndarray] | None) -> Iterator[Batch]:
        idx = [self.columns.index(c) for c in numeric]
        lidx = self.columns.index(label) if label else None
        start = 0  # index of the next data row (blank lines are not rows)
        next_line = 2  # the header is line 1
        with open(self.path, newline="", encoding="utf-8") as f:
            f.readline()
            while True:
                chunk = list(itertools.islice(f, batch_size))
                if not chunk:
                    return
                if min(map(len, chunk)) > 2:  # no line can be blank: skip the per-line check
                    kept = list(range(len(chunk)))
                else:
                    kept = [i for i, line in enumerate(chunk) if line.strip()]
                line_numbers = np.asarray(kept, dtype=np.int64) + next_line
                next_line += len(chunk)
                n_rows = len(kept)
                index = None
                if keep is not None and n_rows:  # parse only the rows asked for
                    wanted = np.flatnonzero(keep(start, n_rows))
                    index = wanted + start
                    kept = [kept[i] for i in wanted]
                    line_numbers = line_numbers[wanted]
                if kept:
                    lines = chunk if len(kept) == len(chunk) else [chunk[i] for i in kept]
                    values = self._parse(lines, idx, np.float64, numeric, line_numbers)
                    labels = None
                    if lidx is not None:
                        labels = normalise_labels(self._parse(lines, [lidx], str, [label], line_numbers).reshape(-1))
                    yield Batch(start, values.reshape(len(lines), len(idx)), labels, line_numbers, index)
                elif keep is not None and n_rows:
                    yield Batch(start, np.zeros((0, len(idx))), None, line_numbers, index)
                start += n_rows

    def _parse(self, lines: list[str], idx: list[int], dtype: Any, names: list[str],
               line_numbers: np.ndarray) -> np.ndarray:
        if not idx:
            return np.zeros((len(lines), 0))
        try:
            return np.loadtxt(lines, delimiter=",", usecols=idx, dtype=dtype, quotechar='"', ndmin=2,
                              comments=None)
        except ValueError as exc:
            msg = str(exc)
            # numpy counts rows from 0 in conversion errors and from 1 in column-count errors.
            m = re.search(r"could not convert string '(.*)' to \w+ at row (\d+), column (\d+)", msg)
            if m:
                col = self.columns[int(m.group(3)) - 1]
                line = line_numbers[int(m.group(2))]
                value = m.group(1)
                what = "is empty" if value == "" else f"holds '{value}', not a number"
                raise DataError(f"{self.path}: line {line}, column '{col}' {what}; clean or drop that row") from None
            m = re.search(r"at row (\d+)", msg)
            line = line_numbers[int(m.group(1)) - 1] if m else "?"
            raise DataError(f"{self.path}: line {line} has too few fields for the columns "
                            f"{', '.join(names)}; fix that row") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class _NpyStream:
    """Rows of one array stored in an .npz member, read in chunks without loading the array."""

    def __init__(self, zf: zipfile.ZipFile, member: str, where: str) -> None:
        self.where = where
        self.file = zf.open(member)
        fmt = np.lib.format
        version = fmt.read_magic(self.file)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = reader(self.file)
        if dtype.hasobject:
            self.file.close()
            raise DataError(f"{where}: array holds Python objects, which are never unpickled; save it as numbers "
                            "or fixed-width strings")
        self.shape, self.dtype, self.fortran = shape, dtype, fortran
        self.row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        self._whole: np.ndarray | None = None
        if fortran and len(shape) > 1:  # column-major rows are not contiguous: read it once
            raw = self.file.read()
            self._whole = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F")
        self._pos = 0

    def read(self, n: int) -> np.ndarray:
        if self._whole is not None:
            out = self._whole[self._pos:self._pos + n]
        else:
            count = n * self.row_items
            raw = self.file.read(count * self.dtype.itemsize)
            out = np.frombuffer(raw, dtype=self.dtype)
            out = out.reshape((-1,) + tuple(self.shape[1:]))
        self._pos += out.shape[0]
        return out

    def close(self) -> None:
        self.file.close()


class NpzTable(Table):
    """A NumPy .npz archive: 1-D arrays are columns, a 2-D array `K` is columns K_0...; streamed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if m.endswith(".npy")]
                self._arrays: dict[str, tuple[str, tuple[int, ...]]] = {}
                for member in members:
                    key = member[:-4]
                    s = _NpyStream(zf, member, f"{path}: array '{key}'")
                    s.close()
                    if len(s.shape) not in (1, 2):
                        raise DataError(f"{path}: array '{key}' has {len(s.shape)} dimensions; store 1-D columns "
                                        "or 2-D [rows, width] blocks")
                    self._arrays[key] = (member, s.shape)
        except DataError:
            raise
        except zipfile.BadZipFile:
            raise DataError(f"{path}: not a valid .npz archive; save it with numpy.savez") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check the path and permissions") from None
        except ValueError as exc:
            raise DataError(f"{path}: not a valid .npz archive ({exc})") from None
        if not self._arrays:
            raise DataError(f"{path}: the archive holds no arrays")
        lengths = {shape[0] for _, shape in self._arrays.values()}
        if len(lengths) > 1:
            detail = ", ".join(f"'{k}' {shape[0]}" for k, (_, shape) in self._arrays.items())
            raise DataError(f"{path}: arrays have different numbers of rows ({detail}); they must all match")
        self.rows = lengths.pop()
        self._column_of: dict[str, tuple[str, int | None]] = {}
        for key, (_, shape) in self._arrays.items():
            if len(shape) == 1:
                self._column_of[key] = (key, None)
            else:
                for j in range(shape[1]):
                    self._column_of[f"{key}_{j}"] = (key, j)
        self.columns = tuple(self._column_of)

    def _batches(self, numeric: list[str], label: str | None, batch_size: int,
                 keep: Callable[[int, int], np.ndarray] | None) -> Iterator[Batch]:
        keys = sorted({self._column_of[c][0] for c in numeric + ([label] if label else [])})
        with zipfile.ZipFile(self.path) as zf:
            streams = {k: _NpyStream(zf, self._arrays[k][0], f"{self.path}: array '{k}'") for k in keys}
            for c in numeric:
                key = self._column_of[c][0]
                if streams[key].dtype.kind not in "biuf":
                    raise DataError(f"{self.path}: column '{c}' holds {streams[key].dtype} values, not numbers")
            try:
                start = 0
                while start < self.rows:
                    n = min(batch_size, self.rows - start)
                    block = {k: s.read(n) for k, s in streams.items()}
                    values = np.empty((n, len(numeric)), dtype=np.float64)
                    for j, c in enumerate(numeric):
                        key, col = self._column_of[c]
                        values[:, j] = block[key] if col is None else block[key][:, col]
                    labels = None
                    if label:
                        key, col = self._column_of[label]
                        labels = normalise_labels(block[key] if col is None else block[key][:, col])
                    yield Batch(start, values, labels)
                    start += n
            finally:
                for s in streams.values():
                    s.close()


def _columns_of(mapping: Mapping[str, Any], where: str) -> dict[str, tuple[str, int | None]]:
    out: dict[str, tuple[str, int | None]] = {}
    for key in mapping.keys():
        arr = np.asarray(mapping[key])
        if arr.ndim == 1:
            out[str(key)] = (key, None)
        elif arr.ndim == 2:
            for j in range(arr.shape[1]):
                out[f"{key}_{j}"] = (key, j)
        else:
            raise DataError(f"{where}: array '{key}' has {arr.ndim} dimensions; give 1-D columns or 2-D blocks")
    return out


def _batch_from_mapping(mapping: Mapping[str, Any], column_of: dict, numeric: list[str], label: str | None,
                        start: int, where: str) -> Batch:
    cache: dict[str, np.ndarray] = {}

    def column(c: str) -> np.ndarray:
        key, j = column_of.get(c, (c, None))
        if key not in mapping:
            raise DataError(f"{where}: a batch has no column '{c}'; every batch must hold the same columns")
        if key not in cache:
            cache[key] = np.asarray(mapping[key])
        arr = cache[key]
        return arr if j is None else arr[:, j]

    cols = [column(c) for c in numeric]
    n = len(cols[0]) if cols else (len(column(label)) if label else 0)
    for c, arr in zip(numeric, cols):
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{where}: column '{c}' holds {arr.dtype} values, not numbers")
        if len(arr) != n:
            raise DataError(f"{where}: column '{c}' has {len(arr)} rows, others {n}; columns must have equal length")
    values = np.stack(cols, axis=1).astype(np.float64) if cols else np.zeros((n, 0))
    labels = normalise_labels(column(label)) if label else None
    if labels is not None and len(labels) != n:
        raise DataError(f"{where}: column '{label}' has {len(labels)} rows, others {n}")
    return Batch(start, values, labels)


class ArrayTable(Table):
    """Columns held in memory: a mapping {name: array} (a dict, a loaded npz, a DataFrame)."""

    def __init__(self, mapping: Mapping[str, Any], name: str = "<arrays>") -> None:
        self.name = name
        self._mapping = mapping
        self._column_of = _columns_of(mapping, name)
        self.columns = tuple(self._column_of)
        lengths = {len(np.asarray(mapping[k])) for k in mapping.keys()}
        if len(lengths) > 1:
            raise DataError(f"{name}: arrays have different numbers of rows ({sorted(lengths)}); they must match")
        self.rows = lengths.pop() if lengths else 0

    def _batches(self, numeric: list[str], label: str | None, batch_size: int,
                 keep: Callable[[int, int], np.ndarray] | None) -> Iterator[Batch]:
        for start in range(0, self.rows, batch_size):
            sl = {k: np.asarray(self._mapping[k])[start:start + batch_size] for k in self._mapping.keys()}
            yield _batch_from_mapping(sl, self._column_of, numeric, label, start, self.name)


class ReaderTable(Table):
    """A re-iterable (or factory) of batch mappings; batch sizes are the reader's own."""

    def __init__(self, reader: Iterable[Mapping[str, Any]] | Callable[[], Iterator[Mapping[str, Any]]],
                 name: str = "<reader>") -> None:
        self.name = name
        self._open = reader if callable(reader) and not hasattr(reader, "__iter__") else (lambda: iter(reader))
        it = self._open()
        if it is reader and not callable(reader):
            raise DataError(f"{name}: a one-shot iterator cannot be read twice; pass a list, an object with "
                            "__iter__ that starts over, or a function returning a new iterator")
        first = next(iter(it), None)
        if first is None:
            raise DataError(f"{name}: the reader yielded no batches")
        self._column_of = _columns_of(first, name)
        self.columns = tuple(self._column_of)

    def _batches(self, numeric: list[str], label: str | None, batch_size: int,
                 keep: Callable[[int, int], np.ndarray] | None) -> Iterator[Batch]:
        start = 0
        for mapping in self._open():
            batch = _batch_from_mapping(mapping, self._column_of, numeric, label, start, self.name)
            yield batch
            start += batch.values.shape[0]


def open_table(data: Any) -> Table:
    """Turn a path (.csv, .npz), a mapping of arrays, or a batch reader into a `Table`."""
    if isinstance(data, Table):
        return data
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise DataError(f"{path}: no such file; check the --data path")
        if path.is_dir():
            raise DataError(f"{path}: is a directory; give a .csv or .npz file")
        if not os.access(path, os.R_OK):
            raise DataError(f"{path}: cannot be read (permission denied)")
        if path.suffix.lower() == ".npz":
            return NpzTable(path)
        if path.suffix.lower() in (".csv", ".txt", ""):
            return CsvTable(path)
        raise DataError(f"{path}: unknown data format '{path.suffix}'; give a .csv (with header) or .npz file")
    if hasattr(data, "keys") and hasattr(data, "__getitem__"):
        return ArrayTable(data)
    if callable(data) or isinstance(data, Iterable):
        return ReaderTable(data)
    raise DataError(f"cannot read data of type {type(data).__name__}; give a .csv/.npz path, a mapping of arrays "
                    "or a re-iterable reader of batch mappings")
