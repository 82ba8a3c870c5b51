"""A round hook that stands for the server process dying after a given round."""

from __future__ import annotations

from typing import Any


class Crash(BaseException):
    """Not an Exception, so the round loop (which logs failing hooks) does not swallow it."""


class CrashAfter:
    """Raises :class:`Crash` from ``on_round`` once ``server_round`` is reached."""

    def __init__(self, server_round: int) -> None:
        self.server_round = server_round

    def on_start(self, first_round: int, num_rounds: int) -> None:
        """Nothing to do at the start."""

    def on_round(self, event: Any) -> None:
        """Die after the configured round (its checkpoint is already on disk)."""
        if event.server_round == self.server_round:
            raise Crash
