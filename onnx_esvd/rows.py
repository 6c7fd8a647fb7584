"""Reading rows into model feeds: what the user asked for (`DataSpec`), which columns feed which model input
(`plan_inputs`), the group labels (`GroupIndex`) and the batches of feeds with a group code, a target and a
seeded uniform number per row for the holdout split (`RowReader`).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx

from .data import Table, _label_text, normalise_labels
from .errors import DataError, ModelError, OptionError
from .graph import model_inputs
from .guards import input_fits

Progress = Callable[[str, int], None]

@dataclass(frozen=True)
class DataSpec:
    """How data columns map onto the model: group and target columns, features per model input."""

    group: str
    groups: tuple[str, str] | None = None
    target: str | None = None
    features: tuple[str, ...] | None = None
    score: str | None = None
    dropna: bool = False
    weights: str = "size"
    group_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.group_columns:  # built directly: one column, or several separated by commas
            object.__setattr__(self, "group_columns", tuple(c.strip() for c in str(self.group).split(",")))


# ---------------------------------------------------------------------------------------------
# rows, groups, feeds


#: A group column with more distinct values than this is refused (it is probably not a group column).
MAX_GROUPS = 50

#: The `--groups` value that stands for every row not in the listed groups ("A,rest": A against the rest).
REST = "rest"


def data_spec(group: str, groups: Sequence[str] | None, target: str | None,
              features: Sequence[str] | None, score: str | None = None, dropna: bool = False,
              weights: str = "size") -> DataSpec:
    """Validate the column options shared by every command.

    `group` is one column or several separated by commas (intersectional groups); `groups` lists the values to
    compare (two or more; the last may be "rest": every other row).
    """
    cols = tuple(c.strip() for c in str(group).split(",")) if group is not None else ()
    if not cols or any(not c for c in cols) or len(set(cols)) != len(cols):
        raise OptionError(f"--group {group!r} is invalid; give a column name, or several separated by commas")
    if groups is not None:
        groups = tuple(str(g).strip() for g in groups)
        texts = [_label_text(g) for g in groups]
        if len(groups) < 2 or len(set(texts)) != len(texts) or any(not g for g in groups):
            raise OptionError(f"--groups {','.join(groups)} is invalid; give two or more different values, e.g. "
                              "--groups A,B or --groups A,rest")
        if REST in groups[:-1]:
            raise OptionError(f"--groups {','.join(groups)}: '{REST}' stands for every other row and must come last")
    if weights not in ("size", "equal"):
        raise OptionError(f"--weights {weights!r} is invalid; choose size or equal")
    return DataSpec(group=group, groups=groups, target=target, features=tuple(features) if features else None,
                    score=score, dropna=bool(dropna), weights=weights, group_columns=cols)


def positive_batch(batch_size: int) -> int:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise OptionError(f"--batch-size {batch_size} is invalid; it must be a positive integer")
    return batch_size


def source_name(obj: Any) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    return f"<{type(obj).__name__}>"


def open_rows(model: onnx.ModelProto, data: Any, spec: DataSpec, *, batch_size: int, seed: int = 0,
              groups: GroupIndex | None = None) -> RowReader:
    """The data (a path, arrays or a reader) as batches of feeds for `model`, columns checked.

    `groups` shares the group labels of another reader (an evaluation file uses the calibration's groups)."""
    from .data import open_table

    table = open_table(data)
    return RowReader(table, plan_inputs(model, table, spec), spec, batch_size=positive_batch(batch_size), seed=seed,
                     groups=groups)


def row_uniform(seed: int, start: int, n: int) -> np.ndarray:
    """A seeded uniform [0, 1) per global row index (splitmix64), independent of batch sizes."""
    return row_uniform_at(seed, np.arange(start, start + n, dtype=np.uint64))


def row_uniform_at(seed: int, index: np.ndarray) -> np.ndarray:
    """`row_uniform` for arbitrary global row indices."""
    with np.errstate(over="ignore"):
        z = np.asarray(index, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 1) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


@dataclass(frozen=True)
class InputPlan:
    """How one model input is fed: its columns (in feature order), element type and per-row shape.

    Attributes:
        name: the model input.
        columns: the data columns, in the order the input's values are laid out (C order of `shape`).
        dtype: numpy dtype of the input (float, integer, bool or str).
        shape: the per-row shape, e.g. () for `[N]`, (5,) for `[N, 5]`, (1, 5) for `[N, 1, 5]`.
        by_position: True when the columns were taken in file order because no column names matched.
    """

    name: str
    columns: tuple[str, ...]
    dtype: np.dtype
    shape: tuple[int, ...]
    by_position: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape) + 1

    @property
    def is_text(self) -> bool:
        return self.dtype.kind in "USO"


