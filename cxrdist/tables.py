"""The metrics table printed by train, evaluate and the demo: per class, averages, then summary lines.

Reads one metrics dict, the JSON written to ``test_metrics.json`` / ``eval_<split>.json``:

- `cxrdist.metrics.summarize` keys (required): ``num_samples``, ``accuracy``, ``balanced_accuracy``,
  ``macro_f1``, ``per_class`` {class: {precision, recall, specificity, f1, roc_auc, support}},
  ``macro`` / ``weighted`` {precision, recall, specificity, f1, roc_auc}; None prints as "-".
- ``intervals`` (optional): `cxrdist.uncertainty.bootstrap_intervals` output, the same nesting with
  ``[low, high]`` or None in place of each value, plus ``settings`` {resamples, seed, level, method}.
  Each value then shows its interval on a second line, ``[0.91, 0.98]`` (2 decimals), and the summary
  line shows them beside accuracy, balanced accuracy and macro F1.
- ``calibration`` (optional): `cxrdist.calibration.calibration_report` output, {n_bins, temperature,
  before {ece, brier, nll, bins}, after {...} or None}, optionally with ``temperature_fitted_on`` (the
  split name). Printed as one line: ECE and Brier, before -> after temperature scaling.

``without_tta`` (optional, evaluated with TTA): the plain view's headline metrics, one line.
``subgroups`` (optional): {name: metrics with intervals}, one line each.
``operating_points`` (if present) is not printed: it lives in the JSON and on the ROC plot.
Everything fits in 110 columns (class names up to 15 characters, as "Viral Pneumonia").
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

COLUMNS = ("precision", "recall", "specificity", "f1", "roc_auc")
WIDTH = 110  # columns the table is laid out for (104 with intervals)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_interval(interval: Sequence[float] | None) -> str:
    return "" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _cell(value: float | None, interval: Sequence[float] | None) -> Text:
    """The value, and under it its interval in dim type when there is one (plain text, never markup)."""
    text = Text(_fmt(value))
    if interval is not None:
        text.append("\n" + _fmt_interval(interval), style="dim")
    return text


def metrics_table(metrics: dict, classes: Sequence[str], title: str = "") -> Table:
    """Rows per class, then macro and weighted averages; '-' where a value is undefined (null).

    With ``metrics["intervals"]`` each value carries its interval on a second line.
    """
    intervals = metrics.get("intervals") or {}
    table = Table(title=title or None, title_justify="left")
    table.add_column("class")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    table.add_column("support", justify="right")
    for name in classes:
        row = metrics["per_class"][name]
        ci = intervals.get("per_class", {}).get(name, {})
        table.add_row(Text(name), *(_cell(row[c], ci.get(c)) for c in COLUMNS), str(row["support"]))
    table.add_section()
    total = str(metrics["num_samples"])
    for avg in ("macro", "weighted"):
        row, ci = metrics[avg], intervals.get(avg, {})
        table.add_row(f"{avg} avg", *(_cell(row.get(c), ci.get(c)) for c in COLUMNS), total, style="bold")
    return table


def summary_lines(metrics: dict) -> list[str]:
    """The lines under the table: headline metrics (with intervals), then calibration when present."""
    intervals = metrics.get("intervals") or {}
    headline = [
        ("accuracy", "accuracy"),
        ("balanced accuracy", "balanced_accuracy"),
        ("macro F1", "macro_f1"),
    ]
    parts = [
        f"{label} {_fmt(metrics[key])} {_fmt_interval(intervals.get(key))}".rstrip()
        for label, key in headline
    ]
    lines = []
    settings = intervals.get("settings")
    if settings:
        lines.append("   ".join(parts))
        lines.append(
            f"samples {metrics['num_samples']}   {settings['level']:.0%} intervals: {settings['method']}, "
            f"{settings['resamples']} resamples, seed {settings['seed']}"
        )
    else:
        lines.append("   ".join([*parts, f"samples {metrics['num_samples']}"]))
    calibration = metrics.get("calibration")
    if calibration:
        before, after = calibration["before"], calibration.get("after")
        line = f"calibration: ECE {_fmt(before['ece'])}"
        if after:
            fitted_on = calibration.get("temperature_fitted_on")
            where = f", fitted on {fitted_on}" if fitted_on else ""
            line += f" -> {_fmt(after['ece'])} (temperature {calibration['temperature']:.3f}{where})"
        line += f"   Brier {_fmt(before['brier'])}"
        if after:
            line += f" -> {_fmt(after['brier'])}"
        lines.append(line)
    plain = metrics.get("without_tta")
    if plain:  # evaluated with TTA: the plain view beside it, so the user sees whether TTA helps
        plain_intervals = plain.get("intervals") or {}
        parts = [
            f"{label} {_fmt(plain[key])} {_fmt_interval(plain_intervals.get(key))}".rstrip()
            for label, key in headline
        ]
        lines.append("without TTA: " + "   ".join(parts))
    subgroups = metrics.get("subgroups")
    for name, sub in (subgroups or {}).items():
        sub_intervals = sub.get("intervals") or {}
        parts = [
            f"{label} {_fmt(sub[key])} {_fmt_interval(sub_intervals.get(key))}".rstrip()
            for label, key in headline
        ]
        lines.append(f"subgroup {name} (n={sub['num_samples']}): " + "   ".join(parts))
    return lines


def print_metrics_table(metrics: dict, classes: Sequence[str], console: Console, title: str = "") -> None:
    """The table and its summary lines. A terminal keeps its width; a log file or pipe (where rich
    assumes 80 columns) is printed at `WIDTH` columns, so each interval stays on one line."""
    width = console.width
    if not console.is_terminal and width < WIDTH:
        console.width = WIDTH  # rich's print(width=...) can only narrow; restored below
    try:
        console.print(metrics_table(metrics, classes, title))
        for line in summary_lines(metrics):
            console.print(line, highlight=False, markup=False)
    finally:
        console.width = width
