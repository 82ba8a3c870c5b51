"""PrivacyAccountant against closed forms and against dp_accounting driven directly."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, stats

from fedge.privacy import PrivacyAccountant, effective_noise_multiplier, sum_noise_multiplier

DELTA = 1e-5
REPLACE_ONE = dp_accounting.privacy_accountant.NeighboringRelation.REPLACE_ONE


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity 1 and std ``sigma``.

    Balle & Wang, "Improving the Gaussian Mechanism for Differential Privacy", ICML 2018,
    Theorem 8: delta(eps) = Phi(1/(2 s) - eps s) - exp(eps) Phi(-1/(2 s) - eps s).
    """

    def gap(eps: float) -> float:
        a = stats.norm.cdf(0.5 / sigma - eps * sigma)
        b = math.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma)
        return a - b - delta

    return float(optimize.brentq(gap, 0.0, 500.0, xtol=1e-12))


@pytest.mark.parametrize("z, rounds", [(1.0, 1), (2.0, 1), (3.0, 16)])
def test_pld_without_subsampling_matches_the_analytic_gaussian(z: float, rounds: int) -> None:
    # T Gaussians of noise multiplier z compose to one Gaussian of z / sqrt(T).
    acc = PrivacyAccountant("pld", "poisson", z, sample_rate=1.0)
    acc.step(rounds)
    exact = analytic_gaussian_epsilon(z / math.sqrt(rounds), DELTA)
    assert exact <= acc.epsilon(DELTA) <= exact * 1.01 + 1e-3  # pessimistic discretization


@pytest.mark.parametrize("z, rounds", [(1.0, 1), (3.0, 16)])
def test_rdp_without_subsampling_lies_between_exact_and_classic_conversion(z: float, rounds: int) -> None:
    acc = PrivacyAccountant("rdp", "poisson", z, sample_rate=1.0)
    acc.step(rounds)
    eps = acc.epsilon(DELTA)
    exact = analytic_gaussian_epsilon(z / math.sqrt(rounds), DELTA)
    # Gaussian RDP: eps(alpha) = T alpha / (2 z^2); classic conversion + log(1/delta)/(alpha-1).
    orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=float)
    orders = orders[orders > 1]
    classic = np.min(rounds * orders / (2 * z * z) + math.log(1 / DELTA) / (orders - 1))
    assert exact < eps <= classic + 1e-12


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_poisson_rounds_equal_dp_accounting_directly(kind: str) -> None:
    q, z, rounds = 0.02, 1.1, 200
    acc = PrivacyAccountant(kind, "poisson", z, sample_rate=q)
    acc.step(rounds // 2)
    acc.step(rounds // 2)
    assert acc.rounds == rounds
    ref = (
        rdp_privacy_accountant.RdpAccountant()
        if kind == "rdp"
        else pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    )
    ref.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    assert acc.epsilon(DELTA) == ref.get_epsilon(DELTA)
    # Subsampling amplifies: far below the unsampled mechanism.
    assert acc.epsilon(DELTA) < analytic_gaussian_epsilon(z / math.sqrt(rounds), DELTA) / 3


def test_pld_is_tighter_than_rdp() -> None:
    rdp = PrivacyAccountant("rdp", "poisson", 1.0, sample_rate=0.01)
    pld = PrivacyAccountant("pld", "poisson", 1.0, sample_rate=0.01)
    rdp.step(500)
    pld.step(500)
    assert pld.epsilon(DELTA) < rdp.epsilon(DELTA)


def test_fixed_size_sampling_uses_replace_one_and_sensitivity_two_c() -> None:
    z, n, m, rounds = 1.5, 1000, 20, 50
    acc = PrivacyAccountant("rdp", "fixed", z, population=n, cohort=m)
    acc.step(rounds)
    ref = rdp_privacy_accountant.RdpAccountant(neighboring_relation=REPLACE_ONE)
    ref.compose(dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(z / 2)), rounds)
    assert acc.epsilon(DELTA) == ref.get_epsilon(DELTA)

    # The whole population every round: a Gaussian of std z C on a sum that moves by 2 C.
    full = PrivacyAccountant("rdp", "fixed", z, population=n, cohort=n)
    full.step(4)
    exact = analytic_gaussian_epsilon(z / 2 / math.sqrt(4), DELTA)
    assert exact < full.epsilon(DELTA) < 1.3 * exact
    plain = PrivacyAccountant("rdp", "poisson", z / 2, sample_rate=1.0)
    plain.step(4)
    assert full.epsilon(DELTA) == pytest.approx(plain.epsilon(DELTA), rel=1e-9)


def test_refusals_say_how_to_fix() -> None:
    with pytest.raises(ValueError, match="kind='rdp'"):
        PrivacyAccountant("pld", "fixed", 1.0, population=100, cohort=10)
    with pytest.raises(ValueError, match="sample_rate"):
        PrivacyAccountant("rdp", "poisson", 1.0)
    with pytest.raises(ValueError, match="cohort"):
        PrivacyAccountant("rdp", "fixed", 1.0, population=10, cohort=11)
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyAccountant("rdp", "poisson", 0.0, sample_rate=0.1)
    acc = PrivacyAccountant("pld", "poisson", 1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="cannot account"):
        acc.compose(dp_event.SingleEpochTreeAggregationDpEvent(1.0, [1]))
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon(0.0)


def test_per_round_noise_multipliers_and_extra_events_compose() -> None:
    q = 0.05
    acc = PrivacyAccountant("rdp", "poisson", 1.0, sample_rate=q)
    assert acc.epsilon(DELTA) == 0.0
    acc.step(30)
    acc.step(10, noise_multiplier=2.0)
    acc.step(5)
    acc.compose(dp_event.GaussianDpEvent(20.0), count=3)  # e.g. a noised metric on everyone
    assert acc.rounds == 45
    ref = rdp_privacy_accountant.RdpAccountant()
    ref.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.0)), 35)
    ref.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(2.0)), 10)
    ref.compose(dp_event.GaussianDpEvent(20.0), 3)
    assert acc.epsilon(DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-12)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_if_equals_epsilon_after_the_step(kind: str) -> None:
    acc = PrivacyAccountant(kind, "poisson", 1.2, sample_rate=0.02)
    acc.step(40)
    before = acc.epsilon(DELTA)
    projected = acc.epsilon_if(25, DELTA)
    assert acc.epsilon(DELTA) == before and acc.rounds == 40
    acc.step(25)
    assert acc.epsilon(DELTA) == projected > before
    assert acc.epsilon_if(0, DELTA) == projected


