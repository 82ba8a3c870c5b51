"""Differential privacy for federated learning: the pure math (no Flower, no I/O).

Guarantee
---------
**User-level central DP** (McMahan, Ramage, Talwar, Zhang, ICLR 2018): a trusted server (or
secure aggregation with distributed noise) releases, each round, the sum of the sampled
clients' updates, each clipped to L2 norm ``C`` over all its tensors (:func:`clip_l2`), plus
Gaussian noise of std ``z * C`` (:func:`gaussian_noise`, or the integer
:func:`discrete_gaussian` / :func:`skellam` for sums in a ring). Neighbouring datasets differ
in one client's entire data, so the guarantee covers everything a client holds, and the
``(epsilon, delta)`` of the whole run bounds what the released models reveal about any
single client.

Accounting
----------
:class:`PrivacyAccountant` composes one sampled Gaussian mechanism per round with Google's
``dp_accounting``: RDP or PLD for Poisson sampling (add/remove one client), RDP only for
fixed-size sampling without replacement (replace one client, sensitivity ``2 C``; the PLD
accountant does not support it). :func:`calibrate` finds the noise multiplier for a target
epsilon. Adaptive clipping (:class:`AdaptiveClip`, Andrew et al., NeurIPS 2021) spends part
of the round's budget on a noised count; :func:`sum_noise_multiplier` gives the sum's noise
so that the round's *effective* noise multiplier is the accounted one.

Randomness
----------
All noise comes from a :class:`fedge.rng.SecretSource`, never from the run seed.
"""

from fedge.privacy.accounting import (
    PrivacyAccountant,
    calibrate,
    effective_noise_multiplier,
    round_event,
    sum_noise_multiplier,
)
from fedge.privacy.noise import (
    AdaptiveClip,
    clip_l2,
    discrete_gaussian,
    gaussian_noise,
    global_l2_norm,
    noised_fraction_below,
    skellam,
)

__all__ = [
    "AdaptiveClip",
    "PrivacyAccountant",
    "calibrate",
    "clip_l2",
    "discrete_gaussian",
    "effective_noise_multiplier",
    "gaussian_noise",
    "global_l2_norm",
    "noised_fraction_below",
    "round_event",
    "skellam",
    "sum_noise_multiplier",
]
