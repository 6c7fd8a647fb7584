"""onnxruntime on the CPU: sessions over (augmented) models, run batch by batch."""

from __future__ import annotations

import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, Sequence, TypeVar

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
    """The fixed batch size b when every runtime input whose first dimension is a number has the same number b
    (inputs with a free first dimension take b rows too), else None.

    A model may fix one input at [1, k] while the others take any number of rows (tf2onnx leaves the constants of
    Keras's Normalization layer as such inputs): it runs row by row."""
    inits = {t.name for t in model.graph.initializer}
    sizes = set()
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None


def _first_line(exc: BaseException, limit: int = 400) -> str:
    """The exception's message on one line: onnxruntime's messages go on after a line break ("... for the
    following indices" / "index: 0 Got: 4096 Expected: 1"), so the lines are joined, not cut."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def pipelined(items: Iterable[T], work: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """Yield `(item, work(item))` in order, in three stages that overlap: the next item is produced
    (parsed) in one worker thread while `work` (inference) runs on the current one in another and the
    caller reduces the previous one (onnxruntime, numpy's BLAS and most of the parsing release the GIL).

    At most two items are in flight besides the one being reduced, so memory stays at three batches.
    BLAS runs on one thread throughout (`one_blas_thread`): its thread pool would otherwise fight
    onnxruntime's on every small per-batch product. The items' iterator is closed on every exit.
    """
    it = iter(items)
    end = object()
    with one_blas_thread(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-esvd-read") as read, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-esvd-run") as run:
        upcoming = None
        try:
            upcoming = read.submit(next, it, end)
            pending = None
            while True:
                item = upcoming.result()
                upcoming = None
                if item is end:
                    break
                future = run.submit(work, item)
                upcoming = read.submit(next, it, end)
                if pending is not None:
                    yield pending[0], pending[1].result()
                pending = (item, future)
            if pending is not None:
                yield pending[0], pending[1].result()
        finally:
            if upcoming is not None and not upcoming.cancel():  # stopped early: let the read in progress end
                _wait_quietly(upcoming)
            close = getattr(it, "close", None)
            if close is not None:
                close()


class Background(Generic[R]):
    """`fn(*args, **kwargs)` computed in a thread while the caller goes on; `get()` waits for it and returns it,
    or raises its error. The before-report's metrics (the KS and its bootstrap) run so on the core that the ESVD
    and the penalised refit leave idle (they use one BLAS thread)."""

    def __init__(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), name="onnx-esvd-metrics",
                                        daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., R], args: tuple, kwargs: dict) -> None:
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of get()
            self._error = exc

    def get(self) -> R:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _wait_quietly(future) -> None:
    try:
        future.result()
    except BaseException:  # noqa: BLE001 - the first error is already on its way up
        pass


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS (numpy's OpenBLAS or MKL, and any other loaded) limited to one thread inside, restored after.

    The streaming passes multiply small per-batch blocks; a multi-threaded BLAS spends more on its
    barriers than on the products there, and more still when other jobs share the cores. One thread
    also keeps float64 reductions independent of the core count. Nested and interleaved uses share
    one limit, lifted when the last one ends.
    """
    global _blas_users, _blas_limit
    with _blas_lock:
        if _blas_users == 0:
            from threadpoolctl import threadpool_limits

            _blas_limit = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limit is not None:
                _blas_limit.restore_original_limits()
                _blas_limit = None


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limit = None
