"""Encode and decode one tensor's update: a versioned header, then the body. No pickle.

Wire layout (all integers little-endian, offsets in bytes)
---------------------------------------------------------
Common header, 13 bytes::

    0..2   magic          b"FGC"
    3      version        uint8, 1
    4      codec id       uint8: 0 none, 1 qsgd, 2 topk, 3 rotate+qsgd
    5..12  n              uint64, number of elements (must equal prod(shape) at decode)

Then per codec:

``none`` (id 0): header 13 bytes; body ``n`` float32 (``4 n`` bytes).
    Total ``13 + 4 n``.

``qsgd`` (id 1)::

    13      num_bits      uint8, 1..8
    14..17  chunk_size    uint32, elements per scale (1024)

    header 18 bytes; body: ``ceil(n / chunk_size)`` float32 scales (max |x| per chunk), then
    the levels packed at ``num_bits`` each (``ceil(n * num_bits / 8)`` bytes, see
    :mod:`fedge.compression.qsgd`). Total ``18 + 4 ceil(n / 1024) + ceil(n b / 8)``.

``topk`` (id 2)::

    13      index_format  uint8: 0 uint16 list, 1 uint32 list, 2 bitmap
    14..21  k             uint64, kept entries

    header 22 bytes; body: indices (``2 k``, ``4 k`` or ``ceil(n / 8)`` bytes, see
    :mod:`fedge.compression.topk`), then ``k`` float32 values in index order.
    Total ``22 + index_bytes + 4 k``.

``rotate+qsgd`` (id 3)::

    13      num_bits       uint8, 1..8
    14..17  chunk_size     uint32 (1024)
    18..25  rotation_seed  uint64 (the decoder rebuilds the signs from it)

    header 26 bytes; body: as ``qsgd`` but over the rotated vector of
    ``m = 2**ceil(log2(n))`` elements (see :mod:`fedge.compression.hadamard`).
    Total ``26 + 4 ceil(m / 1024) + ceil(m b / 8)``; padding costs up to 2x when ``n`` is just
    above a power of two.

Any other version is refused: the format changes only with a new version byte.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import numpy.typing as npt

from fedge.compression import hadamard, qsgd, topk
from fedge.compression.spec import (
    KIND_NONE,
    KIND_QSGD,
    KIND_ROTATE_QSGD,
    KIND_TOPK,
    CodecError,
    CodecSpec,
)

MAGIC = b"FGC"
VERSION = 1
CODEC_IDS = {KIND_NONE: 0, KIND_QSGD: 1, KIND_TOPK: 2, KIND_ROTATE_QSGD: 3}
CODEC_KIND_BY_ID = {v: k for k, v in CODEC_IDS.items()}

_COMMON = struct.Struct("<3sBBQ")  # magic, version, codec id, n
_QSGD = struct.Struct("<BI")  # num_bits, chunk_size
_TOPK = struct.Struct("<BQ")  # index_format, k
_ROTATE = struct.Struct("<BIQ")  # num_bits, chunk_size, rotation_seed
HEADER_BYTES = {
    KIND_NONE: _COMMON.size,
    KIND_QSGD: _COMMON.size + _QSGD.size,
    KIND_TOPK: _COMMON.size + _TOPK.size,
    KIND_ROTATE_QSGD: _COMMON.size + _ROTATE.size,
}
BYTES_PER_FP32 = 4
_MAX_U64 = (1 << 64) - 1

F32 = npt.NDArray[np.float32]


def _qsgd_body_bytes(num_elements: int, num_bits: int, chunk_size: int) -> int:
    return BYTES_PER_FP32 * qsgd.num_chunks(num_elements, chunk_size) + qsgd.packed_bytes(
        num_elements, num_bits
    )


def payload_bytes(spec: CodecSpec, num_elements: int) -> int:
    """Length of ``encode(x, spec, ...)`` for ``x.size == num_elements`` (header + body).

    Parameters
    ----------
    spec : CodecSpec
        The codec.
    num_elements : int
        Elements in the tensor.

    Returns
    -------
    int
        Bytes, from the layout in the module docstring.
    """
    n = num_elements
    if spec.kind == KIND_NONE:
        return HEADER_BYTES[KIND_NONE] + BYTES_PER_FP32 * n
    if spec.kind == KIND_QSGD:
        return HEADER_BYTES[KIND_QSGD] + _qsgd_body_bytes(n, spec.num_bits, qsgd.CHUNK_SIZE)
    if spec.kind == KIND_TOPK:
        k = topk.topk_count(n, spec.keep_fraction)
        fmt = topk.index_format(n, k)
        return HEADER_BYTES[KIND_TOPK] + topk.index_bytes(fmt, n, k) + BYTES_PER_FP32 * k
    m = hadamard.padded_length(n)
    return HEADER_BYTES[KIND_ROTATE_QSGD] + _qsgd_body_bytes(m, spec.num_bits, qsgd.CHUNK_SIZE)


def _as_finite_f32(x: npt.ArrayLike) -> F32:
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    if not np.isfinite(flat).all():
        raise CodecError("update contains NaN or Inf (or overflows float32); fix training or clip it")
    return flat


def encode(x: npt.ArrayLike, spec: CodecSpec, rng: np.random.Generator, *, rotation_seed: int = 0) -> bytes:
    """Compress one tensor's float32 update into a self-describing payload.

    Parameters
    ----------
    x : array_like of float
        The update, any shape; read as float32 and never modified.
    spec : CodecSpec
        The codec.
    rng : numpy.random.Generator
        Randomness of stochastic rounding (``qsgd``, ``rotate+qsgd``); unused otherwise.
    rotation_seed : int, default 0
        Seed of the rotation's signs for ``rotate+qsgd``, 0..2**64-1; written in the header.
        Use a fresh seed per round (shared or not: the decoder reads it from the payload).

    Returns
    -------
    bytes
        Header and body as documented in this module; ``len`` equals :func:`payload_bytes`.

    Raises
    ------
    CodecError
        When ``x`` holds NaN or Inf, or ``rotation_seed`` is out of range.
    """
    flat = _as_finite_f32(x)
    n = flat.size
    codec_id = CODEC_IDS[spec.kind]
    common = _COMMON.pack(MAGIC, VERSION, codec_id, n)
    if spec.kind == KIND_NONE:
        return common + flat.astype("<f4").tobytes()
    if spec.kind == KIND_QSGD:
        scales, levels = qsgd.quantize(flat, spec.num_bits, rng)
        return b"".join(
            [
                common,
                _QSGD.pack(spec.num_bits, qsgd.CHUNK_SIZE),
                scales.astype("<f4").tobytes(),
                qsgd.pack_levels(levels, spec.num_bits),
            ]
        )
    if spec.kind == KIND_TOPK:
        k = topk.topk_count(n, spec.keep_fraction)
        fmt = topk.index_format(n, k)
        indices = topk.select(flat, k)
        return b"".join(
            [
                common,
                _TOPK.pack(fmt, k),
                topk.pack_indices(indices, n, fmt),
                flat[indices].astype("<f4").tobytes(),
            ]
        )
    if not 0 <= rotation_seed <= _MAX_U64:
        raise CodecError(f"rotation_seed must be in 0..2**64-1, got {rotation_seed}")
    rotated = hadamard.rotate(flat, rotation_seed)
    if not np.isfinite(rotated).all():
        raise CodecError("rotated update overflows float32; clip the update before encoding")
    scales, levels = qsgd.quantize(rotated, spec.num_bits, rng)
    return b"".join(
        [
            common,
            _ROTATE.pack(spec.num_bits, qsgd.CHUNK_SIZE, rotation_seed),
            scales.astype("<f4").tobytes(),
            qsgd.pack_levels(levels, spec.num_bits),
        ]
    )


def _check_length(payload: bytes, expected: int, kind: str) -> None:
    if len(payload) < expected:
        raise CodecError(
            f"{kind} payload is {len(payload)} bytes, expected {expected}; it was truncated in transit"
        )
    if len(payload) > expected:
        raise CodecError(
            f"{kind} payload is {len(payload)} bytes, expected {expected}; "
            f"{len(payload) - expected} extra bytes follow the body"
        )


def _decode_qsgd_body(payload: bytes, start: int, m: int, num_bits: int, chunk_size: int) -> F32:
    rows = qsgd.num_chunks(m, chunk_size)
    scales = np.frombuffer(payload, dtype="<f4", count=rows, offset=start).astype(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError("qsgd scales must be finite and >= 0; payload is corrupt")
    packed = payload[start + BYTES_PER_FP32 * rows :]
    levels = qsgd.unpack_levels(packed, m, num_bits)
    return qsgd.dequantize(scales, levels, num_bits, chunk_size)


def _check_bits_and_chunk(num_bits: int, chunk_size: int) -> None:
    if not 1 <= num_bits <= 8:
        raise CodecError(f"header num_bits {num_bits} is outside 1..8; payload is corrupt")
    if chunk_size < 1:
        raise CodecError("header chunk_size is 0; payload is corrupt")


def decode(payload: bytes, shape: tuple[int, ...]) -> F32:
    """Decompress a payload from :func:`encode`; the header says which codec.

    Parameters
    ----------
    payload : bytes
        Header and body.
    shape : tuple of int
        The tensor's shape; ``prod(shape)`` must equal the header's element count.

    Returns
    -------
    ndarray of float32
        A new array of ``shape``.

    Raises
    ------
    CodecError
        On a wrong magic, an unknown version or codec id, an element count that does not
        match ``shape``, a truncated body or extra bytes, or corrupt fields.
    """
    payload = bytes(payload)
    if len(payload) < _COMMON.size:
        raise CodecError(
            f"payload is {len(payload)} bytes, shorter than the {_COMMON.size}-byte codec header; "
            "it was truncated in transit"
        )
    magic, version, codec_id, n = _COMMON.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"payload starts with {magic!r}, not {MAGIC!r}; it is not a fedge codec payload")
    if version != VERSION:
        if version > VERSION:
            raise CodecError(
                f"header version {version} is newer than this fedge understands ({VERSION}); upgrade fedge"
            )
        raise CodecError(f"header version {version} is not a fedge codec version (expected {VERSION})")
    if codec_id not in CODEC_KIND_BY_ID:
        known = ", ".join(f"{i} {k}" for i, k in CODEC_KIND_BY_ID.items())
        raise CodecError(f"unknown codec id {codec_id} in header (known: {known}); upgrade fedge")
    kind = CODEC_KIND_BY_ID[codec_id]
    if any(int(d) < 0 for d in shape):
        raise CodecError(f"shape {shape} has a negative dimension")
    expected_n = math.prod(int(d) for d in shape)
    if n != expected_n:
        raise CodecError(
            f"payload holds {n} elements but shape {tuple(shape)} has {expected_n}; "
            "decode with the shape the tensor was encoded from"
        )
    header = HEADER_BYTES[kind]
    if len(payload) < header:
        _check_length(payload, header, kind)
    if kind == KIND_NONE:
        _check_length(payload, header + BYTES_PER_FP32 * n, kind)
        out = np.frombuffer(payload, dtype="<f4", offset=header).astype(np.float32)
    elif kind == KIND_QSGD:
        num_bits, chunk_size = _QSGD.unpack_from(payload, _COMMON.size)
        _check_bits_and_chunk(num_bits, chunk_size)
        _check_length(payload, header + _qsgd_body_bytes(n, num_bits, chunk_size), kind)
        out = _decode_qsgd_body(payload, header, n, num_bits, chunk_size)
    elif kind == KIND_TOPK:
        fmt, k = _TOPK.unpack_from(payload, _COMMON.size)
        if fmt not in topk.INDEX_FORMATS:
            raise CodecError(f"unknown topk index format {fmt} in header; payload is corrupt")
        if k > n:
            raise CodecError(f"topk header says k={k} of only {n} elements; payload is corrupt")
        if fmt == topk.INDEX_U16 and n > topk.U16_MAX_ELEMENTS:
            raise CodecError(f"uint16 topk indices cannot address {n} elements; payload is corrupt")
        idx_bytes = topk.index_bytes(fmt, n, k)
        _check_length(payload, header + idx_bytes + BYTES_PER_FP32 * k, kind)
        indices = topk.unpack_indices(payload[header : header + idx_bytes], n, k, fmt)
        values = np.frombuffer(payload, dtype="<f4", count=k, offset=header + idx_bytes)
        out = np.zeros(n, dtype=np.float32)
        out[indices] = values
    else:
        num_bits, chunk_size, seed = _ROTATE.unpack_from(payload, _COMMON.size)
        _check_bits_and_chunk(num_bits, chunk_size)
        m = hadamard.padded_length(n)
        _check_length(payload, header + _qsgd_body_bytes(m, num_bits, chunk_size), kind)
        rotated = _decode_qsgd_body(payload, header, m, num_bits, chunk_size)
        out = hadamard.unrotate(rotated, n, seed)
    return out.reshape(tuple(int(d) for d in shape))


def with_error_feedback(
    update: npt.ArrayLike,
    residual: npt.ArrayLike,
    spec: CodecSpec,
    rng: np.random.Generator,
    rotation_seed: int = 0,
) -> tuple[bytes, F32]:
    """Encode ``update + residual`` and return what the codec lost as the next residual.

    ``new_residual = (update + residual) - decode(payload)`` (Seide et al., "1-bit SGD", 2014;
    Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019). Summed over rounds,
    ``sum(decoded) + final_residual == sum(updates)`` up to float32 rounding.

    The residual stays bounded only for a contractive codec, ``||C(v) - v|| < ||v||``:
    ``topk`` always is; unbiased ``qsgd`` at 1 bit (error up to one step of ``2 m``) is not,
    and its residual can grow round after round. Use ``topk`` or more bits with feedback.

    Parameters
    ----------
    update : array_like of float
        This round's update; not modified.
    residual : array_like of float
        The previous residual, same shape (zeros in the first round); not modified.
    spec, rng, rotation_seed
        As for :func:`encode`.

    Returns
    -------
    payload : bytes
        ``encode(update + residual, spec, rng, rotation_seed=rotation_seed)``.
    new_residual : ndarray of float32
        Same shape as ``update``.

    Raises
    ------
    CodecError
        When the shapes differ, or as :func:`encode`.
    """
    u = np.asarray(update, dtype=np.float32)
    r = np.asarray(residual, dtype=np.float32)
    if u.shape != r.shape:
        raise CodecError(f"residual shape {r.shape} differs from update shape {u.shape}; reset the residual")
    corrected = u + r
    payload = encode(corrected, spec, rng, rotation_seed=rotation_seed)
    return payload, corrected - decode(payload, corrected.shape)
