"""How a round reaches its clients: sampling, the grid view strategies see, and transports.

A :class:`Transport` delivers a round's messages and returns an :class:`Exchange`: either
the per-client replies (:class:`PlainTransport`, one ``send_and_receive``) or one
:class:`~fedge.aggregation.Aggregate` (secure aggregation, which can produce nothing
else). Training, federated evaluation and the int8 check of a candidate all go through
the run's transport (:class:`Federation`), and a transport learns the round number, the
round's config and which kind of exchange it is, and reports who did not reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedge.aggregation import Aggregate
from fedge.rng import Stream, stream_rng

log = logging.getLogger("fedge.server")

#: RoundContext.kind values.
TRAIN = "train"
EVALUATE = "evaluate"
INT8_CHECK = "int8-check"


class FederationTooSmallError(RuntimeError):
    """The federation cannot ever provide the clients a round needs; the message says what to change."""


@dataclass(frozen=True)
class RoundContext:
    """What a transport learns about the exchange it carries."""

    server_round: int
    kind: str
    config: ConfigRecord
    timeout_s: float


@dataclass
class Exchange:
    """What came back from one exchange.

    Parameters
    ----------
    sent : tuple of int
        Node ids that were sent a message.
    replies : list of Message
        Every reply received in time, unchecked (plain transports); empty when the
        transport returns an ``aggregate``.
    aggregate : Aggregate or None
        The sum of the updates (aggregate transports: secure aggregation).
    missing : tuple of int
        Node ids that did not reply in time.
    bytes_up, bytes_down : int or None
        Payload bytes of every message of the exchange, when the transport sends more than
        the round's messages and their replies (secure aggregation's stages); ``None``: the
        loop counts the messages and replies itself.
    stats : dict
        What the transport reports for the round's line of ``metrics.jsonl`` (JSON values).
    """

    sent: tuple[int, ...]
    replies: list[Message] = field(default_factory=list)
    aggregate: Aggregate | None = None
    missing: tuple[int, ...] = ()
    bytes_up: int | None = None
    bytes_down: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class Transport(Protocol):
    """How a round's messages reach clients and what comes back."""

    #: Whether :meth:`exchange` returns per-client replies (``False``: only an aggregate).
    per_client: bool

    def exchange(self, grid: Grid, messages: list[Message], round_ctx: RoundContext) -> Exchange:
        """Deliver ``messages`` and return what came back within ``round_ctx.timeout_s``."""


class PlainTransport:
    """One ``send_and_receive`` exchange; the replies come back one per client."""

    per_client = True

    def exchange(self, grid: Grid, messages: list[Message], round_ctx: RoundContext) -> Exchange:
        """Send every message and wait for the replies."""
        sent = tuple(int(m.metadata.dst_node_id) for m in messages)
        replies = list(grid.send_and_receive(messages, timeout=round_ctx.timeout_s))
        answered = {int(r.metadata.src_node_id) for r in replies}
        missing = tuple(n for n in sent if n not in answered)
        if missing:
            log.warning(
                "round %d (%s): %d of %d clients did not reply in time",
                round_ctx.server_round,
                round_ctx.kind,
                len(missing),
                len(sent),
            )
        return Exchange(sent=sent, replies=replies, missing=missing)

    def state_dict(self) -> dict[str, np.ndarray]:
        """A plain transport keeps nothing between rounds."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Nothing to restore."""


class SampledGrid(Grid):
    """A view of ``grid`` whose nodes are only this round's sampled clients.

    Strategies are built with ``fraction_train = 1.0``, so they address exactly the
    nodes this view lists: the loop decides who takes part, the strategy what they get.
    """

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def sample_clients(
    node_ids: Iterable[int], num: int, seed: int, server_round: int, stream: Stream = Stream.CLIENT_SAMPLING
) -> list[int]:
    """Pick ``num`` distinct nodes for ``server_round`` from the named ``stream``.

    The same inputs give the same pick, whatever the order of ``node_ids``.
    """
    pool = sorted(node_ids)
    if not 0 <= num <= len(pool):
        raise ValueError(f"cannot sample {num} of {len(pool)} clients")
    rng = stream_rng(seed, stream, server_round)
    # Pick positions, not ids: Flower's node ids are unsigned 64-bit, which numpy would
    # turn into float64 (and round) when given a mixed list.
    return sorted(pool[int(i)] for i in rng.choice(len(pool), size=num, replace=False))


