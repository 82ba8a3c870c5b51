"""A run's folder: ``metrics.jsonl`` (kept by the loop), ``summary.json``, ``accuracy.png``
and the final model as ``model.safetensors``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from fedge import __version__
from fedge.config import RunConfig
from fedge.server.checkpoint import write_atomic
from fedge.server.loop import RoundRecord

SUMMARY_FILE = "summary.json"
PLOT_FILE = "accuracy.png"
MODEL_FILE = "model.safetensors"


def default_run_dir(cfg: RunConfig) -> Path:
    """``out-dir/run-name``, or ``out-dir/<dataset>-<strategy>-<UTC timestamp>``."""
    name = cfg.run_name or f"{cfg.dataset}-{cfg.strategy}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    return Path(cfg.out_dir) / name


def build_summary(cfg: RunConfig, history: list[RoundRecord], wall_s: float) -> dict[str, Any]:
    """The ``summary.json`` document. Later issues add keys; none is ever renamed."""
    rows = [r.to_dict() for r in history]
    last = rows[-1] if rows else {"accuracy": None, "loss": None}
    return {
        "fedge_version": __version__,
        "config": cfg.to_mapping(),
        "rounds_completed": len(rows),
        "final": {"accuracy": last["accuracy"], "loss": last["loss"]},
        "history": rows,
        "wall_s": wall_s,
        "bytes_up_total": sum(r.bytes_up for r in history),
        "bytes_down_total": sum(r.bytes_down for r in history),
    }


def plot_accuracy(history: list[RoundRecord], path: Path, title: str) -> None:
    """Central test accuracy and loss per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(rounds, [r.accuracy for r in history], marker="o", color="tab:blue", label="accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy", color="tab:blue")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    loss_ax = ax.twinx()
    loss_ax.plot(rounds, [r.loss for r in history], color="tab:orange", label="loss")
    loss_ax.set_ylabel("test loss", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(
    run_dir: Path,
    cfg: RunConfig,
    history: list[RoundRecord],
    model: dict[str, np.ndarray],
    wall_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write summary (plus ``extra`` keys from hooks), plot and final model; return the summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {**build_summary(cfg, history, wall_s), **(extra or {})}
    write_atomic(run_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    metadata = {"dataset": cfg.dataset, "model": cfg.model, "rounds_completed": str(len(history))}
    write_atomic(
        run_dir / MODEL_FILE,
        save({k: np.ascontiguousarray(v) for k, v in model.items()}, metadata=metadata),
    )
    if history:
        plot_accuracy(history, run_dir / PLOT_FILE, f"{cfg.dataset} / {cfg.strategy}")
    return summary
