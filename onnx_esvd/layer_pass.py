"""The layer pass as mergeable statistics: capture one shard's, and use merged ones in a repair.

`capture_layer` runs the first pass of `repair` (the chosen node's input on the fit rows, per group)
over some data and returns a `shards.LayerPartial`; `layer_stats_for_repair` checks a merged partial
against the repair about to use it and turns it into the `GroupStats` the ESVD math takes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import onnx

from .errors import OptionError
from .shards import LayerPartial, check_same, columns_of, identity, model_hash
from .stats import GroupStats


def open_data(data: Any, first_row: int = 0) -> Any:
    """A `Table` for `data` whose first row has global index `first_row`.

    data: anything `open_table` takes (a file, a directory or glob pattern, arrays, ...), or a list or tuple
    of paths and patterns, read one after the other in the order given."""
    from .data import open_table
    from .sources.multi import ConcatTable, shifted

    if not (isinstance(first_row, int) and first_row >= 0):
        raise OptionError(f"--first-row {first_row!r} is invalid; it must be an integer >= 0")
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (str, os.PathLike)) for d in data):
        tables = [open_table(d) for d in data]
        parts = [p for t in tables for p in getattr(t, "parts", [t])]
        if len(parts) == 1:
            return shifted(parts[0], first_row)
        return ConcatTable(parts, " + ".join(str(d) for d in data), first_row=first_row)
    return shifted(open_table(data), first_row)


def layer_runner(model: onnx.ModelProto, layer: Any, threads: int | None = None) -> Any:
    """A `Runner` fetching only `layer.input` (graph optimisation off, as every pass of the tool); `threads`:
    onnxruntime's intra-op threads (default: its own choice, one per core)."""
    from .graph import with_outputs
    from .runtime import Runner

    return Runner(with_outputs(model, [(layer.input, layer.elem_type)]), [layer.input], threads=threads)


def resolve_layer(model: onnx.ModelProto, layer: int | str, score: str | None = None) -> Any:
    """The `LinearLayer` that `--layer` names (index, negative index or node name), as `repair` picks it."""
    from .graph import find_layers, select_layer
    from .score import resolve_score

    found = find_layers(model, resolve_score(model, score).tensor)
    return select_layer(found, _layer_spec(layer))


def _layer_spec(layer: int | str) -> int | str:
    if isinstance(layer, str):
        text = layer.strip()
        try:
            return int(text)
        except ValueError:
            return layer
    return layer


def capture_layer(model: Any, data: Any, layer: int | str, *, group: str, groups: Sequence[str] | None = None,
                  target: str | None = None, features: Sequence[str] | None = None, score: str | None = None,
                  dropna: bool = False, holdout: float = 0.2, seed: int = 0, batch_size: int = 4096,
                  first_row: int = 0, progress: Callable[[str, int], None] | None = None) -> LayerPartial:
    """The layer pass of `repair` over `data` as a mergeable `LayerPartial`.

    model: a path or ModelProto. data: see `open_data`. first_row: the global index of this shard's first row,
    so that the shards of one data set get the holdout split the whole data set would get. The other options
    mean what they mean for `repair`; pass the same to every shard and to the repair that uses them.
    """
    from .rows import data_spec, open_rows
    from .modelio import load_model

    _check_split(holdout, seed)
    loaded = load_model(model)
    spec = data_spec(group, groups, target, features, score, dropna)
    lin = resolve_layer(loaded.model, layer, score)
    table = open_data(data, first_row)
    reader = open_rows(loaded.model, table, spec, batch_size=batch_size, seed=seed)
    header = identity(loaded.model, lin, columns_of(reader), spec, holdout=holdout, seed=seed)
    runner = layer_runner(loaded.model, lin)
    try:
        from .shards import map_batches

        return map_batches(runner, lin, reader, holdout=holdout, header=header, progress=progress)
    finally:
        runner.close()


def _check_split(holdout: float, seed: int) -> None:
    if not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
        raise OptionError(f"--holdout {holdout} is invalid; it must be in [0, 1)")
    if not (isinstance(seed, int) and seed >= 0):
        raise OptionError(f"--seed {seed} is invalid; it must be an integer >= 0")


def layer_stats_for_repair(stats: str | os.PathLike | LayerPartial, model: onnx.ModelProto, layer: Any, spec: Any, *,
                           holdout: float, seed: int, columns: Mapping[str, Sequence[str]] | Any,
                           labels: Sequence[str] | None = None, notes: list[str] | None = None,
                           ) -> tuple[GroupStats, tuple[str, ...]]:
    """`--layer-stats`: merged statistics in place of the repair's own first pass, checked against it.

    stats: a file written by `capture`/`merge`, or a LayerPartial. model: the ModelProto being repaired (its
    sha256 must match). layer: the `LinearLayer` being repaired. spec: the run's `DataSpec`. holdout, seed: the
    run's split. columns: {model input: data columns}, or the run's `RowReader`. labels: the run's group order
    (e.g. `reader.group_labels()`); default: the statistics' own (the --groups order, or sorted).
    Returns the `GroupStats` in group order and the labels. Any difference is a one-line DataError naming the
    field and both values; groups with fewer than 2 fit rows are refused; small groups add a note.
    """
    partial = stats if isinstance(stats, LayerPartial) else LayerPartial.load(stats)
    if hasattr(columns, "inputs"):
        columns = columns_of(columns)
    expected = identity(model_hash(model), layer, columns, spec, holdout=holdout, seed=seed)
    check_same(partial.header, expected, f"--layer-stats {partial.name} does not fit this repair",
               first="the statistics have", second="this run has")
    group_stats = partial.to_group_stats(labels, notes)
    if notes is not None:
        notes.append(f"the layer statistics come from {partial.name} ({partial.rows} rows, "
                     f"{len(partial.sources)} source{'s' if len(partial.sources) != 1 else ''})")
    return group_stats, tuple(group_stats.labels)


def partial_note(partial: LayerPartial) -> str:
    """One line describing a partial (for the CLI)."""
    fit = ", ".join(f"{lab} {partial.fit_rows(lab)}/{partial.seen.get(lab, 0)}" for lab in partial.labels)
    layer = partial.header["layer"]
    extra = []
    if partial.skipped:
        extra.append(f"{partial.skipped} of no compared group")
    if partial.dropped:
        extra.append(f"{partial.dropped} dropped (--dropna)")
    more = f"; {', '.join(extra)}" if extra else ""
    return (f"layer {layer['index']} ('{layer['name']}', {layer['in_features']} inputs): {partial.rows} rows in "
            f"{len(partial.ranges)} range{'s' if len(partial.ranges) != 1 else ''}; fit/read rows per group: "
            f"{fit or 'none'}{more}")

