"""The fairness gate: measure a model's output metrics and compare them with thresholds.

Needs numpy, onnx and onnxruntime only (no scipy), so that `onnx-esvd check` starts fast.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .capture import (Progress, capture, capture_metrics, check_groups_present, data_spec, open_rows, source_name)
from .errors import OptionError
from .guards import outputs_finite
from .metrics import OutputMetrics
from .modelio import load_model
from .score import resolve_score

#: Metrics a threshold can be set on, in report order (the keys `repair --json` uses too).
METRICS = ("ks", "mean_gap", "mse", "mae")


@dataclass(frozen=True)
class ThresholdResult:
    """One threshold: `passed` when `value <= threshold` (a NaN value fails)."""

    metric: str
    value: float
    threshold: float

    @property
    def passed(self) -> bool:
        return not math.isnan(self.value) and self.value <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "threshold": self.threshold, "passed": self.passed}


@dataclass(frozen=True)
class Measured:
    """Output metrics of a model on every row of the two groups, with the row counts."""

    metrics: OutputMetrics
    groups: tuple[str, str]
    rows: int
    skipped: int
    score: str = ""


@dataclass(frozen=True)
class CheckResult:
    """The metrics and the verdict of every threshold."""

    model: str
    data: str
    measured: Measured
    thresholds: tuple[ThresholdResult, ...]

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.thresholds)

    @property
    def metrics(self) -> OutputMetrics:
        return self.measured.metrics

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "score": self.measured.score, "passed": self.passed,
                "groups": list(self.measured.groups),
                "rows": {"total": self.measured.rows, "skipped": self.measured.skipped},
                "metrics": self.metrics.to_dict(), "thresholds": [t.to_dict() for t in self.thresholds]}

    def junit_xml(self, seconds: float = 0.0) -> str:
        """A JUnit XML report: one test case per threshold, failures for the thresholds exceeded."""
        failures = sum(not t.passed for t in self.thresholds)
        suites = ET.Element("testsuites", name="onnx-esvd check", tests=str(len(self.thresholds)),
                            failures=str(failures), errors="0", time=f"{seconds:.3f}")
        suite = ET.SubElement(suites, "testsuite", name=f"onnx-esvd check {Path(self.model).name}",
                              tests=str(len(self.thresholds)), failures=str(failures), errors="0", skipped="0",
                              time=f"{seconds:.3f}")
        props = ET.SubElement(suite, "properties")
        for key, value in (("model", self.model), ("data", self.data), ("score", self.measured.score),
                           ("group_0", self.measured.groups[0]),
                           ("group_1", self.measured.groups[1]), ("rows", str(self.measured.rows))):
            ET.SubElement(props, "property", name=key, value=value)
        for t in self.thresholds:
            case = ET.SubElement(suite, "testcase", classname="onnx_esvd.check", name=f"{t.metric} <= {t.threshold:g}",
                                 time="0")
            if not t.passed:
                failure = ET.SubElement(case, "failure", type="ThresholdExceeded",
                                        message=f"{t.metric} = {t.value:.6g} exceeds {t.threshold:g}")
                failure.text = (f"{t.metric} of {self.model} on {self.data} is {t.value:.6g}, above the threshold "
                                f"{t.threshold:g} ({self.measured.groups[0]!r} vs {self.measured.groups[1]!r})")
        ET.indent(suites)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def measure(model: Any, data: Any, *, group: str, groups: Sequence[str] | None = None, target: str | None = None,
            features: Sequence[str] | None = None, score: str | None = None, batch_size: int = 4096,
            dropna: bool = False, progress: Progress | None = None) -> Measured:
    """Run the model over every row of the two groups and compute the scored output's metrics."""
    spec = data_spec(group, groups, target, features, score, dropna)
    loaded = load_model(model)
    scored = resolve_score(loaded.model, score)
    reader = open_rows(loaded.model, data, spec, batch_size=batch_size)
    cap = capture(loaded.model, [], reader, 0.0, progress or (lambda name, rows: None), scored)
    check_groups_present(cap, reader)
    outputs_finite(cap.report, source_name(model), scored.output)
    return Measured(capture_metrics(cap, reader), reader.group_labels(), reader.total, reader.skipped,
                    scored.describe(cap.width))


def check(model: Any, data: Any, *, group: str, groups: Sequence[str] | None = None, target: str | None = None,
          features: Sequence[str] | None = None, score: str | None = None, max_ks: float | None = None,
          max_mean_gap: float | None = None,
          max_mse: float | None = None, max_mae: float | None = None, batch_size: int = 4096,
          dropna: bool = False, progress: Progress | None = None) -> CheckResult:
    """Measure the model on the data and compare each metric with its threshold (value <= threshold passes).

    At least one threshold is required; `max_mse` and `max_mae` need a `target` column.
    """
    limits = {"ks": max_ks, "mean_gap": max_mean_gap, "mse": max_mse, "mae": max_mae}
    given = {k: v for k, v in limits.items() if v is not None}
    if not given:
        raise OptionError("give at least one threshold: --max-ks, --max-mean-gap, --max-mse or --max-mae")
    for key, value in given.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise OptionError(f"--max-{key.replace('_', '-')} {value} is invalid; it must be a number >= 0")
        if key in ("mse", "mae") and target is None:
            raise OptionError(f"--max-{key} needs the label column: add --target COL")
    measured = measure(model, data, group=group, groups=groups, target=target, features=features, score=score,
                       batch_size=batch_size, dropna=dropna, progress=progress)
    values = measured.metrics.to_dict()
    results = tuple(ThresholdResult(k, float("nan") if values[k] is None else float(values[k]), float(v))
                    for k, v in given.items())
    return CheckResult(model=source_name(model), data=source_name(data), measured=measured, thresholds=results)
