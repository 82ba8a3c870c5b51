"""Central DP on the round loop: accounting against dp_accounting itself, the noise's moments,
clipping of every decoded update, the budget stop, and the accountant across a resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fedge.aggregation import Aggregate
from fedge.config import ConfigError, RunConfig
from fedge.privacy.noise import global_l2_norm
from fedge.records import numpy_to_arrays
from fedge.rng import SeededSecretSource
from fedge.server.loop import RoundLoop
from fedge.server.privacy import CentralDP, PrivacyBudgetError
from fedge.server.transport import poisson_sample
from fedge.simulation.grid import InProcessGrid
from fedge.training import EvalResult

SHAPES = {"conv.weight": (4, 1, 3, 3), "fc.weight": (10, 12), "fc.bias": (10,)}
BASE = {"num-clients": 6, "clients-per-round": 4, "num-rounds": 3, "dp": "central", "noise-multiplier": 1.1}
Rel = dp_accounting_rel = rdp_privacy_accountant.NeighborRel


def _eval(arrays: ArrayRecord) -> EvalResult:
    return EvalResult(num_examples=1, loss=0.0, accuracy=float(arrays["fc.bias"].numpy().mean()))


def _initial() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return numpy_to_arrays({k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()})


class _Recording(CentralDP):
    """Records the norm of every decoded update after the server's clip."""

    def __init__(self, cfg: RunConfig, seed: int) -> None:
        super().__init__(cfg, SeededSecretSource(np.random.default_rng(seed)))
        self.before: list[float] = []
        self.after: list[float] = []

    def clip(self, updates):  # type: ignore[no-untyped-def]
        self.before.append(global_l2_norm(updates))
        clipped = super().clip(updates)
        self.after.append(global_l2_norm(clipped))
        return clipped


def _run(tmp_path: Path, app: str = "seamapps:random_app", seed: int = 1, **overrides: object) -> RoundLoop:
    cfg = RunConfig.from_mapping({**BASE, **overrides})
    loop = RoundLoop(cfg, FedAvg(), _initial(), _eval, tmp_path, privacy=_Recording(cfg, seed))
    with InProcessGrid(app, cfg.num_clients, {}, workers=1) as grid:
        loop.run(grid)
    return loop


def _reference(sampling: str, kind: str, z: float, rounds: int, delta: float) -> float:
    """Epsilon straight from dp_accounting for ``rounds`` rounds of 4 of 6 clients."""
    if sampling == "poisson":
        relation = Rel.ADD_OR_REMOVE_ONE
        event: dp_event.DpEvent = dp_event.PoissonSampledDpEvent(4 / 6, dp_event.GaussianDpEvent(z))
    else:  # replace one client: the clipped sum moves by up to 2 C, so noise z C is multiplier z / 2
        relation = Rel.REPLACE_ONE
        event = dp_event.SampledWithoutReplacementDpEvent(6, 4, dp_event.GaussianDpEvent(z / 2))
    accountant = (
        rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
        if kind == "rdp"
        else pld_privacy_accountant.PLDAccountant(neighboring_relation=relation)
    )
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("sampling", "kind"), [("fixed", "rdp"), ("poisson", "rdp"), ("poisson", "pld")])
def test_each_rounds_epsilon_is_dp_accountings_for_the_same_events(
    tmp_path: Path, sampling: str, kind: str
) -> None:
    loop = _run(tmp_path, **{"client-sampling": sampling, "accountant": kind})
    assert len(loop.history) == 3
    for record in loop.history:
        assert record.privacy is not None
        expected = _reference(sampling, kind, 1.1, record.round, 1e-5)
        # PLD: dp_accounting's default discretization here vs fedge's finer one.
        assert record.privacy["epsilon"] == pytest.approx(expected, rel=1e-9 if kind == "rdp" else 2e-2)
        assert record.privacy["rounds"] == record.round and record.privacy["delta"] == 1e-5
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["privacy"]["epsilon"] for x in lines] == [r.privacy["epsilon"] for r in loop.history]  # type: ignore[index]


