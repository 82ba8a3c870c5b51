"""ClientApps with known, hand-computable replies, for testing the server side alone."""

from __future__ import annotations

import io
import math
import os
import struct
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.client.mods import compression_mod, fp16_downlink_mod
from fedge.compression import encode, parse_codec
from fedge.update_records import CODEC_STYPE

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


# constant_app's replies, compressed by fedge's own client mods (the codec comes with the
# round config), so the server's decoding can be checked against closed forms.
compressing_app = ClientApp(mods=[fp16_downlink_mod, compression_mod])
compressing_app.train()(constant_train)


def _codec_array(a: np.ndarray, payload: bytes, *, dtype: str = "float32") -> Array:
    return Array(dtype=dtype, shape=tuple(a.shape), stype=CODEC_STYPE, data=payload)


def _bad_payloads(ref: dict[str, np.ndarray], k: int) -> dict[str, Array]:
    """Partition k's malformed update: each a different way a payload can be wrong."""
    rng = np.random.default_rng(k)
    good = {name: encode(np.ones(a.size, np.float32), parse_codec("qsgd:4"), rng) for name, a in ref.items()}
    if k == 2:  # truncated in transit
        return {name: _codec_array(ref[name], p[: len(p) // 2]) for name, p in good.items()}
    if k == 3:  # extra bytes after the body
        return {name: _codec_array(ref[name], p + b"\x00") for name, p in good.items()}
    if k == 4:  # a header version from the future
        return {name: _codec_array(ref[name], p[:3] + b"\x02" + p[4:]) for name, p in good.items()}
    if k == 5:  # an unknown codec id
        return {name: _codec_array(ref[name], p[:4] + b"\x09" + p[5:]) for name, p in good.items()}
    if k == 6:  # NaN in an uncompressed ("none" codec) update
        nan = parse_codec("none")
        return {
            name: _codec_array(a, encode(np.zeros(a.size), nan, rng)[:-4] + struct.pack("<f", math.nan))
            for name, a in ref.items()
        }
    if k == 7:  # Inf as a qsgd scale
        return {
            name: _codec_array(ref[name], p[:18] + struct.pack("<f", math.inf) + p[22:])
            for name, p in good.items()
        }
    if k == 8:  # the element count of another tensor
        other = encode(np.ones(3, np.float32), parse_codec("qsgd:4"), rng)
        return {name: _codec_array(a, other) for name, a in ref.items()}
    # k == 9: declares float16 around a float32 payload
    return {name: _codec_array(ref[name], p, dtype="float16") for name, p in good.items()}


bad_payload_app = ClientApp(mods=[fp16_downlink_mod, compression_mod])


@bad_payload_app.train()
def bad_payload_train(msg: Message, context: Context) -> Message:
    """Partitions 0 and 1 train like constant_app (compressed by the mod); 2..9 send bad payloads."""
    k = int(context.node_config["partition-id"])
    if k < 2:
        return constant_train(msg, context)
    ref = {name: a.numpy() for name, a in msg.content.array_records["arrays"].items()}
    content = RecordDict(
        {"arrays": ArrayRecord(_bad_payloads(ref, k)), "metrics": MetricRecord({"num-examples": 5})}
    )
    return Message(content, reply_to=msg)


# Counts its calls in context.state; partition 1 changes its state in round 2 and then
# hangs, so the round's timeout must drop it and keep its state as of round 1.
stateful_app = ClientApp()


@stateful_app.train()
def stateful_train(msg: Message, context: Context) -> Message:
    """Like constant_app, but partition 1 hangs in round 2 (group id "2") after its state moved on."""
    k = int(context.node_config["partition-id"])
    calls = context.state.metric_records.get("calls", MetricRecord({"n": 0}))
    context.state["calls"] = MetricRecord({"n": int(calls["n"]) + 1})
    if k == 1 and msg.metadata.group_id == "2":
        time.sleep(600)
    ref = msg.content.array_records["arrays"]
    arrays = {name: np.full(a.shape, VALUES[k], dtype=np.dtype(a.dtype)) for name, a in ref.items()}
    return _reply(msg, arrays, NUM_EXAMPLES[k])


# Partition 1's worker process dies (as on a segfault or the OOM killer); the others
# reply like constant_app.
dying_app = ClientApp()


@dying_app.train()
def dying_train(msg: Message, context: Context) -> Message:
    """Kill the worker process on partition 1."""
    if int(context.node_config["partition-id"]) == 1:
        os._exit(3)
    return constant_train(msg, context)
