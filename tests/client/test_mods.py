"""fedge's client mods: compressed replies, error feedback through the client state, fp16 downlink."""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedge.client.mods import compression_mod, fp16_downlink_mod
from fedge.client.state import RESIDUAL_FILE, RESIDUAL_KEY, load_residual
from fedge.compression import parse_codec, payload_bytes
from fedge.records import arrays_to_numpy, numpy_to_arrays
from fedge.update_records import CODEC_STYPE, decode_array, to_fp16

SHAPES = {"conv.weight": (4, 1, 3, 3), "fc.weight": (10, 50), "fc.bias": (10,)}
Handler = Callable[[Message, Context], Message]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Outside Flower's runtime a Message needs a task identity (FLOWER-NOTES.md).
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1


def _context(run_id: int = 1, **node_config: object) -> Context:
    return Context(
        run_id=run_id,
        node_id=7,
        node_config={"partition-id": 3, **node_config},  # type: ignore[dict-item]
        state=RecordDict(),
        run_config={},
    )


def _message(arrays: dict[str, np.ndarray], config: dict[str, object], fp16: bool = False) -> Message:
    record = numpy_to_arrays(arrays)
    content = RecordDict({"arrays": to_fp16(record) if fp16 else record, "config": ConfigRecord(config)})  # type: ignore[arg-type]
    message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = uuid4().hex
    return message


def _trainer(
    updates: list[dict[str, np.ndarray]], seen: list[dict[str, np.ndarray]] | None = None
) -> Handler:
    """A handler whose 'training' adds the next of ``updates`` to the received weights."""
    it = iter(updates)

    def handler(msg: Message, context: Context) -> Message:
        received = arrays_to_numpy(msg.content.array_records["arrays"])
        if seen is not None:
            seen.append(received)
        step = next(it)
        local = {k: (received[k] + step[k]).astype(np.float32) for k in received}
        content = RecordDict({"arrays": numpy_to_arrays(local), "metrics": MetricRecord({"num-examples": 5})})
        return Message(content, reply_to=msg)

    return handler


