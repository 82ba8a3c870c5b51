"""Golomb-Rice coding of ascending positions, in two streams so that numpy decodes it without a loop.

Positions ``p_0 < p_1 < ... < p_{k-1}`` become gaps ``g_0 = p_0``, ``g_i = p_i - p_{i-1} - 1``
(>= 0). With Rice parameter ``b``, gap ``g`` is the quotient ``g >> b`` in unary and the
remainder ``g & (2**b - 1)`` in ``b`` plain bits (Golomb, "Run-length encodings", IEEE
Trans. Inf. Theory 1966; Rice 1979). For positions spread like a geometric distribution
(top-k of a dense update), a gap costs about ``b + 2`` bits with ``b ~ log2(n / k)``, far
below a 16- or 32-bit index. Sattler et al. ("Robust and Communication-Efficient Federated
Learning From Non-i.i.d. Data", IEEE TNNLS 2019) code sparse ternary updates this way.

Streams (bits least significant first within each byte, bit ``j`` of a stream is bit
``j % 8`` of byte ``j // 8``; unused high bits of each stream's last byte are 0):

* unary: for each gap in order, ``g >> b`` one-bits then a zero-bit;
  ``k + sum(g >> b)`` bits;
* remainders: ``b`` bits per gap, least significant first; ``k b`` bits.

Keeping the unary parts apart lets the decoder find every terminating zero at once
(``flatnonzero``) instead of walking the bits. The encoder picks the ``b`` that makes the
two streams shortest for the data at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedge.compression.spec import CodecError

I64 = npt.NDArray[np.int64]
MAX_RICE_BITS = 62


@dataclass(frozen=True)
class RiceStreams:
    """The coded positions: the Rice parameter and the two byte streams."""

    rice_bits: int
    unary: bytes
    remainders: bytes


def _bytes(num_bits: int) -> int:
    return -(-num_bits // 8)


def gaps(positions: I64) -> I64:
    """``g_0 = p_0``, ``g_i = p_i - p_{i-1} - 1`` of strictly ascending positions."""
    out = np.diff(positions, prepend=-1) - 1
    return out.astype(np.int64)


def best_rice_bits(gap_values: I64) -> int:
    """The ``b`` in ``0..MAX_RICE_BITS`` minimizing the bytes of both streams for these gaps."""
    if gap_values.size == 0:
        return 0
    k = gap_values.size
    widest = min(MAX_RICE_BITS, int(gap_values.max()).bit_length())
    best, best_bytes = 0, None
    for b in range(widest + 1):
        size = _bytes(k + int((gap_values >> b).sum())) + _bytes(k * b)
        if best_bytes is None or size < best_bytes:
            best, best_bytes = b, size
    return best


def encode_positions(positions: I64) -> RiceStreams:
    """Rice-code strictly ascending, non-negative positions (see the module docstring)."""
    g = gaps(np.asarray(positions, dtype=np.int64))
    b = best_rice_bits(g)
    k = g.size
    quotients = g >> b
    unary_bits = k + int(quotients.sum())
    unary = np.ones(unary_bits, dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 0  # each gap's terminating zero
    remainder_bits = ((g[:, None] >> np.arange(b, dtype=np.int64)[None, :]) & 1).astype(np.uint8)
    return RiceStreams(
        rice_bits=b,
        unary=np.packbits(unary, bitorder="little").tobytes(),
        remainders=np.packbits(remainder_bits.reshape(-1), bitorder="little").tobytes(),
    )


def streams_bytes(num_positions: int, rice_bits: int, quotient_sum: int) -> tuple[int, int]:
    """Lengths of the unary and remainder streams: ``ceil((k + sum q) / 8)``, ``ceil(k b / 8)``."""
    return _bytes(num_positions + quotient_sum), _bytes(num_positions * rice_bits)


def decode_positions(unary: bytes, remainders: bytes, num_positions: int, rice_bits: int, limit: int) -> I64:
    """Inverse of :func:`encode_positions`.

    Parameters
    ----------
    unary, remainders : bytes
        The two streams; the remainder stream must be exactly ``ceil(k b / 8)`` bytes.
    num_positions : int
        ``k``, from the payload header.
    rice_bits : int
        ``b``, from the payload header.
    limit : int
        Every position must be below this (the tensor's element count).

    Returns
    -------
    ndarray of int64
        The ``k`` strictly ascending positions.

    Raises
    ------
    CodecError
        When the unary stream has fewer than ``k`` terminators, more bytes than its ``k``
        codes need, or nonzero padding; when the remainder stream has the wrong length or
        nonzero padding; or when a position reaches ``limit``.
    """
    k = num_positions
    if k > limit:
        raise CodecError(f"{k} Rice-coded positions cannot fit below {limit}; payload is corrupt")
    if not 0 <= rice_bits <= MAX_RICE_BITS:
        raise CodecError(f"Rice parameter {rice_bits} is outside 0..{MAX_RICE_BITS}; payload is corrupt")
    if len(remainders) != _bytes(k * rice_bits):
        raise CodecError("Rice remainder stream has the wrong length; payload is corrupt")
    if k == 0:
        if unary:
            raise CodecError("Rice unary stream holds bytes but no positions; payload is corrupt")
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(unary, dtype=np.uint8), bitorder="little")
    zeros = np.flatnonzero(bits == 0)
    if zeros.size < k:
        raise CodecError(f"Rice unary stream codes fewer than {k} positions; payload is truncated or corrupt")
    ends = zeros[:k]
    used = int(ends[-1]) + 1
    if _bytes(used) != len(unary) or bits[used:].any():
        raise CodecError("Rice unary stream has extra bytes or nonzero padding; payload is corrupt")
    quotients = np.diff(ends, prepend=-1) - 1
    if int(quotients.max()) > (limit >> rice_bits):  # a gap past the tensor (and no int64 overflow)
        raise CodecError(f"Rice-coded gap reaches past {limit} elements; payload is corrupt")
    rbits = np.unpackbits(np.frombuffer(remainders, dtype=np.uint8), bitorder="little")
    if rbits[k * rice_bits :].any():
        raise CodecError("Rice remainder stream has nonzero padding; payload is corrupt")
    weights = np.left_shift(np.int64(1), np.arange(rice_bits, dtype=np.int64))
    low = rbits[: k * rice_bits].reshape(k, rice_bits).astype(np.int64) @ weights if rice_bits else 0
    g = (quotients.astype(np.int64) << rice_bits) + low
    # Every gap is below the limit (checked before the sum, which could otherwise wrap
    # around int64 with 62-bit remainders), so the positions sum to at most k * limit.
    if int(g.max()) >= limit or int(g.min()) < 0:
        raise CodecError(f"Rice-coded gap reaches past {limit} elements; payload is corrupt")
    positions = np.cumsum(g + 1) - 1
    if int(positions[-1]) >= limit or int(positions[0]) < 0 or np.any(np.diff(positions) <= 0):
        raise CodecError(f"Rice-coded position {int(positions[-1])} is not below {limit}; payload is corrupt")
    return positions.astype(np.int64)


__all__ = ["RiceStreams", "best_rice_bits", "decode_positions", "encode_positions", "gaps", "streams_bytes"]
