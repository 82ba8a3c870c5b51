"""One run per run folder: an OS file lock held for the run's life.

Two runs writing one folder would interleave ``metrics.jsonl`` and publish each other's
models. :func:`run_lock` takes an exclusive ``flock`` on ``run-dir/run.lock`` and keeps
it until the run ends; the kernel drops it when the process dies, however it dies, so a
crashed run never leaves a stale lock behind (the file itself stays, holding the pid of
the last run, which is harmless: only the lock counts).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fedge.config import ConfigError

LOCK_FILE = "run.lock"


class RunLockedError(ConfigError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` (created if missing) while the block runs.

    Parameters
    ----------
    run_dir : Path
        The run folder.

    Yields
    ------
    Path
        The lock file, ``run_dir/run.lock``.

    Raises
    ------
    RunLockedError
        If another process (or another ``run_lock`` in this one) holds it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    # O_CLOEXEC: processes the run starts (Ray, SuperLink helpers) must not inherit the
    # lock, or it would outlive the run.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(
                f"run folder {run_dir} is in use by another fedge run (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


__all__ = ["LOCK_FILE", "RunLockedError", "run_lock"]
