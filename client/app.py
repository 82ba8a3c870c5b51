"""The edge client agent: a Flower ``ClientApp`` with ``train`` and ``evaluate`` handlers.

The same app runs under every engine: fedge's in-process Grid, Flower's Ray
simulation and a real SuperNode. Its data comes from ``node_config["partition-id"]``
and the run config; the round's training settings (lr, epochs, batch size) arrive
with the model in the message's ``ConfigRecord``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode

from fedge.client.ledger import LedgerEntry, LedgerError, load_ledger, save_ledger
from fedge.client.mods import compression_mod, fp16_downlink_mod
from fedge.client.settings import ClientSettings, resolve_settings, warn_unknown_keys
from fedge.config import AUTO, RunConfig
from fedge.data import FederatedData
from fedge.deploy.artifacts import CANDIDATE_MANIFEST, CANDIDATE_SIGNATURE
from fedge.models import build_model
from fedge.records import (
    ARRAYS_KEY,
    BATCH_SIZE,
    CLIP_NORM,
    CODEC,
    CONFIG_KEY,
    DATA_SEED,
    DATASET,
    DP_SGD_DELTA,
    DP_SGD_EPSILON,
    DP_SGD_MAX_GRAD_NORM,
    DP_SGD_NOISE_MULTIPLIER,
    DP_SGD_TARGET_EPSILON,
    ERROR_FEEDBACK,
    EVAL_ACCURACY,
    EVAL_LOSS,
    GRAD_CLIP_NORM,
    LOCAL_EPOCHS,
    LOCAL_STEPS,
    LOCAL_TEST_FRACTION,
    LR,
    METRICS_KEY,
    MODEL,
    MOMENTUM,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    ONNX_ACTION,
    ONNX_FP32,
    ONNX_INT8,
    PARTITION,
    PROXIMAL_MU,
    ROTATION_SEED,
    SEED,
    SERVER_ROUND,
    TRAIN_LOSS,
    load_arrays,
    model_to_arrays,
)
from fedge.rng import Stream, stream_seed
from fedge.training import DivergenceError, TrainResult, dp_sgd_plan, evaluate, train_local, train_local_dp

# Every round-config key this client reads; anything else is ignored with one warning.
KNOWN_CONFIG_KEYS = frozenset(
    {
        SERVER_ROUND, LR, MOMENTUM, LOCAL_EPOCHS, LOCAL_STEPS, BATCH_SIZE, GRAD_CLIP_NORM, PROXIMAL_MU, SEED,
        CODEC, ERROR_FEEDBACK, ROTATION_SEED, CLIP_NORM,
        DATASET, PARTITION, NUM_PARTITIONS, DATA_SEED, MODEL, LOCAL_TEST_FRACTION,
        ONNX_FP32, ONNX_INT8, CANDIDATE_MANIFEST, CANDIDATE_SIGNATURE,
        DP_SGD_NOISE_MULTIPLIER, DP_SGD_MAX_GRAD_NORM, DP_SGD_TARGET_EPSILON, DP_SGD_DELTA,
    }
)  # fmt: skip


@functools.lru_cache(maxsize=8)
def _client_config(settings: ClientSettings) -> RunConfig:
    return settings.run_config()


def client_config(msg: Message, context: Context, fallback: RunConfig | None = None) -> tuple[RunConfig, int]:
    """The run config a client loads its data and model with, and its partition id.

    From the message's round config (the server's ``client_settings``) and the node config,
    never from ``context.run_config`` (:mod:`fedge.client.settings`); ``fallback`` fills a
    key an older server did not send.
    """
    round_cfg = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    warn_unknown_keys(round_cfg, KNOWN_CONFIG_KEYS)
    settings = resolve_settings(round_cfg, context, fallback)
    return _client_config(settings), settings.partition_id


def client_data(cfg: RunConfig) -> FederatedData:
    """The (lazily loaded, per-process cached) federated dataset of a run."""
    return cfg.federated_data()


@functools.lru_cache(maxsize=4)
def _model(name: str, input_shape: tuple[int, ...], num_classes: int, vocab_size: int) -> torch.nn.Module:
    # One model object per process, reloaded with each message's weights: a process
    # runs one client at a time, and rebuilding the module per message costs more
    # than a small model's local epoch.
    return build_model(name, input_shape=input_shape, num_classes=num_classes, seed=0, vocab_size=vocab_size)


def _model_for(cfg: RunConfig, data: FederatedData) -> torch.nn.Module:
    spec = data.spec
    return _model(cfg.resolved_model(spec.default_model), spec.input_shape, spec.num_classes, spec.vocab_size)


def client_seed(seed: int, server_round: int, pid: int) -> int:
    """Seed of a client's local shuffling in a round (:data:`fedge.rng.Stream.LOCAL_SHUFFLE`)."""
    return stream_seed(seed, Stream.LOCAL_SHUFFLE, server_round, pid, bits=63)


