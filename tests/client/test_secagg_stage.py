"""The client's SecAgg+ stage forgets an unfinished round's secrets at the next other message."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedge import secagg_wire as wire
from fedge.client.secagg import SecAggStage


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Outside Flower's runtime a Message needs a task identity (FLOWER-NOTES.md).
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1


def _context() -> Context:
    state = RecordDict(
        {wire.STATE_KEY: ConfigRecord({"c-secret": b"\x01" * 32}), "keep": ConfigRecord({"a": 1})}
    )
    return Context(run_id=1, node_id=7, node_config={}, state=state, run_config={})


def _message(content: RecordDict, message_type: str) -> Message:
    return Message(content, dst_node_id=7, message_type=message_type)


def test_a_plain_message_deletes_an_unfinished_rounds_secrets() -> None:
    stage, context = SecAggStage(), _context()
    stage.forget_stale(
        _message(RecordDict({"config": ConfigRecord({"server-round": 3})}), "evaluate"), context
    )
    assert wire.STATE_KEY not in context.state and "keep" in context.state


def test_a_secure_message_leaves_them_to_the_protocol() -> None:
    stage, context = SecAggStage(), _context()
    secure = RecordDict({wire.SECAGG_KEY: ConfigRecord({wire.STAGE: 2, "server-round": 3})})
    stage.forget_stale(_message(secure, "train"), context)
    assert wire.STATE_KEY in context.state
