"""The device side: install signed versions, roll back, run and time the model.

Layout under the install folder::

    versions/round-0002-0123456789ab/    verified copies (model.onnx, manifest.json, .sig),
    versions/round-0003-fedcba987654/    named <version>-<first 12 hex digits of the run id>
    current     "round-0003-fedcba987654\\n"    the install that runs
    previous    "round-0002-0123456789ab\\n"    the install rollback returns to

Two runs that sign with one key both make a ``round-0003``; the run id in the folder
name keeps them apart, so a device that runs one run's ``round-0003`` can update to
another's. Which of two installs is newer is decided by the manifest's release number
alone, which grows per signing key across runs. (Pointers written by an older fedge,
``round-0003`` without a run id, are still read.)

An install verifies the source with the pinned public key before anything is copied,
copies only the files the manifest lists into a hidden staging folder, verifies the
copy again (the source may change under us), loads its model in ONNX Runtime (a model
that does not load never becomes current), renames it into ``versions/`` and then
moves the pointers, each atomically. Any failure leaves the installed version as it
was, byte for byte. A release older than or equal to the current one is refused
unless ``allow_rollback`` is passed: a replayed old artifact, validly signed, cannot
take a device back. A federated-check candidate is never installed. Loading
re-verifies the signature and hashes the very bytes that are handed to ONNX Runtime,
so a model altered on disk after install is refused.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.deploy.artifacts import (
    KEY_CANDIDATE,
    KEY_FILES,
    KEY_RELEASE,
    KEY_RUN_ID,
    KEY_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    ArtifactError,
    check_files,
    open_regular,
    read_regular,
    read_signed_manifest,
    read_verified_file,
    verify_artifact,
)
from fedge.deploy.registry import CURRENT_FILE, Registry, RegistryError
from fedge.files import fsync_dir, write_bytes_atomic

VERSIONS_DIR = "versions"
PREVIOUS_FILE = "previous"
STAGING_PREFIX = ".staging-"
_MAX_POINTER_BYTES = 256
# Hex digits of the run id in an install's folder name: 48 bits tell runs apart; were two
# runs ever to share them, the second's same-round version is refused, never mixed up.
RUN_ID_DIGITS = 12
# round-0003-0123456789ab, or round-0003 as an older fedge named installs.
_INSTALL_RE = re.compile(rf"(round-\d{{4,}})(?:-[0-9a-f]{{{RUN_ID_DIGITS}}})?")

# benchmark() keys.
LATENCY_MS_P50 = "latency_ms_p50"
LATENCY_MS_P95 = "latency_ms_p95"
LATENCY_MS_P99 = "latency_ms_p99"
LATENCY_MS_MEAN = "latency_ms_mean"
MODEL_BYTES = "model_bytes"
RUNS = "runs"
VERSION = "version"

_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
_ORT_TYPES = {
    **_ORT_FLOAT_TYPES,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


class DeviceRuntime:
    """Installed model versions on one device, trusted through one pinned public key.

    Parameters
    ----------
    install_dir : Path
        Where versions and pointers live; created on the first install.
    public_key : Ed25519PublicKey
        The server's public key, pinned on the device; nothing signed by another key is
        installed or loaded.
    """

    def __init__(self, install_dir: Path, public_key: Ed25519PublicKey) -> None:
        self.install_dir = Path(install_dir)
        self._public_key = public_key
        # (version, session) of the last verified load; the session holds the verified
        # bytes in memory, so later changes on disk cannot reach it.
        self._cached: tuple[str, ort.InferenceSession] | None = None

    # ------------------------------------------------------------------------ pointers

    @property
    def _versions_dir(self) -> Path:
        return self.install_dir / VERSIONS_DIR

    def _read_pointer(self, name: str) -> str | None:
        try:
            text = read_regular(self.install_dir / name, _MAX_POINTER_BYTES).decode("utf-8", "replace")
        except FileNotFoundError:
            return None
        install = text.strip()
        if _INSTALL_RE.fullmatch(install) is None:
            raise ArtifactError(
                f"{self.install_dir / name} holds {install!r}, not an installed version; "
                "install an artifact again"
            )
        return install

    def current_install(self) -> str | None:
        """The folder under ``versions/`` that runs (``round-0003-0123456789ab``), or None."""
        return self._read_pointer(CURRENT_FILE)

    def previous_install(self) -> str | None:
        """The folder under ``versions/`` :meth:`rollback` returns to, or None."""
        return self._read_pointer(PREVIOUS_FILE)

    def current_version(self) -> str | None:
        """The version that runs (``round-0003``, as in its manifest), or None before the first install."""
        install = self.current_install()
        return None if install is None else _version_of(install)

    def previous_version(self) -> str | None:
        """The version :meth:`rollback` returns to, or None."""
        install = self.previous_install()
        return None if install is None else _version_of(install)

    # ------------------------------------------------------------------------ install

    def install(self, source: Path, *, allow_rollback: bool = False) -> str:
        """Verify and install a version, make it current and keep the old one for rollback.

        Parameters
        ----------
        source : Path
            An artifact folder, or a registry root (its ``current`` version is taken).
        allow_rollback : bool, default False
            Accept a release older than or equal to the current one (an explicit
            rollback). Without it such a release is refused; installing the very
            artifact that is current again changes nothing either way.

        Returns
        -------
        str
            The version now current.

        Raises
        ------
        ArtifactError
            If the source does not verify with the pinned key (missing manifest or
            signature, bad signature, format from the future, missing, truncated or
            altered file), is a candidate, lists no ``model.onnx``, names an installed
            version with other contents, is not newer than the current release (without
            ``allow_rollback``), or its model does not load in ONNX Runtime. The
            installed version is then unchanged.

        Notes
        -----
        The copy goes to ``versions/<version>-<run id, 12 hex digits>``, so the same
        round of two runs sharing a key are two installs; a release is newer or not by
        its number only.
        """
        source = self._resolve_source(Path(source))
        # Nothing is copied or loaded before the source verifies.
        manifest, manifest_bytes = read_signed_manifest(source, self._public_key)
        check_files(source, manifest)
        where = f"{source.name}/{MANIFEST_FILE}"
        if manifest[KEY_CANDIDATE]:
            raise ArtifactError(
                f"{where} is a federated-check candidate, not a release; install a published version"
            )
        if MODEL_FILE not in manifest[KEY_FILES]:
            raise ArtifactError(f"{where} lists no {MODEL_FILE}; nothing to run")
        version = str(manifest[KEY_VERSION])
        install = install_name(manifest)
        old_current = self.current_install()
        if old_current is not None and self._check_not_older(
            manifest, manifest_bytes, old_current, where, allow_rollback
        ):
            install = old_current  # the very artifact that runs (maybe under an older fedge's name)
        target = self._versions_dir / install
        old_previous = _read_or_none(self.install_dir / PREVIOUS_FILE)

        created = False
        if target.exists():
            self._check_same_install(target, manifest_bytes, source)
            _load_check(read_verified_file(target, manifest, MODEL_FILE), where)
        else:
            self._versions_dir.mkdir(parents=True, exist_ok=True)
            staging = self.install_dir / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
            try:
                staging.mkdir()
                # Only the listed files travel: nothing unlisted is ever trusted.
                for name in [*manifest[KEY_FILES], MANIFEST_FILE, SIGNATURE_FILE]:
                    _copy_durably(source / name, staging / name)
                fsync_dir(staging)
                # The source may change while it is copied: the copy is what gets trusted.
                copied, copied_bytes = read_signed_manifest(staging, self._public_key)
                if copied_bytes != manifest_bytes:
                    raise ArtifactError(
                        f"{source} changed while it was copied; install it again once it is complete"
                    )
                check_files(staging, copied)
                _load_check(read_verified_file(staging, copied, MODEL_FILE), where)
                os.rename(staging, target)
                created = True
                fsync_dir(self._versions_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        try:
            if old_current != install:
                # previous before current: a crash in between leaves current as it was.
                if old_current is not None:
                    write_bytes_atomic(self.install_dir / PREVIOUS_FILE, f"{old_current}\n".encode())
                write_bytes_atomic(self.install_dir / CURRENT_FILE, f"{install}\n".encode())
        except BaseException:
            # current did not move (its write is the last step): put the rest back as it was.
            if old_previous is None:
                (self.install_dir / PREVIOUS_FILE).unlink(missing_ok=True)
            elif _read_or_none(self.install_dir / PREVIOUS_FILE) != old_previous:
                (self.install_dir / PREVIOUS_FILE).write_bytes(old_previous)
            if created:
                shutil.rmtree(target, ignore_errors=True)
            raise
        self._cached = None
        self._prune()
        return version

    def _resolve_source(self, source: Path) -> Path:
        if (source / MANIFEST_FILE).exists() or (source / SIGNATURE_FILE).exists():
            return source
        if (source / CURRENT_FILE).is_file():
            registry = Registry(source)
            try:
                version = registry.current()
                if version is None:
                    raise RegistryError(f"registry {source} has no current version")
                return registry.path(version)
            except RegistryError as err:
                raise ArtifactError(f"cannot install from registry {source}: {err}") from None
        raise ArtifactError(
            f"{source} is neither an artifact folder ({MANIFEST_FILE}) nor a registry ({CURRENT_FILE}); "
            "pass a published round-NNNN folder or the registry root"
        )

    def _check_not_older(
        self,
        manifest: dict[str, Any],
        manifest_bytes: bytes,
        current: str,
        where: str,
        allow_rollback: bool,
    ) -> bool:
        """Refuse a release not newer than the current one, unless a rollback is asked.

        Returns True when the source is the very artifact installed as ``current``.
        """
        try:
            installed, installed_bytes = read_signed_manifest(self._versions_dir / current, self._public_key)
        except ArtifactError as err:
            if allow_rollback:
                return False
            raise ArtifactError(
                f"the installed {current} does not verify ({err}); its release is unknown, so install "
                "with allow_rollback (fedge infer --allow-rollback) to replace it"
            ) from None
        if installed_bytes == manifest_bytes:
            return True  # the same artifact again
        if allow_rollback:
            return False  # an explicit rollback
        new, old = manifest[KEY_RELEASE], installed[KEY_RELEASE]
        if new <= old:
            same_run = "this run" if manifest[KEY_RUN_ID] == installed[KEY_RUN_ID] else "another run"
            raise ArtifactError(
                f"{where} is release {new} ({manifest[KEY_VERSION]}, {same_run}), not newer than the "
                f"installed release {old} ({installed[KEY_VERSION]}); a device never goes back unless asked: "
                "pass allow_rollback (fedge infer --allow-rollback) to install it anyway"
            )
        return False

    def _check_same_install(self, target: Path, manifest_bytes: bytes, source: Path) -> None:
        """An already installed version is reused only if it is intact and identical."""
        try:
            _, installed_bytes = read_signed_manifest(target, self._public_key)
            verify_artifact(target, self._public_key)
        except ArtifactError as err:
            raise ArtifactError(
                f"installed copy {target} is damaged ({err}); roll back or install another version, "
                f"then remove {target} and install again"
            ) from None
        if installed_bytes != manifest_bytes:
            raise ArtifactError(
                f"{self._versions_dir.name}/{target.name} is installed with another manifest than {source}; "
                "versions are immutable: publish a new round"
            )

    def _prune(self) -> None:
        """Remove versions neither current nor previous, and staging left by a crash."""
        keep = {self.current_install(), self.previous_install()}
        if self._versions_dir.is_dir():
            for child in self._versions_dir.iterdir():
                if child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True)
        for child in self.install_dir.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------------ rollback

    def rollback(self) -> str:
        """Make the previous version current again; the version rolled back from is removed.

        Returns
        -------
        str
            The version now current.

        Raises
        ------
        ArtifactError
            If there is no previous version, or its installed copy no longer verifies.
        """
        previous = self.previous_install()
        current = self.current_install()
        if previous is None or previous == current:
            raise ArtifactError(
                f"no previous version in {self.install_dir} to roll back to; install a known good artifact"
            )
        verify_artifact(self._versions_dir / previous, self._public_key)
        write_bytes_atomic(self.install_dir / CURRENT_FILE, f"{previous}\n".encode())
        # One step back only: rolling back again must not return to the bad version.
        (self.install_dir / PREVIOUS_FILE).unlink(missing_ok=True)
        fsync_dir(self.install_dir)
        self._cached = None
        self._prune()
        return _version_of(previous)

    # ------------------------------------------------------------------------ running

    def _current_dir(self) -> tuple[str, Path]:
        """(version, folder) of the current install."""
        install = self.current_install()
        if install is None:
            raise ArtifactError(f"nothing is installed in {self.install_dir}; install an artifact first")
        return _version_of(install), self._versions_dir / install

    def model_bytes(self) -> bytes:
        """The current ``model.onnx``, after verifying the signature and the hash of these bytes.

        Raises
        ------
        ArtifactError
            If nothing is installed, or the installed copy was altered.
        """
        _, folder = self._current_dir()
        manifest, _ = read_signed_manifest(folder, self._public_key)
        return read_verified_file(folder, manifest, MODEL_FILE)

    def session(self, *, intra_op_threads: int = 0) -> ort.InferenceSession:
        """A new ONNX Runtime session of the current version, loaded from verified bytes.

        Parameters
        ----------
        intra_op_threads : int
            Threads per operator; 0 (default) lets ONNX Runtime choose.

        Raises
        ------
        ArtifactError
            If nothing is installed, or the installed files were altered since install.
        """
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        version, _ = self._current_dir()
        return _load(self.model_bytes(), options, f"{version}/{MODEL_FILE}")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class ids (argmax over the last axis of the first output) for a batch ``x``.

        The session is verified and loaded once per version and then reused.
        """
        _, folder = self._current_dir()
        if self._cached is None or self._cached[0] != folder.name:
            self._cached = (folder.name, self.session())
        sess = self._cached[1]
        inp = sess.get_inputs()[0]
        dtype = _ORT_FLOAT_TYPES.get(inp.type)
        feed = np.ascontiguousarray(x, dtype=dtype) if dtype is not None else np.ascontiguousarray(x)
        logits = sess.run(None, {inp.name: feed})[0]
        return np.asarray(logits).argmax(axis=-1)

    def benchmark(self, runs: int = 200, *, warmup_runs: int = 20) -> dict[str, Any]:
        """Latency of the current version: 1 thread, batch 1, after warm-up.

        The input is zeros of the model's input shape (symbolic dimensions set to 1);
        dense models' latency does not depend on the values.

        Parameters
        ----------
        runs : int
            Timed runs (default 200).
        warmup_runs : int
            Untimed runs first (default 20).

        Returns
        -------
        dict
            ``latency_ms_p50``, ``latency_ms_p95``, ``latency_ms_p99``,
            ``latency_ms_mean`` (ms), ``model_bytes`` (size of model.onnx), ``runs``,
            ``version``.
        """
        if runs < 1 or warmup_runs < 0:
            raise ValueError(f"runs must be >= 1 and warmup_runs >= 0, got {runs} and {warmup_runs}")
        version, _ = self._current_dir()
        model = self.model_bytes()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = _load(model, options, f"{version}/{MODEL_FILE}")
        feed = {
            inp.name: np.zeros(
                [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape],
                dtype=_ORT_TYPES.get(inp.type, np.float32),
            )
            for inp in sess.get_inputs()
        }
        for _ in range(warmup_runs):
            sess.run(None, feed)
        times_ms = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter_ns()
            sess.run(None, feed)
            times_ms[i] = (time.perf_counter_ns() - start) / 1e6
        p50, p95, p99 = np.percentile(times_ms, [50, 95, 99])
        return {
            LATENCY_MS_P50: float(p50),
            LATENCY_MS_P95: float(p95),
            LATENCY_MS_P99: float(p99),
            LATENCY_MS_MEAN: float(times_ms.mean()),
            MODEL_BYTES: len(model),
            RUNS: runs,
            VERSION: version,
        }


