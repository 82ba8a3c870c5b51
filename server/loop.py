"""fedge's round loop: sample -> configure -> exchange -> check -> aggregate -> evaluate -> checkpoint.

It is the body of fedge's ``ServerApp`` main under every engine. It calls Flower
Message-API strategies (``configure_train``, ``aggregate_train``, ...), so any of them
plugs in, but it owns what ``Strategy.start`` fixes: client sampling (seeded per round,
so a resumed run samples what the uninterrupted one would), the exchange itself (a
:class:`~fedge.server.transport.Transport`), the reply checks
(:mod:`fedge.server.checks`), the aggregate seam, checkpoints and round hooks.

The aggregate seam: the loop reduces a round to one :class:`~fedge.aggregation.Aggregate`
(the example-weighted sum of the updates, the total weight, how many clients it holds
and who was dropped), whatever the transport. For a *linear* strategy it takes the mean,
passes it through the ``mean_stages`` (where central DP noise goes), and hands the
strategy one synthetic reply that carries ``global + mean``, so FedAvgM's momentum and
FedAdam's moments only ever see that (possibly noised) mean. A *per-client* strategy
(median, Krum, ...) gets every checked reply instead, and needs a per-client transport.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from fedge.aggregation import Aggregate, Dropped, add_update, sum_updates
from fedge.config import RunConfig
from fedge.records import (
    ARRAYS_KEY,
    CLIP_BELOW,
    CLIP_NORM,
    CODEC,
    DP_SGD_DELTA,
    DP_SGD_EPSILON,
    DP_SGD_MAX_GRAD_NORM,
    DP_SGD_NOISE_MULTIPLIER,
    DP_SGD_TARGET_EPSILON,
    ERROR_FEEDBACK,
    METRICS_KEY,
    NUM_EXAMPLES,
    ROTATION_SEED,
    SEED,
    SERVER_ROUND,
    arrays_to_numpy,
    numpy_to_arrays,
    payload_bytes,
    with_content,
)
from fedge.rng import Stream
from fedge.server.checkpoint import (
    STRATEGY_COMPONENT,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    write_atomic,
)
from fedge.server.checks import INTERNAL_ERROR, CheckedUpdate, check_evaluation, check_update
from fedge.server.privacy import CentralDP
from fedge.server.secagg import SecAggTransport
from fedge.server.transport import (
    EVALUATE,
    TRAIN,
    Exchange,
    Federation,
    PlainTransport,
    RoundContext,
    SampledGrid,
    Transport,
    poisson_sample,
    sample_clients,
    wait_for_nodes,
)
from fedge.strategies import load_strategy_state_dict, strategy_info, strategy_state_dict
from fedge.training import EvalResult
from fedge.update_records import round_rotation_seed, to_fp16

log = logging.getLogger("fedge.server")

METRICS_FILE = "metrics.jsonl"
LOOP_COMPONENT = "loop"
TRANSPORT_COMPONENT = "transport"
ACCOUNTANT_COMPONENT = "accountant"

# Keys a resumed run may change, and why each cannot make it differ from the
# uninterrupted run. Every other key (the data, the model, the strategy, training and
# compression settings, sampling, the weight cap, and any key added later) is refused.
MAY_CHANGE_ON_RESUME: dict[str, str] = {
    "num-rounds": "may grow (never below the rounds already completed)",
    "out-dir": "the run folder is the one --resume names",
    "run-name": "the run folder is the one --resume names",
    "data-dir": "where the same dataset lies on this machine",
    "workers": "how many processes run the same clients",
    "round-timeout-s": "how long to wait for stragglers",
    "fraction-evaluate": "federated evaluation does not change the model",
    "export-every": "exports read the model, never change it",
    "export-max-accuracy-drop": "exports read the model, never change it",
    "export-max-latency-ms": "exports read the model, never change it",
    "export-calibration-samples": "exports read the model, never change it",
    "export-federated-eval": "exports read the model, never change it",
    "signing-key": "exports read the model, never change it",
    "target-epsilon": "a budget: the rounds already run keep their accounting; it decides whether more run",
}

EvaluateFn = Callable[[ArrayRecord], EvalResult]
# The place between the mean and the strategy's server optimizer (central DP noise):
# ``(server_round, mean) -> mean``, mean as ``record -> tensor -> float64``.
MeanStage = Callable[[int, dict[str, dict[str, np.ndarray]]], dict[str, dict[str, np.ndarray]]]


class Stateful(Protocol):
    """A component whose state the checkpoint keeps."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """The component's state as named arrays."""

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned, into a freshly built component."""


class RunFailedError(RuntimeError):
    """A run in which no round aggregated an update; the message says why."""


@dataclass(frozen=True)
class RoundRecord:
    """What one round did; one line of ``metrics.jsonl``.

    ``clients`` counts the updates aggregated; ``dropped`` the sampled clients whose
    reply was missing, an error, or rejected. Bytes are Flower's protobuf
    serialization of the message contents, summed over clients.
    """

    round: int
    accuracy: float
    loss: float
    clients: int
    bytes_up: int
    bytes_down: int
    wall_s: float
    sampled: int
    dropped: int
    aggregated: bool
    train_loss: float | None = None
    federated_accuracy: float | None = None
    # Secure aggregation: clients in the sum, dropped per stage, bytes per stage up and down.
    secagg: dict[str, Any] | None = None
    # Differential privacy: epsilon so far at target-delta, and how it was accounted.
    privacy: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN, which JSON lacks, becomes null)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RoundEvent:
    """Handed to round hooks after a round's checkpoint is on disk."""

    server_round: int
    arrays: ArrayRecord
    record: RoundRecord
    run_dir: Path
    grid: Grid
    # Asking clients from a hook (the int8 check) goes through the run's transport.
    federation: Federation | None = None


