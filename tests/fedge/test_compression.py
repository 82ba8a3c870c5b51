"""Update codecs: error bounds, unbiasedness, sizes and golden bytes from the documented layout."""

from __future__ import annotations

import math
import struct
import time

import numpy as np
import pytest

from fedge.compression import (
    CodecError,
    CodecSpec,
    decode,
    dequantize_level_sum,
    encode,
    max_payload_bytes,
    parse_codec,
    payload_bytes,
    quantize_levels,
    require_secagg_compatible,
    rice,
    secagg_compatible,
    secagg_sum_bits,
    with_error_feedback,
)
from fedge.compression.hadamard import fwht, rotate, rotated_length, rotation_signs, unrotate
from fedge.compression.qsgd import pack_levels, pack_trits, unpack_levels, unpack_trits

ALL_CODECS = [
    "none",
    "qsgd:1",
    "qsgd:2",
    "qsgd:3",
    "qsgd:4",
    "qsgd:8",
    "topk:0.1",
    "topk:1",
    "rotate+qsgd:2",
    "ternary",
    "rotate+ternary",
    "stc:0.1",
    "stc:1",
]
SMALL = np.array([0.5, -1.0, 0.25, 2.0, -0.125], dtype=np.float32)


def _spiky(n: int, seed: int) -> np.ndarray:
    x = (0.01 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)
    x[17] = 100.0
    return x


def _one_line(excinfo: pytest.ExceptionInfo[CodecError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- parse_codec ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("none", CodecSpec("none")),
        ("qsgd:4", CodecSpec("qsgd", num_bits=4)),
        (" topk:0.01 ", CodecSpec("topk", keep_fraction=0.01)),
        ("rotate+qsgd:2", CodecSpec("rotate+qsgd", num_bits=2)),
        ("ternary", CodecSpec("ternary")),
        ("rotate+ternary", CodecSpec("rotate+ternary")),
        ("stc:0.1", CodecSpec("stc", keep_fraction=0.1)),
    ],
)
def test_parse_codec_valid_forms(text: str, spec: CodecSpec) -> None:
    assert parse_codec(text) == spec
    assert parse_codec(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "qsgd:0",
        "qsgd:9",
        "topk:0",
        "topk:1.5",
        "zip",
        "topk:nan",
        "qsgd",
        "none:1",
        "qsgd:4.0",
        "",
        "ternary:2",
        "stc",
    ],
)
def test_parse_codec_refuses_bad_text_listing_valid_forms(text: str) -> None:
    with pytest.raises(CodecError) as excinfo:
        parse_codec(text)
    message = _one_line(excinfo)
    assert "valid forms" in message
    assert "'qsgd:BITS'" in message and "'topk:FRACTION'" in message and "'rotate+qsgd:BITS'" in message


def test_spec_refuses_fields_the_kind_does_not_use() -> None:
    with pytest.raises(CodecError):
        CodecSpec("topk", num_bits=4, keep_fraction=0.1)
    with pytest.raises(CodecError):
        CodecSpec("qsgd", num_bits=4, keep_fraction=0.1)


# --- round trips and error bounds -----------------------------------------------------------


def test_none_is_exact() -> None:
    x = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    out = decode(encode(x, parse_codec("none"), np.random.default_rng(1)), x.shape)
    assert out.dtype == np.float32 and out.shape == (3, 7)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("num_bits", range(1, 9))
def test_qsgd_error_below_one_step_per_element(num_bits: int) -> None:
    # Step between levels: 2 * m / (2**b - 1), m = max |x| of the element's 1024-chunk.
    x = np.random.default_rng(num_bits).standard_normal(2500).astype(np.float32)
    x[1500] = 40.0  # a spike makes the second chunk's step larger
    out = decode(encode(x, CodecSpec("qsgd", num_bits=num_bits), np.random.default_rng(0)), x.shape)
    levels = 2**num_bits - 1
    chunk_max = np.array([np.abs(x[i : i + 1024]).max() for i in range(0, 2500, 1024)])
    step = np.repeat(2 * chunk_max / levels, 1024)[:2500]
    assert np.all(np.abs(out - x) <= step * (1 + 1e-5))


def test_qsgd_zero_chunk_decodes_to_exact_zero() -> None:
    x = np.zeros(3000, dtype=np.float32)
    x[2500] = 1.0
    out = decode(encode(x, parse_codec("qsgd:3"), np.random.default_rng(0)), x.shape)
    assert np.all(out[:2048] == 0.0)


def test_topk_keeps_the_largest_exactly_and_drops_the_rest() -> None:
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    out = decode(encode(x, parse_codec("topk:0.05"), np.random.default_rng(0)), x.shape)
    kept = out != 0
    assert kept.sum() == 50  # ceil(0.05 * 1000)
    np.testing.assert_array_equal(out[kept], x[kept])
    assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()
    assert set(np.flatnonzero(kept)) == set(np.argsort(-np.abs(x))[:50])


