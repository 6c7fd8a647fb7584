"""Reading ONNX files (with or without external data) and writing them atomically.

Reading: only regular files (a FIFO or device is refused before it is opened for reading), read
once with a bounded size; every tensor's external-data location (sparse tensors and subgraphs
included) must be a regular file inside the model's directory, and is read relative to that directory.

Writing (see `save_model`): a temporary file in the target directory renamed into place; a new
output is created exclusively; with external data the weights go to a content-named data file
that the new model references, the model is renamed last and the data file of the output it
replaced is removed after that, so a kill at any moment leaves a loadable, consistent pair.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import onnx
from onnx import external_data_helper

from .errors import ModelError, OutputError
from .guards import model_structure_ok, model_usable

# Past this a model must be stored with external data (protobuf's 2 GiB limit, with margin).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26

#: protobuf cannot parse a message of 2 GiB or more: a larger file is refused before it is read.
MAX_MODEL_FILE = 2**31 - 1

_WRITTEN: list[Path] = []


def written_files() -> tuple[Path, ...]:
    """Files this process completed (renamed into place) since `forget_written()`; for honest Ctrl-C messages."""
    return tuple(_WRITTEN)


def forget_written() -> None:
    _WRITTEN.clear()


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory with all weights loaded, and where it came from.

    `files`: every file read (the model, then its external data files), as resolved paths.
    """

    model: onnx.ModelProto
    path: Path | None
    external_data: bool
    files: tuple[Path, ...] = ()


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers, sparse initializers (values and indices), node attributes,
    recursively through subgraphs and functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _uses_external(tensor: onnx.TensorProto) -> bool:
    return external_data_helper.uses_external_data(tensor)


def _external_files(model: onnx.ModelProto, base: Path, path: Path) -> tuple[Path, ...]:
    """Check every tensor's external-data location and return the files (resolved, in first-use order)."""
    root = base.resolve()
    files: dict[Path, None] = {}
    for tensor in all_tensors(model):
        if not _uses_external(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        try:
            target = (base / location).resolve(strict=False)
            outside = os.path.isabs(location) or root not in (target, *target.parents)
            regular = not outside and target.is_file()
        except (OSError, ValueError, RuntimeError):  # NUL byte, symlink loop, name too long
            raise ModelError(f"{path}: tensor '{tensor.name}' keeps its data at {location!r}, which is not a usable "
                             "file name (a NUL byte or a symlink loop); export the model again") from None
        if outside or not location:
            raise ModelError(f"{path}: tensor '{tensor.name}' keeps its data at '{location}', outside the model's "
                             "directory; refusing to read it (move the data file next to the model)")
        if not regular:
            what = "is not a regular file" if target.exists() else "does not exist"
            raise ModelError(f"{path}: tensor '{tensor.name}' keeps its data in '{location}', which {what}; "
                             "copy the data file next to the model")
        files[target] = None
    return tuple(files)


def readable_by_others(path: str | os.PathLike) -> None:
    """Give a temporary file (mkstemp makes them 0600) the mode a plain open() would have (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _read_model_bytes(path: Path) -> bytes:
    """The file's bytes; refuses anything but a regular file below 2 GiB, without blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file; check the model path") from None
    except IsADirectoryError:
        raise ModelError(f"{path}: is a directory, not an ONNX file") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot open the model: {_reason(exc)}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise ModelError(f"{path}: is a directory, not an ONNX file")
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"{path}: is not a regular file (a FIFO, device or socket); give the ONNX file itself")
        if st.st_size > MAX_MODEL_FILE:
            raise ModelError(f"{path}: {st.st_size} bytes, past protobuf's 2 GiB limit for one file; save the model "
                             "with external data")
        try:
            return f.read(st.st_size + 1)
        except OSError as exc:
            raise ModelError(f"{path}: cannot read the model: {_reason(exc)}") from None


def _parse(path: Path) -> onnx.ModelProto:
    data = _read_model_bytes(path)
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX model (truncated, corrupt or another format): "
                         f"{_first_line(exc)}") from None
    return model


def model_files(source: str | os.PathLike) -> tuple[Path, ...]:
    """The files a model file reads: itself and its external data files (resolved). Unreadable: itself only."""
    path = Path(source)
    try:
        model = _parse(path)
        return (path.resolve(), *_external_files(model, path.parent, path))
    except (ModelError, OSError, ValueError, RuntimeError):
        try:
            return (path.resolve(),)
        except (OSError, ValueError, RuntimeError):
            return ()


