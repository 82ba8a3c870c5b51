"""fedge's in-process simulation engine: a Flower ``Grid`` that calls ``ClientApp``s directly.

Flower's simulation engine runs every ClientApp call as a Ray task, which costs a
scheduler round-trip and object-store copies per client. With edge-sized models the
training itself takes milliseconds, so that overhead dominates; this Grid instead
delivers each message to a ``ClientApp`` in worker processes (one per core by default)
and keeps every virtual client's ``Context`` in the parent, so a client's state survives
between rounds whichever worker runs it.

The workers are plain ``multiprocessing`` processes with one pipe each, run by hand
rather than through ``concurrent.futures``: the parent knows which message every worker
is running, so a worker that hangs past the round timeout is killed (with one worker
too), one that dies fails only its own client, and workers that all die before they can
run anything (a driver script without an ``if __name__ == "__main__":`` guard, a client
app that does not import) stop the run with :class:`EngineError` instead of turning every
client into a dropout.

Messages and contexts cross the process boundary as Flower's own protobuf bytes
(``flwr.common.serde``), never as pickles of received data. With ``client_state_dir``
the parent (never a worker) also writes each client's state to disk after every reply
that arrived in time (:mod:`fedge.simulation.client_state`), for ``--resume``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
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

from fedge.flower_internals import set_message_id, set_task_identity
from fedge.simulation.client_state import ClientStateStore

log = logging.getLogger(__name__)

# Virtual node ids start here, so they never collide with the SuperLink's own id (1).
FIRST_NODE_ID = 1000
# How long the first worker may take to start (fork server preload of torch, datasets,
# ...: seconds, more on a loaded machine) before the engine gives up.
STARTUP_TIMEOUT_S = 300.0
# After a round timeout a worker is killed; it gets this long to exit.
_JOIN_TIMEOUT_S = 5.0
# The config key Flower's strategies put the round in (``configure_train``/``evaluate``).
_SERVER_ROUND_KEY = "server-round"

# Frames between the parent and a worker (``Connection.send_bytes``; no pickles).
_READY = b"ready"
_INIT_FAILED = b"init-failed"
_OK = b"ok"
_TASK_FAILED = b"task-failed"
_QUIT = b""

_MAIN_GUARD_HINT = (
    "every worker process of the in-process engine died before it could run a client; "
    "if you drive fedge from a Python script, put the driver under "
    '`if __name__ == "__main__":` (worker processes re-import the script), '
    "otherwise run with --verbose to see the workers' errors"
)

# Per worker process: the ClientApp, loaded once when the worker starts.
_WORKER_APP: ClientApp | None = None


class EngineError(RuntimeError):
    """The in-process engine cannot run clients at all: an engine failure, not dropped clients."""


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


def _worker_task(message_bytes: bytes, context_bytes: bytes) -> tuple[bytes, bytes]:
    """Worker side of one delivery: bytes in, reply and updated client state out."""
    assert _WORKER_APP is not None, "worker initialization did not run"
    message = message_from_proto(ProtoMessage.FromString(message_bytes))
    context = context_from_proto(ProtoContext.FromString(context_bytes))
    reply = _call_client_app(_WORKER_APP, message, context)
    return (
        message_to_proto(reply).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )


def _worker_main(conn: Connection, app_ref: str, torch_threads: int) -> None:
    """A worker process: load the app, say ready, then run deliveries until told to quit."""
    try:
        _init_worker(app_ref, torch_threads)
    except BaseException as err:  # reported to the parent, which stops the run
        conn.send_bytes(_INIT_FAILED)
        conn.send_bytes(f"{type(err).__name__}: {err}".encode())
        return
    conn.send_bytes(_READY)
    while True:
        try:
            message_bytes = conn.recv_bytes()
            if message_bytes == _QUIT:
                return
            context_bytes = conn.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            reply_bytes, new_context_bytes = _worker_task(message_bytes, context_bytes)
        except Exception as err:  # bytes that do not decode: that client fails, the worker lives
            conn.send_bytes(_TASK_FAILED)
            conn.send_bytes(f"{type(err).__name__}: {err}".encode())
            continue
        conn.send_bytes(_OK)
        conn.send_bytes(reply_bytes)
        conn.send_bytes(new_context_bytes)


@dataclass(eq=False)
class _Worker:
    process: Any  # multiprocessing.process.BaseProcess (its context type is not exported)
    conn: Connection
    ready: bool = False
    task: str | None = None  # the key of the delivery it runs


# A delivery's outcome: (reply bytes, context bytes), or why the client failed.
_Outcome = tuple[bytes, bytes] | str


class WorkerPool:
    """Worker processes that each run one ``ClientApp`` delivery at a time.

    Parameters
    ----------
    size : int
        Number of worker processes.
    app_ref : str
        ``"module:attribute"`` of the ``ClientApp`` each worker imports at start.
    preload : sequence of str
        Modules the fork server imports once, before it forks the workers.
    startup_timeout_s : float, default STARTUP_TIMEOUT_S
        How long deliveries wait for the first worker to be ready.

    Notes
    -----
    A worker that dies while it runs a delivery fails that delivery only and is replaced.
    Workers that die before they are ready are replaced once each; when that happens
    again and no worker is ready, the pool is unusable and :meth:`run` raises
    :class:`EngineError`, as it does at once when the app fails to import in a worker.
    """

    def __init__(
        self,
        size: int,
        app_ref: str,
        preload: Sequence[str],
        *,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self._size = size
        self._app_ref = app_ref
        # forkserver: workers fork from a clean server process that never ran torch's
        # thread pools (fork from this process could deadlock in OpenMP), and they
        # start in well under a second once the server has imported torch.
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))
        self._startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        # Workers that died before they were ready since a worker was last ready.
        self._start_failures = 0
        self._last_spawn = time.monotonic()

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (for tests and diagnostics)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def start(self) -> None:
        """Start missing workers; returns at once (they get ready in the background)."""
        while len(self._workers) < self._size:
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child_end, self._app_ref, 1), name="fedge-worker"
        )
        process.start()
        self._last_spawn = time.monotonic()
        # Only the worker may hold its end, so its death reads as end-of-file here.
        child_end.close()
        return _Worker(process=process, conn=parent_end)

    def _stop(self, worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(_JOIN_TIMEOUT_S)
        worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._stop(worker)
        self._workers[self._workers.index(worker)] = self._spawn()

    def close(self) -> None:
        """Ask idle workers to quit, kill any that do not, and wait for all of them."""
        for worker in self._workers:
            if worker.task is None:
                with contextlib.suppress(OSError):  # already gone
                    worker.conn.send_bytes(_QUIT)
        end = time.monotonic() + _JOIN_TIMEOUT_S
        for worker in self._workers:
            worker.process.join(max(0.0, end - time.monotonic()))
            self._stop(worker)
        self._workers = []

    def _worker_died(self, worker: _Worker, outcomes: dict[str, _Outcome]) -> None:
        worker.process.join(_JOIN_TIMEOUT_S)
        code = worker.process.exitcode
        if worker.task is not None:
            log.warning("a worker process died (exit code %s) while running a client", code)
            outcomes[worker.task] = f"worker process died (exit code {code}) while running this client"
            worker.task = None
        elif not worker.ready:
            self._start_failures += 1
            log.debug("a worker process died at start-up (exit code %s)", code)
            if self._start_failures >= 2 * self._size and not any(w.ready for w in self._workers):
                raise EngineError(f"{_MAIN_GUARD_HINT} (exit code {code})")
        self._replace(worker)

    def _receive(self, worker: _Worker, outcomes: dict[str, _Outcome]) -> None:
        try:
            tag = worker.conn.recv_bytes()
            if tag == _READY:
                worker.ready = True
                self._start_failures = 0
            elif tag == _INIT_FAILED:
                reason = worker.conn.recv_bytes().decode(errors="replace")
                module = self._app_ref.partition(":")[0]
                raise EngineError(
                    f"the client app {self._app_ref} cannot start in a worker process ({reason}); "
                    f"check that `python -c 'import {module}'` works"
                )
            elif tag == _OK and worker.task is not None:
                reply_bytes = worker.conn.recv_bytes()
                outcomes[worker.task] = (reply_bytes, worker.conn.recv_bytes())
                worker.task = None
            elif tag == _TASK_FAILED and worker.task is not None:
                reason = worker.conn.recv_bytes().decode(errors="replace")
                outcomes[worker.task] = f"worker could not run this client: {reason}"
                worker.task = None
            else:  # pragma: no cover - a protocol bug
                raise EngineError(f"worker process sent an unexpected frame {tag[:20]!r}")
        except (EOFError, OSError):
            self._worker_died(worker, outcomes)

    def run(
        self, tasks: Sequence[tuple[str, bytes, bytes]], timeout_s: float | None
    ) -> tuple[dict[str, _Outcome], list[str]]:
        """Run ``(key, message bytes, context bytes)`` deliveries; return outcomes and the late keys.

        ``timeout_s`` counts from the first delivery handed to a worker (worker start-up
        is bounded by ``startup_timeout_s`` instead); deliveries still running then are
        stopped by killing their workers, which are replaced.

        Raises
        ------
        EngineError
            If no worker can start (see the class Notes).
        """
        self.start()
        queue = deque(key for key, _, _ in tasks)
        payloads = {key: (message, context) for key, message, context in tasks}
        outcomes: dict[str, _Outcome] = {}
        deadline: float | None = None
        while queue or any(w.task is not None for w in self._workers):
            for worker in list(self._workers):
                if not (queue and worker.ready and worker.task is None):
                    continue
                key = queue.popleft()
                worker.task = key
                try:
                    worker.conn.send_bytes(payloads[key][0])
                    worker.conn.send_bytes(payloads[key][1])
                except OSError:  # it died while idle: the delivery never ran, hand it on
                    worker.task = None
                    queue.appendleft(key)
                    self._worker_died(worker, outcomes)
                    continue
                if deadline is None and timeout_s is not None:
                    deadline = time.monotonic() + timeout_s
            any_ready = any(w.ready for w in self._workers)
            # Start-up counts from the latest (re)start of a worker, not against the round.
            limit = deadline if any_ready else self._last_spawn + self._startup_timeout_s
            wait_s = None if limit is None else max(0.0, limit - time.monotonic())
            readable = mp_connection.wait([w.conn for w in self._workers], timeout=wait_s)
            for worker in list(self._workers):
                if worker.conn in readable:
                    self._receive(worker, outcomes)
            if not readable and limit is not None and time.monotonic() >= limit:
                if not any_ready:
                    raise EngineError(
                        f"no worker process of the in-process engine started within "
                        f"{self._startup_timeout_s:.0f} s; the machine may be overloaded (try --workers 1)"
                    )
                break  # the round timeout
        late = list(queue)
        for worker in list(self._workers):
            if worker.task is not None:
                # A running delivery cannot be cancelled: kill its worker (the contexts
                # live in the parent, so nothing of the client's is lost).
                late.append(worker.task)
                worker.task = None
                self._replace(worker)
        return outcomes, late


def message_round(message: Message) -> int | None:
    """The round a message belongs to: its ``group_id``, else its config's ``server-round``."""
    group = message.metadata.group_id
    if group.isdigit():
        return int(group)
    if message.has_content():
        for record in message.content.config_records.values():
            value = record.get(_SERVER_ROUND_KEY)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


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
        Worker processes. One worker is still a separate process, so the round
        timeout holds (a client that hangs is killed when it runs out).
    run_id : int, default 1
        Flower run id stamped on messages.
    preload : sequence of str
        Modules the fork server imports once, before it forks the workers, so each
        worker does not pay for them again (torch, sklearn, ... take seconds each).
    node_config : Mapping, optional
        Further ``node_config`` entries every node gets, as a SuperNode's
        ``--node-config`` would (``public-key``: the run's pinned signing key).
    client_state_dir : Path, optional
        Where the parent writes each client's ``Context.state`` after every reply that
        arrived in time (``client-K/state-round-NNNN.pb``,
        :class:`~fedge.simulation.client_state.ClientStateStore`). Workers get no
        folder of their own: what a worker that timed out did never reaches the disk.
    resume_round : int, default 0
        With ``client_state_dir``: start each client from its state as of this round
        (the checkpoint's round of a resumed run). 0 starts every client empty and
        deletes versions left by an earlier attempt in the same folder.
    inline : bool, default False
        Run clients in this process, one after another, with no worker process. For
        debugging only: the round timeout is then checked only between clients, so a
        client that hangs blocks the run.

    Notes
    -----
    Use it as a context manager (or call :meth:`close`) so the workers stop.

    Raises
    ------
    EngineError
        From delivery, when no worker process can start (see :class:`WorkerPool`).
    """

    #: All virtual nodes exist from the start: a round needing more fails at once
    #: (:func:`fedge.server.transport.wait_for_nodes`) instead of waiting for none to join.
    fixed_federation = True

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
        resume_round: int = 0,
        inline: bool = False,
        node_config: Mapping[str, Any] | None = None,
    ) -> None:
        if num_nodes <= 0:
            raise ValueError(f"num_nodes must be positive, got {num_nodes}")
        if workers <= 0:
            raise ValueError(f"workers must be positive, got {workers}")
        if resume_round < 0:
            raise ValueError(f"resume_round must be 0 or more, got {resume_round}")
        self._app_ref = client_app_ref
        self._workers = workers
        self._inline = inline
        self._preload = ["torch", "numpy", "flwr.app", "flwr.clientapp", *preload]
        self._run = Run.create_empty(run_id)
        self._inline_app: ClientApp | None = None
        self._pool: WorkerPool | None = None
        self._starting: threading.Thread | None = None
        self._store = ClientStateStore(Path(client_state_dir)) if client_state_dir is not None else None
        # The round to file a state under when a message names none (see message_round).
        self._last_round = resume_round
        config: UserConfig = dict(run_config)

        def initial_state(k: int) -> RecordDict:
            if self._store is None:
                return RecordDict()
            return self._store.load(k, resume_round) or RecordDict()

        self._contexts: dict[int, Context] = {
            FIRST_NODE_ID + k: Context(
                run_id=run_id,
                node_id=FIRST_NODE_ID + k,
                node_config={**(node_config or {}), "partition-id": k, "num-partitions": num_nodes},
                state=initial_state(k),
                run_config=config,
            )
            for k in range(num_nodes)
        }
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        # Messages built by strategies read the sender's identity from a process global.
        set_task_identity(run_id=run_id, node_id=SUPERLINK_NODE_ID, task_id=1)

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> InProcessGrid:
        """Start the workers now (otherwise they start on the first message).

        They get ready in the background (the fork server's preload takes seconds),
        which then overlaps the server's own start-up.
        """
        if self._inline:
            if self._inline_app is None:
                self._inline_app = load_client_app(self._app_ref)
        elif self._pool is None:
            self._pool = WorkerPool(self._workers, self._app_ref, self._preload)
            # The first Process.start() waits for the fork server's preload (torch, data
            # libraries: seconds): from a thread, so it overlaps the server's own start-up
            # (its data, model and strategy). Deliveries join it (_ready_pool).
            self._starting = threading.Thread(target=self._pool.start, name="fedge-workers", daemon=True)
            self._starting.start()
        return self

    def _ready_pool(self) -> WorkerPool:
        """The pool, once the background start has finished (its errors surface here)."""
        self.start()
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        assert self._pool is not None
        self._pool.start()  # spawns what the background start could not (and raises why)
        return self._pool

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes now running."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        return [] if self._pool is None else self._pool.pids

    def close(self) -> None:
        """Stop the worker processes."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._pool is not None:
            self._pool.close()
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

    def _stamp(self, message: Message) -> str:
        if message.metadata.dst_node_id not in self._contexts:
            raise ValueError(f"no virtual node with id {message.metadata.dst_node_id}")
        message_id = uuid4().hex
        set_message_id(message, message_id)
        return message_id

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages for delivery; :meth:`pull_messages` runs them."""
        ids = []
        for message in messages:
            message_id = self._stamp(message)
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
            self._stamp(message)
        replies = self._deliver(batch, timeout_s=timeout)
        return [replies[m.metadata.message_id] for m in batch if m.metadata.message_id in replies]

    # --- delivery -----------------------------------------------------------------

    def _accept(self, message: Message, state: RecordDict) -> None:
        """Keep the state a client reached while answering ``message`` (and persist it)."""
        node_id = message.metadata.dst_node_id
        context = self._contexts[node_id]
        context.state = state
        server_round = message_round(message)
        if server_round is not None:
            self._last_round = max(self._last_round, server_round)
        if self._store is not None:
            partition = int(context.node_config["partition-id"])
            self._store.save(partition, server_round if server_round is not None else self._last_round, state)

    def _deliver(self, batch: list[Message], timeout_s: float | None) -> dict[str, Message]:
        self.start()
        out: dict[str, Message] = {}
        if self._inline:
            assert self._inline_app is not None
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            for message in batch:
                if deadline is not None and time.monotonic() > deadline:
                    break  # the rest time out, as they would on a real link
                context = self._contexts[message.metadata.dst_node_id]
                # The app works on a copy, as a worker would: the state is taken only on reply.
                work = context_from_proto(context_to_proto(context))
                out[message.metadata.message_id] = _call_client_app(self._inline_app, message, work)
                self._accept(message, work.state)
            return out
        pool = self._ready_pool()
        tasks = [
            (
                m.metadata.message_id,
                message_to_proto(m).SerializeToString(),
                context_to_proto(self._contexts[m.metadata.dst_node_id]).SerializeToString(),
            )
            for m in batch
        ]
        outcomes, late = pool.run(tasks, timeout_s)
        for message in batch:
            outcome = outcomes.get(message.metadata.message_id)
            if outcome is None:
                continue
            if isinstance(outcome, str):
                out[message.metadata.message_id] = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=outcome), reply_to=message
                )
                continue
            reply_bytes, context_bytes = outcome
            reply = message_from_proto(ProtoMessage.FromString(reply_bytes))
            self._accept(message, context_from_proto(ProtoContext.FromString(context_bytes)).state)
            out[message.metadata.message_id] = reply
        if late:
            log.warning(
                "%d clients did not reply within %s s; their workers were stopped", len(late), timeout_s
            )
        return out


def default_workers() -> int:
    """One worker per CPU core available to this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
