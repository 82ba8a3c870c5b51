"""What a client needs to know about the run, from the server's messages, never its run config.

The server sends :meth:`fedge.config.RunConfig.client_settings` with every message: the
dataset, partitioning, number of partitions, data seed, model and local test fraction.
A client therefore never parses the server's run config (a newer server's keys cannot
break an older client, and server-only settings such as the signing key's path mean
nothing to it), and a ClientApp started with an empty run config (Flower's Ray engine)
trains on what the server says, not on a default.

A key the client does not know is ignored with one warning per key and process, so an
older device keeps working with a newer server. Device-local settings come from the
SuperNode's ``node_config``: ``partition-id``, ``num-partitions`` (which must equal the
server's), ``data-dir``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context

from fedge.config import ConfigError, RunConfig
from fedge.records import (
    DATA_SEED,
    DATASET,
    LOCAL_TEST_FRACTION,
    MODEL,
    NUM_PARTITIONS,
    PARTITION,
)

log = logging.getLogger("fedge.client")

# node_config keys of a SuperNode.
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
DATA_DIR_KEY = "data-dir"

_warned: set[str] = set()


def warn_unknown_keys(record: ConfigRecord, known: Iterable[str]) -> None:
    """Log once per process each key of ``record`` this client does not know."""
    for key in sorted(set(record.keys()) - set(known) - _warned):
        _warned.add(key)
        log.warning(
            "ignoring round config key %r, which this fedge client does not know (a newer server?)", key
        )


@dataclass(frozen=True)
class ClientSettings:
    """The run settings a client uses, resolved from a message and the node config."""

    dataset: str
    partition: str
    num_partitions: int
    data_seed: int
    model: str
    local_test_fraction: float
    data_dir: str
    partition_id: int

    def run_config(self) -> RunConfig:
        """A :class:`RunConfig` for loading this client's data and building its model."""
        return dataclasses.replace(
            RunConfig(),
            dataset=self.dataset,
            partition=self.partition,
            num_clients=self.num_partitions,
            clients_per_round=1,
            seed=self.data_seed,
            model=self.model,
            local_test_fraction=self.local_test_fraction,
            data_dir=self.data_dir,
        )


def _value(record: ConfigRecord, key: str, fallback: object) -> object:
    value = record.get(key, fallback)
    if value is None:
        raise ValueError(
            f"the server sent no {key!r} with this message; it is an older fedge server: upgrade it"
        )
    return value


def _str(record: ConfigRecord, key: str, fallback: object) -> str:
    value = _value(record, key, fallback)
    if not isinstance(value, str):
        raise ValueError(f"round config {key!r} must be a string, got {value!r}")
    return value


def _int(record: ConfigRecord, key: str, fallback: object) -> int:
    value = _value(record, key, fallback)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"round config {key!r} must be a whole number, got {value!r}")
    return value


def _float(record: ConfigRecord, key: str, fallback: object) -> float:
    value = _value(record, key, fallback)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"round config {key!r} must be a number, got {value!r}")
    return float(value)


def _node_int(context: Context, key: str) -> int | None:
    value = context.node_config.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"node_config {key!r} must be a whole number, got {value!r}") from None


def resolve_settings(
    record: ConfigRecord, context: Context, fallback: RunConfig | None = None
) -> ClientSettings:
    """This client's settings for a message (round config ``record``).

    Parameters
    ----------
    record : ConfigRecord
        The message's config record (the server's :meth:`RunConfig.client_settings`).
    context : Context
        The client's context: ``node_config`` gives ``partition-id``, ``num-partitions``
        and ``data-dir``.
    fallback : RunConfig, optional
        Values for keys a message lacks (a config closed over by the app, as under
        Flower's Ray engine); without it a missing key is an error naming the upgrade.

    Raises
    ------
    ValueError
        One line: a missing or mistyped key, a ``num-partitions`` that differs from the
        SuperNode's, a ``partition-id`` outside ``[0, num-partitions)``.
    """
    defaults = fallback.client_settings() if fallback is not None else {}
    num_partitions = _int(record, NUM_PARTITIONS, defaults.get(NUM_PARTITIONS))
    node_partitions = _node_int(context, NUM_PARTITIONS_KEY)
    if node_partitions is not None and node_partitions != num_partitions:
        raise ValueError(
            f"this SuperNode was started with num-partitions={node_partitions}, but the server splits the "
            f"data into {num_partitions} (num-clients); start it with --node-config "
            f'"partition-id=K num-partitions={num_partitions}" or set num-clients={node_partitions}'
        )
    pid = _node_int(context, PARTITION_ID_KEY)
    if pid is None:
        raise ValueError(
            "node_config has no 'partition-id'; start the SuperNode with "
            f'--node-config "partition-id=K num-partitions={num_partitions}"'
        )
    if not 0 <= pid < num_partitions:
        raise ValueError(
            f"partition-id {pid} is outside [0, {num_partitions}); num-partitions is {num_partitions}"
        )
    data_dir = context.node_config.get(DATA_DIR_KEY) or context.run_config.get(DATA_DIR_KEY)
    if not data_dir and fallback is not None:
        data_dir = fallback.data_dir
    settings = ClientSettings(
        dataset=_str(record, DATASET, defaults.get(DATASET)),
        partition=_str(record, PARTITION, defaults.get(PARTITION)),
        num_partitions=num_partitions,
        data_seed=_int(record, DATA_SEED, defaults.get(DATA_SEED)),
        model=_str(record, MODEL, defaults.get(MODEL)),
        local_test_fraction=_float(record, LOCAL_TEST_FRACTION, defaults.get(LOCAL_TEST_FRACTION)),
        data_dir=str(data_dir or ""),
        partition_id=pid,
    )
    try:
        settings.run_config()
    except ConfigError as err:
        raise ValueError(f"the server's data settings are not valid here: {err}") from None
    return settings


__all__ = [
    "DATA_DIR_KEY",
    "NUM_PARTITIONS_KEY",
    "PARTITION_ID_KEY",
    "ClientSettings",
    "resolve_settings",
    "warn_unknown_keys",
]
