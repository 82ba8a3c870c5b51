"""Flower's Ray engine as fedge starts it: every Ray process listens on loopback only."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from processes import ProcessGroup, is_loopback, listening_addresses

RUN = [
    "simulate",
    "--engine",
    "ray",
    "--num-clients",
    "2",
    "--clients-per-round",
    "2",
    "--num-rounds",
    "1",
    "--local-epochs",
    "1",
    "--workers",
    "1",
    "--quiet",
]


@pytest.mark.slow
def test_ray_processes_listen_on_loopback_only(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("fedge")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    group = ProcessGroup(tmp_path, env)
    seen: dict[int, set[tuple[str, int]]] = {}
    names: dict[int, str] = {}
    try:
        proc = group.start("fedge", [str(exe), *RUN, "--out", str(tmp_path / "run")])
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            for pid, addresses in listening_addresses(group.members()).items():
                seen.setdefault(pid, set()).update(addresses)
                if pid not in names:
                    try:
                        names[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
                    except OSError:
                        names[pid] = "?"
            time.sleep(0.2)
        assert proc.poll() == 0, group.log("fedge")[-3000:]
    finally:
        group.stop()
    assert not group.alive()
    listeners = {(names[pid], addr) for pid, addresses in seen.items() for addr in addresses}
    # Ray's GCS and raylet at least were seen listening, and nothing on a public address.
    assert {"gcs_server", "raylet"} <= {name for name, _ in listeners}, listeners
    assert all(is_loopback(host) for _, (host, _port) in listeners), listeners
