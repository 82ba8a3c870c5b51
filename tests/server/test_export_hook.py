"""The server's export hook: gate, federated check, publication, refusals."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from crash import Crash, CrashAfter

from fedge.config import RunConfig
from fedge.deploy.artifacts import ArtifactError, load_public_key, verify_artifact
from fedge.deploy.registry import Registry
from fedge.server.export_hook import gate_reasons, weighted_accuracies
from fedge.simulation.runner import simulate

SMALL = {"num-clients": 4, "clients-per-round": 4, "num-rounds": 2, "local-epochs": 2, "workers": 1}


def test_gate_closed_form() -> None:
    cfg = RunConfig.from_mapping({"export-max-accuracy-drop": 0.01, "export-max-latency-ms": 0.5})
    assert gate_reasons(cfg, 0.95, 0.945, 0.4) == []
    (reason,) = gate_reasons(cfg, 0.95, 0.93, 0.4)
    assert "2.00 points below fp32" in reason
    (reason,) = gate_reasons(cfg, 0.95, 0.95, 0.6)
    assert "0.600 ms exceeds export-max-latency-ms 0.5" in reason
    assert len(gate_reasons(cfg, 0.95, 0.90, 0.6)) == 2
    # 0: no latency gate at all.
    assert gate_reasons(RunConfig.from_mapping({"export-max-latency-ms": 0}), 0.9, 0.9, 1e9) == []


def test_weighted_accuracies_closed_form() -> None:
    fp32, int8, total = weighted_accuracies([(3, 0.9, 0.8), (1, 0.5, 0.6)])
    assert fp32 == pytest.approx((3 * 0.9 + 1 * 0.5) / 4)
    assert int8 == pytest.approx((3 * 0.8 + 1 * 0.6) / 4)
    assert total == 4
    with pytest.raises(ValueError):
        weighted_accuracies([])


def test_final_round_is_published_signed_and_verifiable(tmp_path: Path) -> None:
    summary = simulate(RunConfig.from_mapping({**SMALL, "export-every": "final"}), tmp_path / "run")
    (entry,) = summary["artifacts"]
    assert entry["round"] == 2 and entry["published"], entry
    assert entry["int8_bytes"] < entry["fp32_bytes"]
    assert abs(entry["accuracy_fp32"] - entry["accuracy_int8"]) <= 0.01
    key = tmp_path / "run" / "keys" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    manifest = verify_artifact(Path(entry["path"]), load_public_key(key.with_suffix(".pub")))
    assert manifest["round"] == 2
    assert Registry(tmp_path / "run" / "artifacts").current() == "round-0002"


def test_every_n_rounds_and_the_gate_refusing(tmp_path: Path) -> None:
    # An impossible latency bound: every candidate is refused and nothing is published.
    cfg = RunConfig.from_mapping({**SMALL, "num-rounds": 3, "export-every": 2, "export-max-latency-ms": 1e-6})
    summary = simulate(cfg, tmp_path / "run")
    assert [e["round"] for e in summary["artifacts"]] == [2, 3]
    assert not any(e["published"] for e in summary["artifacts"])
    assert all("exceeds export-max-latency-ms" in e["reason"] for e in summary["artifacts"])
    assert Registry(tmp_path / "run" / "artifacts").versions() == []
    assert summary["rounds_completed"] == 3  # the run goes on


def test_federated_check_is_the_example_weighted_client_accuracy(tmp_path: Path) -> None:
    from fedge.data import federated_data

    cfg = RunConfig.from_mapping({**SMALL, "export-federated-eval": True, "local-test-fraction": 0.3})
    summary = simulate(cfg, tmp_path / "run")
    (entry,) = summary["artifacts"]
    assert entry["published"], entry
    # Recompute independently: every client (4 of 4 are sampled) scores the published
    # int8 model on its local test data with ONNX Runtime; weight by example count.
    session = ort.InferenceSession(
        str(Path(entry["path"]) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    data = federated_data(cfg.dataset, cfg.partition, cfg.num_clients, cfg.seed, local_test_fraction=0.3)
    correct = total = 0
    for pid in range(cfg.num_clients):
        x, y = data.client_test(pid)
        logits = session.run(None, {session.get_inputs()[0].name: np.asarray(x)})[0]
        correct += int((logits.argmax(axis=1) == y).sum())
        total += len(y)
    assert entry["federated_accuracy_int8"] == pytest.approx(correct / total, abs=1e-9)


def test_missing_signing_key_stops_the_run_before_round_1(tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping({**SMALL, "signing-key": str(tmp_path / "nope" / "signing.key")})
    with pytest.raises(ArtifactError, match=r"nope/signing\.key"):
        simulate(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resumed_run_keeps_earlier_artifacts(tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping({**SMALL, "export-every": 1})
    simulate(cfg, tmp_path / "run")
    longer = RunConfig.from_mapping({**SMALL, "export-every": 1, "num-rounds": 3})
    summary = simulate(longer, tmp_path / "run", resume=True)
    assert [e["round"] for e in summary["artifacts"]] == [1, 2, 3]
    lines = (tmp_path / "run" / "artifacts.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]


def test_unexportable_operator_is_reported_and_nothing_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = RunConfig.build_model

    def with_fft(self: RunConfig, spec: object) -> torch.nn.Module:
        # The zoo model with an operator the ONNX exporter rejects at opset 17 added to its
        # forward; its parameters (and so every client update) stay exactly the same.
        model = real(self, spec)  # type: ignore[arg-type]
        base = type(model)
        forward = lambda m, x: torch.fft.fft(base.forward(m, x)).real  # noqa: E731
        model.__class__ = type(f"FFT{base.__name__}", (base,), {"forward": forward})
        return model

    monkeypatch.setattr(RunConfig, "build_model", with_fft)
    summary = simulate(RunConfig.from_mapping(SMALL), tmp_path / "run")
    (entry,) = summary["artifacts"]
    assert not entry["published"]
    assert "fft" in entry["reason"]  # the operator is named
    assert summary["rounds_completed"] == 2  # the round still completed
    assert all(r["clients"] == 4 for r in summary["history"])  # training itself was unaffected
    assert Registry(tmp_path / "run" / "artifacts").versions() == []


def test_an_export_skipped_by_a_crash_is_done_on_resume(tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping(SMALL)  # export-every final: round 2
    with pytest.raises(Crash):  # user hooks run before the exporter
        simulate(cfg, tmp_path / "run", hooks=[CrashAfter(2)])
    assert not (tmp_path / "run" / "artifacts.jsonl").exists()
    summary = simulate(cfg, tmp_path / "run", resume=True)  # no round left to run
    assert [(e["round"], e["published"]) for e in summary["artifacts"]] == [(2, True)]
