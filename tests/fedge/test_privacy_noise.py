"""Clipping, Gaussian noise, adaptive clipping, discrete Gaussian and Skellam samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedge.privacy import (
    AdaptiveClip,
    clip_l2,
    discrete_gaussian,
    gaussian_noise,
    global_l2_norm,
    noised_fraction_below,
    skellam,
)
from fedge.rng import SeededSecretSource


def source(seed: int) -> SeededSecretSource:
    return SeededSecretSource(np.random.default_rng(seed))


# --- clipping


def update(scale: float) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return {
        "weights": {
            "w": (scale * rng.standard_normal((3, 4))).astype(np.float32),
            "b": np.float32(scale) * np.ones(4, np.float32),
        },
        "extra": {"v": scale * rng.standard_normal(5)},
    }


def test_clip_l2_uses_one_global_norm_over_every_record() -> None:
    x = update(10.0)
    flat = np.concatenate([np.asarray(a, np.float64).ravel() for r in x.values() for a in r.values()])
    clipped, norm = clip_l2(x, 1.5)
    assert norm == pytest.approx(np.linalg.norm(flat), rel=1e-12)
    assert global_l2_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    for record in x:
        for name in x[record]:
            assert clipped[record][name].dtype == np.asarray(x[record][name]).dtype
            np.testing.assert_allclose(clipped[record][name], x[record][name] * (1.5 / norm), rtol=1e-6)


def test_clip_l2_leaves_small_and_zero_updates_alone() -> None:
    x = update(0.01)
    clipped, norm = clip_l2(x, 100.0)
    assert norm < 100.0
    for record in x:
        for name in x[record]:
            np.testing.assert_array_equal(clipped[record][name], x[record][name])
    zero = {"r": {"w": np.zeros(3, np.float32)}}
    clipped, norm = clip_l2(zero, 1.0)
    assert norm == 0.0 and not clipped["r"]["w"].any()


def test_clip_l2_errors() -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        clip_l2(update(1.0), 0.0)
    with pytest.raises(TypeError, match="integer buffers"):
        clip_l2({"r": {"n": np.arange(3)}}, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        clip_l2({"r": {"w": np.array([np.nan], np.float32)}}, 1.0)


# --- Gaussian noise


def test_gaussian_noise_comes_from_the_secret_source() -> None:
    state = np.random.get_state()
    a = gaussian_noise((200, 500), 3.0, source(1))
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # numpy's global state untouched
    b = gaussian_noise((200, 500), 3.0, source(1))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float64 and a.shape == (200, 500)
    assert not np.array_equal(a, gaussian_noise((200, 500), 3.0, source(2)))
    # n = 1e5: sd of the sample std is 3 / sqrt(2n) = 0.0067, of the mean 0.0095.
    assert abs(a.std() - 3.0) < 0.04 and abs(a.mean()) < 0.05
    assert gaussian_noise(7, 0.0, source(1)).tolist() == [0.0] * 7


# --- adaptive clipping


def test_adaptive_clip_geometric_update() -> None:
    clip = AdaptiveClip(1.0, 0.5, 0.2, count_noise_std=0.0)
    assert clip.update(0.9) == pytest.approx(math.exp(-0.2 * 0.4), rel=1e-15)
    assert clip.update(0.1) == pytest.approx(1.0, rel=1e-15)
    assert clip.is_below(1.0) and not clip.is_below(1.0 + 1e-9)


def test_adaptive_clip_tracks_the_target_quantile() -> None:
    # Norms uniform on [0, 4]: the 0.3 quantile is 1.2. Noiseless fractions, 300 rounds.
    norms = np.linspace(0.0, 4.0, 10_001)
    clip = AdaptiveClip(0.05, 0.3, 0.2, count_noise_std=0.0)
    for _ in range(300):
        below = float(np.sum(norms <= clip.clip))
        clip.update(noised_fraction_below(below, norms.size, norms.size, 0.0, source(0)))
    assert clip.clip == pytest.approx(1.2, rel=0.01)


def test_noised_fraction_below_is_the_shifted_noised_count() -> None:
    noise = source(5).normal(1, 4.0)[0]
    got = AdaptiveClip(1.0, 0.5, count_noise_std=4.0).noised_fraction(30, 50, 40.0, source(5))
    assert got == pytest.approx((30 - 25 + noise) / 40.0 + 0.5, rel=1e-15)
    assert noised_fraction_below(30, 50, 50, 0.0, source(5)) == pytest.approx(0.6, rel=1e-15)


def test_adaptive_clip_state_round_trip() -> None:
    clip = AdaptiveClip(2.0, 0.5, count_noise_std=3.0)
    clip.update(0.8)
    state = {k: np.array(v) for k, v in clip.state_dict().items()}
    resumed = AdaptiveClip(2.0, 0.5, count_noise_std=3.0)
    resumed.load_state_dict(state)
    assert resumed.clip == clip.clip
    with pytest.raises(ValueError, match="saved arguments"):
        AdaptiveClip(2.0, 0.6, count_noise_std=3.0).load_state_dict(state)


# --- discrete samplers: chi-square against the pmf at a fixed seed


def chi_square_ok(samples: np.ndarray, support: np.ndarray, pmf: np.ndarray) -> tuple[float, float]:
    """Chi-square statistic and its p = 0.001 critical value.

    One bin per value with expected count >= 5, and one bin for each tail beyond them
    (merged into the edge bin when its expected count is below 5). ``support`` must hold
    all but a negligible mass of ``pmf``.
    """
    n = samples.size
    keep = np.flatnonzero(n * pmf >= 5)
    lo, hi = support[keep[0]], support[keep[-1]]
    inner = support[keep[0] : keep[-1] + 1]
    observed = np.bincount(np.clip(samples, lo, hi) - lo, minlength=inner.size).astype(float)
    expected = n * pmf[keep[0] : keep[-1] + 1].copy()
    expected[0] += n * pmf[: keep[0]].sum()  # the edge bins now hold their tails
    expected[-1] += n * pmf[keep[-1] + 1 :].sum()
    left_tail, right_tail = n * pmf[: keep[0]].sum(), n * pmf[keep[-1] + 1 :].sum()
    obs, exp = list(observed), list(expected)
    if left_tail >= 5:  # split the tail off the edge bin
        obs[0:1] = [float(np.sum(samples < lo)), float(np.sum(samples == lo))]
        exp[0:1] = [left_tail, expected[0] - left_tail]
    if right_tail >= 5:
        obs[-1:] = [float(np.sum(samples == hi)), float(np.sum(samples > hi))]
        exp[-1:] = [expected[-1] - right_tail, right_tail]
    o, e = np.array(obs), np.array(exp)
    return float(np.sum((o - e) ** 2 / e)), float(stats.chi2.ppf(0.999, o.size - 1))


def discrete_gaussian_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    support = np.arange(-int(40 * sigma) - 20, int(40 * sigma) + 21)
    w = np.exp(-(support.astype(float) ** 2) / (2 * sigma * sigma))
    return support, w / w.sum()


@pytest.mark.parametrize("sigma, seed", [(0.4, 11), (1.0, 12), (2.7, 13), (12.0, 14)])
def test_discrete_gaussian_matches_its_pmf(sigma: float, seed: int) -> None:
    n = 200_000
    x = discrete_gaussian(n, sigma, source(seed))
    assert x.dtype == np.int64 and x.shape == (n,)
    support, pmf = discrete_gaussian_pmf(sigma)
    stat, critical = chi_square_ok(x, support, pmf)
    assert stat < critical
    # The test has power: 3% off in sigma fails it.
    wrong = np.exp(-(support.astype(float) ** 2) / (2 * (1.03 * sigma) ** 2))
    wrong /= wrong.sum()
    assert chi_square_ok(x, support, wrong)[0] > critical
    # Mean 0; variance the exact pmf's (below sigma**2 for small sigma: 0.4 -> 0.0772).
    var = float(np.sum(pmf * support**2))
    fourth = float(np.sum(pmf * support.astype(float) ** 4))
    if sigma < 1:
        assert var < 0.6 * sigma**2
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    assert abs(x.var() - var) < 5 * math.sqrt((fourth - var * var) / n)


def test_discrete_gaussian_edge_cases_and_reproducibility() -> None:
    assert discrete_gaussian(5, 0.0, source(0)).tolist() == [0] * 5
    assert discrete_gaussian(0, 3.0, source(0)).size == 0
    np.testing.assert_array_equal(
        discrete_gaussian(1000, 3.0, source(4)), discrete_gaussian(1000, 3.0, source(4))
    )
    with pytest.raises(ValueError, match="sigma"):
        discrete_gaussian(5, -1.0, source(0))


@pytest.mark.parametrize("mu, seed", [(0.3, 21), (4.0, 22), (30.0, 23), (800.0, 24)])
def test_skellam_matches_its_pmf(mu: float, seed: int) -> None:
    n = 200_000
    x = skellam(n, mu, source(seed))
    assert x.dtype == np.int64
    half = int(12 * math.sqrt(2 * mu)) + 15
    support = np.arange(-half, half + 1)
    pmf = stats.skellam.pmf(support, mu, mu)
    assert pmf.sum() > 1 - 1e-9
    stat, critical = chi_square_ok(x, support, pmf)
    assert stat < critical
    # Mean 0, variance 2 mu, fourth central moment 2 mu + 3 (2 mu)^2.
    assert abs(x.mean()) < 5 * math.sqrt(2 * mu / n)
    assert abs(x.var() - 2 * mu) < 5 * math.sqrt((2 * mu + 2 * (2 * mu) ** 2) / n)
