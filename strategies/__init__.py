"""Aggregation strategies by name: Flower's Message-API strategies, configured from fedge's config.

fedge's round loop picks the clients of a round itself (seeded, so a resumed run samples
the same clients), then hands the strategy a view of the grid that holds only those
clients; strategies are therefore built with ``fraction_train = 1.0``.

Each strategy declares two things the loop needs (:func:`strategy_info`):

* **how it aggregates.** A *linear* strategy (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi,
  FedAdagrad) only needs the example-weighted mean of the updates: the loop computes that
  mean itself (the aggregate seam: secure aggregation delivers only a sum, central DP
  noise is added to the mean) and hands the strategy one synthetic reply that carries it,
  so the strategy's server optimizer runs on it unchanged. A *per-client* strategy
  (median, trimmed mean, Krum, Bulyan, DP wrappers that clip each reply, anything not
  known to be linear) gets every checked reply, as under Flower; it cannot run under
  secure aggregation.
* **what a reply carries** (:class:`ReplySchema`): its ArrayRecords (the model's, plus
  e.g. SCAFFOLD's control variates) and required metrics beyond ``num-examples`` (e.g.
  FedNova's local step count). The reply checks validate against it.

Every strategy's cross-round state (FedAvgM's momentum, FedAdam's moments, an adaptive
clipping norm; wrapped strategies included) is saved by :func:`strategy_state_dict` and
restored by :func:`load_strategy_state_dict`, so a resumed run continues the same
optimizer trajectory bit for bit. A strategy of one's own declares its state with
``state_dict()`` / ``load_state_dict()`` methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from fedge.config import RunConfig
from fedge.records import ARRAYS_KEY, CONFIG_KEY, NUM_EXAMPLES

log = logging.getLogger("fedge.server")

#: StrategyInfo.aggregation values.
LINEAR = "linear"
PER_CLIENT = "per-client"


@dataclass(frozen=True)
class ReplySchema:
    """What a training reply carries beyond ``num-examples``.

    Parameters
    ----------
    array_records : tuple of str
        Keys of the reply's ArrayRecords; the first is the model. Each is checked against
        the record of the same key that the server sent (names, shapes, dtypes), and a
        compressed tensor is decoded against it.
    metrics : tuple of str
        Metric keys a reply must carry (finite numbers), kept in the checked reply
        besides ``num-examples`` (every checked reply carries exactly these, so
        strategies see uniform replies whatever else a client sent).
    """

    array_records: tuple[str, ...] = (ARRAYS_KEY,)
    metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.array_records:
            raise ValueError("a reply schema needs at least the model's ArrayRecord")


@dataclass(frozen=True)
class StrategyInfo:
    """How the loop treats a strategy: :data:`LINEAR` or :data:`PER_CLIENT`, and its replies."""

    aggregation: str
    reply: ReplySchema = field(default_factory=ReplySchema)

    @property
    def linear(self) -> bool:
        """Whether the loop hands the strategy the mean instead of per-client replies."""
        return self.aggregation == LINEAR


def _common(cfg: RunConfig) -> dict[str, Any]:
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
        # eta_l (the clients' lr) only appears in Flower's summary(); fedge sends clients
        # their resolved lr itself, so it is left at Flower's default here.
        return cls(**_common(cfg), eta=cfg.server_lr)

    return build


# One explicit dict from config name to a builder; no registration by import side effect.
STRATEGIES: dict[str, Callable[[RunConfig], Strategy]] = {
    "fedavg": lambda cfg: FedAvg(**_common(cfg)),
    "fedavgm": lambda cfg: FedAvgM(
        **_common(cfg),
        server_learning_rate=cfg.server_lr,
        server_momentum=cfg.server_momentum,
    ),
    "fedprox": lambda cfg: FedProx(**_common(cfg), proximal_mu=cfg.proximal_mu),
    "fedadam": _fedopt(FedAdam),
    "fedyogi": _fedopt(FedYogi),
    "fedadagrad": _fedopt(FedAdagrad),
    "fedmedian": lambda cfg: FedMedian(**_common(cfg)),
    "fedtrimmedavg": lambda cfg: FedTrimmedAvg(**_common(cfg), beta=cfg.trim_beta),
    "krum": lambda cfg: Krum(**_common(cfg)),
}

# What each known strategy class is, by exact class (FedMedian subclasses FedAvg but is
# not linear, so no isinstance here). A class not listed is per-client: always correct,
# only slower and incompatible with secure aggregation.
_INFO: dict[type, StrategyInfo] = {
    **{cls: StrategyInfo(LINEAR) for cls in (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad)},
    **{cls: StrategyInfo(PER_CLIENT) for cls in (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, QFedAvg)},
}

# Attributes in which Flower's strategies keep state from one round to the next, by class
# (looked up along the MRO). Wrappers keep the wrapped strategy in `strategy`, which is
# saved recursively under "inner/".
_STATE_ATTRS: dict[type, tuple[str, ...]] = {
    FedAvg: (),
    FedAvgM: ("current_arrays", "momentum_vector"),
    FedOpt: ("current_arrays", "m_t", "v_t"),
    QFedAvg: ("current_arrays",),
    DifferentialPrivacyServerSideFixedClipping: ("current_arrays",),
    DifferentialPrivacyClientSideFixedClipping: ("current_arrays",),
    DifferentialPrivacyServerSideAdaptiveClipping: ("current_arrays", "clipping_norm"),
    DifferentialPrivacyClientSideAdaptiveClipping: ("current_arrays", "clipping_norm"),
}
_INNER = "inner/"
_KINDS = ("arrayrecord", "dict", "list", "float", "int", "none")


def build_strategy(cfg: RunConfig) -> Strategy:
    """Return a fresh strategy for ``cfg.strategy`` (names are validated by :class:`RunConfig`)."""
    return STRATEGIES[cfg.strategy](cfg)


def strategy_info(strategy: Strategy) -> StrategyInfo:
    """What ``strategy`` declares: a ``fedge_info`` attribute, else the table of known classes.

    A strategy of one's own sets ``fedge_info = StrategyInfo(LINEAR, ReplySchema(...))``;
    any other class is :data:`PER_CLIENT` with the default reply schema.
    """
    declared = getattr(strategy, "fedge_info", None)
    if isinstance(declared, StrategyInfo):
        return declared
    return _INFO.get(type(strategy), StrategyInfo(PER_CLIENT))


def _state_attrs(strategy: Strategy) -> tuple[str, ...] | None:
    for cls in type(strategy).__mro__:
        if cls in _STATE_ATTRS:
            return _STATE_ATTRS[cls]
    return None


def _encode(attr: str, value: Any) -> dict[str, np.ndarray]:
    if value is None:
        return {f"{attr}@none": np.zeros(0, np.float32)}
    if isinstance(value, ArrayRecord):
        return {f"{attr}@arrayrecord/{i:05d}/{k}": v.numpy() for i, (k, v) in enumerate(value.items())}
    if isinstance(value, Mapping):
        return {f"{attr}@dict/{i:05d}/{k}": np.asarray(v) for i, (k, v) in enumerate(value.items())}
    if isinstance(value, list | tuple):
        return {f"{attr}@list/{i:05d}": np.asarray(v) for i, v in enumerate(value)}
    if isinstance(value, bool):
        raise TypeError(f"strategy state {attr!r} is a bool; keep it out of the checkpointed attributes")
    if isinstance(value, int):
        return {f"{attr}@int": np.asarray(value, dtype=np.int64)}
    if isinstance(value, float):
        return {f"{attr}@float": np.asarray(value, dtype=np.float64)}
    raise TypeError(f"strategy state {attr!r} is a {type(value).__name__}, which fedge cannot checkpoint")


def _decode(kind: str, items: list[tuple[str, np.ndarray]]) -> Any:
    if kind == "none":
        return None
    if kind == "int":
        return int(items[0][1])
    if kind == "float":
        return float(items[0][1])
    ordered = sorted(items)  # by the zero-padded position
    if kind == "list":
        return [v.copy() for _, v in ordered]
    named = [(key.partition("/")[2], v.copy()) for key, v in ordered]
    if kind == "dict":
        return dict(named)
    return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in named})


def strategy_state_dict(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's cross-round state as named arrays (empty for a stateless one).

    A strategy with a ``state_dict()`` method is asked; Flower's strategies are read by
    the attributes they keep state in; a wrapper's ``strategy`` is saved under ``inner/``.

    Raises
    ------
    TypeError
        If the strategy's class is unknown and declares no ``state_dict``: its state
        could not be checkpointed, and a resume would silently lose it.
    """
    own = getattr(strategy, "state_dict", None)
    if callable(own):
        state = own()
        return {str(k): np.asarray(v) for k, v in state.items()}
    attrs = _state_attrs(strategy)
    if attrs is None:
        raise TypeError(
            f"{type(strategy).__name__} declares no state: give it state_dict() and load_state_dict() "
            "methods (return {} if it keeps nothing between rounds)"
        )
    out: dict[str, np.ndarray] = {}
    for attr in attrs:
        out.update(_encode(attr, getattr(strategy, attr, None)))
    inner = getattr(strategy, "strategy", None)
    if isinstance(inner, Strategy):
        out.update({_INNER + k: v for k, v in strategy_state_dict(inner).items()})
    return out


