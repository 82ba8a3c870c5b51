"""fedge.secagg.crypto: X25519 agreement, key validation, AES-GCM shares, the AES-CTR PRG."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedge.rng import SeededSecretSource
from fedge.secagg.crypto import (
    _SMALL_ORDER_POINTS,
    INFO_MASK_SEED,
    INFO_SHARE_KEY,
    agree,
    associated_data,
    decrypt_share,
    encrypt_share,
    prg_field,
    private_key_from_secret,
    public_key_bytes,
    public_key_from_bytes,
)
from fedge.secagg.errors import SecAggError


def _source(seed: int) -> SeededSecretSource:
    return SeededSecretSource(np.random.default_rng(seed))


def test_agreement_is_symmetric_and_separated_by_purpose() -> None:
    source = _source(1)
    alice = private_key_from_secret(source.random_bytes(32))
    bob = private_key_from_secret(source.random_bytes(32))
    alice_pub = public_key_from_bytes(public_key_bytes(alice))
    bob_pub = public_key_from_bytes(public_key_bytes(bob))
    key_ab = agree(alice, bob_pub, INFO_SHARE_KEY)
    assert key_ab == agree(bob, alice_pub, INFO_SHARE_KEY)
    assert len(key_ab) == 32
    assert agree(alice, bob_pub, INFO_MASK_SEED) != key_ab
    carol = private_key_from_secret(source.random_bytes(32))
    assert agree(carol, bob_pub, INFO_SHARE_KEY) != key_ab


def test_same_secret_gives_same_key_pair() -> None:
    secret = _source(2).random_bytes(32)
    assert public_key_bytes(private_key_from_secret(secret)) == public_key_bytes(
        private_key_from_secret(secret)
    )


@pytest.mark.parametrize("length", [0, 31, 33])
def test_wrong_length_keys_are_refused(length: int) -> None:
    with pytest.raises(SecAggError, match="32 bytes"):
        public_key_from_bytes(bytes(length))
    with pytest.raises(SecAggError, match="32 bytes"):
        private_key_from_secret(bytes(length))


@pytest.mark.parametrize("point", _SMALL_ORDER_POINTS)
@pytest.mark.parametrize("top_bit", [False, True])
def test_small_order_public_keys_are_refused(point: bytes, top_bit: bool) -> None:
    encoded = point[:31] + bytes([point[31] | 0x80]) if top_bit else point
    with pytest.raises(SecAggError, match="small order"):
        public_key_from_bytes(encoded)


@pytest.mark.parametrize("point", _SMALL_ORDER_POINTS)
def test_listed_points_really_force_a_zero_secret(point: bytes) -> None:
    # The block list is right: each point, bypassing validation, makes agreement fail.
    private = private_key_from_secret(_source(3).random_bytes(32))
    with pytest.raises(SecAggError, match="all-zero"):
        agree(private, X25519PublicKey.from_public_bytes(point), INFO_SHARE_KEY)


def test_associated_data_layout() -> None:
    ad = associated_data(sender=7, receiver=2**64 - 1, server_round=3, stage=2)
    expected = b"FSA1" + (3).to_bytes(4, "little") + (2).to_bytes(4, "little")
    expected += (7).to_bytes(8, "little") + (2**64 - 1).to_bytes(8, "little")
    assert ad == expected and len(ad) == 28
    with pytest.raises(SecAggError, match="sender"):
        associated_data(sender=-1, receiver=0, server_round=1, stage=0)
    with pytest.raises(SecAggError, match="server_round"):
        associated_data(sender=0, receiver=0, server_round=2**32, stage=0)


def test_share_encryption_round_trip_and_tamper() -> None:
    source = _source(4)
    key = source.random_bytes(32)
    ad = associated_data(1, 2, 5, 1)
    plaintext = b"shares of b_u and s_u^SK"
    blob = encrypt_share(key, plaintext, ad, source.random_bytes(12))
    assert len(blob) == len(plaintext) + 12 + 16
    assert decrypt_share(key, blob, ad) == plaintext
    for position in (0, 12, len(blob) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(SecAggError, match="authentication"):
            decrypt_share(key, bytes(tampered), ad)
    tampered_ad = bytearray(ad)
    tampered_ad[-1] ^= 0x01
    with pytest.raises(SecAggError, match="authentication"):
        decrypt_share(key, blob, bytes(tampered_ad))
    for wrong in (associated_data(1, 3, 5, 1), associated_data(1, 2, 6, 1), associated_data(1, 2, 5, 2)):
        with pytest.raises(SecAggError, match="authentication"):
            decrypt_share(key, blob, wrong)
    with pytest.raises(SecAggError, match="authentication"):
        decrypt_share(source.random_bytes(32), blob, ad)
    with pytest.raises(SecAggError, match="at least 28"):
        decrypt_share(key, blob[:27], ad)
    with pytest.raises(SecAggError, match="nonce"):
        encrypt_share(key, plaintext, ad, bytes(11))


def _reference_prg(seed: bytes, num_elements: int, num_bits: int) -> np.ndarray:
    """Slow and obvious: AES-256-ECB of the big-endian counter blocks 0, 1, 2, ..."""
    width = next(w for w in (1, 2, 4, 8) if num_bits <= 8 * w)
    num_blocks = -(-num_elements * width // 16)
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    stream = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(num_blocks))
    words = [
        int.from_bytes(stream[i * width : (i + 1) * width], "little") % 2**num_bits
        for i in range(num_elements)
    ]
    return np.array(words, dtype=np.uint64)


@pytest.mark.parametrize("num_bits", [1, 7, 8, 9, 15, 16, 17, 32, 33, 62])
def test_prg_matches_counter_mode_reference(num_bits: int) -> None:
    seed = _source(num_bits).random_bytes(32)
    out = prg_field(seed, 37, num_bits)
    assert out.dtype == np.uint64
    np.testing.assert_array_equal(out, _reference_prg(seed, 37, num_bits))
    assert int(out.max()) < 2**num_bits


def test_prg_is_a_deterministic_stream_per_seed() -> None:
    source = _source(5)
    seed, other = source.random_bytes(32), source.random_bytes(32)
    np.testing.assert_array_equal(prg_field(seed, 10, 20), prg_field(seed, 1000, 20)[:10])
    assert not np.array_equal(prg_field(seed, 100, 20), prg_field(other, 100, 20))
    assert prg_field(seed, 0, 20).shape == (0,)


def test_prg_is_uniform() -> None:
    # Chi-square over 16 buckets (the top 4 of 15 bits) of 160000 draws: chi2(15) > 60 has
    # probability 2.5e-7, so this fixed seed passes unless the PRG is biased.
    values = prg_field(_source(6).random_bytes(32), 160_000, 15)
    counts = np.bincount((values >> np.uint64(11)).astype(np.int64), minlength=16)
    expected = values.size / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 60


@pytest.mark.parametrize(("num_elements", "num_bits"), [(-1, 8), (4, 0), (4, 63)])
def test_prg_refuses_bad_parameters(num_elements: int, num_bits: int) -> None:
    with pytest.raises(SecAggError):
        prg_field(bytes(32), num_elements, num_bits)
    with pytest.raises(SecAggError, match="32 bytes"):
        prg_field(bytes(16), 4, 8)
