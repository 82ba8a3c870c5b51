"""ClientApps for the aggregate seam and resume tests: seeded, model-agnostic, fast."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

random_app = ClientApp()


def random_step(pid: int, server_round: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The update partition ``pid`` sends for tensor ``name`` in ``server_round`` (seeded)."""
    seed = [pid, server_round, sum(name.encode())]
    return (0.05 * np.random.default_rng(seed).standard_normal(shape) + 0.01 * (pid + 1)).astype(np.float32)


@random_app.train()
def random_train(msg: Message, context: Context) -> Message:
    """Weights = received + a seeded step; ``num-examples = 5 + partition``."""
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
    received = {k: a.numpy() for k, a in msg.content.array_records["arrays"].items()}
    local = {k: v + random_step(pid, server_round, k, v.shape) for k, v in received.items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
            "metrics": MetricRecord({"num-examples": 5 + pid, "train-loss": 1.0 / (1 + pid)}),
        }
    )
    return Message(content, reply_to=msg)


# Partition 0 claims an absurd weight (the attack of issue 8 §7.1); others as random_app.
heavy_app = ClientApp()


@heavy_app.train()
def heavy_train(msg: Message, context: Context) -> Message:
    reply = random_train(msg, context)
    pid = int(context.node_config["partition-id"])
    if pid in (0, 1):
        # 1e308 overflowed the weight sum; a million outweighed everyone else.
        reply.content["metrics"] = MetricRecord({"num-examples": 1e308 if pid == 0 else 1_000_000})
    return reply


# Every partition sends finite float32 weights so large that their mean overflows float32.
overflow_app = ClientApp()


@overflow_app.train()
def overflow_train(msg: Message, context: Context) -> Message:
    received = {k: a.numpy() for k, a in msg.content.array_records["arrays"].items()}
    huge = {k: np.full(v.shape, 3.0e38, np.float32) for k, v in received.items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in huge.items()}),
            "metrics": MetricRecord({"num-examples": 5}),
        }
    )
    return Message(content, reply_to=msg)


# Trains every ArrayRecord it gets (the model and, e.g., control variates) by a seeded step;
# behind fedge's own client mods, so both records are fp16-widened and compressed.
def _every_record_train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
    records = {}
    for key, record in msg.content.array_records.items():
        received = {k: a.numpy() for k, a in record.items()}
        step = {k: random_step(pid, server_round, key + k, v.shape) for k, v in received.items()}
        records[key] = ArrayRecord({k: Array(v + step[k]) for k, v in received.items()})
    content = RecordDict({**records, "metrics": MetricRecord({"num-examples": 5 + pid, "local-steps": 3.0})})
    return Message(content, reply_to=msg)


def _make_every_record_app() -> ClientApp:
    from fedge.client.mods import compression_mod, fp16_downlink_mod

    app = ClientApp(mods=[fp16_downlink_mod, compression_mod])
    app.train()(_every_record_train)
    return app


every_record_app = _make_every_record_app()


# random_app's replies plus a device epsilon 0.5 * (partition + 1) (what a DP-SGD client reports).
epsilon_app = ClientApp()


@epsilon_app.train()
def epsilon_train(msg: Message, context: Context) -> Message:
    reply = random_train(msg, context)
    pid = int(context.node_config["partition-id"])
    metrics = reply.content.metric_records["metrics"]
    reply.content["metrics"] = MetricRecord({**dict(metrics), "dp-sgd-epsilon": 0.5 * (pid + 1)})
    return reply
