"""ClientApps with known, hand-computable replies, for testing the server side alone."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

# Partition k sends every weight = VALUE[k] with NUM_EXAMPLES[k] examples.
VALUES = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
NUM_EXAMPLES = [3, 2, 1, 4, 5, 6]


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


# Partition 0 and 1 behave; 2 raises, 3 sends NaN, 4 a wrong shape, 5 zero examples.
faulty_app = ClientApp()


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
    return _reply(msg, arrays, 0 if k == 5 else NUM_EXAMPLES[k])
