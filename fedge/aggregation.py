"""The aggregate of a round: the weighted sum of the clients' updates, and its mean (pure numpy).

A transport's result is either per-client replies (plain) or one :class:`Aggregate`:
secure aggregation can only produce the latter, and the plain path builds the same object
from its checked replies, so everything after it (central DP noise, the strategy's server
optimizer) sees one shape whatever the transport.

The sum is over *updates* ``x_i = local_i - global`` (per ArrayRecord, per tensor), in
float64, so the order of clients changes the result by float64 rounding at most; the mean
added to the global model is then rounded once to the model's dtype::

    mean = sum_i w_i x_i / sum_i w_i
    new_global = global + mean          (then cast to the tensor's dtype)

This equals Flower's ``aggregate_arrayrecords`` (``sum_i (w_i / W) local_i``) up to float32
rounding, for any weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Aggregate", "Dropped", "Tensors", "add_update", "sum_updates"]

# ArrayRecord key -> tensor name -> values.
Tensors = Mapping[str, Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Dropped:
    """A sampled client that is not in the aggregate, and why."""

    node_id: int
    reason: str


@dataclass(frozen=True)
class Aggregate:
    """The weighted sum of a round's updates.

    Parameters
    ----------
    weighted_sum : dict
        ``record -> tensor -> sum_i w_i x_i`` (float64).
    total_weight : float
        ``sum_i w_i`` (> 0 when ``num_clients > 0``).
    num_clients : int
        How many clients' updates the sum holds.
    dropped : tuple of Dropped
        Sampled clients left out (no reply, error, rejected update).
    """

    weighted_sum: dict[str, dict[str, np.ndarray]]
    total_weight: float
    num_clients: int
    dropped: tuple[Dropped, ...] = field(default=())

    def mean(self) -> dict[str, dict[str, np.ndarray]]:
        """``weighted_sum / total_weight`` per tensor (float64).

        Raises
        ------
        ValueError
            If the aggregate is empty or its weight is not a positive finite number.
        """
        if self.num_clients <= 0 or not (math.isfinite(self.total_weight) and self.total_weight > 0):
            raise ValueError(
                f"cannot take the mean of {self.num_clients} updates of total weight {self.total_weight}"
            )
        return {
            record: {name: values / self.total_weight for name, values in tensors.items()}
            for record, tensors in self.weighted_sum.items()
        }

    def is_finite(self) -> bool:
        """Whether the total weight and every summed value are finite."""
        return math.isfinite(self.total_weight) and all(
            np.isfinite(v).all() for tensors in self.weighted_sum.values() for v in tensors.values()
        )


def sum_updates(
    updates: Sequence[Tensors], weights: Sequence[float], dropped: Sequence[Dropped] = ()
) -> Aggregate:
    """The :class:`Aggregate` of clients' updates (``local - global``) with their weights.

    Parameters
    ----------
    updates : sequence of Tensors
        One per client, all with the same records, tensor names and shapes.
    weights : sequence of float
        One positive finite weight per client (its example count).
    dropped : sequence of Dropped
        Recorded as they are.

    Raises
    ------
    ValueError
        If lengths, records, names or shapes differ, or a weight is not positive and finite.
    """
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    total: dict[str, dict[str, np.ndarray]] = {}
    for update, weight in zip(updates, weights, strict=True):
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"a weight must be positive and finite, got {weight}")
        if total and set(update) != set(total):
            raise ValueError(f"records differ between updates: {sorted(update)} vs {sorted(total)}")
        for record, tensors in update.items():
            acc = total.setdefault(record, {})
            if acc and set(tensors) != set(acc):
                raise ValueError(f"tensor names of record {record!r} differ between updates")
            for name, values in tensors.items():
                contribution = np.asarray(values, dtype=np.float64) * float(weight)
                if name in acc:
                    if acc[name].shape != contribution.shape:
                        raise ValueError(f"tensor {record}/{name} changes shape between updates")
                    acc[name] += contribution
                else:
                    acc[name] = contribution
    return Aggregate(total, float(sum(float(w) for w in weights)), len(updates), tuple(dropped))


def add_update(reference: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``reference + mean`` per tensor, rounded once to each reference tensor's dtype."""
    if set(reference) != set(mean):
        raise ValueError(f"tensor names differ: {sorted(reference)} vs {sorted(mean)}")
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        summed = np.asarray(ref, dtype=np.float64) + mean[name]
        if np.issubdtype(ref.dtype, np.integer):
            summed = np.rint(summed)
        out[name] = summed.astype(ref.dtype)
    return out
