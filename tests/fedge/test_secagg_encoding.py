"""fedge.secagg.encoding: shared-scale levels, base-(L+1) weight digits, the field size, layout.

Expected values are closed forms: ``W * c * (2 q / L - 1)`` per client for the levels ``q`` of
each element (``R^T`` of it for rotated codecs, with a float64 Hadamard matrix built here),
Python-integer sums of the weights, and ``(n * L).bit_length()`` for the field.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.compression import parse_codec
from fedge.compression.hadamard import rotate, rotated_length, rotation_signs
from fedge.secagg.encoding import FieldEncoding, TensorSlot, layout
from fedge.secagg.errors import SecAggError
from fedge.secagg.masking import sum_bits

CLIP = 0.25
CODECS = ("qsgd:8", "ternary", "rotate+qsgd:4")


def encoding(codec: str, max_weight: int = 100, clip: float = CLIP) -> FieldEncoding:
    return FieldEncoding.for_codec(parse_codec(codec), 8, clip, max_weight)


def _hadamard(size: int) -> np.ndarray:
    """The Sylvester Hadamard matrix in float64 (``H[i, j] = (-1)**popcount(i & j)``)."""
    i = np.arange(size)
    parity = np.vectorize(lambda v: bin(v).count("1") % 2)(i[:, None] & i[None, :])
    return 1.0 - 2.0 * parity


def closed_form(enc: FieldEncoding, levels: np.ndarray, size: int, rotation_seed: int) -> np.ndarray:
    """One client's ``W * c * (2 q / L - 1)``, then ``R^T`` (float64) for a rotated encoding."""
    values = enc.max_weight * enc.scale * (2.0 * levels.astype(np.float64) / enc.top - 1.0)
    if not enc.rotate:
        return values
    length = values.size
    assert length <= 1024 and length & (length - 1) == 0  # one block, a power of two
    signs = rotation_signs(length, rotation_seed).astype(np.float64)
    return (signs * (_hadamard(length) @ values) / math.sqrt(length))[:size]


# -- for_codec, the field, digits -----------------------------------------------------------------
def test_for_codec() -> None:
    assert encoding("qsgd:8") == FieldEncoding(8, False, False, CLIP, 100)
    assert encoding("rotate+qsgd:4") == FieldEncoding(4, False, True, CLIP, 100)
    assert encoding("ternary") == FieldEncoding(2, True, False, CLIP, 100)
    assert encoding("rotate+ternary") == FieldEncoding(2, True, True, CLIP, 100)
    assert FieldEncoding.for_codec(parse_codec("none"), 6, CLIP, 9) == FieldEncoding(6, False, False, CLIP, 9)
    assert [encoding(c).top for c in ("qsgd:8", "ternary", "rotate+qsgd:4", "qsgd:1")] == [255, 2, 15, 1]
    with pytest.raises(SecAggError, match="cannot run under secure aggregation"):
        encoding("topk:0.1")
    for bad in (
        dict(level_bits=0),
        dict(level_bits=9),
        dict(level_bits=3, ternary=True),
        dict(clip=0.0),
        dict(clip=math.inf),
        dict(max_weight=0),
    ):
        fields = dict(level_bits=4, ternary=False, rotate=False, clip=CLIP, max_weight=5) | bad
        with pytest.raises(SecAggError):
            FieldEncoding(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", [*CODECS, "qsgd:1", "qsgd:3"])
def test_field_bits_is_the_bit_length_and_never_wraps(codec: str) -> None:
    enc = encoding(codec)
    top = enc.top
    for n in [*range(1, 300), 1000, 65535]:
        m = enc.field_bits(n)
        assert m == (n * top).bit_length()
        assert n * top < 2**m  # n inputs of value L never wrap
        assert n * top >= 2 ** (m - 1)  # and no bit is wasted
        if not enc.ternary:
            assert m == sum_bits(n, enc.level_bits)
        # A sum of n uint64 inputs of value L, reduced mod 2**m, is the true sum.
        total = np.full(n, top, dtype=np.uint64).sum(dtype=np.uint64) & np.uint64(2**m - 1)
        assert int(total) == n * top
    with pytest.raises(SecAggError):
        enc.field_bits(0)


@pytest.mark.parametrize("codec", (*CODECS, "qsgd:1"))
@pytest.mark.parametrize("max_weight", [1, 2, 255, 256, 10**6])
def test_weight_digits_round_trip(codec: str, max_weight: int) -> None:
    enc = encoding(codec, max_weight)
    base = enc.top + 1
    d = enc.weight_digits()
    # The fewest base-(L+1) digits that hold W.
    assert base**d > max_weight and (d == 1 or base ** (d - 1) <= max_weight)
    rng = np.random.default_rng(max_weight)
    weights = {1, max_weight, max(1, max_weight - 1), *rng.integers(1, max_weight + 1, 20).tolist()}
    for w in sorted(weights):
        digits = enc.encode_weight(w)
        assert digits.dtype == np.uint8 and digits.shape == (d,)
        assert int(digits.max()) <= enc.top  # each digit is a level
        assert sum(int(x) * base**j for j, x in enumerate(digits.tolist())) == w
        assert enc.decode_weight(digits) == w
    # Larger weights are capped at W.
    assert enc.decode_weight(enc.encode_weight(max_weight + 7)) == max_weight
    assert enc.decode_weight(enc.encode_weight(np.int64(max_weight))) == max_weight


@pytest.mark.parametrize("bad", [0, -3, True, 1.5, "7"])
def test_bad_weights_are_refused(bad: object) -> None:
    with pytest.raises(SecAggError, match="whole number"):
        encoding("qsgd:8").encode_weight(bad)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    codec=st.sampled_from((*CODECS, "qsgd:1")),
    max_weight=st.sampled_from([1, 2, 255, 256, 10**6]),
    weights=st.lists(st.integers(1, 2 * 10**6), min_size=1, max_size=40),
)
def test_digit_sums_decode_to_the_sum_of_weights(codec: str, max_weight: int, weights: list[int]) -> None:
    enc = encoding(codec, max_weight)
    n = len(weights)
    digit_sums = np.sum([enc.encode_weight(w) for w in weights], axis=0, dtype=np.uint64)
    # The digit sums fit the field of n clients: each is at most n * L.
    assert int(digit_sums.max()) < 2 ** enc.field_bits(n)
    assert enc.decode_weight(digit_sums) == sum(min(w, max_weight) for w in weights)


