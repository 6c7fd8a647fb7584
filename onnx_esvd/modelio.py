"""Reading ONNX files (with or without external data) and writing them atomically."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import ModelError, OutputError

# Past this a model must be stored with external data (protobuf's 2 GiB limit, with margin).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory with all weights loaded, and where it came from."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool


def _check_external_locations(model: onnx.ModelProto, base: Path, path: Path) -> None:
    root = base.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or root not in (target, *target.parents):
            raise ModelError(f"{path}: tensor '{tensor.name}' keeps its data at '{location}', outside the model's "
                             "directory; refusing to read it (move the data file next to the model)")
        if not target.is_file():
            raise ModelError(f"{path}: tensor '{tensor.name}' keeps its data in '{location}', which does not exist; "
                             "copy the data file next to the model")


def readable_by_others(path: str | os.PathLike) -> None:
    """Give a temporary file (mkstemp makes them 0600) the mode a plain open() would have (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def load_model(source: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """Load a model file (external data included) or take a ModelProto as it is (not copied)."""
    if isinstance(source, onnx.ModelProto):
        external = any(external_data_helper.uses_external_data(t)
                       for t in external_data_helper._get_all_tensors(source))
        if external:
            raise ModelError("the ModelProto given refers to external data that is not loaded; "
                             "pass the model's file path instead")
        return LoadedModel(source, None, False)
    path = Path(source)
    if not path.exists():
        raise ModelError(f"{path}: no such file; check the model path")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX model (truncated, corrupt or another format): "
                         f"{_first_line(exc)}") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{path}: the ONNX file has an empty graph; export the model again")
    external = any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model))
    if external:
        _check_external_locations(model, path.parent, path)
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise ModelError(f"{path}: cannot read its external data: {_first_line(exc)}") from None
    return LoadedModel(model, path, external)


def check_output_path(output: Path, *, inputs: tuple[Path, ...] = (), force: bool = False,
                      option: str = "-o") -> Path:
    """Refuse an output that is an input, exists without `force`, or sits in a missing/unwritable dir.

    `option` is the command-line option the messages tell the user to change.
    """
    out = Path(output)
    for src in inputs:
        if src is not None and out.exists() and src.exists() and os.path.samefile(out, src):
            raise OutputError(f"{out}: the output would overwrite the input; choose another path with {option}")
        if src is not None and out.resolve() == Path(src).resolve():
            raise OutputError(f"{out}: the output would overwrite the input; choose another path with {option}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{out}: directory '{parent}' does not exist; create it or choose another {option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: directory '{parent}' is not writable; choose another {option}")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file name with {option}")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force to overwrite it or choose another {option}")
    return out


def save_model(model: onnx.ModelProto, output: str | os.PathLike, *, external_data: bool = False) -> Path:
    """Check the model with onnx.checker, then write it atomically (temp file in the target dir, rename).

    With `external_data` (or past 2 GiB) the weights go to `<output name>.data` next to the output,
    written fresh (never appended to a stale file).
    """
    out = Path(output)
    parent = out.parent if str(out.parent) else Path(".")
    external_data = external_data or model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise ModelError(f"the repaired model fails onnx.checker: {_first_line(exc)}") from None
        _write_atomic(out, model.SerializeToString())
        return out
    data_name = f"{out.name}.data"
    with tempfile.TemporaryDirectory(dir=parent, prefix=f".{out.name}.") as tmpdir:
        tmp_model = Path(tmpdir) / out.name
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save(copy, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_name, size_threshold=1024)
        try:
            onnx.checker.check_model(str(tmp_model))
        except Exception as exc:
            raise ModelError(f"the repaired model fails onnx.checker: {_first_line(exc)}") from None
        tmp_data = Path(tmpdir) / data_name
        if tmp_data.exists():
            os.replace(tmp_data, parent / data_name)
        os.replace(tmp_model, out)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file in the target directory, fsync, then rename it over `path`."""
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        readable_by_others(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temp file in the same directory, then rename)."""
    out = Path(path)
    _write_atomic(out, text.encode("utf-8"))
    return out
