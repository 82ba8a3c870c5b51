"""Simulated clients' lasting state on disk, written by the engine's parent process only.

A virtual client's ``Context.state`` (its error-feedback residual, and whatever else a
ClientApp keeps there) lives in the parent process between rounds. For ``--resume`` the
parent also writes it to ``clients/client-K/state-round-NNNN.pb`` after every reply that
arrived in time, so a worker that timed out or died (and whose changes the parent threw
away) can never leave a newer state on disk than the one the run continued with.

Format: Flower's own protobuf ``RecordDict`` (``flwr.common.serde.recorddict_to_proto``),
never a pickle; each file written atomically with mode 0600 (a residual is derived from
the client's private data). The round in the name is the round whose reply produced the
state. Two versions are kept per client, the newest and the one before: a round that
wrote a client's state and then crashed before its checkpoint leaves a version newer than
the checkpoint, and a resume from round R loads the newest version with round <= R and
deletes the newer ones (they belong to a round that will run again).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from google.protobuf.message import DecodeError

from fedge.files import write_bytes_atomic
from fedge.secagg_wire import STATE_KEY as SECAGG_STATE_KEY
from fedge.server.checkpoint import CheckpointError

log = logging.getLogger(__name__)

STATE_FILE_PATTERN = "state-round-{server_round:04d}.pb"
#: ``Context.state`` records that live only in memory (a SecAgg+ round's secrets).
EPHEMERAL_STATE_KEYS = frozenset({SECAGG_STATE_KEY})
_STATE_FILE_RE = re.compile(r"^state-round-(\d+)\.pb$")
# The newest version and the one before it (see the module docstring).
VERSIONS_KEPT = 2


class ClientStateError(CheckpointError):
    """A client's persisted state cannot be read, so the run cannot be resumed as it was."""


def client_folder_name(partition_id: int) -> str:
    """``client-K``: the folder of partition ``K`` inside the run folder's ``clients/``."""
    return f"client-{partition_id}"


class ClientStateStore:
    """Versions of each virtual client's ``Context.state`` under ``root/client-K/``.

    Parameters
    ----------
    root : Path
        The folder that holds one ``client-K`` folder per client (created on first write).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _folder(self, partition_id: int) -> Path:
        return self.root / client_folder_name(partition_id)

    def versions(self, partition_id: int) -> dict[int, Path]:
        """The stored versions of a client's state, by round."""
        folder = self._folder(partition_id)
        if not folder.is_dir():
            return {}
        found = {}
        for path in folder.iterdir():
            match = _STATE_FILE_RE.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def save(self, partition_id: int, server_round: int, state: RecordDict) -> Path:
        """Write the state a client reached in ``server_round``; keep one older version."""
        folder = self._folder(partition_id)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / STATE_FILE_PATTERN.format(server_round=server_round)
        # A secure round's secrets (keys, seeds, held shares) never reach the disk: a round
        # interrupted by a crash is lost anyway (its keys are fresh per round).
        kept = RecordDict({key: value for key, value in state.items() if key not in EPHEMERAL_STATE_KEYS})
        data = recorddict_to_proto(kept).SerializeToString(deterministic=True)
        write_bytes_atomic(path, data, mode=0o600)
        for old_round in sorted(self.versions(partition_id), reverse=True)[VERSIONS_KEPT:]:
            self._folder(partition_id).joinpath(STATE_FILE_PATTERN.format(server_round=old_round)).unlink(
                missing_ok=True
            )
        return path

    def load(self, partition_id: int, up_to_round: int) -> RecordDict | None:
        """The newest state written in a round ``<= up_to_round``, or ``None``.

        Versions of later rounds are deleted: they come from a round that did not reach
        its checkpoint, which the resumed run repeats (and may sample differently, e.g.
        when a client times out this time).

        Raises
        ------
        ClientStateError
            If the version to load is not a Flower ``RecordDict``.
        """
        versions = self.versions(partition_id)
        for server_round, path in versions.items():
            if server_round > up_to_round:
                path.unlink(missing_ok=True)
        usable = [r for r in versions if r <= up_to_round]
        if not usable:
            return None
        path = versions[max(usable)]
        try:
            proto = ProtoRecordDict.FromString(path.read_bytes())
            return recorddict_from_proto(proto)
        except (OSError, DecodeError, ValueError, TypeError) as err:
            raise ClientStateError(
                f"client state {path} is unreadable ({type(err).__name__}: {err}); restore it from "
                "a backup, or start a new run (its clients start from empty state)"
            ) from None


__all__ = ["STATE_FILE_PATTERN", "ClientStateError", "ClientStateStore", "client_folder_name"]
