"""Device runtime: install, predict against numpy, every tamper case refused with the install unchanged."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

import fedge.deploy.runtime as runtime_module
from fedge.deploy.artifacts import ArtifactError, build_manifest, canonical_json, sign, write_artifact
from fedge.deploy.registry import Registry, ReleaseCounter
from fedge.deploy.runtime import DeviceRuntime

IN_FEATURES, NUM_CLASSES = 4, 3
RUN_ID = "0123456789abcdef0123456789abcdef"
# Installs are named <version>-<first 12 hex digits of the run id>.
RUN = RUN_ID[:12]


def int8_linear_model(w_q: np.ndarray, scale: float, bias: np.ndarray) -> bytes:
    """ONNX ``x @ DequantizeLinear(w_q, scale) + bias``: int8 weights, float input, logits out."""
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
        ],
        "linear_int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=[
            numpy_helper.from_array(w_q.astype(np.int8), "w_q"),
            numpy_helper.from_array(np.array(scale, dtype=np.float32), "w_scale"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), "w_zero"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Version:
    """One signed version: its weights (for the numpy reference), model bytes and folder."""

    def __init__(self, folder: Path, w_q: np.ndarray, scale: float, bias: np.ndarray, model: bytes) -> None:
        self.folder, self.w_q, self.scale, self.bias, self.model = folder, w_q, scale, bias, model

    def reference_predict(self, x: np.ndarray) -> np.ndarray:
        weights = self.w_q.astype(np.float64) * self.scale
        return np.argmax(x.astype(np.float64) @ weights + self.bias, axis=-1)


def make_version(
    out: Path,
    key: Ed25519PrivateKey,
    server_round: int,
    *,
    extra_files: dict[str, bytes] | None = None,
    include_model: bool = True,
    release: int | None = None,
    candidate: bool = False,
    model_bytes: bytes | None = None,
    run_id: str = RUN_ID,
) -> Version:
    rng = np.random.default_rng(server_round)
    w_q = rng.integers(-127, 128, size=(IN_FEATURES, NUM_CLASSES))
    bias = rng.normal(size=NUM_CLASSES)
    scale = 0.02
    model = int8_linear_model(w_q, scale, bias) if model_bytes is None else model_bytes
    files = {"model.onnx": model} if include_model else {}
    files.update(extra_files or {})
    manifest = build_manifest(
        server_round=server_round,
        files=dict(files),
        metrics={"accuracy_fp32": 0.9, "accuracy_int8": 0.89},
        quantization={"num_bits": 8, "method": "dynamic"},
        parent=None if server_round == 1 else f"round-{server_round - 1:04d}",
        created_at="2026-01-01T00:00:00Z",
        run_id=run_id,
        model="linear",
        release=server_round if release is None else release,
        candidate=candidate,
    )
    folder = write_artifact(out / f"round-{server_round:04d}", files, manifest, key)
    return Version(folder, w_q, scale, bias.astype(np.float32), model)


def tree_digest(root: Path) -> str:
    """A hash of every path, its kind and every file's bytes under ``root``."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        digest.update(f"D {rel}\n".encode())
        for name in sorted(filenames):
            digest.update(f"F {os.path.join(rel, name)}\n".encode())
            digest.update(hashlib.sha256(Path(dirpath, name).read_bytes()).digest())
    return digest.hexdigest()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def samples() -> np.ndarray:
    return np.random.default_rng(7).normal(size=(64, IN_FEATURES)).astype(np.float32)


@pytest.fixture
def device(tmp_path: Path, key: Ed25519PrivateKey) -> DeviceRuntime:
    return DeviceRuntime(tmp_path / "device", key.public_key())


# ---------------------------------------------------------------------------- installing and running


def test_install_two_versions_and_predict(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime, samples: np.ndarray
) -> None:
    v1, v2 = (make_version(tmp_path / "pub", key, r) for r in (1, 2))
    assert device.current_version() is None
    assert device.install(v1.folder) == "round-0001"
    np.testing.assert_array_equal(device.predict(samples), v1.reference_predict(samples))
    assert device.install(v2.folder) == "round-0002"
    assert (device.current_version(), device.previous_version()) == ("round-0002", "round-0001")
    predicted = device.predict(samples)
    np.testing.assert_array_equal(predicted, v2.reference_predict(samples))
    assert not np.array_equal(v1.reference_predict(samples), v2.reference_predict(samples))
    assert device.model_bytes() == v2.model
    assert (device.install_dir / "current").read_bytes() == f"round-0002-{RUN}\n".encode()
    assert (device.install_dir / "previous").read_bytes() == f"round-0001-{RUN}\n".encode()
    assert sorted(p.name for p in device.install_dir.iterdir()) == ["current", "previous", "versions"]


