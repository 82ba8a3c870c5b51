"""fedge's in-process simulation engine: a Flower ``Grid`` that calls ``ClientApp``s directly.

Flower's simulation engine runs every ClientApp call as a Ray task, which costs a
scheduler round-trip and object-store copies per client. With edge-sized models the
training itself takes milliseconds, so that overhead dominates; this Grid instead
delivers each message to a ``ClientApp`` in a pool of worker processes (one per core
by default) and keeps every virtual client's ``Context`` in the parent, so a client's
state survives between rounds whichever worker runs it.

Messages and contexts cross the process boundary as Flower's own protobuf bytes
(``flwr.common.serde``), never as pickles of received data.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

# Virtual node ids start here, so they never collide with the SuperLink's own id (1).
FIRST_NODE_ID = 1000

# Per worker process: the ClientApp, loaded once by the pool initializer.
_WORKER_APP: ClientApp | None = None


def load_client_app(ref: str) -> ClientApp:
    """Import ``"package.module:attribute"`` and return the ``ClientApp`` it names."""
    module_name, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"client app reference {ref!r} must look like 'package.module:attr'")
    app = getattr(importlib.import_module(module_name), attr)
    if not isinstance(app, ClientApp):
        raise TypeError(f"{ref} is a {type(app).__name__}, not a flwr.clientapp.ClientApp")
    return app


def _init_worker(app_ref: str, torch_threads: int) -> None:
    global _WORKER_APP
    # One intra-op thread per worker: the workers already use every core. The same for
    # numpy's BLAS (the Hadamard rotation of an update is a matmul): OpenBLAS threads in
    # every worker, spinning beside torch's, made a rotated-codec run 1.6x slower.
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(torch_threads)
    threadpool_limits(limits=torch_threads)
    _WORKER_APP = load_client_app(app_ref)


def _call_client_app(app: ClientApp, message: Message, context: Context) -> Message:
    """Run ``app`` on ``message``; an exception becomes an error reply, as Flower's runtimes do."""
    try:
        reply = app(message, context)
    except Exception as err:  # a client failure must never stop the round
        reason = f"{type(err).__name__}: {err}"
        log.debug("client app raised:\n%s", traceback.format_exc())
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
    return reply


def _noop() -> None:
    """A task that only makes the pool start a worker."""


def _worker_task(message_bytes: bytes, context_bytes: bytes) -> tuple[bytes, bytes]:
    """Worker side of one delivery: bytes in, reply and updated client state out."""
    assert _WORKER_APP is not None, "worker pool initializer did not run"
    message = message_from_proto(ProtoMessage.FromString(message_bytes))
    context = context_from_proto(ProtoContext.FromString(context_bytes))
    reply = _call_client_app(_WORKER_APP, message, context)
    return (
        message_to_proto(reply).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )


