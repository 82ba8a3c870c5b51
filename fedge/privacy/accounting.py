"""Privacy accounting for user-level central DP-FedAvg, on Google's ``dp_accounting``.

Mechanism
---------
One federated round is one **sampled Gaussian mechanism** on the clients (McMahan, Ramage,
Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018): a
cohort is sampled, every sampled client's update is clipped to L2 norm ``C``
(:func:`fedge.privacy.clip_l2`) and the server adds ``N(0, (z C)**2)`` to the sum. A
neighbouring dataset differs in **one client's whole data** (user-level DP). Rounds compose.

Sampling and neighbouring relation
----------------------------------
``sampling="poisson"``: every client joins a round independently with probability ``q``
(``sample_rate``). Neighbours add or remove one client (``ADD_OR_REMOVE_ONE``), the sum's L2
sensitivity is ``C`` and the round is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
(Mironov, Talwar, Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism",
2019). Both accountants support it.

``sampling="fixed"``: a cohort of exactly ``cohort`` clients out of ``population`` is drawn
uniformly without replacement. The population size is public, so neighbours *replace* one
client (``REPLACE_ONE``); replacing ``x`` by ``x'`` moves the sum by ``||x - x'|| <= 2 C``,
so the L2 sensitivity is ``2 C`` and the round is
``SampledWithoutReplacementDpEvent(population, cohort, GaussianDpEvent(z / 2))``
(``dp_accounting`` defines the noise multiplier as noise std over L2 sensitivity; Wang,
Balle, Kasiviswanathan, "Subsampled Renyi Differential Privacy and Analytical Moments
Accountant", AISTATS 2019, Theorem 27). Only the RDP accountant supports this event:
``dp_accounting``'s PLD accountant rejects ``SampledWithoutReplacementDpEvent`` (0.6.0), so
``kind="pld", sampling="fixed"`` is refused (no conservative PLD substitute is offered:
Poisson sampling under add/remove is a different relation, not an upper bound).

Accountants
-----------
``kind="rdp"``: Renyi DP at ``dp_accounting``'s default orders, converted to
``(epsilon, delta)`` with the conversion of Canonne, Kamath, Steinke (2020) / Asoodeh et al.
(2020). ``kind="pld"``: privacy loss distributions (Koskela, Jalko, Honkela, AISTATS 2020;
Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, PETS 2022) with pessimistic discretization
(interval ``1e-4``), usually tighter than RDP and slower (about a second per evaluation).
Both are upper bounds on the true epsilon.

Adaptive clipping
-----------------
The noised count of clients below the clip (Andrew, Thakkar, McMahan, Ramaswamy,
"Differentially Private Learning with Adaptive Clipping", NeurIPS 2021) is a second Gaussian
query on the same cohort. Each client contributes ``b_i - 1/2`` with ``b_i`` in ``{0, 1}``
(sensitivity ``1/2`` under add/remove), noised with std ``sigma_b``; the pair (sum, count)
released together is one Gaussian mechanism with noise multiplier
``z = (z_sum**-2 + (2 sigma_b)**-2) ** -1/2`` (Andrew et al., Theorem 1). So the accountant
is built with the *effective* ``z``, and the server noises the sum with
:func:`sum_noise_multiplier` ``(z, sigma_b) = (z**-2 - (2 sigma_b)**-2) ** -1/2``. (Under
replace-one both sensitivities double, so the same identity holds.)

Persistence
-----------
``dp_accounting`` accountants cannot be serialized, so :class:`PrivacyAccountant` keeps its
ledger (each composed event with its count, as JSON) and rebuilds a fresh accountant from it
for every evaluation: a resumed accountant reports exactly the same epsilon.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal

import attr
import dp_accounting
import numpy as np
from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

__all__ = [
    "Kind",
    "PrivacyAccountant",
    "Sampling",
    "calibrate",
    "effective_noise_multiplier",
    "round_event",
    "sum_noise_multiplier",
]

Kind = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed"]

_KINDS = ("rdp", "pld")
_SAMPLINGS = ("poisson", "fixed")
_NeighborRel = dp_accounting.privacy_accountant.NeighboringRelation
#: Discretization of the PLD accountant's privacy loss (``dp_accounting``'s default).
PLD_DISCRETIZATION = 1e-4


def _check_config(
    kind: str, sampling: str, sample_rate: float | None, population: int | None, cohort: int | None
) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'rdp' or 'pld', got {kind!r}")
    if sampling not in _SAMPLINGS:
        raise ValueError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}")
    if sampling == "poisson":
        if sample_rate is None or not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"poisson sampling needs a sample_rate in (0, 1], got {sample_rate}")
        if population is not None or cohort is not None:
            raise ValueError("poisson sampling takes sample_rate only; drop population and cohort")
        return
    if kind == "pld":
        raise ValueError(
            "dp_accounting's PLD accountant does not support sampling without replacement "
            "(SampledWithoutReplacementDpEvent); use kind='rdp' for fixed-size sampling"
        )
    if population is None or cohort is None or not 1 <= int(cohort) <= int(population):
        raise ValueError(
            f"fixed-size sampling needs integers 1 <= cohort <= population, got cohort={cohort}, "
            f"population={population}"
        )
    if sample_rate is not None:
        raise ValueError("fixed-size sampling takes population and cohort; drop sample_rate")


def _check_noise_multiplier(noise_multiplier: float) -> float:
    z = float(noise_multiplier)
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")
    return z


def round_event(
    noise_multiplier: float,
    sampling: Sampling = "poisson",
    sample_rate: float | None = None,
    population: int | None = None,
    cohort: int | None = None,
) -> dp_event.DpEvent:
    """The ``DpEvent`` of one round with noise std ``noise_multiplier * C`` on the clipped sum.

    Poisson: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``; fixed-size:
    ``SampledWithoutReplacementDpEvent(population, cohort, GaussianDpEvent(z / 2))`` (the
    replace-one sensitivity of the sum is ``2 C``; see the module docstring).
    """
    z = _check_noise_multiplier(noise_multiplier)
    if sampling == "poisson":
        if sample_rate is None:
            raise ValueError("poisson sampling needs a sample_rate in (0, 1]")
        return dp_event.PoissonSampledDpEvent(float(sample_rate), dp_event.GaussianDpEvent(z))
    if population is None or cohort is None:
        raise ValueError("fixed-size sampling needs population and cohort")
    return dp_event.SampledWithoutReplacementDpEvent(
        int(population), int(cohort), dp_event.GaussianDpEvent(z / 2.0)
    )


class _UnconvergedOrderFilter(logging.Filter):
    """Drop dp_accounting's per-order, per-call warning that a fractional RDP order did not converge.

    dp_accounting then leaves that order out of the minimum over orders, which can only make
    epsilon larger (conservative), and says so on every call: at q = 0.2 dozens of lines a
    round, which would bury the run's own log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


