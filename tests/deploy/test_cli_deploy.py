"""`fedge keys`, `fedge deploy`, `fedge infer`: the commands a release engineer and a device run."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fedge.cli import main
from fedge.config import RunConfig
from fedge.simulation.runner import simulate


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run that published rounds 1 and 2, signed with a key made by `fedge keys new`."""
    tmp = tmp_path_factory.mktemp("deploy")
    assert main(["keys", "new", "--out", str(tmp / "keys")]) == 0
    cfg = RunConfig.from_mapping(
        {
            "num-clients": 4,
            "clients-per-round": 4,
            "num-rounds": 2,
            "local-epochs": 2,
            "workers": 1,
            "export-every": 1,
            # Not a gate test: both rounds must publish on any x86-64 CPU, so a wide margin
            # (the 2-round digits model loses about half a point).
            "export-max-accuracy-drop": 0.05,
            "signing-key": str(tmp / "keys" / "signing.key"),
        }
    )
    simulate(cfg, tmp / "run")
    return tmp / "run" / "artifacts", tmp / "keys" / "signing.pub"


def test_keys_new_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    assert main(["keys", "new", "--out", str(tmp_path)]) == 0
    assert stat.S_IMODE((tmp_path / "signing.key").stat().st_mode) == 0o600
    assert (tmp_path / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert main(["keys", "new", "--out", str(tmp_path)]) == 2  # never overwrites a key


def test_list_verify_and_rollback(registry: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, pub = registry
    assert main(["deploy", "list", "--registry", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == ["  round-0001", "* round-0002"]
    assert main(["deploy", "verify", str(root / "round-0002"), "--public-key", str(pub)]) == 0
    assert main(["deploy", "rollback", "--registry", str(root)]) == 0
    assert (root / "current").read_text().strip() == "round-0001"
    assert main(["deploy", "rollback", "round-0002", "--registry", str(root)]) == 0
    assert main(["deploy", "rollback", "round-0009", "--registry", str(root)]) == 2
    assert "round-0009" in capsys.readouterr().err


def test_infer_prints_the_models_predictions(
    registry: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, pub = registry
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    capsys.readouterr()
    assert (
        main(["infer", "--model", str(root), "--public-key", str(pub), "--input", str(tmp_path / "x.npy")])
        == 0
    )
    printed = [int(c) for c in capsys.readouterr().out.split()]
    session = ort.InferenceSession(
        str(root / "round-0002" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1)
    assert printed == expected.tolist()


def test_infer_benchmark_and_refusals(
    registry: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, pub = registry
    capsys.readouterr()
    assert main(["infer", "--model", str(root / "round-0001"), "--public-key", str(pub), "--benchmark"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["latency_ms_p50"] <= report["latency_ms_p95"] <= report["latency_ms_p99"]
    # Another key: refused with one line, exit 2.
    assert main(["keys", "new", "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "infer",
                "--model",
                str(root),
                "--public-key",
                str(tmp_path / "other" / "signing.pub"),
                "--benchmark",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("fedge: error:") and err.count("\n") == 1


def test_registry_defaults_to_the_newest_run(
    registry: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, _ = registry
    monkeypatch.chdir(tmp_path)
    assert main(["deploy", "list"]) == 2  # no runs/ here yet
    assert "pass --registry DIR" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r1").symlink_to(root.parent, target_is_directory=True)
    assert main(["deploy", "list"]) == 0
    assert "round-0002" in capsys.readouterr().out


def test_infer_wrong_input_shape_and_bad_paths_are_one_line(
    registry: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, pub = registry
    np.save(tmp_path / "bad.npy", np.zeros((8, 8), np.float32))
    capsys.readouterr()
    assert (
        main(["infer", "--model", str(root), "--public-key", str(pub), "--input", str(tmp_path / "bad.npy")])
        == 2
    )
    # The install notice comes first; the error itself is one line.
    installed, error = capsys.readouterr().err.splitlines()
    assert installed.startswith("fedge: installed round-0002")
    assert error.startswith("fedge: error: the model cannot run on") and "(8, 8)" in error
    (tmp_path / "file").write_text("x")
    assert main(["keys", "new", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedge: error:") and err.count("\n") == 1


def test_infer_refuses_a_downgrade_unless_asked(
    registry: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, pub = registry
    device = ["--public-key", str(pub), "--benchmark", "--install-dir", str(tmp_path / "device")]
    assert main(["infer", "--model", str(root / "round-0002"), *device]) == 0
    capsys.readouterr()
    assert main(["infer", "--model", str(root / "round-0001"), *device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "release 1" in err and "--allow-rollback" in err
    assert main(["infer", "--model", str(root / "round-0001"), *device, "--allow-rollback"]) == 0
    assert (tmp_path / "device" / "current").read_text().startswith("round-0001-")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["model.onnx", "manifest.json"])
def test_a_fifo_in_the_artifact_is_one_line_not_a_hang(
    registry: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    root, pub = registry
    copy = tmp_path / "round-0002"
    shutil.copytree(root / "round-0002", copy)
    (copy / name).unlink()
    os.mkfifo(copy / name)
    capsys.readouterr()
    assert main(["deploy", "verify", str(copy), "--public-key", str(pub)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"round-0002/{name} is not a regular file (a FIFO)" in err
    assert main(["infer", "--model", str(copy), "--public-key", str(pub), "--benchmark"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(a FIFO)" in err


def test_infer_benchmark_on_a_signed_unloadable_model_is_one_line(
    registry: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedge.deploy.artifacts import build_manifest, load_private_key, write_artifact

    _, pub = registry
    files = {"model.onnx": b"validly signed, but not an ONNX model"}
    manifest = build_manifest(
        server_round=9,
        files=dict(files),
        metrics={},
        quantization={},
        parent=None,
        created_at="2026-01-01T00:00:00Z",
        run_id="0" * 32,
        model="cnn8",
        release=99,
    )
    key = load_private_key(pub.with_suffix(".key"))
    folder = write_artifact(tmp_path / "round-0009", files, manifest, key)
    capsys.readouterr()
    assert main(["infer", "--model", str(folder), "--public-key", str(pub), "--benchmark"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ONNX Runtime cannot load it" in err