def _required_int(record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if value is None:
        raise ValueError(f"round config lacks {key!r}; the server must send it (upgrade the server)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"round config {key!r} must be a whole number >= 0, got {value!r}")
    return value


def _number(record: ConfigRecord, key: str, default: float) -> float:
    """A numeric round-config value; a wrong type is a clear error, not a crash deep in torch."""
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"round config {key!r} must be a number, got {value!r}")
    return value


def _setting(record: ConfigRecord, key: str, resolved: float) -> float:
    """A training setting of the round config; absent or ``auto`` (a server that left it to
    the client) means ``resolved``, the client's own config's value for its dataset."""
    return resolved if record.get(key) == AUTO else _number(record, key, resolved)


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _dp_sgd_number(record: ConfigRecord, key: str, *, default: float | None = None) -> float:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"round config {key!r} must be a number >= 0 with dp-sgd, got {value!r}")
    return float(value)


def _handle_train(fallback: RunConfig | None, msg: Message, context: Context) -> Message:
    cfg, pid = client_config(msg, context, fallback)
    data = client_data(cfg)
    x, y = data.client_train(pid)
    model = _model_for(cfg, data)
    load_arrays(model, msg.content.array_records[ARRAYS_KEY])
    round_cfg = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    server_round = _required_int(round_cfg, SERVER_ROUND)
    seed = int(_number(round_cfg, SEED, cfg.seed))  # the run seed; the data seed is the same
    local = cfg.training(data.spec)
    epochs = int(_setting(round_cfg, LOCAL_EPOCHS, local.local_epochs))
    batch_size = int(_setting(round_cfg, BATCH_SIZE, local.batch_size))
    lr = float(_setting(round_cfg, LR, local.lr))
    momentum = float(_number(round_cfg, MOMENTUM, cfg.momentum))
    proximal_mu = float(_number(round_cfg, PROXIMAL_MU, 0.0))
    max_steps = int(_setting(round_cfg, LOCAL_STEPS, local.local_steps))
    extra: dict[str, float] = {}
    try:
        if DP_SGD_NOISE_MULTIPLIER in round_cfg:
            result: TrainResult
            try:
                result, epsilon = _train_dp_sgd(
                    context, round_cfg, model, x, y, server_round,
                    epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                    proximal_mu=proximal_mu, max_steps=max_steps,
                )  # fmt: skip
            except ValueError as err:  # bad dp-sgd settings: one line to the server, not a traceback
                return _error(msg, str(err))
            extra[DP_SGD_EPSILON] = epsilon
        else:
            result = train_local(
                model,
                x,
                y,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                momentum=momentum,
                proximal_mu=proximal_mu,
                max_steps=max_steps,
                grad_clip_norm=float(_setting(round_cfg, GRAD_CLIP_NORM, local.grad_clip_norm)),
                generator=torch.Generator().manual_seed(client_seed(seed, server_round, pid)),
            )
    except (DivergenceError, LedgerError, _BudgetSpentError) as err:
        # Expected with a too-high lr, not a bug: the reply says why, and carries no weights.
        # A spent DP-SGD budget or an untrustworthy ledger: this device does not train.
        return _error(msg, str(err))
    content = RecordDict(
        {
            ARRAYS_KEY: model_to_arrays(model),
            METRICS_KEY: MetricRecord(
                {NUM_EXAMPLES: result.num_examples, TRAIN_LOSS: result.train_loss, **extra}
            ),
        }
    )
    return Message(content, reply_to=msg)


class _BudgetSpentError(RuntimeError):
    """This device's DP-SGD budget would be exceeded by the call asked for."""


