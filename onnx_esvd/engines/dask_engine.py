"""The layer pass on a Dask cluster: one task per data file on the workers, merged on the client.

Each task opens its file with the file's global first row (so the holdout split is the one-process
split), runs the layer pass with the worker's onnxruntime session (one per worker process and model,
cached) and returns a `shards.LayerPartial`; the client merges the partials in file order. Statistics
equal the single-process pass up to float64 rounding (Chan's pairwise update).

The workers must see the data files under the same paths as the client (a shared file system, or
the same machine for a local cluster). Dask is an optional extra: `pip install 'onnx-esvd[dask]'`.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from ..errors import DataError, OptionError
from ..shards import LayerPartial, identity, merge_all, model_hash

INSTALL = "pip install 'onnx-esvd[dask]'"

# worker side: model hash -> (ModelProto, {layer input: Runner}); one session per worker process and model
_SESSIONS: dict[str, tuple[Any, dict[str, Any]]] = {}
# onnxruntime threads per worker session: a worker runs one task at a time and there is one worker per core
_ORT_THREADS = int(os.environ.get("ONNX_ESVD_DASK_ORT_THREADS", "1"))


def require_dask() -> Any:
    """The `distributed` module, or an OptionError saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise OptionError(f"--engine dask needs dask and distributed; install them with: {INSTALL}") from None
    return distributed


@contextmanager
def dask_client(scheduler: Any = None, n_workers: int | None = None) -> Iterator[Any]:
    """A `distributed.Client`: the given client, one connected to `scheduler` (an address such as
    tcp://host:8786), or else a new LocalCluster of `n_workers` (default: one per core) single-threaded worker
    processes, closed afterwards."""
    distributed = require_dask()
    if scheduler is not None and not isinstance(scheduler, str):
        yield scheduler  # a Client already
        return
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout=30)
        except (OSError, TimeoutError) as exc:
            raise OptionError(f"--scheduler {scheduler}: cannot connect ({str(exc).splitlines()[0] if str(exc) else exc}"
                              "); check the address, or leave --scheduler out for a local cluster") from None
        try:
            yield client
        finally:
            client.close()
        return
    workers = n_workers or os.cpu_count() or 1
    # workers log a failed task's traceback; the client re-raises the error as one line, so keep them quiet
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.CRITICAL)
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


class DaskEngine:
    """An engine for `passes.PassTask`s on a Dask cluster: `engine(task, [(path, first_row), ...])` runs
    `passes.run_pass` once per file on the workers (the task is sent to every worker once) and returns the results
    in file order. scheduler: None (a LocalCluster of `n_workers` processes, closed by `close`), an address,
    or a `distributed.Client`."""

    def __init__(self, scheduler: Any = None, n_workers: int | None = None) -> None:
        self._context = dask_client(scheduler, n_workers)
        self.client = self._context.__enter__()

    def __call__(self, task: Any, files: Sequence[tuple[str, int]]) -> list[bytes]:
        from ..passes import run_pass

        client = self.client
        [shared] = client.scatter([task], broadcast=True, hash=False)
        futures = [client.submit(run_pass, shared, os.fspath(path), int(first), pure=False) for path, first in files]
        try:
            return client.gather(futures)  # re-raises a task's DataError / ModelError as it was
        finally:
            client.cancel(futures + [shared])

    def close(self) -> None:
        self._context.__exit__(None, None, None)


def _session(digest: str, model_bytes: bytes, layer_index: int, score: str | None) -> tuple[Any, Any, Any]:
    """(model, layer, runner) for this worker process, built once per model and layer."""
    import onnx

    from ..layer_pass import layer_runner, resolve_layer

    if digest not in _SESSIONS:
        model = onnx.ModelProto()
        model.ParseFromString(model_bytes)
        _SESSIONS.clear()  # one model at a time per worker
        _SESSIONS[digest] = (model, {})
    model, runners = _SESSIONS[digest]
    layer = resolve_layer(model, layer_index, score)
    if layer.input not in runners:
        runners[layer.input] = layer_runner(model, layer, threads=_ORT_THREADS)
    return model, layer, runners[layer.input]