def test_every_decoded_update_is_clipped_by_the_server_and_the_client(tmp_path: Path) -> None:
    # random_app sends updates of norm ~0.4 with no client clip: the server clips each to C.
    loop = _run(tmp_path, **{"clip-norm": 0.1})
    assert isinstance(loop.privacy, _Recording)
    assert max(loop.privacy.before) > 0.1
    assert max(loop.privacy.after) <= 0.1 * (1 + 1e-9)
    # secaggapps' honest_app runs fedge's update pipeline: its clip stage bounds what it sends.
    loop = _run(tmp_path / "client", app="secaggapps:honest_app", **{"clip-norm": 0.1})
    assert isinstance(loop.privacy, _Recording)
    assert max(loop.privacy.before) <= 0.1 * (1 + 1e-6)


def test_the_noise_on_the_sum_has_the_formulas_moments() -> None:
    cfg = RunConfig.from_mapping({**BASE, "clip-norm": 0.5, "noise-multiplier": 2.0})
    dp = CentralDP(cfg, SeededSecretSource(np.random.default_rng(7)))
    n = 400_000
    zero = Aggregate({"arrays": {"w": np.zeros(n)}}, total_weight=3.0, num_clients=3)
    noised = dp.privatize(1, zero)
    assert noised.total_weight == 4.0  # the expected cohort, not the 3 that replied
    values = noised.weighted_sum["arrays"]["w"]
    std = 2.0 * 0.5
    assert abs(values.mean()) < 5 * std / math.sqrt(n)
    # Var of the sample variance of a Gaussian: 2 sigma^4 / (n - 1).
    assert abs(values.var() - std**2) < 5 * math.sqrt(2 / (n - 1)) * std**2
    with pytest.raises(ValueError, match="weight 1 per client"):
        dp.privatize(1, Aggregate({"arrays": {"w": np.zeros(3)}}, total_weight=7.0, num_clients=3))


def test_the_round_that_would_pass_the_budget_is_not_run(tmp_path: Path) -> None:
    two = _reference("poisson", "rdp", 1.1, 2, 1e-5)
    three = _reference("poisson", "rdp", 1.1, 3, 1e-5)
    budget = (two + three) / 2
    loop = _run(tmp_path, **{"client-sampling": "poisson", "target-epsilon": budget, "num-rounds": 5})
    assert len(loop.history) == 2
    assert loop.stop_reason is not None and "round 3 would bring epsilon" in loop.stop_reason
    assert loop.history[-1].privacy["epsilon"] <= budget  # type: ignore[index]


def test_a_budget_the_first_round_exceeds_is_refused_before_round_one(tmp_path: Path) -> None:
    first = _reference("poisson", "rdp", 1.1, 1, 1e-5)
    with pytest.raises(PrivacyBudgetError, match="spent by the first round alone"):
        _run(tmp_path, **{"client-sampling": "poisson", "target-epsilon": first / 2})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_resumed_run_reports_the_uninterrupted_runs_epsilon(tmp_path: Path) -> None:
    straight = _run(tmp_path / "straight", **{"num-rounds": 4})
    _run(tmp_path / "resumed", **{"num-rounds": 2})
    cfg = RunConfig.from_mapping({**BASE, "num-rounds": 4})
    loop = RoundLoop(cfg, FedAvg(), _initial(), _eval, tmp_path / "resumed", privacy=_Recording(cfg, 2))
    assert loop.resume() == 2
    assert loop.privacy is not None and loop.privacy.accountant.rounds == 2
    with InProcessGrid("seamapps:random_app", cfg.num_clients, {}, workers=1) as grid:
        loop.run(grid)
    assert [r.privacy["epsilon"] for r in loop.history] == [r.privacy["epsilon"] for r in straight.history]  # type: ignore[index]