class InProcessGrid(Grid):
    """A :class:`flwr.serverapp.Grid` whose nodes are virtual clients in worker processes.

    Parameters
    ----------
    client_app_ref : str
        ``"module:attribute"`` of the ``ClientApp`` every virtual node runs (imported
        in each worker; the default fedge app reads its config from ``run_config``).
    num_nodes : int
        Number of virtual clients. Node ``k`` gets ``node_config`` with
        ``partition-id = k`` and ``num-partitions = num_nodes``, as Flower's engines do.
    run_config : Mapping
        The run config every client's ``Context`` carries.
    workers : int, default 1
        Worker processes; 1 runs clients inline in this process (no pool).
    run_id : int, default 1
        Flower run id stamped on messages.
    preload : sequence of str
        Modules the fork server imports once, before it forks the workers, so each
        worker does not pay for them again (torch, sklearn, ... take seconds each).
    client_state_dir : Path, optional
        Gives node ``k`` ``node_config["state-dir"] = client_state_dir / "client-K"``,
        the folder where a client keeps state that must outlive its process (the
        error-feedback residual), as a device's SuperNode does; a resumed simulation
        then continues with it.

    Notes
    -----
    Use it as a context manager (or call :meth:`close`) so the worker pool stops.
    """

    def __init__(
        self,
        client_app_ref: str,
        num_nodes: int,
        run_config: Mapping[str, Any],
        *,
        workers: int = 1,
        run_id: int = 1,
        preload: Sequence[str] = (),
        client_state_dir: Path | None = None,
    ) -> None:
        if num_nodes <= 0:
            raise ValueError(f"num_nodes must be positive, got {num_nodes}")
        if workers <= 0:
            raise ValueError(f"workers must be positive, got {workers}")
        self._app_ref = client_app_ref
        self._workers = workers
        self._preload = ["torch", "numpy", "flwr.app", "flwr.clientapp", *preload]
        self._run = Run.create_empty(run_id)
        self._inline_app: ClientApp | None = None
        self._pool: cf.ProcessPoolExecutor | None = None
        self._warmup: threading.Thread | None = None
        config: UserConfig = dict(run_config)

        def node_config(k: int) -> UserConfig:
            values: UserConfig = {"partition-id": k, "num-partitions": num_nodes}
            if client_state_dir is not None:
                values["state-dir"] = str(Path(client_state_dir) / f"client-{k}")
            return values

        self._contexts: dict[int, Context] = {
            FIRST_NODE_ID + k: Context(
                run_id=run_id,
                node_id=FIRST_NODE_ID + k,
                node_config=node_config(k),
                state=RecordDict(),
                run_config=config,
            )
            for k in range(num_nodes)
        }
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        # Messages built by strategies read the sender's identity from TaskIdentity.
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> InProcessGrid:
        """Start the worker pool now (otherwise it starts on the first message)."""
        if self._workers == 1:
            if self._inline_app is None:
                self._inline_app = load_client_app(self._app_ref)
        elif self._pool is None:
            # forkserver: workers fork from a clean server process that never ran torch's
            # thread pools (fork from this process could deadlock in OpenMP), and they
            # start in well under a second once the server has imported torch.
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(self._preload)
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self._workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(self._app_ref, 1),
            )
            # Start the workers now, from a thread: the first fork waits for the fork
            # server's preload (seconds), which then overlaps the server's own start-up.
            pool = self._pool
            self._warmup = threading.Thread(
                target=lambda: [pool.submit(_noop) for _ in range(self._workers)], daemon=True
            )
            self._warmup.start()
        return self

    def close(self) -> None:
        """Stop the worker processes."""
        if self._warmup is not None:
            self._warmup.join()
            self._warmup = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> InProcessGrid:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- Grid API -----------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        """Set the run this grid serves."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message to ``dst_node_id`` (kept for the Grid interface)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Ids of all virtual nodes (all are always available)."""
        return list(self._contexts)

    def context(self, node_id: int) -> Context:
        """The ``Context`` kept for ``node_id`` (its ``state`` persists between rounds)."""
        return self._contexts[node_id]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages for delivery; :meth:`pull_messages` runs them."""
        ids = []
        for message in messages:
            if message.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"no virtual node with id {message.metadata.dst_node_id}")
            message_id = uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Deliver any queued messages among ``message_ids`` and return their replies."""
        wanted = list(message_ids)
        todo = [i for i in wanted if i in self._pending]
        if todo:
            self._replies.update(self._deliver([self._pending.pop(i) for i in todo], timeout_s=None))
        return [self._replies.pop(i) for i in wanted if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver ``messages`` and return the replies that arrive within ``timeout`` seconds."""
        batch = list(messages)
        for message in batch:
            if message.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"no virtual node with id {message.metadata.dst_node_id}")
            message.metadata.__dict__["_message_id"] = uuid4().hex
        replies = self._deliver(batch, timeout_s=timeout)
        return [replies[m.metadata.message_id] for m in batch if m.metadata.message_id in replies]

    # --- delivery -----------------------------------------------------------------

    def _deliver(self, batch: list[Message], timeout_s: float | None) -> dict[str, Message]:
        self.start()
        out: dict[str, Message] = {}
        if self._pool is None:
            assert self._inline_app is not None
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            for message in batch:
                if deadline is not None and time.monotonic() > deadline:
                    break  # the rest time out, as they would on a real link
                context = self._contexts[message.metadata.dst_node_id]
                out[message.metadata.message_id] = _call_client_app(self._inline_app, message, context)
        else:
            futures = {
                self._pool.submit(
                    _worker_task,
                    message_to_proto(message).SerializeToString(),
                    context_to_proto(self._contexts[message.metadata.dst_node_id]).SerializeToString(),
                ): message
                for message in batch
            }
            done, not_done = cf.wait(futures, timeout=timeout_s)
            for future in done:
                message = futures[future]
                try:
                    reply_bytes, context_bytes = future.result()
                except Exception as err:  # a worker died (OOM, segfault): that client fails
                    reason = f"worker process failed: {type(err).__name__}: {err}"
                    out[message.metadata.message_id] = Message(
                        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                        reply_to=message,
                    )
                    continue
                reply = message_from_proto(ProtoMessage.FromString(reply_bytes))
                new_context = context_from_proto(ProtoContext.FromString(context_bytes))
                self._contexts[message.metadata.dst_node_id].state = new_context.state
                out[message.metadata.message_id] = reply
            if not_done:
                # A running task cannot be cancelled: it would hold its worker into the next
                # round (and block shutdown). The contexts live here, so the workers can go.
                log.warning(
                    "%d clients did not reply within %s s; restarting the worker pool",
                    len(not_done),
                    timeout_s,
                )
                self._kill_pool()
            elif any(isinstance(f.exception(), cf.process.BrokenProcessPool) for f in done):
                log.warning("a worker process died; restarting the pool")
                self._kill_pool()
        return out

    def _kill_pool(self) -> None:
        """Terminate the workers now; the next delivery starts a fresh pool."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # ProcessPoolExecutor has no public way to stop a running task (3.14 adds one).
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)


def default_workers() -> int:
    """One worker per CPU core available to this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