logging.getLogger("absl").addFilter(_UnconvergedOrderFilter())


def _fresh(kind: str, sampling: str) -> dp_accounting.PrivacyAccountant:
    relation = _NeighborRel.ADD_OR_REMOVE_ONE if sampling == "poisson" else _NeighborRel.REPLACE_ONE
    if kind == "rdp":
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    return pld_privacy_accountant.PLDAccountant(
        neighboring_relation=relation, value_discretization_interval=PLD_DISCRETIZATION
    )


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return d


# --- events as JSON (dp_accounting events are attrs classes of numbers, strings and events)


def _encode(value: Any) -> Any:
    if isinstance(value, dp_event.DpEvent):
        fields = {f.name: _encode(getattr(value, f.name)) for f in attr.fields(type(value))}
        return {"class": type(value).__name__, "fields": fields}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in the privacy ledger: {value!r}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        cls = getattr(dp_event, value["class"], None)
        if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)):
            raise ValueError(f"unknown DpEvent class {value['class']!r} in the privacy ledger")
        return cls(**{k: _decode(v) for k, v in value["fields"].items()})
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _to_array(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode(), dtype=np.uint8).copy()


def _from_array(array: np.ndarray) -> Any:
    return json.loads(np.asarray(array, dtype=np.uint8).tobytes().decode())


