"""Encode and decode one tensor's update: a versioned header, then the body. No pickle.

Wire layout (all integers little-endian, offsets in bytes)
---------------------------------------------------------
Common header, 13 bytes::

    0..2   magic          b"FGC"
    3      version        uint8, 1
    4      codec id       uint8: 0 none, 1 qsgd, 2 topk, 3 rotate+qsgd, 4 ternary,
                          5 rotate+ternary, 6 stc
    5..12  n              uint64, number of elements (must equal prod(shape) at decode)

Then per codec:

``none`` (id 0): header 13 bytes; body ``n`` float32 (``4 n`` bytes).
    Total ``13 + 4 n``.

``qsgd`` (id 1)::

    13      num_bits      uint8, 1..8
    14..17  chunk_size    uint32, elements per scale (1024; version 1 refuses any other)

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
    18..21  block_size     uint32, rotation block (1024; version 1 refuses any other)
    22..29  rotation_seed  uint64 (the decoder rebuilds the signs from it, see
                           :func:`fedge.compression.hadamard.rotation_signs`)

    header 30 bytes; body: as ``qsgd`` but over the rotated vector of
    ``m = rotated_length(n)`` elements (whole blocks, and the tail block padded to a power
    of two, see :mod:`fedge.compression.hadamard`). Total ``30 + 4 ceil(m / 1024) + ceil(m b / 8)``.

``ternary`` (id 4)::

    13..16  chunk_size    uint32 (1024)

    header 17 bytes; body: ``ceil(n / chunk_size)`` float32 scales, then levels 0..2 packed
    five to a byte (``ceil(n / 5)`` bytes, :func:`fedge.compression.qsgd.pack_trits`).
    Total ``17 + 4 ceil(n / 1024) + ceil(n / 5)``.

``rotate+ternary`` (id 5)::

    13..16  chunk_size     uint32 (1024)
    17..20  block_size     uint32 (1024)
    21..28  rotation_seed  uint64

    header 29 bytes; body: as ``ternary`` over the ``m = rotated_length(n)`` rotated elements.
    Total ``29 + 4 ceil(m / 1024) + ceil(m / 5)``.

``stc`` (id 6), sparse ternary (:mod:`fedge.compression.stc`)::

    13      rice_bits     uint8, 0..62
    14..21  k             uint64, kept entries
    22..25  mu            float32, the magnitude every kept entry decodes to (finite, >= 0)
    26..29  unary_bytes   uint32, length of the unary stream

    header 30 bytes; body: the Rice unary stream (``unary_bytes``), the remainder stream
    (``ceil(k * rice_bits / 8)`` bytes; both :mod:`fedge.compression.rice`), then one sign bit
    per kept entry, set when negative (``ceil(k / 8)`` bytes). The size depends on where the
    kept entries lie; :func:`max_payload_bytes` bounds it.

Any other version is refused: the format changes only with a new version byte.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import numpy.typing as npt

from fedge.compression import hadamard, qsgd, rice, stc, topk
from fedge.compression.spec import (
    KIND_NONE,
    KIND_QSGD,
    KIND_ROTATE_QSGD,
    KIND_ROTATE_TERNARY,
    KIND_STC,
    KIND_TERNARY,
    KIND_TOPK,
    CodecError,
    CodecSpec,
)

MAGIC = b"FGC"
VERSION = 1
CODEC_IDS = {
    KIND_NONE: 0,
    KIND_QSGD: 1,
    KIND_TOPK: 2,
    KIND_ROTATE_QSGD: 3,
    KIND_TERNARY: 4,
    KIND_ROTATE_TERNARY: 5,
    KIND_STC: 6,
}
CODEC_KIND_BY_ID = {v: k for k, v in CODEC_IDS.items()}

_COMMON = struct.Struct("<3sBBQ")  # magic, version, codec id, n
_QSGD = struct.Struct("<BI")  # num_bits, chunk_size
_TOPK = struct.Struct("<BQ")  # index_format, k
_ROTATE = struct.Struct("<BIIQ")  # num_bits, chunk_size, block_size, rotation_seed
_TERNARY = struct.Struct("<I")  # chunk_size
_ROTATE_TERNARY = struct.Struct("<IIQ")  # chunk_size, block_size, rotation_seed
_STC = struct.Struct("<BQfI")  # rice_bits, k, mu, unary_bytes
_FIELDS = {
    KIND_NONE: struct.Struct(""),
    KIND_QSGD: _QSGD,
    KIND_TOPK: _TOPK,
    KIND_ROTATE_QSGD: _ROTATE,
    KIND_TERNARY: _TERNARY,
    KIND_ROTATE_TERNARY: _ROTATE_TERNARY,
    KIND_STC: _STC,
}
HEADER_BYTES = {kind: _COMMON.size + fields.size for kind, fields in _FIELDS.items()}
BYTES_PER_FP32 = 4
_MAX_U64 = (1 << 64) - 1

F32 = npt.NDArray[np.float32]


def _qsgd_body_bytes(num_elements: int, num_bits: int, chunk_size: int) -> int:
    return BYTES_PER_FP32 * qsgd.num_chunks(num_elements, chunk_size) + qsgd.packed_bytes(
        num_elements, num_bits
    )


def _ternary_body_bytes(num_elements: int, chunk_size: int) -> int:
    return BYTES_PER_FP32 * qsgd.num_chunks(num_elements, chunk_size) + qsgd.trit_bytes(num_elements)


def payload_bytes(spec: CodecSpec, num_elements: int) -> int:
    """Length of ``encode(x, spec, ...)`` for ``x.size == num_elements`` (header + body).

    Parameters
    ----------
    spec : CodecSpec
        Any codec but ``stc``, whose size depends on the update (see :func:`max_payload_bytes`).
    num_elements : int
        Elements in the tensor.

    Returns
    -------
    int
        Bytes, from the layout in the module docstring.

    Raises
    ------
    CodecError
        For ``stc``.
    """
    n = num_elements
    header = HEADER_BYTES[spec.kind]
    if spec.kind == KIND_NONE:
        return header + BYTES_PER_FP32 * n
    if spec.kind == KIND_QSGD:
        return header + _qsgd_body_bytes(n, spec.num_bits, qsgd.CHUNK_SIZE)
    if spec.kind == KIND_TOPK:
        k = topk.topk_count(n, spec.keep_fraction)
        fmt = topk.index_format(n, k)
        return header + topk.index_bytes(fmt, n, k) + BYTES_PER_FP32 * k
    if spec.kind == KIND_ROTATE_QSGD:
        m = hadamard.rotated_length(n)
        return header + _qsgd_body_bytes(m, spec.num_bits, qsgd.CHUNK_SIZE)
    if spec.kind == KIND_TERNARY:
        return header + _ternary_body_bytes(n, qsgd.CHUNK_SIZE)
    if spec.kind == KIND_ROTATE_TERNARY:
        return header + _ternary_body_bytes(hadamard.rotated_length(n), qsgd.CHUNK_SIZE)
    raise CodecError(f"{spec} payloads vary in size with the update; use max_payload_bytes for a bound")


def max_payload_bytes(spec: CodecSpec, num_elements: int) -> int:
    """The largest ``len(encode(x, spec, ...))`` for ``x.size == num_elements``.

    Equal to :func:`payload_bytes` for the fixed-size codecs. For ``stc`` with
    ``k = topk_count(n, keep_fraction)`` and ``b0 = floor(log2(n / k))``: the gaps between
    kept positions sum to at most ``n - k``, so Rice parameter ``b0`` codes them in at most
    ``ceil((k + (n - k) // 2**b0) / 8) + ceil(k b0 / 8)`` bytes, and the encoder's choice of
    parameter is never longer; plus the 30-byte header and ``ceil(k / 8)`` sign bytes.
    """
    if spec.kind != KIND_STC:
        return payload_bytes(spec, num_elements)
    n = num_elements
    k = topk.topk_count(n, spec.keep_fraction)
    b0 = (n // k).bit_length() - 1 if k else 0
    unary, remainders = rice.streams_bytes(k, b0, (n - k) >> b0)
    return HEADER_BYTES[KIND_STC] + unary + remainders + stc.sign_bytes(k)


def _as_finite_f32(x: npt.ArrayLike) -> F32:
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    if not np.isfinite(flat).all():
        raise CodecError("update contains NaN or Inf (or overflows float32); fix training or clip it")
    return flat


def _rotated(flat: F32, rotation_seed: int) -> F32:
    if not 0 <= rotation_seed <= _MAX_U64:
        raise CodecError(f"rotation_seed must be in 0..2**64-1, got {rotation_seed}")
    rotated = hadamard.rotate(flat, rotation_seed)
    if not np.isfinite(rotated).all():
        raise CodecError("rotated update overflows float32; clip the update before encoding")
    return rotated


def encode(x: npt.ArrayLike, spec: CodecSpec, rng: np.random.Generator, *, rotation_seed: int = 0) -> bytes:
    """Compress one tensor's float32 update into a self-describing payload.

    Parameters
    ----------
    x : array_like of float
        The update, any shape; read as float32 and never modified.
    spec : CodecSpec
        The codec.
    rng : numpy.random.Generator
        Randomness of stochastic rounding (``qsgd``, ``ternary`` and their rotated forms);
        unused otherwise.
    rotation_seed : int, default 0
        Seed of the rotation's signs for the ``rotate+`` codecs, 0..2**64-1; written in the
        header. Use a fresh seed per round (shared or not: the decoder reads it from the
        payload).

    Returns
    -------
    bytes
        Header and body as documented in this module.

    Raises
    ------
    CodecError
        When ``x`` holds NaN or Inf, or ``rotation_seed`` is out of range.
    """
    flat = _as_finite_f32(x)
    n = flat.size
    common = _COMMON.pack(MAGIC, VERSION, CODEC_IDS[spec.kind], n)
    chunk = qsgd.CHUNK_SIZE
    block = hadamard.BLOCK_SIZE
    if spec.kind == KIND_NONE:
        return common + flat.astype("<f4").tobytes()
    if spec.kind == KIND_QSGD:
        scales, levels = qsgd.quantize(flat, spec.num_bits, rng)
        fields = _QSGD.pack(spec.num_bits, chunk)
        return b"".join(
            [common, fields, scales.astype("<f4").tobytes(), qsgd.pack_levels(levels, spec.num_bits)]
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
    if spec.kind == KIND_ROTATE_QSGD:
        scales, levels = qsgd.quantize(_rotated(flat, rotation_seed), spec.num_bits, rng)
        fields = _ROTATE.pack(spec.num_bits, chunk, block, rotation_seed)
        return b"".join(
            [common, fields, scales.astype("<f4").tobytes(), qsgd.pack_levels(levels, spec.num_bits)]
        )
    if spec.kind == KIND_TERNARY:
        scales, levels = qsgd.quantize_top(flat, qsgd.TERNARY_TOP, rng)
        return b"".join(
            [common, _TERNARY.pack(chunk), scales.astype("<f4").tobytes(), qsgd.pack_trits(levels)]
        )
    if spec.kind == KIND_ROTATE_TERNARY:
        scales, levels = qsgd.quantize_top(_rotated(flat, rotation_seed), qsgd.TERNARY_TOP, rng)
        fields = _ROTATE_TERNARY.pack(chunk, block, rotation_seed)
        return b"".join([common, fields, scales.astype("<f4").tobytes(), qsgd.pack_trits(levels)])
    positions, negative, mu = stc.sparsify(flat, spec.keep_fraction)
    streams = rice.encode_positions(positions)
    fields = _STC.pack(streams.rice_bits, positions.size, mu, len(streams.unary))
    return b"".join([common, fields, streams.unary, streams.remainders, stc.pack_signs(negative)])


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


def _scales(payload: bytes, start: int, rows: int) -> F32:
    scales = np.frombuffer(payload, dtype="<f4", count=rows, offset=start).astype(np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError("quantizer scales must be finite and >= 0; payload is corrupt")
    return scales


def _decode_qsgd_body(payload: bytes, start: int, m: int, num_bits: int, chunk_size: int) -> F32:
    rows = qsgd.num_chunks(m, chunk_size)
    scales = _scales(payload, start, rows)
    levels = qsgd.unpack_levels(payload[start + BYTES_PER_FP32 * rows :], m, num_bits)
    return qsgd.dequantize(scales, levels, num_bits, chunk_size)


def _decode_ternary_body(payload: bytes, start: int, m: int, chunk_size: int) -> F32:
    rows = qsgd.num_chunks(m, chunk_size)
    scales = _scales(payload, start, rows)
    levels = qsgd.unpack_trits(payload[start + BYTES_PER_FP32 * rows :], m)
    return qsgd.dequantize_top(scales, levels, qsgd.TERNARY_TOP, chunk_size)


def _check_bits(num_bits: int) -> None:
    if not 1 <= num_bits <= 8:
        raise CodecError(f"header num_bits {num_bits} is outside 1..8; payload is corrupt")


def _check_chunk(chunk_size: int) -> None:
    # Version 1 writes 1024 only. Accepting any value would let a 30-byte payload make the
    # decoder allocate chunk_size floats (16 GiB for 2**32 - 1).
    if chunk_size != qsgd.CHUNK_SIZE:
        raise CodecError(
            f"header chunk_size {chunk_size} is not {qsgd.CHUNK_SIZE}, the only one format "
            f"version {VERSION} uses; payload is corrupt"
        )


def _check_block(block_size: int) -> None:
    if block_size != hadamard.BLOCK_SIZE:
        raise CodecError(
            f"header block_size {block_size} is not {hadamard.BLOCK_SIZE}, the only one format "
            f"version {VERSION} uses; payload is corrupt"
        )


def _decode_body(kind: str, payload: bytes, n: int) -> F32:
    """The decoded flat update; ``payload``'s common header is already checked."""
    header = HEADER_BYTES[kind]
    if len(payload) < header:
        _check_length(payload, header, kind)
    fields = _FIELDS[kind].unpack_from(payload, _COMMON.size)
    if kind == KIND_NONE:
        _check_length(payload, header + BYTES_PER_FP32 * n, kind)
        return np.frombuffer(payload, dtype="<f4", offset=header).astype(np.float32)
    if kind == KIND_QSGD:
        num_bits, chunk_size = fields
        _check_bits(num_bits)
        _check_chunk(chunk_size)
        _check_length(payload, header + _qsgd_body_bytes(n, num_bits, chunk_size), kind)
        return _decode_qsgd_body(payload, header, n, num_bits, chunk_size)
    if kind == KIND_TOPK:
        fmt, k = fields
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
        return out
    if kind in (KIND_ROTATE_QSGD, KIND_ROTATE_TERNARY):
        if kind == KIND_ROTATE_QSGD:
            num_bits, chunk_size, block_size, seed = fields
            _check_bits(num_bits)
        else:
            chunk_size, block_size, seed = fields
        _check_chunk(chunk_size)
        _check_block(block_size)
        m = hadamard.rotated_length(n, block_size)
        if kind == KIND_ROTATE_QSGD:
            _check_length(payload, header + _qsgd_body_bytes(m, num_bits, chunk_size), kind)
            rotated = _decode_qsgd_body(payload, header, m, num_bits, chunk_size)
        else:
            _check_length(payload, header + _ternary_body_bytes(m, chunk_size), kind)
            rotated = _decode_ternary_body(payload, header, m, chunk_size)
        return hadamard.unrotate(rotated, n, seed, block_size)
    if kind == KIND_TERNARY:
        (chunk_size,) = fields
        _check_chunk(chunk_size)
        _check_length(payload, header + _ternary_body_bytes(n, chunk_size), kind)
        return _decode_ternary_body(payload, header, n, chunk_size)
    rice_bits, k, mu, unary_bytes = fields
    if k > n:
        raise CodecError(f"stc header says k={k} of only {n} elements; payload is corrupt")
    if not (math.isfinite(mu) and mu >= 0):
        raise CodecError(f"stc magnitude {mu} must be finite and >= 0; payload is corrupt")
    _, remainder_bytes = rice.streams_bytes(k, rice_bits, 0)
    _check_length(payload, header + unary_bytes + remainder_bytes + stc.sign_bytes(k), kind)
    start = header + unary_bytes
    positions = rice.decode_positions(
        payload[header:start], payload[start : start + remainder_bytes], k, rice_bits, n
    )
    negative = stc.unpack_signs(payload[start + remainder_bytes :], k)
    return stc.densify(positions, negative, mu, n)


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
    if any(int(d) < 0 for d in shape):
        raise CodecError(f"shape {shape} has a negative dimension")
    expected_n = math.prod(int(d) for d in shape)
    if n != expected_n:
        raise CodecError(
            f"payload holds {n} elements but shape {tuple(shape)} has {expected_n}; "
            "decode with the shape the tensor was encoded from"
        )
    out = _decode_body(CODEC_KIND_BY_ID[codec_id], payload, n)
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
