"""cxrdist.tables: the terminal table with and without intervals and calibration, within 110 columns."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from rich.console import Console
from scoregen import CLASSES, K, fake_logits

from cxrdist.stats.calibration import calibration_report, fit_temperature
from cxrdist.stats.metrics import confusion_matrix, summarize
from cxrdist.stats.registry import CLASS_METRICS
from cxrdist.stats.uncertainty import bootstrap_intervals
from cxrdist.tables import WIDTH, metrics_table, print_metrics_table, summary_lines


def _metrics(n: int = 240, seed: int = 0, present: int = K) -> tuple[dict, np.ndarray, np.ndarray]:
    logits, labels = fake_logits(n, seed, scale=3, present=present)
    logits[:, present:] -= 100  # absent classes are never predicted either
    p, y = torch.from_numpy(logits).softmax(1), torch.from_numpy(labels)
    return summarize(confusion_matrix(p.argmax(1), y, K), CLASSES, p, y), logits, labels


def render(metrics: dict, width: int = 80) -> list[str]:
    """What a log file receives (not a terminal: rich would assume `width` columns)."""
    out = io.StringIO()
    print_metrics_table(
        metrics, CLASSES, Console(file=out, width=width, color_system=None), title="test split"
    )
    return out.getvalue().splitlines()


def test_plain_table_is_unchanged_without_intervals():
    metrics, _, _ = _metrics()
    lines = render(metrics)
    text = "\n".join(lines)
    for name in CLASSES:
        row = metrics["per_class"][name]
        line = next(ln for ln in lines if ln.startswith(f"│ {name} "))
        assert (
            f"{row['precision']:.4f}" in line
            and f"{row['roc_auc']:.4f}" in line
            and str(row["support"]) in line
        )
    assert "[" not in text  # no intervals to show
    assert "left out" not in text  # every class has samples: no footnote
    header = next(ln for ln in lines if ln.startswith("┃ class "))
    assert [c.strip() for c in header.split("┃")[2:-2]] == [m.short for m in CLASS_METRICS]
    assert lines[-1] == (
        f"accuracy {metrics['accuracy']:.4f}   balanced accuracy {metrics['balanced_accuracy']:.4f}   "
        f"macro F1 {metrics['macro_f1']:.4f}   samples {metrics['num_samples']}"
    )


def test_intervals_and_calibration_within_110_columns():
    metrics, logits, labels = _metrics()
    metrics["intervals"] = bootstrap_intervals(logits, labels, CLASSES, resamples=200, seed=1)
    metrics["calibration"] = calibration_report(logits, labels, fit_temperature(logits, labels))
    metrics["calibration"]["temperature_fitted_on"] = "val"
    json.dumps(metrics, allow_nan=False)  # the layout evaluate writes stays JSON
    lines = render(metrics, width=80)  # a log: widened to WIDTH
    assert max(map(len, lines)) <= WIDTH
    assert max(map(len, lines)) > 100  # it was widened: at 80 columns the intervals would wrap
    assert "…" not in "\n".join(lines)  # nothing truncated
    iv = metrics["intervals"]
    for name in CLASSES:
        value_line = next(i for i, ln in enumerate(lines) if ln.startswith(f"│ {name} "))
        point, (low, high) = metrics["per_class"][name]["recall"], iv["per_class"][name]["recall"]
        assert f"{point:.4f}" in lines[value_line]
        assert f"[{low:.2f}, {high:.2f}]" in lines[value_line + 1]  # the interval sits under its value
    acc, (low, high) = metrics["accuracy"], iv["accuracy"]
    assert lines[-3].startswith(f"accuracy {acc:.4f} [{low:.2f}, {high:.2f}]   balanced accuracy ")
    assert lines[-2] == "samples 240   95% intervals: stratified percentile bootstrap, 200 resamples, seed 1"
    cal = metrics["calibration"]
    assert lines[-1] == (
        f"calibration: ECE {cal['before']['ece']:.4f} -> {cal['after']['ece']:.4f} "
        f"(temperature {cal['temperature']:.3f}, fitted on val)   "
        f"Brier {cal['before']['brier']:.4f} -> {cal['after']['brier']:.4f}"
    )


def test_undefined_values_and_missing_intervals_print_as_dashes():
    metrics, logits, labels = _metrics(present=3)  # Viral Pneumonia absent
    metrics["intervals"] = bootstrap_intervals(logits, labels, CLASSES, resamples=100)
    lines = render(metrics, width=WIDTH)
    absent = next(i for i, ln in enumerate(lines) if ln.startswith("│ Viral Pneumonia "))
    cells = [c.strip() for c in lines[absent].split("│")[2:-1]]
    # precision and f1 undefined (never predicted, no support), specificity 1, AUC undefined, support 0
    assert cells == ["-", "-", "1.0000", "-", "-", "0"]
    assert "[1.00, 1.00]" in lines[absent + 1]  # specificity is defined in every resample
    # The macro averages leave it out, and the line under the table says so (issue 21).
    footnote = "macro avg: over the 3 classes with samples; left out, no samples in this split: "
    assert footnote + "Viral Pneumonia" in lines
    assert max(map(len, lines)) <= WIDTH
    macro = next(ln for ln in lines if ln.startswith("│ macro avg "))
    present = [metrics["per_class"][c]["specificity"] for c in CLASSES[:3]]
    assert f"{sum(present) / 3:.4f}" in macro  # macro specificity without the absent class's 1.0
    # Calibration without a temperature: the "before" values alone.
    metrics["calibration"] = calibration_report(logits, labels)
    assert summary_lines(metrics)[-1] == (
        f"calibration: ECE {metrics['calibration']['before']['ece']:.4f}   "
        f"Brier {metrics['calibration']['before']['brier']:.4f}"
    )


def test_class_names_are_text_not_markup():
    metrics, _, _ = _metrics()
    metrics["per_class"]["[bold]x[/bold]"] = metrics["per_class"].pop("COVID")
    out = io.StringIO()
    Console(file=out, width=WIDTH).print(metrics_table(metrics, ("[bold]x[/bold]", *CLASSES[1:])))
    assert "[bold]x[/bold]" in out.getvalue()
