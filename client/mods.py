"""fedge's client mods (Flower ``Mod``: ``(Message, Context, call_next) -> Message``).

* :func:`fp16_downlink_mod` widens a model the server sent as float16 back to float32
  before any handler sees it.
* :func:`compression_mod` turns a training reply's weights into a compressed update
  (``local - global``, :mod:`fedge.update_records`), with error feedback when the round
  asks for it.

Both read what to do from the message itself (its arrays' dtypes, the round's
``ConfigRecord``), so the server decides and a message without those keys passes through
unchanged: the mods are always installed.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedge.client.state import load_residual, save_residual
from fedge.compression import CodecError, parse_codec
from fedge.records import (
    ARRAYS_KEY,
    CODEC,
    CONFIG_KEY,
    ERROR_FEEDBACK,
    ROTATION_SEED,
    SEED,
    SERVER_ROUND,
    arrays_to_numpy,
    with_content,
)
from fedge.update_records import encode_update, has_codec_payloads, has_fp16, to_fp32

# Separates the stream of stochastic-rounding draws from the client's other seeded streams.
_CODEC_STREAM = 0xC0DEC


def fp16_downlink_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Widen float16 model tensors (an fp16 downlink) to float32, then call the handler."""
    if not msg.has_content() or ARRAYS_KEY not in msg.content.array_records:
        return call_next(msg, context)
    arrays = msg.content.array_records[ARRAYS_KEY]
    if not has_fp16(arrays):
        return call_next(msg, context)
    content = RecordDict({**dict(msg.content), ARRAYS_KEY: to_fp32(arrays)})
    # Same metadata as the received message, so the handler's reply points back to it.
    return call_next(with_content(msg, content), context)


def codec_seed(seed: int, server_round: int, client_key: int) -> np.random.SeedSequence:
    """Seed of a client's stochastic rounding in a round: distinct per (seed, round, client)."""
    return np.random.SeedSequence([seed, server_round, client_key, _CODEC_STREAM])


def _client_key(context: Context) -> int:
    # The partition id where there is one (stable across engines and restarts), else the
    # node id (which Flower's Ray engine and SuperLinks draw at random).
    pid = context.node_config.get("partition-id")
    if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0:
        return pid
    if isinstance(pid, str) and pid.isdigit():
        return int(pid)
    return int(context.node_id)


def _int(record: ConfigRecord, key: str, default: int) -> int:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"round config {key!r} must be a whole number, got {value!r}")
    return value


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Reply to a training message with the compressed update instead of the weights.

    Acts when the message's ``ConfigRecord`` names a ``codec``; with ``error-feedback``
    true, the residual in the client's state (:mod:`fedge.client.state`) is added to the
    update before encoding and replaced by what the codec dropped. A reply that is an error
    passes through, and the residual is then unchanged; so does a reply whose handler
    already encoded its update.

    Raises
    ------
    ValueError
        On a bad codec text or round config (the ClientApp turns it into an error reply,
        which the server logs and drops).
    """
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or not msg.has_content():
        return call_next(msg, context)
    round_cfg = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    codec_text = round_cfg.get(CODEC)
    if codec_text is None:
        return call_next(msg, context)
    if not isinstance(codec_text, str):
        raise CodecError(f"round config {CODEC!r} must be a codec text such as 'qsgd:4', got {codec_text!r}")
    spec = parse_codec(codec_text)
    error_feedback = round_cfg.get(ERROR_FEEDBACK, False)
    if not isinstance(error_feedback, bool):
        raise ValueError(f"round config {ERROR_FEEDBACK!r} must be true or false, got {error_feedback!r}")
    rotation_seed = _int(round_cfg, ROTATION_SEED, 0)
    seed = _int(round_cfg, SEED, 0)
    server_round = _int(round_cfg, SERVER_ROUND, 0)
    # What the client started from, as the handler saw it (widened by fp16_downlink_mod).
    reference = arrays_to_numpy(to_fp32(msg.content.array_records[ARRAYS_KEY]))

    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS_KEY not in reply.content.array_records:
        return reply
    if has_codec_payloads(reply.content.array_records[ARRAYS_KEY]):
        return reply  # the handler encoded its update itself
    local = arrays_to_numpy(reply.content.array_records[ARRAYS_KEY])
    rng = np.random.default_rng(codec_seed(seed, server_round, _client_key(context)))
    residual = load_residual(context, reference) if error_feedback else None
    arrays, new_residual = encode_update(
        local, reference, spec, rng, rotation_seed=rotation_seed, residual=residual
    )
    if new_residual is not None:
        save_residual(context, new_residual)
    return Message(RecordDict({**dict(reply.content), ARRAYS_KEY: arrays}), reply_to=msg)


__all__ = ["codec_seed", "compression_mod", "fp16_downlink_mod"]
