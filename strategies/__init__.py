"""Aggregation strategies by name: Flower's Message-API strategies, configured from fedge's config.

fedge's round loop picks the clients of a round itself (seeded, so a resumed run samples
the same clients), then hands the strategy a view of the grid that holds only those
clients; strategies are therefore built with ``fraction_train = 1.0``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedge.config import RunConfig
from fedge.records import ARRAYS_KEY, CONFIG_KEY, NUM_EXAMPLES


def _common(cfg: RunConfig) -> dict[str, object]:
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
        "weighted_by_key": NUM_EXAMPLES,
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
    }


def _fedopt(cls: type[FedAdam] | type[FedYogi] | type[FedAdagrad]) -> Callable[[RunConfig], Strategy]:
    def build(cfg: RunConfig) -> Strategy:
        return cls(**_common(cfg), eta=cfg.server_lr, eta_l=cfg.lr)  # type: ignore[arg-type]

    return build


# One explicit dict from config name to a builder; no registration by import side effect.
STRATEGIES: dict[str, Callable[[RunConfig], Strategy]] = {
    "fedavg": lambda cfg: FedAvg(**_common(cfg)),  # type: ignore[arg-type]
    "fedavgm": lambda cfg: FedAvgM(
        **_common(cfg),  # type: ignore[arg-type]
        server_learning_rate=cfg.server_lr,
        server_momentum=cfg.server_momentum,
    ),
    "fedprox": lambda cfg: FedProx(**_common(cfg), proximal_mu=cfg.proximal_mu),  # type: ignore[arg-type]
    "fedadam": _fedopt(FedAdam),
    "fedyogi": _fedopt(FedYogi),
    "fedadagrad": _fedopt(FedAdagrad),
    "fedmedian": lambda cfg: FedMedian(**_common(cfg)),  # type: ignore[arg-type]
    "fedtrimmedavg": lambda cfg: FedTrimmedAvg(**_common(cfg), beta=cfg.trim_beta),  # type: ignore[arg-type]
    "krum": lambda cfg: Krum(**_common(cfg)),  # type: ignore[arg-type]
}


def build_strategy(cfg: RunConfig) -> Strategy:
    """Return a fresh strategy for ``cfg.strategy`` (names are validated by :class:`RunConfig`)."""
    return STRATEGIES[cfg.strategy](cfg)


# Attributes in which Flower's strategies keep state from one round to the next. The
# server checkpoints them so that a resumed run continues the same optimizer trajectory.
_STATE_ATTRS: tuple[str, ...] = ("momentum_vector", "m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Flatten the strategy's cross-round state into named arrays.

    Returns
    -------
    dict[str, numpy.ndarray]
        Keys ``"<attr>/<key>"`` for dict-valued state and ``"<attr>/#<index>"`` for
        list-valued state; empty for stateless strategies (FedAvg).
    """
    out: dict[str, np.ndarray] = {}
    for attr in _STATE_ATTRS:
        value = getattr(strategy, attr, None)
        if isinstance(value, dict):
            out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, list):
            out.update({f"{attr}/#{i}": np.asarray(v) for i, v in enumerate(value)})
    return out


def load_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Restore what :func:`strategy_state` saved into a freshly built strategy."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for name, array in state.items():
        attr, _, key = name.partition("/")
        if attr not in _STATE_ATTRS:
            raise ValueError(f"checkpoint holds unknown strategy state {name!r}")
        grouped.setdefault(attr, {})[key] = array
    for attr, items in grouped.items():
        if all(k.startswith("#") for k in items):
            ordered = sorted(items.items(), key=lambda kv: int(kv[0][1:]))
            setattr(strategy, attr, [v.copy() for _, v in ordered])
        else:
            setattr(strategy, attr, {k: v.copy() for k, v in items.items()})


__all__ = [
    "STRATEGIES",
    "build_strategy",
    "load_strategy_state",
    "strategy_state",
]
