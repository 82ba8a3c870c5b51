"""Signed model artifacts: the manifest, its canonical bytes, Ed25519 keys and verification.

A published version is a folder ``round-NNNN/`` holding the model files, ``manifest.json``
(canonical JSON: the round, the sha256 and size of every file, metrics, quantization
settings, the parent version, the run id, the model name and the release number) and
``manifest.sig``, the raw 64-byte Ed25519 signature (RFC 8032) over the exact bytes of
``manifest.json``. Since the manifest pins every file's hash, one signature covers the
whole folder.

Format 2 (this fedge) adds to format 1:

* ``run_id``: 32 lowercase hex digits naming the fedge run (one per run folder, kept on
  resume), so two runs that share a signing key never pass for one another;
* ``model``: the zoo model's name (``cnn8``, ``mlp``, ...);
* ``release``: an integer >= 1 that only grows per signing key, across every run and
  registry that signs with it (``fedge.deploy.registry.ReleaseCounter``, a counter
  beside the key); a device refuses a release older than or equal to the one it runs,
  from this run or another, unless a rollback is asked explicitly;
* ``candidate``: true for the model the server sends clients for the federated int8
  check, signed like a release so a client verifies it before it loads a byte, but
  never installable or publishable as one.

Every file is opened without blocking and without following links, and refused unless
it is a regular file, so a FIFO or a device node in an artifact folder cannot make a
reader hang.

A reader verifies in a fixed order: the signature over the manifest bytes first, and
only then parses them, checks the format and hashes the files. Nothing is unpickled and
nothing from the folder is used before the signature holds. The crypto functions are
thin wrappers over ``cryptography``, one primitive each.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.files import fsync_dir

MANIFEST_FORMAT = 2
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
MODEL_FILE = "model.onnx"
PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
SIGNATURE_BYTES = 64
# A manifest lists a handful of files; anything this large is not one, and is refused
# before it is read into memory.
MAX_MANIFEST_BYTES = 1 << 20

# Manifest keys.
KEY_FORMAT = "format"
KEY_ROUND = "round"
KEY_VERSION = "version"
KEY_CREATED_AT = "created_at"
KEY_PARENT = "parent"
KEY_FILES = "files"
KEY_METRICS = "metrics"
KEY_QUANTIZATION = "quantization"
KEY_SHA256 = "sha256"
KEY_BYTES = "bytes"
KEY_RUN_ID = "run_id"
KEY_MODEL = "model"
KEY_RELEASE = "release"
KEY_CANDIDATE = "candidate"

# ConfigRecord keys of the federated int8 check's message: the candidate travels as a
# signed manifest, its signature and the bytes of the files it lists.
CANDIDATE_MANIFEST = "candidate-manifest"
CANDIDATE_SIGNATURE = "candidate-signature"
CANDIDATE_FP32_FILE = "model.fp32.onnx"

_VERSION_RE = re.compile(r"round-(\d{4,})")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_RUN_ID_RE = re.compile(r"[0-9a-f]{32}")
_RESERVED_NAMES = frozenset({MANIFEST_FILE, SIGNATURE_FILE})


class ArtifactError(ValueError):
    """An artifact or key that cannot be trusted or used; the message says what and how to fix it."""


# ---------------------------------------------------------------------------- names and JSON


def version_name(server_round: int) -> str:
    """The version name of ``server_round``: ``round-0003`` (zero-padded to at least 4 digits)."""
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise ArtifactError(f"server_round must be a whole number >= 0, got {server_round!r}")
    return f"round-{server_round:04d}"


def version_round(version: str) -> int:
    """The round of a version name (``round-0003`` -> 3).

    Raises
    ------
    ArtifactError
        If ``version`` is not of the form ``round-NNNN``.
    """
    match = _VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise ArtifactError(f"{version!r} is not a version name; versions look like 'round-0003'")
    return int(match.group(1))


def canonical_json(obj: Any) -> bytes:
    """The deterministic UTF-8 bytes of ``obj``: sorted keys, no spaces, one trailing newline.

    NaN and infinities are refused (they are not JSON), so every manifest parses anywhere.

    Raises
    ------
    ArtifactError
        If ``obj`` holds a value JSON cannot represent.
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ArtifactError(
            f"cannot write canonical JSON ({err}); use str, int, float (finite), bool, None, list and dict"
        ) from None
    return text.encode("utf-8") + b"\n"


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data`` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def _check_file_name(name: object) -> str:
    """``name`` if it is a plain file name an artifact may hold, else ArtifactError."""
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name in _RESERVED_NAMES
    ):
        raise ArtifactError(
            f"{name!r} cannot be an artifact file name; use a plain name such as 'model.onnx' "
            f"(no folders, no leading dot, not {MANIFEST_FILE} or {SIGNATURE_FILE})"
        )
    return name


