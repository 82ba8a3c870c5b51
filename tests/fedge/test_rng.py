"""Named reproducible streams and the secret source."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedge.rng import (
    OsSecretSource,
    SeededSecretSource,
    Stream,
    default_secret_source,
    stream_rng,
    stream_seed,
)


def test_streams_never_coincide_across_purposes_keys_or_neighbouring_seeds() -> None:
    # The old scheme's collisions: [seed, round] == [seed, partition] for round == partition,
    # [seed, 2] == the export stream, and seed + 1 == another run's seed.
    draws = {}
    for seed, stream, key in itertools.product((41, 42, 43), Stream, (1, 2, 3)):
        draws[(seed, stream, key)] = stream_seed(seed, stream, key, bits=63)
    assert len(set(draws.values())) == len(draws)
    assert stream_seed(42, Stream.CLIENT_SAMPLING, 2) != stream_seed(42, Stream.LOCAL_TEST_SPLIT, 2)
    assert stream_seed(42, Stream.EVALUATION_SAMPLING, 5) != stream_seed(43, Stream.CLIENT_SAMPLING, 5)


def test_a_stream_is_reproducible_and_fits_its_api() -> None:
    a = stream_rng(7, Stream.LOCAL_SHUFFLE, 3, 11).integers(0, 2**32, 8)
    b = stream_rng(7, Stream.LOCAL_SHUFFLE, 3, 11).integers(0, 2**32, 8)
    np.testing.assert_array_equal(a, b)
    assert 0 <= stream_seed(7, Stream.LOCAL_SHUFFLE, 3, bits=32) < 2**32
    assert 0 <= stream_seed(7, Stream.ROTATION, 3, bits=63) < 2**63
    # By definition: SeedSequence of [stream, key count, seed hi, seed lo, key hi, key lo].
    state = np.random.SeedSequence([int(Stream.ROTATION), 1, 0, 7, 0, 3]).generate_state(1, np.uint64)
    assert stream_seed(7, Stream.ROTATION, 3, bits=63) == int(state[0]) >> 1
    # The encoding is injective where SeedSequence's is not: trailing zeros, 64-bit keys.
    assert stream_seed(7, Stream.CODEC_ROUNDING, 3) != stream_seed(7, Stream.CODEC_ROUNDING, 3, 0)
    assert stream_seed(7, Stream.CODEC_ROUNDING, 2**32 + 7) != stream_seed(7, Stream.CODEC_ROUNDING, 7, 1)
    assert stream_seed(7, Stream.CODEC_ROUNDING, 2**64 - 1) != stream_seed(7, Stream.CODEC_ROUNDING, 2**63)
    with pytest.raises(ValueError):
        stream_seed(7, Stream.ROTATION, -1)


def test_secret_source_is_the_os_csprng_and_never_repeats() -> None:
    source = default_secret_source()
    assert isinstance(source, OsSecretSource)
    assert source.random_bytes(32) != source.random_bytes(32)  # 2**-256 to fail
    assert len(source.random_bytes(0)) == 0


@pytest.mark.parametrize("source", [OsSecretSource(), SeededSecretSource(np.random.default_rng(1234))])
def test_secret_gaussian_and_uniform_have_the_right_moments(source: object) -> None:
    n = 200_000
    u = source.uniform(n)  # type: ignore[attr-defined]
    assert u.min() >= 0.0 and u.max() < 1.0
    # Uniform[0,1): mean 1/2, variance 1/12; standard errors ~0.0006 and ~0.0002 at n = 2e5.
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    z = source.normal(n, std=3.0)  # type: ignore[attr-defined]
    assert z.shape == (n,)
    # N(0, 9): mean within 6 standard errors (6 * 3 / sqrt(n) = 0.04), variance within 2%.
    assert abs(z.mean()) < 0.04 and abs(z.var() / 9.0 - 1) < 0.02
    # Fourth moment 3 sigma^4 (Gaussian tails, not a uniform or a sum of few terms).
    assert abs(np.mean(z**4) / 81.0 - 3) < 0.15
    assert source.normal(3).shape == (3,)  # odd sizes  # type: ignore[attr-defined]


def test_seeded_secret_source_replays_for_tests() -> None:
    a = SeededSecretSource(np.random.default_rng(5)).normal(10)
    b = SeededSecretSource(np.random.default_rng(5)).normal(10)
    c = SeededSecretSource(np.random.default_rng(6)).normal(10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