def _random(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _config(codec: str, server_round: int = 1, error_feedback: bool = False) -> dict[str, object]:
    return {
        "codec": codec,
        "error-feedback": error_feedback,
        "rotation-seed": 1234 + server_round,
        "seed": 42,
        "server-round": server_round,
    }


def test_without_a_codec_the_reply_is_the_handlers() -> None:
    glob = _random(0)
    reply = compression_mod(_message(glob, {"seed": 1}), _context(), _trainer([_random(1)]))
    arrays = reply.content.array_records["arrays"]
    assert {a.stype for a in arrays.values()} == {"numpy.ndarray"}
    np.testing.assert_array_equal(arrays["fc.bias"].numpy(), glob["fc.bias"] + _random(1)["fc.bias"])


@pytest.mark.parametrize("codec", ["none", "qsgd:4", "topk:0.1", "rotate+qsgd:3"])
def test_reply_carries_the_update_and_the_server_rebuilds_the_weights(codec: str) -> None:
    glob, step = _random(0), _random(1, scale=0.01)
    reply = compression_mod(_message(glob, _config(codec)), _context(), _trainer([step]))
    arrays = reply.content.array_records["arrays"]
    spec = parse_codec(codec)
    for name, shape in SHAPES.items():
        array = arrays[name]
        assert (array.stype, array.dtype, tuple(array.shape)) == (CODEC_STYPE, "float32", shape)
        assert len(array.data) == payload_bytes(spec, int(np.prod(shape)))
        rebuilt = decode_array(array, glob[name])
        error = np.abs(rebuilt - (glob[name] + step[name]))
        if codec == "none":
            assert error.max() <= 1e-6  # one float32 rounding of global + update
        elif codec == "qsgd:4":
            # below one quantization step, 2 m / 15, of the tensor's largest update
            assert error.max() < 2 * np.abs(step[name]).max() / 15 + 1e-6
    assert reply.content.metric_records["metrics"]["num-examples"] == 5


def test_an_error_reply_passes_through_and_keeps_the_residual() -> None:
    context = _context()
    glob = _random(0)
    compression_mod(_message(glob, _config("topk:0.1", error_feedback=True)), context, _trainer([_random(1)]))
    before = arrays_to_numpy(context.state.array_records[RESIDUAL_KEY])

    def failing(msg: Message, context: Context) -> Message:
        return Message(Error(code=0, reason="out of memory"), reply_to=msg)

    reply = compression_mod(_message(glob, _config("topk:0.1", 2, True)), context, failing)
    assert reply.has_error() and reply.error.reason == "out of memory"
    after = arrays_to_numpy(context.state.array_records[RESIDUAL_KEY])
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def _dyadic(seed: int) -> dict[str, np.ndarray]:
    # Multiples of 2**-8 below 4 in magnitude: sums of a few dozen are exact in float32.
    rng = np.random.default_rng(seed)
    return {k: (rng.integers(-1024, 1024, size=s) / 256).astype(np.float32) for k, s in SHAPES.items()}


def test_error_feedback_sum_of_sent_plus_residual_is_the_sum_of_updates_exactly() -> None:
    # topk sends the corrected update's kept entries exactly and keeps the rest exactly, so
    # on values where float32 addition is exact the identity holds bit for bit.
    context = _context()
    glob = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    steps = [_dyadic(seed) for seed in range(12)]
    handler = _trainer(steps)
    sent = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    for server_round in range(1, 13):
        msg = _message(glob, _config("topk:0.05", server_round, True))
        reply = compression_mod(msg, context, handler)
        for name, array in reply.content.array_records["arrays"].items():
            sent[name] += decode_array(array, glob[name]) - glob[name]
    residual = arrays_to_numpy(context.state.array_records[RESIDUAL_KEY])
    for name in SHAPES:
        truth = np.sum([s[name] for s in steps], axis=0, dtype=np.float64)
        np.testing.assert_array_equal(sent[name] + residual[name], truth, err_msg=name)
        assert np.abs(residual[name]).max() > 0  # something was held back


@pytest.mark.parametrize("codec", ["qsgd:4", "rotate+qsgd:2"])
def test_error_feedback_identity_for_quantizers_up_to_float32_rounding(codec: str) -> None:
    context = _context()
    glob = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    steps = [_random(seed, scale=0.1) for seed in range(10)]
    handler = _trainer(steps)
    sent = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    for server_round in range(1, 11):
        reply = compression_mod(_message(glob, _config(codec, server_round, True)), context, handler)
        for name, array in reply.content.array_records["arrays"].items():
            sent[name] += decode_array(array, glob[name])
    residual = arrays_to_numpy(context.state.array_records[RESIDUAL_KEY])
    for name in SHAPES:
        truth = np.sum([s[name] for s in steps], axis=0, dtype=np.float64)
        # Two float32 roundings a round (update + residual, then minus the decoded value),
        # each at most half an ulp of a value below 4: 10 * 2 * 2**-22.
        assert np.abs(sent[name] + residual[name] - truth).max() <= 10 * 2 * 2.0**-22


def test_residual_survives_a_client_restart_through_the_state_dir(tmp_path: Path) -> None:
    glob = _random(0)
    first = _context(**{"state-dir": str(tmp_path / "state")})
    compression_mod(_message(glob, _config("topk:0.1", 1, True)), first, _trainer([_random(1)]))
    path = tmp_path / "state" / RESIDUAL_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # derived from private data
    kept = arrays_to_numpy(first.state.array_records[RESIDUAL_KEY])

    # A restarted client: empty Context state, same run, same folder.
    restarted = _context(**{"state-dir": str(tmp_path / "state")})
    loaded = load_residual(restarted, glob)
    for name in SHAPES:
        np.testing.assert_array_equal(loaded[name], kept[name])
        assert np.abs(loaded[name]).max() > 0

    # Another run starts from zeros; so does a model with other tensors.
    other_run = _context(run_id=2, **{"state-dir": str(tmp_path / "state")})
    assert all(not v.any() for v in load_residual(other_run, glob).values())
    other_model = {"conv.weight": np.zeros((2, 2), np.float32)}
    assert list(load_residual(restarted, other_model)) == ["conv.weight"]
    assert not load_residual(restarted, other_model)["conv.weight"].any()


def test_a_corrupt_residual_file_means_zeros_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / RESIDUAL_FILE).write_bytes(b"\x00garbage")
    context = _context(**{"state-dir": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger="fedge.client"):
        residual = load_residual(context, _random(0))
    assert all(not v.any() for v in residual.values())
    assert "ignoring unreadable residual" in caplog.text


def test_fp16_downlink_mod_widens_the_model_for_the_handler() -> None:
    glob = _random(0)
    seen: list[dict[str, np.ndarray]] = []
    message = _message(glob, _config("qsgd:8"), fp16=True)
    assert {a.dtype for a in message.content.array_records["arrays"].values()} == {"float16"}

    def chain(msg: Message, context: Context) -> Message:
        return compression_mod(msg, context, _trainer([_random(1, 0.01)], seen))

    reply = fp16_downlink_mod(message, _context(), chain)
    (received,) = seen
    for name in SHAPES:
        assert received[name].dtype == np.float32
        np.testing.assert_array_equal(received[name], glob[name].astype(np.float16).astype(np.float32))
    assert {a.stype for a in reply.content.array_records["arrays"].values()} == {CODEC_STYPE}


def test_fp16_keeps_out_of_range_tensors_in_fp32() -> None:
    record = numpy_to_arrays({"ok": np.ones(3, np.float32), "huge": np.array([1e6], np.float32)})
    half = to_fp16(record)
    assert (half["ok"].dtype, half["huge"].dtype) == ("float16", "float32")


def test_a_bad_codec_text_raises_for_the_clientapp_to_report() -> None:
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        compression_mod(_message(_random(0), _config("zip")), _context(), _trainer([_random(1)]))


def test_nan_after_training_raises_and_keeps_the_residual() -> None:
    context = _context()
    glob = _random(0)
    nan_step = {k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()}
    with pytest.raises(ValueError, match="NaN or Inf"):
        compression_mod(_message(glob, _config("topk:0.1", 1, True)), context, _trainer([nan_step]))
    assert RESIDUAL_KEY not in context.state.array_records


def test_a_non_finite_residual_is_reset_not_kept(caplog: pytest.LogCaptureFixture) -> None:
    # Kept, a NaN residual would make every later update NaN and lock the client out.
    context = _context()
    glob = _random(0)
    context.state[RESIDUAL_KEY] = numpy_to_arrays(
        {k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()}
    )
    with caplog.at_level(logging.WARNING, logger="fedge.client"):
        reply = compression_mod(_message(glob, _config("topk:0.1", 1, True)), context, _trainer([_random(1)]))
    assert "residual holds NaN or Inf; starting from zeros" in caplog.text
    assert not reply.has_error()
    residual = arrays_to_numpy(context.state.array_records[RESIDUAL_KEY])
    assert all(np.isfinite(v).all() for v in residual.values())