@pytest.mark.parametrize(("n", "fraction", "k"), [(1, 0.001, 1), (10, 0.001, 1), (10, 1.0, 10), (7, 0.5, 4)])
def test_topk_count_closed_form(n: int, fraction: float, k: int) -> None:
    x = np.arange(1, n + 1, dtype=np.float32)
    out = decode(encode(x, CodecSpec("topk", keep_fraction=fraction), np.random.default_rng(0)), (n,))
    assert np.count_nonzero(out) == k


def test_rotate_quantizers_error_norm_bound() -> None:
    # Rotation is orthonormal: ||x - x_hat|| = ||y - y_hat||, and each rotated element is
    # off by less than its chunk's step 2 max|y_c| / L.
    x = _spiky(3000, 5)
    m = rotated_length(3000)  # 2 blocks of 1024, the 952-element tail padded to 1024
    assert m == 3072
    y = rotate(x, rotation_seed=9)
    chunk_max = np.repeat([np.abs(y[i : i + 1024]).max() for i in range(0, m, 1024)], 1024)[:m]
    # (codec, L): rotate+ternary is the same scheme with L = 2.
    for text, top in (
        ("rotate+qsgd:1", 1),
        ("rotate+qsgd:2", 3),
        ("rotate+qsgd:4", 15),
        ("rotate+ternary", 2),
    ):
        out = decode(encode(x, parse_codec(text), np.random.default_rng(0), rotation_seed=9), x.shape)
        bound = float(np.sqrt(np.sum((2 * chunk_max / top) ** 2)))
        assert float(np.linalg.norm(out - x)) <= bound * (1 + 1e-5), text
        # From 4 bits the bound is tight enough to catch a decoder that does not invert
        # the rotation exactly (its error would be about ||x||).
        assert bound < 0.5 * float(np.linalg.norm(x)) or top < 15, text


@pytest.mark.parametrize("text", ALL_CODECS)
def test_empty_and_single_element_tensors(text: str) -> None:
    spec = parse_codec(text)
    empty = decode(encode(np.zeros((0, 4), dtype=np.float32), spec, np.random.default_rng(0)), (0, 4))
    assert empty.shape == (0, 4)
    one = decode(encode(np.array([3.0], dtype=np.float32), spec, np.random.default_rng(0)), (1,))
    # A lone element is its chunk's max (the top level), and topk/stc keep it: exact.
    assert float(one[0]) == 3.0


@pytest.mark.parametrize("text", ALL_CODECS)
def test_encode_never_mutates_its_input_and_is_seed_deterministic(text: str) -> None:
    spec = parse_codec(text)
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    before = x.copy()
    a = encode(x, spec, np.random.default_rng(11), rotation_seed=5)
    b = encode(x, spec, np.random.default_rng(11), rotation_seed=5)
    np.testing.assert_array_equal(x, before)
    assert a == b
    if spec.kind in ("qsgd", "rotate+qsgd", "ternary", "rotate+ternary"):
        assert encode(x, spec, np.random.default_rng(12), rotation_seed=5) != a


# --- unbiasedness ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_bits", [1, 2, 4])
def test_qsgd_is_unbiased(num_bits: int) -> None:
    # Var[x_hat_i] <= step**2 / 4, so the mean of T draws has std <= step / (2 sqrt(T)).
    x = _spiky(64, 9)
    x[3] = -0.02
    draws = 2000
    rng = np.random.default_rng(2024)
    spec = CodecSpec("qsgd", num_bits=num_bits)
    total = np.zeros(64, dtype=np.float64)
    for _ in range(draws):
        total += decode(encode(x, spec, rng), x.shape)
    step = 2 * float(np.abs(x).max()) / (2**num_bits - 1)
    tolerance = 5 * step / (2 * math.sqrt(draws))
    assert np.all(np.abs(total / draws - x) <= tolerance + 1e-6)


def test_rotate_qsgd_is_unbiased_for_a_fixed_rotation() -> None:
    # x_hat = R^T y_hat: Var[x_hat_i] <= max_j Var[y_hat_j] <= (2 ||x|| / L)**2 / 4.
    x = _spiky(100, 4)
    draws = 2000
    rng = np.random.default_rng(77)
    spec = CodecSpec("rotate+qsgd", num_bits=2)
    total = np.zeros(100, dtype=np.float64)
    for _ in range(draws):
        total += decode(encode(x, spec, rng, rotation_seed=3), x.shape)
    tolerance = 5 * (2 * float(np.linalg.norm(x)) / 3) / (2 * math.sqrt(draws))
    assert np.all(np.abs(total / draws - x) <= tolerance)


