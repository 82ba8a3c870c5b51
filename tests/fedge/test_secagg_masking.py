"""fedge.secagg.masking: masks mod 2**m, unmasking after dropouts, bit packing, the modulus.

The cohort test runs the SecAgg+ math end to end with every primitive of fedge.secagg (X25519
mask keys, Shamir shares of b_u and of the mask key among Harary neighbours, AES-CTR masks)
and checks that the unmasked sum equals the plain sum of the quantized inputs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedge.rng import SeededSecretSource
from fedge.secagg.crypto import (
    INFO_MASK_SEED,
    agree,
    prg_field,
    prg_words,
    private_key_from_secret,
    public_key_bytes,
    public_key_from_bytes,
)
from fedge.secagg.errors import SecAggError
from fedge.secagg.graph import find_graph_parameters, harary_graph
from fedge.secagg.masking import mask, pack, packed_bytes, sum_bits, unmask_sum, unpack
from fedge.secagg.shamir import Share, reconstruct, share


@dataclass
class _Client:
    position: int
    key_secret: bytes
    key: X25519PrivateKey
    self_seed: bytes
    levels: np.ndarray


def _run_cohort(
    num_clients: int, level_bits: int, dim: int, num_dropped: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One round: returns (unmasked sum, plain sum of the survivors' levels)."""
    source = SeededSecretSource(np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    params = find_graph_parameters(num_clients, num_dropped / num_clients)
    graph = harary_graph(params.degree, num_clients)
    num_bits = sum_bits(num_clients, level_bits)
    clients = []
    for u in range(num_clients):
        secret = source.random_bytes(32)
        clients.append(
            _Client(
                u,
                secret,
                private_key_from_secret(secret),
                source.random_bytes(32),
                rng.integers(0, 2**level_bits, dim, dtype=np.uint64),
            )
        )
    public = {c.position: public_key_from_bytes(public_key_bytes(c.key)) for c in clients}
    # Share b_u and the mask key among u's neighbours: neighbour graph[u][i] holds share i + 1.
    held: dict[tuple[int, int], tuple[Share, Share]] = {}
    for c in clients:
        neighbors = graph[c.position]
        self_shares = share(c.self_seed, params.threshold, len(neighbors), source.random_bytes)
        key_shares = share(c.key_secret, params.threshold, len(neighbors), source.random_bytes)
        for holder, s_b, s_k in zip(neighbors, self_shares, key_shares, strict=True):
            held[(holder, c.position)] = (s_b, s_k)
    masked = {}
    for c in clients:
        pair_seeds = {v: agree(c.key, public[v], INFO_MASK_SEED) for v in graph[c.position]}
        y = mask(c.levels, c.self_seed, pair_seeds, c.position, num_bits)
        masked[c.position] = unpack(pack(y, num_bits), dim, num_bits)  # over the wire
    dropped = set(rng.choice(num_clients, size=num_dropped, replace=False).tolist())
    survivors = [u for u in range(num_clients) if u not in dropped]
    total = np.zeros(dim, dtype=np.uint64)
    for u in survivors:
        total += masked[u]
    # Survivors reveal b shares for surviving neighbours and key shares for dropped ones.
    self_seeds = []
    for u in survivors:
        shares = [held[(h, u)][0] for h in graph[u] if h not in dropped]
        self_seeds.append(reconstruct(shares, params.threshold))
    pair = {}
    for v in sorted(dropped):
        shares = [held[(h, v)][1] for h in graph[v] if h not in dropped]
        key_v = private_key_from_secret(reconstruct(shares, params.threshold))
        for u in graph[v]:
            if u not in dropped:
                pair[(u, v)] = agree(key_v, public[u], INFO_MASK_SEED)
    result = unmask_sum(total, self_seeds, pair, num_bits)
    plain = np.asarray(np.sum([clients[u].levels for u in survivors], axis=0, dtype=np.uint64))
    return result, plain


@pytest.mark.parametrize(
    ("num_clients", "level_bits", "num_dropped", "seed"),
    [(3, 1, 0, 1), (5, 8, 1, 2), (12, 4, 0, 3), (20, 8, 2, 4), (30, 8, 3, 5), (40, 2, 4, 6)],
)
def test_secure_sum_equals_plain_sum(num_clients: int, level_bits: int, num_dropped: int, seed: int) -> None:
    result, plain = _run_cohort(num_clients, level_bits, dim=257, num_dropped=num_dropped, seed=seed)
    np.testing.assert_array_equal(result, plain)


def test_secure_sum_at_the_largest_levels() -> None:
    # All levels at 2**b - 1: the sum n * (2**b - 1) is the largest the modulus must hold.
    num_bits = sum_bits(7, 3)
    assert num_bits == 6  # 2**5 <= 7 * 7 = 49 < 2**6
    graph = harary_graph(6, 7)
    source = SeededSecretSource(np.random.default_rng(9))
    keys = [private_key_from_secret(source.random_bytes(32)) for _ in range(7)]
    seeds = [source.random_bytes(32) for _ in range(7)]
    levels = np.full(11, 7, dtype=np.uint64)
    total = np.zeros(11, dtype=np.uint64)
    for u in range(7):
        pair = {v: agree(keys[u], keys[v].public_key(), INFO_MASK_SEED) for v in graph[u]}
        total += mask(levels, seeds[u], pair, u, num_bits)
    np.testing.assert_array_equal(unmask_sum(total, seeds, {}, num_bits), np.full(11, 49))


def test_mask_leaves_its_input_alone_and_refuses_bad_input() -> None:
    levels = np.arange(10, dtype=np.uint64)
    before = levels.copy()
    y = mask(levels, bytes(range(32)), {1: bytes(32)}, 0, 8)
    np.testing.assert_array_equal(levels, before)
    assert y.dtype == np.uint8 and int(y.max()) < 256  # the narrowest word for 8 bits
    with pytest.raises(SecAggError, match="own neighbour"):
        mask(levels, bytes(32), {0: bytes(32)}, 0, 8)
    with pytest.raises(SecAggError, match=r"\[0, 2\*\*4\)"):
        mask(np.array([16]), bytes(32), {}, 0, 4)
    with pytest.raises(SecAggError, match="integer"):
        mask(np.array([1.0]), bytes(32), {}, 0, 4)


def test_masked_vector_looks_uniform() -> None:
    # A constant input masked by one self-mask and 4 pairwise masks; the top 4 of 15 bits
    # fall in 16 buckets. chi2(15) > 60 has probability 2.5e-7.
    source = SeededSecretSource(np.random.default_rng(17))
    pair = {v: source.random_bytes(32) for v in (1, 2, 8, 9)}
    y = mask(np.full(160_000, 255, dtype=np.uint64), source.random_bytes(32), pair, 5, 15)
    counts = np.bincount((y >> np.uint64(11)).astype(np.int64), minlength=16)
    expected = y.size / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 60


def test_sum_bits_closed_forms() -> None:
    assert sum_bits(100, 8) == 15  # 100 * 255 = 25500 < 2**15
    assert sum_bits(1, 1) == 1
    assert sum_bits(2, 1) == 2  # sum up to 2 needs 2 bits (ceil(log2(2)) = 1 would wrap)
    assert sum_bits(128, 1) == 8
    assert sum_bits(100, 8, headroom_bits=3) == 18
    assert sum_bits(2**20, 8) <= 8 + 20
    with pytest.raises(SecAggError, match="62"):
        sum_bits(2**10, 60)
    with pytest.raises(SecAggError):
        sum_bits(0, 8)


def test_pack_golden_bytes() -> None:
    # [1, 2, 3, 4, 5] at 3 bits: 1 + (2 << 3) + (3 << 6) + (4 << 9) + (5 << 12) = 22737 = 0x58d1,
    # little-endian d1 58; the 16th bit is padding (zero).
    assert pack(np.array([1, 2, 3, 4, 5], dtype=np.uint64), 3) == bytes([0xD1, 0x58])
    np.testing.assert_array_equal(unpack(bytes([0xD1, 0x58]), 5, 3), [1, 2, 3, 4, 5])
    # One 9-bit value 0x1ff: ff 01.
    assert pack(np.array([511]), 9) == b"\xff\x01"


@pytest.mark.parametrize("num_bits", [1, 2, 3, 7, 8, 9, 15, 16, 31, 32, 33, 61, 62])
@pytest.mark.parametrize("num_elements", [0, 1, 63, 64, 65, 1000])
def test_pack_round_trip(num_bits: int, num_elements: int) -> None:
    values = np.random.default_rng(num_bits * 1000 + num_elements).integers(
        0, 2**num_bits, num_elements, dtype=np.uint64
    )
    data = pack(values, num_bits)
    assert len(data) == packed_bytes(num_elements, num_bits) == -(-num_elements * num_bits // 8)
    expected_int = sum(int(v) << (i * num_bits) for i, v in enumerate(values))
    assert int.from_bytes(data, "little") == expected_int  # the documented layout
    out = unpack(data, num_elements, num_bits)
    assert out.dtype == np.uint64
    np.testing.assert_array_equal(out, values)


def test_unpack_refuses_bad_packing() -> None:
    data = pack(np.array([1, 2, 3, 4, 5]), 3)
    with pytest.raises(SecAggError, match="2 bytes, got 3"):
        unpack(data + b"\x00", 5, 3)
    with pytest.raises(SecAggError, match="2 bytes, got 1"):
        unpack(data[:1], 5, 3)
    with pytest.raises(SecAggError, match="padding"):
        unpack(bytes([0xD1, 0xD8]), 5, 3)  # bit 15 set
    with pytest.raises(SecAggError, match=r"\[0, 2\*\*3\)"):
        pack(np.array([8]), 3)
    with pytest.raises(SecAggError, match="num_bits"):
        pack(np.array([1]), 63)


@pytest.mark.parametrize("num_bits", [1, 8, 9, 15, 16, 31, 33, 62])
def test_mask_matches_the_formula_with_python_integers(num_bits: int) -> None:
    # y_i = (x_i + PRG(b)_i + sum_v sign(u, v) PRG(s_uv)_i) mod 2**m, in exact Python integers.
    source = SeededSecretSource(np.random.default_rng(100 + num_bits))
    self_seed = source.random_bytes(32)
    pair = {v: source.random_bytes(32) for v in (0, 1, 4, 6)}
    levels = np.random.default_rng(num_bits).integers(0, 2**num_bits, 50, dtype=np.uint64)
    y = mask(levels, self_seed, pair, 3, num_bits)
    streams = {v: prg_field(seed, 50, num_bits) for v, seed in pair.items()}
    own = prg_field(self_seed, 50, num_bits)
    for i in range(50):
        expected = int(levels[i]) + int(own[i])
        expected += sum((1 if v > 3 else -1) * int(stream[i]) for v, stream in streams.items())
        assert int(y[i]) == expected % 2**num_bits


def test_prg_words_reduce_to_prg_field() -> None:
    seed = bytes(range(32))
    for num_bits in (5, 15, 30, 40):
        words = prg_words(seed, 20, num_bits)
        reduced = words.astype(np.uint64) & np.uint64(2**num_bits - 1)
        np.testing.assert_array_equal(reduced, prg_field(seed, 20, num_bits))
