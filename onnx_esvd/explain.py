"""Where the disparity lives: the output metrics plus, for every repairable layer, the
explainable-SVD view of ALGORITHM.md (between-group gaps of the layer output's first and second
moments, their SVD bounds, and how concentrated they are), from one capture pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .capture import capture, capture_metrics, group_stats
from .rows import data_spec, open_rows, reader_notes, source_name
from .errors import OptionError
from .esvd import MomentGap, disparity_view
from .graph import LinearLayer, find_layers, read_weight
from .metrics import OutputMetrics
from .guards import outputs_finite
from .modelio import load_model
from .score import resolve_score


@dataclass(frozen=True)
class LayerAudit:
    """The explainable-SVD view of one layer.

    Attributes:
        layer: the linear node.
        first: mean gap ||W delta||^2 of the layer output, its bound sum sigma_i(W S)^2, ...
        second: covariance gap ||W D W^T||_F, its bound ||W S||_{S4}^2, ...
        score: first.relative + second.relative: how much of the layer output's within-group spread
            is between-group difference (dimensionless; higher means more disparity).
        rank: 1 for the layer with the highest score; None for a single-output final node, which the
            repair can only rescale (KS unchanged) and which has nothing downstream to refit.
    """

    layer: LinearLayer
    first: MomentGap
    second: MomentGap
    score: float
    rank: int | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.layer.to_dict(), "rank": self.rank, "score": self.score,
                "first_moment": self.first.to_dict(), "second_moment": self.second.to_dict()}


@dataclass(frozen=True)
class AuditResult:
    """Output metrics and the per-layer views, `layers` in graph order (see `ranked()`)."""

    score: str
    model: str
    data: str
    groups: tuple[str, ...]
    rows: int
    skipped: int
    metrics: OutputMetrics
    layers: tuple[LayerAudit, ...]
    refused: dict[str, str]
    top: int
    eps: float
    warnings: tuple[str, ...]
    group_column: str = ""

    def ranked(self) -> list[LayerAudit]:
        """Layers by rank (unranked ones last, in graph order)."""
        return sorted(self.layers, key=lambda a: (a.rank is None, a.rank or 0, a.layer.index))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "score": self.score, "groups": list(self.groups),
                "rows": {"total": self.rows, "skipped": self.skipped}, "metrics": self.metrics.to_dict(),
                "top": self.top, "eps": self.eps,
                "layers": [a.to_dict() for a in self.layers],
                "refused": [{"name": k, "reason": v} for k, v in self.refused.items()],
                "warnings": list(self.warnings)}


def audit(model: Any, data: Any, *, group: str, groups: Sequence[str] | None = None, target: str | None = None,
          features: Sequence[str] | None = None, score: str | None = None, eps: float = 1e-5, top: int = 3,
          batch_size: int = 4096, dropna: bool = False, weights: str = "size", bootstrap: int = 200, seed: int = 0,
          progress: Any = None, engine: Any = "local", scheduler: Any = None) -> AuditResult:
    """Measure the scored output's metrics and the explainable-SVD view of every repairable layer it depends on,
    in one pass.

    Every row of the two groups is used (no holdout). Memory: O(sum of the layer widths squared).
    """
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise OptionError(f"--eps {eps} is invalid; it must be a positive number (default 1e-5)")
    if not (isinstance(top, int) and top >= 1):
        raise OptionError(f"--top {top} is invalid; it must be a positive integer")
    spec = data_spec(group, groups, target, features, score, dropna, weights)
    loaded = load_model(model)
    scored = resolve_score(loaded.model, score)
    found = find_layers(loaded.model, scored.tensor)
    layers_in = [layer for layer in found.layers if layer.feeds_score]
    if engine != "local":  # the pass on the engine's workers (one task per file), merged here
        from .remote import capture_remote

        reader, partials, collector = capture_remote(engine, scheduler, loaded.model, data, spec, scored, layers_in,
                                                     batch_size=batch_size, seed=seed,
                                                     progress=progress or (lambda name, rows: None))
        outputs_finite(collector, source_name(model), scored.output)
        metrics = collector.result(reader.group_labels(), bootstrap=bootstrap, seed=seed)
        width = collector.width
        notes: list[str] = reader_notes(source_name(data), reader)

        def stats_of(layer: LinearLayer) -> Any:
            return partials[layer.index].to_group_stats(list(reader.group_labels()), notes)
    else:
        reader = open_rows(loaded.model, data, spec, batch_size=batch_size)
        cap = capture(loaded.model, layers_in, reader, 0.0, progress or (lambda name, rows: None), scored)
        outputs_finite(cap.report, source_name(model), scored.output)
        metrics = capture_metrics(cap, reader, bootstrap=bootstrap, seed=seed)
        width = cap.width
        notes = reader_notes(source_name(data), reader)

        def stats_of(layer: LinearLayer) -> Any:
            return group_stats(cap, layer, reader, notes)
    views = []
    for layer in layers_in:
        stats = stats_of(layer)
        first, second = disparity_view(read_weight(loaded.model, layer), stats, eps=eps, top=top, weights=weights)
        views.append((layer, first, second, first.relative + second.relative))
    # A single-output final node cannot be usefully repaired: W S has one singular value, so the repair
    # only rescales W on range(S), which leaves KS unchanged, and nothing downstream can be refitted.
    rankable = [i for i, (layer, *_rest) in enumerate(views) if not (layer.is_final and layer.out_features == 1)]
    order = sorted(rankable, key=lambda i: (-views[i][3], i))
    rank = {i: r + 1 for r, i in enumerate(order)}
    layers = tuple(LayerAudit(layer, first, second, score, rank.get(i))
                   for i, (layer, first, second, score) in enumerate(views))
    return AuditResult(score=scored.describe(width), model=source_name(model), data=source_name(data),
                       groups=reader.group_labels(),
                       rows=reader.total, skipped=reader.skipped, metrics=metrics, layers=layers,
                       refused=dict(found.refused), top=top, eps=float(eps), warnings=tuple(dict.fromkeys(notes)),
                       group_column=group)
