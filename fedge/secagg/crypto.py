"""Thin wrappers over ``cryptography`` for SecAgg+: X25519, HKDF-SHA256, AES-GCM, AES-CTR.

One primitive per function, no home-made cipher. The protocol is Bell, Bonawitz, Gascón,
Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020 (SecAgg+); the choices follow Google's ``fcp/secagg``: Diffie-Hellman key
agreement per pair of neighbours, an authenticated cipher for the Shamir shares that
travel through the server, and AES in counter mode to expand a 256-bit seed into a mask.

Randomness is always the caller's: key secrets, nonces and seeds are passed in as bytes
(production draws them with ``fedge.rng.OsSecretSource().random_bytes(n)``; tests with
``SeededSecretSource``), so nothing here touches a global random state.
"""

from __future__ import annotations

import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedge.secagg.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_PRG_BITS = 62

# HKDF ``info`` strings: one per purpose, so a key agreed for share encryption can never
# double as a mask seed (the two come from different key pairs anyway; this is defence in depth).
INFO_SHARE_KEY = b"fedge/secagg/v1/share-encryption-key"
INFO_MASK_SEED = b"fedge/secagg/v1/pairwise-mask-seed"
INFO_SEED_COMMITMENT = b"fedge/secagg/v1/self-mask-commitment"
COMMITMENT_BYTES = 32

# associated_data layout: magic, server_round (u32), stage (u32), sender (u64), receiver (u64),
# little-endian, 28 bytes. Sender and receiver are u64 so they can carry Flower node ids.
AD_MAGIC = b"FSA1"
_AD = struct.Struct("<4sIIQQ")
AD_BYTES = _AD.size

# Curve25519 points of small order, in the encodings libsodium's ``has_small_order`` refuses
# (compared with the top bit of the last byte cleared): 0, 1, two points of order 8, p - 1,
# p and p + 1 (p = 2**255 - 19). Any of them forces the shared secret into a set of 8 values.
_SMALL_ORDER_POINTS = (
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    b"\xec" + b"\xff" * 30 + b"\x7f",
    b"\xed" + b"\xff" * 30 + b"\x7f",
    b"\xee" + b"\xff" * 30 + b"\x7f",
)


def _require_bytes(name: str, value: bytes, num_bytes: int) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != num_bytes:
        got = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise SecAggError(f"{name} must be {num_bytes} bytes, got {got}")


def private_key_from_secret(secret: bytes) -> X25519PrivateKey:
    """An X25519 private key from 32 secret bytes (RFC 7748 clamps them).

    Parameters
    ----------
    secret : bytes
        32 bytes from a secret source, fresh per key and per round.

    Returns
    -------
    X25519PrivateKey

    Raises
    ------
    SecAggError
        If ``secret`` is not 32 bytes.
    """
    _require_bytes("an X25519 secret", secret, KEY_BYTES)
    return X25519PrivateKey.from_private_bytes(bytes(secret))


def public_key_bytes(private_key: X25519PrivateKey) -> bytes:
    """The 32-byte raw (RFC 7748) encoding of ``private_key``'s public key."""
    return private_key.public_key().public_bytes_raw()


def public_key_from_bytes(data: bytes) -> X25519PublicKey:
    """Parse a peer's 32-byte X25519 public key, refusing points of small order.

    Parameters
    ----------
    data : bytes
        The raw encoding a peer sent.

    Returns
    -------
    X25519PublicKey

    Raises
    ------
    SecAggError
        If ``data`` is not 32 bytes or encodes a point of small order (whose shared secret an
        attacker could predict).
    """
    _require_bytes("an X25519 public key", data, KEY_BYTES)
    canonical = bytes(data[:31]) + bytes([data[31] & 0x7F])
    if canonical in _SMALL_ORDER_POINTS:
        raise SecAggError("the X25519 public key is a point of small order; the peer must send a fresh key")
    return X25519PublicKey.from_public_bytes(bytes(data))