def _file_entry(data: bytes | Path) -> dict[str, Any]:
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        return {KEY_SHA256: sha256_hex(raw), KEY_BYTES: len(raw)}
    path = Path(data)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as err:
        raise ArtifactError(f"cannot read {path} for the manifest ({err.strerror})") from None
    return {KEY_SHA256: digest.hexdigest(), KEY_BYTES: size}


def build_manifest(
    *,
    server_round: int,
    files: dict[str, bytes | Path],
    metrics: dict[str, Any],
    quantization: dict[str, Any],
    parent: str | None,
    created_at: str,
    run_id: str,
    model: str,
    release: int,
    candidate: bool = False,
) -> dict[str, Any]:
    """The manifest of a version: what it is, where it came from, and the hash of every file.

    Parameters
    ----------
    server_round : int
        The round whose global model this is (1-based as in Flower; 0 allowed for an
        initial model). The version is ``round-NNNN``.
    files : dict[str, bytes | Path]
        File name in the artifact -> its bytes, or a path to read them from.
    metrics : dict
        JSON-serialisable metrics (e.g. fp32 and int8 accuracy); copied, not referenced.
    quantization : dict
        JSON-serialisable quantization settings; copied.
    parent : str or None
        The version this one follows, or None for the first.
    created_at : str
        ISO 8601 UTC time, passed in so that identical inputs give identical bytes.
    run_id : str
        The fedge run's id, 32 lowercase hex digits (``fedge.server.export_hook.run_id``).
    model : str
        The model's name in the zoo, e.g. ``"cnn8"``.
    release : int
        The monotonic release number, >= 1 (``ReleaseCounter.take`` of the signing key).
    candidate : bool, default False
        True for a federated-check candidate: signed, but never installed or published.

    Returns
    -------
    dict
        ``{"format", "round", "version", "created_at", "parent", "files": {name:
        {"sha256", "bytes"}}, "metrics", "quantization", "run_id", "model", "release",
        "candidate"}``.

    Raises
    ------
    ArtifactError
        On a bad round, file name, parent, run id, model name, release, or a value JSON
        cannot hold.
    """
    version = version_name(server_round)
    if parent is not None:
        version_round(parent)
    _check_identity(run_id, model, release, candidate, "build_manifest")
    if not files:
        raise ArtifactError("an artifact needs at least one file (model.onnx)")
    entries = {_check_file_name(name): _file_entry(data) for name, data in sorted(files.items())}
    # A JSON round trip deep-copies the caller's dicts and fails early on what cannot be signed.
    manifest = {
        KEY_FORMAT: MANIFEST_FORMAT,
        KEY_ROUND: server_round,
        KEY_VERSION: version,
        KEY_CREATED_AT: str(created_at),
        KEY_PARENT: parent,
        KEY_FILES: entries,
        KEY_METRICS: dict(metrics),
        KEY_QUANTIZATION: dict(quantization),
        KEY_RUN_ID: run_id,
        KEY_MODEL: model,
        KEY_RELEASE: release,
        KEY_CANDIDATE: candidate,
    }
    result: dict[str, Any] = json.loads(canonical_json(manifest))
    return result


