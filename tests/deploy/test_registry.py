"""Registry: publish, the current pointer's exact bytes, rollback, and a crash while moving the pointer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.deploy.artifacts import build_manifest, write_artifact
from fedge.deploy.registry import Registry, RegistryError


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


RUN_ID = "0123456789abcdef0123456789abcdef"


def stage(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    server_round: int,
    model: bytes | None = None,
    *,
    release: int | None = None,
    candidate: bool = False,
) -> Path:
    """A signed artifact written outside the registry, as the export hook does (release = round)."""
    files = {"model.onnx": model if model is not None else f"model of round {server_round}".encode()}
    manifest = build_manifest(
        server_round=server_round,
        files=dict(files),
        metrics={"accuracy_int8": 0.5},
        quantization={"num_bits": 8},
        parent=None,
        created_at="2026-01-01T00:00:00Z",
        run_id=RUN_ID,
        model="cnn8",
        release=server_round if release is None else release,
        candidate=candidate,
    )
    return write_artifact(tmp_path / "staging" / f"{server_round}-{release}", files, manifest, key)


def pointer(root: Path) -> bytes:
    return (root / "current").read_bytes()


def test_publish_three_versions_current_moves(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    registry = Registry(tmp_path / "registry")
    assert registry.versions() == [] and registry.current() is None
    for server_round in (1, 2, 3):
        staged = stage(tmp_path, key, server_round)
        version = registry.publish(staged)
        assert version == f"round-000{server_round}"
        assert registry.current() == version
        assert pointer(registry.root) == f"round-000{server_round}\n".encode()
        assert not staged.exists()  # moved, not copied
        assert (
            registry.path(version) / "model.onnx"
        ).read_bytes() == f"model of round {server_round}".encode()
    assert registry.versions() == ["round-0001", "round-0002", "round-0003"]
    assert sorted(p.name for p in registry.root.iterdir()) == [
        "current",
        "round-0001",
        "round-0002",
        "round-0003",
    ]


def test_rollback_to_previous_then_to_named(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    registry = Registry(tmp_path / "registry")
    for server_round in (1, 2, 3):
        registry.publish(stage(tmp_path, key, server_round))
    assert registry.rollback() == "round-0002"
    assert pointer(registry.root) == b"round-0002\n"
    assert registry.rollback() == "round-0001"
    with pytest.raises(RegistryError, match=r"round-0001 is the earliest"):
        registry.rollback()
    assert registry.rollback("round-0003") == "round-0003"
    assert pointer(registry.root) == b"round-0003\n"
    assert registry.versions() == ["round-0001", "round-0002", "round-0003"]  # rollback deletes nothing


def test_unknown_version_is_refused_with_the_list(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    registry = Registry(tmp_path / "registry")
    for server_round in (1, 2):
        registry.publish(stage(tmp_path, key, server_round))
    expected = r"'round-0009' is not published .*published versions: \['round-0001', 'round-0002'\]"
    with pytest.raises(RegistryError, match=expected):
        registry.rollback("round-0009")
    with pytest.raises(RegistryError, match=expected):
        registry.path("round-0009")
    with pytest.raises(RegistryError, match=r"is not published"):
        registry.set_current("../round-0001")
    assert registry.current() == "round-0002"


def test_rollback_with_nothing_published(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"nothing is published"):
        Registry(tmp_path / "registry").rollback()


def test_versions_sort_by_round_not_by_text(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    registry = Registry(tmp_path / "registry")
    for release, server_round in enumerate((10000, 9999, 2), start=1):
        registry.publish(stage(tmp_path, key, server_round, release=release))
    assert registry.versions() == ["round-0002", "round-9999", "round-10000"]
    registry.set_current("round-10000")
    assert registry.rollback() == "round-9999"


def test_existing_version_is_refused_and_left_staged(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(stage(tmp_path, key, 1, b"first"))
    again = stage(tmp_path / "again", key, 1, b"second")
    with pytest.raises(RegistryError, match=r"round-0001 is already published"):
        registry.publish(again)
    assert again.is_dir()
    assert (registry.path("round-0001") / "model.onnx").read_bytes() == b"first"


def test_publish_verifies_when_given_the_key(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    registry = Registry(tmp_path / "registry", public_key=key.public_key())
    staged = stage(tmp_path, key, 1)
    (staged / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match=r"refusing to publish .*model.onnx"):
        registry.publish(staged)
    other = stage(tmp_path / "other", Ed25519PrivateKey.generate(), 2)
    with pytest.raises(RegistryError, match=r"signed with another key"):
        registry.publish(other)
    assert registry.versions() == [] and registry.current() is None


def test_publish_without_signature_is_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    staged = stage(tmp_path, key, 1)
    (staged / "manifest.sig").unlink()
    with pytest.raises(RegistryError, match=r"has no manifest.sig"):
        Registry(tmp_path / "registry").publish(staged)


def test_failed_pointer_rename_leaves_old_pointer(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(stage(tmp_path, key, 1))
    registry.publish(stage(tmp_path, key, 2))

    def crash(src: object, dst: object) -> None:
        # The temporary pointer is complete at this moment; the crash is before the rename.
        assert Path(str(src)).read_bytes() == b"round-0001\n"
        assert pointer(registry.root) == b"round-0002\n"
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match=r"simulated crash"):
        registry.rollback()
    monkeypatch.undo()
    assert registry.current() == "round-0002"
    assert pointer(registry.root) == b"round-0002\n"
    assert sorted(p.name for p in registry.root.iterdir()) == ["current", "round-0001", "round-0002"]


def test_dangling_pointer_is_reported(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(stage(tmp_path, key, 1))
    (registry.root / "current").write_bytes(b"round-0007\n")
    with pytest.raises(RegistryError, match=r"points to 'round-0007'.*\['round-0001'\]"):
        registry.current()


def test_release_numbers_only_grow(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    registry = Registry(tmp_path / "registry")
    assert registry.next_release() == 1
    registry.publish(stage(tmp_path, key, 1, release=1))
    registry.publish(stage(tmp_path, key, 2, release=5))
    assert registry.next_release() == 6  # the largest published (5) + 1
    for release in (5, 3):
        with pytest.raises(RegistryError, match=rf"release {release}, but release 5 is already published"):
            registry.publish(stage(tmp_path, key, 3, release=release))
    assert registry.versions() == ["round-0001", "round-0002"]
    registry.publish(stage(tmp_path, key, 3, release=6))
    assert registry.current() == "round-0003"


@pytest.mark.parametrize("with_key", [False, True])
def test_a_candidate_is_never_published(tmp_path: Path, key: Ed25519PrivateKey, with_key: bool) -> None:
    registry = Registry(tmp_path / "registry", public_key=key.public_key() if with_key else None)
    with pytest.raises(RegistryError, match=r"federated-check candidate, not a release"):
        registry.publish(stage(tmp_path, key, 1, candidate=True))
    assert registry.versions() == [] and registry.current() is None


@pytest.mark.timeout(10)
def test_a_fifo_pointer_is_refused_without_hanging(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(stage(tmp_path, key, 1))
    (registry.root / "current").unlink()
    os.mkfifo(registry.root / "current")
    with pytest.raises(RegistryError, match=r"registry/current is not a regular file \(a FIFO\)"):
        registry.current()
