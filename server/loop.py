"""fedge's round loop: configure -> send -> check -> aggregate -> evaluate -> checkpoint -> hooks.

It is the body of fedge's ``ServerApp`` main under every engine. It calls Flower
Message-API strategies (``configure_train``, ``aggregate_train``, ...), so any of them
plugs in, but it owns what ``Strategy.start`` fixes: client sampling (seeded per round,
so a resumed run samples what the uninterrupted one would), the exchange itself (a
:class:`Transport`, so secure aggregation can add its stages), dropping bad updates,
checkpoints and round hooks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from fedge.compression import CodecError
from fedge.config import RunConfig
from fedge.records import (
    ARRAYS_KEY,
    BATCH_SIZE,
    CODEC,
    ERROR_FEEDBACK,
    EVAL_ACCURACY,
    LOCAL_EPOCHS,
    LR,
    METRICS_KEY,
    MOMENTUM,
    NUM_EXAMPLES,
    ROTATION_SEED,
    SEED,
    TRAIN_LOSS,
    arrays_to_numpy,
    numpy_to_arrays,
    payload_bytes,
    with_content,
)
from fedge.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    write_atomic,
)
from fedge.strategies import load_strategy_state, strategy_state
from fedge.training import EvalResult
from fedge.update_records import decode_array, round_rotation_seed, to_fp16

log = logging.getLogger("fedge.server")

METRICS_FILE = "metrics.jsonl"
# What a resumed run may not change: the model, its data and the optimizer it continues.
FIXED_ON_RESUME = ("dataset", "partition", "model", "num-clients", "seed", "strategy")

EvaluateFn = Callable[[ArrayRecord], EvalResult]


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
    grid: Grid  # lets a hook ask clients too (the federated check of an int8 candidate)


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


class Transport(Protocol):
    """How a round's messages reach clients and replies come back.

    Plain transport is one ``send_and_receive``; secure aggregation replaces it with
    its multi-stage protocol and hands back replies whose arrays are already summed.
    """

    def exchange(self, grid: Grid, messages: list[Message], timeout_s: float) -> list[Message]:
        """Deliver ``messages`` and return the replies received within ``timeout_s``."""


class PlainTransport:
    """One ``send_and_receive`` exchange per round."""

    def exchange(self, grid: Grid, messages: list[Message], timeout_s: float) -> list[Message]:
        """Send every message and wait for the replies."""
        return list(grid.send_and_receive(messages, timeout=timeout_s))


class _SampledGrid(Grid):
    """A view of ``grid`` whose nodes are only this round's sampled clients.

    Strategies are built with ``fraction_train = 1.0``, so they address exactly the
    nodes this view lists: the loop decides who takes part, the strategy what they get.
    """

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def sample_clients(node_ids: Iterable[int], num: int, seed: int, server_round: int) -> list[int]:
    """Pick ``num`` distinct nodes for ``server_round``; the same inputs give the same pick."""
    pool = sorted(node_ids)
    rng = np.random.default_rng([seed, server_round])
    # Pick positions, not ids: Flower's node ids are unsigned 64-bit, which numpy would
    # turn into float64 (and round) when given a mixed list.
    return sorted(pool[int(i)] for i in rng.choice(len(pool), size=num, replace=False))


def check_update(reply: Message, reference: Mapping[str, np.ndarray]) -> tuple[Message | None, str | None]:
    """Check a training reply; return a clean copy to aggregate, or why it cannot be.

    A tensor arrives as plain weights or as a compressed update against the global model
    the server sent (:mod:`fedge.update_records`), which is decoded here and added to
    ``reference``. A reply is rejected for: an error instead of content, no or several
    ArrayRecords, arrays that do not decode (a malformed, truncated or over-long codec
    payload, an unknown codec version or id), or whose names, decoded shapes or dtypes
    differ from the global model's, NaN or Inf values, or a missing, non-finite or
    non-positive ``num-examples``. Anything that raises while being read is a rejection
    too, never a crash of the round.

    Parameters
    ----------
    reply : Message
        A client's reply to a training message.
    reference : Mapping[str, ndarray]
        The global model this round sent, by tensor name.

    Returns
    -------
    tuple
        ``(clean, None)`` where ``clean`` carries only the decoded weights and
        ``num-examples`` (so strategies see uniform replies whatever else a client sent),
        or ``(None, reason)``.
    """
    if reply.has_error():
        return None, f"client error: {reply.error.reason}"
    try:
        content = reply.content
        if len(content.array_records) != 1:
            return None, f"expected one ArrayRecord, got {len(content.array_records)}"
        arrays = next(iter(content.array_records.values()))
        if set(arrays.keys()) != set(reference):
            missing = sorted(set(reference) - set(arrays.keys()))
            extra = sorted(set(arrays.keys()) - set(reference))
            return None, f"array names differ from the model's (missing {missing}, unexpected {extra})"
        decoded: dict[str, np.ndarray] = {}
        for name, array in arrays.items():
            shape, dtype = reference[name].shape, reference[name].dtype
            # The declared shape/dtype and the bytes can disagree: check what decodes.
            try:
                values = decode_array(array, reference[name])
            except CodecError as err:
                return None, f"bad compressed update for {name!r}: {err}"
            if values.shape != shape or values.dtype != dtype:
                return (
                    None,
                    f"array {name!r} is {values.dtype}{list(values.shape)}, expected {dtype}{list(shape)}",
                )
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return None, f"array {name!r} holds NaN or Inf"
            decoded[name] = values
        if len(content.metric_records) != 1:
            return None, f"expected one MetricRecord, got {len(content.metric_records)}"
        metrics = next(iter(content.metric_records.values()))
        num_examples = metrics.get(NUM_EXAMPLES)
        if (
            isinstance(num_examples, bool)
            or not isinstance(num_examples, int | float)
            or not math.isfinite(num_examples)
            or not num_examples > 0
        ):
            return None, f"{NUM_EXAMPLES} must be a positive finite number, got {num_examples!r}"
    except Exception as err:  # undecodable bytes, a bogus dtype, ...: drop, never crash
        return None, f"unreadable update ({type(err).__name__}: {err})"
    clean = RecordDict(
        {ARRAYS_KEY: numpy_to_arrays(decoded), METRICS_KEY: MetricRecord({NUM_EXAMPLES: num_examples})}
    )
    return with_content(reply, clean), None


def _weighted_metric(replies: Sequence[Message], key: str) -> float | None:
    """Example-weighted mean of a scalar metric; replies without a usable value are skipped."""
    pairs = []
    for reply in replies:
        if reply.has_error() or len(reply.content.metric_records) != 1:
            continue
        metrics = next(iter(reply.content.metric_records.values()))
        weight, value = metrics.get(NUM_EXAMPLES), metrics.get(key)
        if (
            isinstance(weight, int | float)
            and isinstance(value, int | float)
            and math.isfinite(weight)
            and math.isfinite(value)
            and weight > 0
        ):
            pairs.append((float(weight), float(value)))
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total > 0 else None


def wait_for_nodes(grid: Grid, num: int, timeout_s: float) -> list[int]:
    """Wait until ``grid`` lists at least ``num`` nodes (deployment: SuperNodes connecting)."""
    deadline = time.monotonic() + timeout_s
    reported = -1
    while True:
        node_ids = list(grid.get_node_ids())
        if len(node_ids) >= num:
            return node_ids
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(node_ids)} of the {num} clients a round needs connected within "
                f"{timeout_s:.0f} s; start more SuperNodes or lower clients-per-round"
            )
        if len(node_ids) != reported:
            log.info("waiting for clients: %d connected, %d needed (clients-per-round)", len(node_ids), num)
            reported = len(node_ids)
        time.sleep(1.0)


class RoundLoop:
    """Runs the federated rounds of one run and keeps its run folder.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration.
    strategy : Strategy
        A Flower Message-API strategy (built with ``fraction_train = 1.0``).
    initial_arrays : ArrayRecord
        The global model before round 1 (ignored when resuming).
    evaluate_fn : callable
        Central evaluation of the global model, ``ArrayRecord -> EvalResult``.
    run_dir : Path
        Run folder: ``checkpoint.safetensors`` and ``metrics.jsonl`` are kept here.
    hooks : sequence of RoundHook
        Called after each round (an exception in a hook is logged, not raised).
    transport : Transport, optional
        Defaults to :class:`PlainTransport`.
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
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.arrays = initial_arrays
        self.evaluate_fn = evaluate_fn
        self.run_dir = Path(run_dir)
        self.hooks = list(hooks)
        self.transport = transport or PlainTransport()
        self.history: list[RoundRecord] = []
        self.last_round = 0

    # --- resume -------------------------------------------------------------------

    def resume(self) -> int:
        """Load the run folder's checkpoint; return the last completed round.

        ``metrics.jsonl`` is rewritten from the checkpoint's history, which drops a
        line written after the last checkpoint by a run that then died.
        """
        ckpt = load_checkpoint(self.run_dir)
        now = self.cfg.to_mapping()
        changed = [
            f"{key} ({ckpt.config.get(key)!r} -> {now[key]!r})"
            for key in FIXED_ON_RESUME
            if key in ckpt.config and ckpt.config[key] != now[key]
        ]
        if changed:
            raise CheckpointError(
                f"cannot resume {self.run_dir} with a different {', '.join(changed)}; "
                "keep them, or start a new run with --out"
            )
        shapes = {k: tuple(v.shape) for k, v in ckpt.model.items()}
        if shapes != {k: tuple(a.shape) for k, a in self.arrays.items()}:
            raise CheckpointError(
                f"the checkpoint in {self.run_dir} holds another model's weights than "
                f"{self.cfg.model!r} builds; start a new run with --out"
            )
        self.arrays = numpy_to_arrays(ckpt.model)
        load_strategy_state(self.strategy, ckpt.strategy_state)
        self.history = [RoundRecord(**h) for h in ckpt.history]
        self.last_round = ckpt.server_round
        lines = "".join(json.dumps(r.to_dict()) + "\n" for r in self.history)
        write_atomic(self.run_dir / METRICS_FILE, lines.encode())
        return self.last_round

    # --- rounds -------------------------------------------------------------------

    def run(self, grid: Grid) -> list[RoundRecord]:
        """Run rounds ``last_round + 1 .. cfg.num_rounds`` on ``grid``; return the full history."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        first = self.last_round + 1
        for hook in self.hooks:
            hook.on_start(first, self.cfg.num_rounds)
        for server_round in range(first, self.cfg.num_rounds + 1):
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
            event = RoundEvent(server_round, self.arrays, record, self.run_dir, grid)
            for hook in self.hooks:
                try:
                    hook.on_round(event)
                except Exception:  # a failed export must not end the training run
                    log.exception("round hook %s failed in round %d", type(hook).__name__, server_round)
        return self.history

    def _round_config(self, server_round: int) -> ConfigRecord:
        cfg = self.cfg
        record = ConfigRecord(
            {
                LR: cfg.lr,
                MOMENTUM: cfg.momentum,
                LOCAL_EPOCHS: cfg.local_epochs,
                BATCH_SIZE: cfg.batch_size,
                SEED: cfg.seed,
            }
        )
        if cfg.compression != "none" or cfg.downlink == "fp16":
            # The client's compression mod reads these; one rotation seed per round, shared
            # by every client (rotated updates must stay summable under secure aggregation).
            # An fp16 downlink asks for updates even uncompressed ("none"): the server adds
            # them to its fp32 model, which plain weights trained from the fp16 copy would
            # drag onto the fp16 grid every round.
            record[CODEC] = str(cfg.codec())
            record[ERROR_FEEDBACK] = cfg.error_feedback
            record[ROTATION_SEED] = round_rotation_seed(cfg.seed, server_round)
        return record

    def _downlink(self, messages: list[Message]) -> list[Message]:
        """The messages as sent: with ``downlink = fp16``, the model's float32 tensors as float16."""
        if self.cfg.downlink != "fp16":
            return messages
        # Strategies put one shared ArrayRecord (the global model) in every message:
        # convert it once, not once per client.
        halves: dict[int, ArrayRecord] = {}
        for message in messages:
            content = message.content
            if ARRAYS_KEY in content.array_records:
                full = content.array_records[ARRAYS_KEY]
                if id(full) not in halves:
                    halves[id(full)] = to_fp16(full)
                # A new RecordDict per message: strategies share one between their messages.
                message.content = RecordDict({**dict(content), ARRAYS_KEY: halves[id(full)]})
        return messages

    def run_round(self, grid: Grid, server_round: int) -> RoundRecord:
        """One round of training (and evaluation) starting from ``self.arrays``."""
        cfg = self.cfg
        start = time.perf_counter()
        node_ids = wait_for_nodes(grid, cfg.clients_per_round, cfg.round_timeout_s)
        sampled = sample_clients(node_ids, cfg.clients_per_round, cfg.seed, server_round)
        messages = self._downlink(
            list(
                self.strategy.configure_train(
                    server_round, self.arrays, self._round_config(server_round), _SampledGrid(grid, sampled)
                )
            )
        )
        bytes_down = sum(payload_bytes(m.content) for m in messages)
        replies = self.transport.exchange(grid, messages, cfg.round_timeout_s)
        bytes_up = sum(payload_bytes(r.content) for r in replies if r.has_content())

        reference = arrays_to_numpy(self.arrays)
        valid: list[Message] = []
        accepted: list[Message] = []
        for reply in replies:
            clean, reason = check_update(reply, reference)
            if clean is not None:
                valid.append(clean)
                accepted.append(reply)
            else:
                log.warning(
                    "round %d: dropped update of node %d: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    reason,
                )
        missing = len(messages) - len(replies)
        if missing:
            log.warning(
                "round %d: %d of %d clients did not reply in time", server_round, missing, len(messages)
            )
        # Sorting fixes the summation order, so aggregation is bit-reproducible.
        valid.sort(key=lambda m: m.metadata.src_node_id)

        needed = cfg.min_replies(len(messages))
        aggregated = False
        if len(valid) >= needed:
            try:
                new_arrays, _ = self.strategy.aggregate_train(server_round, valid)
            except Exception:  # a strategy refusing the replies must not end the run
                log.exception("round %d: %s could not aggregate", server_round, type(self.strategy).__name__)
                new_arrays = None
            if new_arrays is not None:
                self.arrays = new_arrays
                aggregated = True
        else:
            log.warning(
                "round %d: only %d valid updates of %d sampled (min-reply-fraction needs %d); "
                "keeping the previous global model",
                server_round,
                len(valid),
                len(messages),
                needed,
            )

        federated_accuracy = (
            self._federated_evaluate(grid, server_round, node_ids) if cfg.fraction_evaluate > 0 else None
        )
        central = self.evaluate_fn(self.arrays)
        return RoundRecord(
            round=server_round,
            accuracy=central.accuracy,
            loss=central.loss,
            clients=len(valid) if aggregated else 0,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            wall_s=time.perf_counter() - start,
            sampled=len(messages),
            dropped=len(messages) - len(valid),
            aggregated=aggregated,
            train_loss=_weighted_metric(accepted, TRAIN_LOSS),
            federated_accuracy=federated_accuracy,
        )

    def _federated_evaluate(self, grid: Grid, server_round: int, node_ids: list[int]) -> float | None:
        num = max(1, round(self.cfg.fraction_evaluate * len(node_ids)))
        sampled = sample_clients(node_ids, num, self.cfg.seed + 1, server_round)
        messages = self._downlink(
            list(
                self.strategy.configure_evaluate(
                    server_round, self.arrays, ConfigRecord(), _SampledGrid(grid, sampled)
                )
            )
        )
        replies = self.transport.exchange(grid, messages, self.cfg.round_timeout_s)
        return _weighted_metric(replies, EVAL_ACCURACY)

    def _checkpoint(self) -> None:
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                server_round=self.last_round,
                model=arrays_to_numpy(self.arrays),
                strategy_state=strategy_state(self.strategy),
                config=self.cfg.to_mapping(),
                history=[asdict(r) for r in self.history],
            ),
        )


__all__ = [
    "METRICS_FILE",
    "PlainTransport",
    "RoundEvent",
    "RoundHook",
    "RoundLoop",
    "RoundRecord",
    "SummaryHook",
    "Transport",
    "check_update",
    "sample_clients",
]
