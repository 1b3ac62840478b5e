"""The per-class metrics table printed by train, evaluate and the demo."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

COLUMNS = ("precision", "recall", "specificity", "f1", "roc_auc")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def metrics_table(metrics: dict, classes: Sequence[str], title: str = "") -> Table:
    """Rows per class, then macro and weighted averages; '-' where a value is undefined (null)."""
    table = Table(title=title or None, title_justify="left")
    table.add_column("class")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    table.add_column("support", justify="right")
    for name in classes:
        row = metrics["per_class"][name]
        table.add_row(name, *(_fmt(row[c]) for c in COLUMNS), str(row["support"]))
    table.add_section()
    total = str(metrics["num_samples"])
    for avg in ("macro", "weighted"):
        row = metrics[avg]
        table.add_row(f"{avg} avg", *(_fmt(row.get(c)) for c in COLUMNS), total, style="bold")
    return table


def print_metrics_table(metrics: dict, classes: Sequence[str], console: Console, title: str = "") -> None:
    console.print(metrics_table(metrics, classes, title))
    console.print(
        f"accuracy {metrics['accuracy']:.4f}   balanced accuracy {metrics['balanced_accuracy']:.4f}   "
        f"macro F1 {metrics['macro_f1']:.4f}   samples {metrics['num_samples']}",
        highlight=False,
    )


def print_problem(console: Console, message: object, label: str = "error", style: str = "red") -> None:
    """`label: message` with the message printed literally (paths and '[train]' are not markup)."""
    console.print(
        f"[{style}]{escape(label)}:[/{style}] {escape(str(message))}", highlight=False, soft_wrap=True
    )
