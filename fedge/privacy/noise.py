"""Clipping, Gaussian and discrete noise, and adaptive clipping for user-level DP.

Every random draw comes from a :class:`fedge.rng.SecretSource` (the OS CSPRNG in a real run),
never from the run seed: noise that anyone holding the seed could regenerate protects nothing.

Clipping
--------
A client's update is every tensor of every record, one vector ``x``; it is scaled by
``min(1, C / ||x||_2)`` (McMahan et al., ICLR 2018, flat clipping), so the sum over clients
has L2 sensitivity ``C`` under add/remove of one client.

Adaptive clipping
-----------------
Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021: the clip tracks the ``gamma`` quantile of the update norms. Each
client reports ``b_i = 1[||x_i|| <= C]``; the server releases

    b_tilde = (sum_i (b_i - 1/2) + N(0, sigma_b**2)) / m + 1/2

(``m`` the expected cohort; the shift by ``1/2`` halves the sensitivity, as in TensorFlow
Privacy's ``QuantileEstimatorQuery``) and updates geometrically

    C <- C * exp(-eta * (b_tilde - gamma)).

Its privacy cost is folded into the round's noise multiplier
(:func:`fedge.privacy.sum_noise_multiplier`).

Discrete noise
--------------
For sums in a finite ring (secure aggregation), noise must be integer:
:func:`discrete_gaussian` (Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential
Privacy", NeurIPS 2020) and :func:`skellam` (Agarwal, Kairouz, Liu, "The Skellam Mechanism
for Differentially Private Federated Learning", NeurIPS 2021).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedge.rng import SecretSource

__all__ = [
    "AdaptiveClip",
    "clip_l2",
    "discrete_gaussian",
    "gaussian_noise",
    "global_l2_norm",
    "noised_fraction_below",
    "skellam",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Tensors = Mapping[str, Mapping[str, np.ndarray]]


def global_l2_norm(tensors: Tensors) -> float:
    """``sqrt(sum of x**2)`` over every element of every tensor of every record (float64)."""
    total = 0.0
    for record in tensors.values():
        for array in record.values():
            flat = np.asarray(array, dtype=np.float64).ravel()
            total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_l2(tensors: Tensors, clip_norm: float) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """Scale every tensor by ``min(1, C / ||x||_2)``, ``||x||_2`` the one global L2 norm.

    Parameters
    ----------
    tensors : mapping of record name to mapping of tensor name to array
        A client's update (float tensors).
    clip_norm : float
        ``C > 0``.

    Returns
    -------
    clipped : dict
        Same structure; each array scaled in float64 and cast back to its own dtype.
    norm_before : float
        The global L2 norm before clipping (its comparison with ``C`` is adaptive
        clipping's bit).
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    for record, arrays in tensors.items():
        for name, array in arrays.items():
            if not np.issubdtype(np.asarray(array).dtype, np.floating):
                raise TypeError(
                    f"clip_l2 takes float tensors, {record}/{name} is {np.asarray(array).dtype}; "
                    "leave integer buffers out of the update"
                )
    norm = global_l2_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError("the update has a non-finite norm; check the local training for NaN/inf")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = {
        record: {
            name: (np.asarray(a, dtype=np.float64) * scale).astype(np.asarray(a).dtype)
            for name, a in arrays.items()
        }
        for record, arrays in tensors.items()
    }
    return clipped, norm


def gaussian_noise(shape: int | tuple[int, ...], std: float, source: SecretSource) -> F64:
    """``N(0, std**2)`` float64 noise of ``shape``, from ``source.normal``."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    size = math.prod(dims)
    return np.asarray(source.normal(size, std), dtype=np.float64).reshape(dims)


# --- adaptive clipping


def noised_fraction_below(
    count_below: float,
    num_reports: int,
    expected_cohort: float,
    count_noise_std: float,
    source: SecretSource,
) -> float:
    """``(count_below - num_reports / 2 + N(0, sigma_b**2)) / m + 1/2`` (Andrew et al. 2021).

    Parameters
    ----------
    count_below : float
        ``sum_i b_i``: how many of the reports had norm <= the clip.
    num_reports : int
        How many reports are in that sum.
    expected_cohort : float
        ``m``: the expected number of reports (``q * population``, or the fixed cohort); a
        public constant, so dividing by it costs no privacy.
    count_noise_std : float
        ``sigma_b``, the std of the noise on the count (0 only for tests).
    """
    if not expected_cohort > 0:
        raise ValueError(f"expected_cohort must be > 0, got {expected_cohort}")
    if not (math.isfinite(count_noise_std) and count_noise_std >= 0):
        raise ValueError(f"count_noise_std must be a finite number >= 0, got {count_noise_std}")
    noise = float(source.normal(1, count_noise_std)[0]) if count_noise_std > 0 else 0.0
    return (float(count_below) - num_reports / 2.0 + noise) / float(expected_cohort) + 0.5


class AdaptiveClip:
    """The clip norm of adaptive clipping: geometric updates toward a norm quantile.

    Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
    Clipping", NeurIPS 2021, Algorithm 1: ``C <- C * exp(-eta * (b_tilde - gamma))``.

    Parameters
    ----------
    initial : float
        The first round's clip ``C_0 > 0``.
    target_quantile : float
        ``gamma`` in [0, 1]: the fraction of updates meant to be unclipped (0.5 in the paper).
    learning_rate : float
        ``eta > 0`` (0.2 in the paper).
    count_noise_std : float
        ``sigma_b`` >= 0, the std of the noise on the count (the paper uses ``m / 20``).
        The count's privacy cost is in :func:`fedge.privacy.sum_noise_multiplier`.
    """

    def __init__(
        self,
        initial: float,
        target_quantile: float,
        learning_rate: float = 0.2,
        *,
        count_noise_std: float,
    ) -> None:
        if not (math.isfinite(initial) and initial > 0):
            raise ValueError(f"initial clip must be a finite number > 0, got {initial}")
        if not 0.0 <= target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}")
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}")
        if not (math.isfinite(count_noise_std) and count_noise_std >= 0):
            raise ValueError(f"count_noise_std must be a finite number >= 0, got {count_noise_std}")
        self.initial = float(initial)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_std = float(count_noise_std)
        self.clip = float(initial)

    def is_below(self, norm: float) -> bool:
        """A client's bit ``b_i = 1[norm <= C]`` for its pre-clipping norm."""
        return bool(norm <= self.clip)

    def noised_fraction(
        self, count_below: float, num_reports: int, expected_cohort: float, source: SecretSource
    ) -> float:
        """:func:`noised_fraction_below` with this clip's ``count_noise_std``."""
        return noised_fraction_below(count_below, num_reports, expected_cohort, self.count_noise_std, source)

    def update(self, noised_fraction_below: float) -> float:
        """``C <- C * exp(-eta * (b_tilde - gamma))``; returns the new clip."""
        b = float(noised_fraction_below)
        if not math.isfinite(b):
            raise ValueError(f"noised_fraction_below must be finite, got {noised_fraction_below}")
        self.clip *= math.exp(-self.learning_rate * (b - self.target_quantile))
        return self.clip

    def state_dict(self) -> dict[str, np.ndarray]:
        """``clip`` and the constructor's parameters (float64 scalars)."""
        return {
            "clip": np.array(self.clip, dtype=np.float64),
            "initial": np.array(self.initial, dtype=np.float64),
            "target_quantile": np.array(self.target_quantile, dtype=np.float64),
            "learning_rate": np.array(self.learning_rate, dtype=np.float64),
            "count_noise_std": np.array(self.count_noise_std, dtype=np.float64),
        }

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` from an ``AdaptiveClip`` built with the same arguments."""
        for key in ("initial", "target_quantile", "learning_rate", "count_noise_std"):
            saved, mine = float(np.asarray(state[key])), getattr(self, key)
            if saved != mine:
                raise ValueError(
                    f"the adaptive clip state has {key}={saved}, this one {mine}; "
                    "build AdaptiveClip with the saved arguments"
                )
        self.clip = float(np.asarray(state["clip"]))


# --- discrete noise


def _bernoulli_exp(gamma: F64, source: SecretSource) -> npt.NDArray[np.bool_]:
    """``Bernoulli(exp(-gamma))`` per element: ``u < exp(-gamma)``, ``u`` uniform on [0, 1)."""
    return source.uniform(gamma.size) < np.exp(-gamma)


def _geometric(size: int, t: int, source: SecretSource) -> I64:
    """``P(G >= k) = exp(-k / t)`` on ``{0, 1, ...}``: ``floor(-t ln(1 - u))``."""
    return np.floor(-t * np.log1p(-source.uniform(size))).astype(np.int64)


def discrete_gaussian(size: int, sigma: float, source: SecretSource) -> I64:
    """``size`` draws of the discrete Gaussian ``P(x) = exp(-x**2 / (2 sigma**2)) / Z`` on Z.

    Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020,
    Algorithm 3, vectorized: with ``t = floor(sigma) + 1``,

    1. ``Y ~ DLap(t)``, ``P(Y = y) ~ exp(-|y| / t)``, drawn as the difference of two
       geometric variables with ``P(G >= k) = exp(-k / t)``;
    2. accept ``Y`` with probability ``exp(-(|Y| - sigma**2 / t)**2 / (2 sigma**2))``,
       else redraw (the accepted ``Y`` has exactly the discrete Gaussian law:
       ``exp(-|y|/t - (|y| - sigma**2/t)**2 / (2 sigma**2)) ~ exp(-y**2 / (2 sigma**2))``).

    Each attempt is accepted with probability at least about 0.5 (CKS, Section 5.3), so a few
    passes over the still-rejected elements finish. The Bernoulli and geometric draws use
    float64 uniforms with 53 random bits, not the paper's exact rational arithmetic: each
    probability is off by at most a few ulps (relative ``~1e-16``), far below any DP
    parameter; the output itself is an exact integer (no floating-point noise leaks, unlike
    Mironov's attack on floating-point Laplace). ``sigma = 0`` gives zeros.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    out = np.zeros(size, dtype=np.int64)
    if sigma == 0 or size == 0:
        return out
    t = math.floor(sigma) + 1
    shift = sigma * sigma / t
    pending = np.arange(size)
    while pending.size:
        n = pending.size
        y = _geometric(n, t, source) - _geometric(n, t, source)
        gap = np.abs(y) - shift
        accept = _bernoulli_exp(gap * gap / (2.0 * sigma * sigma), source)
        out[pending[accept]] = y[accept]
        pending = pending[~accept]
    return out


def _poisson(size: int, mu: float, source: SecretSource) -> I64:
    """``size`` Poisson(``mu``) draws from the secret source.

    ``mu < 10``: Knuth's multiplication method, vectorized (count the uniforms whose running
    product stays above ``exp(-mu)``). ``mu >= 10``: Hormann's transformed rejection with
    squeeze, PTRS ("The transformed rejection method for generating Poisson random
    variables", Insurance: Mathematics and Economics, 1993), as in numpy.
    """
    out = np.zeros(size, dtype=np.int64)
    if mu == 0 or size == 0:
        return out
    if mu < 10:
        limit = math.exp(-mu)
        product = np.ones(size)
        pending = np.arange(size)
        while pending.size:
            product[pending] *= source.uniform(pending.size)
            alive = product[pending] > limit
            out[pending[alive]] += 1
            pending = pending[alive]
        return out
    slam, loglam = math.sqrt(mu), math.log(mu)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    pending = np.arange(size)
    lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
    while pending.size:
        n = pending.size
        u = source.uniform(n) - 0.5
        v = source.uniform(n)
        us = 0.5 - np.abs(u)
        k = np.floor((2 * a / np.maximum(us, 1e-300) + b) * u + mu + 0.43)
        fast = (us >= 0.07) & (v <= vr)
        slow = ~fast & (k >= 0) & ~((us < 0.013) & (v > us))
        accept = fast.copy()
        if slow.any():
            ks, uss, vs = k[slow], us[slow], v[slow]
            lhs = np.log(vs) + math.log(invalpha) - np.log(a / (uss * uss) + b)
            accept[slow] = lhs <= -mu + ks * loglam - lgamma(ks + 1)
        out[pending[accept]] = k[accept].astype(np.int64)
        pending = pending[~accept]
    return out


def skellam(size: int, mu: float, source: SecretSource) -> I64:
    """``size`` draws of ``Skellam(mu, mu)``: the difference of two independent ``Poisson(mu)``.

    Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
    Learning", NeurIPS 2021. Mean 0, variance ``2 mu``; sums of Skellam noise are Skellam
    (``mu`` adds), so each of ``n`` clients can add ``Skellam(mu / n)``.
    ``P(k) = exp(-2 mu) I_|k|(2 mu)`` (``I`` the modified Bessel function of the first kind).
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a finite number >= 0, got {mu}")
    return _poisson(size, mu, source) - _poisson(size, mu, source)
