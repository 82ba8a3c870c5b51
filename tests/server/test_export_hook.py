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

import fedge.server.export_hook as export_hook
import fedge.simulation.runner as runner
from fedge.config import RunConfig
from fedge.deploy.artifacts import ArtifactError, generate_keypair, load_public_key, verify_artifact
from fedge.deploy.registry import Registry
from fedge.deploy.runtime import DeviceRuntime
from fedge.server.export_hook import (
    MAX_CHECK_EXAMPLES,
    check_reply_metrics,
    federated_check,
    federated_gate,
    federated_gate_reasons,
    gate_reasons,
    run_id,
    weighted_accuracies,
)
from fedge.simulation.runner import simulate

# Tests that need a model to pass the gate allow a 5-point drop: the 2-round digits
# model loses about 0.5 points on any x86-64 CPU (reduce_range), so passing is never a
# coin flip; the gate's own tests use closed forms and impossible bounds.
SMALL = {
    "num-clients": 4,
    "clients-per-round": 4,
    "num-rounds": 2,
    "local-epochs": 2,
    "workers": 1,
    "export-max-accuracy-drop": 0.05,
}


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
    assert abs(entry["accuracy_fp32"] - entry["accuracy_int8"]) <= 0.03
    key = tmp_path / "run" / "keys" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    manifest = verify_artifact(Path(entry["path"]), load_public_key(key.with_suffix(".pub")))
    assert manifest["round"] == 2
    run_id_text = (tmp_path / "run" / "run-id").read_text()
    assert run_id_text == manifest["run_id"] + "\n" and len(manifest["run_id"]) == 32
    assert (manifest["model"], manifest["release"], manifest["candidate"]) == ("cnn8", 1, False)
    assert manifest["quantization"]["reduce_range"] is True
    assert Registry(tmp_path / "run" / "artifacts").current() == "round-0002"
    # The run-local key's release counter, beside it: the first release of the key.
    counter = tmp_path / "run" / "keys" / "signing.key.releases"
    assert counter.read_text() == "1\n" and stat.S_IMODE(counter.stat().st_mode) == 0o600


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
    # One run id across the resume; releases grow by one per published version.
    pub = load_public_key(tmp_path / "run" / "keys" / "signing.pub")
    manifests = [verify_artifact(Path(e["path"]), pub) for e in summary["artifacts"]]
    assert {m["run_id"] for m in manifests} == {run_id(tmp_path / "run")}
    assert [m["release"] for m in manifests] == [1, 2, 3]


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


def test_federated_check_without_a_pinned_key_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Devices started without node_config["public-key"] refuse to load the candidate.
    monkeypatch.setattr(runner, "_device_node_config", lambda cfg, run_dir: {})
    cfg = RunConfig.from_mapping({**SMALL, "export-federated-eval": True, "local-test-fraction": 0.3})
    summary = simulate(cfg, tmp_path / "run")
    (entry,) = summary["artifacts"]
    assert not entry["published"]
    assert "public-key" in entry["reason"]
    assert Registry(tmp_path / "run" / "artifacts").versions() == []


# --- the attack of issue 8, section 7.2 ---------------------------------------------------

HONEST = [(100, 0.95, 0.50), (120, 0.95, 0.50), (80, 0.95, 0.50)]


def test_out_of_range_or_absurd_replies_are_refused() -> None:
    assert check_reply_metrics(100, 0.95, 0.50) is None
    assert (
        check_reply_metrics(10**15, 0.0, 7.5) == f"num-examples {10**15} is outside [1, {MAX_CHECK_EXAMPLES}]"
    )
    assert check_reply_metrics(1e15, 0.0, 1.0) == "num-examples 1000000000000000.0 is not an integer"
    assert check_reply_metrics(100, 0.0, 7.5) == "accuracy-int8 7.5 is outside [0, 1]"
    assert check_reply_metrics(100, -0.1, 0.5) == "accuracy-fp32 -0.1 is outside [0, 1]"
    assert check_reply_metrics(True, 0.5, 0.5) == "num-examples True is not an integer"
    assert check_reply_metrics(0, 0.5, 0.5) == f"num-examples 0 is outside [1, {MAX_CHECK_EXAMPLES}]"
    assert check_reply_metrics(100, float("nan"), 0.5) == "accuracy-fp32 nan is not a finite number"


def test_one_liar_cannot_make_the_gate_pass() -> None:
    cfg = RunConfig.from_mapping({"export-max-accuracy-drop": 0.01})
    # The liar within range, at the largest allowed weight: the weighted accuracies
    # follow it, the gated median of per-client drops does not.
    liar = (MAX_CHECK_EXAMPLES, 0.0, 1.0)
    check = federated_gate([*HONEST, liar])
    assert check.drop == pytest.approx(0.45)  # median of [0.45, 0.45, 0.45, -1.0]
    assert check.accuracy_int8 > 0.99  # (300 * 0.5 + 1e5 * 1.0) / (300 + 1e5), reported only
    (reason,) = federated_gate_reasons(cfg, check, 0.1)
    assert "median per-client int8 drop over 4 clients is 45.00 points" in reason
    # Two replies: the largest drop, so a liar can make the gate refuse, never pass.
    assert federated_gate([HONEST[0], liar]).drop == pytest.approx(0.45)
    assert federated_gate(HONEST).drop == pytest.approx(0.45)


