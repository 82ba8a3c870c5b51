"""Artifacts: golden manifest bytes, Ed25519 against RFC 8032, keys on disk, every verification failure."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.deploy.artifacts import (
    MANIFEST_FORMAT,
    ArtifactError,
    build_manifest,
    canonical_json,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign,
    verify_artifact,
    verify_candidate,
    verify_signature,
    write_artifact,
)
from fedge.files import write_bytes_atomic

GOLDEN = Path(__file__).parent / "golden"

MODEL = b"fedge-int8-model\x00\x01\x02"
LABELS = b"zero\none\ntwo\n"
GOLDEN_INPUTS = {
    "server_round": 3,
    "files": {"model.onnx": MODEL, "labels.txt": LABELS},
    "metrics": {"accuracy_fp32": 0.9375, "accuracy_int8": 0.921875, "num_examples": 128},
    "quantization": {"method": "dynamic", "num_bits": 8, "per_channel": True, "calibration_samples": 0},
    "parent": "round-0002",
    "created_at": "2026-01-02T03:04:05Z",
    "run_id": "00112233445566778899aabbccddeeff",
    "model": "cnn8",
    "release": 7,
}

# RFC 8032, section 7.1, TEST 1: empty message.
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def golden_manifest() -> dict:
    return build_manifest(**GOLDEN_INPUTS)


# ---------------------------------------------------------------------------- manifest bytes


def test_manifest_bytes_equal_the_golden_file() -> None:
    # The golden file was written by hand from sha256sum/wc output, not by this code.
    assert canonical_json(golden_manifest()) == (GOLDEN / "manifest.json").read_bytes()


def test_manifest_hashes_and_sizes_are_hashlibs() -> None:
    files = golden_manifest()["files"]
    assert files["model.onnx"] == {"sha256": hashlib.sha256(MODEL).hexdigest(), "bytes": 19}
    assert files["labels.txt"] == {"sha256": hashlib.sha256(LABELS).hexdigest(), "bytes": 13}
    assert files["model.onnx"]["sha256"] == "9bbd84a875256e6894bd52cb262e94e9ef6eb18865e2d24a5cf10ff567f9f045"


def test_manifest_fields() -> None:
    manifest = golden_manifest()
    assert manifest["format"] == MANIFEST_FORMAT == 2
    assert (manifest["round"], manifest["version"], manifest["parent"]) == (3, "round-0003", "round-0002")
    assert (manifest["run_id"], manifest["model"], manifest["release"]) == (
        "00112233445566778899aabbccddeeff",
        "cnn8",
        7,
    )
    assert manifest["candidate"] is False
    assert build_manifest(**GOLDEN_INPUTS, candidate=True)["candidate"] is True
    assert build_manifest(**{**GOLDEN_INPUTS, "server_round": 12345})["version"] == "round-12345"


def test_manifest_from_paths_equals_manifest_from_bytes(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(MODEL)
    (tmp_path / "labels.txt").write_bytes(LABELS)
    files = {"model.onnx": tmp_path / "model.onnx", "labels.txt": tmp_path / "labels.txt"}
    assert build_manifest(**{**GOLDEN_INPUTS, "files": files}) == golden_manifest()


def test_build_manifest_does_not_mutate_or_alias_its_arguments() -> None:
    metrics = {"accuracy_int8": 0.5}
    manifest = build_manifest(**{**GOLDEN_INPUTS, "metrics": metrics})
    manifest["metrics"]["accuracy_int8"] = 0.0
    assert metrics == {"accuracy_int8": 0.5}


@pytest.mark.parametrize(
    "name", ["../model.onnx", "sub/model.onnx", ".hidden", "manifest.json", "manifest.sig", ""]
)
def test_unsafe_file_names_are_refused(name: str) -> None:
    with pytest.raises(ArtifactError, match=r"cannot be an artifact file name"):
        build_manifest(**{**GOLDEN_INPUTS, "files": {name: MODEL}})


def test_nan_metric_is_refused() -> None:
    with pytest.raises(ArtifactError, match=r"canonical JSON"):
        build_manifest(**{**GOLDEN_INPUTS, "metrics": {"loss": float("nan")}})


def test_canonical_json_sorts_keys_keeps_utf8_and_ends_with_newline() -> None:
    assert canonical_json({"b": [1, 2.5, None], "a": "é"}) == b'{"a":"\xc3\xa9","b":[1,2.5,null]}\n'
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})


# ---------------------------------------------------------------------------- signatures


def test_rfc8032_test_1_through_sign() -> None:
    key = Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET)
    raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw_public == RFC8032_PUBLIC
    assert sign(key, b"") == RFC8032_SIGNATURE
    verify_signature(key.public_key(), b"", RFC8032_SIGNATURE)


def test_signature_is_64_bytes_and_deterministic() -> None:
    key = Ed25519PrivateKey.generate()
    data = canonical_json(golden_manifest())
    signature = sign(key, data)
    assert len(signature) == 64
    assert sign(key, data) == signature
    verify_signature(key.public_key(), data, signature)


def test_signature_by_another_key_fails() -> None:
    data = b"manifest bytes"
    signature = sign(Ed25519PrivateKey.generate(), data)
    with pytest.raises(ArtifactError, match=r"does not verify"):
        verify_signature(Ed25519PrivateKey.generate().public_key(), data, signature)


def test_altered_data_or_truncated_signature_fails() -> None:
    key = Ed25519PrivateKey.generate()
    signature = sign(key, b"abc")
    with pytest.raises(ArtifactError, match=r"does not verify"):
        verify_signature(key.public_key(), b"abd", signature)
    with pytest.raises(ArtifactError, match=r"63 bytes"):
        verify_signature(key.public_key(), b"abc", signature[:-1])


# ---------------------------------------------------------------------------- keys on disk


def test_generate_keypair_writes_0600_key_and_refuses_overwrite(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path / "keys")
    assert private_path.name == "signing.key" and public_path.name == "signing.pub"
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = private_path.read_bytes()
    with pytest.raises(ArtifactError, match=r"never overwritten"):
        generate_keypair(tmp_path / "keys")
    assert private_path.read_bytes() == before

    private_key, public_key = load_private_key(private_path), load_public_key(public_path)
    verify_signature(public_key, b"x", sign(private_key, b"x"))


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    private_path, _ = generate_keypair(tmp_path)
    os.chmod(private_path, 0o644)
    with pytest.raises(ArtifactError, match=f"chmod 600 {private_path}"):
        load_private_key(private_path)


def test_key_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no signing key at .*missing.key"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(ArtifactError, match=r"no public key at .*missing.pub"):
        load_public_key(tmp_path / "missing.pub")
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(ArtifactError, match=r"junk.key is not an unencrypted PEM private key"):
        load_private_key(junk)


def test_write_bytes_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "pointer"
    write_bytes_atomic(target, b"old\n")
    write_bytes_atomic(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pointer"]


# ---------------------------------------------------------------------------- artifacts


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def artifact(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    return write_artifact(tmp_path / "round-0003", GOLDEN_INPUTS["files"], golden_manifest(), key)


def test_write_then_verify_round_trip(artifact: Path, key: Ed25519PrivateKey) -> None:
    assert sorted(p.name for p in artifact.iterdir()) == [
        "labels.txt",
        "manifest.json",
        "manifest.sig",
        "model.onnx",
    ]
    assert (artifact / "manifest.json").read_bytes() == (GOLDEN / "manifest.json").read_bytes()
    assert (artifact / "model.onnx").read_bytes() == MODEL
    assert verify_artifact(artifact, key.public_key()) == golden_manifest()
    # Nothing half-written is left beside it.
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["round-0003"]


def test_write_artifact_refuses_existing_folder_and_mismatched_files(
    tmp_path: Path, artifact: Path, key: Ed25519PrivateKey
) -> None:
    with pytest.raises(ArtifactError, match=r"exists"):
        write_artifact(artifact, GOLDEN_INPUTS["files"], golden_manifest(), key)
    with pytest.raises(ArtifactError, match=r"does not match its manifest entry"):
        write_artifact(
            tmp_path / "other", {"model.onnx": b"other", "labels.txt": LABELS}, golden_manifest(), key
        )
    with pytest.raises(ArtifactError, match=r"differ from those the manifest lists"):
        write_artifact(tmp_path / "other", {"model.onnx": MODEL}, golden_manifest(), key)
    assert not (tmp_path / "other").exists()


def _resign(folder: Path, key: Ed25519PrivateKey, manifest: dict) -> None:
    """Replace the manifest with ``manifest`` and sign it properly."""
    data = canonical_json(manifest)
    (folder / "manifest.json").write_bytes(data)
    (folder / "manifest.sig").write_bytes(sign(key, data))


def test_verify_missing_manifest(artifact: Path, key: Ed25519PrivateKey) -> None:
    (artifact / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest round-0003/manifest.json is missing"):
        verify_artifact(artifact, key.public_key())


def test_verify_missing_signature(artifact: Path, key: Ed25519PrivateKey) -> None:
    (artifact / "manifest.sig").unlink()
    with pytest.raises(ArtifactError, match=r"signature round-0003/manifest.sig is missing"):
        verify_artifact(artifact, key.public_key())


def test_verify_edited_manifest(artifact: Path, key: Ed25519PrivateKey) -> None:
    text = (
        (artifact / "manifest.json")
        .read_bytes()
        .replace(b'"accuracy_int8":0.921875', b'"accuracy_int8":0.99')
    )
    (artifact / "manifest.json").write_bytes(text)
    with pytest.raises(ArtifactError, match=r"signature of round-0003/manifest.json does not verify"):
        verify_artifact(artifact, key.public_key())


def test_verify_wrong_key(artifact: Path) -> None:
    with pytest.raises(ArtifactError, match=r"signed with another key"):
        verify_artifact(artifact, Ed25519PrivateKey.generate().public_key())


def test_signature_is_checked_before_the_json_is_parsed(artifact: Path, key: Ed25519PrivateKey) -> None:
    (artifact / "manifest.json").write_bytes(b"{not json")
    with pytest.raises(ArtifactError, match=r"does not verify"):
        verify_artifact(artifact, key.public_key())


def test_verify_format_from_the_future(artifact: Path, key: Ed25519PrivateKey) -> None:
    _resign(artifact, key, {**golden_manifest(), "format": MANIFEST_FORMAT + 1})
    with pytest.raises(ArtifactError, match=r"format 3 .from the future.*upgrade fedge"):
        verify_artifact(artifact, key.public_key())


def test_verify_flipped_byte(artifact: Path, key: Ed25519PrivateKey) -> None:
    data = bytearray(MODEL)
    data[0] ^= 0x01
    (artifact / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"sha256 of round-0003/model.onnx differs"):
        verify_artifact(artifact, key.public_key())


def test_verify_truncated_file(artifact: Path, key: Ed25519PrivateKey) -> None:
    (artifact / "model.onnx").write_bytes(MODEL[:-1])
    with pytest.raises(ArtifactError, match=r"model.onnx is 18 bytes, the manifest says 19"):
        verify_artifact(artifact, key.public_key())


def test_verify_listed_file_missing(artifact: Path, key: Ed25519PrivateKey) -> None:
    (artifact / "labels.txt").unlink()
    with pytest.raises(ArtifactError, match=r"labels.txt is listed in the manifest but missing"):
        verify_artifact(artifact, key.public_key())


def test_verify_refuses_symlinked_file(artifact: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_bytes(LABELS)
    (artifact / "labels.txt").unlink()
    (artifact / "labels.txt").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ArtifactError, match=r"labels.txt"):
        verify_artifact(artifact, key.public_key())


def test_signed_manifest_with_path_traversal_is_refused(artifact: Path, key: Ed25519PrivateKey) -> None:
    manifest = golden_manifest()
    manifest["files"]["../escape"] = manifest["files"].pop("labels.txt")
    _resign(artifact, key, manifest)
    with pytest.raises(ArtifactError, match=r"unsafe name"):
        verify_artifact(artifact, key.public_key())


def test_unlisted_file_is_ignored_not_trusted(artifact: Path, key: Ed25519PrivateKey) -> None:
    (artifact / "extra.bin").write_bytes(b"anything")
    manifest = verify_artifact(artifact, key.public_key())
    assert "extra.bin" not in manifest["files"]


def test_every_message_is_one_line(artifact: Path, key: Ed25519PrivateKey) -> None:
    (artifact / "model.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError) as info:
        verify_artifact(artifact, key.public_key())
    assert "\n" not in str(info.value)
    assert json.loads((artifact / "manifest.json").read_bytes())["round"] == 3


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["manifest.json", "manifest.sig", "labels.txt"])
def test_a_fifo_in_the_folder_is_refused_at_once(artifact: Path, key: Ed25519PrivateKey, name: str) -> None:
    # A plain open() of a FIFO waits for a writer forever; verification must not.
    (artifact / name).unlink()
    os.mkfifo(artifact / name)
    with pytest.raises(ArtifactError, match=rf"round-0003/{name} is not a regular file \(a FIFO\)") as info:
        verify_artifact(artifact, key.public_key())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("run_id", "XYZ", "run_id 'XYZ' is not 32 lowercase hex digits"),
        ("model", "", "model '' is not a model name"),
        ("release", 0, "release 0 is not a whole number >= 1"),
        ("release", True, "release True is not a whole number >= 1"),
    ],
)
def test_bad_identity_fields_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        build_manifest(**{**GOLDEN_INPUTS, field: value})


def candidate_parts(
    key: Ed25519PrivateKey, *, candidate: bool = True
) -> tuple[bytes, bytes, dict[str, bytes]]:
    files = {"model.onnx": MODEL, "model.fp32.onnx": LABELS}
    data = canonical_json(build_manifest(**{**GOLDEN_INPUTS, "files": files}, candidate=candidate))
    return data, sign(key, data), files


def test_candidate_in_memory_verifies(key: Ed25519PrivateKey) -> None:
    data, signature, files = candidate_parts(key)
    manifest = verify_candidate(data, signature, files, key.public_key())
    assert manifest["candidate"] is True
    assert manifest["files"]["model.onnx"]["sha256"] == hashlib.sha256(MODEL).hexdigest()


def test_candidate_refusals(key: Ed25519PrivateKey) -> None:
    data, signature, files = candidate_parts(key)
    with pytest.raises(ArtifactError, match=r"candidate manifest does not verify"):
        verify_candidate(data, signature, files, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(ArtifactError, match=r"candidate model.onnx differs from its signed manifest"):
        verify_candidate(data, signature, {**files, "model.onnx": MODEL[:-1] + b"\x03"}, key.public_key())
    with pytest.raises(ArtifactError, match=r"differ from those its manifest lists"):
        verify_candidate(data, signature, {"model.onnx": MODEL}, key.public_key())
    release, release_sig, _ = candidate_parts(key, candidate=False)
    with pytest.raises(ArtifactError, match=r"is a release, not a candidate"):
        verify_candidate(release, release_sig, files, key.public_key())
