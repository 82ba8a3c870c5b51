"""A run's folder: ``metrics.jsonl`` (kept by the loop), ``summary.json``, ``accuracy.png``
(when matplotlib is installed: the coordination server runs without it) and the final model
as ``model.safetensors``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedge import __version__
from fedge.config import RunConfig
from fedge.files import safetensors_bytes
from fedge.plots import plot_accuracy
from fedge.server.checkpoint import write_atomic
from fedge.server.loop import RoundRecord

SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
PLOT_FILE = "accuracy.png"


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
    metadata = {"dataset": cfg.dataset, "model": cfg.model, "rounds_completed": len(history)}
    write_atomic(run_dir / MODEL_FILE, safetensors_bytes(model, metadata))
    if history:
        rounds, accuracy, loss = zip(*((r.round, r.accuracy, r.loss) for r in history), strict=True)
        plot_accuracy(rounds, accuracy, loss, run_dir / PLOT_FILE, f"{cfg.dataset} / {cfg.strategy}")
    return summary
