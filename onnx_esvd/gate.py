"""The fairness gate: measure a model's output metrics and compare them with thresholds.

Needs numpy, onnx and onnxruntime only (no scipy), so that `onnx-esvd check` starts fast.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .capture import Progress, capture, capture_metrics, check_groups_present
from .rows import data_spec, open_rows, reader_notes, source_name
from .errors import OptionError
from .guards import outputs_finite
from .metrics import OutputMetrics
from .modelio import load_model
from .score import resolve_score

#: Metrics a threshold can be set on, in report order (the keys `repair --json` uses too).
METRICS = ("ks", "mean_gap", "mse", "mae")


@dataclass(frozen=True)
class ThresholdResult:
    """One threshold: `passed` when `value <= threshold` (a NaN value fails).

    `value` is what was compared: the point value, or with `compared == "upper"` the upper end of the 95%
    bootstrap interval; `point` and `interval` are kept for reports. `ks_increase` compares the KS minus the
    baseline model's KS on the same rows.
    """

    metric: str
    value: float
    threshold: float
    point: float | None = None
    interval: tuple[float, float] | None = None
    compared: str = "point"

    @property
    def passed(self) -> bool:
        return not math.isnan(self.value) and self.value <= self.threshold

    def describe(self) -> str:
        """`ks = 0.1416 [0.10, 0.19], upper 0.19 <= 0.15`-style text for reports and JUnit."""
        point = self.value if self.point is None else self.point
        text = f"{self.metric} = {point:.6g}"
        if self.interval is not None:
            text += f" (95% CI {self.interval[0]:.6g} .. {self.interval[1]:.6g})"
        if self.compared == "upper":
            text += f", upper end {self.value:.6g}"
        return text + f" {'<=' if self.passed else '>'} {self.threshold:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "threshold": self.threshold, "passed": self.passed,
                "compared": self.compared, "point": self.value if self.point is None else self.point,
                "interval": None if self.interval is None else list(self.interval)}


@dataclass(frozen=True)
class Measured:
    """Output metrics of a model on every row of the two groups, with the row counts."""

    metrics: OutputMetrics
    groups: tuple[str, ...]
    rows: int
    skipped: int
    score: str = ""
    group_column: str = ""
    warnings: tuple[str, ...] = ()  # how the data was read (inputs fed by position, rows dropped)


@dataclass(frozen=True)
class CheckResult:
    """The metrics and the verdict of every threshold."""

    model: str
    data: str
    measured: Measured
    thresholds: tuple[ThresholdResult, ...]
    baseline: Measured | None = None
    baseline_model: str | None = None

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
                "metrics": self.metrics.to_dict(), "thresholds": [t.to_dict() for t in self.thresholds],
                "baseline": None if self.baseline is None else {"model": self.baseline_model,
                                                                "metrics": self.baseline.metrics.to_dict()},
                "warnings": list(self.measured.warnings)}

    def junit_xml(self, seconds: float = 0.0) -> str:
        """A JUnit XML report: one test case per threshold, failures for the thresholds exceeded."""
        failures = sum(not t.passed for t in self.thresholds)
        suites = ET.Element("testsuites", name="onnx-esvd check", tests=str(len(self.thresholds)),
                            failures=str(failures), errors="0", time=f"{seconds:.3f}")
        suite = ET.SubElement(suites, "testsuite", name=f"onnx-esvd check {Path(self.model).name}",
                              tests=str(len(self.thresholds)), failures=str(failures), errors="0", skipped="0",
                              time=f"{seconds:.3f}")
        props = ET.SubElement(suite, "properties")
        m = self.measured
        for key, value in (("model", self.model), ("data", self.data), ("score", m.score),
                           ("groups", ", ".join(m.groups)), ("rows", str(m.rows)),
                           ("ks_pair", " vs ".join(m.metrics.ks_pair)),
                           ("noise_floor", f"{m.metrics.noise_floor:.6g}")):
            ET.SubElement(props, "property", name=key, value=value)
        if self.baseline_model is not None:
            ET.SubElement(props, "property", name="baseline", value=self.baseline_model)
        for t in self.thresholds:
            compared = "upper 95% bound of " if t.compared == "upper" else ""
            case = ET.SubElement(suite, "testcase", classname="onnx_esvd.check",
                                 name=f"{compared}{t.metric} <= {t.threshold:g}", time="0")
            ET.SubElement(case, "system-out").text = t.describe()
            if not t.passed:
                failure = ET.SubElement(case, "failure", type="ThresholdExceeded",
                                        message=f"{t.metric} = {t.value:.6g} exceeds {t.threshold:g}")
                failure.text = (f"{t.describe()}: {self.model} on {self.data}, groups {', '.join(m.groups)}")
        ET.indent(suites)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def measure(model: Any, data: Any, *, group: str, groups: Sequence[str] | None = None, target: str | None = None,
            features: Sequence[str] | None = None, score: str | None = None, batch_size: int = 4096,
            dropna: bool = False, bootstrap: int = 0, seed: int = 0, progress: Progress | None = None,
            engine: Any = "local", scheduler: Any = None) -> Measured:
    """Run the model over every row of the two groups and compute the scored output's metrics. `engine`: "local",
    "dask" (one task per data file on a Dask cluster; `scheduler` an address or Client) or an engine callable
    (see `passes.Engine`)."""
    spec = data_spec(group, groups, target, features, score, dropna)
    loaded = load_model(model)
    scored = resolve_score(loaded.model, score)
    if engine != "local":
        from .remote import capture_remote

        rows, _, collector = capture_remote(engine, scheduler, loaded.model, data, spec, scored, batch_size=batch_size,
                                            seed=seed, progress=progress or (lambda name, n: None))
        outputs_finite(collector, source_name(model), scored.output)
        metrics = collector.result(rows.group_labels(), bootstrap=bootstrap, seed=seed)
        return Measured(metrics, rows.group_labels(), rows.total, rows.skipped, scored.describe(collector.width),
                        spec.group, tuple(reader_notes(source_name(data), rows)))
    reader = open_rows(loaded.model, data, spec, batch_size=batch_size)
    cap = capture(loaded.model, [], reader, 0.0, progress or (lambda name, rows: None), scored)
    check_groups_present(cap, reader)
    outputs_finite(cap.report, source_name(model), scored.output)
    return Measured(capture_metrics(cap, reader, bootstrap=bootstrap, seed=seed), reader.group_labels(),
                    reader.total, reader.skipped, scored.describe(cap.width), spec.group,
                    tuple(reader_notes(source_name(data), reader)))


def check(model: Any, data: Any, *, group: str, groups: Sequence[str] | None = None, target: str | None = None,
          features: Sequence[str] | None = None, score: str | None = None, max_ks: float | None = None,
          max_mean_gap: float | None = None, max_mse: float | None = None, max_mae: float | None = None,
          baseline: Any = None, max_ks_increase: float | None = None, confidence: str = "point",
          bootstrap: int = 200, seed: int = 0, batch_size: int = 4096, dropna: bool = False,
          progress: Progress | None = None, engine: Any = "local", scheduler: Any = None) -> CheckResult:
    """Measure the model on the data and compare each metric with its threshold (value <= threshold passes).

    At least one threshold is required; `max_mse` and `max_mae` need a `target` column. With
    `confidence="upper"` the upper end of each metric's 95% bootstrap interval is compared instead of the point
    value (MAE has no interval: its point value is compared). `baseline` (a model) with `max_ks_increase` fails
    when the KS exceeds the baseline model's KS on the same rows by more than that.
    """
    limits = {"ks": max_ks, "mean_gap": max_mean_gap, "mse": max_mse, "mae": max_mae,
              "ks_increase": max_ks_increase}
    given = {k: v for k, v in limits.items() if v is not None}
    if not given:
        raise OptionError("give at least one threshold: --max-ks, --max-mean-gap, --max-mse, --max-mae or "
                          "--max-ks-increase")
    for key, value in given.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise OptionError(f"--max-{key.replace('_', '-')} {value} is invalid; it must be a number >= 0")
        if key in ("mse", "mae") and target is None:
            raise OptionError(f"--max-{key} needs the label column: add --target COL")
    if (baseline is None) != (max_ks_increase is None):
        raise OptionError("--baseline and --max-ks-increase go together: the gate compares the KS with the baseline "
                          "model's KS on the same rows")
    if confidence not in ("point", "upper"):
        raise OptionError(f"--confidence {confidence!r} is invalid; choose point or upper")
    if confidence == "upper" and not bootstrap:
        raise OptionError("--confidence upper compares the upper end of the bootstrap interval: give --bootstrap N "
                          "with N > 0")
    options = dict(group=group, groups=groups, target=target, features=features, score=score,
                   batch_size=batch_size, dropna=dropna, bootstrap=bootstrap, seed=seed, engine=engine,
                   scheduler=scheduler)
    measured = measure(model, data, progress=progress, **options)
    base = measure(baseline, data, progress=progress, **options) if baseline is not None else None
    values = measured.metrics.to_dict()
    intervals = measured.metrics.intervals
    results = []
    for key, limit in given.items():
        if key == "ks_increase":
            point = float(measured.metrics.ks - base.metrics.ks)
            results.append(ThresholdResult(key, point, float(limit)))
            continue
        point = float("nan") if values[key] is None else float(values[key])
        iv = intervals.get(key)
        iv = None if iv is None else (float(iv[0]), float(iv[1]))
        upper = confidence == "upper" and iv is not None
        results.append(ThresholdResult(key, iv[1] if upper else point, float(limit), point, iv,
                                       "upper" if upper else "point"))
    return CheckResult(model=source_name(model), data=source_name(data), measured=measured, thresholds=tuple(results),
                       baseline=base, baseline_model=None if baseline is None else source_name(baseline))
