"""Parquet files (`.parquet`, `.pq`), read batch by batch with pyarrow (an optional dependency).

Only the requested columns are read, one record batch of at most `batch_size` rows at a time, so
memory stays flat in the number of rows. Dictionary-encoded and string columns work as text. pandas
stores a DataFrame's index too: an unnamed one (`__index_level_0__`, written after filtering rows) is not a
data column; a named one (`df.set_index("race1")`) is read when a column of that name is asked for
(--group, --target, --features), but never fed to a model by position.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import DataError
from .base import Batch, Keep, Table
from .frames import arrow_numeric, arrow_text


def _parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow; install it with: pip install 'onnx-esvd[parquet]'") from None
    return pq


class ParquetTable(Table):
    """A Parquet file; columns in schema order (top-level fields, without pandas' unnamed index columns)."""

    def __init__(self, path: Path) -> None:
        pq = _parquet()
        self.path = Path(path)
        self.name = str(path)
        try:
            pf = pq.ParquetFile(self.path)
            schema = pf.schema_arrow
            self.rows = pf.metadata.num_rows
            pf.close()
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses for unreadable files
            raise DataError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
        unnamed, named = set(), []
        meta = schema.pandas_metadata or {}
        for col in meta.get("index_columns", []):
            if isinstance(col, str):  # a RangeIndex is stored as a dict of start/stop/step, not as a column
                (unnamed.add(col) if re.fullmatch(r"__index_level_\d+__", col) else named.append(col))
        names = [n for n in schema.names if n not in unnamed]
        self.index_columns = tuple(c for c in named if c in names)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"{path}: column '{dupes[0]}' appears twice; make column names unique")
        self.columns = tuple(names)

    def _batches(self, numeric: list[str], text: list[str], batch_size: int,
                 keep: Keep | None) -> Iterator[Batch]:
        pq = _parquet()
        wanted = list(dict.fromkeys(numeric + text))
        start = 0
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as exc:
            raise DataError(f"{self.path}: not a readable Parquet file ({_first_line(exc)})") from None
        try:
            raw = pf.iter_batches(batch_size=batch_size, columns=wanted)

            def record_batches() -> Iterator[Any]:
                while True:
                    try:
                        rb = next(raw, None)
                    except Exception as exc:
                        raise DataError(f"{self.path}: cannot read rows from {start + 1} on ({_first_line(exc)}); "
                                        "the file is truncated or corrupt") from None
                    if rb is None:
                        return
                    yield rb

            # Row groups cut record batches short; regroup them into blocks of exactly `batch_size` rows so that
            # every source feeds the same blocks of rows (the float64 reductions then agree bit for bit).
            for rb in _rechunk(record_batches(), batch_size):
                n = rb.num_rows
                values = np.empty((n, len(numeric)), dtype=np.float64)
                for j, c in enumerate(numeric):
                    values[:, j] = arrow_numeric(rb.column(c), self.name, c)
                yield Batch(start, values, {c: self._text(rb, c) for c in text})
                start += n
        finally:
            pf.close()


    def _text(self, rb: Any, c: str) -> np.ndarray:
        try:
            return arrow_text(rb.column(c))
        except DataError as exc:
            raise DataError(f"{self.path}: column '{c}' {exc}") from None


def _rechunk(batches: Iterator[Any], size: int) -> Iterator[Any]:
    """Arrow record batches regrouped into tables of exactly `size` rows (the last may be shorter)."""
    import pyarrow as pa

    pending: list[Any] = []
    count = 0
    for rb in batches:
        pending.append(rb)
        count += rb.num_rows
        while count >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size).combine_chunks()
            rest = table.slice(size)
            pending = rest.to_batches() if rest.num_rows else []
            count = rest.num_rows
    if count:
        yield pa.Table.from_batches(pending).combine_chunks()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
