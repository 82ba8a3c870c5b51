"""Server checkpoints: the global model, the round, the strategy's state and the history.

One safetensors file (no pickle), replaced atomically each round: written to a
temporary file, fsynced, renamed over the old one, and the folder fsynced, so a crash
at any point leaves either the previous round's checkpoint or this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from fedge.files import write_bytes_atomic

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedge-checkpoint/1"
_MODEL = "model/"
_STRATEGY = "strategy/"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what to do."""


@dataclass
class Checkpoint:
    """Everything needed to continue a run after ``server_round``."""

    server_round: int
    model: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    write_bytes_atomic(path, data)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``run_dir/checkpoint.safetensors`` atomically; return the path."""
    tensors = {_MODEL + k: np.ascontiguousarray(v) for k, v in ckpt.model.items()}
    tensors.update({_STRATEGY + k: np.ascontiguousarray(v) for k, v in ckpt.strategy_state.items()})
    metadata = {
        "format": FORMAT,
        "server_round": str(ckpt.server_round),
        "config": json.dumps(ckpt.config, sort_keys=True),
        "history": json.dumps(ckpt.history),
        # safetensors sorts names; the model's own order is kept for ArrayRecord users.
        "model_keys": json.dumps(list(ckpt.model)),
    }
    path = Path(run_dir) / CHECKPOINT_FILE
    write_atomic(path, save(tensors, metadata=metadata))
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the checkpoint of ``run_dir``.

    Raises
    ------
    CheckpointError
        If there is none, or it is not a fedge checkpoint of a known format.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; --resume needs the folder of a run that completed a round"
        )
    try:
        with safe_open(str(path), framework="np") as fh:
            metadata = fh.metadata() or {}
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({err}); restore it or start a new run"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {metadata.get('format')!r}, expected {FORMAT!r}")
    return Checkpoint(
        server_round=int(metadata["server_round"]),
        model={k: arrays[_MODEL + k] for k in json.loads(metadata["model_keys"])},
        strategy_state={k[len(_STRATEGY) :]: v for k, v in arrays.items() if k.startswith(_STRATEGY)},
        config=json.loads(metadata["config"]),
        history=json.loads(metadata["history"]),
    )
