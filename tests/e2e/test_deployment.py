"""End-to-end deployment: a SuperLink, two SuperNodes and ``flwr run`` on this project.

Everything binds to 127.0.0.1 on free ports, Flower's home (connection config, unpacked
app bundles) lives in ``tmp_path``, nothing installs dependencies at run time, and every
process the test starts is stopped in ``finally`` (and checked to be gone).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from processes import ProcessGroup, free_ports, wait_for_text, wait_http_ok
from safetensors.numpy import load_file

PROJECT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, flower-superexec
CONNECTION = "fedge-e2e"
NUM_ROUNDS = 2
NUM_NODES = 2
ACTIVATED = "[Fleet.ActivateNode] Activated node_id"


def _flwr(group: ProcessGroup, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "flwr"), *args],
        cwd=group.cwd,
        env=group.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _fab_size(project: Path) -> int:
    """Size of the bundle `flwr run` uploads (built the same way, in memory)."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    size = len(build_fab_from_disk(project))
    assert size <= FAB_MAX_SIZE
    return size


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_superlink_two_supernodes_flwr_run(tmp_path: Path, compressed: bool) -> None:
    """A run over gRPC; ``compressed`` adds stc updates with error feedback and an fp16 downlink,
    with each SuperNode's residual kept in its own state folder (as a device would)."""
    t_start = time.monotonic()
    # `flwr run` migrates a legacy [tool.flwr.federations] section by rewriting the
    # project's pyproject.toml; the test must never write into the source tree.
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    assert "federations" not in pyproject.get("tool", {}).get("flwr", {}), (
        "pyproject.toml has [tool.flwr.federations]: `flwr run` would rewrite it"
    )
    fab_size = _fab_size(PROJECT)

    home = tmp_path / "flwr_home"
    home.mkdir()
    out_dir = tmp_path / "runs"
    fleet_port, http_port, *node_ports = free_ports(2 + NUM_NODES)
    (home / "config.toml").write_text(
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    env = dict(os.environ)
    env.update(
        # The servers spawn flower-superexec, flwr-serverapp and flwr-clientapp by name.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        # Both SuperNodes' ClientApps train at once on this one host; with torch's default
        # of one OpenMP thread per core they oversubscribe it and a round takes ~25 s, not ~9 s.
        OMP_NUM_THREADS="1",
    )
    group = ProcessGroup(tmp_path, env)
    run_out = ""
    try:
        superlink = group.start(
            "superlink",
            [
                str(VENV_BIN / "flower-superlink"),
                "--insecure",
                "--fleet-api-address",
                f"127.0.0.1:{fleet_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(http_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_http_ok(f"http://127.0.0.1:{http_port}/health", 60, superlink)
        for pid, port in enumerate(node_ports):
            group.start(
                f"supernode{pid}",
                [
                    str(VENV_BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{fleet_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={pid} num-partitions={NUM_NODES} state-dir='{tmp_path / f'node{pid}'}'",
                    "--max-retries",
                    "10",
                    "--max-wait-time",
                    "60",
                ],
            )
        # Both SuperNodes registered over the Fleet API (gRPC) at the port they were given.
        link_log = wait_for_text(group.log_path("superlink"), ACTIVATED, NUM_NODES, 60)
        node_ids = set(re.findall(r"Activated node_id=(\d+)", link_log))
        assert len(node_ids) == NUM_NODES, link_log
        t_up = time.monotonic()

        run_config = (
            f"num-clients={NUM_NODES} clients-per-round={NUM_NODES} num-rounds={NUM_ROUNDS} "
            f"local-epochs=2 out-dir='{out_dir}' run-name='e2e'"
        )
        if compressed:
            run_config += " compression='stc:0.1' error-feedback=true downlink='fp16'"
        result = _flwr(
            group, "run", str(PROJECT), CONNECTION, "--stream", "--run-config", run_config, timeout=120
        )
        run_out = result.stdout + result.stderr
        t_run = time.monotonic()
        # `flwr run --stream` exits 0 even when the ServerApp raises; the files tell.
        assert result.returncode == 0, run_out

        run_dir = out_dir / "e2e"
        summary_path = run_dir / "summary.json"
        assert summary_path.is_file(), f"no {summary_path}; flwr run said:\n{run_out}"
        summary = json.loads(summary_path.read_text())
        assert summary["rounds_completed"] == NUM_ROUNDS
        # --run-config reached the ServerApp (pyproject's defaults are 20 rounds, 50 clients).
        assert summary["config"]["num-rounds"] == NUM_ROUNDS
        assert summary["config"]["num-clients"] == NUM_NODES
        assert summary["config"]["out-dir"] == str(out_dir)
        history = summary["history"]
        assert [row["round"] for row in history] == list(range(1, NUM_ROUNDS + 1))
        for row in history:
            assert row["clients"] == NUM_NODES, row
            assert row["dropped"] == 0, row
            assert row["aggregated"] is True, row
            assert row["bytes_up"] > 0 and row["bytes_down"] > 0, row
            assert isinstance(row["accuracy"], float) and 0.0 <= row["accuracy"] <= 1.0, row
            assert isinstance(row["loss"], float) and math.isfinite(row["loss"]), row
        assert summary["final"]["accuracy"] == history[-1]["accuracy"]
        assert summary["bytes_up_total"] == sum(row["bytes_up"] for row in history)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == NUM_ROUNDS
        assert [json.loads(line)["round"] for line in lines] == list(range(1, NUM_ROUNDS + 1))
        for name in ("model.safetensors", "accuracy.png", "checkpoint.safetensors"):
            assert (run_dir / name).is_file(), name
        residuals = [tmp_path / f"node{pid}" / "ef-residual.safetensors" for pid in range(NUM_NODES)]
        if compressed:
            assert summary["config"]["compression"] == "stc:0.1"
            # The cnn8 update (9,930 weights) at 10% as signs + Rice-coded positions is far
            # below the ~40 kB of fp32 weights a plain reply carries.
            assert all(row["bytes_up"] / NUM_NODES < 4_000 for row in history), history
            for path in residuals:
                assert path.is_file(), path
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                residual = load_file(str(path))
                assert residual and any(np.abs(v).max() > 0 for v in residual.values())
        else:
            assert not any(path.exists() for path in residuals)

        # The SuperLink's own record of the run.
        ls = _flwr(group, "ls", CONNECTION, "--format", "json", timeout=30)
        assert ls.returncode == 0, ls.stdout + ls.stderr
        runs = json.loads(ls.stdout)["runs"]
        assert len(runs) == 1, runs
        assert runs[0]["status"] == "finished:completed", runs[0]

        # Both nodes are still the two that registered at start-up (no re-registration).
        link_log = group.log("superlink")
        assert set(re.findall(r"Activated node_id=(\d+)", link_log)) == node_ids
        for pid in range(NUM_NODES):
            assert group.procs[f"supernode{pid}"].poll() is None, group.log(f"supernode{pid}")
        assert superlink.poll() is None, link_log
    except BaseException:
        for name in group.procs:
            print(f"----- {name}.log -----\n{group.log(name)[-4000:]}")
        print(f"----- flwr run -----\n{run_out[-6000:]}")
        raise
    finally:
        stop_s = group.stop()
        leftovers = group.alive()

    print(
        f"\nFAB {fab_size} bytes; deployment up in {t_up - t_start:.1f} s, "
        f"flwr run {t_run - t_up:.1f} s, teardown {stop_s:.1f} s, "
        f"total {time.monotonic() - t_start:.1f} s"
    )
    assert not leftovers, f"processes left running: {sorted(leftovers)}"
    for name, proc in group.procs.items():
        assert proc.returncode is not None, name


def _one_round(tmp_path: Path, run_name: str, extra_config: str) -> tuple[dict, dict]:
    """A SuperLink and two SuperNodes on loopback, one round of ``flwr run`` with
    ``extra_config``; returns (the round's metrics.jsonl line, summary.json). Every process
    started is stopped, by PID, whatever happens."""
    home = tmp_path / "flwr_home"
    home.mkdir()
    out_dir = tmp_path / "runs"
    fleet_port, http_port, *node_ports = free_ports(2 + NUM_NODES)
    (home / "config.toml").write_text(
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        OMP_NUM_THREADS="1",
    )
    group = ProcessGroup(tmp_path, env)
    run_out = ""
    try:
        superlink = group.start(
            "superlink",
            [
                str(VENV_BIN / "flower-superlink"),
                "--insecure",
                "--fleet-api-address",
                f"127.0.0.1:{fleet_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(http_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_http_ok(f"http://127.0.0.1:{http_port}/health", 60, superlink)
        for pid, port in enumerate(node_ports):
            group.start(
                f"supernode{pid}",
                [
                    str(VENV_BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{fleet_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={pid} num-partitions={NUM_NODES} state-dir='{tmp_path / f'node{pid}'}'",
                    "--max-retries",
                    "10",
                    "--max-wait-time",
                    "60",
                ],
            )
        wait_for_text(group.log_path("superlink"), ACTIVATED, NUM_NODES, 60)
        run_config = (
            f"num-clients={NUM_NODES} clients-per-round={NUM_NODES} num-rounds=1 "
            f"local-epochs=1 out-dir='{out_dir}' run-name='{run_name}' {extra_config}"
        )
        result = _flwr(
            group, "run", str(PROJECT), CONNECTION, "--stream", "--run-config", run_config, timeout=120
        )
        run_out = result.stdout + result.stderr
        assert result.returncode == 0, run_out
        run_dir = out_dir / run_name
        metrics = run_dir / "metrics.jsonl"
        assert metrics.is_file(), f"no {metrics}; flwr run said:\n{run_out}"
        (line,) = [json.loads(x) for x in metrics.read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
    except BaseException:
        for name in group.procs:
            print(f"----- {name}.log -----\n{group.log(name)[-4000:]}")
        print(f"----- flwr run -----\n{run_out[-6000:]}")
        raise
    finally:
        group.stop()
        leftovers = group.alive()
    assert not leftovers, f"processes left running: {sorted(leftovers)}"
    return line, summary


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_superlink_two_supernodes_secagg_round(tmp_path: Path) -> None:
    """One SecAgg+ round over gRPC: the four stages pass through the SuperLink and only the
    sum comes back; the SuperNodes' state folders never see the round's secrets."""
    from fedge.secagg_wire import STATE_KEY

    line, summary = _one_round(tmp_path, "e2e-secagg", "secagg=true compression='qsgd:4' error-feedback=true")
    assert line["aggregated"] is True, line
    assert line["clients"] == NUM_NODES and line["dropped"] == 0, line
    stats = line["secagg"]
    assert stats["clients_in_sum"] == NUM_NODES, stats
    assert list(stats["bytes_up_per_stage"]) == ["advertise-keys", "share-keys", "masked-input", "unmask"]
    assert line["bytes_up"] == sum(stats["bytes_up_per_stage"].values())
    assert summary["rounds_completed"] == 1 and summary["config"]["secagg"] is True
    # Each SuperNode kept its error-feedback residual, and nothing of the round's secrets.
    for pid in range(NUM_NODES):
        files = [p for p in (tmp_path / f"node{pid}").rglob("*") if p.is_file()]
        assert files, pid
        assert not [p for p in files if STATE_KEY.encode() in p.read_bytes()]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_superlink_two_supernodes_central_dp_round(tmp_path: Path) -> None:
    """One central-DP round over gRPC: the SuperNodes clip, the server noises and accounts,
    and the round reports the epsilon dp_accounting gives for it."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    line, summary = _one_round(
        tmp_path, "e2e-dp", "dp='central' client-sampling='poisson' noise-multiplier=1.3"
    )
    assert line["aggregated"] is True and line["clients"] == NUM_NODES, line
    accountant = rdp_privacy_accountant.RdpAccountant()  # Poisson, q = 2 / 2: add/remove one
    accountant.compose(dp_event.PoissonSampledDpEvent(1.0, dp_event.GaussianDpEvent(1.3)))
    assert line["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert line["privacy"]["rounds"] == 1 and summary["privacy"] == line["privacy"]