def agree(private_key: X25519PrivateKey, peer_public_key: X25519PublicKey, info: bytes) -> bytes:
    """A 32-byte key shared with a peer: X25519, then HKDF-SHA256 (no salt) with ``info``.

    Parameters
    ----------
    private_key : X25519PrivateKey
        Our key for this purpose and round.
    peer_public_key : X25519PublicKey
        The peer's key, parsed with :func:`public_key_from_bytes`.
    info : bytes
        The purpose, :data:`INFO_SHARE_KEY` or :data:`INFO_MASK_SEED`.

    Returns
    -------
    bytes
        32 bytes; ``agree(a, B, info) == agree(b, A, info)``.

    Raises
    ------
    SecAggError
        If the raw X25519 output is all zeros (a small-order peer key).
    """
    try:
        raw = private_key.exchange(peer_public_key)
    except ValueError:  # OpenSSL refuses an all-zero shared secret
        raise SecAggError("X25519 gave an all-zero shared secret; the peer key is invalid") from None
    if raw == bytes(KEY_BYTES):
        raise SecAggError("X25519 gave an all-zero shared secret; the peer key is invalid")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(raw)


def associated_data(sender: int, receiver: int, server_round: int, stage: int) -> bytes:
    """The AES-GCM associated data binding a share to who sent it, to whom, when and why.

    Layout (28 bytes, little-endian): ``b"FSA1"``, ``server_round`` u32, ``stage`` u32,
    ``sender`` u64, ``receiver`` u64. A share replayed into another round, stage or
    receiver fails authentication.

    Raises
    ------
    SecAggError
        If a field does not fit its width.
    """
    for name, value, bits in (
        ("server_round", server_round, 32),
        ("stage", stage, 32),
        ("sender", sender, 64),
        ("receiver", receiver, 64),
    ):
        if not 0 <= value < 1 << bits:
            raise SecAggError(f"{name} must be in 0..2**{bits} - 1, got {value}")
    return _AD.pack(AD_MAGIC, server_round, stage, sender, receiver)


def commit_seed(seed: bytes, server_round: int, position: int) -> bytes:
    """SHA-256 commitment to a self-mask seed.

    ``SHA-256(INFO_SEED_COMMITMENT || server_round u32 LE || position u32 LE || seed)``.

    A client sends it with its shares, so the server can check the seed it rebuilds from
    ``t`` shares: a holder that altered its share makes the round abort instead of giving a
    wrong sum. The seed is 256 uniform bits, so the digest reveals nothing usable about it.
    """
    _require_bytes("a self-mask seed", seed, KEY_BYTES)
    if not (0 <= server_round < 1 << 32 and 0 <= position < 1 << 32):
        raise SecAggError("server_round and position must fit 32 bits")
    digest = hashes.Hash(hashes.SHA256())
    digest.update(INFO_SEED_COMMITMENT + struct.pack("<II", server_round, position) + bytes(seed))
    return digest.finalize()


def encrypt_share(key: bytes, plaintext: bytes, associated_data: bytes, nonce: bytes) -> bytes:
    """AES-256-GCM: ``nonce (12 bytes) || ciphertext || tag (16 bytes)``.

    Parameters
    ----------
    key : bytes
        32 bytes from :func:`agree` with :data:`INFO_SHARE_KEY`.
    plaintext : bytes
        The encoded shares for one receiver.
    associated_data : bytes
        From :func:`associated_data`; authenticated, not sent.
    nonce : bytes
        12 bytes from the caller's secret source, never reused under one key.

    Returns
    -------
    bytes
        ``len(plaintext) + 28`` bytes.
    """
    _require_bytes("an AES-GCM key", key, KEY_BYTES)
    _require_bytes("an AES-GCM nonce", nonce, NONCE_BYTES)
    return bytes(nonce) + AESGCM(bytes(key)).encrypt(bytes(nonce), plaintext, associated_data)


