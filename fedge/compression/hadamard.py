"""Randomized Hadamard rotation: orthonormal, invertible, seeded.

``R x = H D x / sqrt(m)`` where ``x`` is zero-padded to ``m = 2**ceil(log2(n))``, ``D`` is a
diagonal of random signs drawn from ``np.random.default_rng(rotation_seed)`` and ``H`` is the
Sylvester Hadamard matrix (``H[i, j] = (-1)**popcount(i & j)``, symmetric, ``H @ H = m I``).
``R`` is orthonormal, so quantization error in the rotated domain has the same norm after
``R^T x = D H y / sqrt(m)``. Rotation spreads a spiky vector's mass over all coordinates, so
the per-chunk max-abs scale, and with it the quantization step, shrinks (Suresh et al.,
"Distributed Mean Estimation with Limited Communication", ICML 2017).

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


def fwht(x: F32) -> F32:
    """Unnormalized Walsh-Hadamard transform ``H x`` of a vector whose length is a power of two.

    Returns a new float32 array; ``fwht(fwht(x)) == m * x``.
    """
    m = x.size
    if m & (m - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {m}; pad with padded_length()")
    if m <= 1:
        return np.array(x, dtype=np.float32)
    log2m = m.bit_length() - 1
    factors = []
    remaining = log2m
    while remaining:
        step = min(_FACTOR_LOG2, remaining)
        factors.append(1 << step)
        remaining -= step
    y = np.array(x, dtype=np.float32).reshape(factors)
    # Transform the last axis, then move it to the front; after len(factors) steps every
    # axis has been transformed once and the axes are back in their order.
    for f in reversed(factors):
        shape = y.shape
        y = (y.reshape(-1, f) @ _sylvester(f)).reshape(shape)
        y = np.ascontiguousarray(np.moveaxis(y, -1, 0))
    return y.reshape(m)


def rotation_signs(length: int, rotation_seed: int) -> F32:
    """The diagonal ``D``: ``length`` signs +-1 from ``np.random.default_rng(rotation_seed)``."""
    bits = np.random.default_rng(rotation_seed).integers(0, 2, size=length, dtype=np.int8)
    return (bits.astype(np.float32) * np.float32(2.0)) - np.float32(1.0)


def rotate(x: F32, rotation_seed: int) -> F32:
    """``R x``: pad a flat vector to a power of two, flip signs, Hadamard, scale by ``1/sqrt(m)``."""
    n = x.size
    m = padded_length(n)
    padded = np.zeros(m, dtype=np.float32)
    padded[:n] = x.reshape(-1)
    padded *= rotation_signs(m, rotation_seed)
    y = fwht(padded)
    y *= np.float32(1.0 / np.sqrt(m)) if m else np.float32(1.0)
    return y


def unrotate(y: F32, num_elements: int, rotation_seed: int) -> F32:
    """``R^T y`` truncated to the first ``num_elements`` entries (the inverse of :func:`rotate`)."""
    m = y.size
    x = fwht(y)
    if m:
        x *= np.float32(1.0 / np.sqrt(m))
    x *= rotation_signs(m, rotation_seed)
    return x[:num_elements].copy()
