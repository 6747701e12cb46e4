"""Figures of a run: the confusion matrix and the training curves, as PNG files.

Drawn with matplotlib's object API on an Agg canvas, so importing or calling these never
touches pyplot's global state or needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def confusion_png(
    confusion: np.ndarray | Sequence[Sequence[int]],
    classes: Sequence[str],
    path: Path,
    title: str = "",
) -> Path:
    """Draw a confusion matrix: counts and row-normalised percentages in each cell.

    Args:
        confusion: [C, C] counts, rows true class, columns predicted.
        classes: Class names, index order.
        path: PNG file to write.
        title: Figure title.

    Returns:
        `path`.
    """
    cm = np.asarray(confusion, np.int64)
    if cm.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(classes)} classes")
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    side = max(4.0, 0.9 * len(classes) + 2.5)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=list(classes), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels=list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    font = 8 if len(classes) <= 7 else 6
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if share[i, j] > 0.5 else "black"
            text = f"{cm[i, j]}\n{100 * share[i, j]:.1f}%"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=font)
    ax.set_title(title or f"confusion (n = {int(cm.sum())})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def curves_png(
    histories: Sequence[Sequence[dict[str, Any]]], path: Path, metric: str, title: str = ""
) -> Path:
    """Draw the training loss and a metric per epoch, one line per fold.

    Args:
        histories: Per fold, the epoch log lines (each with `epoch`, `loss` and `metric`).
        path: PNG file to write.
        metric: Key of the metric to plot (e.g. `val_accuracy`).
        title: Figure title.

    Returns:
        `path`.
    """
    fig = _figure(9.0, 3.6)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for k, history in enumerate(histories):
        epochs = [line["epoch"] for line in history]
        ax_loss.plot(epochs, [line["loss"] for line in history], marker=".", label=f"fold {k}")
        values = [line.get(metric, float("nan")) for line in history]
        ax_metric.plot(epochs, values, marker=".", label=f"fold {k}")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(metric.replace("_", " "))
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if histories:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path
