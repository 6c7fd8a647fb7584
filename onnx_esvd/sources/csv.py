"""Delimited text files with a header line, streamed in chunks of lines (never loaded whole).

Accepted: `.csv`, `.txt` and suffix-less files (delimiter sniffed among `,` `;` tab `|` from the
header and the next lines), `.tsv`/`.tab` (tab), each optionally compressed (`.gz`, `.bz2`, `.xz`;
the magic bytes decide, so a gzip file named `.csv` reads too). A UTF-8 byte-order mark (Excel's
"CSV UTF-8") and CRLF line endings are fine, and so is the `sep=;` line Excel may put before the header
(it names the delimiter). Quoted fields may hold the delimiter, quotes ("") and newlines (a record then
spans lines; messages name its first line).

Numbers parse with a decimal point only. A decimal comma ("1,5", common with `;` files) is refused
with a message saying to export with a decimal point: "1,500" may mean 1.5 or 1500 depending on the
locale that wrote the file, and a silently wrong number is worse than an error.

Missing values in a numeric column: an empty field or NA, N/A, #N/A, NaN, nan, null, None (any case).
In a text column: an empty (or blank) field.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import itertools
import lzma
import re
import zlib
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from ..errors import DataError
from .base import Batch, Keep, Table

DELIMITERS = (",", ";", "\t", "|")
MISSING_TOKENS = np.array(["", "na", "n/a", "#n/a", "nan", "null", "none"])
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))
HEADER_LIMIT = 1 << 24  # a "header line" longer than this is not a header line
SNIFF_LINES = 50
MAX_RECORD_LINES = 100_000  # one quoted field spanning more lines than this is a broken quote
_STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
_SEP_LINE = re.compile(r'"?sep=([,;\t|])"?[,;\t|]*\r?\n?')  # Excel's delimiter hint before the header
_DECIMAL_COMMA = re.compile(r"\s*[+-]?\d*,\d+([eE][+-]?\d+)?\s*")


class CsvTable(Table):
    """A delimited text file with a header line; see the module docstring for what is accepted.

    path: the file. delimiter: None sniffs it (tab for .tsv/.tab).
    """

    def __init__(self, path: Path, delimiter: str | None = None) -> None:
        self.path = Path(path)
        self.name = str(path)
        suffixes = [s.lower() for s in self.path.suffixes]
        by_suffix = COMPRESSED.get(suffixes[-1]) if suffixes else None
        inner = suffixes[-2] if by_suffix and len(suffixes) > 1 else (suffixes[-1] if suffixes and not by_suffix else "")
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check the path and permissions") from None
        by_magic = next((kind for magic, kind in MAGIC if head.startswith(magic)), None)
        if by_suffix and by_magic != by_suffix:
            raise DataError(f"{path}: the name says {by_suffix}-compressed but the content is not; rename the file "
                            "or compress it")
        self.compression = by_magic
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(f"{path}: the file is UTF-16 text; re-save it as UTF-8 (e.g. 'CSV UTF-8' in Excel)")
        if delimiter is None and inner in (".tsv", ".tab"):
            delimiter = "\t"
        sample = self._sample()
        if not sample or not sample[0].strip():
            raise DataError(f"{path}: the file is empty; give a CSV with a header line and data rows")
        self.header_line = 1  # the header's line number
        hint = _SEP_LINE.fullmatch(sample[0])
        if hint is not None:  # Excel's `sep=;`: the delimiter, then the header on line 2
            delimiter = delimiter or hint.group(1)
            sample = sample[1:]
            self.header_line = 2
            if not sample or not sample[0].strip():
                raise DataError(f"{path}: no header line after Excel's '{hint.group(0).strip()}' line; give a CSV "
                                "with a header line and data rows")
        self.delimiter = delimiter or _sniff(sample)
        first = sample[0]
        try:
            header = [h.strip() for h in next(csv.reader([first], delimiter=self.delimiter, strict=True))]
        except csv.Error as exc:
            if "field larger" in str(exc):
                raise DataError(f"{path}: line 1 holds a field longer than {csv.field_size_limit()} characters; "
                                "this is not a header line") from None
            raise DataError(f"{path}: line 1 (the header) is malformed ({exc}); give one column name per field") \
                from None
        if all(_is_number(h) for h in header):
            raise DataError(f"{path}: the first line holds numbers, not column names; add a header line")
        if any(not h for h in header):
            where = header.index("")
            hint = (" (pandas' to_csv writes the row index there: save with index=False)" if where == 0 else "")
            raise DataError(f"{path}: column {where + 1} of the header has no name{hint}; name every column")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DataError(f"{path}: column '{dupes[0]}' appears twice in the header; make column names unique")
        self.columns = tuple(header)

    # -- reading -------------------------------------------------------------------------------

    def _binary(self) -> IO[bytes]:
        if self.compression == "gzip":
            return gzip.open(self.path, "rb")
        if self.compression == "bz2":
            return bz2.open(self.path, "rb")
        if self.compression == "xz":
            return lzma.open(self.path, "rb")
        return open(self.path, "rb")

    def _text(self) -> IO[str]:
        if self.compression is None:
            return open(self.path, newline="", encoding="utf-8-sig")
        return io.TextIOWrapper(self._binary(), encoding="utf-8-sig", newline="")

    def _stream_error(self, exc: BaseException) -> DataError:
        if isinstance(exc, UnicodeDecodeError):
            return DataError(f"{self.path}: line {self._bad_utf8_line()} is not valid UTF-8 text; re-save the file "
                             "as UTF-8 (e.g. 'CSV UTF-8' in Excel)")
        if self.compression:
            return DataError(f"{self.path}: cannot decompress ({exc}); the {self.compression} file is truncated or "
                             "corrupt")
        return DataError(f"{self.path}: cannot read ({getattr(exc, 'strerror', None) or exc})")

    def _bad_utf8_line(self) -> int | str:
        try:
            with self._binary() as f:
                for number, line in enumerate(f, 1):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError:
                        return number
        except _STREAM_ERRORS:
            pass
        return "?"

    def _sample(self) -> list[str]:
        try:
            with self._text() as f:
                first = f.readline(HEADER_LIMIT)
                if len(first) == HEADER_LIMIT and not first.endswith("\n"):
                    raise DataError(f"{self.path}: line 1 is longer than {HEADER_LIMIT} characters; give a CSV with "
                                    "a header line")
                return [first] + [line for line in itertools.islice(f, SNIFF_LINES)]
        except (UnicodeDecodeError, *_STREAM_ERRORS) as exc:
            raise self._stream_error(exc) from None

    def _batches(self, numeric: list[str], text: list[str], batch_size: int,
                 keep: Keep | None) -> Iterator[Batch]:
        idx = [self.columns.index(c) for c in numeric]
        tidx = [self.columns.index(c) for c in text]
        start = 0  # index of the next data row (blank lines are not rows)
        next_line = self.header_line + 1
        try:
            f = self._text()
            for _ in range(self.header_line):
                f.readline(HEADER_LIMIT)
        except (UnicodeDecodeError, *_STREAM_ERRORS) as exc:
            raise self._stream_error(exc) from None
        with f:
            while True:
                try:
                    chunk = list(itertools.islice(f, batch_size))
                    records, line_numbers, consumed = self._records(chunk, f, next_line)
                except (UnicodeDecodeError, *_STREAM_ERRORS) as exc:
                    raise self._stream_error(exc) from None
                if not records:
                    return
                next_line += consumed
                if min(map(len, records)) <= 2:  # only then can a record be blank
                    nonblank = [i for i, line in enumerate(records) if line.strip()]
                    if len(nonblank) < len(records):
                        records = [records[i] for i in nonblank]
                        line_numbers = line_numbers[nonblank]
                self._check_field_counts(records, line_numbers)
                n_rows = len(records)
                index = None
                if keep is not None and n_rows:  # parse only the rows asked for
                    wanted = np.flatnonzero(keep(start, n_rows))
                    index = wanted + start
                    if len(wanted) < n_rows:
                        records = [records[i] for i in wanted]
                        line_numbers = line_numbers[wanted]
                if records or (keep is not None and n_rows):
                    values = self._numeric(records, idx, line_numbers)
                    texts = self._strings(records, tidx, line_numbers)
                    yield Batch(start, values, {c: texts[:, j] for j, c in enumerate(text)}, line_numbers, index)
                start += n_rows

    def _check_field_counts(self, records: list[str], line_numbers: np.ndarray) -> None:
        """Refuse a record with more or fewer fields than the header (e.g. an unquoted decimal comma
        "1,5" in a comma file shifts every later field: a silently wrong row). Chunks holding quotes
        are left to the parser (a quoted field may hold the delimiter)."""
        d, want = self.delimiter, len(self.columns) - 1
        joined = "".join(records)
        if '"' in joined or joined.count(d) == want * len(records):
            return
        for record, line in zip(records, line_numbers):
            got = record.count(d)
            if got != want:
                raise DataError(f"{self.path}: line {line} has {got + 1} fields but the header has {want + 1}; "
                                "quote values that hold the delimiter (or a decimal comma: export with a decimal "
                                "point) and fix that row")

    def _records(self, chunk: list[str], f: IO[str], first_line: int) -> tuple[list[str], np.ndarray, int]:
        """The chunk's lines joined into records (a quoted field may hold newlines): records, [n] first
        line number of each, and the number of lines consumed (more than len(chunk) when a record
        continued past the chunk)."""
        if not any('"' in line for line in chunk):
            return chunk, np.arange(first_line, first_line + len(chunk), dtype=np.int64), len(chunk)
        records, numbers = [], []
        k, line = 0, first_line
        while k < len(chunk):
            rec, number = chunk[k], line
            k += 1
            line += 1
            if rec.count('"') % 2:
                spanned = 0
                while self._incomplete(rec, number):
                    nxt = chunk[k] if k < len(chunk) else next(f, "")
                    k += 1
                    spanned += 1
                    if not nxt or spanned > MAX_RECORD_LINES:
                        raise DataError(f"{self.path}: line {number} opens a quoted field that is never closed; fix "
                                        "the quotes of that row")
                    rec += nxt
                    line += 1
            records.append(rec)
            numbers.append(number)
        return records, np.asarray(numbers, dtype=np.int64), line - first_line

    def _incomplete(self, record: str, number: int) -> bool:
        try:
            for _ in csv.reader([record], delimiter=self.delimiter, strict=True):
                pass
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                return True
            if "field larger" in str(exc):
                raise DataError(f"{self.path}: line {number} holds a field longer than {csv.field_size_limit()} "
                                "characters; check the quotes of that row") from None
        return False

    # -- parsing -------------------------------------------------------------------------------

    def _loadtxt(self, records: list[str], idx: list[int], dtype: type, line_numbers: np.ndarray) -> np.ndarray:
        try:
            return np.loadtxt(records, delimiter=self.delimiter, usecols=idx, dtype=dtype, quotechar='"', ndmin=2,
                              comments=None, encoding=None)
        except ValueError as exc:
            m = re.search(r"at row (\d+)", str(exc))
            if dtype is float and "could not convert" in str(exc):
                raise
            line = line_numbers[int(m.group(1)) - 1] if m and int(m.group(1)) <= len(line_numbers) else "?"
            names = ", ".join(self.columns[i] for i in idx)
            raise DataError(f"{self.path}: line {line} has too few fields for the columns {names}; fix that "
                            "row") from None

    def _numeric(self, records: list[str], idx: list[int], line_numbers: np.ndarray) -> np.ndarray:
        """[n, len(idx)] float64; missing tokens -> NaN; anything else that is not a number is refused."""
        if not idx or not records:
            return np.zeros((len(records), len(idx)))
        # Columns where a field is no plain number (a missing token or a bad value) are parsed as text
        # and converted below; the others stay on loadtxt's fast float parser.
        out = np.empty((len(records), len(idx)), dtype=np.float64)
        slow: list[int] = []  # positions in idx
        while True:
            fast = [j for j in range(len(idx)) if j not in slow]
            if not fast:
                break
            try:
                out[:, fast] = self._loadtxt(records, [idx[j] for j in fast], float, line_numbers)
                break
            except DataError:
                raise
            except ValueError as exc:
                m = re.search(r"at row \d+, column (\d+)", str(exc))
                col = int(m.group(1)) - 1 if m else -1
                hit = [j for j in fast if idx[j] == col]
                slow += hit if hit else fast
        if not slow:
            return out
        raw = self._loadtxt(records, [idx[j] for j in slow], str, line_numbers)
        for k, j in enumerate(slow):
            field = np.char.strip(raw[:, k])
            missing = np.isin(np.char.lower(field), MISSING_TOKENS)
            try:
                out[:, j] = np.where(missing, "nan", field).astype(np.float64)
            except ValueError:
                for r, value in enumerate(field):
                    if not missing[r] and not _is_number(value):
                        where = f"{self.path}: line {line_numbers[r]}, column '{self.columns[idx[j]]}'"
                        if _DECIMAL_COMMA.fullmatch(value):
                            raise DataError(f"{where} holds '{value}', a decimal comma; export the file with a decimal "
                                            "point (1.5, not 1,5)") from None
                        hint = ("; write a yes/no column as 1 and 0" if value.lower() in ("true", "false")
                                else "; clean or drop that row")
                        raise DataError(f"{where} holds '{raw[r, k]}', not a number{hint}") from None
                raise
        return out

    def _strings(self, records: list[str], idx: list[int], line_numbers: np.ndarray) -> np.ndarray:
        """[n, len(idx)] str: the fields as stored (unquoted, not stripped)."""
        if not idx or not records:
            return np.zeros((len(records), len(idx)), dtype=str)
        return self._loadtxt(records, idx, str, line_numbers)


def _sniff(sample: list[str]) -> str:
    """The delimiter that splits the header into the most fields and most sample rows alike."""
    lines = [line for line in sample if line.strip()]
    best, best_fields = ",", 1
    for d in DELIMITERS:
        try:
            rows = list(csv.reader(lines, delimiter=d))
        except csv.Error:
            continue
        if not rows or len(rows[0]) < 2:
            continue
        n = len(rows[0])
        body = rows[1:-1] if len(rows) > 2 else rows[1:]  # the last sampled record may be cut short
        if body and sum(len(r) == n for r in body) < 0.8 * len(body):
            continue
        if n > best_fields:
            best, best_fields = d, n
    return best


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
