"""A device's DP-SGD privacy ledger: every DP-SGD training call it ran, across runs.

On-device DP-SGD (:func:`fedge.training.train_local_dp`) protects each sample of this
device's own data. Its privacy loss adds up over every call, whichever run asked for it,
so the ledger is keyed by nothing but the device: it records each call's
``(noise multiplier, sample rate, steps)`` and the epsilon of the composition of all of
them (Opacus's RDP accountant over the whole history) at the delta of the latest call.

Where it lives:

- With ``node_config["state-dir"]`` (a SuperNode's ``--node-config "state-dir='...'"``;
  in fedge's simulation each virtual client's ``run_dir/clients/client-K``), in
  ``state-dir/privacy-ledger.json``: JSON, never pickle, written atomically with mode
  0600. It outlives runs and restarts: that file *is* the device's budget. A file that
  is not a regular file (a FIFO, a symlink), cannot be read or does not parse as a
  ledger is refused with a one-line error and never overwritten: starting from an empty
  ledger would reset the budget.
- Without one (Flower's Ray engine gives clients no state-dir), in ``context.state``
  only: Flower keeps it for one run, so the budget then spans the rounds of a run, not
  runs.

An entry is recorded *before* its training runs (a call that crashes or diverges counts
as spent: its noised gradients were computed). Give every device its own state-dir.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedge.client.state import state_dir
from fedge.files import write_bytes_atomic

LEDGER_FILE = "privacy-ledger.json"
LEDGER_FORMAT = "fedge-privacy-ledger-1"
# context.state key of the ledger (a ConfigRecord holding the ledger's JSON text).
LEDGER_STATE_KEY = "fedge.privacy-ledger"
_TEXT_KEY = "json"
_MAX_BYTES = 64 * 1024 * 1024


class LedgerError(ValueError):
    """The ledger cannot be read or trusted; the one-line message says which file and why."""


@dataclass(frozen=True)
class LedgerEntry:
    """One DP-SGD training call: what composes, and where it came from (for the record)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    run_id: int = 0
    server_round: int = 0


def composed_epsilon(entries: Iterable[LedgerEntry], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of ``entries`` (Opacus's ``RDPAccountant``).

    0 for no entries (or no steps).
    """
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.steps > 0]
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class PrivacyLedger:
    """A device's DP-SGD history; ``epsilon`` is its composition at ``delta`` (0, 0 when empty)."""

    entries: tuple[LedgerEntry, ...] = ()
    epsilon: float = 0.0
    delta: float = 0.0

    def epsilon_with(self, extra: Sequence[LedgerEntry], delta: float) -> float:
        """The device's epsilon at ``delta`` once ``extra`` is spent too."""
        return composed_epsilon([*self.entries, *extra], delta)

    def recorded(self, entry: LedgerEntry, delta: float) -> PrivacyLedger:
        """This ledger with ``entry`` added and the composition at ``delta``."""
        entries = (*self.entries, entry)
        return PrivacyLedger(entries, composed_epsilon(entries, delta), delta)

    def to_json(self) -> str:
        body = {
            "format": LEDGER_FORMAT,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": "opacus-rdp",
            "entries": [vars(e) for e in self.entries],
        }
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> PrivacyLedger:
        """Parse a ledger; anything off raises :class:`LedgerError` naming ``where``."""
        try:
            body = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LedgerError(f"privacy ledger {where} is not JSON ({err}); refusing to train") from None
        if not isinstance(body, dict) or body.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"privacy ledger {where} is not a {LEDGER_FORMAT} file; refusing to train")
        raw = body.get("entries")
        if not isinstance(raw, list):
            raise LedgerError(f"privacy ledger {where} has no list of entries; refusing to train")
        entries = tuple(_entry(item, where, i) for i, item in enumerate(raw))
        epsilon, delta = body.get("epsilon"), body.get("delta")
        if not isinstance(epsilon, int | float) or not isinstance(delta, int | float):
            raise LedgerError(f"privacy ledger {where} has no numeric epsilon and delta; refusing to train")
        return cls(entries, float(epsilon), float(delta))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _entry(item: Any, where: str, index: int) -> LedgerEntry:
    bad = f"privacy ledger {where}: entry {index} is not a valid DP-SGD record; refusing to train"
    if not isinstance(item, dict) or set(item) != set(LedgerEntry.__dataclass_fields__):
        raise LedgerError(bad)
    nm, rate, steps = item["noise_multiplier"], item["sample_rate"], item["steps"]
    ints = (steps, item["run_id"], item["server_round"])
    if not (_is_number(nm) and math.isfinite(nm) and nm > 0 and _is_number(rate) and 0 < rate <= 1):
        raise LedgerError(bad)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        raise LedgerError(bad)
    return LedgerEntry(float(nm), float(rate), int(steps), int(item["run_id"]), int(item["server_round"]))


def ledger_path(context: Context) -> Path | None:
    """``state-dir/privacy-ledger.json``, or ``None`` without a state-dir."""
    folder = state_dir(context)
    return None if folder is None else folder / LEDGER_FILE


def _read_file(path: Path) -> str | None:
    try:
        # O_NOFOLLOW: a symlink fails (ELOOP); O_NONBLOCK: a FIFO opens without waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:
        kind = "a symlink" if path.is_symlink() else err.strerror
        raise LedgerError(f"privacy ledger {path} cannot be opened ({kind}); refusing to train") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LedgerError(f"privacy ledger {path} is not a regular file; refusing to train")
        if info.st_size > _MAX_BYTES:
            raise LedgerError(f"privacy ledger {path} is over {_MAX_BYTES} bytes; refusing to train")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(_MAX_BYTES + 1)
    except OSError as err:
        raise LedgerError(
            f"privacy ledger {path} cannot be read ({err.strerror}); refusing to train"
        ) from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise LedgerError(f"privacy ledger {path} is not UTF-8 text; refusing to train") from None


def load_ledger(context: Context) -> PrivacyLedger:
    """The device's ledger: the state-dir's file if there is one, else ``context.state``'s.

    An absent file (or no ledger in ``context.state``) is an empty ledger.

    Raises
    ------
    LedgerError
        The file is a symlink, a FIFO or anything but a regular file, unreadable, or not
        a valid ledger (one line).
    """
    path = ledger_path(context)
    if path is not None:
        text = _read_file(path)
        return PrivacyLedger() if text is None else PrivacyLedger.from_json(text, str(path))
    record = context.state.config_records.get(LEDGER_STATE_KEY)
    if record is None:
        return PrivacyLedger()
    value = record.get(_TEXT_KEY)
    if not isinstance(value, str):
        raise LedgerError("the privacy ledger in context.state is not text; refusing to train")
    return PrivacyLedger.from_json(value, "in context.state")


def save_ledger(context: Context, ledger: PrivacyLedger) -> None:
    """Keep ``ledger`` in ``context.state`` and, with a state-dir, in its file (0600, atomic)."""
    text = ledger.to_json()
    context.state[LEDGER_STATE_KEY] = ConfigRecord({_TEXT_KEY: text})
    path = ledger_path(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_bytes_atomic(path, text.encode("utf-8"), mode=0o600)


__all__ = [
    "LEDGER_FILE",
    "LEDGER_STATE_KEY",
    "LedgerEntry",
    "LedgerError",
    "PrivacyLedger",
    "composed_epsilon",
    "ledger_path",
    "load_ledger",
    "save_ledger",
]
