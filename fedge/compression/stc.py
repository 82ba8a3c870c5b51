"""Sparse ternary compression: the top-k entries, each sent as its sign times one shared magnitude.

Sattler et al., "Robust and Communication-Efficient Federated Learning From Non-i.i.d. Data",
IEEE TNNLS 2019. With ``k = topk_count(n, keep_fraction)`` and ``S`` the positions of the
``k`` largest ``|x|``::

    mu = mean(|x_i| for i in S)          # float32, one per tensor
    C(x)_i = sign(x_i) * mu  for i in S, 0 elsewhere

Positions are Rice-coded (:mod:`fedge.compression.rice`) and signs take one bit each, so a
kept entry costs about ``log2(n / k) + 3`` bits instead of top-k's index plus a float32.
``C`` is biased but contractive: ``||x - C(x)||**2 = ||x||**2 - k mu**2 < ||x||**2`` for a
nonzero ``x`` (since ``sum_S |x_i| = k mu``), which is what error feedback needs; pair it with
error feedback, which carries the dropped mass and the magnitude error to the next round.
Like top-k, it is not usable under secure aggregation.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedge.compression import topk
from fedge.compression.spec import CodecError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def sparsify(x: F32, keep_fraction: float) -> tuple[I64, BoolArray, float]:
    """The kept positions (ascending), whether each kept entry is negative, and ``mu``.

    Parameters
    ----------
    x : ndarray of float32, shape (n,)
        Finite values.
    keep_fraction : float
        In (0, 1]; ``k = min(n, max(1, ceil(keep_fraction * n)))``.

    Returns
    -------
    positions : ndarray of int64, shape (k,)
    negative : ndarray of bool, shape (k,)
    mu : float
        ``mean(|x[positions]|)``, rounded to float32 (0.0 for an empty tensor).
    """
    k = topk.topk_count(x.size, keep_fraction)
    positions = topk.select(x, k)
    kept = x[positions]
    mu = float(np.float32(np.abs(kept, dtype=np.float64).mean())) if k else 0.0
    return positions, kept < 0, mu


def densify(positions: I64, negative: BoolArray, mu: float, num_elements: int) -> F32:
    """``C(x)`` as a dense float32 vector of ``num_elements``."""
    out = np.zeros(num_elements, dtype=np.float32)
    magnitude = np.float32(mu)
    out[positions] = np.where(negative, -magnitude, magnitude)
    return out


def pack_signs(negative: BoolArray) -> bytes:
    """One bit per kept entry, set when negative, least significant bit first."""
    return np.packbits(negative.astype(np.uint8), bitorder="little").tobytes()


def unpack_signs(data: bytes, num_positions: int) -> BoolArray:
    """Inverse of :func:`pack_signs`; ``data`` holds exactly ``ceil(k / 8)`` bytes.

    Raises
    ------
    CodecError
        When a bit past the last sign is set (a corrupt payload).
    """
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[num_positions:].any():
        raise CodecError("stc sign bits have nonzero padding past the last entry; payload is corrupt")
    return bits[:num_positions].astype(bool)


def sign_bytes(num_positions: int) -> int:
    """``ceil(k / 8)``."""
    return -(-num_positions // 8)


__all__ = ["densify", "pack_signs", "sign_bytes", "sparsify", "unpack_signs"]