def decrypt_share(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt_share`.

    Raises
    ------
    SecAggError
        If the message is truncated or fails authentication (tampered, wrong key, or wrong
        sender, receiver, round or stage in ``associated_data``).
    """
    _require_bytes("an AES-GCM key", key, KEY_BYTES)
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(
            f"an encrypted share must be at least {NONCE_BYTES + TAG_BYTES} bytes, got {len(ciphertext)}"
        )
    nonce, body = bytes(ciphertext[:NONCE_BYTES]), bytes(ciphertext[NONCE_BYTES:])
    try:
        return AESGCM(bytes(key)).decrypt(nonce, body, associated_data)
    except InvalidTag:
        raise SecAggError(
            "an encrypted share failed authentication (tampered, or meant for another sender, "
            "receiver, round or stage)"
        ) from None


def word_dtype(num_bits: int) -> np.dtype:
    """The narrowest little-endian unsigned word of 1, 2, 4 or 8 bytes holding ``num_bits``."""
    for width in (1, 2, 4, 8):
        if num_bits <= 8 * width:
            return np.dtype(f"<u{width}")
    raise AssertionError("unreachable: num_bits <= 62")


def prg_field(seed: bytes, num_elements: int, num_bits: int) -> np.ndarray:
    """Expand a 256-bit seed into ``num_elements`` uniform values in ``[0, 2**num_bits)``.

    AES-256 in counter mode, keyed by the full 32-byte seed, with an all-zero initial counter
    block: each seed (a self-mask seed ``b_u`` or a pairwise seed ``s_uv``, fresh per round)
    keys exactly one stream, so the (key, nonce) pair never repeats. This is FCP's
    ``AesCtrPrngFactory`` construction (Bell et al., CCS 2020, use a PRG; SecAgg+ in Flower
    folds the seed to 32 bits and uses MT19937, which is neither secret nor full-strength).

    The keystream is read as little-endian words of the narrowest width in 1, 2, 4 or 8 bytes
    that holds ``num_bits`` (so 8-bit levels over 100 clients, ``num_bits = 15``, read 2 bytes
    per element), and each word is masked to its low ``num_bits`` bits: a uniform word's low
    bits are uniform, so no rejection is needed (the modulus is a power of two).

    Parameters
    ----------
    seed : bytes
        32 secret bytes, used for this one stream only.
    num_elements : int
        Length of the mask (>= 0).
    num_bits : int
        Bits of the modulus ``2**num_bits``, 1..62.

    Returns
    -------
    ndarray of uint64, shape (num_elements,)

    Raises
    ------
    SecAggError
        On a seed that is not 32 bytes or a parameter out of range.
    """
    words = prg_words(seed, num_elements, num_bits).astype(np.uint64)
    words &= np.uint64((1 << num_bits) - 1)
    return words


def prg_words(seed: bytes, num_elements: int, num_bits: int) -> np.ndarray:
    """The raw keystream words behind :func:`prg_field`, not yet reduced mod ``2**num_bits``.

    Same stream and word width as :func:`prg_field` (uint8, uint16, uint32 or uint64, the
    narrowest holding ``num_bits``). Because ``2**num_bits`` divides ``2**width``, sums of
    these words that wrap at the word width are still exact mod ``2**num_bits``: masking
    accumulates in the narrow type and reduces once (a quarter of the memory traffic of
    uint64 for 15-bit moduli).

    Raises
    ------
    SecAggError
        As :func:`prg_field`.
    """
    _require_bytes("a PRG seed", seed, KEY_BYTES)
    if num_elements < 0:
        raise SecAggError(f"num_elements must be >= 0, got {num_elements}")
    if not 1 <= num_bits <= MAX_PRG_BITS:
        raise SecAggError(f"num_bits must be in 1..{MAX_PRG_BITS}, got {num_bits}")
    dtype = word_dtype(num_bits)
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(num_elements * dtype.itemsize)) + encryptor.finalize()
    # A writable native-order copy, so callers may accumulate into it.
    return np.frombuffer(stream, dtype=dtype).astype(dtype.newbyteorder("="))
