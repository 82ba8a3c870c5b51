"""Stochastic uniform quantization (QSGD-style), bit packing, and its secure-aggregation arithmetic.

Scheme
------
Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding",
NeurIPS 2017, quantize ``|x| / norm`` with a sign. Here the sign is folded into the level so
that ``num_bits`` is the whole cost per element: with ``L = 2**num_bits - 1`` and a scale ``m``
(the max ``|x|`` of the element's chunk of ``CHUNK_SIZE`` = 1024 elements, or a shared
``clip_value`` under secure aggregation)::

    v = (x / m + 1) * L / 2              # in [0, L]
    q = floor(v + u),  u ~ U[0, 1)       # q = floor(v) + 1 with probability frac(v)
    x_hat = m * (q * 2 / L - 1)          # the decoded value

so ``E[q] = v`` and ``E[x_hat] = x`` (unbiased). The step between levels is ``2 * m / L`` and
``|x - x_hat| < 2 * m / L`` per element; ``Var[x_hat] <= (2 * m / L)**2 / 4``. ``num_bits = 1``
is stochastic sign quantization (``x_hat`` is ``-m`` or ``+m``). A chunk of zeros has ``m = 0``
and decodes to exactly 0.

Ternary (TernGrad: Wen et al., "TernGrad: Ternary Gradients to Reduce Communication in
Distributed Deep Learning", NeurIPS 2017) is the same scheme with ``L = 2``: levels 0, 1, 2
decode to ``-m, 0, +m``, so ``|x - x_hat| < m`` and ``Var[x_hat] = |x| (m - |x|)``, far below
1-bit's ``m**2 - x**2`` for the many small entries of an update. Five levels fit in a byte
(``3**5 = 243``): ``ceil(n / 5)`` bytes, 1.6 bits an element (:func:`pack_trits`).

Secure aggregation
------------------
Levels are unsigned integers in ``[0, L] = [0, 2**num_bits - 1]`` (ternary: ``[0, 2]``, a
subset of the 2-bit levels, so it uses the 2-bit modulus). A sum over ``N`` clients
lies in ``[0, N * L]``, and ``N * L < 2**(num_bits + ceil(log2(N)))``, so the secagg modulus
``2**(num_bits + ceil(log2(N)))`` (``ceil(log2(N))`` headroom bits; :func:`secagg_sum_bits`)
recovers the sum exactly from its residue. The sum is linear in the levels only when every
client uses the same scale, so under secure aggregation clients quantize with a shared
``clip_value`` (after clipping to it) via :func:`quantize_levels`, not with the per-chunk max
that :func:`fedge.compression.encode` sends in the clear; the server decodes the level sum
with :func:`dequantize_level_sum`: ``sum_i x_hat_i = clip_value * (S * 2 / L - N)``.

Bit packing
-----------
Levels form one little-endian bit stream: element ``i`` occupies stream bits
``i * num_bits .. i * num_bits + num_bits - 1``, least significant bit first, and stream bit
``j`` is bit ``j % 8`` of byte ``j // 8``. A tensor of ``n`` elements takes
``ceil(n * num_bits / 8)`` bytes; unused high bits of the last byte are zero.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fedge.compression.spec import MAX_NUM_BITS, MIN_NUM_BITS, CodecError

CHUNK_SIZE = 1024

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


def num_levels(num_bits: int) -> int:
    """Largest level ``L = 2**num_bits - 1``; levels are ``0..L``."""
    return (1 << num_bits) - 1


def num_chunks(num_elements: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Number of scales: ``ceil(num_elements / chunk_size)``."""
    return -(-num_elements // chunk_size)


def packed_bytes(num_elements: int, num_bits: int) -> int:
    """Bytes of the packed levels: ``ceil(num_elements * num_bits / 8)``."""
    return -(-num_elements * num_bits // 8)


TERNARY_TOP = 2  # L for ternary levels 0, 1, 2
_TRITS_PER_BYTE = 5
_TRIT_WEIGHTS = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
_MAX_TRIT_BYTE = 242  # 3**5 - 1


def _stochastic_levels(x2d: F32, scale: F32, top: int, rng: np.random.Generator) -> U8:
    """Levels ``0..top`` of a ``(rows, cols)`` array with one scale per row (scale 0 -> decodes to 0)."""
    safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    v = x2d / safe[:, None]
    v += np.float32(1.0)
    v *= np.float32(top / 2)
    v += rng.random(x2d.shape, dtype=np.float32)
    np.floor(v, out=v)
    # float32 rounding of v + u can reach L + 1 when v == L; the clip is that one case.
    np.clip(v, 0, top, out=v)
    return v.astype(np.uint8)


def quantize(x: F32, num_bits: int, rng: np.random.Generator, chunk_size: int = CHUNK_SIZE) -> tuple[F32, U8]:
    """Quantize a flat float32 vector to ``num_bits`` per element, one max-abs scale per chunk.

    As :func:`quantize_top` with ``top = 2**num_bits - 1``.
    """
    return quantize_top(x, num_levels(num_bits), rng, chunk_size)


def quantize_top(x: F32, top: int, rng: np.random.Generator, chunk_size: int = CHUNK_SIZE) -> tuple[F32, U8]:
    """Quantize a flat float32 vector to levels ``0..top`` with one max-abs scale per chunk.

    Parameters
    ----------
    x : ndarray of float32, shape (n,)
        Finite values.
    top : int
        The largest level ``L``: ``2**num_bits - 1``, or 2 for ternary.
    rng : numpy.random.Generator
        Source of the rounding uniforms (``num_chunks * chunk_size`` float32 draws).
    chunk_size : int, default 1024
        Elements per scale.

    Returns
    -------
    scales : ndarray of float32, shape (ceil(n / chunk_size),)
        ``max |x|`` of each chunk.
    levels : ndarray of uint8, shape (n,)
        Levels in ``0..top``.
    """
    n = x.size
    rows = num_chunks(n, chunk_size)
    padded = np.zeros(rows * chunk_size, dtype=np.float32)
    padded[:n] = x
    x2d = padded.reshape(rows, chunk_size)
    scales = np.abs(x2d).max(axis=1) if rows else np.zeros(0, dtype=np.float32)
    levels = _stochastic_levels(x2d, scales.astype(np.float32), top, rng)
    return scales.astype(np.float32), levels.reshape(-1)[:n]


def dequantize(scales: F32, levels: U8, num_bits: int, chunk_size: int = CHUNK_SIZE) -> F32:
    """Inverse of :func:`quantize`: ``x_hat = m * (q * 2 / L - 1)``, float32, shape (n,)."""
    return dequantize_top(scales, levels, num_levels(num_bits), chunk_size)


def dequantize_top(scales: F32, levels: U8, top: int, chunk_size: int = CHUNK_SIZE) -> F32:
    """Inverse of :func:`quantize_top`: ``x_hat = m * (q * 2 / top - 1)``, float32, shape (n,)."""
    n = levels.size
    rows = scales.size
    t = np.zeros(rows * chunk_size, dtype=np.float32)
    t[:n] = levels
    t *= np.float32(2.0 / top)
    t -= np.float32(1.0)
    t2d = t.reshape(rows, chunk_size)
    t2d *= scales[:, None]
    return t[:n]


def pack_levels(levels: U8, num_bits: int) -> bytes:
    """Pack levels into the little-endian bit stream described in the module docstring."""
    n = levels.size
    if num_bits == 8:
        return levels.tobytes()
    groups = -(-n // 8)
    wide = np.zeros(groups * 8, dtype=np.uint64)
    wide[:n] = levels
    wide2d = wide.reshape(groups, 8)
    # Eight levels of num_bits each fit in num_bits bytes of one little-endian uint64.
    word = np.zeros(groups, dtype=np.uint64)
    for j in range(8):
        word |= wide2d[:, j] << np.uint64(j * num_bits)
    as_bytes = word.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :num_bits]
    return as_bytes.tobytes()[: packed_bytes(n, num_bits)]


def unpack_levels(data: bytes, num_elements: int, num_bits: int) -> U8:
    """Inverse of :func:`pack_levels`; ``data`` must hold exactly ``packed_bytes(n, num_bits)`` bytes.

    Raises
    ------
    CodecError
        When the unused high bits of the last byte are not zero (a corrupted payload).
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if num_bits == 8:
        return raw.copy()
    n = num_elements
    groups = -(-n // 8)
    buf = np.zeros((groups, 8), dtype=np.uint8)
    flat = np.zeros(groups * num_bits, dtype=np.uint8)
    flat[: raw.size] = raw
    buf[:, :num_bits] = flat.reshape(groups, num_bits)
    word = buf.view("<u8").reshape(groups)
    mask = np.uint64(num_levels(num_bits))
    out = np.empty((groups, 8), dtype=np.uint8)
    for j in range(8):
        out[:, j] = (word >> np.uint64(j * num_bits)) & mask
    levels = out.reshape(-1)
    if np.any(levels[n:]):
        raise CodecError("packed levels have nonzero padding bits after the last element; payload is corrupt")
    return levels[:n]


def trit_bytes(num_elements: int) -> int:
    """Bytes of packed ternary levels: ``ceil(num_elements / 5)``."""
    return -(-num_elements // _TRITS_PER_BYTE)


def pack_trits(levels: U8) -> bytes:
    """Pack levels 0..2, five to a byte: ``byte = q0 + 3 q1 + 9 q2 + 27 q3 + 81 q4``.

    Element ``i`` is digit ``i % 5`` (least significant first) of byte ``i // 5``; the
    digits past the last element are 0.
    """
    n = levels.size
    groups = trit_bytes(n)
    padded = np.zeros(groups * _TRITS_PER_BYTE, dtype=np.uint8)
    padded[:n] = levels
    return (padded.reshape(groups, _TRITS_PER_BYTE) @ _TRIT_WEIGHTS).astype(np.uint8).tobytes()


def unpack_trits(data: bytes, num_elements: int) -> U8:
    """Inverse of :func:`pack_trits`; ``data`` must hold exactly ``ceil(n / 5)`` bytes.

    Raises
    ------
    CodecError
        When a byte exceeds 242 (``3**5 - 1``) or the digits past the last element are not 0.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size and int(raw.max()) > _MAX_TRIT_BYTE:
        raise CodecError(f"packed ternary byte {int(raw.max())} exceeds 242; payload is corrupt")
    digits = (raw[:, None] // _TRIT_WEIGHTS[None, :]) % 3
    levels = digits.astype(np.uint8).reshape(-1)
    if np.any(levels[num_elements:]):
        raise CodecError("packed ternary levels have nonzero padding past the end; payload is corrupt")
    return levels[:num_elements]


def secagg_sum_bits(num_bits: int, num_clients: int) -> int:
    """Bits of the secagg modulus for a sum of levels: ``num_bits + ceil(log2(num_clients))``.

    The modulus is ``2**secagg_sum_bits(num_bits, num_clients)``; the level sum over
    ``num_clients`` clients is at most ``num_clients * (2**num_bits - 1)``, below it.
    """
    if not MIN_NUM_BITS <= num_bits <= MAX_NUM_BITS:
        raise CodecError(f"num_bits must be in 1..8, got {num_bits}")
    if num_clients < 1:
        raise CodecError(f"num_clients must be >= 1, got {num_clients}")
    return num_bits + math.ceil(math.log2(num_clients))


def quantize_levels(
    x: F32, num_bits: int, clip_value: float, rng: np.random.Generator, top: int | None = None
) -> U8:
    """Levels of ``x`` against a scale shared by all clients (for secure aggregation).

    Parameters
    ----------
    x : ndarray of float32
        Values with ``|x| <= clip_value`` (clip first); any shape, returned flattened.
    num_bits : int
        Bits per level, 1..8.
    clip_value : float
        The shared scale ``m`` (> 0).
    rng : numpy.random.Generator
        Source of the rounding uniforms.
    top : int, optional
        ``L``, the top level; default ``2**num_bits - 1`` (ternary: :data:`TERNARY_TOP`).

    Returns
    -------
    ndarray of uint8, shape (x.size,)
        Levels in ``0..L``, unbiased: ``E[clip_value * (q * 2 / L - 1)] = x``.

    Raises
    ------
    CodecError
        On NaN/Inf, ``|x| > clip_value`` or ``clip_value <= 0``.
    """
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    if not (math.isfinite(clip_value) and clip_value > 0):
        raise CodecError(f"clip_value must be finite and > 0, got {clip_value}")
    if not np.isfinite(flat).all():
        raise CodecError("update contains NaN or Inf; fix the training step before quantizing it")
    if flat.size and float(np.abs(flat).max()) > clip_value:
        raise CodecError(f"update exceeds clip_value {clip_value}; clip it to the shared scale first")
    levels = num_levels(num_bits) if top is None else int(top)
    if not 1 <= levels <= num_levels(num_bits):
        raise CodecError(f"top must be in 1..{num_levels(num_bits)} for {num_bits} bits, got {top}")
    scale = np.full(1, clip_value, dtype=np.float32)
    return _stochastic_levels(flat.reshape(1, -1), scale, levels, rng).reshape(-1)


def dequantize_level_sum(
    level_sum: npt.NDArray[np.int64], num_bits: int, clip_value: float, num_clients: int
) -> F32:
    """Sum of the clients' decoded values from the sum of their levels.

    ``sum_i clip_value * (q_i * 2 / L - 1) = clip_value * (S * 2 / L - num_clients)``.
    """
    top = num_levels(num_bits)
    total = np.asarray(level_sum, dtype=np.float64) * (2.0 / top) - num_clients
    return (total * clip_value).astype(np.float32)
