"""The client's update pipeline runs its stages in the one declared order."""

from __future__ import annotations

from uuid import uuid4

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedge.client.pipeline import STAGES, StageContext, UpdatePipeline, Updates
from fedge.compression import decode
from fedge.records import arrays_to_numpy, numpy_to_arrays
from fedge.update_records import CODEC_STYPE

SHAPES = {"fc.weight": (6, 8), "fc.bias": (6,)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 3}, state=RecordDict(), run_config={})


def _message(weights: dict[str, np.ndarray], config: dict[str, object]) -> Message:
    content = RecordDict({"arrays": numpy_to_arrays(weights), "config": ConfigRecord(config)})  # type: ignore[arg-type]
    message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = uuid4().hex
    return message


def _step(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _handler(step: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    def handler(msg: Message, context: Context) -> Message:
        received = arrays_to_numpy(msg.content.array_records["arrays"])
        local = {k: received[k] + step[k] for k in received}
        content = RecordDict({"arrays": numpy_to_arrays(local), "metrics": MetricRecord({"num-examples": 4})})
        return Message(content, reply_to=msg)

    return handler


def _norm(tensors: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in tensors.values())))


def test_the_declared_order() -> None:
    assert STAGES == ("train", "update", "error-feedback", "clip", "encode", "noise", "mask")


def test_stages_run_in_order_clip_before_encode_mask_last() -> None:
    calls: list[str] = []
    glob, step = _step(0), _step(1)

    def clip(updates: Updates, ctx: StageContext) -> Updates:
        calls.append("clip")
        # The clip sees the float update local - global, before any codec.
        for name, values in updates["arrays"].items():
            np.testing.assert_allclose(values, step[name], rtol=0, atol=1e-6)
        assert ctx.server_round == 3
        return updates

    def noise(records: dict[str, ArrayRecord], ctx: StageContext) -> dict[str, ArrayRecord]:
        calls.append("noise")
        assert all(a.stype == CODEC_STYPE for a in records["arrays"].values())
        return records

    def mask(records: dict[str, ArrayRecord], ctx: StageContext) -> dict[str, ArrayRecord]:
        calls.append("mask")
        # Masking sees the encoded payloads, and what it returns is what is sent.
        assert all(a.stype == CODEC_STYPE for a in records["arrays"].values())
        return {"arrays": ArrayRecord({k: a for k, a in records["arrays"].items()}), "extra": ArrayRecord()}

    pipeline = UpdatePipeline(clip=clip, noise=noise, mask=mask)
    # No codec named: a stage still gets the exact update ("none" codec).
    reply = pipeline(_message(glob, {"server-round": 3, "seed": 1}), _context(), _handler(step))
    assert calls == ["clip", "noise", "mask"]
    assert "extra" in reply.content.array_records
    for name, array in reply.content.array_records["arrays"].items():
        np.testing.assert_allclose(decode(array.data, SHAPES[name]), step[name], rtol=0, atol=1e-6)


def test_with_error_feedback_the_residual_cannot_push_the_sent_norm_past_the_clip() -> None:
    clip_norm = 0.5

    def clip(updates: Updates, ctx: StageContext) -> Updates:
        norm = _norm(updates["arrays"])
        scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        return {"arrays": {k: (v * scale).astype(np.float32) for k, v in updates["arrays"].items()}}

    pipeline = UpdatePipeline(clip=clip)
    context = _context()
    glob = _step(0)
    for server_round in range(1, 6):
        config = {"server-round": server_round, "seed": 1, "codec": "topk:0.25", "error-feedback": True}
        reply = pipeline(_message(glob, config), context, _handler(_step(10 + server_round)))
        sent = {n: decode(a.data, SHAPES[n]) for n, a in reply.content.array_records["arrays"].items()}
        # top-k of a vector of norm <= C has norm <= C, residual included (clip runs after it).
        assert _norm(sent) <= clip_norm * (1 + 1e-5)
    assert "fedge.ef-residual" in context.state.array_records


def test_a_missing_server_round_is_refused() -> None:
    with pytest.raises(ValueError, match="server-round"):
        UpdatePipeline()(_message(_step(0), {"codec": "qsgd:4", "seed": 1}), _context(), _handler(_step(1)))
