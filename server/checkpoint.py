"""Server checkpoints: the global model, the round, every component's state and the history.

One safetensors file (no pickle), replaced atomically each round: written to a
temporary file, fsynced, renamed over the old one, and the folder fsynced, so a crash
at any point leaves either the previous round's checkpoint or this one.

Every stateful component of the server has a ``state_dict()`` (named numpy arrays) that
the checkpoint keeps under the component's name: ``strategy`` (wrapped strategies
included), ``loop`` (the round loop's own counters), and later the privacy accountant
and the secure-aggregation transport. The bytes depend only on the state: metadata is
one JSON entry with sorted keys (:func:`fedge.files.safetensors_bytes`), so two saves of
the same state are the same file.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from fedge.files import safetensors_bytes, safetensors_metadata, write_bytes_atomic

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedge-checkpoint/2"
# Format 1 (plain metadata entries, strategy state only) is still read.
_FORMAT_1 = "fedge-checkpoint/1"
_MODEL = "model/"
_COMPONENT = "component/"
STRATEGY_COMPONENT = "strategy"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what to do."""


@dataclass
class Checkpoint:
    """Everything needed to continue a run after ``server_round``.

    ``components`` maps a component's name (``"strategy"``, ``"loop"``, ...) to its
    ``state_dict()``; names are letters, digits and ``-``.
    """

    server_round: int
    model: dict[str, np.ndarray]
    components: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def strategy_state(self) -> dict[str, np.ndarray]:
        """The strategy's ``state_dict`` (empty when it keeps none)."""
        return self.components.get(STRATEGY_COMPONENT, {})


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    write_bytes_atomic(path, data)


def checkpoint_bytes(ckpt: Checkpoint) -> bytes:
    """The checkpoint file's bytes (a pure function of ``ckpt``)."""
    tensors = {_MODEL + k: v for k, v in ckpt.model.items()}
    for component, state in ckpt.components.items():
        if not component or "/" in component:
            raise ValueError(f"component name {component!r} must be non-empty and hold no '/'")
        tensors.update({f"{_COMPONENT}{component}/{k}": v for k, v in state.items()})
    metadata = {
        "format": FORMAT,
        "server_round": ckpt.server_round,
        "config": ckpt.config,
        "history": ckpt.history,
        # safetensors sorts names; the model's own order is kept for ArrayRecord users.
        "model_keys": list(ckpt.model),
        "components": sorted(ckpt.components),
    }
    return safetensors_bytes(tensors, metadata)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``run_dir/checkpoint.safetensors`` atomically; return the path."""
    path = Path(run_dir) / CHECKPOINT_FILE
    write_atomic(path, checkpoint_bytes(ckpt))
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the checkpoint of ``run_dir``.

    Raises
    ------
    CheckpointError
        If there is none, or it is not a fedge checkpoint of a known format.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    # Missing, not a file, not readable and corrupt are four different fixes.
    try:
        mode = path.stat().st_mode
        if stat.S_ISREG(mode):
            with open(path, "rb"):  # permission to read, before safetensors' own error text
                pass
    except FileNotFoundError:
        raise CheckpointError(
            f"no checkpoint at {path}; --resume needs the folder of a run that completed a round"
        ) from None
    except OSError as err:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({err.strerror}); give this user read permission on it"
        ) from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(
            f"checkpoint {path} is not a regular file; move it away and restore the checkpoint file"
        )
    try:
        with safe_open(str(path), framework="np") as fh:
            metadata = safetensors_metadata(fh.metadata())
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt, not a safetensors file ({err}); restore it or start a new run"
        ) from None
    fmt = metadata.get("format")
    try:
        if fmt == FORMAT:
            names = [str(c) for c in metadata["components"]]
            components: dict[str, dict[str, np.ndarray]] = {name: {} for name in names}
            for key, value in arrays.items():
                if key.startswith(_COMPONENT):
                    component, _, name = key[len(_COMPONENT) :].partition("/")
                    components.setdefault(component, {})[name] = value
            return Checkpoint(
                server_round=int(metadata["server_round"]),
                model={k: arrays[_MODEL + k] for k in metadata["model_keys"]},
                components=components,
                config=dict(metadata["config"]),
                history=list(metadata["history"]),
            )
        if fmt == _FORMAT_1:
            from fedge.strategies import legacy_strategy_state

            strategy = {k[len("strategy/") :]: v for k, v in arrays.items() if k.startswith("strategy/")}
            return Checkpoint(
                server_round=int(metadata["server_round"]),
                model={k: arrays[_MODEL + k] for k in json.loads(metadata["model_keys"])},
                components={STRATEGY_COMPONENT: legacy_strategy_state(strategy)},
                config=json.loads(metadata["config"]),
                history=json.loads(metadata["history"]),
            )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({type(err).__name__}: {err}); restore it or start a new run"
        ) from None
    raise CheckpointError(f"{path} has format {fmt!r}, expected {FORMAT!r}; it was not written by fedge")
