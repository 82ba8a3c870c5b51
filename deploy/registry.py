"""The server's registry of published versions, with a ``current`` pointer and rollback.

Layout under the registry root::

    round-0001/  round-0002/  round-0003/     one signed artifact folder per version
    current                                   "round-0003\\n": the version devices install

Versions are immutable: published once by an atomic rename, never rewritten. Each
carries a release number that only grows; publish refuses a release that is not above
every published one, and a federated-check candidate (``"candidate": true``)
altogether. Two runs sharing one registry folder cannot both publish a round: the
second ``round-0003`` is refused with one line naming the run that published it.

Release numbers are handed out per signing key, not per registry
(:class:`ReleaseCounter`, a small file beside the key): every run that signs with one
key draws from one counter, so devices that pin the key can order any two of its
releases, whichever run and registry they came from. The pointer is replaced atomically
(temporary file, fsync, ``os.replace``, fsync of the folder), so at every moment it
names the old version or the new one, never nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.deploy.artifacts import (
    KEY_CANDIDATE,
    KEY_RELEASE,
    KEY_RUN_ID,
    KEY_VERSION,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    SIGNATURE_FILE,
    ArtifactError,
    read_regular,
    verify_artifact,
    version_round,
)
from fedge.files import fsync_dir, write_bytes_atomic

CURRENT_FILE = "current"
# "round-0003\n" and nothing else: a pointer larger than this is not one.
_MAX_POINTER_BYTES = 256
# Beside the signing key: keys/signing.key -> keys/signing.key.releases (+ .lock).
RELEASES_SUFFIX = ".releases"
LOCK_SUFFIX = ".lock"
_MAX_COUNTER_BYTES = 64


class RegistryError(ArtifactError):
    """A registry operation that cannot be done; the message lists what can.

    A kind of :class:`ArtifactError`, so code that publishes can catch one error type.
    """


class Registry:
    """Published versions under ``root`` and the ``current`` pointer.

    Parameters
    ----------
    root : Path
        The registry folder; created on the first publish.
    public_key : Ed25519PublicKey, optional
        When given, :meth:`publish` verifies each artifact (signature and every file)
        before it moves it in. Without it, publish checks only that the manifest and its
        signature are there; the caller must have verified the folder.
    """

    def __init__(self, root: Path, *, public_key: Ed25519PublicKey | None = None) -> None:
        self.root = Path(root)
        self._public_key = public_key

    # ------------------------------------------------------------------------ reading

    def versions(self) -> list[str]:
        """The published versions, sorted by round (``round-9999`` before ``round-10000``)."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            try:
                server_round = version_round(child.name)
            except ArtifactError:
                continue  # the pointer, hidden staging folders, anything else
            if child.is_dir() and (child / MANIFEST_FILE).is_file():
                found.append((server_round, child.name))
        return [name for _, name in sorted(found)]

    def current(self) -> str | None:
        """The version ``current`` points to, or None before the first publish.

        Raises
        ------
        RegistryError
            If the pointer names something that is not a published version.
        """
        try:
            text = read_regular(self.root / CURRENT_FILE, _MAX_POINTER_BYTES).decode("utf-8", "replace")
        except FileNotFoundError:
            return None
        except RegistryError:
            raise
        except ArtifactError as err:
            raise RegistryError(str(err)) from None
        version = text.strip()
        if version not in self.versions():
            raise RegistryError(
                f"{self.root / CURRENT_FILE} points to {version!r}, which is not published here; "
                f"set it to one of {self.versions()} with rollback(version)"
            )
        return version

    def path(self, version: str) -> Path:
        """The folder of a published version.

        Raises
        ------
        RegistryError
            If ``version`` is not published; the message lists those that are.
        """
        self._check_known(version)
        return self.root / version

    def release_of(self, version: str) -> int:
        """The release number in a published version's manifest (0 if it has none).

        The registry is the server's own folder: this reads, it does not verify.
        """
        try:
            manifest = json.loads(read_regular(self.path(version) / MANIFEST_FILE, MAX_MANIFEST_BYTES))
            release = manifest.get(KEY_RELEASE, 0) if isinstance(manifest, dict) else 0
        except (FileNotFoundError, ValueError):
            return 0
        return release if isinstance(release, int) and not isinstance(release, bool) else 0

    def next_release(self) -> int:
        """The largest release published here + 1 (1 when empty).

        This registry's view only; the export hook takes the number it signs from the
        signing key's :class:`ReleaseCounter`, with this as the floor.
        """
        return max((self.release_of(v) for v in self.versions()), default=0) + 1

    # ------------------------------------------------------------------------ writing

    def publish(self, staged_dir: Path) -> str:
        """Move a fully written artifact folder in as ``root/<version>/`` and point ``current`` at it.

        ``staged_dir`` is renamed (atomic on one file system; across file systems it is
        copied to a hidden folder in ``root`` first and then renamed, and the original
        removed). A crash leaves either no new version or a complete one.

        Returns
        -------
        str
            The version published.

        Raises
        ------
        RegistryError
            If the folder is not a (verified, when a key was given) artifact, or its
            version is already published.
        """
        staged_dir = Path(staged_dir)
        version, release = self._staged_version(staged_dir)
        target = self.root / version
        if target.exists():
            raise RegistryError(
                f"{version} is already published in {self.root}{self._published_by(target, staged_dir)}; "
                "versions are immutable: export a later round, or give each run its own registry-dir"
            )
        newest = self.next_release() - 1
        if release <= newest:
            raise RegistryError(
                f"{staged_dir.name} is release {release}, but release {newest} is already published in "
                f"{self.root}; releases only grow: build the manifest with release={newest + 1}"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged_dir, target)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise RegistryError(f"cannot move {staged_dir} to {target} ({err.strerror})") from None
            self._copy_in(staged_dir, target)
            shutil.rmtree(staged_dir)
        fsync_dir(self.root)
        self.set_current(version)
        return version

    def set_current(self, version: str) -> None:
        """Point ``current`` at a published version, atomically.

        Raises
        ------
        RegistryError
            If ``version`` is not published.
        """
        self._check_known(version)
        write_bytes_atomic(self.root / CURRENT_FILE, f"{version}\n".encode())

    def rollback(self, version: str | None = None) -> str:
        """Point ``current`` back: at ``version``, or by default at the version before it by round.

        Returns
        -------
        str
            The new current version.

        Raises
        ------
        RegistryError
            If ``version`` is not published (the message lists those that are), nothing is
            published, or current is already the earliest version.
        """
        if version is None:
            current = self.current()
            if current is None:
                raise RegistryError(f"nothing is published in {self.root}; there is nothing to roll back")
            earlier = [v for v in self.versions() if version_round(v) < version_round(current)]
            if not earlier:
                raise RegistryError(
                    f"{current} is the earliest version in {self.root}; "
                    "there is nothing before it to roll back to"
                )
            version = earlier[-1]
        self.set_current(version)
        return version

    # ------------------------------------------------------------------------ helpers

    def _check_known(self, version: str) -> None:
        known = self.versions()
        if version not in known:
            raise RegistryError(
                f"{version!r} is not published in {self.root}; published versions: {known or 'none'}"
            )

    @staticmethod
    def _published_by(target: Path, staged_dir: Path) -> str:
        """`` by another run (run id 0123...)`` when ``target`` is another run's, else ``""``."""
        try:
            theirs = json.loads(read_regular(target / MANIFEST_FILE, MAX_MANIFEST_BYTES)).get(KEY_RUN_ID)
            ours = json.loads(read_regular(staged_dir / MANIFEST_FILE, MAX_MANIFEST_BYTES)).get(KEY_RUN_ID)
        except (OSError, ValueError, AttributeError, ArtifactError):
            return ""
        if isinstance(theirs, str) and theirs != ours:
            return f" by another run (run id {theirs[:12]}...)"
        return ""

    def _staged_version(self, staged_dir: Path) -> tuple[str, int]:
        """The staged folder's (version, release); a candidate is refused."""
        if self._public_key is not None:
            try:
                manifest = verify_artifact(staged_dir, self._public_key)
            except ArtifactError as err:
                raise RegistryError(f"refusing to publish {staged_dir}: {err}") from None
        else:
            for name in (MANIFEST_FILE, SIGNATURE_FILE):
                if not (staged_dir / name).is_file():
                    raise RegistryError(
                        f"{staged_dir} has no {name}; publish a folder written by write_artifact"
                    )
            try:
                # Only to name the folder; trust comes from verification, here or by the caller.
                manifest = json.loads(read_regular(staged_dir / MANIFEST_FILE, MAX_MANIFEST_BYTES))
                version_round(manifest[KEY_VERSION])
                release = manifest[KEY_RELEASE]
                if isinstance(release, bool) or not isinstance(release, int) or release < 1:
                    raise ValueError(release)
            except (ValueError, KeyError, TypeError, FileNotFoundError, ArtifactError):
                raise RegistryError(
                    f"{staged_dir / MANIFEST_FILE} has no valid version or release; "
                    "publish a folder written by write_artifact"
                ) from None
        if manifest.get(KEY_CANDIDATE) is not False:
            raise RegistryError(
                f"refusing to publish {staged_dir}: it is a federated-check candidate, not a release; "
                "build the manifest with candidate=False"
            )
        return str(manifest[KEY_VERSION]), int(manifest[KEY_RELEASE])

    def _copy_in(self, staged_dir: Path, target: Path) -> None:
        tmp = self.root / f".{target.name}.incoming-{secrets.token_hex(4)}"
        try:
            shutil.copytree(staged_dir, tmp)
            for child in tmp.iterdir():
                fd = os.open(child, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def release_counter_path(signing_key: Path) -> Path:
    """Where the release counter of ``signing_key`` lives: ``<signing_key>.releases``."""
    signing_key = Path(signing_key)
    return signing_key.with_name(signing_key.name + RELEASES_SUFFIX)


class ReleaseCounter:
    """The release numbers handed out with one signing key, kept in a small file beside it.

    ``<key>.releases`` holds the last release handed out (``"7\\n"``, mode 0600);
    ``<key>.releases.lock`` (empty, mode 0600) is what :meth:`take` locks with an
    exclusive ``fcntl.flock``, so two runs, or two threads, sharing the key never hand
    out the same number. The counter is replaced atomically (temporary file, fsync,
    rename, fsync of the folder) while the lock is held, so a crash leaves the old
    number or the new one. A number taken but never published leaves a gap: releases
    only grow, they need not be consecutive.

    Parameters
    ----------
    signing_key : Path
        The private key the releases are signed with; its folder must be writable.
    """

    def __init__(self, signing_key: Path) -> None:
        self.path = release_counter_path(signing_key)
        self._lock_path = self.path.with_name(self.path.name + LOCK_SUFFIX)

    def last(self) -> int:
        """The last release handed out with this key (0 before the first).

        Raises
        ------
        RegistryError
            If the counter file is not a regular file holding a whole number; it is never
            reset silently, since a device would then accept a replay.
        """
        try:
            text = read_regular(self.path, _MAX_COUNTER_BYTES).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return 0
        except ArtifactError as err:
            raise RegistryError(f"release counter {err}") from None
        if not text.isdigit() or not text.isascii():
            raise RegistryError(
                f"release counter {self.path} holds {text[:20]!r}, not a whole number; write into it the "
                "largest release ever published with this key (`fedge deploy list` shows each registry's)"
            )
        return int(text)

    def peek(self, floor: int = 0) -> int:
        """The release :meth:`take` would hand out now, without taking it."""
        return max(self.last(), floor) + 1

    def take(self, floor: int = 0) -> int:
        """Hand out the next release: ``max(last, floor) + 1``, recorded before it is returned.

        Parameters
        ----------
        floor : int
            The largest release known elsewhere (the registry's newest), so a counter
            that is missing or behind never hands out a number already published.

        Raises
        ------
        RegistryError
            If the counter or its lock cannot be opened or written (the path is named),
            or the counter is damaged.
        """
        with self._locked():
            release = self.peek(floor)
            try:
                write_bytes_atomic(self.path, f"{release}\n".encode(), 0o600)
            except OSError as err:
                raise RegistryError(
                    f"cannot write release counter {self.path} ({err.strerror}); "
                    "the folder of the signing key must be writable by the run"
                ) from None
        return release

    def check(self) -> None:
        """Fail now, not at the first export, if the counter cannot be locked or read.

        Raises
        ------
        RegistryError
            As :meth:`take`.
        """
        with self._locked():
            self.last()
            if not os.access(self.path.parent, os.W_OK):
                raise RegistryError(
                    f"cannot write release counter {self.path} (folder not writable); "
                    "the folder of the signing key must be writable by the run"
                )

    def _locked(self) -> _Flock:
        return _Flock(self._lock_path)


class _Flock:
    """An exclusive ``flock`` on ``path`` (created 0600, never through a link) for a ``with`` block."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1

    def __enter__(self) -> None:
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise RegistryError(
                f"cannot open release counter lock {self._path} ({err.strerror}); "
                "the folder of the signing key must be writable by the run"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._fd)
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
