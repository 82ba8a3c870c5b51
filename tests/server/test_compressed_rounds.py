"""Compressed updates through the round loop: closed-form means, bad payloads, counted bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from fedge.compression import parse_codec, payload_bytes
from fedge.config import RunConfig
from fedge.records import numpy_to_arrays
from fedge.server.loop import RoundLoop
from fedge.server.transport import Exchange, PlainTransport, RoundContext
from fedge.simulation.grid import InProcessGrid
from fedge.strategies import build_strategy
from fedge.training import EvalResult
from fedge.update_records import CODEC_STYPE

SHAPES = {"w": (4,), "b": (2, 2), "big": (3000,)}  # "big" spans three qsgd chunks


def _mean_eval(arrays: ArrayRecord) -> EvalResult:
    return EvalResult(num_examples=1, loss=0.0, accuracy=float(arrays["w"].numpy().mean()))


class RecordingTransport(PlainTransport):
    """Plain transport that keeps what crossed the wire."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def exchange(self, grid: Grid, messages: list[Message], round_ctx: RoundContext) -> Exchange:
        exchange = super().exchange(grid, messages, round_ctx)
        self.sent.extend(messages)
        self.received.extend(exchange.replies)
        return exchange


def _loop(tmp_path: Path, transport: RecordingTransport | None = None, **overrides: object) -> RoundLoop:
    cfg = RunConfig.from_mapping({"num-clients": 3, "clients-per-round": 3, "num-rounds": 1, **overrides})
    initial = numpy_to_arrays({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    return RoundLoop(cfg, build_strategy(cfg), initial, _mean_eval, tmp_path, transport=transport)


def _serialized_len(message: Message) -> int:
    return len(recorddict_to_proto(message.content).SerializeToString())


@pytest.mark.parametrize("codec", ["qsgd:8", "qsgd:2", "qsgd:1", "topk:1"])
def test_compressed_round_is_the_example_weighted_mean(tmp_path: Path, codec: str) -> None:
    # Each client's update is a constant tensor: qsgd puts every element on the top or
    # bottom level (exact), and topk:1 keeps everything, so the mean is exact.
    transport = RecordingTransport()
    loop = _loop(tmp_path, transport, compression=codec, **{"num-rounds": 2})
    with InProcessGrid("fakeapps:compressing_app", 3, {}, workers=1) as grid:
        history = loop.run(grid)
    expected = (1 * 3 + 2 * 2 + 3 * 1) / 6  # values 1,2,3 weighted by 3,2,1 examples, both rounds
    for name, shape in SHAPES.items():
        np.testing.assert_allclose(loop.arrays[name].numpy(), np.full(shape, expected), rtol=1e-6)
    assert [(r.clients, r.dropped) for r in history] == [(3, 0), (3, 0)]
    for reply in transport.received:
        arrays = reply.content.array_records["arrays"]
        assert {a.stype for a in arrays.values()} == {CODEC_STYPE}


def test_bytes_up_and_down_are_the_serialized_lengths(tmp_path: Path) -> None:
    transport = RecordingTransport()
    loop = _loop(tmp_path, transport, compression="qsgd:2")
    with InProcessGrid("fakeapps:compressing_app", 3, {}, workers=1) as grid:
        (record,) = loop.run(grid)
    assert record.bytes_up == sum(_serialized_len(r) for r in transport.received)
    assert record.bytes_down == sum(_serialized_len(m) for m in transport.sent)
    spec = parse_codec("qsgd:2")
    for reply in transport.received:
        arrays = reply.content.array_records["arrays"]
        # Each payload is the layout's closed form: 18-byte header, a scale per 1024, 2 bits each.
        for name, shape in SHAPES.items():
            n = int(np.prod(shape))
            assert len(arrays[name].data) == payload_bytes(spec, n) == 18 + 4 * -(-n // 1024) + -(-n * 2 // 8)
    # fp32 weights would be 4 bytes each; the 2-bit update with its framing is far below.
    num_params = sum(int(np.prod(s)) for s in SHAPES.values())
    assert record.bytes_up / 3 < 0.2 * 4 * num_params


def test_fp16_downlink_halves_bytes_down_and_the_server_model_stays_fp32(tmp_path: Path) -> None:
    records = {}
    for downlink in ("fp32", "fp16"):
        transport = RecordingTransport()
        loop = _loop(tmp_path / downlink, transport, compression="qsgd:8", downlink=downlink)
        with InProcessGrid("fakeapps:compressing_app", 3, {}, workers=1) as grid:
            (records[downlink],) = loop.run(grid)
        assert {a.dtype for a in loop.arrays.values()} == {"float32"}
        sent = {a.dtype for m in transport.sent for a in m.content.array_records["arrays"].values()}
        assert sent == {"float16" if downlink == "fp16" else "float32"}
        np.testing.assert_allclose(loop.arrays["w"].numpy(), np.full(4, 10 / 6), rtol=1e-6)
    # 2 bytes instead of 4 per weight to each of 3 clients; the framing (npy headers are
    # padded to 64 bytes, length varints take 2 bytes either way) is the same.
    num_params = sum(int(np.prod(s)) for s in SHAPES.values())
    assert records["fp32"].bytes_down - records["fp16"].bytes_down == 3 * 2 * num_params


def test_fp16_downlink_without_compression_asks_for_exact_updates(tmp_path: Path) -> None:
    # Plain weights trained from the fp16 copy would pull the fp32 server model onto the
    # fp16 grid; the clients send their float32 update ("none" codec) instead.
    transport = RecordingTransport()
    loop = _loop(tmp_path, transport, downlink="fp16")
    loop.arrays = numpy_to_arrays({k: np.full(s, 1e-4, np.float32) for k, s in SHAPES.items()})
    with InProcessGrid("fakeapps:compressing_app", 3, {}, workers=1) as grid:
        loop.run(grid)
    for reply in transport.received:
        for array in reply.content.array_records["arrays"].values():
            assert array.stype == CODEC_STYPE and array.data[4] == 0  # codec id 0: none
    # A client's weights are VALUE; it sends VALUE - fp16(global), which the server adds to
    # its fp32 global: the weighted mean of the values plus the global's fp16 rounding
    # error (plain weights would have given the mean alone: the fp16 grid's value).
    start = np.float32(1e-4)
    rounding = float(start) - float(np.float16(start))
    assert rounding != 0.0
    expected = 10 / 6 + rounding
    np.testing.assert_allclose(loop.arrays["w"].numpy()[0], expected, rtol=1e-6)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_payloads_are_dropped_and_the_round_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    loop = _loop(
        tmp_path,
        compression="qsgd:8",
        **{"num-clients": 10, "clients-per-round": 10, "min-reply-fraction": 0.2},
    )
    with InProcessGrid("fakeapps:bad_payload_app", 10, {}, workers=workers) as grid:
        (record,) = loop.run(grid)
    # Only partitions 0 and 1 are valid: values 1 and 2 weighted by 3 and 2 examples.
    np.testing.assert_allclose(loop.arrays["w"].numpy(), np.full(4, (1 * 3 + 2 * 2) / 5), rtol=1e-6)
    assert (record.clients, record.dropped, record.sampled, record.aggregated) == (2, 8, 10, True)
    text = caplog.text
    assert "truncated in transit" in text
    assert "extra bytes follow the body" in text
    assert "header version 2 is newer than this fedge understands" in text
    assert "unknown codec id 9" in text
    assert "holds NaN or Inf" in text
    assert "quantizer scales must be finite" in text
    assert "payload holds 3 elements but shape" in text
    assert "compressed tensor declares float16" in text
    assert text.count("bad compressed update for") >= 7


def test_a_bad_codec_in_the_round_config_is_a_client_error_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loop = _loop(tmp_path, compression="qsgd:8")
    loop._round_config = lambda server_round: ConfigRecord({"codec": "zip", "seed": 1})  # type: ignore[method-assign]
    with InProcessGrid("fakeapps:compressing_app", 3, {}, workers=1) as grid:
        (record,) = loop.run(grid)
    assert (record.clients, record.dropped, record.aggregated) == (0, 3, False)
    assert "unknown codec 'zip'" in caplog.text