def install_name(manifest: dict[str, Any]) -> str:
    """The folder a verified release is installed as: ``round-0003-0123456789ab``.

    The version and the first :data:`RUN_ID_DIGITS` hex digits of the run id, so the same
    round of two runs never shares a folder.
    """
    return f"{manifest[KEY_VERSION]}-{str(manifest[KEY_RUN_ID])[:RUN_ID_DIGITS]}"


def _version_of(install: str) -> str:
    """``round-0003`` of the install folder name ``round-0003-0123456789ab`` (or ``round-0003``)."""
    match = _INSTALL_RE.fullmatch(install)
    if match is None:
        raise ArtifactError(f"{install!r} is not an installed version")
    return match.group(1)


def _load(model: bytes, options: ort.SessionOptions, where: str) -> ort.InferenceSession:
    """An ONNX Runtime session of verified ``model`` bytes; ArtifactError (one line) if ORT refuses."""
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types, with long messages
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise ArtifactError(
            f"{where} is signed but ONNX Runtime cannot load it ({first[:300]}); "
            "publish a model this device's onnxruntime loads"
        ) from None


def _load_check(model: bytes, where: str) -> None:
    """Load ``model`` once in ONNX Runtime before it may become current."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    _load(model, options, where)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _copy_durably(src: Path, dst: Path) -> None:
    """Copy a regular file (never through a symlink) and fsync the copy."""
    try:
        fd = open_regular(src)
    except FileNotFoundError:
        raise ArtifactError(
            f"{src.parent.name}/{src.name} vanished while it was copied; install again"
        ) from None
    with os.fdopen(fd, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())
