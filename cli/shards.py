"""`onnx-esvd capture` and `onnx-esvd merge`: the layer pass's statistics where the data is, merged anywhere."""

# No `from __future__ import annotations`: the option types are imported inside `register` (cli.main imports
# this module at its end), and Typer must see the annotations as objects.

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .errors import handled


def _reads(data: list[Path]) -> list[Path]:
    """The files `--data` names (globs and directories expanded), for the output-path check."""
    from onnx_esvd.errors import DataError
    from onnx_esvd.sources.multi import expand, is_many

    out: list[Path] = []
    for d in data:
        try:
            out.extend(expand(d) if is_many(d) else [d])
        except DataError:
            out.append(d)  # the read itself reports it
    return out


def register(app: typer.Typer) -> None:
    """Add the commands to the `onnx-esvd` app."""
    from .main import (BatchOpt, DebugOpt, DropnaOpt, FeaturesOpt, GroupOpt, GroupsOpt, JsonOpt, LayerOpt, ModelArg,
                       QuietOpt, ScoreOpt, SeedOpt, TargetOpt, _split)

    @app.command()
    def capture(
        model: ModelArg,
        layer: LayerOpt,
        data: Annotated[List[Path], typer.Option(
            "--data", help="Data of this shard: a file, a directory or a quoted glob ('part-*.csv'); repeat for "
                           "several, read in the order given.", show_default=False)],
        group: GroupOpt,
        output: Annotated[Path, typer.Option("-o", "--output", help="The statistics file to write (.npz).",
                                             show_default=False)],
        groups: GroupsOpt = None,
        target: TargetOpt = None,
        features: FeaturesOpt = None,
        score: ScoreOpt = None,
        dropna: DropnaOpt = False,
        holdout: Annotated[float, typer.Option("--holdout", help="Share of rows kept out of the fit; the same as "
                                                                 "the repair that uses these statistics (0 for "
                                                                 "a repair with --eval).")] = 0.2,
        seed: SeedOpt = 0,
        first_row: Annotated[int, typer.Option("--first-row", min=0, help="Global index of this shard's first row "
                                                                          "in the whole data set, so that every "
                                                                          "shard gets the whole set's holdout "
                                                                          "split.")] = 0,
        engine: Annotated[str, typer.Option("--engine", help="local (this process) or dask (one task per file on "
                                                             "a Dask cluster).")] = "local",
        scheduler: Annotated[Optional[str], typer.Option("--scheduler", metavar="ADDRESS",
                                                         help="With --engine dask: an existing cluster's scheduler "
                                                              "(default: a local cluster, one worker per core).")]
        = None,
        batch_size: BatchOpt = 4096,
        force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
        debug: DebugOpt = False,
    ) -> None:
        """Write the layer pass's statistics (per-group moments of the layer's input on the fit rows) of some
        data, to be merged with `onnx-esvd merge` and used by `repair --layer-stats`."""
        with handled(debug):
            from onnx_esvd._json import dumps
            from onnx_esvd.errors import OptionError
            from onnx_esvd.layer_pass import capture_layer, partial_note
            from onnx_esvd.modelio import check_output_path

            from .progress import Progress

            out = check_output_path(output, inputs=_reads(data), models=(model,), force=force)
            if engine not in ("local", "dask"):
                raise OptionError(f"--engine {engine!r} is invalid; choose local or dask")
            if scheduler is not None and engine != "dask":
                raise OptionError("--scheduler needs --engine dask")
            progress = Progress(quiet=quiet)
            sources = [str(d) for d in data]
            try:
                if engine == "dask":
                    partial = _capture_dask(model, sources, layer, group, _split(groups), target, _split(features),
                                            score, dropna, holdout, seed, first_row, batch_size, scheduler, progress)
                else:
                    partial = capture_layer(model, sources, layer, group=group, groups=_split(groups), target=target,
                                            features=_split(features), score=score, dropna=dropna, holdout=holdout,
                                            seed=seed, batch_size=batch_size, first_row=first_row, progress=progress)
            finally:
                progress.close()
            partial.save(out)
            if json_out:
                typer.echo(dumps(_summary(partial, out), indent=2))
            else:
                typer.echo(f"wrote {out}: {partial_note(partial)}")

    @app.command()
    def merge(
        parts: Annotated[List[Path], typer.Argument(help="Statistics files written by `onnx-esvd capture` (or "
                                                         "merged before).", show_default=False)],
        output: Annotated[Path, typer.Option("-o", "--output", help="The merged statistics file to write (.npz).",
                                             show_default=False)],
        force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
        json_out: JsonOpt = False,
        debug: DebugOpt = False,
    ) -> None:
        """Merge statistics files of the same model, layer, columns and options (refused otherwise)."""
        with handled(debug):
            from onnx_esvd._json import dumps
            from onnx_esvd.layer_pass import partial_note
            from onnx_esvd.modelio import check_output_path
            from onnx_esvd.shards import LayerPartial, merge_all

            out = check_output_path(output, inputs=parts, force=force)
            merged = merge_all(LayerPartial.load(p) for p in parts)
            merged.save(out)
            if json_out:
                typer.echo(dumps(_summary(merged, out), indent=2))
            else:
                typer.echo(f"wrote {out}: {partial_note(merged)}")


def _capture_dask(model, sources, layer, group, groups, target, features, score, dropna, holdout, seed, first_row,
                  batch_size, scheduler, progress):
    from onnx_esvd.rows import data_spec
    from onnx_esvd.engines.dask_engine import layer_pass_dask, require_dask
    from onnx_esvd.errors import OptionError

    require_dask()
    if first_row:
        raise OptionError("--first-row applies to --engine local; with --engine dask give every file of the data "
                          "set at once (a directory or glob)")
    spec = data_spec(group, groups, target, features, score, dropna)
    return layer_pass_dask(model, sources, layer, spec, holdout=holdout, seed=seed, batch_size=batch_size,
                           scheduler=scheduler, progress=progress)


def _summary(partial, out: Path) -> dict:
    return {"output": str(out), "model_sha256": partial.header["model_sha256"], "layer": partial.header["layer"],
            "rows": partial.rows, "ranges": partial.ranges, "sources": partial.sources,
            "groups": {lab: {"read": partial.seen.get(lab, 0), "fit": partial.fit_rows(lab)}
                       for lab in partial.labels},
            "skipped": partial.skipped, "dropped": partial.dropped}
