"""onnxruntime on the CPU: sessions over (augmented) models, run batch by batch."""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import onnx

from .errors import ModelError

T = TypeVar("T")
R = TypeVar("R")

# Protobuf cannot serialise a model past 2 GiB; leave room for the graph itself.
_INLINE_LIMIT = 2**31 - 2**26


class Runner:
    """An onnxruntime CPU session that returns the requested tensors.

    Tensors that are graph inputs are returned from the feed itself, since onnxruntime does not
    output a graph input. Graph optimisation is always off: capture requires it, and every command
    (repair's before/after, audit, check) must see the same outputs for the same model, which
    fused kernels would change in the last bits (enough to flip a near-tie and so the KS).
    """

    def __init__(self, model: onnx.ModelProto, outputs: Sequence[str], *, threads: int | None = None) -> None:
        import onnxruntime as ort

        # onnxruntime's own log lines (warnings about unused initializers, ...) never reach stderr:
        # the tool reports what matters as one line.
        ort.set_default_logger_severity(3)
        feed_names = {i.name for i in model.graph.input}
        self.fixed_batch = static_batch(model)
        self.outputs = list(outputs)
        self._from_feed = [n for n in self.outputs if n in feed_names]
        self._fetch = [n for n in self.outputs if n not in feed_names]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        # Spinning worker threads would compete with numpy's BLAS, which runs between the batches
        # (measured: a 1M-row repair took twice as long with spinning on).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:  # e.g. 1 in each of several worker processes on one machine (engines/dask_engine.py)
            opts.intra_op_num_threads = threads
        self._tmp: tempfile.TemporaryDirectory | None = None
        try:
            if model.ByteSize() < _INLINE_LIMIT:
                self.session = ort.InferenceSession(model.SerializeToString(), opts,
                                                    providers=["CPUExecutionProvider"])
            else:
                self._tmp = tempfile.TemporaryDirectory(prefix="onnx-esvd-")
                path = os.path.join(self._tmp.name, "model.onnx")
                onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                          location="model.onnx.data")
                self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
            raise ModelError(f"onnxruntime {ort.__version__} cannot load the model (opset {opsets}): "
                             f"{_first_line(exc)}; if the opset is newer than this onnxruntime supports, upgrade "
                             "onnxruntime or export the model with a lower opset") from exc

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns {name: array} for every requested tensor.

        A model whose inputs have a fixed batch size b (exported without dynamic axes) is run on chunks of
        exactly b rows, the last one padded by repeating its last row; the outputs are joined and trimmed.
        """
        if not self._fetch:
            values = []
        elif self.fixed_batch is None:
            values = self._run(dict(feeds))
        else:
            values = self._run_fixed(feeds, self.fixed_batch)
        out = dict(zip(self._fetch, values))
        for name in self._from_feed:
            out[name] = feeds[name]
        return out

    def _run(self, feeds: dict[str, np.ndarray]) -> list:
        try:
            return self.session.run(self._fetch, feeds)
        except Exception as exc:
            raise ModelError(f"onnxruntime failed to run the model: {_first_line(exc)}") from exc

    def _run_fixed(self, feeds: Mapping[str, np.ndarray], size: int) -> list:
        n = len(next(iter(feeds.values())))
        if n == size:
            return self._run(dict(feeds))
        parts: list[list[np.ndarray]] = [[] for _ in self._fetch]
        for start in range(0, n, size):
            chunk = {}
            for name, arr in feeds.items():
                block = arr[start:start + size]
                if len(block) < size:  # pad the last chunk with copies of its last row
                    block = np.concatenate([block, np.repeat(block[-1:], size - len(block), axis=0)])
                chunk[name] = block
            for j, value in enumerate(self._run(chunk)):
                v = np.asarray(value)
                if v.ndim == 0 or v.shape[0] != size:
                    raise ModelError(f"the model takes a fixed batch of {size} rows but its tensor '{self._fetch[j]}' "
                                     f"has shape {list(v.shape)}, not one row per input row")
                parts[j].append(v[:min(size, n - start)])
        return [np.concatenate(p) for p in parts]

    def close(self) -> None:
        self.session = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch size b when every runtime input's first dimension is the same number b, else None."""
    inits = {t.name for t in model.graph.initializer}
    sizes = set()
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value <= 0:
            return None
        sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def pipelined(items: Iterable[T], work: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """Yield `(item, work(item))` in order, running `work` on the next item in a worker thread while
    the caller reduces the current one (onnxruntime and numpy's BLAS both release the GIL).

    At most one item is in flight, so memory stays at two batches.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-esvd-run") as pool:
        pending = None
        for item in items:
            future = pool.submit(work, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()
