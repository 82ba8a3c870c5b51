"""Randomness: reproducible streams from the run seed, and one secret source.

Two kinds of draws, never mixed:

* **Reproducible** draws (who is sampled, how a client shuffles its data, how the data is
  partitioned, which samples calibrate the int8 model, stochastic rounding of updates,
  the rotation of rotated codecs) come from the public run ``seed`` through a *named
  stream*: a ``SeedSequence`` of ``(STREAM, len(keys), seed, *keys)``. Every purpose has its own stream
  constant, so no two purposes share draws (with bare ``[seed, round]`` and ``[seed,
  partition]`` the sample of round 2 and the split of partition 2 were the same stream,
  and ``seed + 1`` was another run's seed). A resumed run, another engine or another
  machine re-derives the same draws from the same keys.
* **Secret** draws (differential-privacy noise, secure-aggregation mask seeds and keys)
  must be unpredictable to anyone who knows the seed, the server included. They come from
  a :class:`SecretSource`: :class:`OsSecretSource` (the operating system's CSPRNG,
  ``os.urandom``) in production; tests replace it with :class:`SeededSecretSource`
  around an explicit ``numpy.random.Generator``, never in a real run.

Where each draw comes from:

============================  ===================================  ==========================
draw                          stream                               keys
============================  ===================================  ==========================
clients sampled for training  :data:`Stream.CLIENT_SAMPLING`       server round
clients asked to evaluate     :data:`Stream.EVALUATION_SAMPLING`   server round
clients of the int8 check     :data:`Stream.INT8_CHECK_SAMPLING`   server round
a client's local shuffling    :data:`Stream.LOCAL_SHUFFLE`         server round, client
stochastic rounding (codecs)  :data:`Stream.CODEC_ROUNDING`        server round, client
rotation of rotated codecs    :data:`Stream.ROTATION`              server round
export evaluation subset      :data:`Stream.EXPORT_EVALUATION`     (none)
int8 calibration samples      :data:`Stream.CALIBRATION`           (none)
partitions (flwr-datasets)    :data:`Stream.PARTITION`             (none)
a client's local test split   :data:`Stream.LOCAL_TEST_SPLIT`      partition
DP noise, secagg masks, keys  :class:`SecretSource`                (secret: OS entropy)
============================  ===================================  ==========================

Model initialisation seeds its own ``torch.Generator`` with the run seed (nothing else
draws from torch's generators), and a dataset's canonical train/test split (per writer,
user or hospital) is keyed by the run seed inside its loader, a separate generator.
"""

from __future__ import annotations

import os
from enum import IntEnum
from typing import Protocol

import numpy as np

__all__ = [
    "OsSecretSource",
    "SecretSource",
    "SeededSecretSource",
    "Stream",
    "default_secret_source",
    "stream_rng",
    "stream_seed",
    "stream_seed_sequence",
]


class Stream(IntEnum):
    """One constant per purpose of reproducible randomness (see the module docstring).

    The values are arbitrary but fixed forever: changing one changes every run's draws.
    They are large, so that they never equal a small key such as a round number.
    """

    CLIENT_SAMPLING = 0x5A3D_0001
    EVALUATION_SAMPLING = 0x5A3D_0002
    INT8_CHECK_SAMPLING = 0x5A3D_0003
    LOCAL_SHUFFLE = 0x5A3D_0004
    CODEC_ROUNDING = 0x5A3D_0005
    ROTATION = 0x5A3D_0006
    EXPORT_EVALUATION = 0x5A3D_0007
    CALIBRATION = 0x5A3D_0008
    LOCAL_TEST_SPLIT = 0x5A3D_0009
    PARTITION = 0x5A3D_000A
    SECAGG_DROPOUT = 0x5A3D_000B


_WORD = (1 << 32) - 1


def _entropy(seed: int, stream: Stream, keys: tuple[int, ...]) -> list[int]:
    """``[stream, number of keys, seed, *keys]``, every value as two 32-bit words.

    Fixed-width words and the key count make the encoding injective: ``SeedSequence``
    pads trailing zeros (``[s, S, k]`` would equal ``[s, S, k, 0]``) and splits integers
    of 2**32 or more into words (``[s, S, 2**32 + 7]`` would equal ``[s, S, 7, 1]``).
    """
    values = [int(seed), *(int(k) for k in keys)]
    if any(not 0 <= v < 1 << 64 for v in values):
        raise ValueError(f"the seed and stream keys must be integers in [0, 2**64), got {values}")
    words = [int(stream), len(keys)]
    for v in values:
        words.extend((v >> 32, v & _WORD))
    return words