def test_poisson_sampling_is_seeded_and_has_the_rate() -> None:
    nodes = list(range(100, 1100))
    assert poisson_sample(nodes, 0.1, 42, 3) == poisson_sample(list(reversed(nodes)), 0.1, 42, 3)
    sizes = [len(poisson_sample(nodes, 0.1, 42, r)) for r in range(1, 201)]
    # Binomial(1000, 0.1): mean 100, sd 9.5; the mean of 200 rounds is within 5 sd / sqrt(200).
    assert abs(np.mean(sizes) - 100) < 5 * 9.49 / math.sqrt(200)
    assert len(set(sizes)) > 10


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "krum"}, "cannot run with differential privacy"),
        ({"secagg": True}, "distributed DP"),
        ({"accountant": "pld"}, "PLD accountant covers Poisson sampling only"),
        ({"noise-multiplier": 0.0}, "noise-multiplier must be a number > 0"),
        ({"clip-norm": -1.0}, "clip-norm must be a number > 0"),
        ({"target-delta": 1.0}, "target-delta must be in"),
        ({"dp": "local"}, "unknown dp"),
    ],
)
def test_bad_privacy_settings_are_refused_with_the_fix(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({**BASE, **overrides})


def test_adaptive_clipping_moves_the_clip_toward_the_quantile(tmp_path: Path) -> None:
    # Every honest_app update (norm < 1) is under the first clip 5, so the noised fraction
    # below is ~1 and the clip shrinks by exp(-0.2 (b - 0.5)) a round (Andrew et al. 2021).
    overrides = {
        "clip-norm": 5.0,
        "clip-quantile": 0.5,
        "noise-multiplier": 0.3,
        "clip-count-stddev": 0.2,
        "client-sampling": "poisson",
    }
    loop = _run(tmp_path, app="secaggapps:honest_app", **overrides)
    clips = [5.0] + [r.privacy["clip_norm"] for r in loop.history]  # type: ignore[index]
    for before, after, record in zip(clips, clips[1:], loop.history, strict=False):
        # b = (count - n/2 + N(0, 0.2^2)) / 4 + 1/2 with count = n (all below): within 5 sigma.
        n = record.clients
        low, high = (n / 2 - 1.0) / 4 + 0.5, (n / 2 + 1.0) / 4 + 0.5
        assert math.exp(-0.2 * (high - 0.5)) <= after / before <= math.exp(-0.2 * (low - 0.5))
    # The sum's noise is raised so that the accounted (effective) multiplier stays 0.3.
    privacy = loop.history[-1].privacy
    assert privacy is not None and privacy["sum_noise_multiplier"] == pytest.approx(
        (0.3**-2 - 0.4**-2) ** -0.5
    )
    assert privacy["epsilon"] == pytest.approx(_reference("poisson", "rdp", 0.3, 3, 1e-5), rel=1e-9)
    # The clip travels in the checkpoint.
    assert loop.privacy is not None
    state = loop.privacy.state_dict()
    fresh = CentralDP(RunConfig.from_mapping({**BASE, **overrides}))
    fresh.load_state_dict(state)
    assert fresh.clip_norm == loop.privacy.clip_norm and fresh.accountant.rounds == 3


def test_adaptive_clipping_that_would_spend_the_whole_noise_is_refused() -> None:
    with pytest.raises(ConfigError, match="would spend all of noise-multiplier"):
        RunConfig.from_mapping({**BASE, "clip-quantile": 0.5})  # sigma_b = 4 / 20: 2 sigma_b < 1.1


def test_the_round_reports_the_largest_device_epsilon_of_dp_sgd(tmp_path: Path) -> None:
    from fedge.server.transport import sample_clients

    cfg = RunConfig.from_mapping({**BASE, "dp": "none", "dp-sgd": True, "num-rounds": 2})
    loop = RoundLoop(cfg, FedAvg(), _initial(), _eval, tmp_path)
    with InProcessGrid("seamapps:epsilon_app", cfg.num_clients, {}, workers=1) as grid:
        loop.run(grid)
        partition = {n: int(grid.context(n).node_config["partition-id"]) for n in grid.get_node_ids()}
        for record in loop.history:
            sampled = sample_clients(list(partition), 4, cfg.seed, record.round)
            expected = max(0.5 * (partition[n] + 1) for n in sampled)  # what epsilon_app reports
            assert record.privacy == {"dp_sgd_epsilon_max": expected}
