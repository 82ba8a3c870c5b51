"""calibrate: the noise multiplier meets the target epsilon, tightly, as the accountant sees it."""

from __future__ import annotations

import pytest

from fedge.privacy import PrivacyAccountant, calibrate

DELTA = 1e-5


@pytest.mark.parametrize(
    "target, rounds, kind, sampling, q, n, m",
    [
        (2.0, 200, "rdp", "poisson", 0.01, None, None),
        (8.0, 1, "rdp", "poisson", 1.0, None, None),
        (1.0, 20, "pld", "poisson", 0.05, None, None),
        (4.0, 30, "rdp", "fixed", None, 1000, 50),
    ],
)
def test_calibrated_noise_meets_the_target(
    target: float, rounds: int, kind: str, sampling: str, q: float | None, n: int | None, m: int | None
) -> None:
    z = calibrate(target, DELTA, rounds, q, kind=kind, sampling=sampling, population=n, cohort=m)  # type: ignore[arg-type]
    acc = PrivacyAccountant(kind, sampling, z, sample_rate=q, population=n, cohort=m)  # type: ignore[arg-type]
    acc.step(rounds)
    eps = acc.epsilon(DELTA)
    assert target - 1e-3 <= eps <= target
    # 1% less noise overspends: z is (nearly) the smallest that meets the target.
    less = PrivacyAccountant(kind, sampling, z * 0.99, sample_rate=q, population=n, cohort=m)  # type: ignore[arg-type]
    less.step(rounds)
    assert less.epsilon(DELTA) > target


def test_calibrate_refuses_what_it_cannot_reach() -> None:
    with pytest.raises(ValueError, match="kind='rdp'"):
        calibrate(1.0, DELTA, 10, None, kind="pld", sampling="fixed", population=100, cohort=10)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate(0.0, DELTA, 10, 0.1)
