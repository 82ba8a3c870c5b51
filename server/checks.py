"""Checks of what clients send back: training updates and evaluation results.

Everything in a reply is controlled by the client, so everything is bounded and
type-checked before use. A reply that fails a check is dropped from its round with a
logged reason and the round goes on. Expected failures (bytes that do not decode, wrong
shapes, NaN, absurd counts) are reasons; an exception of another kind is a bug in fedge,
logged with its traceback as one, and that client is dropped too (:data:`INTERNAL_ERROR`);
only the calls that read a client's bytes are guarded as "bad input".
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedge.compression import CodecError
from fedge.records import (
    EVAL_ACCURACY,
    EVAL_LOSS,
    METRICS_KEY,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    numpy_to_arrays,
    with_content,
)
from fedge.strategies import ReplySchema
from fedge.update_records import CODEC_STYPE, decode_update

log = logging.getLogger("fedge.server")

# Reason prefix of a reply dropped because checking it raised an unexpected exception.
INTERNAL_ERROR = "internal error while checking the reply (a bug in fedge"
# What untrusted bytes can raise while being decoded: a reason, not a bug.
_BAD_INPUT = (CodecError, ValueError, TypeError, KeyError, IndexError, OverflowError, EOFError, struct.error)

# record key -> tensor name -> values.
References = Mapping[str, Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class CheckedUpdate:
    """A training reply that passed the checks.

    Parameters
    ----------
    node_id : int
        The sender.
    num_examples : int
        Its weight, in ``[1, max-examples-per-client]``.
    updates : dict
        ``record -> tensor -> local - global`` in float64 (exact for float32 inputs).
    message : Message
        A clean copy for per-client strategies: the decoded weights of every declared
        record, ``num-examples`` and the declared metrics, nothing else.
    train_loss : float or None
        The reported training loss, when finite.
    """

    node_id: int
    num_examples: int
    updates: dict[str, dict[str, np.ndarray]]
    message: Message
    train_loss: float | None


def _count(value: object, key: str, max_value: int) -> tuple[int | None, str | None]:
    """A whole, positive, bounded count from a reply's metrics."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not value > 0
        or float(value) != math.floor(value)
    ):
        return None, f"{key} must be a positive whole number, got {value!r}"
    if value > max_value:
        return None, (
            f"{key} = {value!r} exceeds max-examples-per-client ({max_value}); "
            "raise that key if clients really hold more data"
        )
    return int(value), None


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _check_record(
    key: str, arrays: ArrayRecord, reference: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | str:
    """Decode one ArrayRecord against the record the server sent: (weights, updates) or why not."""
    if set(arrays.keys()) != set(reference):
        missing = sorted(set(reference) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference))
        return (
            f"array names of {key!r} differ from what the server sent (missing {missing}, unexpected {extra})"
        )
    weights: dict[str, np.ndarray] = {}
    updates: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        array = arrays[name]
        try:
            if array.stype == CODEC_STYPE:
                update32 = decode_update(array, ref)
                values = ref + update32
                update = update32.astype(np.float64)
            else:
                values = array.numpy()
                update = None
        except CodecError as err:
            return f"bad compressed update for {name!r}: {err}"
        except _BAD_INPUT as err:  # bytes numpy cannot read, a bogus dtype or shape: the client's
            return f"unreadable update for {name!r} ({type(err).__name__}: {err})"
        # The declared shape/dtype and the bytes can disagree: check what decodes.
        if values.shape != ref.shape or values.dtype != ref.dtype:
            return (
                f"array {name!r} is {values.dtype}{list(values.shape)}, expected {ref.dtype}{list(ref.shape)}"
            )
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"array {name!r} holds NaN or Inf"
        if update is None:
            update = values.astype(np.float64) - ref.astype(np.float64)
        if not np.isfinite(update).all():
            return f"array {name!r} holds an update beyond float range"
        weights[name] = values
        updates[name] = update
    return weights, updates


