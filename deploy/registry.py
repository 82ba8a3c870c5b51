"""The server's registry of published versions, with a ``current`` pointer and rollback.

Layout under the registry root::

    round-0001/  round-0002/  round-0003/     one signed artifact folder per version
    current                                   "round-0003\\n": the version devices install

Versions are immutable: published once by an atomic rename, never rewritten. Each
carries a release number that only grows (:meth:`Registry.next_release`); publish
refuses a release that is not above every published one, and a federated-check
candidate (``"candidate": true``) altogether. The pointer is replaced atomically
(temporary file, fsync, ``os.replace``, fsync of the folder), so at every moment it
names the old version or the new one, never nothing.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.deploy.artifacts import (
    KEY_CANDIDATE,
    KEY_RELEASE,
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
        """The release number of the next version: the largest published one + 1 (1 when empty)."""
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
                f"{version} is already published in {self.root}; versions are immutable, "
                "export a later round instead"
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
