"""The loss curve: train loss per step and eval loss per step from a Trainer's `log_history`, as a PNG.

matplotlib is imported inside the function and drawn through its object API on an Agg canvas, never through
pyplot, so importing chatsft costs nothing and never switches the backend of a caller's interactive session.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path


def loss_points(log_history: Iterable[Mapping], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` ("loss" or "eval_loss") in a Trainer log history, in step order."""
    points = sorted((int(e["step"]), float(e[key])) for e in log_history if key in e and "step" in e)
    return [s for s, _ in points], [v for _, v in points]


def plot_loss(log_history: Iterable[Mapping], path: str | os.PathLike, title: str = "Training loss") -> Path:
    """Draw the train loss (and the eval loss, when logged) against the step into the PNG `path`; return
    it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = list(log_history)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = False
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        steps, values = loss_points(history, key)
        if steps:
            ax.plot(steps, values, style, label=label, markersize=4)
            drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
