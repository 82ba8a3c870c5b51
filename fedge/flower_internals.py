"""The few places where fedge reaches past Flower 1.39's public API, in one module.

Each function names the private detail it touches and why no public way exists, so a
Flower upgrade has one file to check (``tests/simulation/test_flower_internals.py``
fails if one of these details moves). Nothing else in fedge may touch Flower's private
attributes or process-global identity.

What fedge does *not* need from here: stopping a worker process. The in-process engine
runs its own worker processes (``multiprocessing.Process`` with a pipe each), so it can
kill one by its handle; ``concurrent.futures.ProcessPoolExecutor`` has no public way to
stop a running task before Python 3.14 and is not used.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity


def set_message_id(message: Message, message_id: str) -> None:
    """Give ``message`` the id a SuperLink would, in place.

    ``Metadata.message_id`` is a read-only property in Flower 1.39 and the id is not a
    constructor argument of ``Message``; every Grid of Flower's own
    (``InMemoryGrid.push_messages``, ``HttpGrid``, the SuperNode's runtime) writes the
    private ``_message_id`` slot as done here. It must be set on the caller's own object,
    not on a copy: ``push_messages`` returns the ids, and callers (and the replies'
    ``reply_to_message_id``) match them against ``message.metadata.message_id``.
    """
    message.metadata.__dict__["_message_id"] = message_id


def set_task_identity(*, run_id: int, node_id: int, task_id: int) -> None:
    """Set the identity Flower stamps on every ``Message`` built in this process.

    ``Message(content, dst_node_id, message_type)`` (what every Flower strategy calls in
    ``configure_train``) reads ``run_id``, ``src_node_id`` and ``src_task_id`` from the
    process-global ``flwr.supercore.task_identity.TaskIdentity``, which Flower's runtimes
    set when they start a ServerApp (``flwr.server.compat.app``, ``run_serverapp``). A
    Grid that runs a ServerApp outside those runtimes must set it the same way; it has
    public setters, but it is a process global, hence kept here.
    """
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


__all__ = ["set_message_id", "set_task_identity"]
