"""Whole runs: checkpoint/resume, the run folder, and the three engines agreeing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from crash import Crash, CrashAfter
from safetensors.numpy import load_file

from fedge.client.state import RESIDUAL_KEY
from fedge.config import ConfigError, RunConfig
from fedge.server.loop import sample_clients
from fedge.simulation.client_state import ClientStateStore
from fedge.simulation.runner import simulate

SMALL = {
    "num-clients": 6,
    "clients-per-round": 3,
    "num-rounds": 4,
    "local-epochs": 1,
    # FedAvgM with momentum: the strategy carries state between rounds, which the
    # checkpoint must restore for a resumed run to match.
    "strategy": "fedavgm",
    "server-momentum": 0.9,
    "workers": 2,
}


def _model(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "model.safetensors"))


@pytest.mark.parametrize(
    "extra",
    # With error feedback the clients' residuals must survive the crash too: the in-process
    # engine keeps them in each client's state folder inside the run folder.
    [{}, {"compression": "stc:0.1", "error-feedback": True}],
    ids=["plain", "error-feedback"],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, extra: dict[str, object]) -> None:
    cfg = RunConfig.from_mapping({**SMALL, **extra})
    full = simulate(cfg, tmp_path / "full")

    with pytest.raises(Crash):
        simulate(cfg, tmp_path / "resumed", hooks=[CrashAfter(2)])
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = simulate(cfg, tmp_path / "resumed", resume=True)

    a, b = _model(tmp_path / "full"), _model(tmp_path / "resumed")
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    keep = ("round", "accuracy", "loss", "clients", "bytes_up", "bytes_down")
    assert [{k: r[k] for k in keep} for r in full["history"]] == [
        {k: r[k] for k in keep} for r in resumed["history"]
    ]
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3, 4]  # no round repeated or lost
    # The engine's parent wrote each client's state (never a worker): every client that took
    # part has its newest state, and with error feedback that state holds the residual.
    store = ClientStateStore(tmp_path / "resumed" / "clients")
    took_part = {n - 1000 for r in range(1, 5) for n in sample_clients(range(1000, 1006), 3, 42, r)}
    assert {k for k in range(6) if store.versions(k)} == took_part
    for k in took_part:
        state = store.load(k, 4)
        assert state is not None and (RESIDUAL_KEY in state.array_records) == bool(extra)
    assert not list((tmp_path / "resumed" / "clients").glob("*/ef-residual.safetensors"))


def test_run_folder_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping({**SMALL, "num-rounds": 1, "workers": 1})
    simulate(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        simulate(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="no checkpoint"):
        simulate(cfg, tmp_path / "empty", resume=True)


def test_summary_has_the_documented_keys(tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping({**SMALL, "num-rounds": 2, "workers": 1})
    summary = simulate(cfg, tmp_path / "run")
    assert {
        "fedge_version",
        "config",
        "rounds_completed",
        "final",
        "history",
        "wall_s",
        "bytes_up_total",
        "bytes_down_total",
    } <= set(summary)
    assert summary["config"] == cfg.to_mapping() and summary["rounds_completed"] == 2
    assert set(summary["final"]) == {"accuracy", "loss"}
    for row in summary["history"]:
        assert {"round", "accuracy", "loss", "clients", "bytes_up", "bytes_down", "wall_s"} <= set(row)
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in summary["history"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert (tmp_path / "run" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The uplink of a round: 3 clients' full float32 models, plus protobuf framing.
    params = sum(v.size for v in _model(tmp_path / "run").values())
    assert 3 * 4 * params < summary["history"][0]["bytes_up"] < 3 * 4 * params * 1.05


COMPRESSED = {"compression": "stc:0.1", "error-feedback": True, "downlink": "fp16"}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, COMPRESSED], ids=["plain", "compressed"])
def test_ray_engine_matches_the_inprocess_engine(tmp_path: Path, extra: dict[str, object]) -> None:
    # Every client takes part every round and shuffles with a (seed, round, client) seed,
    # so both engines train the same clients the same way; the compressed run also draws
    # its codec randomness per (seed, round, partition) and keeps each client's
    # error-feedback residual in its Context under both engines.
    base = {**SMALL, "num-clients": 4, "clients-per-round": 4, "num-rounds": 2, "strategy": "fedavg", **extra}
    ours = simulate(RunConfig.from_mapping({**base, "engine": "inprocess"}), tmp_path / "inprocess")
    ray = simulate(RunConfig.from_mapping({**base, "engine": "ray"}), tmp_path / "ray")
    assert ray["rounds_completed"] == 2 and [r["clients"] for r in ray["history"]] == [4, 4]
    assert [r["bytes_up"] for r in ours["history"]] == [r["bytes_up"] for r in ray["history"]]
    a, b = _model(tmp_path / "inprocess"), _model(tmp_path / "ray")
    for name in a:
        # Only the summation order differs (Ray's node ids are random).
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
    assert ours["final"]["accuracy"] == pytest.approx(ray["final"]["accuracy"], abs=0.01)


def test_compressed_run_sends_the_codec_payloads_and_learns(tmp_path: Path) -> None:
    from fedge.compression import parse_codec, payload_bytes

    cfg = RunConfig.from_mapping(
        {**SMALL, "strategy": "fedavg", "num-rounds": 4, "workers": 1, "compression": "rotate+ternary"}
    )
    summary = simulate(cfg, tmp_path / "run")
    model = _model(tmp_path / "run")
    payload = sum(payload_bytes(parse_codec("rotate+ternary"), v.size) for v in model.values())
    for row in summary["history"]:
        per_client = row["bytes_up"] / row["clients"]
        # The codec payloads, plus Flower's framing: names, dtype, shape, stype, metrics.
        assert payload < per_client < payload + 64 * len(model) + 128, row
    # 1.6 bits a weight instead of 32, and the model still learns digits.
    assert summary["history"][-1]["bytes_up"] < 0.07 * 4 * sum(v.size for v in model.values()) * 3
    assert summary["final"]["accuracy"] > 0.5


@pytest.mark.slow
def test_default_demo_reaches_90_percent(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("fedge")
    proc = subprocess.run(
        [str(exe), "simulate", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["rounds_completed"] == 20
    assert summary["config"]["num-clients"] == 50 and summary["config"]["clients-per-round"] == 10
    assert summary["final"]["accuracy"] >= 0.90
    assert len((tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()) == 20
    for name in ("accuracy.png", "model.safetensors"):
        assert (tmp_path / "demo" / name).is_file()


def test_resume_refuses_a_changed_model_or_data(tmp_path: Path) -> None:
    from fedge.server.checkpoint import CheckpointError

    cfg = RunConfig.from_mapping({**SMALL, "num-rounds": 1, "workers": 1})
    simulate(cfg, tmp_path / "run")
    for change in ({"strategy": "fedavg"}, {"num-clients": 8}, {"seed": 7}):
        with pytest.raises(CheckpointError, match="cannot resume") as err:
            simulate(
                RunConfig.from_mapping({**SMALL, "num-rounds": 2, "workers": 1, **change}),
                tmp_path / "run",
                resume=True,
            )
        assert "\n" not in str(err.value)