# -- levels and their decoding --------------------------------------------------------------------
@pytest.mark.parametrize("codec", CODECS)
def test_decoded_level_sum_is_the_sum_of_each_clients_closed_form(codec: str) -> None:
    max_weight, size, n, rotation_seed = 40, 200, 6, 1234
    enc = encoding(codec, max_weight)
    rng = np.random.default_rng(7)
    weights = [3, 40, 17, 55, 1, 22]  # 55 is capped at 40
    updates = [rng.normal(0, 0.3, size).astype(np.float32) for _ in range(n)]  # some clipped
    levels = [
        enc.encode_tensor(x, w, np.random.default_rng(100 + i), rotation_seed)
        for i, (x, w) in enumerate(zip(updates, weights, strict=True))
    ]
    assert all(q.dtype == np.uint8 and q.shape == (enc.slot_length(size),) for q in levels)
    assert all(int(q.max()) <= enc.top for q in levels)
    assert enc.slot_length(size) == (256 if enc.rotate else size)
    level_sum = np.sum(levels, axis=0, dtype=np.uint64)
    decoded = enc.decode_tensor(level_sum, n, size, rotation_seed)
    assert decoded.dtype == np.float64 and decoded.shape == (size,)
    expected = np.sum([closed_form(enc, q, size, rotation_seed) for q in levels], axis=0)
    each = np.sum([enc.decode_tensor(q, 1, size, rotation_seed) for q in levels], axis=0)
    if enc.rotate:
        # decode_tensor unrotates in float32 (the codecs' Hadamard is float32): float32 precision.
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(decoded, expected, rtol=0, atol=2e-6 * scale)
        np.testing.assert_allclose(each, expected, rtol=0, atol=2e-6 * scale)
    else:
        np.testing.assert_allclose(decoded, expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(each, expected, rtol=1e-9, atol=1e-12)
        # Each element is W * c * (2 S / L - n) for the level sum S.
        s = level_sum.astype(np.float64)
        np.testing.assert_allclose(
            decoded, max_weight * enc.scale * (2 * s / enc.top - n), rtol=1e-12, atol=1e-12
        )


def test_ternary_levels_are_minus_zero_plus_c() -> None:
    enc = encoding("ternary", max_weight=1)
    q = np.array([0, 1, 2], dtype=np.uint8)
    assert enc.decode_tensor(q, 1, 3, 0).tolist() == [-enc.scale, 0.0, enc.scale]


def test_clipping_and_the_extremes() -> None:
    enc = encoding("qsgd:8", max_weight=10)
    x = np.array([-5.0, -CLIP, 0.0, CLIP, 5.0], dtype=np.float32)
    q = enc.encode_tensor(x, 10, np.random.default_rng(0), 0)
    assert q[0] == q[1] == 0 and q[3] == q[4] == 255  # clipped to +-c: the extreme levels
    decoded = enc.decode_tensor(q.astype(np.uint64), 1, 5, 0)
    assert decoded[[0, 1, 3, 4]].tolist() == [
        -10 * enc.scale,
        -10 * enc.scale,
        10 * enc.scale,
        10 * enc.scale,
    ]
    with pytest.raises(SecAggError, match="NaN or Inf"):
        enc.encode_tensor(np.array([np.nan], dtype=np.float32), 1, np.random.default_rng(0), 0)


@pytest.mark.parametrize("codec", CODECS)
def test_encoding_is_unbiased(codec: str) -> None:
    # E[decode(encode(x, w))] = w * x (unclipped), per element, within 5 standard errors.
    max_weight, weight, size, trials = 8, 5, 40, 400
    enc = encoding(codec, max_weight)
    rng = np.random.default_rng(3)
    # Small enough that neither x nor its rotation reaches the clip: |R v|_inf <= |v|_2 < c.
    x = rng.uniform(-1, 1, size).astype(np.float32)
    x *= np.float32(0.9 * CLIP / float(np.linalg.norm(x)))
    draws = np.array(
        [
            enc.decode_tensor(enc.encode_tensor(x, weight, np.random.default_rng(1000 + i), 77), 1, size, 77)
            for i in range(trials)
        ]
    )
    # What the client quantizes is v = x * (w / W) in float32; decoding multiplies by W.
    target = max_weight * (x * np.float32(weight / max_weight)).astype(np.float64)
    np.testing.assert_allclose(target, weight * x.astype(np.float64), rtol=1e-6)
    mean = draws.mean(axis=0)
    # The standard error from the closed form (a sample one is 0 for an element so close to a
    # level that every draw rounds the same way): stochastic rounding of a value at fraction p
    # between two levels 2c/L apart has variance (2c/L)**2 p (1 - p); R^T spreads the rotated
    # coordinates' variances evenly over one block (|R_ij|**2 = 1/len).
    v = x * np.float32(weight / max_weight)
    u = rotate(v, 77) if enc.rotate else v
    position = (u.astype(np.float64) / enc.scale + 1.0) * enc.top / 2
    frac = position - np.floor(position)
    variance = (2 * enc.scale / enc.top) ** 2 * frac * (1 - frac)
    if enc.rotate:
        variance = np.full(size, variance.sum() / variance.size)
    stderr = max_weight * np.sqrt(variance / trials)
    slack = 1e-5 * max_weight * CLIP  # float32 rounding of the scaled input
    assert np.all(np.abs(mean - target) <= 5 * stderr + slack), np.max(np.abs(mean - target) / stderr)
    # ... and the spread of the draws is that closed form's (a loose two-sided check).
    sample = draws.std(axis=0, ddof=1) / math.sqrt(trials)
    assert 0.7 < float(sample.mean() / stderr.mean()) < 1.3


# -- layout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["qsgd:8", "rotate+qsgd:4"])
def test_layout(codec: str) -> None:
    enc = encoding(codec, max_weight=300)
    records = {
        "model": {
            "w": np.zeros((3, 4), dtype=np.float32),
            "steps": np.zeros(1, dtype=np.int64),  # not an update: skipped, but keeps its seed
            "b": np.zeros(5, dtype=np.float32),
        },
        "extra": {"h": np.zeros(1500, dtype=np.float16)},
    }
    slots, length = layout(enc, records, [11, 12, 13, 14])
    lengths = [rotated_length(n) if enc.rotate else n for n in (12, 5, 1500)]
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert slots == [
        TensorSlot("model", "w", 12, 11, starts[0], lengths[0]),
        TensorSlot("model", "b", 5, 13, starts[1], lengths[1]),
        TensorSlot("extra", "h", 1500, 14, starts[2], lengths[2]),
    ]
    assert length == sum(lengths) + enc.weight_digits()
    if enc.rotate:
        assert lengths == [16, 8, 1024 + 512]
    assert enc.weight_digits() == (2 if enc.top == 255 else 3)  # 300 < 256**2, 16**2 <= 300 < 16**3
