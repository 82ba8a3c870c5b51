"""fedge.secagg.shamir: threshold sharing of 32-byte secrets over GF(2**521 - 1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedge.rng import SeededSecretSource
from fedge.secagg.errors import SecAggError
from fedge.secagg.shamir import (
    PRIME,
    SHARE_BYTES,
    Share,
    decode_share,
    encode_share,
    reconstruct,
    share,
)


def _source(seed: int) -> SeededSecretSource:
    return SeededSecretSource(np.random.default_rng(seed))


@pytest.mark.parametrize(("threshold", "num_shares"), [(1, 1), (1, 3), (2, 3), (3, 5), (5, 5)])
def test_any_threshold_shares_reconstruct(threshold: int, num_shares: int) -> None:
    source = _source(10 * threshold + num_shares)
    secret = source.random_bytes(32)
    shares = share(secret, threshold, num_shares, source.random_bytes)
    assert [s.index for s in shares] == list(range(1, num_shares + 1))
    for subset in itertools.permutations(shares, threshold):
        assert reconstruct(list(subset), threshold) == secret
    assert reconstruct(shares, threshold) == secret  # more than t is fine


def test_large_cohort_round_trip() -> None:
    source = _source(11)
    secret = source.random_bytes(32)
    shares = share(secret, 18, 34, source.random_bytes)
    order = np.random.default_rng(0).permutation(34)
    assert reconstruct([shares[i] for i in order[:18]], 18) == secret


def test_fewer_than_threshold_shares_give_something_else() -> None:
    source = _source(12)
    secret = source.random_bytes(32)
    shares = share(secret, 4, 6, source.random_bytes)
    for subset in itertools.combinations(shares, 3):
        try:
            rebuilt = reconstruct(list(subset), 3)
        except SecAggError:
            continue  # a field element >= 2**256: not a secret at all (the usual case)
        assert rebuilt != secret
    with pytest.raises(SecAggError, match="need 4 shares"):
        reconstruct(shares[:3], 4)


def test_closed_form_polynomial() -> None:
    # With a_1 = 1 the polynomial is f(x) = secret + x, so share i holds secret + i.
    secret = (1234567).to_bytes(32, "little")

    def fixed_bytes(num_bytes: int) -> bytes:
        return b"\x01" + bytes(num_bytes - 1)

    shares = share(secret, 2, 4, fixed_bytes)
    assert shares == [Share(i, 1234567 + i) for i in range(1, 5)]
    assert reconstruct([Share(4, 1234571), Share(2, 1234569)], 2) == secret


def test_threshold_one_shares_are_the_secret() -> None:
    secret = _source(13).random_bytes(32)
    assert all(s.value == int.from_bytes(secret, "little") for s in share(secret, 1, 3, bytes))


def test_bad_shares_are_refused() -> None:
    source = _source(14)
    shares = share(source.random_bytes(32), 2, 3, source.random_bytes)
    with pytest.raises(SecAggError, match="duplicate"):
        reconstruct([shares[0], shares[0]], 2)
    with pytest.raises(SecAggError, match="index"):
        reconstruct([Share(0, 5), shares[1]], 2)
    with pytest.raises(SecAggError, match="GF"):
        reconstruct([Share(1, PRIME), shares[1]], 2)


@pytest.mark.parametrize(
    ("threshold", "num_shares", "length"), [(0, 3, 32), (4, 3, 32), (1, 0, 32), (2, 3, 31)]
)
def test_bad_sharing_parameters_are_refused(threshold: int, num_shares: int, length: int) -> None:
    with pytest.raises(SecAggError):
        share(bytes(length), threshold, num_shares, _source(15).random_bytes)


def test_share_encoding_round_trip_and_refusals() -> None:
    source = _source(16)
    for item in share(source.random_bytes(32), 3, 5, source.random_bytes):
        data = encode_share(item)
        assert len(data) == SHARE_BYTES == 70
        assert data[:4] == item.index.to_bytes(4, "little")
        assert decode_share(data) == item
    with pytest.raises(SecAggError, match="70 bytes"):
        decode_share(bytes(69))
    with pytest.raises(SecAggError, match="index"):
        decode_share(bytes(70))
    with pytest.raises(SecAggError, match="GF"):
        decode_share((1).to_bytes(4, "little") + PRIME.to_bytes(66, "little"))
