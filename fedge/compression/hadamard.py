"""Randomized Hadamard rotation, block by block: orthonormal, invertible, seeded.

A vector of ``n`` elements is cut into blocks of ``BLOCK_SIZE`` (1024) elements; the last,
shorter block is zero-padded to the next power of two, so the rotated vector has
``m = rotated_length(n)`` elements (at most ``n + 1023``; one full-vector padding to a power
of two would cost up to ``2 n``). Then ``R x = H D x`` where ``D`` is a diagonal of random
signs over all ``m`` elements, from the raw bits of ``PCG64(rotation_seed)``
(:func:`rotation_signs`), and ``H``
is block-diagonal with a normalized Sylvester Hadamard matrix ``H_b / sqrt(b)`` per block of
size ``b`` (``H_b[i, j] = (-1)**popcount(i & j)``, symmetric, ``H_b @ H_b = b I``). ``R`` is
orthonormal, so quantization error in the rotated domain has the same norm after
``R^T y = D H y``. Rotation spreads a spiky block's mass over its coordinates, so the
per-chunk max-abs scale, and with it the quantization step, shrinks (Suresh et al.,
"Distributed Mean Estimation with Limited Communication", ICML 2017); blocks match the
quantizer's 1024-element chunks, where the scale is shared anyway.

The transform is a product of small dense Hadamard matrices over the bits of the index
(``H_m = H_a (x) H_b (x) ...``), each applied as a matrix product, which in numpy is faster
than ``log2(m)`` butterfly passes.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

_FACTOR_LOG2 = 7  # 128 x 128 blocks: a few matmuls per vector, small flop count
BLOCK_SIZE = 1024


def padded_length(num_elements: int) -> int:
    """``2**ceil(log2(n))`` (0 for an empty tensor)."""
    if num_elements <= 1:
        return num_elements
    return 1 << (num_elements - 1).bit_length()


@functools.lru_cache(maxsize=16)
def _sylvester(size: int) -> F32:
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def rotated_length(num_elements: int, block_size: int = BLOCK_SIZE) -> int:
    """Elements after rotation: whole blocks, plus the tail padded to a power of two."""
    full, tail = divmod(num_elements, block_size)
    return full * block_size + padded_length(tail)


def fwht_rows(x: F32) -> F32:
    """Unnormalized Walsh-Hadamard transform ``H x`` of each row of a 2-D array.

    The row length must be a power of two. Returns a new float32 array;
    ``fwht_rows(fwht_rows(x)) == m * x`` for rows of length ``m``.
    """
    rows, m = x.shape
    if m & (m - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {m}; pad with padded_length()")
    if m <= 1 or rows == 0:
        return np.array(x, dtype=np.float32)
    factors = []
    remaining = m.bit_length() - 1
    while remaining:
        step = min(_FACTOR_LOG2, remaining)
        factors.append(1 << step)
        remaining -= step
    y = np.array(x, dtype=np.float32).reshape(rows, *factors)
    # Transform the last axis, then move it to just after the row axis; after
    # len(factors) steps every axis has been transformed once and is back in its place.
    for f in reversed(factors):
        shape = y.shape
        y = (y.reshape(-1, f) @ _sylvester(f)).reshape(shape)
        y = np.ascontiguousarray(np.moveaxis(y, -1, 1))
    return y.reshape(rows, m)


def fwht(x: F32) -> F32:
    """Unnormalized Walsh-Hadamard transform ``H x`` of a vector whose length is a power of two.

    Returns a new float32 array; ``fwht(fwht(x)) == m * x``.
    """
    return fwht_rows(np.asarray(x, dtype=np.float32).reshape(1, -1)).reshape(-1)


def rotation_signs(length: int, rotation_seed: int) -> F32:
    """The diagonal ``D``: ``length`` signs +-1, part of the wire format.

    Sign ``i`` is ``-1`` when bit ``i % 64`` of word ``i // 64`` of the raw output of
    ``np.random.PCG64(rotation_seed)`` is set. The raw bit streams of numpy's BitGenerators
    (seeded through SeedSequence) are kept stable across numpy releases (NEP 19), while
    ``Generator`` methods such as ``integers`` may change their algorithms: a device and a
    server on different numpy versions must rebuild the same rotation.
    """
    words = np.random.PCG64(rotation_seed).random_raw(-(-length // 64))
    bits = np.unpackbits(np.asarray(words, dtype="<u8").view(np.uint8), bitorder="little")[:length]
    return np.float32(1.0) - np.float32(2.0) * bits.astype(np.float32)


def _blockwise(y: F32, block_size: int) -> F32:
    """Normalized Hadamard per block of a vector laid out as by :func:`rotated_length`."""
    full = (y.size // block_size) * block_size
    out = np.empty_like(y)
    if full:
        out[:full] = fwht_rows(y[:full].reshape(-1, block_size)).reshape(-1)
        out[:full] *= np.float32(1.0 / np.sqrt(block_size))
    tail = y.size - full
    if tail:
        out[full:] = fwht(y[full:])
        out[full:] *= np.float32(1.0 / np.sqrt(tail))
    return out


def rotate(x: F32, rotation_seed: int, block_size: int = BLOCK_SIZE) -> F32:
    """``R x``: pad the tail block to a power of two, flip signs, normalized Hadamard per block."""
    n = x.size
    m = rotated_length(n, block_size)
    padded = np.zeros(m, dtype=np.float32)
    padded[:n] = x.reshape(-1)
    padded *= rotation_signs(m, rotation_seed)
    return _blockwise(padded, block_size)


def unrotate(y: F32, num_elements: int, rotation_seed: int, block_size: int = BLOCK_SIZE) -> F32:
    """``R^T y`` truncated to the first ``num_elements`` entries (the inverse of :func:`rotate`)."""
    x = _blockwise(np.asarray(y, dtype=np.float32), block_size)
    x *= rotation_signs(y.size, rotation_seed)
    return x[:num_elements].copy()
