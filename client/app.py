"""The edge client agent: a Flower ``ClientApp`` with ``train`` and ``evaluate`` handlers.

The same app runs under every engine: fedge's in-process Grid, Flower's Ray
simulation and a real SuperNode. Its data comes from ``node_config["partition-id"]``
and the run config; the round's training settings (lr, epochs, batch size) arrive
with the model in the message's ``ConfigRecord``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode

from fedge.client.mods import compression_mod, fp16_downlink_mod
from fedge.config import AUTO, RunConfig
from fedge.data import FederatedData
from fedge.models import build_model
from fedge.records import (
    ARRAYS_KEY,
    BATCH_SIZE,
    CONFIG_KEY,
    EVAL_ACCURACY,
    EVAL_LOSS,
    GRAD_CLIP_NORM,
    LOCAL_EPOCHS,
    LOCAL_STEPS,
    LR,
    METRICS_KEY,
    MOMENTUM,
    NUM_EXAMPLES,
    ONNX_ACTION,
    PROXIMAL_MU,
    SEED,
    SERVER_ROUND,
    TRAIN_LOSS,
    load_arrays,
    model_to_arrays,
)
from fedge.training import DivergenceError, evaluate, train_local


@functools.lru_cache(maxsize=8)
def _config_from_items(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def config_from_context(context: Context) -> RunConfig:
    """Parse ``context.run_config`` once per distinct config (cached per process)."""
    return _config_from_items(tuple(sorted(context.run_config.items())))


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


def partition_id(context: Context) -> int:
    """The client's data partition, from ``node_config["partition-id"]``."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError(
            "node_config has no 'partition-id'; start the SuperNode with "
            '--node-config "partition-id=K num-partitions=N"'
        ) from None


def client_seed(seed: int, server_round: int, pid: int) -> int:
    """Seed of a client's local shuffling in a round: distinct per (seed, round, client)."""
    return int(np.random.SeedSequence([seed, server_round, pid]).generate_state(1)[0])


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


def _handle_train(cfg: RunConfig, msg: Message, context: Context) -> Message:
    data = client_data(cfg)
    pid = partition_id(context)
    x, y = data.client_train(pid)
    model = _model_for(cfg, data)
    load_arrays(model, msg.content.array_records[ARRAYS_KEY])
    round_cfg = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    server_round = int(_number(round_cfg, SERVER_ROUND, 0))
    seed = int(_number(round_cfg, SEED, cfg.seed))
    local = cfg.training(data.spec)
    try:
        result = train_local(
            model,
            x,
            y,
            epochs=int(_setting(round_cfg, LOCAL_EPOCHS, local.local_epochs)),
            batch_size=int(_setting(round_cfg, BATCH_SIZE, local.batch_size)),
            lr=float(_setting(round_cfg, LR, local.lr)),
            momentum=float(_number(round_cfg, MOMENTUM, cfg.momentum)),
            proximal_mu=float(_number(round_cfg, PROXIMAL_MU, 0.0)),
            max_steps=int(_setting(round_cfg, LOCAL_STEPS, local.local_steps)),
            grad_clip_norm=float(_setting(round_cfg, GRAD_CLIP_NORM, local.grad_clip_norm)),
            generator=torch.Generator().manual_seed(client_seed(seed, server_round, pid)),
        )
    except DivergenceError as err:
        # Expected with a too-high lr, not a bug: the reply says why, and carries no weights.
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=msg)
    content = RecordDict(
        {
            ARRAYS_KEY: model_to_arrays(model),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: result.num_examples, TRAIN_LOSS: result.train_loss}),
        }
    )
    return Message(content, reply_to=msg)


def _handle_evaluate(cfg: RunConfig, msg: Message, context: Context) -> Message:
    data = client_data(cfg)
    x, y = data.client_test(partition_id(context))
    model = _model_for(cfg, data)
    load_arrays(model, msg.content.array_records[ARRAYS_KEY])
    result = evaluate(model, x, y)
    metrics = MetricRecord(
        {NUM_EXAMPLES: result.num_examples, EVAL_LOSS: result.loss, EVAL_ACCURACY: result.accuracy}
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def _handle_evaluate_onnx(cfg: RunConfig, msg: Message, context: Context) -> Message:
    """The federated int8 check: verify the signed candidate, then score it (``fedge.client.onnx_check``)."""
    from fedge.client.onnx_check import evaluate_candidate

    x, y = client_data(cfg).client_test(partition_id(context))
    return evaluate_candidate(msg, context, x, y)


def make_client_app(cfg: RunConfig | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """Build fedge's ``ClientApp``.

    Parameters
    ----------
    cfg : RunConfig, optional
        The run's config. ``None`` reads it from each message's ``context.run_config``
        (as under ``flwr run``); Flower's Ray engine gives apps an empty run config,
        so it needs the config closed over here.
    mods : sequence of Mod
        Flower client mods wrapped around the handlers (DP clipping and secure-aggregation
        masking plug in here). fedge's own mods always wrap them: the fp16 downlink
        widening outermost, then update compression, so a mod given here sees a float32
        model and the trained weights before they are compressed.
    """
    app = ClientApp(mods=[fp16_downlink_mod, compression_mod, *mods])

    def resolve(context: Context) -> RunConfig:
        return cfg if cfg is not None else config_from_context(context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _handle_train(resolve(context), msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return _handle_evaluate(resolve(context), msg, context)

    @app.evaluate(ONNX_ACTION)
    def evaluate_onnx(msg: Message, context: Context) -> Message:
        return _handle_evaluate_onnx(resolve(context), msg, context)

    return app


# The app `flwr run` and SuperNodes load (pyproject's [tool.flwr.app.components]).
app = make_client_app()

__all__ = ["app", "client_seed", "config_from_context", "make_client_app"]
