"""Top-k sparsification: keep the ``k`` largest ``|x|``, send their indices and float32 values.

``k = min(n, max(1, ceil(keep_fraction * n)))`` (0 when ``n = 0``), computed in float64.
Indices go in ascending order in the cheapest of three formats, chosen from ``n`` and ``k``
alone (so the size is a closed form):

* ``INDEX_U16`` (0): ``k`` little-endian uint16, when ``n <= 65536``;
* ``INDEX_U32`` (1): ``k`` little-endian uint32, when ``n > 65536``;
* ``INDEX_BITMAP`` (2): ``ceil(n / 8)`` bytes, bit ``i % 8`` of byte ``i // 8`` set when
  element ``i`` is kept, when that is strictly smaller than the list.

Ties in ``|x|`` at the cut are broken by ``np.argpartition`` (deterministic, unspecified).
Top-k is biased and not usable under secure aggregation; pair it with error feedback.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fedge.compression.spec import CodecError

INDEX_U16 = 0
INDEX_U32 = 1
INDEX_BITMAP = 2
INDEX_FORMATS = (INDEX_U16, INDEX_U32, INDEX_BITMAP)
U16_MAX_ELEMENTS = 1 << 16

I64 = npt.NDArray[np.int64]


def topk_count(num_elements: int, keep_fraction: float) -> int:
    """``k = min(n, max(1, ceil(keep_fraction * n)))``; 0 for an empty tensor."""
    if num_elements == 0:
        return 0
    return min(num_elements, max(1, math.ceil(keep_fraction * num_elements)))


def index_format(num_elements: int, k: int) -> int:
    """The cheapest index format for ``k`` of ``n`` entries (ties go to the list)."""
    list_format = INDEX_U16 if num_elements <= U16_MAX_ELEMENTS else INDEX_U32
    bitmap_bytes = -(-num_elements // 8)
    if bitmap_bytes < index_bytes(list_format, num_elements, k):
        return INDEX_BITMAP
    return list_format


def index_bytes(fmt: int, num_elements: int, k: int) -> int:
    """Bytes the indices take in format ``fmt``: ``2k``, ``4k`` or ``ceil(n / 8)``."""
    if fmt == INDEX_U16:
        return 2 * k
    if fmt == INDEX_U32:
        return 4 * k
    return -(-num_elements // 8)


def select(x: npt.NDArray[np.float32], k: int) -> I64:
    """Ascending indices of the ``k`` largest ``|x|`` of a flat vector."""
    n = x.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    part = np.argpartition(np.abs(x), n - k)[n - k :]
    return np.sort(part).astype(np.int64)


def pack_indices(indices: I64, num_elements: int, fmt: int) -> bytes:
    """Serialize ascending indices in format ``fmt``."""
    if fmt == INDEX_U16:
        return indices.astype("<u2").tobytes()
    if fmt == INDEX_U32:
        return indices.astype("<u4").tobytes()
    mask = np.zeros(num_elements, dtype=bool)
    mask[indices] = True
    return np.packbits(mask, bitorder="little").tobytes()


def unpack_indices(data: bytes, num_elements: int, k: int, fmt: int) -> I64:
    """Parse indices; ``data`` has exactly :func:`index_bytes` bytes.

    Raises
    ------
    CodecError
        When indices are not strictly ascending, not below ``n``, or a bitmap does not hold
        exactly ``k`` bits (with zero padding).
    """
    if fmt == INDEX_BITMAP:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        if np.any(bits[num_elements:]):
            raise CodecError("topk bitmap has bits set past the last element; payload is corrupt")
        indices = np.flatnonzero(bits[:num_elements]).astype(np.int64)
        if indices.size != k:
            raise CodecError(f"topk bitmap marks {indices.size} entries but the header says k={k}")
        return indices
    dtype = "<u2" if fmt == INDEX_U16 else "<u4"
    indices = np.frombuffer(data, dtype=dtype).astype(np.int64)
    if indices.size and (indices[-1] >= num_elements or np.any(np.diff(indices) <= 0)):
        raise CodecError(f"topk indices must ascend strictly and stay below {num_elements}; corrupt payload")
    return indices
