"""The metrics table printed by train, evaluate and the demo: per class, averages, then summary lines.

Reads one metrics dict, the JSON written to ``test_metrics.json`` / ``eval_<split>.json``:

- `cxrdist.stats.metrics.summarize` keys (required): ``num_samples``, ``accuracy``, ``balanced_accuracy``,
  ``macro_f1``, ``per_class`` {class: {precision, recall, specificity, f1, roc_auc, support}},
  ``macro`` / ``weighted`` {precision, recall, specificity, f1, roc_auc}; None prints as "-". Metric
  names and labels come from `cxrdist.stats.registry`.
- ``macro_over`` (optional): the classes the macro averages cover; when some class has no samples, a
  footnote under the table says which are left out.
- ``intervals`` (optional): `cxrdist.stats.uncertainty.bootstrap_intervals` output, the same nesting with
  ``[low, high]`` or None in place of each value, plus ``settings`` {resamples, seed, level, method}.
  Each value then shows its interval on a second line, ``[0.91, 0.98]`` (2 decimals), and the summary
  line shows them beside accuracy, balanced accuracy and macro F1.
- ``calibration`` (optional): `cxrdist.stats.calibration.calibration_report` output, {n_bins, temperature,
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

from cxrdist.stats.registry import AVERAGES, CLASS_METRICS, HEADLINE, label

COLUMNS = tuple(m.key for m in CLASS_METRICS)
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
    for m in CLASS_METRICS:
        table.add_column(m.short, justify="right")
    table.add_column("support", justify="right")
    for name in classes:
        row = metrics["per_class"][name]
        ci = intervals.get("per_class", {}).get(name, {})
        table.add_row(Text(name), *(_cell(row[c], ci.get(c)) for c in COLUMNS), str(row["support"]))
    table.add_section()
    total = str(metrics["num_samples"])
    for avg, avg_label in AVERAGES.items():
        row, ci = metrics[avg], intervals.get(avg, {})
        table.add_row(avg_label, *(_cell(row.get(c), ci.get(c)) for c in COLUMNS), total, style="bold")
    return table


def summary_lines(metrics: dict) -> list[str]:
    """The lines under the table: which classes the macro averages leave out (if any), headline metrics
    (with intervals), then calibration when present."""
    intervals = metrics.get("intervals") or {}
    headline = [(label(key), key) for key in HEADLINE]
    parts = [
        f"{name} {_fmt(metrics[key])} {_fmt_interval(intervals.get(key))}".rstrip() for name, key in headline
    ]
    lines = []
    left_out = macro_left_out(metrics)
    if left_out:
        lines.append(
            f"macro avg: over the {len(metrics['macro_over'])} classes with samples; left out, no samples "
            f"in this split: {', '.join(left_out)}"
        )
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
            f"{name} {_fmt(plain[key])} {_fmt_interval(plain_intervals.get(key))}".rstrip()
            for name, key in headline
        ]
        lines.append("without TTA: " + "   ".join(parts))
    subgroups = metrics.get("subgroups")
    for name, sub in (subgroups or {}).items():
        sub_intervals = sub.get("intervals") or {}
        parts = [
            f"{name} {_fmt(sub[key])} {_fmt_interval(sub_intervals.get(key))}".rstrip()
            for name, key in headline
        ]
        lines.append(f"subgroup {name} (n={sub['num_samples']}): " + "   ".join(parts))
    return lines


def macro_left_out(metrics: dict) -> list[str]:
    """The classes the macro averages leave out because the split has no samples of them, in class order
    (none when the dict predates ``macro_over``)."""
    over = metrics.get("macro_over")
    if over is None:
        return []
    return [name for name in metrics["per_class"] if name not in over]


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
