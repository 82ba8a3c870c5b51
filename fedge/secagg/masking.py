"""SecAgg+ masking arithmetic mod ``2**num_bits``, and the bit packing of masked vectors.

Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020: client ``u`` at graph position ``u`` sends

    y_u = x_u + PRG(b_u) + sum_{v in N(u)} sign(u, v) * PRG(s_uv)   (mod 2**m),
    sign(u, v) = +1 if u < v else -1,

so over the survivors ``S`` the pairwise masks between two survivors cancel, and the
server, once it has rebuilt ``b_u`` for each survivor and ``s_uv`` for each survivor ``u``
with a dropped neighbour ``v``, recovers ``sum_{u in S} x_u`` exactly. ``PRG`` is
:func:`fedge.secagg.crypto.prg_field` (AES-256-CTR, as in Google's ``fcp/secagg``). The
modulus is a power of two, so uint64 arithmetic, which wraps mod ``2**64``, is exact mod
``2**m`` after a final mask (``m <= 62``).

Masked vectors travel bit-packed at exactly ``m`` bits per element (FCP packs at
``ceil(log2 modulus)`` bits too; Flower sends int64).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedge.secagg.crypto import MAX_PRG_BITS, prg_words, word_dtype
from fedge.secagg.errors import SecAggError

U64 = np.uint64


def sum_bits(num_clients: int, level_bits: int, headroom_bits: int = 0) -> int:
    """Bits ``m`` of the modulus ``2**m`` under which a sum of levels never wraps.

    ``m = bit_length(n * (2**b - 1)) + headroom_bits = ceil(log2(n * (2**b - 1) + 1)) +
    headroom_bits``: the largest sum ``n * (2**b - 1)`` of ``n`` clients' ``b``-bit levels is
    then below ``2**m``, so the unmasked sum mod ``2**m`` is the true sum. (The issue writes
    ``ceil(log2(n * (2**b - 1)))``; it is one bit short exactly when ``n * (2**b - 1)`` is a
    power of two, e.g. ``n = 2, b = 1``.) It is at most ``b + ceil(log2 n)``, the bound
    :func:`fedge.compression.secagg_sum_bits` uses, so a modulus from either never wraps.
    ``headroom_bits`` (default 0: none is needed for correctness) is for a caller that adds
    more to the field than ``n`` levels per element, e.g. a weight element.

    Parameters
    ----------
    num_clients : int
        ``n >= 1``, clients in the sum.
    level_bits : int
        ``b``, 1..61, bits per quantized level.
    headroom_bits : int, default 0
        Extra bits on top (>= 0).

    Raises
    ------
    SecAggError
        On an argument out of range, or ``m > 62``.
    """
    if num_clients < 1:
        raise SecAggError(f"num_clients must be >= 1, got {num_clients}")
    if not 1 <= level_bits <= MAX_PRG_BITS - 1:
        raise SecAggError(f"level_bits must be in 1..{MAX_PRG_BITS - 1}, got {level_bits}")
    if headroom_bits < 0:
        raise SecAggError(f"headroom_bits must be >= 0, got {headroom_bits}")
    bits = (num_clients * ((1 << level_bits) - 1)).bit_length() + headroom_bits
    if bits > MAX_PRG_BITS:
        raise SecAggError(f"the modulus needs {bits} bits, more than {MAX_PRG_BITS}: use fewer level bits")
    return bits


def _check_bits(num_bits: int) -> np.uint64:
    if not 1 <= num_bits <= MAX_PRG_BITS:
        raise SecAggError(f"num_bits must be in 1..{MAX_PRG_BITS}, got {num_bits}")
    return U64((1 << num_bits) - 1)


def _as_field(values: np.ndarray, num_bits: int, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise SecAggError(f"{name} must be a 1-D integer array, got {array.dtype} of shape {array.shape}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= 1 << num_bits):
        raise SecAggError(f"{name} must lie in [0, 2**{num_bits}); quantize to fewer bits or raise num_bits")
    return array  # checked, not converted: every caller copies before it writes


def mask(
    levels: np.ndarray,
    self_seed: bytes,
    pair_seeds: Mapping[int, bytes],
    own_position: int,
    num_bits: int,
) -> np.ndarray:
    """Mask one client's levels: ``y = x + PRG(b_u) + sum_v sign(u, v) PRG(s_uv) mod 2**m``.

    Parameters
    ----------
    levels : ndarray of unsigned integers, shape (d,)
        ``x_u``, each in ``[0, 2**num_bits)``.
    self_seed : bytes
        ``b_u``, 32 secret bytes, fresh per round.
    pair_seeds : mapping of int to bytes
        Neighbour position ``v`` -> 32-byte ``s_uv`` (agreed with
        :data:`fedge.secagg.crypto.INFO_MASK_SEED`).
    own_position : int
        ``u``, this client's graph position (never a key of ``pair_seeds``).
    num_bits : int
        ``m``, 1..62, from :func:`sum_bits`.

    Returns
    -------
    ndarray of unsigned integers, shape (d,)
        ``y_u`` in ``[0, 2**m)``, a new array, in the narrowest word that holds ``m`` bits
        (:func:`fedge.secagg.crypto.word_dtype`: uint16 for ``m = 15``), as :func:`pack` takes it.

    Raises
    ------
    SecAggError
        On levels out of range, a bad seed, or ``own_position`` among the neighbours.
    """
    modulus_mask = _check_bits(num_bits)
    # Accumulate in the PRG's narrow word type: its wrap-around is exact mod 2**num_bits.
    y = _as_field(levels, num_bits, "levels").astype(word_dtype(num_bits).newbyteorder("="))
    if own_position in pair_seeds:
        raise SecAggError(f"position {own_position} cannot be its own neighbour")
    y += prg_words(self_seed, y.size, num_bits)
    for neighbor, seed in pair_seeds.items():
        if neighbor > own_position:
            y += prg_words(seed, y.size, num_bits)
        else:
            y -= prg_words(seed, y.size, num_bits)
    y &= y.dtype.type(int(modulus_mask))
    return y


def unmask_sum(
    masked_sum: np.ndarray,
    survivor_self_seeds: Iterable[bytes],
    dropped_pair_seeds: Mapping[tuple[int, int], bytes],
    num_bits: int,
) -> np.ndarray:
    """Remove the masks from the sum of the survivors' masked vectors.

    ``sum_x = sum_y - sum_{u in S} PRG(b_u) - sum_{(u, v)} sign(u, v) PRG(s_uv) mod 2**m``,
    over survivors ``u`` and their dropped neighbours ``v``: the masks a survivor added
    toward a client whose vector is missing from the sum.

    Parameters
    ----------
    masked_sum : ndarray of uint64, shape (d,)
        ``sum_{u in S} y_u``, reduced mod ``2**m`` or not: a uint64 sum wraps mod ``2**64``,
        which ``2**m`` divides, so the server may just add the unpacked vectors.
    survivor_self_seeds : iterable of bytes
        The reconstructed ``b_u`` of every survivor in the sum.
    dropped_pair_seeds : mapping of (int, int) to bytes
        ``(survivor position u, dropped position v) -> s_uv``, for every graph edge between a
        survivor and a dropped client (``s_uv`` recomputed from ``v``'s reconstructed key).
    num_bits : int
        ``m``, as in :func:`mask`.

    Returns
    -------
    ndarray of uint64, shape (d,)
        ``sum_{u in S} x_u``, exact while that sum is below ``2**m``.
    """
    modulus_mask = _check_bits(num_bits)
    array = np.asarray(masked_sum)
    if array.ndim != 1 or array.dtype != U64:
        raise SecAggError(f"masked_sum must be a 1-D uint64 array, got {array.dtype} of shape {array.shape}")
    # A narrow copy (the caller's array is never modified); wrapping stays exact mod 2**m.
    total = (array & modulus_mask).astype(word_dtype(num_bits).newbyteorder("="))
    for seed in survivor_self_seeds:
        total -= prg_words(seed, total.size, num_bits)
    for (survivor, dropped), seed in dropped_pair_seeds.items():
        if survivor == dropped:
            raise SecAggError(f"position {survivor} cannot be its own neighbour")
        if dropped > survivor:
            total -= prg_words(seed, total.size, num_bits)
        else:
            total += prg_words(seed, total.size, num_bits)
    out = total.astype(U64)
    out &= modulus_mask
    return out


def packed_bytes(num_elements: int, num_bits: int) -> int:
    """``ceil(num_elements * num_bits / 8)``, the length :func:`pack` returns."""
    return (num_elements * num_bits + 7) // 8


def _word(num_bits: int) -> tuple[type[np.unsignedinteger], int]:
    """The packing word: uint32 for ``m <= 32`` (half the memory traffic), else uint64."""
    return (np.uint32, 32) if num_bits <= 32 else (np.uint64, 64)


def _layout(num_bits: int, word_bits: int = 64) -> list[tuple[int, int, int, int]]:
    """For element ``j`` of a block of ``w`` (``w * m`` bits = ``m`` words of ``w`` bits):
    (j, word, shift, spill)."""
    layout = []
    for j in range(word_bits):
        offset = j * num_bits
        word, shift = divmod(offset, word_bits)
        layout.append((j, word, shift, shift + num_bits - word_bits))
    return layout


def pack(values: np.ndarray, num_bits: int) -> bytes:
    """Pack field elements at exactly ``num_bits`` bits each, little-endian bit order.

    Element ``i``'s bit ``j`` (bit 0 least significant) is bit ``i * num_bits + j`` of the
    stream, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``: the bytes are the
    little-endian encoding of ``sum_i values[i] << (i * num_bits)``, :func:`packed_bytes` of
    them. The last byte's unused high bits are zero. Example: ``[1, 2, 3, 4, 5]`` at 3 bits
    is ``0x58d1`` = ``d1 58``. (Blocks of 64 elements fill exactly ``num_bits`` uint64 words,
    so the loop runs 64 times over vectors of ``d / 64`` blocks.)

    Raises
    ------
    SecAggError
        On values outside ``[0, 2**num_bits)`` or a non-integer array.
    """
    _check_bits(num_bits)
    flat = _as_field(values, num_bits, "values")
    dtype, width = _word(num_bits)
    blocks = -(-flat.size // width)
    # Element j of every block is one contiguous row (a transposed layout), so each of the
    # ``width`` steps below is a streaming operation over ``blocks`` words.
    padded = np.zeros(blocks * width, dtype=dtype)
    padded[: flat.size] = flat
    elements = np.ascontiguousarray(padded.reshape(blocks, width).T)
    words = np.zeros((num_bits, blocks), dtype=dtype)
    scratch = np.empty(blocks, dtype=dtype)
    for j, word, shift, spill in _layout(num_bits, width):
        np.left_shift(elements[j], dtype(shift), out=scratch)
        words[word] |= scratch
        if spill > 0:
            np.right_shift(elements[j], dtype(width - shift), out=scratch)
            words[word + 1] |= scratch
    stream = np.ascontiguousarray(words.T).astype(np.dtype(dtype).newbyteorder("<"), copy=False)
    return stream.tobytes()[: packed_bytes(flat.size, num_bits)]


def unpack(data: bytes, num_elements: int, num_bits: int) -> np.ndarray:
    """Inverse of :func:`pack`.

    Returns
    -------
    ndarray of uint64, shape (num_elements,)

    Raises
    ------
    SecAggError
        If ``data`` is not :func:`packed_bytes` long or a padding bit is set.
    """
    modulus_mask = _check_bits(num_bits)
    if num_elements < 0:
        raise SecAggError(f"num_elements must be >= 0, got {num_elements}")
    expected = packed_bytes(num_elements, num_bits)
    if len(data) != expected:
        raise SecAggError(
            f"a packed vector of {num_elements} elements at {num_bits} bits is {expected} bytes, "
            f"got {len(data)}"
        )
    used_bits = num_elements * num_bits
    if used_bits % 8 and data[-1] >> (used_bits % 8):
        raise SecAggError("the packed vector's padding bits are not zero; it was not packed by fedge")
    dtype, width = _word(num_bits)
    blocks = -(-num_elements // width)
    raw = np.zeros(blocks * num_bits * (width // 8), dtype=np.uint8)
    raw[:expected] = np.frombuffer(data, dtype=np.uint8)
    words = np.ascontiguousarray(
        raw.view(np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=False).reshape(blocks, num_bits).T
    )
    elements = np.empty((width, blocks), dtype=dtype)
    scratch = np.empty(blocks, dtype=dtype)
    word_mask = dtype(int(modulus_mask))
    for j, word, shift, spill in _layout(num_bits, width):
        column = elements[j]
        np.right_shift(words[word], dtype(shift), out=column)
        if spill > 0:
            np.left_shift(words[word + 1], dtype(width - shift), out=scratch)
            column |= scratch
        column &= word_mask
    return np.ascontiguousarray(elements.T).reshape(-1)[:num_elements].astype(U64)