def stream_seed_sequence(seed: int, stream: Stream, *keys: int) -> np.random.SeedSequence:
    """The named stream for ``keys``: a ``SeedSequence`` of ``(stream, len(keys), seed, *keys)``.

    Parameters
    ----------
    seed : int
        The run's public seed (``seed`` in the config).
    stream : Stream
        The purpose.
    *keys : int
        What distinguishes draws of one purpose (server round, client key), each >= 0.
    """
    return np.random.SeedSequence(_entropy(seed, stream, keys))


def stream_rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """A numpy ``Generator`` (PCG64) on the named stream for ``keys``."""
    return np.random.default_rng(stream_seed_sequence(seed, stream, *keys))


def stream_seed(seed: int, stream: Stream, *keys: int, bits: int = 32) -> int:
    """A ``bits``-bit integer seed derived from the named stream (for APIs that take an int).

    ``bits`` is 32 (``torch.Generator.manual_seed``, scikit-learn) or 63 (a Flower
    ``ConfigRecord`` int, which is int64).
    """
    if bits not in (32, 63):
        raise ValueError(f"bits must be 32 or 63, got {bits}")
    state = stream_seed_sequence(seed, stream, *keys).generate_state(1, np.uint64)
    return int(state[0]) >> (64 - bits)


class SecretSource(Protocol):
    """Randomness nobody can regenerate from the run seed (DP noise, mask seeds, keys)."""

    def random_bytes(self, num_bytes: int) -> bytes:
        """``num_bytes`` uniformly random bytes."""

    def uniform(self, size: int) -> np.ndarray:
        """``size`` float64 draws uniform on [0, 1), 53 random bits each."""

    def normal(self, size: int, std: float = 1.0) -> np.ndarray:
        """``size`` float64 draws from ``N(0, std**2)``."""


class _SecretDraws:
    """Uniform and Gaussian draws from a source of random bytes (shared by both sources)."""

    def random_bytes(self, num_bytes: int) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def uniform(self, size: int) -> np.ndarray:
        """Uniform on [0, 1): the top 53 bits of a random uint64, times ``2**-53``."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        words = np.frombuffer(self.random_bytes(8 * size), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def normal(self, size: int, std: float = 1.0) -> np.ndarray:
        """Box-Muller: ``sqrt(-2 ln(1 - u1)) cos(2 pi u2) * std`` (``1 - u1`` is in (0, 1])."""
        if not (np.isfinite(std) and std >= 0):
            raise ValueError(f"std must be a finite number >= 0, got {std}")
        pairs = (size + 1) // 2
        u = self.uniform(2 * pairs).reshape(2, pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[0]))
        angle = 2.0 * np.pi * u[1]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]
        return z * std


class OsSecretSource(_SecretDraws):
    """The operating system's CSPRNG (``os.urandom``: getrandom(2) on Linux).

    Used for every secret draw in a real run. It keeps no state, so nothing of it is
    checkpointed and a resumed run draws fresh secrets (as it must: replaying noise or
    masks would leak).
    """

    def random_bytes(self, num_bytes: int) -> bytes:
        """``num_bytes`` bytes from ``os.urandom``."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        return os.urandom(num_bytes)


class SeededSecretSource(_SecretDraws):
    """A replayable stand-in for :class:`OsSecretSource`, **for tests only**.

    Parameters
    ----------
    generator : numpy.random.Generator
        Where the bytes come from (``numpy.random.default_rng(1234)`` in a test).
    """

    def __init__(self, generator: np.random.Generator) -> None:
        self._generator = generator

    def random_bytes(self, num_bytes: int) -> bytes:
        """``num_bytes`` bytes from the wrapped generator."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        return self._generator.bytes(num_bytes)


def default_secret_source() -> SecretSource:
    """The source of secret draws in a real run: :class:`OsSecretSource`."""
    return OsSecretSource()
