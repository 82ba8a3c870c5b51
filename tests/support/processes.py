"""Start and stop groups of long-running processes (SuperLink, SuperNodes) in end-to-end tests.

Each process is started in its own session (process group). Flower's servers spawn
helpers of their own (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``), and
the SuperLink starts its SuperExec in yet another session, so stopping the direct children
is not enough. Every process started here carries a unique environment tag that its
descendants inherit; ``stop()`` signals the process groups of the children, of their
descendants (from ``/proc``) and of any tagged process, SIGTERM first, SIGKILL after a grace
period. ``alive()`` lists tagged processes still running, so a test can assert that nothing
it started outlived it. Linux only (``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

TAG_VAR = "FEDGE_E2E_TAG"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 (held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state is [0], ppid [1])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(pid: int) -> set[int]:
    """All descendants of ``pid`` now (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for p in _pids():
        st = _stat(p)
        if st is not None:
            children.setdefault(int(st[1]), []).append(p)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def tagged(tag: str) -> set[int]:
    """Processes (of this user) whose environment carries ``TAG_VAR=tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = set()
    for p in _pids():
        try:
            env = Path(f"/proc/{p}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.add(p)
    return found


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up after {timeout} s")


def wait_for_text(path: Path, needle: str, count: int, timeout: float) -> str:
    """Wait until ``path`` holds ``needle`` at least ``count`` times; return its text."""
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        text = path.read_text(errors="replace") if path.exists() else ""
        if text.count(needle) >= count:
            return text
        time.sleep(0.2)
    raise TimeoutError(f"{needle!r} x{count} not in {path} after {timeout} s:\n{text[-3000:]}")


class ProcessGroup:
    """Processes started together, each in its own session, logged to ``log_dir/<name>.log``.

    Parameters
    ----------
    log_dir : Path
        Folder for the logs; also the processes' working directory unless ``cwd`` is given.
    env : Mapping[str, str]
        Environment of every process (a unique ``TAG_VAR`` is added).
    cwd : Path, optional
        Working directory of the processes.
    """

    def __init__(self, log_dir: Path, env: Mapping[str, str], cwd: Path | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.cwd = Path(cwd) if cwd is not None else self.log_dir
        self.tag = uuid.uuid4().hex
        self.env = {**env, TAG_VAR: self.tag}
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen:
        """Start ``argv`` in a new session, stdout and stderr to ``<name>.log``."""
        log = open(self.log_path(name), "wb")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        proc = subprocess.Popen(
            list(argv),
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def members(self) -> set[int]:
        """Every running process of the group: children, their descendants and tagged ones."""
        pids = {p.pid for p in self.procs.values()}
        for p in list(pids):
            pids |= descendants(p)
        pids |= tagged(self.tag)
        pids.discard(os.getpid())
        return {p for p in pids if is_running(p)}

    def alive(self) -> set[int]:
        """Tagged processes still running (should be empty after ``stop()``)."""
        return {p for p in tagged(self.tag) if is_running(p) and p != os.getpid()}

    def stop(self, grace: float = 10.0) -> float:
        """SIGTERM every process group of the members, wait up to ``grace`` s, SIGKILL the rest.

        Returns the seconds it took. Never signals the caller's own process group.
        """
        t0 = time.monotonic()
        own_pgid = os.getpgrp()
        pids = self.members()
        pgids = {g for g in map(_pgid, pids) if g is not None and g != own_pgid}
        for pgid in pgids:
            _signal(pgid, signal.SIGTERM, group=True)
        for pid in pids:  # members in the caller's group (not expected) get a plain SIGTERM
            if _pgid(pid) == own_pgid:
                _signal(pid, signal.SIGTERM)
        deadline = t0 + grace
        while time.monotonic() < deadline:
            for p in self.procs.values():
                p.poll()  # reap our own children so they do not linger as zombies
            if not any(is_running(p) for p in pids | self.alive()):
                break
            time.sleep(0.1)
        leftovers = self.members()
        for pgid in pgids:
            _signal(pgid, signal.SIGKILL, group=True)
        for pid in leftovers:
            _signal(pid, signal.SIGKILL)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        end = time.monotonic() + 5
        while self.alive() and time.monotonic() < end:
            time.sleep(0.1)
        for log in self._logs:
            log.close()
        return time.monotonic() - t0


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _signal(target: int, sig: signal.Signals, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(target, sig)
        else:
            os.kill(target, sig)


def _proc_net_listeners() -> dict[str, tuple[str, int]]:
    """Listening TCP sockets of this network namespace: socket inode -> (address, port)."""
    found: dict[str, tuple[str, int]] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # The kernel prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            family = socket.AF_INET if width == 8 else socket.AF_INET6
            found[fields[9]] = (socket.inet_ntop(family, words), int(hex_port, 16))
    return found


def listening_addresses(pids: set[int]) -> dict[int, set[tuple[str, int]]]:
    """The TCP (address, port) pairs each of ``pids`` listens on (Linux ``/proc``)."""
    listeners = _proc_net_listeners()
    out: dict[int, set[tuple[str, int]]] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in listeners:
                    out.setdefault(pid, set()).add(listeners[target[8:-1]])
    return out


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address (``::ffff:127.0.0.1``)."""
    return address.startswith("127.") or address == "::1" or address.startswith("::ffff:127.")