def test_only_current_and_previous_are_kept(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    for server_round in (1, 2, 3):
        device.install(make_version(tmp_path / "pub", key, server_round).folder)
    installed = sorted(p.name for p in (device.install_dir / "versions").iterdir())
    assert installed == [f"round-0002-{RUN}", f"round-0003-{RUN}"]


def test_unlisted_source_file_is_not_copied(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    v1 = make_version(tmp_path / "pub", key, 1)
    (v1.folder / "payload.py").write_bytes(b"import os")
    device.install(v1.folder)
    assert sorted(p.name for p in (device.install_dir / "versions" / f"round-0001-{RUN}").iterdir()) == [
        "manifest.json",
        "manifest.sig",
        "model.onnx",
    ]


def test_install_from_registry_takes_current(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    registry = Registry(tmp_path / "registry")
    for server_round in (1, 2):
        registry.publish(make_version(tmp_path / "staging", key, server_round).folder)
    assert device.install(registry.root) == "round-0002"
    registry.rollback()
    # The registry rolled back; the device follows only when asked to.
    with pytest.raises(ArtifactError, match=r"release 1 .*not newer than the installed release 2"):
        device.install(registry.root)
    assert device.current_version() == "round-0002"
    assert device.install(registry.root, allow_rollback=True) == "round-0001"


def test_reinstalling_the_current_version_changes_nothing(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    v1 = make_version(tmp_path / "pub", key, 1)
    device.install(v1.folder)
    before = tree_digest(device.install_dir)
    assert device.install(v1.folder) == "round-0001"
    assert tree_digest(device.install_dir) == before


def test_nothing_installed(device: DeviceRuntime) -> None:
    with pytest.raises(ArtifactError, match=r"nothing is installed"):
        device.session()
    with pytest.raises(ArtifactError, match=r"no previous version"):
        device.rollback()


# ---------------------------------------------------------------------------- tampering


def flip_model_byte(folder: Path, key: Ed25519PrivateKey) -> None:
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.onnx").write_bytes(bytes(data))


def truncate_model(folder: Path, key: Ed25519PrivateKey) -> None:
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) - 10])


def edit_manifest_metrics(folder: Path, key: Ed25519PrivateKey) -> None:
    data = (folder / "manifest.json").read_bytes()
    assert b'"accuracy_int8":0.89' in data
    (folder / "manifest.json").write_bytes(data.replace(b'"accuracy_int8":0.89', b'"accuracy_int8":0.99'))


def remove_signature(folder: Path, key: Ed25519PrivateKey) -> None:
    (folder / "manifest.sig").unlink()


def remove_manifest(folder: Path, key: Ed25519PrivateKey) -> None:
    (folder / "manifest.json").unlink()


def sign_with_another_key(folder: Path, key: Ed25519PrivateKey) -> None:
    (folder / "manifest.sig").write_bytes(
        sign(Ed25519PrivateKey.generate(), (folder / "manifest.json").read_bytes())
    )


def truncate_signature(folder: Path, key: Ed25519PrivateKey) -> None:
    (folder / "manifest.sig").write_bytes((folder / "manifest.sig").read_bytes()[:63])


def future_format_properly_signed(folder: Path, key: Ed25519PrivateKey) -> None:
    import json

    manifest = json.loads((folder / "manifest.json").read_bytes())
    data = canonical_json({**manifest, "format": 3})
    (folder / "manifest.json").write_bytes(data)
    (folder / "manifest.sig").write_bytes(sign(key, data))


def old_format_properly_signed(folder: Path, key: Ed25519PrivateKey) -> None:
    import json

    manifest = json.loads((folder / "manifest.json").read_bytes())
    for name in ("run_id", "model", "release", "candidate"):
        del manifest[name]
    data = canonical_json({**manifest, "format": 1})
    (folder / "manifest.json").write_bytes(data)
    (folder / "manifest.sig").write_bytes(sign(key, data))


def fifo_model(folder: Path, key: Ed25519PrivateKey) -> None:
    (folder / "model.onnx").unlink()
    os.mkfifo(folder / "model.onnx")


def fifo_manifest(folder: Path, key: Ed25519PrivateKey) -> None:
    (folder / "manifest.json").unlink()
    os.mkfifo(folder / "manifest.json")


def remove_listed_model(folder: Path, key: Ed25519PrivateKey) -> None:
    (folder / "model.onnx").unlink()


TAMPERS: dict[str, tuple[Callable[[Path, Ed25519PrivateKey], None], str]] = {
    "flipped byte in model.onnx": (flip_model_byte, "sha256 of round-0002/model.onnx differs"),
    "truncated model.onnx": (truncate_model, r"model.onnx is \d+ bytes, the manifest says \d+"),
    "edited manifest.json": (edit_manifest_metrics, "signature of round-0002/manifest.json does not verify"),
    "missing manifest.sig": (remove_signature, "signature round-0002/manifest.sig is missing"),
    "missing manifest.json": (remove_manifest, "manifest round-0002/manifest.json is missing"),
    "signed by another key": (sign_with_another_key, "signed with another key"),
    "truncated signature": (truncate_signature, "signed with another key"),
    "format 3, properly signed": (future_format_properly_signed, r"format 3 \(from the future\)"),
    "format 1, properly signed": (old_format_properly_signed, r"format 1, which names no run"),
    "FIFO as model.onnx": (fifo_model, r"round-0002/model.onnx is not a regular file \(a FIFO\)"),
    "FIFO as manifest.json": (fifo_manifest, r"round-0002/manifest.json is not a regular file \(a FIFO\)"),
    "listed file missing": (remove_listed_model, "model.onnx is listed in the manifest but missing"),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_artifact_is_refused_and_install_unchanged(
    case: str,
    tmp_path: Path,
    key: Ed25519PrivateKey,
    device: DeviceRuntime,
    samples: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tamper, message = TAMPERS[case]
    v1 = make_version(tmp_path / "pub", key, 1)
    v2 = make_version(tmp_path / "pub", key, 2)
    device.install(v1.folder)
    before = tree_digest(device.install_dir)
    tamper(v2.folder, key)

    copies: list[Path] = []
    monkeypatch.setattr(runtime_module, "_copy_durably", lambda src, dst: copies.append(src))
    with pytest.raises(ArtifactError, match=message) as info:
        device.install(v2.folder)
    assert "\n" not in str(info.value)
    assert copies == []  # refused before a single byte was copied
    assert tree_digest(device.install_dir) == before
    assert device.current_version() == "round-0001"
    np.testing.assert_array_equal(device.predict(samples), v1.reference_predict(samples))


def test_signed_manifest_without_model_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    device.install(make_version(tmp_path / "pub", key, 1).folder)
    before = tree_digest(device.install_dir)
    no_model = make_version(tmp_path / "pub", key, 2, include_model=False, extra_files={"labels.txt": b"a\n"})
    with pytest.raises(ArtifactError, match=r"lists no model.onnx"):
        device.install(no_model.folder)
    assert tree_digest(device.install_dir) == before


def test_same_version_with_other_contents_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    device.install(make_version(tmp_path / "pub", key, 1).folder)
    before = tree_digest(device.install_dir)
    other = make_version(tmp_path / "other", key, 1, extra_files={"labels.txt": b"a\n"})
    with pytest.raises(ArtifactError, match=r"release 1 .*not newer than the installed release 1"):
        device.install(other.folder)
    # A newer release under a name already installed (another run, same key) is refused too.
    other = make_version(tmp_path / "other2", key, 1, extra_files={"labels.txt": b"a\n"}, release=2)
    with pytest.raises(ArtifactError, match=r"installed with another manifest"):
        device.install(other.folder)
    assert tree_digest(device.install_dir) == before


def test_source_changed_during_copy_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    device.install(make_version(tmp_path / "pub", key, 1).folder)
    before = tree_digest(device.install_dir)
    v2 = make_version(tmp_path / "pub", key, 2)
    real_copy = runtime_module._copy_durably

    def copy_then_alter(src: Path, dst: Path) -> None:
        # The source verified, then the model changed on its way: the copy must be re-verified.
        real_copy(src, dst)
        if dst.name == "model.onnx":
            data = bytearray(dst.read_bytes())
            data[-1] ^= 0xFF
            dst.write_bytes(bytes(data))

    monkeypatch.setattr(runtime_module, "_copy_durably", copy_then_alter)
    with pytest.raises(ArtifactError, match=r"model.onnx differs"):
        device.install(v2.folder)
    assert tree_digest(device.install_dir) == before


def test_crash_while_moving_pointers_leaves_install_unchanged(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    for server_round in (1, 2):
        device.install(make_version(tmp_path / "pub", key, server_round).folder)
    before = tree_digest(device.install_dir)
    v3 = make_version(tmp_path / "pub", key, 3)
    real_replace = os.replace
    calls: list[str] = []

    def replace_then_crash(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(Path(str(dst)).name)
        if Path(str(dst)).name == "current":
            raise OSError("simulated crash before current moves")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(OSError, match=r"simulated crash"):
        device.install(v3.folder)
    monkeypatch.undo()
    assert calls == ["previous", "current"]  # previous had moved; it is put back
    assert tree_digest(device.install_dir) == before
    assert (device.current_version(), device.previous_version()) == ("round-0002", "round-0001")


# ---------------------------------------------------------------------------- rollback and loading


def test_rollback_restores_previous_bytes(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime, samples: np.ndarray
) -> None:
    v1, v2 = (make_version(tmp_path / "pub", key, r) for r in (1, 2))
    device.install(v1.folder)
    served_v1 = device.model_bytes()
    device.install(v2.folder)
    assert device.model_bytes() == v2.model != served_v1
    assert device.rollback() == "round-0001"
    assert device.model_bytes() == served_v1 == v1.model
    assert (device.install_dir / "current").read_bytes() == f"round-0001-{RUN}\n".encode()
    np.testing.assert_array_equal(device.predict(samples), v1.reference_predict(samples))
    # One step only: the version rolled back from is gone, and there is no second step.
    assert sorted(p.name for p in (device.install_dir / "versions").iterdir()) == [f"round-0001-{RUN}"]
    with pytest.raises(ArtifactError, match=r"no previous version"):
        device.rollback()


def test_rollback_to_a_damaged_previous_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    for server_round in (1, 2):
        device.install(make_version(tmp_path / "pub", key, server_round).folder)
    flip_model_byte(device.install_dir / "versions" / f"round-0001-{RUN}", key)
    with pytest.raises(ArtifactError, match=rf"round-0001-{RUN}/model.onnx differs"):
        device.rollback()
    assert device.current_version() == "round-0002"


@pytest.mark.parametrize("tamper", [flip_model_byte, truncate_model], ids=["flipped", "truncated"])
def test_model_altered_on_disk_after_install_is_refused_by_session(
    tamper: Callable[[Path, Ed25519PrivateKey], None],
    tmp_path: Path,
    key: Ed25519PrivateKey,
    device: DeviceRuntime,
    samples: np.ndarray,
) -> None:
    device.install(make_version(tmp_path / "pub", key, 1).folder)
    device.session()
    tamper(device.install_dir / "versions" / f"round-0001-{RUN}", key)
    with pytest.raises(ArtifactError, match=rf"round-0001-{RUN}/model.onnx .*after install"):
        device.session()
    with pytest.raises(ArtifactError, match=r"after install"):
        device.predict(samples)


def test_installed_manifest_edited_on_disk_is_refused_by_session(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    device.install(make_version(tmp_path / "pub", key, 1).folder)
    edit_manifest_metrics(device.install_dir / "versions" / f"round-0001-{RUN}", key)
    with pytest.raises(ArtifactError, match=r"does not verify"):
        device.session()


def test_benchmark(tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime) -> None:
    v1 = make_version(tmp_path / "pub", key, 1)
    device.install(v1.folder)
    result = device.benchmark(runs=50, warmup_runs=5)
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p95"] <= result["latency_ms_p99"]
    installed = device.install_dir / "versions" / f"round-0001-{RUN}" / "model.onnx"
    assert result["model_bytes"] == os.path.getsize(installed) == len(v1.model)
    assert (result["runs"], result["version"]) == (50, "round-0001")
    with pytest.raises(ValueError, match=r"runs must be >= 1"):
        device.benchmark(runs=0)


# ------------------------------------------------------------------ downgrades, candidates, unloadable


def test_an_older_or_equal_release_is_refused_unless_rollback_is_asked(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    v1 = make_version(tmp_path / "pub", key, 1, release=1)
    v2 = make_version(tmp_path / "pub", key, 2, release=2)
    device.install(v2.folder)
    before = tree_digest(device.install_dir)
    with pytest.raises(
        ArtifactError, match=r"release 1 \(round-0001, this run\), not newer than .*release 2"
    ):
        device.install(v1.folder)  # a replay of an old, validly signed artifact
    assert tree_digest(device.install_dir) == before
    # Another run sharing the key, at the same release: refused, and said so.
    other_run = make_version(tmp_path / "other", key, 5, release=2, run_id="f" * 32)
    with pytest.raises(ArtifactError, match=r"release 2 \(round-0005, another run\)"):
        device.install(other_run.folder)
    assert tree_digest(device.install_dir) == before
    assert device.install(v1.folder, allow_rollback=True) == "round-0001"
    assert device.install(v2.folder) == "round-0002"  # forward again needs no flag


def test_a_candidate_is_never_installed(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    candidate = make_version(tmp_path / "pub", key, 1, candidate=True)
    with pytest.raises(ArtifactError, match=r"federated-check candidate, not a release"):
        device.install(candidate.folder)
    assert device.current_version() is None and not device.install_dir.exists()


def test_a_signed_model_onnxruntime_cannot_load_never_becomes_current(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    device.install(make_version(tmp_path / "pub", key, 1).folder)
    before = tree_digest(device.install_dir)
    broken = make_version(tmp_path / "pub", key, 2, model_bytes=b"validly signed, not an ONNX graph")
    with pytest.raises(
        ArtifactError, match=r"round-0002/manifest.json is signed but ONNX Runtime cannot load"
    ):
        device.install(broken.folder)
    assert tree_digest(device.install_dir) == before
    assert device.current_version() == "round-0001"


def test_benchmark_of_an_unloadable_installed_model_is_one_line(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An install made by an older fedge that did not check loading.
    broken = make_version(tmp_path / "pub", key, 1, model_bytes=b"not an ONNX graph")
    monkeypatch.setattr(runtime_module, "_load_check", lambda model, where: None)
    device.install(broken.folder)
    monkeypatch.undo()
    with pytest.raises(
        ArtifactError, match=r"round-0001/model.onnx is signed but ONNX Runtime cannot load"
    ) as info:
        device.benchmark(runs=1, warmup_runs=0)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- two runs sharing one signing key

RUN_A, RUN_B = "a" * 32, "b" * 32


def publish_as_run(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    counter: ReleaseCounter,
    registry: Registry,
    run: str,
    server_round: int,
) -> Version:
    """Publish ``server_round`` of ``run`` as the export hook does: release from the key's counter."""
    release = counter.take(registry.next_release() - 1)
    version = make_version(
        tmp_path / "staging" / f"{run[:4]}-{release}", key, server_round, release=release, run_id=run
    )
    registry.publish(version.folder)
    version.folder = registry.path(f"round-{server_round:04d}")
    return version


def test_a_replay_from_another_run_sharing_the_key_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    # Scenario 1: run A publishes rounds 1..9; run B, same key, its own registry, rounds 1..4.
    key_path = tmp_path / "keys" / "signing.key"
    key_path.parent.mkdir()
    registry_a, registry_b = (
        Registry(tmp_path / "run-a" / "artifacts"),
        Registry(tmp_path / "run-b" / "artifacts"),
    )
    a = [publish_as_run(tmp_path, key, ReleaseCounter(key_path), registry_a, RUN_A, r) for r in range(1, 10)]
    b = [publish_as_run(tmp_path, key, ReleaseCounter(key_path), registry_b, RUN_B, r) for r in range(1, 5)]
    assert [registry_a.release_of(v) for v in registry_a.versions()] == list(range(1, 10))
    assert [registry_b.release_of(v) for v in registry_b.versions()] == [10, 11, 12, 13]
    assert device.install(b[3].folder) == "round-0004"
    before = tree_digest(device.install_dir)
    # A's round-0009 is validly signed with the pinned key, and older than what runs.
    with pytest.raises(
        ArtifactError, match=r"release 9 \(round-0009, another run\), not newer than the installed release 13"
    ):
        device.install(a[8].folder)
    with pytest.raises(ArtifactError, match=r"release 9 \(round-0009, another run\)"):
        device.install(registry_a.root)
    assert tree_digest(device.install_dir) == before
    assert device.current_install() == f"round-0004-{RUN_B[:12]}"


def test_interleaved_runs_sharing_the_key_order_their_releases(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    key_path = tmp_path / "signing.key"
    registries = {run: Registry(tmp_path / run[:4]) for run in (RUN_A, RUN_B)}
    published = {}
    for server_round in (1, 2, 3):
        for run in (RUN_A, RUN_B):
            version = publish_as_run(
                tmp_path, key, ReleaseCounter(key_path), registries[run], run, server_round
            )
            published[run, server_round] = version
    # Releases 1..6 in the order they were published, whichever registry holds them.
    assert [registries[RUN_A].release_of(v) for v in registries[RUN_A].versions()] == [1, 3, 5]
    assert [registries[RUN_B].release_of(v) for v in registries[RUN_B].versions()] == [2, 4, 6]
    device.install(published[RUN_A, 3].folder)  # release 5
    with pytest.raises(ArtifactError, match=r"release 4 \(round-0002, another run\)"):
        device.install(published[RUN_B, 2].folder)
    with pytest.raises(ArtifactError, match=r"release 3 \(round-0002, this run\)"):
        device.install(published[RUN_A, 2].folder)
    assert device.install(published[RUN_B, 3].folder) == "round-0003"  # release 6: forward


def test_a_device_updates_to_another_runs_version_of_the_same_round(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime, samples: np.ndarray
) -> None:
    # Scenario 2: the device runs A's round-0003 (release 3); B publishes its round-0003 as release 4.
    key_path = tmp_path / "signing.key"
    registry_a, registry_b = Registry(tmp_path / "a"), Registry(tmp_path / "b")
    a = [publish_as_run(tmp_path, key, ReleaseCounter(key_path), registry_a, RUN_A, r) for r in (1, 2, 3)]
    release = ReleaseCounter(key_path).take(registry_b.next_release() - 1)
    assert release == 4
    # Same round, other weights: B's model differs from A's.
    b3 = make_version(
        tmp_path / "b-staging",
        key,
        3,
        release=release,
        run_id=RUN_B,
        model_bytes=int8_linear_model(-a[2].w_q, a[2].scale, a[2].bias),
    )
    b3.w_q = -a[2].w_q
    registry_b.publish(b3.folder)
    b3.folder = registry_b.path("round-0003")
    assert device.install(a[2].folder) == "round-0003"
    assert device.install(registry_b.root) == "round-0003"  # updated, not refused as "immutable"
    assert (device.current_install(), device.previous_install()) == (
        f"round-0003-{RUN_B[:12]}",
        f"round-0003-{RUN_A[:12]}",
    )
    assert (device.current_version(), device.previous_version()) == ("round-0003", "round-0003")
    np.testing.assert_array_equal(device.predict(samples), b3.reference_predict(samples))
    # The very same artifact again changes nothing.
    before = tree_digest(device.install_dir)
    assert device.install(b3.folder) == "round-0003"
    assert tree_digest(device.install_dir) == before
    # A's round-0003 (release 3) is now a replay, refused; rollback returns to it explicitly.
    with pytest.raises(
        ArtifactError, match=r"release 3 \(round-0003, another run\), not newer than .*release 4"
    ):
        device.install(a[2].folder)
    assert tree_digest(device.install_dir) == before
    assert device.rollback() == "round-0003"
    assert device.current_install() == f"round-0003-{RUN_A[:12]}"
    np.testing.assert_array_equal(device.predict(samples), a[2].reference_predict(samples))


def test_a_device_installed_by_an_older_fedge_keeps_working(
    tmp_path: Path, key: Ed25519PrivateKey, device: DeviceRuntime
) -> None:
    v1 = make_version(tmp_path / "pub", key, 1)
    device.install(v1.folder)
    # The layout an older fedge wrote: versions/round-0001, current "round-0001".
    (device.install_dir / "versions" / f"round-0001-{RUN}").rename(
        device.install_dir / "versions" / "round-0001"
    )
    (device.install_dir / "current").write_text("round-0001\n")
    assert device.current_version() == "round-0001"
    before = tree_digest(device.install_dir)
    assert device.install(v1.folder) == "round-0001"  # the same artifact: still a no-op
    assert tree_digest(device.install_dir) == before
    assert device.install(make_version(tmp_path / "pub", key, 2).folder) == "round-0002"
    assert (device.current_install(), device.previous_install()) == (f"round-0002-{RUN}", "round-0001")
    assert device.rollback() == "round-0001"