class RoundHook(Protocol):
    """Observer of the run: progress displays, exporters (int8 ONNX), publishers."""

    def on_start(self, first_round: int, num_rounds: int) -> None:
        """Called once before the first round this process runs."""

    def on_round(self, event: RoundEvent) -> None:
        """Called after every round, once its checkpoint is written."""


class SummaryHook(RoundHook, Protocol):
    """A hook that adds keys to ``summary.json`` (the exporter adds ``artifacts``)."""

    def summary_items(self) -> dict[str, Any]:
        """Keys and JSON values to merge into the run's summary."""


def _weighted_mean(pairs: Sequence[tuple[float, float]]) -> float | None:
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total > 0 else None


def _references(messages: Sequence[Message]) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """What each node was sent, by record and tensor (before any fp16 downlink)."""
    cache: dict[int, dict[str, np.ndarray]] = {}
    out: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for message in messages:
        records = {}
        for key, record in message.content.array_records.items():
            # Strategies put one shared ArrayRecord in every message: unpack it once.
            if id(record) not in cache:
                cache[id(record)] = arrays_to_numpy(record)
            records[key] = cache[id(record)]
        out[int(message.metadata.dst_node_id)] = records
    return out


class RoundLoop:
    """Runs the federated rounds of one run and keeps its run folder.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration.
    strategy : Strategy
        A Flower Message-API strategy (built with ``fraction_train = 1.0``); what it
        declares (:func:`fedge.strategies.strategy_info`) decides how it is fed.
    initial_arrays : ArrayRecord
        The global model before round 1 (ignored when resuming).
    evaluate_fn : callable
        Central evaluation of the global model, ``ArrayRecord -> EvalResult``.
    run_dir : Path
        Run folder: ``checkpoint.safetensors`` and ``metrics.jsonl`` are kept here.
    hooks : sequence of RoundHook
        Called after each round (an exception in a hook is logged, not raised).
    transport : Transport, optional
        Defaults to :class:`~fedge.server.transport.PlainTransport`.
    mean_stages : sequence of MeanStage
        Applied in order to the mean update before a linear strategy sees it.
    components : mapping of str to Stateful
        Further components whose ``state_dict`` the checkpoint keeps (an accountant).
    train_settings : mapping, optional
        The resolved local-training settings every round sends
        (:meth:`RunConfig.train_settings` of the loaded dataset's spec); by default
        resolved from the built-in dataset's spec.
    max_examples : int, optional
        The largest weight a reply may claim: ``max-examples-per-client``, or when that is
        0 the largest training partition (by default read from ``cfg.federated_data()``).

    Raises
    ------
    ValueError
        If the transport returns only an aggregate and the strategy needs per-client
        replies.
    """

    def __init__(
        self,
        cfg: RunConfig,
        strategy: Strategy,
        initial_arrays: ArrayRecord,
        evaluate_fn: EvaluateFn,
        run_dir: Path,
        hooks: Sequence[RoundHook] = (),
        transport: Transport | None = None,
        mean_stages: Sequence[MeanStage] = (),
        components: Mapping[str, Stateful] | None = None,
        train_settings: Mapping[str, int | float] | None = None,
        max_examples: int | None = None,
        privacy: CentralDP | None = None,
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.info = strategy_info(strategy)
        self.arrays = initial_arrays
        self.evaluate_fn = evaluate_fn
        self.run_dir = Path(run_dir)
        self.hooks = list(hooks)
        if max_examples is None:
            max_examples = cfg.max_examples_per_client or max(cfg.federated_data().partition_sizes())
        self.max_examples = int(max_examples)
        if transport is None:
            transport = SecAggTransport(cfg, self.max_examples) if cfg.secagg else PlainTransport()
        self.transport: Transport = transport
        if privacy is None and cfg.dp == "central":
            privacy = CentralDP(cfg)
        self.privacy = privacy
        #: Why the run stopped before ``num-rounds`` (a spent privacy budget), else ``None``.
        self.stop_reason: str | None = None
        self.mean_stages = list(mean_stages)
        self.components = dict(components or {})
        reserved = {LOOP_COMPONENT, STRATEGY_COMPONENT, TRANSPORT_COMPONENT, ACCOUNTANT_COMPONENT} & set(
            self.components
        )
        if reserved:
            raise ValueError(f"component names {sorted(reserved)} are the loop's own")
        if not self.transport.per_client and not self.info.linear:
            raise ValueError(
                f"{type(strategy).__name__} needs every client's update (a median, a trimmed mean, Krum's "
                "or Bulyan's distances), but this transport delivers only their sum (secure aggregation); "
                "choose a linear strategy (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad) or "
                "turn secure aggregation off"
            )
        if train_settings is None:
            from fedge.data import check_dataset_name

            spec = check_dataset_name(cfg.dataset) or cfg.federated_data().spec
            train_settings = cfg.train_settings(spec)
        self.train_settings = dict(train_settings)
        self.history: list[RoundRecord] = []
        self.last_round = 0
        # Replies dropped because checking them hit a bug in fedge (logged with tracebacks).
        self.internal_errors = 0

    # --- state ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """The loop's own counters (sampling and every seeded stream derive from the round)."""
        return {"last-round": np.asarray(self.last_round, dtype=np.int64)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`."""
        self.last_round = int(state["last-round"])

    def _components(self) -> dict[str, Any]:
        parts: dict[str, Any] = {LOOP_COMPONENT: self}
        if callable(getattr(self.transport, "state_dict", None)):
            parts[TRANSPORT_COMPONENT] = self.transport
        if self.privacy is not None:
            parts[ACCOUNTANT_COMPONENT] = self.privacy
        parts.update(self.components)
        return parts

    # --- resume -------------------------------------------------------------------

    def resume(self) -> int:
        """Load the run folder's checkpoint; return the last completed round.

        ``metrics.jsonl`` is rewritten from the checkpoint's history, which drops a
        line written after the last checkpoint by a run that then died.

        Raises
        ------
        CheckpointError
            If a key outside :data:`MAY_CHANGE_ON_RESUME` changed, ``num-rounds`` is below
            the rounds completed, or the checkpoint holds another model.
        """
        ckpt = load_checkpoint(self.run_dir)
        now = self.cfg.to_mapping()
        changed = [
            f"{key} ({ckpt.config.get(key)!r} -> {now[key]!r})"
            for key in now
            if key not in MAY_CHANGE_ON_RESUME and key in ckpt.config and ckpt.config[key] != now[key]
        ]
        if changed:
            raise CheckpointError(
                f"cannot resume {self.run_dir} with a different {', '.join(changed)}: the resumed run "
                "would differ from the uninterrupted one; keep them, or start a new run with --out"
            )
        if self.cfg.num_rounds < ckpt.server_round:
            raise CheckpointError(
                f"num-rounds {self.cfg.num_rounds} is below the {ckpt.server_round} rounds {self.run_dir} "
                f"already completed; pass --num-rounds {ckpt.server_round} or more"
            )
        shapes = {k: tuple(v.shape) for k, v in ckpt.model.items()}
        if shapes != {k: tuple(a.shape) for k, a in self.arrays.items()}:
            raise CheckpointError(
                f"the checkpoint in {self.run_dir} holds another model's weights than "
                f"{self.cfg.model!r} builds; start a new run with --out"
            )
        self.arrays = numpy_to_arrays(ckpt.model)
        try:
            load_strategy_state_dict(self.strategy, ckpt.strategy_state)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"cannot restore the strategy from {self.run_dir}: {err}") from None
        # Every component's state, both ways: a component this run lacks would lose its
        # state, one the checkpoint lacks would start over (an empty state is no state).
        ours = {n: c for n, c in self._components().items() if n != LOOP_COMPONENT}
        for name, state in ckpt.components.items():
            if name not in ours and name not in (LOOP_COMPONENT, STRATEGY_COMPONENT) and state:
                raise CheckpointError(
                    f"the checkpoint in {self.run_dir} holds state for {name!r}, which this run does not "
                    "have: resume with the settings the run started with"
                )
        for name, component in ours.items():
            state = ckpt.components.get(name)
            if not state:
                if component.state_dict():
                    raise CheckpointError(
                        f"the checkpoint in {self.run_dir} has no state for {name!r}; it was written by a "
                        "run without it: resume with the same settings, or start a new run with --out"
                    )
                continue
            component.load_state_dict(state)
        self.history = [RoundRecord(**h) for h in ckpt.history]
        self.last_round = ckpt.server_round
        lines = "".join(json.dumps(r.to_dict()) + "\n" for r in self.history)
        write_atomic(self.run_dir / METRICS_FILE, lines.encode())
        return self.last_round

    # --- rounds -------------------------------------------------------------------

    def run(self, grid: Grid) -> list[RoundRecord]:
        """Run rounds ``last_round + 1 .. cfg.num_rounds`` on ``grid``; return the full history."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        federation = Federation(grid, self.transport, self.cfg.round_timeout_s)
        first = self.last_round + 1
        if self.privacy is not None:
            self.privacy.check_first_round()
        for hook in self.hooks:
            hook.on_start(first, self.cfg.num_rounds)
        for server_round in range(first, self.cfg.num_rounds + 1):
            if self.privacy is not None:
                allowed, after = self.privacy.budget_allows_next_round()
                if not allowed:
                    self.stop_reason = (
                        f"privacy budget: round {server_round} would bring epsilon to {after:.4g}, past "
                        f"target-epsilon {self.cfg.target_epsilon} (delta {self.privacy.delta:g}); "
                        f"stopped after round {server_round - 1} with epsilon {self.privacy.epsilon():.4g}"
                    )
                    log.warning("%s", self.stop_reason)
                    break
            record = self.run_round(grid, server_round)
            log.info(
                "round %d/%d: accuracy %.4f, loss %.4f, %d/%d clients, %d B up, %d B down, %.2f s",
                server_round,
                self.cfg.num_rounds,
                record.accuracy,
                record.loss,
                record.clients,
                record.sampled,
                record.bytes_up,
                record.bytes_down,
                record.wall_s,
            )
            self.history.append(record)
            self.last_round = server_round
            self._checkpoint()
            with open(self.run_dir / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(record.to_dict()) + "\n")
            event = RoundEvent(server_round, self.arrays, record, self.run_dir, grid, federation)
            for hook in self.hooks:
                try:
                    hook.on_round(event)
                except Exception:  # a failed export must not end the training run
                    log.exception("round hook %s failed in round %d", type(hook).__name__, server_round)
        return self.history

    def _round_config(self, server_round: int) -> ConfigRecord:
        """What every client gets with the model: only the settings it needs."""
        cfg = self.cfg
        record = ConfigRecord(
            {
                SERVER_ROUND: server_round,
                # lr, momentum, epochs, step cap, batch size, clipping: resolved, never "auto".
                **self.train_settings,
                SEED: cfg.seed,
                **cfg.client_settings(),
            }
        )
        if cfg.compression != "none" or cfg.downlink == "fp16":
            # The client's update pipeline reads these; one rotation seed per round, shared
            # by every client (rotated updates must stay summable under secure aggregation).
            # An fp16 downlink asks for updates even uncompressed ("none"): the server adds
            # them to its fp32 model, which plain weights trained from the fp16 copy would
            # drag onto the fp16 grid every round.
            record[CODEC] = str(cfg.codec())
            record[ERROR_FEEDBACK] = cfg.error_feedback
            record[ROTATION_SEED] = round_rotation_seed(cfg.seed, server_round)
        if self.privacy is not None:
            record[CLIP_NORM] = self.privacy.clip_norm  # the client's clip stage bounds what it sends
        if cfg.dp_sgd:
            record[DP_SGD_NOISE_MULTIPLIER] = cfg.dp_sgd_noise_multiplier
            record[DP_SGD_MAX_GRAD_NORM] = cfg.dp_sgd_max_grad_norm
            record[DP_SGD_TARGET_EPSILON] = cfg.dp_sgd_target_epsilon
            record[DP_SGD_DELTA] = cfg.target_delta
        return record

    def _downlink(self, messages: list[Message]) -> list[Message]:
        """The messages as sent: with ``downlink = fp16``, every float32 ArrayRecord as float16."""
        if self.cfg.downlink != "fp16":
            return messages
        # Strategies put one shared ArrayRecord (the global model) in every message:
        # convert each once, not once per client.
        halves: dict[int, ArrayRecord] = {}
        for message in messages:
            content = message.content
            converted = {}
            for key, record in content.array_records.items():
                if id(record) not in halves:
                    halves[id(record)] = to_fp16(record)
                converted[key] = halves[id(record)]
            # A new RecordDict per message: strategies share one between their messages.
            message.content = RecordDict({**dict(content), **converted})
        return messages

    def _check_replies(
        self, server_round: int, exchange: Exchange, references: Mapping[int, Any]
    ) -> tuple[list[CheckedUpdate], list[Dropped]]:
        checked: list[CheckedUpdate] = []
        dropped = [Dropped(n, "no reply within round-timeout-s") for n in exchange.missing]
        internal = 0
        seen: set[int] = set()
        for reply in exchange.replies:
            node = int(reply.metadata.src_node_id)
            if node not in references:
                reason: str | None = f"reply from node {node}, which this round did not ask"
                update = None
            elif node in seen:
                reason, update = "a second reply from the same node in one round", None
            else:
                seen.add(node)
                update, reason = check_update(reply, references[node], self.info.reply, self.max_examples)
            if update is not None:
                checked.append(update)
            else:
                assert reason is not None
                internal += reason.startswith(INTERNAL_ERROR)
                dropped.append(Dropped(node, reason))
                log.warning("round %d: dropped update of node %d: %s", server_round, node, reason)
        self.internal_errors += internal
        if internal:
            log.error(
                "round %d: %d replies hit a bug in fedge's checks (tracebacks above)", server_round, internal
            )
        # Sorting fixes the summation order, so aggregation is bit-reproducible.
        checked.sort(key=lambda u: u.node_id)
        return checked, dropped

    def _aggregate(
        self,
        server_round: int,
        checked: list[CheckedUpdate],
        aggregate: Aggregate | None,
        base: Mapping[str, Mapping[str, np.ndarray]],
    ) -> ArrayRecord | None:
        """The new global model from this round's updates, or ``None`` to keep the old one.

        ``base`` is what the updates are relative to: the records the server sent.
        """
        if self.info.linear:
            assert aggregate is not None
            if not aggregate.is_finite():
                log.warning(
                    "round %d: the aggregate is not finite; keeping the previous global model", server_round
                )
                return None
            if self.privacy is not None:
                aggregate = self.privacy.privatize(server_round, aggregate)
            mean = aggregate.mean()
            for stage in self.mean_stages:
                mean = stage(server_round, mean)
            if set(mean) != {ARRAYS_KEY} | set(self.info.reply.array_records):
                raise ValueError(f"the aggregate holds records {sorted(mean)}, not the declared ones")
            if not all(np.isfinite(v).all() for tensors in mean.values() for v in tensors.values()):
                log.warning(
                    "round %d: the mean is not finite; keeping the previous global model", server_round
                )
                return None
            content: dict[str, Any] = {
                key: numpy_to_arrays(add_update(base[key], values)) for key, values in mean.items()
            }
            content[METRICS_KEY] = MetricRecord({NUM_EXAMPLES: aggregate.total_weight})
            template = checked[0].message if checked else None
            synthetic = (
                with_content(template, RecordDict(content))
                if template is not None
                else Message(RecordDict(content), dst_node_id=0, message_type="train")
            )
            replies = [synthetic]
        else:
            replies = [u.message for u in checked]
        # A refused result must not leave its trace in the strategy (FedAvgM's momentum,
        # FedAdam's moments): the state is restored to what it was before this round.
        before = strategy_state_dict(self.strategy)
        try:
            new_arrays, _ = self.strategy.aggregate_train(server_round, replies)
        except (AggregationError, InconsistentMessageReplies) as err:  # the strategy refused them
            log.warning(
                "round %d: %s could not aggregate: %s", server_round, type(self.strategy).__name__, err
            )
            load_strategy_state_dict(self.strategy, before)
            return None
        except Exception:
            if self.info.linear:
                raise  # it got the loop's own mean: a bug, not the clients' doing
            log.exception(
                "bug: %s raised in round %d on checked replies", type(self.strategy).__name__, server_round
            )
            load_strategy_state_dict(self.strategy, before)
            return None
        model = self._as_model(new_arrays) if new_arrays is not None else "the strategy returned no model"
        if isinstance(model, str):
            log.warning("round %d: %s; keeping the previous global model", server_round, model)
            load_strategy_state_dict(self.strategy, before)
            return None
        return model

    def _as_model(self, arrays: ArrayRecord) -> ArrayRecord | str:
        """An aggregated model as the global model's tensors and dtypes, or why it cannot be.

        Flower's FedAdam/FedYogi/FedAdagrad return float64 arrays: they are rounded back to
        the model's float32, so the model (and what clients receive) keeps its dtype.
        """
        old = arrays_to_numpy(self.arrays)
        new = arrays_to_numpy(arrays)
        if set(new) != set(old) or any(new[k].shape != v.shape for k, v in old.items()):
            return "the strategy returned a model of other tensors or shapes"
        out: dict[str, np.ndarray] = {}
        for name, ref in old.items():
            values = new[name]
            if values.dtype != ref.dtype:
                if not (values.dtype.kind == "f" and ref.dtype.kind == "f"):
                    return f"the strategy turned {name!r} from {ref.dtype} into {values.dtype}"
                with np.errstate(over="ignore"):
                    values = values.astype(ref.dtype)
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return f"the aggregated model holds NaN or Inf in {name!r}"
            out[name] = values
        return numpy_to_arrays({name: out[name] for name in old})

    def run_round(self, grid: Grid, server_round: int) -> RoundRecord:
        """One round of training (and evaluation) starting from ``self.arrays``."""
        cfg = self.cfg
        start = time.perf_counter()
        if cfg.client_sampling == "poisson":
            # Each of the num-clients clients with probability q: the population must be there.
            node_ids = wait_for_nodes(grid, cfg.num_clients, cfg.round_timeout_s)
            sampled = poisson_sample(node_ids, cfg.sample_rate(), cfg.seed, server_round)
        else:
            node_ids = wait_for_nodes(grid, cfg.clients_per_round, cfg.round_timeout_s)
            sampled = sample_clients(node_ids, cfg.clients_per_round, cfg.seed, server_round)
        config = self._round_config(server_round)
        messages = (
            list(self.strategy.configure_train(server_round, self.arrays, config, SampledGrid(grid, sampled)))
            if sampled
            else []  # Poisson sampling drew nobody: the round runs with no client
        )
        for message in messages:
            # Flower's strategies leave it empty; engines and logs group a round's messages by it.
            message.metadata.group_id = str(server_round)
        references = _references(messages)
        messages = self._downlink(messages)
        # Counted before the exchange (a transport may add to the messages) unless the
        # transport counts every message it sends itself (secure aggregation's stages).
        bytes_down = sum(payload_bytes(m.content) for m in messages) if self.transport.per_client else 0
        exchange = self.transport.exchange(
            grid, messages, RoundContext(server_round, TRAIN, config, cfg.round_timeout_s)
        )
        bytes_up = sum(payload_bytes(r.content) for r in exchange.replies if r.has_content())
        if exchange.bytes_up is not None:
            bytes_up = exchange.bytes_up
        if exchange.bytes_down is not None:
            bytes_down = exchange.bytes_down
        elif not self.transport.per_client:
            bytes_down = sum(payload_bytes(m.content) for m in messages)

        checked, dropped = self._check_replies(server_round, exchange, references)
        if exchange.aggregate is None and self.info.linear and self.privacy is not None:
            # Central DP: every decoded update clipped to C, weight 1 each (sensitivity C).
            aggregate: Aggregate | None = sum_updates(
                [self.privacy.clip(u.updates) for u in checked], [1.0] * len(checked), dropped
            )
        elif exchange.aggregate is None and self.info.linear:
            aggregate = sum_updates(
                [u.updates for u in checked], [float(u.num_examples) for u in checked], dropped
            )
        else:
            aggregate = exchange.aggregate
        num_clients = exchange.aggregate.num_clients if exchange.aggregate is not None else len(checked)
        needed = cfg.min_replies(len(messages))
        new_arrays = None
        if num_clients >= needed:
            base = references[checked[0].node_id] if checked else {ARRAYS_KEY: arrays_to_numpy(self.arrays)}
            new_arrays = self._aggregate(server_round, checked, aggregate, base)
        else:
            log.warning(
                "round %d: only %d valid updates of %d sampled (min-reply-fraction needs %d); "
                "keeping the previous global model",
                server_round,
                num_clients,
                len(messages),
                needed,
            )
        aggregated = new_arrays is not None
        if new_arrays is not None:
            self.arrays = new_arrays
        privacy = None
        if self.privacy is not None:
            # Counted whether or not it aggregated: its clients were asked, so the analysis
            # must assume the release.
            self.privacy.step(_clip_bits(exchange.replies, {u.node_id for u in checked}))
            privacy = self.privacy.report()
            self.privacy.reclipped = 0
        if cfg.dp_sgd:
            # Each device's own (sample-level) epsilon, as its ledger reports it.
            device = _reported(exchange.replies, {u.node_id for u in checked}, DP_SGD_EPSILON)
            privacy = {**(privacy or {}), "dp_sgd_epsilon_max": max(device) if device else None}

        federated_accuracy = (
            self._federated_evaluate(grid, server_round, node_ids) if cfg.fraction_evaluate > 0 else None
        )
        central = self.evaluate_fn(self.arrays)
        losses = [(float(u.num_examples), float(u.train_loss)) for u in checked if u.train_loss is not None]
        return RoundRecord(
            round=server_round,
            accuracy=central.accuracy,
            loss=central.loss,
            clients=num_clients if aggregated else 0,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            wall_s=time.perf_counter() - start,
            sampled=len(messages),
            dropped=len(messages) - num_clients,
            aggregated=aggregated,
            train_loss=_weighted_mean(losses),
            federated_accuracy=federated_accuracy,
            secagg=exchange.stats.get("secagg"),
            privacy=privacy,
        )

    def _federated_evaluate(self, grid: Grid, server_round: int, node_ids: list[int]) -> float | None:
        num = max(1, round(self.cfg.fraction_evaluate * len(node_ids)))
        sampled = sample_clients(node_ids, num, self.cfg.seed, server_round, Stream.EVALUATION_SAMPLING)
        config = ConfigRecord({SERVER_ROUND: server_round, **self.cfg.client_settings()})
        messages = list(
            self.strategy.configure_evaluate(server_round, self.arrays, config, SampledGrid(grid, sampled))
        )
        for message in messages:
            message.metadata.group_id = str(server_round)
        messages = self._downlink(messages)
        exchange = self.transport.exchange(
            grid, messages, RoundContext(server_round, EVALUATE, config, self.cfg.round_timeout_s)
        )
        pairs = []
        seen: set[int] = set()
        for reply in exchange.replies:
            if int(reply.metadata.src_node_id) in seen:
                continue  # one evaluation per client and round
            seen.add(int(reply.metadata.src_node_id))
            result, reason = check_evaluation(reply, self.max_examples)
            if result is None:
                log.warning(
                    "round %d: dropped evaluation of node %d: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    reason,
                )
                continue
            pairs.append((float(result.num_examples), result.accuracy))
        return _weighted_mean(pairs)

    def _checkpoint(self) -> None:
        components = {name: part.state_dict() for name, part in self._components().items()}
        components[STRATEGY_COMPONENT] = strategy_state_dict(self.strategy)
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                server_round=self.last_round,
                model=arrays_to_numpy(self.arrays),
                components=components,
                config=self.cfg.to_mapping(),
                history=[asdict(r) for r in self.history],
            ),
        )


def _metric_of(replies: Sequence[Message], nodes: set[int], key: str) -> dict[int, object]:
    """Metric ``key`` of the first reply of each node in ``nodes`` (raw: callers check it)."""
    values: dict[int, object] = {}
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if node not in nodes or node in values or not reply.has_content():
            continue
        records = list(reply.content.metric_records.values())
        values[node] = records[0].get(key) if len(records) == 1 else None
    return values


def _clip_bits(replies: Sequence[Message], nodes: set[int]) -> list[int]:
    """Adaptive clipping's bits of the clients in the sum: 1 when a client reported its update
    within the clip; anything else (missing, not 0 or 1) counts as 0. A bit moves the clip
    by at most one count, which the noised count's privacy accounting covers."""
    values = _metric_of(replies, nodes, CLIP_BELOW)
    return [1 if values.get(n) == 1 and not isinstance(values.get(n), bool) else 0 for n in sorted(nodes)]


def _reported(replies: Sequence[Message], nodes: set[int], key: str) -> list[float]:
    """The finite, non-negative values of metric ``key`` the clients in ``nodes`` reported."""
    out = []
    for _, value in sorted(_metric_of(replies, nodes, key).items()):
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        ):
            out.append(float(value))
    return out


def require_some_round_aggregated(history: Sequence[RoundRecord], internal_errors: int = 0) -> None:
    """Raise :class:`RunFailedError` when no round of ``history`` aggregated an update.

    ``internal_errors`` counts replies dropped by a bug in fedge's checks; the message
    says so, since then the clients are not to blame.
    """
    if history and not any(r.aggregated for r in history):
        dropped = sum(r.dropped for r in history)
        bugs = (
            f", {internal_errors} of them by a bug in fedge (tracebacks in the log)"
            if internal_errors
            else ""
        )
        raise RunFailedError(
            f"no round aggregated an update: all {len(history)} rounds failed ({dropped} client updates "
            f"dropped or missing{bugs}; the reasons are in the log above)"
        )


__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "METRICS_FILE",
    "MeanStage",
    "PlainTransport",
    "RoundEvent",
    "RoundHook",
    "RoundLoop",
    "RoundRecord",
    "RunFailedError",
    "Stateful",
    "SummaryHook",
    "Transport",
    "check_update",
    "require_some_round_aggregated",
    "sample_clients",
]