def _check_identity(run_id: object, model: object, release: object, candidate: object, where: str) -> None:
    if not isinstance(run_id, str) or _RUN_ID_RE.fullmatch(run_id) is None:
        raise ArtifactError(
            f"{where}: run_id {run_id!r} is not 32 lowercase hex digits; use export_hook.run_id"
        )
    if not isinstance(model, str) or not model or len(model) > 64:
        raise ArtifactError(f"{where}: model {model!r} is not a model name such as 'cnn8'")
    if isinstance(release, bool) or not isinstance(release, int) or release < 1:
        raise ArtifactError(f"{where}: release {release!r} is not a whole number >= 1")
    if not isinstance(candidate, bool):
        raise ArtifactError(f"{where}: candidate {candidate!r} is not true or false")


# ---------------------------------------------------------------------------- file helpers


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path`` if it is a regular file; never blocks, never follows a link.

    ``O_NONBLOCK`` makes opening a FIFO return at once (a plain open waits for a writer
    forever) and ``fstat`` on the descriptor checks the very file that was opened.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (callers name what is missing).
    ArtifactError
        If it is a link, a FIFO, a folder, a device or anything but a regular file, or
        cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise ArtifactError(
            f"cannot open {_where(Path(path))} ({err.strerror}); it must be a regular file, not a link"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ArtifactError(
                f"{_where(Path(path))} is not a regular file (a {_file_kind(mode)}); "
                "an artifact holds plain files only: copy the artifact again"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISDIR, "folder"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "link"),
    ):
        if test(mode):
            return name
    return "special file"


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular`).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ArtifactError
        If it is not a regular file, cannot be read, or is larger than ``limit``.
    """
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise ArtifactError(f"cannot read {_where(Path(path))} ({err.strerror})") from None
    if len(data) > limit:
        raise ArtifactError(f"{_where(Path(path))} is larger than {limit} bytes; it is not a fedge file")
    return data


def _write_new_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    # O_EXCL: never overwrite; the mode is set at creation, so there is no moment the file
    # exists with looser permissions.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------- keys


def generate_keypair(out_dir: Path) -> tuple[Path, Path]:
    """Make a new Ed25519 key pair: ``out_dir/signing.key`` (mode 0600) and ``out_dir/signing.pub``.

    The private key is PEM PKCS#8 (unencrypted: protect it with file permissions), the
    public key PEM SubjectPublicKeyInfo; devices pin the public key.

    Returns
    -------
    tuple[Path, Path]
        ``(private_key_path, public_key_path)``.

    Raises
    ------
    ArtifactError
        If either file exists already (keys are never overwritten).
    """
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise ArtifactError(
                f"{path} exists; keys are never overwritten: move it away or pick another folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        _write_new_file(private_path, private_pem, 0o600)
    except FileExistsError:
        raise ArtifactError(f"{private_path} appeared while writing; keys are never overwritten") from None
    try:
        _write_new_file(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    fsync_dir(out_dir)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM PKCS#8, unencrypted).

    Raises
    ------
    ArtifactError
        If the file is missing or unreadable, readable by group or others (POSIX), or
        not an Ed25519 key. The message never contains key material.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"no signing key at {path}; make one with `fedge keys new`") from None
    except OSError as err:
        raise ArtifactError(f"cannot read signing key {path} ({err.strerror}); check its owner") from None
    if os.name == "posix" and mode & 0o077:
        raise ArtifactError(
            f"signing key {path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message is not repeated: it could quote part of the file.
        raise ArtifactError(
            f"{path} is not an unencrypted PEM private key; make one with `fedge keys new`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ArtifactError(f"{path} is a {type(key).__name__}, not an Ed25519 key; fedge signs with Ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM SubjectPublicKeyInfo).

    Raises
    ------
    ArtifactError
        If the file is missing, unreadable or not an Ed25519 public key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(
            f"no public key at {path}; copy {PUBLIC_KEY_FILE} from the server and pin it here"
        ) from None
    except OSError as err:
        raise ArtifactError(f"cannot read public key {path} ({err.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ArtifactError(
            f"{path} is not a PEM public key; copy {PUBLIC_KEY_FILE} from the server"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ArtifactError(f"{path} is a {type(key).__name__}, not an Ed25519 key; fedge signs with Ed25519")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name for a public key in messages: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


# ---------------------------------------------------------------------------- signatures


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data`` (deterministic: same key and data, same bytes)."""
    return private_key.sign(data)


def verify_signature(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature over ``data``.

    Raises
    ------
    ArtifactError
        If ``signature`` is not 64 bytes or does not verify with ``public_key``.
    """
    if len(signature) != SIGNATURE_BYTES:
        raise ArtifactError(
            f"signature is {len(signature)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}; "
            "it was truncated or is not a signature"
        )
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        raise ArtifactError(
            f"signature does not verify with public key {key_id(public_key)}; "
            "the data was altered or signed with another key"
        ) from None


# ---------------------------------------------------------------------------- artifacts


def write_artifact(
    out_dir: Path, files: dict[str, bytes], manifest: dict[str, Any], private_key: Ed25519PrivateKey
) -> Path:
    """Write a signed artifact folder: the files, ``manifest.json`` (canonical) and ``manifest.sig``.

    The folder is written under a hidden temporary name beside ``out_dir``, fsynced and
    renamed, so ``out_dir`` either does not exist or is complete.

    Parameters
    ----------
    out_dir : Path
        The folder to create; it must not exist.
    files : dict[str, bytes]
        The files, exactly those the manifest lists with the same hashes and sizes.
    manifest : dict
        From :func:`build_manifest` (not modified).
    private_key : Ed25519PrivateKey
        The signing key.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ArtifactError
        If ``out_dir`` exists or the files do not match the manifest.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ArtifactError(f"{out_dir} exists; an artifact folder is written once, pick a new one")
    listed = manifest.get(KEY_FILES)
    if not isinstance(listed, dict) or set(listed) != set(files):
        raise ArtifactError(
            f"files {sorted(files)} differ from those the manifest lists "
            f"{sorted(listed) if isinstance(listed, dict) else listed!r}; build the manifest from these files"
        )
    for name, data in files.items():
        _check_file_name(name)
        if listed[name] != _file_entry(data):
            raise ArtifactError(
                f"{name} does not match its manifest entry; build the manifest from the bytes you write"
            )
    manifest_bytes = canonical_json(manifest)
    signature = sign(private_key, manifest_bytes)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        for name, data in files.items():
            _write_new_file(tmp / name, bytes(data))
        _write_new_file(tmp / MANIFEST_FILE, manifest_bytes)
        _write_new_file(tmp / SIGNATURE_FILE, signature)
        fsync_dir(tmp)
        if out_dir.exists():
            raise ArtifactError(f"{out_dir} appeared while writing; an artifact folder is written once")
        os.rename(tmp, out_dir)
    except BaseException:
        _remove_tree(tmp)
        raise
    fsync_dir(out_dir.parent)
    return out_dir


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _read_small(path: Path, limit: int, what: str) -> bytes:
    try:
        return read_regular(path, limit)
    except FileNotFoundError:
        raise ArtifactError(
            f"{what} {_where(path)} is missing; copy the whole artifact folder again or re-publish it"
        ) from None


def _where(path: Path) -> str:
    # "round-0003/manifest.json": enough to find it, short enough for one line.
    return f"{path.parent.name}/{path.name}"


def _check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """The manifest's structure, checked after the signature and the format."""

    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{where} {what}; it was not written by fedge's build_manifest")

    server_round = manifest.get(KEY_ROUND)
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise bad(f"has no valid round ({server_round!r})")
    try:
        _check_identity(
            manifest.get(KEY_RUN_ID),
            manifest.get(KEY_MODEL),
            manifest.get(KEY_RELEASE),
            manifest.get(KEY_CANDIDATE),
            where,
        )
    except ArtifactError as err:
        raise bad(str(err).removeprefix(f"{where}: ").split(";")[0]) from None
    if manifest.get(KEY_VERSION) != version_name(server_round):
        raise bad(f"names version {manifest.get(KEY_VERSION)!r} for round {server_round}")
    files = manifest.get(KEY_FILES)
    if not isinstance(files, dict) or not files:
        raise bad("lists no files")
    for name, entry in files.items():
        try:
            _check_file_name(name)
        except ArtifactError:
            raise bad(f"lists a file with an unsafe name {name!r}") from None
        size = entry.get(KEY_BYTES) if isinstance(entry, dict) else None
        digest = entry.get(KEY_SHA256) if isinstance(entry, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"has no valid size for {name}")
        if not isinstance(digest, str) or _SHA256_RE.fullmatch(digest) is None:
            raise bad(f"has no valid sha256 for {name}")
    return dict(manifest)


def check_file(artifact_dir: Path, name: str, entry: dict[str, Any]) -> None:
    """Check that ``artifact_dir/name`` is a regular file with the entry's size and sha256.

    Raises
    ------
    ArtifactError
        If it is missing, not a regular file, of another size (truncated or padded), or
        of another hash (altered).
    """
    path = Path(artifact_dir) / name
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise ArtifactError(
            f"{_where(path)} is listed in the manifest but missing; copy the whole artifact folder again"
        ) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_size != entry[KEY_BYTES]:
            raise ArtifactError(
                f"{_where(path)} is {st.st_size} bytes, the manifest says {entry[KEY_BYTES]}; "
                "it was truncated or altered: copy the artifact again"
            )
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if digest != entry[KEY_SHA256]:
        raise ArtifactError(
            f"sha256 of {_where(path)} differs from the manifest; the file was altered: "
            "copy the artifact again"
        )


def read_verified_file(artifact_dir: Path, manifest: dict[str, Any], name: str) -> bytes:
    """The bytes of a file of a verified manifest, checked against its size and sha256 as read.

    Reading once and checking those very bytes leaves no gap between check and use.

    Raises
    ------
    ArtifactError
        If the manifest does not list ``name``, or the bytes on disk differ.
    """
    entry = manifest[KEY_FILES].get(name)
    path = Path(artifact_dir) / name
    if entry is None:
        raise ArtifactError(f"{_where(path.parent / MANIFEST_FILE)} does not list {name}")
    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            data = fh.read(entry[KEY_BYTES] + 1)
    except FileNotFoundError:
        raise ArtifactError(f"{_where(path)} is missing; install the artifact again") from None
    except OSError as err:
        raise ArtifactError(
            f"cannot read {_where(path)} ({err.strerror}); install the artifact again"
        ) from None
    if len(data) != entry[KEY_BYTES]:
        raise ArtifactError(
            f"{_where(path)} is not {entry[KEY_BYTES]} bytes as the manifest says; it was truncated or "
            "altered after install: install the artifact again"
        )
    if sha256_hex(data) != entry[KEY_SHA256]:
        raise ArtifactError(
            f"sha256 of {_where(path)} differs from the manifest; it was altered after install: "
            "install the artifact again"
        )
    return data


def read_signed_manifest(artifact_dir: Path, public_key: Ed25519PublicKey) -> tuple[dict[str, Any], bytes]:
    """Verify the signature of ``artifact_dir/manifest.json``, then parse and check it.

    Files are not hashed here (see :func:`verify_artifact`).

    Returns
    -------
    tuple[dict, bytes]
        The manifest and its exact signed bytes.

    Raises
    ------
    ArtifactError
        If the manifest or its signature is missing or not a regular file, or
        :func:`parse_signed_manifest` refuses it.
    """
    artifact_dir = Path(artifact_dir)
    manifest_path = artifact_dir / MANIFEST_FILE
    if not artifact_dir.is_dir():
        raise ArtifactError(f"{artifact_dir} is not a folder; pass a published artifact folder (round-NNNN)")
    manifest_bytes = _read_small(manifest_path, MAX_MANIFEST_BYTES, "manifest")
    signature = _read_small(artifact_dir / SIGNATURE_FILE, SIGNATURE_BYTES, "signature")
    return parse_signed_manifest(manifest_bytes, signature, public_key, _where(manifest_path)), manifest_bytes


def parse_signed_manifest(
    manifest_bytes: bytes, signature: bytes, public_key: Ed25519PublicKey, where: str
) -> dict[str, Any]:
    """Verify ``signature`` over ``manifest_bytes``, then parse and check the manifest.

    The order is fixed: nothing of the bytes is parsed before the signature holds.

    Parameters
    ----------
    manifest_bytes, signature : bytes
        The exact manifest bytes and their 64-byte Ed25519 signature.
    public_key : Ed25519PublicKey
        The pinned key.
    where : str
        How messages name the manifest, e.g. ``"round-0003/manifest.json"``.

    Raises
    ------
    ArtifactError
        If the signature does not verify, the bytes are not a JSON object, the format
        is older than this fedge reads (no run id or release) or newer, or a field is
        missing or malformed.
    """
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{where} is larger than {MAX_MANIFEST_BYTES} bytes; it is not a fedge manifest")
    try:
        verify_signature(public_key, manifest_bytes, signature)
    except ArtifactError:
        raise ArtifactError(
            f"signature of {where} does not verify with public key {key_id(public_key)}; "
            "the artifact was altered or signed with another key"
        ) from None
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArtifactError(f"{where} is signed but is not JSON; re-publish it with fedge") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where} is signed but is not a JSON object; re-publish it with fedge")
    fmt = manifest.get(KEY_FORMAT)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise ArtifactError(f"{where} has no valid format field ({fmt!r}); re-publish it with fedge")
    if fmt > MANIFEST_FORMAT:
        raise ArtifactError(
            f"{where} has format {fmt} (from the future): this fedge reads up to {MANIFEST_FORMAT}; "
            "upgrade fedge on this device"
        )
    if fmt < MANIFEST_FORMAT:
        raise ArtifactError(
            f"{where} has format {fmt}, which names no run and no release number, so a device cannot "
            f"refuse a downgrade; re-export the model with this fedge (format {MANIFEST_FORMAT})"
        )
    return _check_manifest(manifest, where)


def verify_candidate(
    manifest_bytes: bytes, signature: bytes, files: dict[str, bytes], public_key: Ed25519PublicKey
) -> dict[str, Any]:
    """Verify a signed candidate held in memory (the federated int8 check's message).

    In this order: the signature over ``manifest_bytes``, the format and fields, the
    ``candidate`` mark, then that ``files`` holds exactly the listed files with the
    listed sizes and sha256. Only then may a caller load the bytes.

    Parameters
    ----------
    manifest_bytes, signature : bytes
        As received.
    files : dict[str, bytes]
        File name -> bytes, as received.
    public_key : Ed25519PublicKey
        The client's pinned key.

    Returns
    -------
    dict
        The manifest.

    Raises
    ------
    ArtifactError
        With a one-line reason if any check fails.
    """
    where = "candidate manifest"
    manifest = parse_signed_manifest(manifest_bytes, signature, public_key, where)
    if manifest[KEY_CANDIDATE] is not True:
        raise ArtifactError(f"{where} is a release, not a candidate; the server sends candidates only")
    listed = manifest[KEY_FILES]
    if set(files) != set(listed):
        raise ArtifactError(
            f"candidate files {sorted(files)} differ from those its manifest lists {sorted(listed)}"
        )
    for name, data in files.items():
        if len(data) != listed[name][KEY_BYTES] or sha256_hex(data) != listed[name][KEY_SHA256]:
            raise ArtifactError(
                f"candidate {name} differs from its signed manifest; it was altered in transit"
            )
    return manifest


def verify_artifact(artifact_dir: Path, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Verify an artifact folder and return its manifest.

    In this order: read ``manifest.json`` and ``manifest.sig``; verify the signature over
    the exact manifest bytes; parse them; refuse a format newer than
    :data:`MANIFEST_FORMAT`; check that every listed file is a regular file with the
    listed size and sha256. Files the manifest does not list are ignored, never trusted:
    readers use listed files only.

    Raises
    ------
    ArtifactError
        With a one-line reason: missing manifest or signature, bad signature (altered
        manifest or another key), a format from the future, a missing file, a size
        mismatch (truncated), or a hash mismatch (altered file).
    """
    manifest, _ = read_signed_manifest(artifact_dir, public_key)
    check_files(artifact_dir, manifest)
    return manifest


def check_files(artifact_dir: Path, manifest: dict[str, Any]) -> None:
    """Check every file a (signature-verified) manifest lists: see :func:`check_file`."""
    for name, entry in manifest[KEY_FILES].items():
        check_file(artifact_dir, name, entry)
