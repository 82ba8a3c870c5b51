"""Crash-safe file writes shared by the server (checkpoints), the registry and the client (state)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


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


__all__ = ["fsync_dir", "write_bytes_atomic"]