def poisson_sample(
    node_ids: Iterable[int],
    rate: float,
    seed: int,
    server_round: int,
    stream: Stream = Stream.CLIENT_SAMPLING,
) -> list[int]:
    """Each node independently with probability ``rate`` (Poisson sampling), from the named stream.

    The cohort's size varies round to round (it may be empty); the privacy accountant's
    amplification by Poisson sampling assumes exactly this draw.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"a Poisson sampling rate must be in (0, 1], got {rate}")
    pool = sorted(node_ids)
    rng = stream_rng(seed, stream, server_round)
    keep = rng.random(len(pool)) < rate
    return [node for node, chosen in zip(pool, keep, strict=True) if chosen]


def federation_is_fixed(grid: Grid) -> bool:
    """Whether ``grid``'s nodes all exist from the start (simulations), so waiting adds none.

    fedge's in-process grid says so with ``fixed_federation = True``; Flower's simulation
    runs on its ``InMemoryGrid`` (``flwr run .`` without a SuperLink, ``run_simulation``),
    whose SuperNodes are all registered before the ServerApp starts. Recognised by class
    name, so the server does not import Flower's internal module for it.
    """
    return bool(getattr(grid, "fixed_federation", False)) or type(grid).__name__ == "InMemoryGrid"


def wait_for_nodes(grid: Grid, num: int, timeout_s: float) -> list[int]:
    """Wait until ``grid`` lists at least ``num`` nodes (deployment: SuperNodes connecting).

    Raises
    ------
    FederationTooSmallError
        At once when the federation is fixed (a simulation) and smaller than ``num``.
    TimeoutError
        When fewer than ``num`` nodes connected within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    reported = -1
    while True:
        node_ids = list(grid.get_node_ids())
        if len(node_ids) >= num:
            return node_ids
        if federation_is_fixed(grid):
            raise FederationTooSmallError(
                f"the federation has {len(node_ids)} clients but a round needs {num} (clients-per-round); "
                f"set num-clients and clients-per-round to at most {len(node_ids)} "
                f'(flwr run . --run-config "num-clients={len(node_ids)} clients-per-round={len(node_ids)}") '
                "or give the federation more SuperNodes (options.num-supernodes)"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(node_ids)} of the {num} clients a round needs connected within "
                f"{timeout_s:.0f} s; start more SuperNodes or lower clients-per-round"
            )
        if len(node_ids) != reported:
            log.info("waiting for clients: %d connected, %d needed (clients-per-round)", len(node_ids), num)
            reported = len(node_ids)
        time.sleep(1.0)


class Federation:
    """The server's clients for one run: the grid, the transport, and the round timeout.

    Round hooks get it (not the raw grid), so that whatever they ask clients (the int8
    check of a candidate) goes through the same transport as training.
    """

    def __init__(self, grid: Grid, transport: Transport, timeout_s: float) -> None:
        self.grid = grid
        self.transport = transport
        self.timeout_s = timeout_s

    def node_ids(self) -> list[int]:
        """The nodes connected now."""
        return list(self.grid.get_node_ids())

    def exchange(
        self, messages: list[Message], server_round: int, kind: str, config: ConfigRecord | None = None
    ) -> Exchange:
        """Deliver ``messages`` through the transport (``kind``: :data:`TRAIN`, ...)."""
        round_ctx = RoundContext(server_round, kind, config or ConfigRecord(), self.timeout_s)
        return self.transport.exchange(self.grid, messages, round_ctx)


__all__ = [
    "EVALUATE",
    "INT8_CHECK",
    "TRAIN",
    "Exchange",
    "Federation",
    "FederationTooSmallError",
    "PlainTransport",
    "RoundContext",
    "SampledGrid",
    "Transport",
    "federation_is_fixed",
    "poisson_sample",
    "sample_clients",
    "wait_for_nodes",
]