@pytest.mark.parametrize(
    "args",
    [
        ("rdp", "poisson", 0.9, 0.03, None, None),
        ("pld", "poisson", 0.9, 0.03, None, None),
        ("rdp", "fixed", 0.9, None, 500, 25),
    ],
)
def test_resumed_accountant_reports_exactly_the_same_epsilon(args: tuple) -> None:
    kind, sampling, z, q, n, m = args
    acc = PrivacyAccountant(kind, sampling, z, sample_rate=q, population=n, cohort=m)
    acc.step(20)
    acc.step(7, noise_multiplier=1.7)
    acc.step(3)
    state = acc.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    copy = {k: np.array(v) for k, v in state.items()}  # as if through a checkpoint file
    resumed = PrivacyAccountant(kind, sampling, z, sample_rate=q, population=n, cohort=m)
    resumed.load_state_dict(copy)
    assert resumed.rounds == 30
    assert resumed.epsilon(DELTA) == acc.epsilon(DELTA)
    if kind == "rdp" and sampling == "poisson":  # (the others rebuild slowly)
        acc.step(5)
        resumed.step(5)
        assert resumed.epsilon(1e-6) == acc.epsilon(1e-6)

    other = PrivacyAccountant(kind, sampling, z * 2, sample_rate=q, population=n, cohort=m)
    with pytest.raises(ValueError, match="saved arguments"):
        other.load_state_dict(copy)


def test_adaptive_clipping_noise_split_matches_dp_accounting_composition() -> None:
    z, sigma_b, q, rounds = 1.0, 5.0, 0.05, 100
    z_sum = sum_noise_multiplier(z, sigma_b)
    assert z_sum == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-15)
    assert z < z_sum
    assert effective_noise_multiplier(z_sum, sigma_b) == pytest.approx(z, rel=1e-12)
    # dp_accounting composes the sum (noise multiplier z_sum) and the shifted count
    # (sensitivity 1/2, std sigma_b: noise multiplier 2 sigma_b) on the same Poisson sample.
    both = dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(z_sum), dp_event.GaussianDpEvent(2 * sigma_b)])
    ref = rdp_privacy_accountant.RdpAccountant()
    ref.compose(dp_event.PoissonSampledDpEvent(q, both), rounds)
    acc = PrivacyAccountant("rdp", "poisson", z, sample_rate=q)
    acc.step(rounds)
    assert acc.epsilon(DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-9)
    with pytest.raises(ValueError, match=r"raise count_noise_std above 0\.5"):
        sum_noise_multiplier(1.0, 0.5)