def _input_shape(inp: onnx.ValueInfoProto) -> tuple[tuple[int, ...], np.dtype]:
    """Per-row shape and dtype of a model input `[N, ...]`; refuses what cannot be fed from columns."""
    if not inp.type.HasField("tensor_type"):
        raise ModelError(f"model input '{inp.name}' is not a tensor ({inp.type.WhichOneof('value')}); only tensor "
                         "inputs can be fed from data columns")
    tt = inp.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    except Exception:  # noqa: BLE001 - unknown or undefined element type
        raise ModelError(f"model input '{inp.name}' has element type {tt.elem_type}, which cannot be fed from data "
                         "columns") from None
    if dtype.kind not in "biufUSO":
        raise ModelError(f"model input '{inp.name}' has element type {dtype}, which cannot be fed from data columns")
    if dtype.kind == "O":
        dtype = np.dtype(object)
    if not tt.HasField("shape"):
        raise ModelError(f"model input '{inp.name}' has no declared shape; export the model with the input shape "
                         "[rows, features]")
    dims = list(tt.shape.dim)
    if not dims:
        raise ModelError(f"model input '{inp.name}' is a scalar; only inputs with a row dimension first "
                         "([rows], [rows, features], [rows, 1, features]) can be fed from data columns")
    rest = []
    for d in dims[1:]:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            shown = [x.dim_param or (x.dim_value if x.HasField("dim_value") else "?") for x in dims]
            raise ModelError(f"model input '{inp.name}' has shape {shown}: every dimension after the first (the rows) "
                             "must be a fixed number to be fed from data columns")
        rest.append(int(d.dim_value))
    return tuple(rest), dtype


def _named_columns(name: str, width: int, columns: Sequence[str]) -> tuple[str, ...] | None:
    """`NAME` (width 1) or `NAME_0 ... NAME_{w-1}` when the data has all of them, else None."""
    if width == 1 and name in columns:
        return (name,)
    wanted = tuple(f"{name}_{j}" for j in range(width))
    present = set(columns)
    return wanted if all(c in present for c in wanted) else None


def plan_inputs(model: onnx.ModelProto, table: Table, spec: DataSpec) -> list[InputPlan]:
    """Which columns feed which model input.

    For an input `NAME` of width w the columns `NAME_0 ... NAME_{w-1}` (or `NAME` when w = 1) are used in index
    order wherever they stand, whatever other columns the data holds. A single-input model whose columns match
    no names takes `--features`, or else every column but the group and target columns in file order
    (`by_position`, which the report states).
    """
    inputs = model_inputs(model)
    if not inputs:
        raise ModelError("the model has no runtime inputs to feed")
    shapes = [(inp.name, *_input_shape(inp)) for inp in inputs]
    reserved = set(spec.group_columns) | ({spec.target} if spec.target else set())
    for col in reserved:
        if col not in table.columns:
            what = "group" if col in spec.group_columns else "target"
            raise DataError(f"{table.name}: no {what} column '{col}' (columns: {_listed(table.columns)})"
                            f"{_near_miss(col, table.columns)}")
    if spec.features and len(shapes) > 1:
        raise OptionError("--features applies to single-input models; a model with several inputs takes the "
                          "columns named after each input (NAME, or NAME_0 ... NAME_{w-1})")
    plans = []
    for name, shape, dtype in shapes:
        width = int(np.prod(shape)) if shape else 1
        by_position = False
        if spec.features:
            cols = tuple(spec.features)
            for c in cols:
                if c not in table.columns:
                    raise DataError(f"{table.name}: no feature column '{c}' (columns: {_listed(table.columns)})"
                                    f"{_near_miss(c, table.columns)}")
                if c in reserved:
                    raise DataError(f"--features lists '{c}', which is the group or target column")
            if len(cols) != width:
                raise DataError(f"{table.name}: model input '{name}' takes {width} features but --features names "
                                f"{len(cols)} ({_listed(cols)})")
        else:
            cols = _named_columns(name, width, table.columns)
            if cols is None and len(shapes) > 1:
                expected = repr(name) if width == 1 else f"{name}_0 ... {name}_{width - 1}"
                missing = next(c for c in ((name,) if width == 1 else (f"{name}_{j}" for j in range(width)))
                               if c not in table.columns)
                raise DataError(f"{table.name}: model input '{name}' needs the column{'s' if width > 1 else ''} "
                                f"{expected}; '{missing}' is missing (the model's inputs: "
                                f"{', '.join(repr(s[0]) for s in shapes)}){_left_constant(inputs, name)}")
            if cols is None:
                cols = tuple(c for c in table.columns if c not in reserved and c not in table.index_columns)
                by_position = True
                if len(cols) != width:
                    raise DataError(f"{table.name}: model input '{name}' takes {width} features; no columns are "
                                    f"named {name + '_0 ... ' + name + '_' + str(width - 1) if width > 1 else name}, "
                                    f"and the data has {len(cols)} other columns ({_listed(cols)}); name the columns "
                                    f"after the input or choose them with --features")
        if any(c in reserved for c in cols):
            bad = next(c for c in cols if c in reserved)
            raise DataError(f"{table.name}: column '{bad}' is both a feature of input '{name}' and the group or target "
                            "column")
        plans.append(InputPlan(name, cols, dtype, shape, by_position))
    return plans


