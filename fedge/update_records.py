"""Compressed model updates and fp16 models inside Flower records (no pickle).

A compressed update travels in the reply's ``ArrayRecord`` under the model's own tensor
names, one :class:`flwr.app.Array` per tensor, whose fields say what it is::

    Array(dtype="float32", shape=<the tensor's shape>, stype=CODEC_STYPE, data=<codec payload>)

``data`` is the payload of :func:`fedge.compression.encode` (its versioned header names the
codec, so the server needs no side channel to decode it) applied to the tensor's *update*
``local - global``, where ``global`` is the model as the client received it. The server adds
the decoded update to the global model it sent (kept in fp32 on the server, so an fp16
downlink's rounding never accumulates in the global model) and hands strategies the
reconstructed local weights, so every Flower strategy aggregates compressed updates as it
would plain ones. Tensors that are not float32 travel as plain numpy Arrays.

An fp16 downlink is plain Flower: the global model's float32 tensors become float16 numpy
Arrays (a tensor with a value beyond float16's range stays float32), and the client widens
them back to float32 before it trains.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fedge.compression import CodecError, decode
from fedge.rng import Stream, stream_seed

# Array.stype of a tensor whose bytes are a fedge codec payload (fedge.compression.codec).
CODEC_STYPE = "fedge.codec"
_F16_MAX = float(np.finfo(np.float16).max)
_U64 = 1 << 64


def round_rotation_seed(seed: int, server_round: int) -> int:
    """The rotation seed the server sends with a round: 63 bits (a ConfigRecord int is int64).

    Drawn from the named stream :data:`fedge.rng.Stream.ROTATION` for the round.
    """
    return stream_seed(seed, Stream.ROTATION, server_round, bits=63)


def tensor_rotation_seed(rotation_seed: int, tensor_index: int) -> int:
    """Seed of the rotation of the ``tensor_index``-th tensor in a round.

    Every client uses the same seed for the same tensor in a round (the round's
    ``rotation_seed`` comes from the server), so rotated updates stay summable under secure
    aggregation. ``PCG64`` seeds through SeedSequence, which hashes the seed, so consecutive
    seeds give independent sign patterns.
    """
    return (int(rotation_seed) + int(tensor_index)) % _U64


def is_float32(values: np.ndarray) -> bool:
    """Whether a tensor is compressed (float32) or sent as it is (anything else)."""
    return values.dtype == np.float32


def decode_array(array: Array, reference: np.ndarray) -> np.ndarray:
    """A reply's tensor as weights: ``reference + decode(payload)`` for a codec payload.

    Parameters
    ----------
    array : flwr.app.Array
        A codec payload (``stype == CODEC_STYPE``) or a plain numpy Array.
    reference : ndarray
        The global tensor the server sent (float32 on the server).

    Returns
    -------
    ndarray
        The client's weights; for a plain Array, exactly what it decodes to (the caller
        checks its shape and dtype).

    Raises
    ------
    CodecError
        When a payload's declared dtype or shape differ from ``reference``, or the payload
        is malformed, truncated, of an unknown version or codec (see
        :func:`fedge.compression.decode`).
    """
    if array.stype != CODEC_STYPE:
        return array.numpy()
    return reference + decode_update(array, reference)


def decode_update(array: Array, reference: np.ndarray) -> np.ndarray:
    """The float32 update ``local - global`` that a codec payload carries.

    Raises
    ------
    CodecError
        As :func:`decode_array`, and when ``array`` is not a codec payload.
    """
    if array.stype != CODEC_STYPE:
        raise CodecError(f"expected a {CODEC_STYPE!r} payload, got stype {array.stype!r}")
    shape = tuple(int(d) for d in array.shape)
    if array.dtype != "float32" or shape != reference.shape or reference.dtype != np.float32:
        raise CodecError(
            f"compressed tensor declares {array.dtype}{list(shape)}, expected "
            f"{reference.dtype}{list(reference.shape)}"
        )
    return decode(array.data, reference.shape)


def has_codec_payloads(arrays: ArrayRecord) -> bool:
    """Whether any tensor of ``arrays`` is a codec payload."""
    return any(a.stype == CODEC_STYPE for a in arrays.values())


def to_fp16(arrays: ArrayRecord) -> ArrayRecord:
    """The downlink form of a model: float32 tensors as float16, the rest unchanged.

    A tensor with a finite value beyond float16's range (65504) stays float32, so the
    downlink never turns a weight into Inf.
    """
    out: dict[str, Array] = {}
    for name, array in arrays.items():
        if array.stype == "numpy.ndarray" and array.dtype == "float32":
            values = array.numpy()
            if values.size == 0 or float(np.abs(values).max()) <= _F16_MAX:
                out[name] = Array(values.astype(np.float16))
                continue
        out[name] = array
    return ArrayRecord(out)


def to_fp32(arrays: ArrayRecord) -> ArrayRecord:
    """Widen float16 tensors (an fp16 downlink) back to float32; others unchanged."""
    out: dict[str, Array] = {}
    for name, array in arrays.items():
        if array.stype == "numpy.ndarray" and array.dtype == "float16":
            out[name] = Array(array.numpy().astype(np.float32))
        else:
            out[name] = array
    return ArrayRecord(out)


def has_fp16(arrays: ArrayRecord) -> bool:
    """Whether any tensor of ``arrays`` is float16 (an fp16 downlink)."""
    return any(a.stype == "numpy.ndarray" and a.dtype == "float16" for a in arrays.values())


__all__ = [
    "CODEC_STYPE",
    "decode_array",
    "decode_update",
    "has_codec_payloads",
    "has_fp16",
    "round_rotation_seed",
    "tensor_rotation_seed",
    "to_fp16",
    "to_fp32",
]
