"""Plots a person would rather look at than read: confusion matrix and training curves.

matplotlib is an optional extra (`pip install cxrdist[plots]`); without it these return None and the
caller says so once, instead of failing a finished run.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from cxrdist.artifacts import atomic_write_bytes


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_confusion(
    cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = ""
) -> Path | None:
    """Counts and row-normalised recall per cell; rows are the true class, in manifest order."""
    plt = _pyplot()
    if plt is None:
        return None
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.3 * k + 2, 1.3 * k + 1.5))
    try:
        row_sums = [max(sum(row), 1) for row in cm]
        frac = [[cm[i][j] / row_sums[i] for j in range(k)] for i in range(k)]
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                color = "white" if frac[i][j] > 0.5 else "black"
                ax.text(
                    j, i, f"{cm[i][j]}\n{frac[i][j]:.0%}", ha="center", va="center", color=color, fontsize=9
                )
        ax.set_xticks(range(k), classes, rotation=30, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title or f"confusion matrix (n={sum(map(sum, cm))})")
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_curves(rows: Sequence[dict], path: Path) -> Path | None:
    """Loss (train, val) and validation accuracy / macro-F1 per epoch, from metrics.jsonl rows."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    try:
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
        ax_loss.plot(epochs, [r["val"]["loss"] for r in rows], "o-", label="val")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            ax_acc.plot(epochs, [r["val"][key] for r in rows], "o-", label=f"val {key}")
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylim(0, 1)
        ax_acc.legend(loc="lower right")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)