def _train_dp_sgd(
    context: Context,
    round_cfg: ConfigRecord,
    model: torch.nn.Module,
    x: object,
    y: object,
    server_round: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    proximal_mu: float,
    max_steps: int,
) -> tuple[TrainResult, float]:
    """DP-SGD under the device's ledger (:mod:`fedge.client.ledger`); the result and the
    device's total epsilon. ``grad-clip-norm`` is not used: per-sample clipping replaces it.

    Raises
    ------
    _BudgetSpentError
        ``dp-sgd-target-epsilon > 0`` and the ledger's composition with this call's planned
        steps would exceed it; nothing is trained or recorded.
    LedgerError
        The ledger file cannot be trusted.
    ValueError
        Bad DP-SGD settings, FedProx (its proximal term's gradient is not per-sample and
        Opacus would drop it), or a model Opacus cannot train.
    """
    import numpy as np

    noise_multiplier = _dp_sgd_number(round_cfg, DP_SGD_NOISE_MULTIPLIER)
    max_grad_norm = _dp_sgd_number(round_cfg, DP_SGD_MAX_GRAD_NORM)
    target = _dp_sgd_number(round_cfg, DP_SGD_TARGET_EPSILON, default=0.0)
    delta = _dp_sgd_number(round_cfg, DP_SGD_DELTA)
    if proximal_mu > 0:
        raise ValueError("dp-sgd does not support FedProx's proximal term; set proximal-mu = 0")
    if not (noise_multiplier > 0 and max_grad_norm > 0 and 0 < delta < 1):
        raise ValueError(
            f"dp-sgd needs {DP_SGD_NOISE_MULTIPLIER} > 0, {DP_SGD_MAX_GRAD_NORM} > 0 "
            f"and {DP_SGD_DELTA} in (0, 1); "
            f"got {noise_multiplier}, {max_grad_norm}, {delta}"
        )
    labels = np.asarray(y)
    plan = dp_sgd_plan(len(labels), epochs=epochs, batch_size=batch_size, max_steps=max_steps)
    ledger = load_ledger(context)
    entry = LedgerEntry(noise_multiplier, plan.sample_rate, plan.steps, int(context.run_id), server_round)
    after = ledger.epsilon_with([entry], delta)
    if target > 0 and after > target:
        raise _BudgetSpentError(
            f"dp-sgd privacy budget of this device is spent: this round's {plan.steps} steps would take "
            f"its epsilon from {ledger.epsilon_with([], delta):.4g} to {after:.4g} > "
            f"dp-sgd-target-epsilon {target:g} at delta {delta:g} ({len(ledger.entries)} calls recorded)"
        )
    # Recorded before training: a call that fails halfway has still spent its noise.
    recorded = ledger.recorded(entry, delta)
    save_ledger(context, recorded)
    result = train_local_dp(
        model, x, labels, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, delta=delta, max_steps=max_steps,
    )  # fmt: skip
    return result, recorded.epsilon


def _handle_evaluate(fallback: RunConfig | None, msg: Message, context: Context) -> Message:
    cfg, pid = client_config(msg, context, fallback)
    data = client_data(cfg)
    x, y = data.client_test(pid)
    model = _model_for(cfg, data)
    load_arrays(model, msg.content.array_records[ARRAYS_KEY])
    result = evaluate(model, x, y)
    metrics = MetricRecord(
        {NUM_EXAMPLES: result.num_examples, EVAL_LOSS: result.loss, EVAL_ACCURACY: result.accuracy}
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def _handle_evaluate_onnx(fallback: RunConfig | None, msg: Message, context: Context) -> Message:
    """The federated int8 check: verify the signed candidate, then score it (``fedge.client.onnx_check``)."""
    from fedge.client.onnx_check import evaluate_candidate

    cfg, pid = client_config(msg, context, fallback)
    x, y = client_data(cfg).client_test(pid)
    return evaluate_candidate(msg, context, x, y)


def make_client_app(cfg: RunConfig | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """Build fedge's ``ClientApp``.

    Parameters
    ----------
    cfg : RunConfig, optional
        Fills in a setting an older server did not send with its messages. Clients take
        their data and training settings from each message (the server sends them), never
        from ``context.run_config``, so ``None`` (under ``flwr run``, on a device) and an
        empty run config (Flower's Ray engine) both train what the server says.
    mods : sequence of Mod
        Ordinary Flower mods. They wrap everything: a mod given here sees the message as
        received and the reply as sent. What happens to a trained update (clipping,
        encoding, noise, masking) is the update pipeline's, in its one declared order
        (:mod:`fedge.client.pipeline`), inside them; the fp16 downlink widening sits
        between the two.
    """
    app = ClientApp(mods=[*mods, fp16_downlink_mod, compression_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _handle_train(cfg, msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return _handle_evaluate(cfg, msg, context)

    @app.evaluate(ONNX_ACTION)
    def evaluate_onnx(msg: Message, context: Context) -> Message:
        return _handle_evaluate_onnx(cfg, msg, context)

    return app


# The app `flwr run` and SuperNodes load (pyproject's [tool.flwr.app.components]).
app = make_client_app()

__all__ = ["KNOWN_CONFIG_KEYS", "app", "client_config", "client_seed", "make_client_app"]
