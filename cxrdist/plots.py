"""PNG plots a person would rather look at than read: confusion matrix, training curves, ROC, reliability.

Every function draws on its own matplotlib `Figure` with the Agg canvas (files only: no display, no
pyplot state, nothing to close), writes the PNG atomically (`shard_tools.files.atomic_write_bytes`) and
returns its path. Inputs are the JSON-able dicts and
dataclasses the metric modules produce: class order is manifest order throughout.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxrdist.stats.calibration import ece_from_bins
from cxrdist.stats.operating_points import ClassRoc
from shard_tools.files import atomic_write_bytes

DPI = 100
_POINT_MARKERS = ("o", "s", "^", "D", "v")  # one per operating-point target, in order


def _figure(**kwargs) -> Figure:
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)  # attaches itself: savefig renders with Agg
    return fig


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Counts and row-normalised recall per cell; rows are the true class, in manifest order."""
    k = len(classes)
    fig = _figure(figsize=(1.3 * k + 2, 1.3 * k + 1.5))
    ax = fig.subplots()
    row_sums = [max(sum(row), 1) for row in cm]
    frac = [[cm[i][j] / row_sums[i] for j in range(k)] for i in range(k)]
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            color = "white" if frac[i][j] > 0.5 else "black"
            ax.text(j, i, f"{cm[i][j]}\n{frac[i][j]:.0%}", ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(k), classes, rotation=30, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix (n={sum(map(sum, cm))})")
    return _save(fig, path)


# Validation curves: each its own line style and marker, so equal values stay visible (accuracy and
# balanced accuracy coincide on a balanced split).
CURVE_STYLES = (  # accuracy wide and pale underneath, the others thin on top of it
    (
        "accuracy",
        "val accuracy",
        {"linestyle": "-", "linewidth": 4, "alpha": 0.55, "marker": "o", "markersize": 10},
    ),
    (
        "balanced_accuracy",
        "val balanced accuracy",
        {"linestyle": "--", "linewidth": 1.5, "marker": "s", "markersize": 5, "markerfacecolor": "white"},
    ),
    ("macro_f1", "val macro F1", {"linestyle": ":", "linewidth": 1.5, "marker": "^", "markersize": 5}),
)


def curves_figure(rows: Sequence[dict]) -> Figure:
    """Loss (train, val) and validation accuracy / balanced accuracy / macro F1 per epoch, from
    metrics.jsonl rows; legends under the axes, where they cover no point. No rows (a run stopped
    before its first epoch ended) still draws a figure that says so."""
    fig = _figure(figsize=(10, 4.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    if rows:
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train loss")
        ax_loss.plot(epochs, [r["val"]["loss"] for r in rows], "s--", label="val loss")
        for key, label, style in CURVE_STYLES:
            values = [r["val"].get(key) for r in rows]
            if any(v is not None for v in values):
                ax_acc.plot(epochs, [float("nan") if v is None else v for v in values], label=label, **style)
        for ax in (ax_loss, ax_acc):
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=9, frameon=False)
            ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax_loss.text(0.5, 0.5, "no epoch finished", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylim(0, 1)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    return fig


def plot_curves(rows: Sequence[dict], path: Path) -> Path:
    """`curves_figure` as a PNG."""
    return _save(curves_figure(rows), path)


def plot_roc(roc_by_class: Mapping[str, ClassRoc | None], path: Path, title: str = "") -> Path:
    """Every class's one-vs-rest ROC curve on one figure, AUC in the legend, operating points marked.

    `roc_by_class`: `cxrdist.stats.operating_points.roc_curves` output (None for a class without a curve:
    listed in the legend as "no curve"). Markers: one shape per operating-point target, class colour.
    """
    fig = _figure(figsize=(6.4, 6.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    targets: dict[str, str] = {}  # target -> marker, in first-seen order
    for i, (name, roc) in enumerate(roc_by_class.items()):
        color = f"C{i % 10}"
        if roc is None:
            ax.plot([], [], color=color, label=f"{name}: no curve (class absent or alone)")
            continue
        ax.plot(roc.fpr, roc.tpr, color=color, linewidth=1.8, label=f"{name} (AUC {roc.auc:.3f})")
        for point in roc.points:
            marker = targets.setdefault(point["target"], _POINT_MARKERS[len(targets) % len(_POINT_MARKERS)])
            ax.plot(
                1 - point["specificity"],
                point["sensitivity"],
                marker=marker,
                markersize=7,
                markerfacecolor="white",
                markeredgecolor=color,
                markeredgewidth=1.6,
                linestyle="none",
            )
    for target, marker in targets.items():  # legend entries for the marker shapes, in black
        ax.plot([], [], marker=marker, color="black", markerfacecolor="white", linestyle="none", label=target)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(title or "ROC, one class vs rest")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _bin_bars(ax, bins: dict, offset: float, width: float, color: str, label: str) -> None:
    """Accuracy per non-empty bin as bars, shifted by `offset` bin widths inside each bin."""
    edges = bins["edges"]
    lefts = [edges[i] + offset * (edges[i + 1] - edges[i]) for i in range(len(bins["count"]))]
    widths = [width * (edges[i + 1] - edges[i]) for i in range(len(bins["count"]))]
    shown = [i for i, n in enumerate(bins["count"]) if n]
    ax.bar(
        [lefts[i] for i in shown],
        [bins["accuracy"][i] for i in shown],
        width=[widths[i] for i in shown],
        align="edge",
        color=color,
        alpha=0.75,
        edgecolor="black",
        linewidth=0.5,
        label=label,
    )
    # The exact (mean confidence, accuracy) of each bin; the bar only says which bin it is.
    ax.plot(
        [bins["confidence"][i] for i in shown],
        [bins["accuracy"][i] for i in shown],
        marker=".",
        color="black",
        markersize=4,
        linestyle="none",
    )


def reliability_figure(bins: dict, title: str = "", bins_after: dict | None = None) -> Figure:
    """Reliability diagram: accuracy against mean confidence per bin, ECE in the legend.

    `bins` (and `bins_after`, the same split after temperature scaling, drawn beside it): the dicts of
    `cxrdist.stats.calibration.reliability_bins`. A lower panel shows how many predictions fall in each bin;
    bars on the diagonal are perfectly calibrated, bars below it over-confident. The legend sits above
    the axes: inside, it covered the bars of whichever corner it was put in.
    """
    fig = _figure(figsize=(6.4, 7.4))
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1, label="perfect calibration")
    sets = [("before temperature" if bins_after else "model", bins, "C0")]
    if bins_after:
        sets.append(("after temperature", bins_after, "C1"))
    width = 1.0 / len(sets)
    for i, (name, b, color) in enumerate(sets):
        ece = ece_from_bins(b)
        label = f"{name} (ECE {ece:.3f})" if ece is not None else f"{name} (no samples)"
        _bin_bars(ax, b, i * width, width, color, label)
        edges = b["edges"]
        centers = [(edges[j] + edges[j + 1]) / 2 for j in range(len(b["count"]))]
        ax_count.bar(
            [c + (i - (len(sets) - 1) / 2) * width / len(b["count"]) for c in centers],
            b["count"],
            width=width / len(b["count"]),
            color=color,
            alpha=0.75,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    fig.suptitle(title or "reliability (top-label confidence)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncol=2, fontsize=9, frameon=False, borderaxespad=0)
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("predictions")
    ax_count.grid(alpha=0.3)
    return fig


def plot_reliability(bins: dict, path: Path, title: str = "", bins_after: dict | None = None) -> Path:
    """`reliability_figure` as a PNG."""
    return _save(reliability_figure(bins, title, bins_after), path)
