"""Crash-safe file writes shared by the server (checkpoints), the registry and the client (state)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# The one metadata entry of fedge's safetensors files (see safetensors_bytes).
SAFETENSORS_META_KEY = "fedge"


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    A temporary file beside ``path`` is created with ``mode`` (so a private file never
    exists with looser permissions), written and fsynced, renamed over ``path`` with
    ``os.replace`` (atomic on POSIX), and the folder fsynced. If anything fails, ``path``
    is untouched and the temporary file removed.

    Parameters
    ----------
    path : Path
        The file to replace or create.
    data : bytes
        Its new content.
    mode : int, default 0o644
        Permission bits of the new file (``0o600`` for keys and private client state),
        before the umask.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> bytes:
    """A safetensors file whose bytes depend only on ``tensors`` and ``metadata``.

    safetensors keeps the header's metadata in a hash map and writes its entries in a
    random order, so two saves of the same state gave different bytes. fedge writes one
    entry, :data:`SAFETENSORS_META_KEY`, holding ``metadata`` as JSON with sorted keys;
    tensors are written in safetensors' own sorted order. Read it back with
    :func:`safetensors_metadata`.
    """
    from safetensors.numpy import save

    text = json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))
    # asarray, not ascontiguousarray: the latter turns a 0-d scalar into shape (1,).
    arrays = {name: np.asarray(values, order="C") for name, values in tensors.items()}
    return save(arrays, metadata={SAFETENSORS_META_KEY: text})


def safetensors_metadata(raw: Mapping[str, str] | None) -> dict[str, Any]:
    """The metadata :func:`safetensors_bytes` wrote; older files' plain entries as they are.

    Raises
    ------
    ValueError
        If the fedge entry is not a JSON object.
    """
    raw = dict(raw or {})
    if set(raw) == {SAFETENSORS_META_KEY}:
        value = json.loads(raw[SAFETENSORS_META_KEY])
        if not isinstance(value, dict):
            raise ValueError("the file's fedge metadata is not a JSON object")
        return value
    return raw


__all__ = [
    "SAFETENSORS_META_KEY",
    "fsync_dir",
    "safetensors_bytes",
    "safetensors_metadata",
    "write_bytes_atomic",
]