def load_strategy_state_dict(strategy: Strategy, state: Mapping[str, np.ndarray]) -> None:
    """Restore what :func:`strategy_state_dict` saved into a freshly built strategy.

    Raises
    ------
    ValueError
        If ``state`` names an attribute this strategy does not keep.
    """
    own = getattr(strategy, "load_state_dict", None)
    if callable(own):
        own(dict(state))
        return
    attrs = _state_attrs(strategy) or ()
    inner_state = {k[len(_INNER) :]: v for k, v in state.items() if k.startswith(_INNER)}
    grouped: dict[tuple[str, str], list[tuple[str, np.ndarray]]] = {}
    for name, array in state.items():
        if name.startswith(_INNER):
            continue
        attr, _, rest = name.partition("@")
        kind, _, key = rest.partition("/")
        if attr not in attrs or kind not in _KINDS:
            raise ValueError(
                f"checkpoint holds strategy state {name!r}, which {type(strategy).__name__} does not "
                "keep; resume with the strategy the run started with"
            )
        grouped.setdefault((attr, kind), []).append((key, array))
    for (attr, kind), items in grouped.items():
        setattr(strategy, attr, _decode(kind, items))
    inner = getattr(strategy, "strategy", None)
    if inner_state:
        if not isinstance(inner, Strategy):
            raise ValueError(
                f"checkpoint holds a wrapped strategy's state, but {type(strategy).__name__} wraps none"
            )
        load_strategy_state_dict(inner, inner_state)


def legacy_strategy_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Translate a format-1 checkpoint's ``"<attr>/<key>"`` / ``"<attr>/#<i>"`` names."""
    out: dict[str, np.ndarray] = {}
    by_attr: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, array in state.items():
        attr, _, key = name.partition("/")
        by_attr.setdefault(attr, []).append((key, array))
    for attr, items in by_attr.items():
        if all(k.startswith("#") for k, _ in items):
            for k, v in items:
                out[f"{attr}@list/{int(k[1:]):05d}"] = v
        else:
            for i, (k, v) in enumerate(items):
                out[f"{attr}@dict/{i:05d}/{k}"] = v
    return out


__all__ = [
    "LINEAR",
    "PER_CLIENT",
    "STRATEGIES",
    "ReplySchema",
    "StrategyInfo",
    "build_strategy",
    "legacy_strategy_state",
    "load_strategy_state_dict",
    "strategy_info",
    "strategy_state_dict",
]
