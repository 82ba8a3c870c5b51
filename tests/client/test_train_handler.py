"""The client's train handler: resolved settings from the round config, and a diverging
client replies with an error that says why, never with NaN weights."""

from __future__ import annotations

from uuid import uuid4

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedge.client.app import make_client_app
from fedge.config import RunConfig
from fedge.records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LOCAL_EPOCHS,
    LOCAL_STEPS,
    LR,
    METRICS_KEY,
    SERVER_ROUND,
    TRAIN_LOSS,
    arrays_to_numpy,
    model_to_arrays,
)

CFG = RunConfig(num_clients=10, clients_per_round=2)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Outside Flower's runtime a Message needs a task identity (FLOWER-NOTES.md).
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1


def _train(round_config: dict[str, object]) -> Message:
    spec = CFG.federated_data().spec
    content = RecordDict(
        {
            ARRAYS_KEY: model_to_arrays(CFG.build_model(spec)),
            CONFIG_KEY: ConfigRecord({SERVER_ROUND: 1, **round_config}),  # type: ignore[dict-item]
        }
    )
    message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = uuid4().hex
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    return make_client_app(CFG)(message, context)


def test_a_diverging_client_replies_with_the_reason_and_no_weights() -> None:
    reply = _train({LR: 1e30})
    assert reply.has_error() and not reply.has_content()
    assert "local training diverged" in reply.error.reason
    assert "lower lr" in reply.error.reason


def test_the_round_config_settings_are_used() -> None:
    reply = _train({LR: 0.05, LOCAL_STEPS: 1})
    assert not reply.has_error()
    arrays = arrays_to_numpy(reply.content.array_records[ARRAYS_KEY])
    assert all(np.isfinite(a).all() for a in arrays.values())
    assert np.isfinite(reply.content.metric_records[METRICS_KEY][TRAIN_LOSS])


def test_auto_or_absent_settings_fall_back_to_the_clients_resolution() -> None:
    # A server that leaves a setting to the client sends "auto" (or nothing): same training.
    absent = arrays_to_numpy(_train({LOCAL_EPOCHS: 1}).content.array_records[ARRAYS_KEY])
    auto = arrays_to_numpy(
        _train({LOCAL_EPOCHS: 1, LR: "auto", LOCAL_STEPS: "auto"}).content.array_records[ARRAYS_KEY]
    )
    assert all(np.array_equal(absent[k], auto[k]) for k in absent)
