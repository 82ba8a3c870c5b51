"""The in-process engine: round timeouts with one worker, dying workers, persisted client state."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from processes import is_running

from fedge.simulation.client_state import ClientStateStore
from fedge.simulation.grid import FIRST_NODE_ID, EngineError, InProcessGrid

SUPPORT = Path(__file__).resolve().parents[1] / "support"


def _messages(num_nodes: int, server_round: int) -> list[Message]:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})})
    return [
        Message(content, FIRST_NODE_ID + k, "train", group_id=str(server_round)) for k in range(num_nodes)
    ]


def _senders(replies: list[Message]) -> list[int]:
    return sorted(r.metadata.src_node_id - FIRST_NODE_ID for r in replies if r.has_content())


def test_a_hanging_client_is_dropped_with_one_worker() -> None:
    with InProcessGrid("fakeapps:hanging_app", 3, {}, workers=1) as grid:
        # A first round without the hanging partition, so the timed round below does not
        # include the worker's start-up.
        warm = _messages(3, 1)
        assert _senders(list(grid.send_and_receive([warm[0], warm[2]], timeout=120))) == [0, 2]
        (worker,) = grid.worker_pids
        start = time.monotonic()
        replies = list(grid.send_and_receive(_messages(3, 2), timeout=2.0))
        elapsed = time.monotonic() - start
        assert _senders(replies) == [0]  # partition 1 hangs; 2 waits behind it and is late too
        assert 2.0 <= elapsed < 10.0
        assert not is_running(worker)  # the hung worker was killed, a fresh one replaced it
        (fresh,) = grid.worker_pids
        assert fresh != worker
        again = _messages(3, 3)
        assert _senders(list(grid.send_and_receive([again[2]], timeout=120))) == [2]
    assert not is_running(fresh)


def test_a_worker_that_dies_fails_only_its_client() -> None:
    with InProcessGrid("fakeapps:dying_app", 4, {}, workers=2) as grid:
        replies = list(grid.send_and_receive(_messages(4, 1), timeout=120))
        assert _senders(replies) == [0, 2, 3]
        (error,) = [r for r in replies if r.has_error()]
        assert error.metadata.src_node_id == FIRST_NODE_ID + 1
        assert "worker process died (exit code 3)" in error.error.reason
        pids = grid.worker_pids
    assert len(pids) == 2 and not any(is_running(p) for p in pids)


def test_a_client_app_that_does_not_import_is_an_engine_error() -> None:
    with InProcessGrid("fakeapps_no_such_module:app", 2, {}, workers=1) as grid:
        with pytest.raises(EngineError, match="cannot start in a worker process") as err:
            grid.send_and_receive(_messages(2, 1), timeout=120)
        assert "ModuleNotFoundError" in str(err.value) and "\n" not in str(err.value)
        pids = grid.worker_pids
    assert not any(is_running(p) for p in pids)


def test_workers_that_all_die_at_start_are_an_engine_error(tmp_path: Path) -> None:
    # A driver without the __main__ guard: each worker re-imports it, tries to start a
    # grid of its own while it bootstraps, and dies before it is ready.
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(SUPPORT)!r})
            import numpy as np
            from flwr.app import Array, ArrayRecord, Message, RecordDict
            from fedge.simulation.grid import FIRST_NODE_ID, InProcessGrid

            with InProcessGrid("fakeapps:constant_app", 2, {{}}, workers=1) as grid:
                content = RecordDict({{"arrays": ArrayRecord({{"w": Array(np.zeros(3, np.float32))}})}})
                grid.send_and_receive([Message(content, FIRST_NODE_ID, "train")], timeout=60)
            print("finished")
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode != 0 and "finished" not in out
    assert "EngineError: every worker process of the in-process engine died" in err
    assert 'if __name__ == "__main__":' in err


def test_the_parent_persists_only_states_of_replies_that_arrived(tmp_path: Path) -> None:
    store_dir = tmp_path / "clients"
    with InProcessGrid("fakeapps:stateful_app", 2, {}, workers=1, client_state_dir=store_dir) as grid:
        assert _senders(list(grid.send_and_receive(_messages(2, 1), timeout=120))) == [0, 1]
        # Round 2: partition 1 changes its state, then hangs past the timeout.
        assert _senders(list(grid.send_and_receive(_messages(2, 2)[::-1], timeout=2.0))) == []
        assert grid.context(FIRST_NODE_ID + 1).state.metric_records["calls"]["n"] == 1
    store = ClientStateStore(store_dir)
    assert sorted(store.versions(1)) == [1]  # nothing of round 2 reached the disk
    path = store.versions(1)[1]
    assert path == store_dir / "client-1" / "state-round-0001.pb"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    state = recorddict_from_proto(ProtoRecordDict.FromString(path.read_bytes()))
    assert state.metric_records["calls"]["n"] == 1


def test_store_keeps_two_versions_and_resume_ignores_newer_ones(tmp_path: Path) -> None:
    from flwr.app import MetricRecord

    store = ClientStateStore(tmp_path)
    for server_round in (1, 3, 4):
        store.save(0, server_round, RecordDict({"calls": MetricRecord({"n": server_round})}))
    assert sorted(store.versions(0)) == [3, 4]  # the newest and the one before
    # A resume from round 3: round 4's version belongs to a round that did not checkpoint.
    with InProcessGrid("fakeapps:constant_app", 2, {}, client_state_dir=tmp_path, resume_round=3) as grid:
        assert grid.context(FIRST_NODE_ID).state.metric_records["calls"]["n"] == 3
        assert len(grid.context(FIRST_NODE_ID + 1).state) == 0
    assert sorted(store.versions(0)) == [3]
    # A new run in the same folder starts every client empty.
    InProcessGrid("fakeapps:constant_app", 2, {}, client_state_dir=tmp_path).close()
    assert store.versions(0) == {}


def test_a_corrupt_client_state_is_one_line(tmp_path: Path) -> None:
    from fedge.simulation.client_state import ClientStateError

    (tmp_path / "client-0").mkdir()
    (tmp_path / "client-0" / "state-round-0002.pb").write_bytes(b"\xff\x00 not a protobuf")
    with pytest.raises(ClientStateError, match=r"client-0/state-round-0002\.pb is unreadable") as err:
        InProcessGrid("fakeapps:constant_app", 2, {}, client_state_dir=tmp_path, resume_round=2)
    assert "\n" not in str(err.value)