def _near_miss(name: str, columns: Sequence[str]) -> str:
    """A hint when a column differs from `name` only by spaces around it or by case (which the list hides)."""
    close = [c for c in columns if c != name and c.strip().casefold() == name.strip().casefold()]
    if not close:
        return ""
    return f"; the data has {close[0]!r}, which differs only in spaces or case: give that name exactly or rename it"


def _left_constant(inputs: Sequence[onnx.ValueInfoProto], name: str) -> str:
    """A hint when input `name` has a fixed first dimension of 1 while another input's row dimension is free: an
    exporter left a constant as an input (Keras's Normalization layer through tf2onnx does this)."""
    def first(inp: onnx.ValueInfoProto):
        dims = inp.type.tensor_type.shape.dim if inp.type.HasField("tensor_type") else []
        return dims[0] if len(dims) else None

    mine = next((first(i) for i in inputs if i.name == name), None)
    free = any(d is not None and not d.HasField("dim_value") for d in (first(i) for i in inputs if i.name != name))
    if mine is not None and mine.HasField("dim_value") and mine.dim_value == 1 and free:
        return ("; its first dimension is fixed at 1 while the other inputs take any number of rows, so it is likely "
                "a constant the exporter left as an input (as tf2onnx does for Keras's Normalization layer): export "
                "the model with that value folded in, or give it as constant columns")
    return ""


def reader_notes(name: str, reader: "RowReader") -> list[str]:
    """What every report must say about how `reader` read the data called `name`: inputs fed by position (no
    column named after them) and rows skipped for a missing value (--dropna)."""
    notes = [f"{name}: no columns are named after model input '{inp.name}', so it was fed the columns in file order "
             f"({', '.join(inp.columns)})" for inp in reader.by_position()]
    if reader.dropped:
        notes.append(f"{name}: {reader.dropped} rows with a missing value were skipped (--dropna)")
    return notes


def _listed(cols: Sequence[str], limit: int = 12) -> str:
    return ", ".join(cols[:limit]) + (", ..." if len(cols) > limit else "")


