"""Plots of a run's history. matplotlib is optional: the coordination server runs without it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("fedge")

PLOT_FILE = "accuracy.png"


def plot_accuracy(
    rounds: Sequence[int], accuracy: Sequence[float], loss: Sequence[float], path: Path, title: str
) -> bool:
    """Central test accuracy and loss per round, as a PNG; ``False`` without matplotlib.

    matplotlib is an optional dependency (``pip install 'fedge[plot]'``; the ``dev`` extra
    has it): without it the run folder simply has no plot.
    """
    try:
        import matplotlib
    except ImportError:
        log.info("no %s: matplotlib is not installed (pip install 'fedge[plot]')", path.name)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(rounds, list(accuracy), marker="o", color="tab:blue", label="accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy", color="tab:blue")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    loss_ax = ax.twinx()
    loss_ax.plot(rounds, list(loss), color="tab:orange", label="loss")
    loss_ax.set_ylabel("test loss", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