class PrivacyAccountant:
    """Epsilon spent by a run of DP-FedAvg rounds (user-level, central DP).

    Parameters
    ----------
    kind : {"rdp", "pld"}
        Renyi-DP or privacy-loss-distribution accounting (module docstring).
    sampling : {"poisson", "fixed"}
        How a round's cohort is drawn: Poisson with ``sample_rate`` (add/remove neighbours),
        or exactly ``cohort`` of ``population`` without replacement (replace-one neighbours,
        RDP only).
    noise_multiplier : float
        ``z``: the noise std on the sum of clipped updates is ``z * C``. With adaptive
        clipping, the *effective* ``z`` of sum and count (:func:`effective_noise_multiplier`).
    sample_rate : float, optional
        Poisson sampling probability ``q`` in (0, 1].
    population, cohort : int, optional
        Fixed-size sampling: number of clients, and the cohort size of every round.

    Notes
    -----
    The ledger holds ``(event, count)`` entries; a step with the same event as the last
    entry adds to its count, so a run of ``T`` equal rounds is one ``count = T`` entry
    (``self_compose(T)``), as is ``epsilon_if``'s projection. Epsilon is recomputed from the
    ledger (and cached per ``delta``), so :meth:`epsilon` after :meth:`load_state_dict`
    equals the saved accountant's exactly.
    """

    def __init__(
        self,
        kind: Kind,
        sampling: Sampling,
        noise_multiplier: float,
        sample_rate: float | None = None,
        population: int | None = None,
        cohort: int | None = None,
    ) -> None:
        _check_config(kind, sampling, sample_rate, population, cohort)
        self.kind: Kind = kind
        self.sampling: Sampling = sampling
        self.noise_multiplier = _check_noise_multiplier(noise_multiplier)
        self.sample_rate = None if sample_rate is None else float(sample_rate)
        self.population = None if population is None else int(population)
        self.cohort = None if cohort is None else int(cohort)
        self._ledger: list[tuple[dict[str, Any], int]] = []
        self._rounds = 0
        self._cache: dict[float, float] = {}

    # --- composition

    def round_event(self, noise_multiplier: float | None = None) -> dp_event.DpEvent:
        """One round's event, at this accountant's ``noise_multiplier`` unless one is given."""
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        return round_event(z, self.sampling, self.sample_rate, self.population, self.cohort)

    def step(self, num_rounds: int = 1, noise_multiplier: float | None = None) -> None:
        """Compose ``num_rounds`` rounds (at ``noise_multiplier`` if given, for this step only)."""
        if int(num_rounds) != num_rounds or num_rounds < 0:
            raise ValueError(f"num_rounds must be an integer >= 0, got {num_rounds}")
        if num_rounds == 0:
            return
        self._append(self.round_event(noise_multiplier), int(num_rounds))
        self._rounds += int(num_rounds)

    def compose(self, event: dp_event.DpEvent, count: int = 1) -> None:
        """Compose any ``dp_accounting`` event ``count`` times (it does not advance ``rounds``).

        Use it for releases beside the rounds (a noised evaluation metric, a hyperparameter
        search). A count query on the *same* cohort belongs inside the round instead (the
        effective noise multiplier, module docstring): composing it separately is valid but
        looser.
        """
        if int(count) != count or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count}")
        if not _fresh(self.kind, self.sampling).supports(event):
            raise ValueError(
                f"the {self.kind} accountant ({self.sampling} sampling) cannot account for "
                f"{event}; use a Gaussian event it supports"
            )
        self._append(event, int(count))

    def _append(self, event: dp_event.DpEvent, count: int) -> None:
        encoded = _encode(event)
        if self._ledger and self._ledger[-1][0] == encoded:
            self._ledger[-1] = (encoded, self._ledger[-1][1] + count)
        else:
            self._ledger.append((encoded, count))
        self._cache.clear()

    # --- evaluation

    @property
    def rounds(self) -> int:
        """Rounds composed by :meth:`step`."""
        return self._rounds

    def _epsilon_of(self, ledger: list[tuple[dict[str, Any], int]], delta: float) -> float:
        accountant = _fresh(self.kind, self.sampling)
        for encoded, count in ledger:
            accountant.compose(_decode(encoded), count)
        return float(accountant.get_epsilon(delta))

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything composed so far (0.0 before the first round)."""
        d = _check_delta(delta)
        if d not in self._cache:
            self._cache[d] = self._epsilon_of(self._ledger, d) if self._ledger else 0.0
        return self._cache[d]

    def epsilon_if(self, next_rounds: int, delta: float, noise_multiplier: float | None = None) -> float:
        """Epsilon at ``delta`` after ``next_rounds`` more rounds (for a budget stop).

        Equals :meth:`epsilon` after ``step(next_rounds, noise_multiplier)``, exactly.
        """
        if int(next_rounds) != next_rounds or next_rounds < 0:
            raise ValueError(f"next_rounds must be an integer >= 0, got {next_rounds}")
        d = _check_delta(delta)
        if next_rounds == 0:
            return self.epsilon(d)
        encoded = _encode(self.round_event(noise_multiplier))
        ledger = list(self._ledger)
        if ledger and ledger[-1][0] == encoded:
            ledger[-1] = (encoded, ledger[-1][1] + int(next_rounds))
        else:
            ledger.append((encoded, int(next_rounds)))
        return self._epsilon_of(ledger, d)

    # --- persistence

    def _config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sampling": self.sampling,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "population": self.population,
            "cohort": self.cohort,
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """``config`` and ``ledger`` (UTF-8 JSON as uint8 arrays) and ``rounds`` (int64)."""
        return {
            "config": _to_array(self._config()),
            "ledger": _to_array([[event, count] for event, count in self._ledger]),
            "rounds": np.array(self._rounds, dtype=np.int64),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore a :meth:`state_dict` saved by an accountant built with the same arguments."""
        saved = _from_array(state["config"])
        if saved != self._config():
            raise ValueError(
                f"the privacy state was saved by an accountant with {saved}, this one has "
                f"{self._config()}; build the accountant with the saved arguments"
            )
        ledger = [(event, int(count)) for event, count in _from_array(state["ledger"])]
        for event, _ in ledger:
            _decode(event)  # fail now, not at the next epsilon
        self._ledger = ledger
        self._rounds = int(np.asarray(state["rounds"]))
        self._cache.clear()