@dataclass
class Rows:
    """One batch of rows of the compared groups, ready to feed."""

    feeds: dict[str, np.ndarray]
    code: np.ndarray  # [n] int: label code (first-seen order)
    target: np.ndarray | None  # [n] float64
    u: np.ndarray  # [n] seeded uniform per row
    index: np.ndarray | None = None  # [n] int64 global row index (what sharded passes key rows by)

    def take(self, keep: np.ndarray) -> "Rows":
        """The rows where `keep: [n] bool` is true, in order."""
        return Rows({k: v[keep] for k, v in self.feeds.items()}, self.code[keep],
                    None if self.target is None else self.target[keep], self.u[keep],
                    None if self.index is None else self.index[keep])


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def feed_block(block: np.ndarray, inp: InputPlan, first_line: Any, where: str) -> np.ndarray:
    """Numeric columns `block: [n, w] float64` as the model input `inp`: its dtype and per-row shape.

    Integers must be whole numbers within the type's range, booleans 0 or 1, and float32/float16 values within
    the type's range (a value that would overflow to inf is refused, naming the column).
    """
    n = block.shape[0]
    kind = inp.dtype.kind
    if kind == "f" and inp.dtype.itemsize < 8 and block.size:
        limit = float(np.finfo(inp.dtype).max)
        big = np.abs(block) > limit
        if big.any():
            r, c = np.argwhere(big)[0]
            raise DataError(f"{where}: column '{inp.columns[c]}' holds {block[r, c]:g}, beyond the range of the "
                            f"model's {inp.dtype} input '{inp.name}' (|x| <= {limit:.4g}); rescale or clean that "
                            "column")
    elif kind in "iu" and block.size:
        info = np.iinfo(inp.dtype)
        bad = (block != np.floor(block)) | (block < info.min) | (block > info.max)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DataError(f"{where}: column '{inp.columns[c]}' holds {block[r, c]:g}, which is not a whole number in "
                            f"the range of the model's {inp.dtype} input '{inp.name}'")
    elif kind == "b" and block.size:
        bad = (block != 0) & (block != 1)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DataError(f"{where}: column '{inp.columns[c]}' holds {block[r, c]:g}; the model's bool input "
                            f"'{inp.name}' takes 0 or 1")
    return block.astype(inp.dtype).reshape((n, *inp.shape))


class GroupIndex:
    """Group labels seen so far, each with a code in first-seen order (shared by the readers of one run)."""

    def __init__(self, spec: DataSpec, name: str) -> None:
        self.spec, self.name = spec, name
        self.labels: list[str] = []
        self.code_of: dict[str, int] = {}
        self.wanted = None if spec.groups is None else tuple(_label_text(g) for g in spec.groups)
        self.other_labels: set[str] = set()
        self.frozen = False  # an evaluation reader uses the calibration's groups only

    def _other(self, label: str) -> None:
        """Remember a label outside the compared groups (the first 20, for messages)."""
        if len(self.other_labels) < 20:
            self.other_labels.add(label)

    def codes(self, labels: np.ndarray) -> np.ndarray:
        """Codes of `labels: [n] str` (-1: not a compared group); new labels get the next code."""
        uniq, inverse = np.unique(labels, return_inverse=True)
        codes = np.empty(len(uniq), dtype=np.int64)
        wanted = self.wanted
        rest = wanted is not None and wanted[-1] == REST
        for i, lab in enumerate(uniq):
            lab = str(lab)
            if wanted is not None:
                if lab in wanted[:len(wanted) - rest]:
                    codes[i] = wanted.index(lab)
                else:
                    codes[i] = len(wanted) - 1 if rest else -1
                    self._other(lab)
                continue
            if lab not in self.code_of:
                if self.frozen:
                    codes[i] = -1
                    self._other(lab)
                    continue
                if len(self.code_of) == MAX_GROUPS:
                    cols = ", ".join(f"'{c}'" for c in self.spec.group_columns)
                    raise DataError(f"{self.name}: group column {cols} has more than {MAX_GROUPS} distinct values; "
                                    "is it really a group column? Pick the groups with --groups A,B,...")
                self.code_of[lab] = len(self.labels)
                self.labels.append(lab)
            codes[i] = self.code_of[lab]
        return codes[inverse.reshape(-1)]