def _layer_task(model_bytes: bytes, digest: str, layer_index: int, path: str, first_row: int, spec: Any,
                holdout: float, seed: int, batch_size: int) -> LayerPartial:
    """One file's layer pass on a worker (runs in the worker process).

    BLAS runs on one thread, as in the command-line tool: the float64 reductions then do not depend on the
    worker's core count, and a worker per core does not oversubscribe the machine (measured here: 10x slower
    moments with two BLAS threads per worker on two cores)."""
    from threadpoolctl import threadpool_limits

    from ..rows import open_rows
    from ..layer_pass import open_data
    from ..shards import columns_of, map_batches

    model, layer, runner = _session(digest, model_bytes, layer_index, spec.score)
    reader = open_rows(model, open_data(path, first_row), spec, batch_size=batch_size, seed=seed)
    header = identity(digest, layer, columns_of(reader), spec, holdout=holdout, seed=seed)
    with threadpool_limits(limits=1, user_api="blas"):
        partial = map_batches(runner, layer, reader, holdout=holdout, header=header, name=path,
                              allow_empty=True)
    partial.sources = [path]
    return partial


def _count_task(path: str) -> int:
    """Data rows of one file (runs on a worker: a CSV is split into records there, not on the client)."""
    from ..data import open_table
    from ..sources.multi import count_rows

    return count_rows(open_table(path))


def _offsets(client: Any, table: Any, parts: list, paths: list) -> list[int]:
    """Each file's first global row. Row counts that the file's metadata gives (Parquet, .npz) are read here; the
    others (CSV) are counted on the workers in parallel."""
    if len(parts) == 1:
        return [0]
    counts: list[Any] = [p.rows if isinstance(getattr(p, "rows", None), int) else None for p in parts]
    todo = [i for i, c in enumerate(counts) if c is None]
    if todo:
        for i, n in zip(todo, client.gather(client.map(_count_task, [os.fspath(paths[i]) for i in todo],
                                                       pure=False))):
            counts[i] = n
    return table.set_row_counts(counts)[:-1]


def layer_pass_dask(model: Any, data: Any, layer: Any, spec: Any, *, holdout: float, seed: int,
                    batch_size: int = 4096, scheduler: Any = None, n_workers: int | None = None,
                    progress: Callable[[str, int], None] | None = None) -> LayerPartial:
    """The layer pass of `repair` over every file of `data` on a Dask cluster, merged: a `LayerPartial`.

    model: a ModelProto (or a path). data: a file, directory, glob pattern or list of them (see
    `layer_pass.open_data`); each file is one task. layer: a `LinearLayer` of `model` (or an index/name).
    spec: a `rows.DataSpec`. scheduler: None (a local cluster), an address, or a `distributed.Client`.
    """
    require_dask()
    from ..layer_pass import _check_split, open_data, resolve_layer
    from ..modelio import load_model

    _check_split(holdout, seed)
    proto = load_model(model).model
    if not hasattr(layer, "input"):
        layer = resolve_layer(proto, layer, spec.score)
    table = open_data(data)
    parts = getattr(table, "parts", [table])
    paths = [getattr(p, "path", None) for p in parts]
    if any(p is None for p in paths):
        raise OptionError("--engine dask reads data files on the workers; give files, a directory or a glob "
                          "pattern, not in-memory data")
    from ..rows import plan_inputs

    plan_inputs(proto, table, spec)  # column errors here, once, before any task runs (every file has the same columns)
    digest = model_hash(proto)
    blob = proto.SerializeToString()
    with dask_client(scheduler, n_workers) as client:
        offsets = _offsets(client, table, parts, paths)
        [shared] = client.scatter([blob], broadcast=True)
        futures = [client.submit(_layer_task, shared, digest, layer.index, os.fspath(path), int(first), spec,
                                 holdout, seed, batch_size, pure=False)
                   for path, first in zip(paths, offsets)]
        done = 0
        results: dict[int, LayerPartial] = {}
        index = {f.key: i for i, f in enumerate(futures)}
        distributed = require_dask()
        for future in distributed.as_completed(futures):
            partial = future.result()  # re-raises the task's DataError / ModelError as it was
            results[index[future.key]] = partial
            done += partial.rows
            if progress is not None:
                progress("capture (dask)", done)
    merged = merge_all(results[i] for i in range(len(futures)))
    merged.name = os.fspath(data) if isinstance(data, (str, os.PathLike)) else table.name
    if merged.rows == 0:
        raise DataError(f"{merged.name}: no data rows in any file")
    return merged


def group_stats_dask(model: Any, data: Any, layer: Any, spec: Any, *, holdout: float, seed: int,
                     labels: Sequence[str] | None = None, notes: list[str] | None = None, **kwargs: Any):
    """`layer_pass_dask` turned into the `GroupStats` the ESVD math takes (group order: `labels`, default the
    --groups order or sorted labels)."""
    partial = layer_pass_dask(model, data, layer, spec, holdout=holdout, seed=seed, **kwargs)
    return partial.to_group_stats(labels, notes)
