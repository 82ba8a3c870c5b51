"""Shamir secret sharing of a 32-byte secret over GF(2**521 - 1).

SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, CCS 2020) has each client share its
self-mask seed ``b_u`` and its mask-agreement secret key among its neighbours with threshold
``t``; Google's ``fcp/secagg`` does the same (``ShamirSecretSharing``, over a prime field).

Flower's implementation (``flwr.common.secure_aggregation.crypto.shamir``) is not used:

- it wraps pycryptodome's ``Shamir`` (GF(2**128) per 16-byte chunk), a dependency fedge does
  not otherwise need, and ``fedge.secagg`` may not import Flower;
- pycryptodome draws the polynomial coefficients from its own ``get_random_bytes``, so the
  caller's secret source cannot be injected and tests cannot replay a sharing;
- it PKCS#7-pads a 32-byte secret to 48 bytes (three chunks, 52-byte shares with the index)
  and runs a thread pool per call.

Here the whole 256-bit secret is one element of the Mersenne-prime field
``p = 2**521 - 1`` (so no chunking), the polynomial ``f(x) = secret + a_1 x + ... +
a_{t-1} x^{t-1}`` has coefficients uniform in ``[0, p)`` drawn from the caller's bytes, share
``i`` (1-based) is ``f(i)``, and :func:`reconstruct` is Lagrange interpolation at 0. Any
``t - 1`` shares are independent of the secret (perfect secrecy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedge.secagg.errors import SecAggError

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
VALUE_BYTES = 66  # ceil(521 / 8)
INDEX_BYTES = 4
SHARE_BYTES = INDEX_BYTES + VALUE_BYTES
MAX_SHARES = (1 << 16) - 1


@dataclass(frozen=True)
class Share:
    """One point ``(index, f(index))`` of the sharing polynomial; ``index`` in ``1..n``."""

    index: int
    value: int


def _random_field_element(random_bytes: Callable[[int], bytes]) -> int:
    # Rejection sampling keeps the draw exactly uniform on [0, p): 521 bits are read and the
    # single value p = 2**521 - 1 is redrawn (probability 2**-521).
    while True:
        value = int.from_bytes(random_bytes(VALUE_BYTES), "little") & PRIME
        if value < PRIME:
            return value


def share(
    secret: bytes,
    threshold: int,
    num_shares: int,
    random_bytes: Callable[[int], bytes],
    indices: Sequence[int] | None = None,
) -> list[Share]:
    """Split ``secret`` into ``num_shares`` shares, any ``threshold`` of which rebuild it.

    Parameters
    ----------
    secret : bytes
        32 bytes (a seed or an X25519 private key).
    threshold : int
        ``t``, 1..num_shares.
    num_shares : int
        ``n``, 1..65535; shares get indices ``1..n``.
    random_bytes : callable
        ``random_bytes(num_bytes) -> bytes``, a secret source
        (``fedge.rng.OsSecretSource().random_bytes`` in production).
    indices : sequence of int, optional
        Evaluate at these ``num_shares`` distinct points in ``1..65535`` instead of
        ``1..n`` (SecAgg+: a client's share for the neighbour at graph position ``v`` is
        ``f(v + 1)``, so the server can rebuild from any ``t`` holders).

    Returns
    -------
    list of Share
        ``[Share(i, f(i)) for i in indices]`` (default ``1..n``).

    Raises
    ------
    SecAggError
        On a secret that is not 32 bytes or ``not 1 <= threshold <= num_shares <= 65535``.
    """
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
        raise SecAggError(f"a Shamir secret must be {SECRET_BYTES} bytes")
    if not 1 <= num_shares <= MAX_SHARES:
        raise SecAggError(f"num_shares must be in 1..{MAX_SHARES}, got {num_shares}")
    if not 1 <= threshold <= num_shares:
        raise SecAggError(f"threshold must be in 1..num_shares={num_shares}, got {threshold}")
    points = list(range(1, num_shares + 1)) if indices is None else [int(i) for i in indices]
    if len(points) != num_shares or len(set(points)) != num_shares:
        raise SecAggError(f"indices must be {num_shares} distinct points, got {len(points)}")
    if any(not 1 <= x <= MAX_SHARES for x in points):
        raise SecAggError(f"share indices must be in 1..{MAX_SHARES}")
    coefficients = [int.from_bytes(secret, "little")]
    coefficients += [_random_field_element(random_bytes) for _ in range(threshold - 1)]
    shares = []
    for x in points:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares.append(Share(x, y))
    return shares


def reconstruct(shares: Sequence[Share], threshold: int) -> bytes:
    """Rebuild the secret from at least ``threshold`` shares (Lagrange interpolation at 0).

    ``secret = sum_i y_i * prod_{j != i} x_j / (x_j - x_i)  (mod p)`` over the first
    ``threshold`` shares given.

    Parameters
    ----------
    shares : sequence of Share
        Distinct indices in ``1..65535``, values in ``[0, p)``.
    threshold : int
        ``t`` the sharing used.

    Returns
    -------
    bytes
        The 32-byte secret.

    Raises
    ------
    SecAggError
        On fewer than ``threshold`` shares, a duplicate or out-of-range index or value, or a
        result that is not a 32-byte secret (shares that do not belong together).
    """
    if threshold < 1:
        raise SecAggError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise SecAggError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    indices = [s.index for s in shares]
    if len(set(indices)) != len(indices):
        raise SecAggError("duplicate share index; each holder's share may be used once")
    for s in shares:
        if not 1 <= s.index <= MAX_SHARES:
            raise SecAggError(f"share index must be in 1..{MAX_SHARES}, got {s.index}")
        if not 0 <= s.value < PRIME:
            raise SecAggError("share value is not an element of GF(2**521 - 1)")
    used = shares[:threshold]
    secret = 0
    for i, share_i in enumerate(used):
        x_i = share_i.index
        numerator, denominator = 1, 1
        for j, share_j in enumerate(used):
            x_j = share_j.index
            if j != i:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        secret = (secret + share_i.value * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise SecAggError("the shares do not reconstruct a 32-byte secret (mixed or corrupted shares)")
    return secret.to_bytes(SECRET_BYTES, "little")


def encode_share(item: Share) -> bytes:
    """``index`` (u32 little-endian) then ``value`` (66 bytes little-endian): 70 bytes."""
    return item.index.to_bytes(INDEX_BYTES, "little") + item.value.to_bytes(VALUE_BYTES, "little")


def decode_share(data: bytes) -> Share:
    """Inverse of :func:`encode_share`.

    Raises
    ------
    SecAggError
        On a length other than 70 bytes, an index outside ``1..65535`` or a value ``>= p``.
    """
    if len(data) != SHARE_BYTES:
        raise SecAggError(f"an encoded share must be {SHARE_BYTES} bytes, got {len(data)}")
    index = int.from_bytes(data[:INDEX_BYTES], "little")
    value = int.from_bytes(data[INDEX_BYTES:], "little")
    if not 1 <= index <= MAX_SHARES:
        raise SecAggError(f"share index must be in 1..{MAX_SHARES}, got {index}")
    if value >= PRIME:
        raise SecAggError("share value is not an element of GF(2**521 - 1)")
    return Share(index, value)
