"""ClientApps with known, hand-computable replies, for testing the server side alone."""

from __future__ import annotations

import io
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

# Partition k sends every weight = VALUE[k] with NUM_EXAMPLES[k] examples.
VALUES = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
NUM_EXAMPLES = [3, 2, 1, 4, 5, 6, 7, 8, 9, 10]


def _reply(msg: Message, arrays: dict[str, np.ndarray], num_examples: object) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.5}),
        }
    )
    return Message(content, reply_to=msg)


constant_app = ClientApp()


@constant_app.train()
def constant_train(msg: Message, context: Context) -> Message:
    """Reply with weights full of VALUES[k] and NUM_EXAMPLES[k] examples."""
    k = int(context.node_config["partition-id"])
    ref = msg.content.array_records["arrays"]
    arrays = {name: np.full(a.shape, VALUES[k], dtype=np.dtype(a.dtype)) for name, a in ref.items()}
    # Count calls in the client's persistent state, to check Contexts survive rounds.
    calls = context.state.metric_records.get("calls", MetricRecord({"n": 0}))
    context.state["calls"] = MetricRecord({"n": int(calls["n"]) + 1})
    return _reply(msg, arrays, NUM_EXAMPLES[k])


# Partitions 0, 1 and 9 send valid updates (9 with an extra metric, which Flower's own
# consistency check would refuse); 2 raises, 3 sends NaN, 4 a wrong shape, 5 zero
# examples, 6 an array whose declared shape lies about its bytes, 7 infinitely many
# examples, 8 bytes that do not decode.
faulty_app = ClientApp()


def _lying_array(declared_like: np.ndarray) -> Array:
    buf = io.BytesIO()
    np.save(buf, np.ones(1, dtype=declared_like.dtype), allow_pickle=False)
    return Array(
        dtype=str(declared_like.dtype),
        shape=tuple(declared_like.shape),
        stype="numpy.ndarray",
        data=buf.getvalue(),
    )


@faulty_app.train()
def faulty_train(msg: Message, context: Context) -> Message:
    """Misbehave according to the partition id (see the comment above)."""
    k = int(context.node_config["partition-id"])
    ref = {name: a.numpy() for name, a in msg.content.array_records["arrays"].items()}
    arrays = {name: np.full_like(a, VALUES[k]) for name, a in ref.items()}
    if k == 2:
        raise RuntimeError("simulated training crash")
    if k == 3:
        arrays = {name: np.full_like(a, np.nan) for name, a in ref.items()}
    if k == 4:
        arrays = {name: np.zeros(a.size + 1, dtype=a.dtype) for name, a in ref.items()}
    if k in (6, 8):
        records = {name: _lying_array(a) for name, a in ref.items()}
        if k == 8:
            records = {
                name: Array(dtype="float32", shape=tuple(a.shape), stype="numpy.ndarray", data=b"junk")
                for name, a in ref.items()
            }
        content = RecordDict({"arrays": ArrayRecord(records), "metrics": MetricRecord({"num-examples": 5})})
        return Message(content, reply_to=msg)
    if k == 9:
        metrics = MetricRecord({"num-examples": NUM_EXAMPLES[k], "train-loss": 0.5, "extra": 1.0})
        content = RecordDict(
            {"arrays": ArrayRecord({n: Array(v) for n, v in arrays.items()}), "metrics": metrics}
        )
        return Message(content, reply_to=msg)
    return _reply(msg, arrays, {5: 0, 7: float("inf")}.get(k, NUM_EXAMPLES[k]))


# Partition 1 never answers in time; the others reply like constant_app.
hanging_app = ClientApp()


@hanging_app.train()
def hanging_train(msg: Message, context: Context) -> Message:
    """Sleep far past any test's round timeout on partition 1."""
    if int(context.node_config["partition-id"]) == 1:
        time.sleep(600)
    return constant_train(msg, context)
