"""Central differential privacy on the server: clip, noise the sum, account, stop at a budget.

User-level DP with a trusted server (McMahan, Ramage, Talwar, Zhang, "Learning Differentially
Private Recurrent Language Models", ICLR 2018), on the round loop's aggregate seam:

1. each client clips its update (residual included) to ``clip-norm`` ``C`` in its update
   pipeline (:class:`fedge.client.privacy.ClipStage`); the server re-clips every *decoded*
   update to ``C`` (:meth:`CentralDP.clip`), since a codec may stretch it (qsgd's rounding);
2. the loop sums the clipped updates with **uniform weights** (every client counts 1: the
   sensitivity of the sum to one client's data is then ``C``, what the accountant assumes;
   example-weighted sums would let a client with many examples move it further);
3. :meth:`CentralDP.privatize` adds Gaussian noise of std ``noise-multiplier * C`` to every
   element of the sum and divides by the **expected** cohort (``clients-per-round``; under
   Poisson sampling the actual cohort size is itself private), so the strategy's server
   optimizer (FedAvgM's momentum, FedAdam's moments) only ever sees the noised mean;
4. the accountant (:class:`fedge.privacy.PrivacyAccountant`, ``dp_accounting``'s RDP or PLD)
   composes one sampled Gaussian mechanism per round run, with the amplification the
   sampling gives: Poisson (rate ``q = clients-per-round / num-clients``) or fixed-size
   sampling without replacement. A round is counted whether or not it aggregated: its
   clients were asked, so the analysis must assume the release.

Noise comes from the secret source (:func:`fedge.rng.default_secret_source`), never from the
run seed. The accountant's state is in the checkpoint (component ``accountant``), so a
resumed run spends no privacy twice and loses none.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from fedge.aggregation import Aggregate
from fedge.config import ConfigError, RunConfig
from fedge.privacy import AdaptiveClip, PrivacyAccountant, clip_l2, gaussian_noise, sum_noise_multiplier
from fedge.rng import SecretSource, default_secret_source

log = logging.getLogger("fedge.server")

__all__ = ["CentralDP", "PrivacyBudgetError"]


class PrivacyBudgetError(ConfigError):
    """The budget is spent before the first round: nothing can run (exit status 2)."""


class CentralDP:
    """The server side of ``dp = "central"``.

    Parameters
    ----------
    cfg : RunConfig
        ``clip-norm``, ``noise-multiplier``, ``target-delta``, ``target-epsilon``,
        ``accountant``, ``client-sampling``, ``clients-per-round``, ``num-clients``.
    source : SecretSource, optional
        Where the noise comes from; default the operating system's CSPRNG (tests pass a
        seeded one).
    """

    def __init__(self, cfg: RunConfig, source: SecretSource | None = None) -> None:
        self.cfg = cfg
        self.noise_multiplier = float(cfg.noise_multiplier)
        # Adaptive clipping (Andrew et al. 2021): the clip follows a quantile of the norms
        # through a noised count; the sum's noise grows so that the round's effective noise
        # multiplier (what the accountant composes) stays noise-multiplier.
        self.adaptive: AdaptiveClip | None = None
        self.sum_noise_multiplier = self.noise_multiplier
        if cfg.clip_quantile > 0:
            self.adaptive = AdaptiveClip(
                cfg.clip_norm, cfg.clip_quantile, count_noise_std=cfg.count_noise_std()
            )
            self.sum_noise_multiplier = sum_noise_multiplier(self.noise_multiplier, cfg.count_noise_std())
        self._fixed_clip = float(cfg.clip_norm)
        self.delta = float(cfg.target_delta)
        self.source = source or default_secret_source()
        self.expected_cohort = cfg.clients_per_round
        kind: Literal["rdp", "pld"] = "pld" if cfg.accountant == "pld" else "rdp"
        if cfg.client_sampling == "poisson":
            self.accountant = PrivacyAccountant(
                kind, "poisson", self.noise_multiplier, sample_rate=cfg.sample_rate()
            )
        else:
            self.accountant = PrivacyAccountant(
                kind,
                "fixed",
                self.noise_multiplier,
                population=cfg.num_clients,
                cohort=cfg.clients_per_round,
            )
        self.reclipped = 0

    @property
    def clip_norm(self) -> float:
        """This round's clip ``C`` (adaptive clipping moves it between rounds)."""
        return self.adaptive.clip if self.adaptive is not None else self._fixed_clip

    # -- budget ---------------------------------------------------------------------------
    def epsilon(self) -> float:
        """Epsilon spent so far, at ``target-delta``."""
        return self.accountant.epsilon(self.delta) if self.accountant.rounds else 0.0

    def budget_allows_next_round(self) -> tuple[bool, float]:
        """Whether one more round stays within ``target-epsilon`` (always, without a budget)."""
        after = self.accountant.epsilon_if(1, self.delta)
        budget = self.cfg.target_epsilon
        return (budget <= 0 or after <= budget), after

    def check_first_round(self) -> None:
        """Refuse a budget that even the first round would exceed.

        Raises
        ------
        PrivacyBudgetError
            With the epsilon one round costs and how to fix it.
        """
        if self.accountant.rounds:
            return
        allowed, after = self.budget_allows_next_round()
        if not allowed:
            raise PrivacyBudgetError(
                f"target-epsilon {self.cfg.target_epsilon} is spent by the first round alone (epsilon "
                f"{after:.4g} at delta {self.delta:g}); raise target-epsilon, raise noise-multiplier "
                "(fedge privacy calibrate prints one), or sample fewer clients a round"
            )

    # -- the round --------------------------------------------------------------------------
    def clip(self, updates: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
        """A decoded update clipped to ``C`` (the client clipped it; a codec may stretch it)."""
        clipped, norm = clip_l2(updates, self.clip_norm)
        if norm > self.clip_norm * (1 + 1e-6):
            self.reclipped += 1
        return clipped

    def privatize(self, server_round: int, aggregate: Aggregate) -> Aggregate:
        """The noised sum over the expected cohort: ``(sum + N(0, (z C)^2)) / E[cohort]``.

        ``aggregate`` must hold a uniform-weight sum (weight 1 per client). The result's
        ``total_weight`` is the expected cohort, so its :meth:`~Aggregate.mean` is the DP mean.
        """
        if not math.isclose(aggregate.total_weight, aggregate.num_clients):
            raise ValueError("central DP needs a sum with weight 1 per client (the loop builds it so)")
        std = self.sum_noise_multiplier * self.clip_norm
        noised = {
            record: {
                name: np.asarray(values, dtype=np.float64)
                + gaussian_noise(np.shape(values), std, self.source)
                for name, values in tensors.items()
            }
            for record, tensors in aggregate.weighted_sum.items()
        }
        return Aggregate(noised, float(self.expected_cohort), aggregate.num_clients, aggregate.dropped)

    def step(self, clip_bits: list[int] | None = None) -> None:
        """Account one round of the mechanism; with adaptive clipping, move the clip.

        ``clip_bits`` are the aggregated clients' bits ``1[norm <= C]`` (their count is
        noised with std ``sigma_b`` before it moves the clip; its privacy cost is inside the
        effective noise multiplier the accountant composes).
        """
        self.accountant.step()
        if self.adaptive is not None:
            bits = clip_bits or []
            fraction = self.adaptive.noised_fraction(sum(bits), len(bits), self.expected_cohort, self.source)
            self.adaptive.update(fraction)

    def report(self) -> dict[str, Any]:
        """The round's ``privacy`` entry of ``metrics.jsonl``."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "accountant": self.cfg.accountant,
            "sampling": self.cfg.client_sampling,
            "noise_multiplier": self.noise_multiplier,
            "sum_noise_multiplier": self.sum_noise_multiplier,
            "clip_norm": self.clip_norm,
            "clip_quantile": self.cfg.clip_quantile,
            "sample_rate": self.cfg.sample_rate(),
            "rounds": self.accountant.rounds,
            "reclipped": self.reclipped,
        }

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """The accountant's state (the events composed so far) and the adaptive clip's."""
        state = dict(self.accountant.state_dict())
        if self.adaptive is not None:
            state.update({f"adaptive-clip/{k}": v for k, v in self.adaptive.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the accountant: the resumed run reports exactly the epsilon it had."""
        prefix = "adaptive-clip/"
        self.accountant.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)})
        if self.adaptive is not None:
            self.adaptive.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