# --- adaptive clipping (Andrew et al. 2021, Theorem 1)


def effective_noise_multiplier(sum_noise_multiplier: float, count_noise_std: float) -> float:
    """``(z_sum**-2 + (2 sigma_b)**-2) ** -1/2``: one Gaussian equivalent to sum and count.

    Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
    Clipping", NeurIPS 2021, Theorem 1: the sum with noise multiplier ``z_sum`` and the
    count of shifted bits ``b_i - 1/2`` with noise std ``sigma_b`` (noise multiplier
    ``2 sigma_b``) released together on one cohort.
    """
    z = _check_noise_multiplier(sum_noise_multiplier)
    if count_noise_std == math.inf:
        return z
    s = _check_noise_multiplier(count_noise_std)
    return float((z**-2 + (2.0 * s) ** -2) ** -0.5)


def sum_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """``z_sum = (z**-2 - (2 sigma_b)**-2) ** -1/2``: the sum's noise for an effective ``z``.

    The inverse of :func:`effective_noise_multiplier` (Andrew et al. 2021, Theorem 1): the
    server noises the clipped sum with std ``z_sum * C`` and the count with ``sigma_b``, and
    the accountant is built with ``z``. Needs ``2 sigma_b > z``.
    """
    z = _check_noise_multiplier(noise_multiplier)
    if count_noise_std == math.inf:
        return z
    s = _check_noise_multiplier(count_noise_std)
    if 2.0 * s <= z:
        raise ValueError(
            f"the count noise std {count_noise_std} spends the whole budget of noise multiplier "
            f"{noise_multiplier}; raise count_noise_std above {z / 2}"
        )
    return float((z**-2 - (2.0 * s) ** -2) ** -0.5)


# --- calibration

_MIN_NOISE_MULTIPLIER = 2.0**-6
_MAX_NOISE_MULTIPLIER = 2.0**20


def calibrate(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sample_rate: float | None,
    kind: Kind = "rdp",
    sampling: Sampling = "poisson",
    population: int | None = None,
    cohort: int | None = None,
) -> float:
    """The smallest noise multiplier (within ``1e-6``) whose epsilon after ``rounds`` is <= target.

    The search starts at ``z = 1`` and doubles or halves to bracket the target; if even
    ``z = 2**-6`` meets it, that is returned.
    Brent's method on ``epsilon(z) - target_epsilon`` via ``dp_accounting``'s
    ``calibrate_dp_mechanism``, which guarantees the returned ``z`` meets the target. The
    epsilon is computed exactly as :class:`PrivacyAccountant` does after ``step(rounds)``.
    """
    _check_config(kind, sampling, sample_rate, population, cohort)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    d = _check_delta(delta)
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds}")

    def make_event(z: float) -> dp_event.DpEvent:
        one = round_event(z, sampling, sample_rate, population, cohort)
        return dp_event.SelfComposedDpEvent(one, int(rounds))

    def epsilon_at(z: float) -> float:
        accountant = _fresh(kind, sampling)
        return float(accountant.compose(make_event(z)).get_epsilon(d))

    # An explicit bracket [lo, hi] with epsilon(lo) > target >= epsilon(hi), found by
    # doubling from z = 1 (a tiny z makes the PLD accountant's grid explode).
    hi = 1.0
    while epsilon_at(hi) > target_epsilon:
        hi *= 2.0
        if hi > _MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"no noise multiplier up to {_MAX_NOISE_MULTIPLIER} reaches epsilon "
                f"{target_epsilon} in {rounds} rounds; raise the target or lower the rounds"
            )
    lo = hi / 2.0
    while epsilon_at(lo) <= target_epsilon:
        if lo <= _MIN_NOISE_MULTIPLIER:
            return lo
        hi, lo = lo, lo / 2.0
    z = mechanism_calibration.calibrate_dp_mechanism(
        lambda: _fresh(kind, sampling),
        make_event,
        float(target_epsilon),
        d,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
    )
    return float(z)