def test_federated_check_leaves_out_the_liar_of_the_issue(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 honest clients score 0.95 vs 0.50; one reports accuracy 7.5 on 1e15 examples."""
    from types import SimpleNamespace

    def reply(node: int, num_examples: object, acc32: float, acc8: float) -> SimpleNamespace:
        metrics = {"num-examples": num_examples, "accuracy-fp32": acc32, "accuracy-int8": acc8}
        return SimpleNamespace(
            has_error=lambda: False,
            content=SimpleNamespace(metric_records={"metrics": metrics}),
            metadata=SimpleNamespace(src_node_id=node),
        )

    replies = [reply(i, *r) for i, r in enumerate(HONEST)] + [reply(3, 10**15, 0.95, 7.5)]
    # Extra votes: a second reply from node 0 and one from a node nobody asked.
    replies += [reply(0, 100, 0.95, 0.95), reply(99, 100, 0.95, 0.95)]

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [0, 1, 2, 3]

        def send_and_receive(self, messages: list[object], timeout: float) -> list[SimpleNamespace]:
            assert len(messages) == 4
            return replies

    # Messages are only handed to the fake grid: no Flower run identity needed.
    def message(content: object, node: int, *args: object, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node))

    monkeypatch.setattr(export_hook, "Message", message)
    cfg = RunConfig.from_mapping({"num-clients": 4, "clients-per-round": 4, "export-max-accuracy-drop": 0.01})
    check = federated_check(cfg, Grid(), 2, {})  # type: ignore[arg-type]
    assert (check.clients, check.examples) == (3, 300)
    assert check.accuracy_int8 == pytest.approx(0.50) and check.drop == pytest.approx(0.45)
    assert federated_gate_reasons(cfg, check, 0.1)  # refused, by 44 points


def test_a_crash_after_publishing_is_recorded_from_the_registry_on_resume(tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping(SMALL)
    first = simulate(cfg, tmp_path / "run")
    (entry,) = first["artifacts"]
    assert entry["published"], entry
    # The crash: published, but artifacts.jsonl never got its line.
    (tmp_path / "run" / "artifacts.jsonl").unlink()
    summary = simulate(cfg, tmp_path / "run", resume=True)
    (recovered,) = summary["artifacts"]
    assert recovered["published"] and recovered["recovered_from_registry"]
    assert recovered["path"] == entry["path"]
    assert recovered["accuracy_int8"] == entry["accuracy_int8"]
    assert Registry(tmp_path / "run" / "artifacts").versions() == ["round-0002"]
    # A line that says published: false is corrected from the registry too.
    line = {**entry, "published": False, "path": None, "reason": "crashed"}
    (tmp_path / "run" / "artifacts.jsonl").write_text(json.dumps(line) + "\n")
    again = simulate(cfg, tmp_path / "run", resume=True)
    assert [e["published"] for e in again["artifacts"]] == [True]


def test_run_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = run_id(tmp_path / "run")
    assert len(first) == 32 and int(first, 16) >= 0
    assert run_id(tmp_path / "run") == first
    assert run_id(tmp_path / "other") != first  # 128 random bits
    (tmp_path / "run" / "run-id").write_text("not an id\n")
    with pytest.raises(ArtifactError, match=r"run-id does not hold a run id"):
        run_id(tmp_path / "run")


def test_two_runs_sharing_a_signing_key_never_pass_for_one_another(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "keys")
    cfg = RunConfig.from_mapping({**SMALL, "export-every": "final", "signing-key": str(private)})
    # Two runs, each with its own registry (run_dir/artifacts), one key: one release sequence.
    (a,) = simulate(cfg, tmp_path / "a")["artifacts"]
    (b,) = simulate(cfg, tmp_path / "b")["artifacts"]
    assert a["published"] and b["published"], (a, b)
    pub = load_public_key(public)
    manifest_a, manifest_b = verify_artifact(Path(a["path"]), pub), verify_artifact(Path(b["path"]), pub)
    assert manifest_a["version"] == manifest_b["version"] == "round-0002"
    assert (manifest_a["release"], manifest_b["release"]) == (1, 2)
    assert manifest_a["run_id"] != manifest_b["run_id"]
    assert (tmp_path / "keys" / "signing.key.releases").read_text() == "2\n"
    device = DeviceRuntime(tmp_path / "device", pub)
    device.install(tmp_path / "a" / "artifacts")
    # B's round-0002 is newer: the device updates, although A's round-0002 is installed.
    device.install(tmp_path / "b" / "artifacts")
    assert device.current_install() == f"round-0002-{manifest_b['run_id'][:12]}"
    with pytest.raises(ArtifactError, match=r"release 1 \(round-0002, another run\), not newer"):
        device.install(Path(a["path"]))  # A's artifact replayed
    assert device.current_install() == f"round-0002-{manifest_b['run_id'][:12]}"


def test_an_unreadable_release_counter_stops_the_run_before_round_1(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path / "keys")
    (tmp_path / "keys" / "signing.key.releases").write_text("garbage\n")
    cfg = RunConfig.from_mapping({**SMALL, "export-every": "final", "signing-key": str(private)})
    with pytest.raises(ArtifactError, match=r"keys/signing\.key\.releases holds 'garbage'"):
        simulate(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_round_that_did_not_aggregate_is_never_exported(tmp_path: Path) -> None:
    # Every client claims more examples than the cap (issue 8, 7.6: the untrained model
    # used to be signed and published): the run fails, and nothing reaches the registry.
    from fedge.server.loop import RunFailedError

    cfg = RunConfig.from_mapping({**SMALL, "max-examples-per-client": 1})
    with pytest.raises(RunFailedError, match="no round aggregated"):
        simulate(cfg, tmp_path / "run")
    (entry,) = [json.loads(line) for line in (tmp_path / "run" / "artifacts.jsonl").read_text().splitlines()]
    assert entry["round"] == 2 and not entry["published"]
    assert entry["reason"] == "the round did not aggregate an update"
    assert Registry(tmp_path / "run" / "artifacts").versions() == []
