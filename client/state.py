"""A client's lasting state: the error-feedback residual, in its Flower ``Context`` and on disk.

The residual is what a lossy codec dropped from this client's update; it is added to the
next update (:func:`fedge.compression.with_error_feedback`). It lives in
``context.state`` (which Flower keeps for the run, between rounds, under every engine) and,
when the SuperNode names a folder with ``--node-config "... state-dir='/var/lib/fedge'"``,
also in ``state-dir/ef-residual.safetensors``, so it survives a restart of the device's
client. The file is safetensors (no pickle), written atomically and with mode 0600: the
residual is derived from the client's private data. Give every SuperNode its own folder
(two sharing one overwrite each other's residual).

The residual is replaced when the client encodes its reply, before the server accepts it:
an update that arrives too late, or that the server rejects, takes its share of the
residual with it (as in every error-feedback scheme without acknowledgements).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Context
from safetensors import SafetensorError, safe_open

from fedge.files import safetensors_bytes, safetensors_metadata, write_bytes_atomic
from fedge.records import arrays_to_numpy, numpy_to_arrays
from fedge.update_records import is_float32

log = logging.getLogger("fedge.client")

# context.state key of the residual (an ArrayRecord, one float32 tensor per model tensor).
RESIDUAL_KEY = "fedge.ef-residual"
# node_config key of the folder for state that must survive a restart.
STATE_DIR_KEY = "state-dir"
RESIDUAL_FILE = "ef-residual.safetensors"
RESIDUAL_FORMAT = "fedge-ef-residual-1"


def state_dir(context: Context) -> Path | None:
    """The client's state folder from ``node_config["state-dir"]``, or ``None`` when unset."""
    value = context.node_config.get(STATE_DIR_KEY)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"node_config {STATE_DIR_KEY!r} must be a folder path, got {value!r}")
    return Path(value)


def _read_file(path: Path, run_id: int) -> dict[str, np.ndarray] | None:
    try:
        with safe_open(str(path), framework="np") as fh:
            meta = safetensors_metadata(fh.metadata())
            if meta.get("format") != RESIDUAL_FORMAT:
                log.warning("ignoring %s: not a fedge error-feedback residual", path)
                return None
            if meta.get("run-id") != str(run_id):
                log.info("ignoring %s: its residual belongs to run %s", path, meta.get("run-id"))
                return None
            return {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError, ValueError) as err:
        log.warning("ignoring unreadable residual %s (%s); starting from zeros", path, err)
        return None


def load_residual(context: Context, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The residual for a model shaped like ``reference`` (its float32 tensors).

    Taken from ``context.state``, else from the state folder's file of the same run; zeros
    when neither exists, or what exists does not fit the model or is not finite (logged).
    """
    expected = {name: values.shape for name, values in reference.items() if is_float32(values)}
    stored = context.state.array_records.get(RESIDUAL_KEY)
    residual: dict[str, np.ndarray] | None = None
    if stored is not None:
        residual = arrays_to_numpy(stored)
    else:
        folder = state_dir(context)
        if folder is not None and (folder / RESIDUAL_FILE).is_file():
            residual = _read_file(folder / RESIDUAL_FILE, context.run_id)
    if residual is not None:
        fits = {n: r.shape for n, r in residual.items()} == expected and all(
            r.dtype == np.float32 for r in residual.values()
        )
        if not fits:
            log.warning("error-feedback residual does not fit the model's tensors; starting from zeros")
        elif not all(np.isfinite(r).all() for r in residual.values()):
            # Kept, it would make every later update non-finite and lock the client out.
            log.warning("error-feedback residual holds NaN or Inf; starting from zeros")
        else:
            return {name: residual[name] for name in expected}
    return {name: np.zeros(shape, dtype=np.float32) for name, shape in expected.items()}


def save_residual(context: Context, residual: Mapping[str, np.ndarray]) -> None:
    """Keep ``residual`` in ``context.state`` and, with a state folder, on disk (0600, atomic)."""
    arrays = {name: np.ascontiguousarray(values, dtype=np.float32) for name, values in residual.items()}
    context.state[RESIDUAL_KEY] = numpy_to_arrays(arrays)
    folder = state_dir(context)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One sorted metadata entry: the same residual gives the same bytes.
        data = safetensors_bytes(arrays, {"format": RESIDUAL_FORMAT, "run-id": str(context.run_id)})
        write_bytes_atomic(folder / RESIDUAL_FILE, data, mode=0o600)


__all__ = ["RESIDUAL_FILE", "RESIDUAL_KEY", "STATE_DIR_KEY", "load_residual", "save_residual", "state_dir"]