def load_model(source: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """Load a model file (external data included) or take a ModelProto as it is (not copied)."""
    if isinstance(source, onnx.ModelProto):
        if any(_uses_external(t) for t in all_tensors(source)):
            raise ModelError("the ModelProto given refers to external data that is not loaded; "
                             "pass the model's file path instead")
        model_usable(source, "the model")
        return LoadedModel(source, None, False)
    path = Path(source)
    model = _parse(path)
    model_usable(model, str(path))
    files = _external_files(model, path.parent, path)
    if files:
        try:
            for tensor in all_tensors(model):
                if _uses_external(tensor):
                    external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
        except Exception as exc:
            raise ModelError(f"{path}: cannot read its external data: {_first_line(exc)}") from None
    model_structure_ok(model, path)
    return LoadedModel(model, path, bool(files), (path.resolve(), *files))


# ---------------------------------------------------------------------------------------------
# output paths


def check_output_path(output: str | os.PathLike, *, inputs: Sequence[str | os.PathLike | None] = (),
                      force: bool = False, option: str = "-o",
                      models: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output that is a file the run reads, exists without `force`, is not a regular file, or
    sits in a missing/unwritable directory. Returns the output as a Path.

    `inputs`: files read (data files; models too); `models`: model files whose external data files are
    read too. `option` is the command-line option the messages tell the user to change.
    """
    text = os.fspath(output)
    if text.endswith(("/", os.sep)) or text in ("", ".", ".."):
        raise OutputError(f"{text}: names a directory (ends with '/'); give a file name with {option}")
    if "\0" in text:
        raise OutputError(f"{text!r}: holds a NUL byte; choose another {option}")
    out = Path(text)
    _refuse_read_paths(out, inputs, models, option)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{out}: directory '{parent}' does not exist; create it or choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: directory '{parent}' is not writable; choose another {option}")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file name with {option}")
    if os.path.lexists(out):
        try:
            mode = os.stat(out).st_mode
        except OSError:  # a dangling symlink (or a loop): replacing it needs --force like any existing name
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise OutputError(f"{out}: is not a regular file (a device, FIFO or socket), which is never replaced; "
                              f"choose another {option}")
        if not force:
            raise OutputError(f"{out}: already exists; pass --force to overwrite it or choose another {option}")
    return out


def _refuse_read_paths(out: Path, inputs, models, option: str) -> None:
    try:
        target = out.resolve()
    except (OSError, RuntimeError):
        raise OutputError(f"{out}: cannot be resolved (a symlink loop?); choose another {option}") from None
    for src in [s for s in inputs if s is not None] + [m for m in models if m is not None]:
        if _same(out, target, Path(src)):
            raise OutputError(f"{out}: the output would overwrite the input; choose another path with {option}")
    for model in (m for m in models if m is not None):
        for data in model_files(model)[1:]:
            if _same(out, target, data):
                raise OutputError(f"{out}: the input model {model} reads its weights from this file; choose "
                                  f"another path with {option}")


def _same(out: Path, target: Path, src: Path) -> bool:
    try:
        if os.path.exists(out) and src.exists() and os.path.samefile(out, src):
            return True
        return target == src.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# writing


def save_model(model: onnx.ModelProto, output: str | os.PathLike, *, external_data: bool = False,
               force: bool = False, models: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Check the model with onnx.checker, then write it atomically (temp file in the target dir, rename).

    Without `force` the output is created exclusively (fails if it appeared meanwhile). With
    `external_data` (or past 2 GiB) the weights go to `<output name>.<content hash>.data` next to the
    output; the data file of an earlier output of the same name is removed after the model is in place,
    unless one of `models` (the inputs) reads it.
    """
    out = Path(output)
    parent = out.parent if str(out.parent) else Path(".")
    external_data = external_data or model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise ModelError(f"the repaired model fails onnx.checker: {_first_line(exc)}") from None
        _write_atomic(out, model.SerializeToString(), exclusive=not force)
        return out
    keep = {f for m in models if m is not None for f in model_files(m)}
    old_data = _old_data_files(out, parent) if force else ()
    with _temp_dir(parent, out) as tmpdir:
        tmp_model, tmp_data, data_name = _stage_external(model, out, Path(tmpdir))
        dest = parent / data_name
        created = _place_data(tmp_data, dest, out)
        try:
            _place(tmp_model, out, exclusive=not force)
        except BaseException:
            if created:
                _unlink_quietly(dest)
            raise
        _WRITTEN.extend([out, dest] if data_name else [out])
    for stale in old_data:
        if stale != dest.resolve() and stale not in keep:
            _unlink_quietly(stale)
    return out


def _stage_external(model: onnx.ModelProto, out: Path, tmpdir: Path) -> tuple[Path, Path, str]:
    """Write model + data into `tmpdir`, name the data file after its content, check the pair."""
    tmp_model = tmpdir / out.name
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        onnx.save(copy, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="pending.data", size_threshold=1024)
    except OSError as exc:
        raise _output_error(out, exc) from None
    pending = tmpdir / "pending.data"
    if pending.exists():
        data_name = f"{out.name}.{_file_digest(pending)}.data"
        os.replace(pending, tmpdir / data_name)
        staged = onnx.load(str(tmp_model), load_external_data=False)
        for tensor in all_tensors(staged):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value == "pending.data":
                    entry.value = data_name
        _write_file(tmp_model, staged.SerializeToString(), out)
    else:  # every tensor is below the threshold: an external-data model without a data file
        data_name = ""
    try:
        onnx.checker.check_model(str(tmp_model))
    except Exception as exc:
        raise ModelError(f"the repaired model fails onnx.checker: {_first_line(exc)}") from None
    tmp_data = tmpdir / data_name if data_name else tmpdir / "pending.data"
    for path in (tmp_model, tmp_data):
        if path.exists():
            readable_by_others(path)
    return tmp_model, tmp_data, data_name


def _place_data(tmp_data: Path, dest: Path, out: Path) -> bool:
    """Put the staged data file at `dest` (a new name); True when this call created it."""
    if not tmp_data.exists() or dest.name == "":
        return False
    if os.path.lexists(dest):
        if dest.is_file() and not dest.is_symlink() and _file_digest(dest) == _file_digest(tmp_data):
            return False  # the same weights are already there under their content name (an earlier run)
        raise OutputError(f"{dest}: exists with other contents; move it away or choose another -o")
    _place(tmp_data, dest, exclusive=True)
    return True


def _old_data_files(out: Path, parent: Path) -> tuple[Path, ...]:
    """Data files of the existing `out` that this tool named after it (`out.data`, `out.<hash>.data`)."""
    if not out.is_file():
        return ()
    pattern = re.compile(re.escape(out.name) + r"(\.[0-9a-f]{12})?\.data")
    try:
        files = model_files(out)[1:]
    except Exception:  # noqa: BLE001 - an unreadable old output has no data files to clean up
        return ()
    root = parent.resolve()
    return tuple(f for f in files if f.parent == root and pattern.fullmatch(f.name))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


class _temp_dir:
    """A temporary directory in the target directory, removed on exit whatever happens."""

    def __init__(self, parent: Path, out: Path) -> None:
        self.parent, self.out = parent, out

    def __enter__(self) -> str:
        try:
            self.path = tempfile.mkdtemp(dir=self.parent, prefix=f".{self.out.name}.")
        except OSError as exc:
            raise _output_error(self.out, exc) from None
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _place(src: Path, dest: Path, *, exclusive: bool) -> None:
    """Rename `src` to `dest`; `exclusive`: fail if `dest` exists (hard link, then unlink the source)."""
    try:
        if exclusive:
            try:
                os.link(src, dest)
            except FileExistsError:
                raise OutputError(f"{dest}: already exists (created while this run was working); pass --force "
                                  "to overwrite it or choose another -o") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if os.path.lexists(dest):  # no hard links here: check, then rename (a small window remains)
                    raise OutputError(f"{dest}: already exists; pass --force to overwrite it or choose another "
                                      "-o") from None
                os.replace(src, dest)
                return
            os.unlink(src)
        else:
            os.replace(src, dest)
    except OutputError:
        raise
    except OSError as exc:
        raise _output_error(dest, exc) from None


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)


def _output_error(path: Path, exc: OSError) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{path}: no space left on the device; nothing was written (free some space or choose "
                           "another directory)")
    return OutputError(f"{path}: cannot write: {_reason(exc)}; nothing was written")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _write_file(path: Path, data: bytes, out: Path) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise _output_error(out, exc) from None


def _write_atomic(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write `data` to a temporary file in the target directory, fsync, then rename it to `path`."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            readable_by_others(tmp)
        except OSError as exc:
            raise _output_error(path, exc) from None
        _place(Path(tmp), path, exclusive=exclusive)
        _WRITTEN.append(path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, *, exclusive: bool = False) -> Path:
    """Write a text file atomically (temp file in the same directory, then rename)."""
    out = Path(path)
    _write_atomic(out, text.encode("utf-8"), exclusive=exclusive)
    return out