class RowReader:
    """Batches of feeds with group label codes; keeps every row's group code across passes."""

    def __init__(self, table: Table, inputs: list[InputPlan], spec: DataSpec, *, batch_size: int,
                 seed: int = 0, groups: GroupIndex | None = None) -> None:
        self.table, self.inputs, self.spec = table, inputs, spec
        self.batch_size, self.seed = batch_size, seed
        self.numeric = [c for inp in inputs if not inp.is_text for c in inp.columns]
        if spec.target:
            self.numeric.append(spec.target)
        self.text = list(dict.fromkeys([*spec.group_columns, *(c for inp in inputs if inp.is_text
                                                                 for c in inp.columns)]))
        self.index = groups if groups is not None else GroupIndex(spec, table.name)
        self.total = 0
        self.skipped = 0
        self.dropped = 0
        self._row_codes: list[tuple[Any, np.ndarray]] = []  # (first row index or row indices, codes) per batch
        self._full: np.ndarray | None = None
        # text columns later passes need (string model inputs): the group codes are kept from pass 1
        self._later_text = [c for c in self.text if c not in spec.group_columns
                            or any(c in inp.columns for inp in inputs)]
        from .spill import current_settings

        self._spill_settings = current_settings()
        self._spill = None
        self._spills: list = []  # every spill file made; all closed when the reader goes away
        weakref.finalize(self, _close_all, self._spills)

    # the label table lives in the shared GroupIndex
    @property
    def labels(self) -> list[str]:
        return self.index.labels

    @property
    def wanted(self) -> tuple[str, ...] | None:
        return self.index.wanted

    @property
    def other_labels(self) -> set[str]:
        return self.index.other_labels

    def by_position(self) -> list[InputPlan]:
        """Inputs fed from columns in file order because no column names matched (the report says so)."""
        return [inp for inp in self.inputs if inp.by_position]

    def _labels(self, text: dict[str, np.ndarray]) -> np.ndarray:
        cols = self.spec.group_columns
        if len(cols) == 1:
            return normalise_labels(text[cols[0]])
        parts = [np.char.add(f"{c}=", normalise_labels(text[c]).astype(str)) for c in cols]
        out = parts[0]
        for p in parts[1:]:
            out = np.char.add(np.char.add(out, "&"), p)
        return out

    def __call__(self, first_pass: bool = False, select: str = "all", holdout: float = 0.0) -> Iterator[Rows]:
        """Batches of the rows of the compared groups.

        The first pass reads the group column and remembers every row's label code (one byte a row).
        Later passes take the codes from there and read only the rows they need: `select` "fit"
        (u >= holdout), "report" (u < holdout, or every row with holdout 0) or "all". From a CSV, pass 1
        also writes the rows it kept to a spill file (onnx_esvd.spill) that later passes read instead of
        the text; an unfinished or interrupted pass frees it, and later passes then parse again.
        """
        spill = self._spill
        if not first_pass and spill is not None and spill.complete:
            try:
                yield from self._from_spill(spill, select, holdout)
            except BaseException:  # an error or Ctrl-C stopped the pass: free the disk now
                self.close()
                raise
            return
        keep = None if first_pass else self._selector(select, holdout)
        text = self.text if first_pass else self._later_text
        missing = "skip" if self.spec.dropna else "error"
        if first_pass:
            self._row_codes, self._full, self.total, self.skipped, self.dropped = [], None, 0, 0, 0
            spill = self._spill = self._new_spill()
        try:
            yield from self._parsed(first_pass, spill, keep, text, missing)
        except BaseException:
            if first_pass and spill is not None:  # an unfinished pass 1: its spill cannot replace the source
                self.close()
            raise

    def _parsed(self, first_pass: bool, spill, keep, text: list[str], missing: str) -> Iterator[Rows]:
        for batch in self.table.batches(self.numeric, self.batch_size, text=text, keep=keep, missing=missing):
            index = batch.row_index()
            if first_pass:
                self.dropped += batch.dropped
                code = self.index.codes(self._labels(batch.text))
                # contiguous blocks keep only their start (one byte a row in all)
                self._row_codes.append((batch.start if batch.index is None else index, code.astype(np.int8)))
                self._full = None
                self.total += len(code)
                self.skipped += int((code < 0).sum())
            else:
                code = self.row_codes[index].astype(np.int64)
            mask = code >= 0
            if not mask.any():
                continue
            sel = None if mask.all() else mask
            values = batch.values if sel is None else batch.values[sel]
            index, code = index[mask], code[mask]
            texts = {c: (batch.text[c] if sel is None else batch.text[c][sel]) for c in self._later_text}
            rows = self._rows(values, texts, code, index)
            if spill is not None and spill.open and not spill.append(values, index, code.astype(np.int8), texts):
                spill = self._spill = None  # past the cap or out of disk: later passes re-parse
            yield rows
        if first_pass and spill is not None:
            spill.finish()

    def _new_spill(self):
        """A spill file for pass 1's rows, when the source is text that is costly to parse again."""
        from .sources.csv import CsvTable
        from .spill import SpillFile

        if self._spill is not None:
            self._spill.close()
        if not (self._spill_settings.enabled and isinstance(self.table, CsvTable)):
            return None
        try:
            spill = SpillFile(len(self.numeric), self._later_text, self._spill_settings)
        except OSError:  # no temporary file to be had (full or read-only disk): parse in every pass
            return None
        self._spills[:] = [spill]
        return spill

    def _from_spill(self, spill, select: str, holdout: float) -> Iterator[Rows]:
        """A later pass read back from the spill file: the rows of `select`, in file order."""
        for values, index, code, text in spill.batches():
            if not (select == "all" or (select == "report" and holdout <= 0)):
                u = row_uniform_at(self.seed, index)
                mask = u >= holdout if select == "fit" else u < holdout
                if not mask.any():
                    continue
                if not mask.all():
                    values, index, code = values[mask], index[mask], code[mask]
                    text = {c: t[mask] for c, t in text.items()}
            yield self._rows(values, text, code.astype(np.int64), index)

    def _rows(self, values: np.ndarray, text: dict[str, np.ndarray], code: np.ndarray, index: np.ndarray) -> Rows:
        """Feeds of the rows `values: [n, c] float64` (numeric columns), `text: {column: [n] str}`."""
        feeds, j = {}, 0
        where = self.table.name
        for inp in self.inputs:
            if inp.is_text:
                arr = np.stack([np.asarray(text[c], dtype=object) for c in inp.columns], axis=1)
                feeds[inp.name] = arr.reshape((len(code), *inp.shape))
                continue
            block = values[:, j:j + len(inp.columns)]
            input_fits(block, inp.dtype, inp.columns, where, inp.name)
            j += len(inp.columns)
            feeds[inp.name] = feed_block(block, inp, None, where)
        target = values[:, j] if self.spec.target else None
        return Rows(feeds, code, target, row_uniform_at(self.seed, index), np.asarray(index, dtype=np.int64))

    def close(self) -> None:
        """Free the spill file now (it is freed anyway when the reader is garbage-collected)."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    @property
    def row_codes(self) -> np.ndarray:
        """Label code of every row of the data by global row index (-1: no compared group, or dropped for a
        missing value), known after the first pass. One byte a row."""
        if self._full is None:
            def end(where: Any, code: np.ndarray) -> int:
                if isinstance(where, (int, np.integer)):
                    return int(where) + len(code)
                return int(where[-1]) + 1 if len(where) else 0

            size = max((end(w, c) for w, c in self._row_codes), default=0)
            full = np.full(size, -1, dtype=np.int8)
            for where, code in self._row_codes:
                if isinstance(where, (int, np.integer)):
                    full[int(where):int(where) + len(code)] = code
                else:
                    full[where] = code
            self._full = full
            self._row_codes = [(0, full)]  # one byte a row, not two
        return self._full

    def _selector(self, select: str, holdout: float):
        codes = self.row_codes

        def keep(start: int, n: int) -> np.ndarray:
            part = codes[start:start + n]
            mask = np.zeros(n, dtype=bool)
            mask[:len(part)] = part >= 0
            if select == "all" or (select == "report" and holdout <= 0):
                return mask
            u = row_uniform(self.seed, start, n)
            return mask & (u >= holdout if select == "fit" else u < holdout)

        return keep

    def group_labels(self) -> tuple[str, ...]:
        """Labels of the compared groups after the first pass, in group order: the `--groups` order, or sorted
        (numbers by value). Code c of the pass maps to group `group_of_code()[c]`."""
        return compared_groups(self.table.name, self.spec, self.wanted, self.labels)

    def group_of_code(self) -> np.ndarray:
        """Array mapping a label code to the group index (0 .. k-1)."""
        if self.wanted is not None:
            return np.arange(len(self.wanted))
        order = self.group_labels()
        return np.array([order.index(lab) for lab in self.labels], dtype=np.int64)


def compared_groups(name: str, spec: DataSpec, wanted: tuple[str, ...] | None, seen: Sequence[str]
                    ) -> tuple[str, ...]:
    """The compared groups' labels in group order: `wanted` (the `--groups` order; codes are then group
    indices), else the labels `seen` in the data `name`, sorted (numbers by value), at least two."""
    if wanted is not None:
        return wanted
    if len(seen) < 2:
        only = f"only the value {seen[0]!r}" if seen else "no values"
        cols = ", ".join(f"'{c}'" for c in spec.group_columns)
        raise DataError(f"{name}: group column {cols} has {only}; it needs rows of at least two groups")
    return tuple(sorted(seen, key=_sort_key))


def _close_all(spills: list) -> None:
    for spill in spills:
        spill.close()


def _sort_key(label: str) -> tuple:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)
