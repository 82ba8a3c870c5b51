"""fedge's one module of Flower private details: they still hold, and nothing else uses them."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Message, RecordDict

from fedge.flower_internals import set_message_id, set_task_identity

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("fedge", "server", "client", "strategies", "simulation", "deploy")
PRIVATE = ('__dict__["_message_id"]', "._processes", "TaskIdentity")


def test_message_id_and_task_identity_still_work_as_fedge_sets_them() -> None:
    set_task_identity(run_id=7, node_id=1, task_id=3)
    message = Message(RecordDict(), 1000, "train", group_id="2")
    assert (message.metadata.run_id, message.metadata.src_node_id, message.metadata.src_task_id) == (7, 1, 3)
    assert message.metadata.message_id == ""
    set_message_id(message, "abc")
    assert message.metadata.message_id == "abc"
    assert Message(RecordDict(), reply_to=message).metadata.reply_to_message_id == "abc"


def test_only_the_internals_module_touches_flower_private_details() -> None:
    users = sorted(
        f"{path.relative_to(REPO)}: {needle}"
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if path.name != "flower_internals.py"
        for needle in PRIVATE
        if needle in path.read_text()
    )
    assert users == []