# --- rotation -------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 8, 64, 512])
def test_fwht_equals_the_sylvester_matrix(m: int) -> None:
    # Slow reference: H[i, j] = (-1)**popcount(i & j).
    idx = np.arange(m)
    h = np.array([[(-1.0) ** bin(int(i) & int(j)).count("1") for j in idx] for i in idx])
    v = np.random.default_rng(m).standard_normal(m).astype(np.float32)
    np.testing.assert_allclose(fwht(v), h @ v.astype(np.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("n", "m"),
    # whole 1024-blocks, then the tail padded to a power of two: 70,000 = 68 * 1024 + 368 -> 512
    [(1, 1), (5, 8), (1000, 1024), (4096, 4096), (70_000, 68 * 1024 + 512)],
)
def test_rotation_is_orthonormal_and_invertible(n: int, m: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    y = rotate(x, rotation_seed=123)
    assert y.size == m == rotated_length(n)
    assert abs(np.linalg.norm(y) - np.linalg.norm(x)) <= 1e-5 * np.linalg.norm(x)
    np.testing.assert_allclose(unrotate(y, n, rotation_seed=123), x, atol=1e-5)
    assert not np.allclose(unrotate(y, n, rotation_seed=124), x, atol=1e-2)


def test_rotation_signs_are_the_raw_pcg64_bits() -> None:
    # Part of the wire format: the decoder rebuilds the signs from the seed in the header.
    word = int(np.random.PCG64(7).random_raw())
    assert word == 0xA00641A9F1E54A8B  # PCG64's raw stream is stable across numpy releases
    expected = [-1.0 if (word >> i) & 1 else 1.0 for i in range(64)]
    np.testing.assert_array_equal(rotation_signs(64, 7), expected)
    assert rotation_signs(130, 7).size == 130
    np.testing.assert_array_equal(rotation_signs(130, 7)[:64], expected)


def test_rotation_lowers_low_bit_error_on_a_spiky_vector() -> None:
    x = _spiky(4096, 1)
    plain = decode(encode(x, parse_codec("qsgd:2"), np.random.default_rng(8)), x.shape)
    rotated = decode(
        encode(x, parse_codec("rotate+qsgd:2"), np.random.default_rng(8), rotation_seed=8), x.shape
    )
    assert np.mean((rotated - x) ** 2) < np.mean((plain - x) ** 2)


# --- error feedback -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["qsgd:2", "topk:0.05", "rotate+qsgd:4", "none"])
def test_error_feedback_telescopes(text: str) -> None:
    spec = parse_codec(text)
    data_rng = np.random.default_rng(31)
    codec_rng = np.random.default_rng(32)
    residual = np.zeros((30, 100), dtype=np.float32)
    sent = np.zeros((30, 100), dtype=np.float64)
    truth = np.zeros((30, 100), dtype=np.float64)
    for server_round in range(1, 21):
        update = data_rng.standard_normal((30, 100)).astype(np.float32)
        before = residual.copy()
        payload, residual = with_error_feedback(update, residual, spec, codec_rng, rotation_seed=server_round)
        assert residual.shape == update.shape and residual.dtype == np.float32
        sent += decode(payload, update.shape)
        truth += update
        assert before is not residual
    assert np.linalg.norm(sent + residual - truth) <= 1e-4 * np.linalg.norm(truth)


def test_error_feedback_refuses_a_residual_of_another_shape() -> None:
    with pytest.raises(CodecError):
        with_error_feedback(np.zeros(3), np.zeros(4), parse_codec("qsgd:2"), np.random.default_rng(0))


# --- golden bytes ---------------------------------------------------------------------------
# SMALL = [0.5, -1, 0.25, 2, -0.125], rng = default_rng(0), rotation_seed = 7.
# Header: b"FGC" | version 01 | codec id | n = 5 as uint64 LE | codec fields; then the body.

GOLDEN = {  # bytes.fromhex skips the spaces that separate the fields
    "none": "464743 01 00 0500000000000000 0000003f 000080bf 0000803e 00000040 000000be",  # 5 float32 LE
    # num_bits 2 | chunk 1024 | scale 2.0 | levels 2,1,2,3,1 packed LSB-first: 0b11_10_01_10, 0b01
    "qsgd:2": "464743 01 01 0500000000000000 02 00040000 00000040 e601",
    "qsgd:3": "464743 01 01 0500000000000000 03 00040000 00000040 153f",
    # bitmap format 2 | k = 2 | bitmap 0b00001010 (elements 1 and 3) | values -1.0, 2.0
    "topk:0.4": "464743 01 02 0500000000000000 02 0200000000000000 0a 000080bf 00000040",
    # Rotated: n = 5 pads to one block of m = 8; signs d = -,-,+,-,+,+,+,- (PCG64(7)'s first raw
    # word, see test_rotation_signs_are_the_raw_pcg64_bits); y = H_8 (d * x) is exact in
    # float32 (sums of a few dyadic values), times float32(1 / sqrt(8)):
    # y = -0.486, 0.221, 0.751, -1.370, -0.398, 0.309, 0.840, -1.282, so the scale is
    # max |y| = 1.3700193 (cb5caf3f); the same uniforms as above give the levels.
    # num_bits 2 | chunk 1024 | block 1024 | seed 7 | scale | levels 1,2,2,0,1,1,2,0 -> 29 25
    "rotate+qsgd:2": "464743 01 03 0500000000000000 02 00040000 00040000 0700000000000000 cb5caf3f 2925",
    # chunk 1024 | scale 2.0 | v = x / 2 + 1 plus default_rng(0)'s first uniforms (0.851,
    # 0.637, 0.511, 0.270, 0.308) floors to levels 2,1,1,2,1 -> 2 + 3 + 9 + 2*27 + 81 = 0x95
    "ternary": "464743 01 04 0500000000000000 00040000 00000040 95",
    # chunk 1024 | block 1024 | seed 7 | scale | levels 1,1,2,0,1 | 1,1,0 -> 0x67 (103), 0x04
    "rotate+ternary": "464743 01 05 0500000000000000 00040000 00040000 0700000000000000 cb5caf3f 6704",
    # k = ceil(0.4 * 5) = 2: positions 1 and 3 (|-1|, |2|), gaps 1 and 1. Rice b = 0 costs 1 byte
    # (unary 1,0,1,0 = 0x05), b = 1 costs 2. | mu = (1 + 2) / 2 = 1.5 | unary_bytes 1 |
    # signs: -1 negative (bit 0), 2 positive -> 0x01
    "stc:0.4": "464743 01 06 0500000000000000 00 0200000000000000 0000c03f 01000000 05 01",
}


@pytest.mark.parametrize("text", sorted(GOLDEN))
def test_golden_bytes(text: str) -> None:
    payload = encode(SMALL, parse_codec(text), np.random.default_rng(0), rotation_seed=7)
    assert payload == bytes.fromhex(GOLDEN[text])


def test_golden_qsgd_levels_decode_to_closed_form() -> None:
    # levels 2,1,2,3,1 with m = 2, L = 3: x_hat = 2 * (q * 2 / 3 - 1)
    out = decode(bytes.fromhex(GOLDEN["qsgd:2"]), (5,))
    np.testing.assert_allclose(out, [2 / 3, -2 / 3, 2 / 3, 2.0, -2 / 3], rtol=1e-6)


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("none", 1_000_000, 13 + 4 * 1_000_000),
        ("qsgd:4", 1_000_000, 18 + 4 * 977 + 1_000_000 * 4 // 8),  # ceil(1e6 / 1024) = 977 scales
        ("qsgd:1", 1_000_000, 18 + 4 * 977 + 1_000_000 // 8),
        ("qsgd:3", 1001, 18 + 4 * 1 + math.ceil(1001 * 3 / 8)),
        ("topk:0.01", 1_000_000, 22 + 10_000 * 4 + 10_000 * 4),  # uint32 indices + fp32 values
        ("topk:0.01", 50_000, 22 + 500 * 2 + 500 * 4),  # uint16 indices
        ("topk:0.5", 50_000, 22 + 50_000 // 8 + 25_000 * 4),  # bitmap is cheaper than 50 kB of uint16
        # 976 whole blocks + a 576-element tail padded to 1024: m = 1,000,448
        ("rotate+qsgd:2", 1_000_000, 30 + 4 * 977 + 1_000_448 * 2 // 8),
        ("ternary", 1_000_000, 17 + 4 * 977 + 200_000),  # five levels a byte
        ("ternary", 1001, 17 + 4 + 201),
        ("rotate+ternary", 1001, 29 + 4 + 205),  # m = 1024
    ],
)
def test_payload_size_matches_the_layout(text: str, n: int, expected: int) -> None:
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    spec = parse_codec(text)
    payload = encode(x, spec, np.random.default_rng(1))
    assert len(payload) == expected == payload_bytes(spec, n)


def test_qsgd4_is_about_an_eighth_of_fp32() -> None:
    ratio = payload_bytes(parse_codec("qsgd:4"), 1_000_000) / (4 * 1_000_000)
    assert 0.125 <= ratio < 0.127


# --- packing --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_bits", range(1, 9))
def test_bit_packing_matches_a_bitwise_reference(num_bits: int) -> None:
    levels = np.random.default_rng(num_bits).integers(0, 2**num_bits, size=37, dtype=np.uint8)
    stream = [(int(q) >> b) & 1 for q in levels for b in range(num_bits)]
    stream += [0] * (-len(stream) % 8)
    reference = bytes(sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8))
    assert pack_levels(levels, num_bits) == reference
    np.testing.assert_array_equal(unpack_levels(reference, 37, num_bits), levels)


# --- bad input and bad payloads -------------------------------------------------------------


@pytest.mark.parametrize("text", ALL_CODECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(text: str, bad: float) -> None:
    x = np.ones(10, dtype=np.float32)
    x[4] = bad
    with pytest.raises(CodecError) as excinfo:
        encode(x, parse_codec(text), np.random.default_rng(0))
    assert "NaN or Inf" in _one_line(excinfo)


def _valid(text: str = "qsgd:4", n: int = 40) -> bytes:
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    return encode(x, parse_codec(text), np.random.default_rng(0))


@pytest.mark.parametrize("text", ALL_CODECS)
def test_truncated_and_extended_payloads_are_refused(text: str) -> None:
    payload = _valid(text)
    for cut in (1, 5, 14, len(payload) - 1):
        with pytest.raises(CodecError) as excinfo:
            decode(payload[:cut], (40,))
        assert "truncated" in _one_line(excinfo)
    with pytest.raises(CodecError) as excinfo:
        decode(payload + b"\x00", (40,))
    assert "extra" in _one_line(excinfo)


def test_wrong_magic_is_refused() -> None:
    with pytest.raises(CodecError) as excinfo:
        decode(b"PK\x03" + _valid()[3:], (40,))
    assert "not a fedge codec payload" in _one_line(excinfo)


def test_newer_version_is_refused_with_upgrade_advice() -> None:
    payload = bytearray(_valid())
    payload[3] = 2
    with pytest.raises(CodecError) as excinfo:
        decode(bytes(payload), (40,))
    assert _one_line(excinfo) == "header version 2 is newer than this fedge understands (1); upgrade fedge"


def test_unknown_codec_id_is_refused() -> None:
    payload = bytearray(_valid())
    payload[4] = 9
    with pytest.raises(CodecError) as excinfo:
        decode(bytes(payload), (40,))
    assert "unknown codec id 9" in _one_line(excinfo)


def test_element_count_must_match_shape() -> None:
    with pytest.raises(CodecError) as excinfo:
        decode(_valid(), (41,))
    assert "holds 40 elements but shape (41,) has 41" in _one_line(excinfo)
    assert decode(_valid(), (5, 8)).shape == (5, 8)


def test_corrupt_codec_fields_are_refused() -> None:
    qsgd_payload = bytearray(_valid("qsgd:4"))
    qsgd_payload[13] = 0  # num_bits
    with pytest.raises(CodecError):
        decode(bytes(qsgd_payload), (40,))
    topk_payload = _valid("topk:0.05")  # n = 40, k = 2, uint16 indices (4 B < 5 B bitmap) at 22
    assert topk_payload[13] == 0
    first, second = struct.unpack_from("<2H", topk_payload, 22)
    swapped = struct.pack("<2H", second, first)
    with pytest.raises(CodecError) as excinfo:
        decode(topk_payload[:22] + swapped + topk_payload[26:], (40,))
    assert "ascend" in _one_line(excinfo)


# --- secure aggregation ---------------------------------------------------------------------


def test_secagg_compatibility() -> None:
    for text in ("qsgd:4", "rotate+qsgd:2", "none", "ternary", "rotate+ternary"):
        assert secagg_compatible(parse_codec(text))
        require_secagg_compatible(parse_codec(text))
    for text in ("topk:0.01", "stc:0.1"):
        assert not secagg_compatible(parse_codec(text))
        with pytest.raises(CodecError) as excinfo:
            require_secagg_compatible(parse_codec(text))
        message = _one_line(excinfo)
        assert f"compression '{text}' cannot run under secure aggregation" in message
        assert "use qsgd:BITS" in message


@pytest.mark.parametrize(
    ("num_bits", "num_clients", "bits"), [(4, 1, 4), (4, 2, 5), (4, 10, 8), (8, 1000, 18)]
)
def test_secagg_headroom_bits(num_bits: int, num_clients: int, bits: int) -> None:
    assert secagg_sum_bits(num_bits, num_clients) == bits
    assert num_clients * (2**num_bits - 1) < 2**bits


def test_masked_level_sum_equals_plain_sum_and_decodes_linearly() -> None:
    num_bits, num_clients, clip_value = 3, 10, 0.5
    modulus = 2 ** secagg_sum_bits(num_bits, num_clients)
    rng = np.random.default_rng(5)
    updates = [np.clip(rng.standard_normal(200), -0.5, 0.5).astype(np.float32) for _ in range(num_clients)]
    levels = [quantize_levels(u, num_bits, clip_value, rng).astype(np.int64) for u in updates]
    masks = [rng.integers(0, modulus, 200) for _ in range(num_clients - 1)]
    masks.append((-sum(masks)) % modulus)  # pairwise masks cancel in the sum
    masked_sum = sum((q + r) % modulus for q, r in zip(levels, masks, strict=True)) % modulus
    plain_sum = sum(levels)
    np.testing.assert_array_equal(masked_sum, plain_sum)
    per_client = sum(clip_value * (q * 2 / 7 - 1) for q in levels)
    np.testing.assert_allclose(
        dequantize_level_sum(masked_sum, num_bits, clip_value, num_clients), per_client, atol=1e-5
    )


def test_shared_scale_quantization_refuses_unclipped_values() -> None:
    with pytest.raises(CodecError):
        quantize_levels(np.array([0.6], dtype=np.float32), 4, 0.5, np.random.default_rng(0))


# --- throughput (printed, not asserted) ----------------------------------------------------


def test_throughput_report() -> None:
    from threadpoolctl import threadpool_limits

    x = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
    megabytes = x.nbytes / 1e6
    with threadpool_limits(limits=1):
        for text in ["none", "qsgd:1", "qsgd:2", "qsgd:4", "qsgd:8", "topk:0.01", "rotate+qsgd:2"]:
            spec = parse_codec(text)
            rng = np.random.default_rng(1)
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                decode(encode(x, spec, rng, rotation_seed=1), x.shape)
                best = min(best, time.perf_counter() - start)
            print(
                f"{text:>14}: encode+decode {megabytes / best:7.0f} MB/s of fp32 input ({best * 1e3:.1f} ms)"
            )


# --- ternary ----------------------------------------------------------------------------------


def test_ternary_error_below_the_chunk_scale() -> None:
    # Levels -m, 0, +m: each element lands on one of the two levels around it, |x - x_hat| < m.
    x = _spiky(2500, 6)
    out = decode(encode(x, parse_codec("ternary"), np.random.default_rng(0)), x.shape)
    chunk_max = np.repeat([np.abs(x[i : i + 1024]).max() for i in range(0, 2500, 1024)], 1024)[:2500]
    assert np.all(np.abs(out - x) <= chunk_max * (1 + 1e-6))
    assert set(np.unique(np.round(out / chunk_max, 5))) <= {-1.0, 0.0, 1.0}


def test_ternary_is_unbiased_with_its_variance() -> None:
    # Var[x_hat_i] = |x_i| (m - |x_i|) <= m**2 / 4; the mean of T draws is within 5 sigma.
    # (No spike here: a Bernoulli with p = 1e-4 is too skewed for a normal-theory bound.)
    x = np.random.default_rng(10).standard_normal(64).astype(np.float32)
    draws = 2000
    rng = np.random.default_rng(99)
    spec = parse_codec("ternary")
    samples = np.stack([decode(encode(x, spec, rng), x.shape) for _ in range(draws)]).astype(np.float64)
    m = float(np.abs(x).max())
    variance = np.abs(x) * (m - np.abs(x))
    assert np.all(np.abs(samples.mean(axis=0) - x) <= 5 * np.sqrt(variance / draws) + 1e-6)
    np.testing.assert_allclose(samples.var(axis=0), variance, rtol=0.2, atol=1e-3 * m**2)


def test_rotate_ternary_is_unbiased_for_a_fixed_rotation() -> None:
    x = _spiky(100, 4)
    draws = 2000
    rng = np.random.default_rng(78)
    spec = parse_codec("rotate+ternary")
    total = np.zeros(100, dtype=np.float64)
    for _ in range(draws):
        total += decode(encode(x, spec, rng, rotation_seed=3), x.shape)
    # Each rotated coordinate has variance <= m**2 / 4 with m <= ||x||; R^T keeps that bound.
    tolerance = 5 * (float(np.linalg.norm(x)) / 2) / math.sqrt(draws)
    assert np.all(np.abs(total / draws - x) <= tolerance)


def test_trit_packing_matches_a_base3_reference() -> None:
    levels = np.random.default_rng(4).integers(0, 3, size=23, dtype=np.uint8)
    padded = [*levels.tolist(), 0, 0]  # 23 levels -> 5 bytes, 2 padding digits
    reference = bytes(sum(padded[i + j] * 3**j for j in range(5)) for i in range(0, 25, 5))
    assert pack_trits(levels) == reference
    np.testing.assert_array_equal(unpack_trits(reference, 23), levels)
    with pytest.raises(CodecError, match="exceeds 242"):
        unpack_trits(b"\xf3", 5)
    with pytest.raises(CodecError, match="padding"):
        unpack_trits(bytes([1 + 2 * 81]), 4)  # a digit past the 4th element


# --- stc and Rice coding --------------------------------------------------------------------


def test_stc_is_sign_times_mean_magnitude_on_the_top_k() -> None:
    x = np.random.default_rng(12).standard_normal(1000).astype(np.float32)
    out = decode(encode(x, parse_codec("stc:0.05"), np.random.default_rng(0)), x.shape)
    top = np.argsort(-np.abs(x))[:50]  # k = ceil(0.05 * 1000)
    mu = np.float32(np.abs(x[top]).mean())
    expected = np.zeros(1000, dtype=np.float32)
    expected[top] = np.sign(x[top]) * mu
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # Contractive, in closed form: ||x - C(x)||^2 = ||x||^2 - k mu^2.
    residual = float(np.sum((x.astype(np.float64) - out) ** 2))
    assert residual == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)) - 50 * float(mu) ** 2, rel=1e-5)


def _rice_reference(positions: list[int], b: int) -> tuple[bytes, bytes]:
    """Slow, obviously-right Rice streams: a Python bit list per stream."""
    unary: list[int] = []
    remainders: list[int] = []
    previous = -1
    for p in positions:
        gap = p - previous - 1
        previous = p
        unary += [1] * (gap >> b) + [0]
        remainders += [(gap >> j) & 1 for j in range(b)]

    def pack(bits: list[int]) -> bytes:
        bits = bits + [0] * (-len(bits) % 8)
        return bytes(sum(bits[i + j] << j for j in range(8)) for i in range(0, len(bits), 8))

    return pack(unary), pack(remainders)


@pytest.mark.parametrize(("n", "k"), [(1000, 1), (1000, 37), (50_176, 5018), (3, 3), (100_000, 200)])
def test_rice_streams_match_a_bitwise_reference_and_round_trip(n: int, k: int) -> None:
    positions = np.sort(np.random.default_rng(n + k).choice(n, size=k, replace=False)).astype(np.int64)
    streams = rice.encode_positions(positions)
    assert (streams.unary, streams.remainders) == _rice_reference(positions.tolist(), streams.rice_bits)
    # The chosen parameter is the best one, by brute force over the reference.
    sizes = {b: sum(len(s) for s in _rice_reference(positions.tolist(), b)) for b in range(20)}
    assert len(streams.unary) + len(streams.remainders) == min(sizes.values())
    decoded = rice.decode_positions(streams.unary, streams.remainders, k, streams.rice_bits, n)
    np.testing.assert_array_equal(decoded, positions)


def test_rice_refuses_corrupt_streams() -> None:
    positions = np.array([3, 10, 11, 40], dtype=np.int64)
    s = rice.encode_positions(positions)
    with pytest.raises(CodecError, match="fewer than 4 positions"):
        rice.decode_positions(b"\xff" * len(s.unary), s.remainders, 4, s.rice_bits, 50)
    with pytest.raises(CodecError, match="extra bytes or nonzero padding"):
        rice.decode_positions(s.unary + b"\x00", s.remainders, 4, s.rice_bits, 50)
    with pytest.raises(CodecError, match=r"not below 40|reaches past 40"):
        rice.decode_positions(s.unary, s.remainders, 4, s.rice_bits, 40)
    with pytest.raises(CodecError, match="wrong length"):
        rice.decode_positions(s.unary, s.remainders + b"\x00", 4, s.rice_bits, 50)


@pytest.mark.parametrize(
    ("n", "fraction"), [(50_176, 0.1), (50_176, 0.01), (1_000_000, 0.001), (72, 0.1), (8, 0.1)]
)
def test_stc_size_is_its_layout_and_within_the_bound(n: int, fraction: float) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    spec = parse_codec(f"stc:{fraction}")
    payload = encode(x, spec, np.random.default_rng(0))
    k = max(1, math.ceil(fraction * n))
    positions = np.sort(np.argsort(-np.abs(x))[:k])
    b = payload[13]
    unary, remainders = _rice_reference(positions.tolist(), b)
    assert len(payload) == 30 + len(unary) + len(remainders) + math.ceil(k / 8)
    assert len(payload) <= max_payload_bytes(spec, n)
    if k >= 100:  # byte rounding aside, a kept entry costs about log2(n / k) + 3 bits
        assert 8 * (len(payload) - 30) / k <= math.log2(n / k) + 3.5
    with pytest.raises(CodecError, match="vary in size"):
        payload_bytes(spec, n)


def test_corrupt_ternary_rotation_and_stc_fields_are_refused() -> None:
    ternary = bytearray(_valid("ternary"))
    ternary[-1] = 250  # not a base-3 byte
    with pytest.raises(CodecError, match="exceeds 242"):
        decode(bytes(ternary), (40,))
    rotated = bytearray(_valid("rotate+ternary"))
    rotated[17:21] = struct.pack("<I", 1000)  # block size
    with pytest.raises(CodecError, match="block_size 1000 is not 1024"):
        decode(bytes(rotated), (40,))
    sparse = _valid("stc:0.1")
    nan_mu = sparse[:22] + struct.pack("<f", math.nan) + sparse[26:]
    with pytest.raises(CodecError, match="magnitude nan"):
        decode(nan_mu, (40,))
    too_many = sparse[:14] + struct.pack("<Q", 41) + sparse[22:]
    with pytest.raises(CodecError, match="k=41 of only 40"):
        decode(too_many, (40,))
    signs = bytearray(sparse)
    signs[-1] |= 0x80  # a sign bit past the 4 kept entries
    with pytest.raises(CodecError, match="sign bits have nonzero padding"):
        decode(bytes(signs), (40,))


@pytest.mark.parametrize("text", ["stc:0.05", "ternary", "rotate+ternary"])
def test_error_feedback_telescopes_for_the_new_codecs(text: str) -> None:
    spec = parse_codec(text)
    data_rng, codec_rng = np.random.default_rng(41), np.random.default_rng(42)
    residual = np.zeros((30, 100), dtype=np.float32)
    sent = np.zeros((30, 100), dtype=np.float64)
    truth = np.zeros((30, 100), dtype=np.float64)
    for server_round in range(1, 21):
        update = data_rng.standard_normal((30, 100)).astype(np.float32)
        payload, residual = with_error_feedback(update, residual, spec, codec_rng, rotation_seed=server_round)
        sent += decode(payload, update.shape)
        truth += update
    assert np.linalg.norm(sent + residual - truth) <= 1e-4 * np.linalg.norm(truth)


def test_header_chunk_and_block_sizes_other_than_1024_are_refused() -> None:
    # A 30-byte payload claiming 2**32 - 1 elements per scale must not make the decoder
    # allocate 16 GiB: version 1 uses 1024 only.
    bomb = bytes.fromhex("464743 01 01 0a00000000000000") + struct.pack("<BI", 8, 0xFFFFFFFF)
    with pytest.raises(CodecError, match="chunk_size 4294967295 is not 1024"):
        decode(bomb + struct.pack("<f", 1.0) + bytes(10), (10,))
    for text, offset in (("ternary", 13), ("rotate+qsgd:2", 14), ("rotate+ternary", 13)):
        payload = bytearray(_valid(text))
        payload[offset : offset + 4] = struct.pack("<I", 1025)
        with pytest.raises(CodecError, match="chunk_size 1025"):
            decode(bytes(payload), (40,))
    rotated = bytearray(_valid("rotate+qsgd:2"))
    rotated[18:22] = struct.pack("<I", 512)
    with pytest.raises(CodecError, match="block_size 512 is not 1024"):
        decode(bytes(rotated), (40,))


def test_rice_gaps_that_would_overflow_int64_are_refused() -> None:
    # b = 62 and gaps of 2**62 - 1: the positions' running sum would wrap around int64.
    n, k, b = 100, 5, 62
    gaps_ = [0] + [(1 << 62) - 1] * 4
    bits = [(g >> i) & 1 for g in gaps_ for i in range(b)]
    remainders = np.packbits(np.array(bits, dtype=np.uint8), bitorder="little").tobytes()
    with pytest.raises(CodecError, match="gap reaches past 100"):
        rice.decode_positions(b"\x00", remainders, k, b, n)
    header = bytes.fromhex("464743 01 06") + struct.pack("<Q", n) + struct.pack("<BQfI", b, k, 1.0, 1)
    with pytest.raises(CodecError):
        decode(header + b"\x00" + remainders + b"\x00", (n,))


@pytest.mark.parametrize("text", ALL_CODECS)
def test_mutated_payloads_raise_codec_error_or_decode_to_the_shape(text: str) -> None:
    # Fuzzing by seeded byte flips, cuts and insertions: a server never sees any other
    # exception from decode, and never an array of another shape.
    rng = np.random.default_rng(sum(map(ord, text)))
    x = rng.standard_normal((6, 50)).astype(np.float32)
    valid = encode(x, parse_codec(text), rng, rotation_seed=3)
    for _ in range(300):
        data = bytearray(valid)
        action = rng.integers(3)
        position = int(rng.integers(len(data)))
        if action == 0:
            data[position] = int(rng.integers(256))
        elif action == 1:
            del data[position:]
        else:
            data[position:position] = bytes(
                rng.integers(0, 256, size=int(rng.integers(1, 5)), dtype=np.uint8)
            )
        try:
            out = decode(bytes(data), (6, 50))
        except CodecError:
            continue
        assert out.shape == (6, 50) and out.dtype == np.float32
