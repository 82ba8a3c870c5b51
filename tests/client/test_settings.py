"""Clients take their run settings from the server's messages and their node config, nothing else."""

from __future__ import annotations

import logging
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedge.client.app import make_client_app
from fedge.config import RunConfig
from fedge.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES, model_to_arrays

SERVER = RunConfig.from_mapping(
    {"partition": "iid", "num-clients": 4, "clients-per-round": 2, "local-epochs": 1}
)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _train(
    extra: dict[str, object], node_config: dict[str, object], run_config: dict[str, object]
) -> Message:
    spec = SERVER.federated_data().spec
    config = {"server-round": 1, "seed": 42, **SERVER.client_settings(), "local-steps": 1, **extra}
    content = RecordDict(
        {ARRAYS_KEY: model_to_arrays(SERVER.build_model(spec)), CONFIG_KEY: ConfigRecord(config)}  # type: ignore[arg-type]
    )
    message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = uuid4().hex
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)  # type: ignore[arg-type]
    return make_client_app()(message, context)


def test_an_empty_run_config_trains_on_what_the_server_says() -> None:
    # Flower's Ray engine gives apps an empty run config: the message names the data.
    reply = _train({}, {"partition-id": 1, "num-partitions": 4}, {})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    _, y = SERVER.federated_data().client_train(1)  # iid over 4, not the default dirichlet over 50
    assert reply.content[METRICS_KEY][NUM_EXAMPLES] == len(y)


def test_server_only_and_unknown_keys_are_ignored_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    run_config = {"signing-key": "/srv/keys/signing.key", "a-key-from-2030": 1}  # never parsed
    with caplog.at_level(logging.WARNING, logger="fedge.client"):
        first = _train({"a-round-key-from-2030": 3}, {"partition-id": 0, "num-partitions": 4}, run_config)
        second = _train({"a-round-key-from-2030": 3}, {"partition-id": 0, "num-partitions": 4}, run_config)
    assert not first.has_error() and not second.has_error()
    assert caplog.text.count("a-round-key-from-2030") == 1
    assert "signing" not in caplog.text


def test_a_supernode_with_another_num_partitions_is_refused_in_one_line() -> None:
    # Flower's default local federation has 2 SuperNodes (num-partitions=2); the server says 4.
    # (A runtime turns the exception into the error reply the server logs and drops.)
    with pytest.raises(ValueError) as err:
        _train({}, {"partition-id": 0, "num-partitions": 2}, {})
    reason = str(err.value)
    assert "num-partitions=2" in reason and "into 4 (num-clients)" in reason and "\n" not in reason


def test_a_missing_or_out_of_range_partition_id_is_refused() -> None:
    with pytest.raises(ValueError, match="no 'partition-id'"):
        _train({}, {"num-partitions": 4}, {})
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        _train({}, {"partition-id": 4}, {})
