"""Registry: publish, the current pointer's exact bytes, rollback, and a crash while moving the pointer."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.deploy.artifacts import build_manifest, write_artifact
from fedge.deploy.registry import Registry, RegistryError, ReleaseCounter, release_counter_path


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


# ---------------------------------------------------------------------------- releases per signing key


def test_release_counter_grows_per_key_above_the_floor(tmp_path: Path) -> None:
    key_path = tmp_path / "keys" / "signing.key"
    key_path.parent.mkdir()
    counter = ReleaseCounter(key_path)
    assert counter.path == release_counter_path(key_path) == tmp_path / "keys" / "signing.key.releases"
    assert (counter.last(), counter.peek()) == (0, 1)
    assert [counter.take(), counter.take(), counter.take()] == [1, 2, 3]  # a run-local key: as before
    assert counter.peek() == 4 and counter.last() == 3  # peek takes nothing
    assert counter.take(floor=9) == 10  # a registry ahead of the counter wins
    assert counter.take(floor=2) == 11  # and a counter ahead of the registry
    assert counter.path.read_bytes() == b"11\n"
    for path in (counter.path, counter.path.with_name("signing.key.releases.lock")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A second counter on the same key (another run) continues the same sequence.
    assert ReleaseCounter(key_path).take() == 12


def test_a_damaged_release_counter_is_refused_not_reset(tmp_path: Path) -> None:
    key_path = tmp_path / "signing.key"
    counter = ReleaseCounter(key_path)
    counter.path.write_text("seven\n")
    with pytest.raises(RegistryError, match=r"signing\.key\.releases holds 'seven', not a whole number"):
        counter.take()
    with pytest.raises(RegistryError, match=r"not a whole number"):
        counter.check()
    assert counter.path.read_text() == "seven\n"


def test_release_counter_in_an_unwritable_folder_is_named(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    keys = tmp_path / "keys"
    keys.mkdir()
    keys.chmod(0o500)
    try:
        with pytest.raises(RegistryError, match=r"keys/signing\.key\.releases.*must be writable"):
            ReleaseCounter(keys / "signing.key").check()
    finally:
        keys.chmod(0o700)


def test_concurrent_threads_never_take_the_same_release(tmp_path: Path) -> None:
    key_path = tmp_path / "signing.key"
    taken: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        counter = ReleaseCounter(key_path)  # each thread its own, as two runs would
        for _ in range(25):
            release = counter.take()
            with lock:
                taken.append(release)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == list(range(1, 201))
    assert ReleaseCounter(key_path).last() == 200


_TAKE_IN_A_PROCESS = """
import sys
from pathlib import Path
from fedge.deploy.registry import ReleaseCounter
counter = ReleaseCounter(Path(sys.argv[1]))
print(" ".join(str(counter.take(floor=int(sys.argv[2]))) for _ in range(40)))
"""


def test_concurrent_processes_never_take_the_same_release(tmp_path: Path) -> None:
    key_path = tmp_path / "signing.key"
    # Two runs with their own registries (floors 0 and 3) sharing one signing key.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TAKE_IN_A_PROCESS, str(key_path), floor],
            stdout=subprocess.PIPE,
            text=True,
        )
        for floor in ("0", "3", "0", "3")
    ]
    taken = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        releases = [int(word) for word in out.split()]
        assert releases == sorted(releases) and len(set(releases)) == 40  # each process: growing
        taken.extend(releases)
    assert len(set(taken)) == len(taken) == 160
    assert ReleaseCounter(key_path).last() == max(taken)


def test_another_runs_version_under_the_same_name_is_refused_in_one_line(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(stage(tmp_path, key, 3, release=1))
    files = {"model.onnx": b"run B's model"}
    manifest = build_manifest(
        server_round=3,
        files=dict(files),
        metrics={},
        quantization={},
        parent=None,
        created_at="2026-01-01T00:00:00Z",
        run_id="b" * 32,
        model="cnn8",
        release=2,
    )
    staged = write_artifact(tmp_path / "staging" / "b-3", files, manifest, key)
    with pytest.raises(RegistryError) as err:
        registry.publish(staged)
    message = str(err.value)
    assert "\n" not in message
    assert f"round-0003 is already published in {registry.root} by another run (run id {RUN_ID[:12]}..." in (
        message
    )
    assert "give each run its own registry-dir" in message
    assert registry.versions() == ["round-0003"] and registry.release_of("round-0003") == 1