def check_update(
    reply: Message,
    references: References,
    schema: ReplySchema,
    max_examples: int,
) -> tuple[CheckedUpdate | None, str | None]:
    """Check a training reply against what the server sent; return it checked, or why not.

    A tensor arrives as plain weights or as a compressed update against the record the
    server sent (:mod:`fedge.update_records`), which is decoded here. A reply is rejected
    for: an error instead of content; ArrayRecords other than ``schema.array_records``;
    arrays that do not decode (malformed, truncated or over-long codec payloads, unknown
    codec versions or ids) or whose names, decoded shapes or dtypes differ from what was
    sent; NaN or Inf; not exactly one MetricRecord; a ``num-examples`` that is not a whole
    number in ``[1, max_examples]``; a declared metric that is missing or not finite.

    Parameters
    ----------
    reply : Message
        A client's reply to a training message.
    references : Mapping
        The records this round sent to that client (the fp32 originals, before any fp16
        downlink), by record key and tensor name.
    schema : ReplySchema
        What the strategy declares a reply carries.
    max_examples : int
        ``max-examples-per-client``: the largest weight a client may claim.

    Returns
    -------
    tuple
        ``(CheckedUpdate, None)`` or ``(None, reason)``.
    """
    if reply.has_error():
        return None, f"client error: {reply.error.reason}"
    try:
        return _check_update(reply, references, schema, max_examples)
    except Exception as err:  # the client's bytes are read under their own handler: this is fedge's
        log.exception("bug: checking the reply of node %d raised", reply.metadata.src_node_id)
        return None, f"{INTERNAL_ERROR}: {type(err).__name__}: {err})"


def _check_update(
    reply: Message, references: References, schema: ReplySchema, max_examples: int
) -> tuple[CheckedUpdate | None, str | None]:
    content = reply.content
    got = sorted(content.array_records.keys())
    if got != sorted(schema.array_records):
        return None, f"expected ArrayRecords {sorted(schema.array_records)}, got {got}"
    weights: dict[str, dict[str, np.ndarray]] = {}
    updates: dict[str, dict[str, np.ndarray]] = {}
    for key in schema.array_records:
        if key not in references:
            return None, f"the server sent no {key!r} record to decode the reply's against"
        checked = _check_record(key, content.array_records[key], references[key])
        if isinstance(checked, str):
            return None, checked
        weights[key], updates[key] = checked
    if len(content.metric_records) != 1:
        return None, f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    num_examples, reason = _count(metrics.get(NUM_EXAMPLES), NUM_EXAMPLES, max_examples)
    if num_examples is None:
        return None, reason
    clean_metrics: dict[str, int | float | list[int] | list[float]] = {NUM_EXAMPLES: num_examples}
    for key in schema.metrics:
        value = _finite(metrics.get(key))
        if value is None:
            return None, f"metric {key!r} must be a finite number, got {metrics.get(key)!r}"
        clean_metrics[key] = value
    clean = RecordDict(
        {
            **{key: numpy_to_arrays(tensors) for key, tensors in weights.items()},
            METRICS_KEY: MetricRecord(clean_metrics),
        }
    )
    result = CheckedUpdate(
        node_id=int(reply.metadata.src_node_id),
        num_examples=num_examples,
        updates=updates,
        message=with_content(reply, clean),
        train_loss=_finite(metrics.get(TRAIN_LOSS)),
    )
    return result, None


@dataclass(frozen=True)
class CheckedEvaluation:
    """An evaluation reply that passed the checks."""

    node_id: int
    num_examples: int
    accuracy: float
    loss: float | None


def check_evaluation(reply: Message, max_examples: int) -> tuple[CheckedEvaluation | None, str | None]:
    """Check a federated-evaluation reply: a bounded whole ``num-examples``, accuracy in [0, 1].

    A loss, when sent, must be finite and >= 0.
    """
    if reply.has_error():
        return None, f"client error: {reply.error.reason}"
    try:
        if len(reply.content.metric_records) != 1:
            return None, f"expected one MetricRecord, got {len(reply.content.metric_records)}"
        metrics = next(iter(reply.content.metric_records.values()))
        num_examples, reason = _count(metrics.get(NUM_EXAMPLES), NUM_EXAMPLES, max_examples)
        if num_examples is None:
            return None, reason
        accuracy = _finite(metrics.get(EVAL_ACCURACY))
        if accuracy is None or not 0.0 <= accuracy <= 1.0:
            return None, f"{EVAL_ACCURACY} must be a number in [0, 1], got {metrics.get(EVAL_ACCURACY)!r}"
        loss = None
        if EVAL_LOSS in metrics:
            loss = _finite(metrics.get(EVAL_LOSS))
            if loss is None or loss < 0:
                return None, f"{EVAL_LOSS} must be a finite number >= 0, got {metrics.get(EVAL_LOSS)!r}"
    except _BAD_INPUT as err:
        return None, f"unreadable evaluation ({type(err).__name__}: {err})"
    return CheckedEvaluation(int(reply.metadata.src_node_id), num_examples, accuracy, loss), None


__all__ = [
    "INTERNAL_ERROR",
    "CheckedEvaluation",
    "CheckedUpdate",
    "check_evaluation",
    "check_update",
]
