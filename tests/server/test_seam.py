"""The aggregate seam, strategy state in checkpoints, and the loop's own defences.

Expected values come from Flower's own ``aggregate_train`` (the same strategy class, fed
per-client replies as Flower feeds it) and from closed forms.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)

from fedge.config import RunConfig
from fedge.records import NUM_EXAMPLES, SERVER_ROUND, numpy_to_arrays
from fedge.server.checkpoint import load_checkpoint
from fedge.server.loop import MAY_CHANGE_ON_RESUME, RoundLoop, RunFailedError, require_some_round_aggregated
from fedge.simulation.grid import InProcessGrid
from fedge.strategies import (
    LINEAR,
    PER_CLIENT,
    STRATEGIES,
    ReplySchema,
    StrategyInfo,
    build_strategy,
    strategy_info,
    strategy_state_dict,
)
from fedge.training import EvalResult

SHAPES = {"conv.weight": (4, 1, 3, 3), "fc.weight": (10, 12), "fc.bias": (10,)}
BASE = {"num-clients": 6, "clients-per-round": 4, "num-rounds": 3, "server-lr": 0.5, "server-momentum": 0.9}


def _eval(arrays: ArrayRecord) -> EvalResult:
    return EvalResult(num_examples=1, loss=0.0, accuracy=float(arrays["fc.bias"].numpy().mean()))


def _initial(value: float = 0.0) -> ArrayRecord:
    rng = np.random.default_rng(0)
    return numpy_to_arrays(
        {k: (value + 0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    )


def _run(
    tmp_path: Path,
    strat: Strategy,
    app: str = "seamapps:random_app",
    initial: ArrayRecord | None = None,
    **overrides: object,
) -> RoundLoop:
    cfg = RunConfig.from_mapping({**BASE, **overrides})
    loop = RoundLoop(cfg, strat, initial or _initial(), _eval, tmp_path)
    with InProcessGrid(app, cfg.num_clients, {}, workers=1) as grid:
        loop.run(grid)
    return loop


class _PerClient:
    """Makes a Flower strategy class unknown to fedge, so it gets per-client replies."""

    @staticmethod
    def of(cls: type[Strategy]) -> type[Strategy]:
        return type(f"Flower{cls.__name__}", (cls,), {})


LINEAR_CLASSES = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedprox": FedProx, "fedadam": FedAdam}
LINEAR_CLASSES.update({"fedyogi": FedYogi, "fedadagrad": FedAdagrad})


@pytest.mark.parametrize("name", sorted(LINEAR_CLASSES))
def test_linear_strategies_on_the_mean_equal_flowers_own_aggregation(tmp_path: Path, name: str) -> None:
    cfg = RunConfig.from_mapping({**BASE, "strategy": name})
    ours = build_strategy(cfg)
    assert strategy_info(ours).aggregation == LINEAR
    # The same strategy, but of a class fedge does not know: the loop hands it every
    # checked reply and Flower's aggregate_train (the reference) computes the mean.
    reference = build_strategy(cfg)
    reference.__class__ = _PerClient.of(LINEAR_CLASSES[name])
    assert strategy_info(reference).aggregation == PER_CLIENT
    a = _run(tmp_path / "ours", ours, strategy=name)
    b = _run(tmp_path / "flower", reference, strategy=name)
    for key in SHAPES:
        np.testing.assert_allclose(a.arrays[key].numpy(), b.arrays[key].numpy(), rtol=2e-5, atol=2e-6)
    assert [r.clients for r in a.history] == [4, 4, 4]
    state_a, state_b = strategy_state_dict(ours), strategy_state_dict(reference)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        np.testing.assert_allclose(state_a[key], state_b[key], rtol=2e-5, atol=2e-6)


def test_the_mean_is_the_closed_form_example_weighted_mean(tmp_path: Path) -> None:
    from seamapps import random_step

    from fedge.server.transport import sample_clients

    loop = _run(tmp_path, build_strategy(RunConfig.from_mapping(BASE)), **{"num-rounds": 1})
    # Round 1's sample, by partition (virtual node ids are 1000 + partition).
    parts = [n - 1000 for n in sample_clients(range(1000, 1006), 4, 42, 1)]
    weights = np.array([5 + p for p in parts], dtype=np.float64)
    init = {k: v.numpy() for k, v in _initial().items()}
    for key, shape in SHAPES.items():
        steps = np.stack([random_step(p, 1, key, shape).astype(np.float64) for p in parts])
        expected = init[key] + np.tensordot(weights, steps, axes=1) / weights.sum()
        np.testing.assert_allclose(loop.arrays[key].numpy(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", [*sorted(STRATEGIES), "dp-adaptive(fedadam)"])
def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path: Path, name: str) -> None:
    def strategy() -> Strategy:
        if name == "dp-adaptive(fedadam)":
            inner = build_strategy(RunConfig.from_mapping({**BASE, "strategy": "fedadam"}))
            return DifferentialPrivacyServerSideAdaptiveClipping(
                inner,
                noise_multiplier=0.0,
                num_sampled_clients=4,
                initial_clipping_norm=0.05,
                clipped_count_stddev=0.0,
            )
        return build_strategy(RunConfig.from_mapping({**BASE, "strategy": name}))

    overrides = {"strategy": "fedadam" if name.startswith("dp") else name}
    full = _run(tmp_path / "full", strategy(), **overrides)
    first = _run(tmp_path / "cut", strategy(), **overrides, **{"num-rounds": 2})
    assert first.last_round == 2
    resumed = RoundLoop(
        RunConfig.from_mapping({**BASE, **overrides}), strategy(), _initial(), _eval, tmp_path / "cut"
    )
    assert resumed.resume() == 2
    with InProcessGrid("seamapps:random_app", 6, {}, workers=1) as grid:
        resumed.run(grid)
    for key in SHAPES:
        np.testing.assert_array_equal(resumed.arrays[key].numpy(), full.arrays[key].numpy())
    state_full, state_resumed = strategy_state_dict(full.strategy), strategy_state_dict(resumed.strategy)
    assert state_full.keys() == state_resumed.keys()
    for key in state_full:
        np.testing.assert_array_equal(state_full[key], state_resumed[key])
    if name in ("fedavgm", "fedadam", "dp-adaptive(fedadam)"):
        assert state_full  # these keep state, so the test would catch a lost one
    if name.startswith("dp"):
        assert any(k.startswith("inner/m_t@") for k in state_full)  # the wrapped FedAdam's moments
        assert "clipping_norm@float" in state_full
    ckpt = load_checkpoint(tmp_path / "full")
    assert int(ckpt.components["loop"]["last-round"]) == 3


def test_a_claimed_weight_above_the_cap_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Two replies claiming 1e308 examples used to overflow the weight sum: the model went to zeros.
    cfg_overrides = {"num-clients": 4, "clients-per-round": 4, "num-rounds": 1}
    loop = _run(tmp_path, FedAvg(), "seamapps:heavy_app", **cfg_overrides)
    record = loop.history[0]
    assert (record.clients, record.dropped, record.aggregated) == (2, 2, True)
    # The default cap is the largest training partition of the server's split (digits over 4).
    cap = max(RunConfig.from_mapping({**BASE, **cfg_overrides}).federated_data().partition_sizes())
    assert 100 < cap < 1000
    assert caplog.text.count(f"exceeds max-examples-per-client ({cap})") == 2
    for key in SHAPES:
        assert np.isfinite(loop.arrays[key].numpy()).all() and np.abs(loop.arrays[key].numpy()).max() < 10


def test_a_non_finite_aggregate_keeps_the_previous_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Finite float32 weights of 3e38 from every client, and FedAvgM with server-lr 2 from
    # -3e38: new = old - 2 (old - mean) = 9e38, beyond float32.
    initial = numpy_to_arrays({k: np.full(s, -3.0e38, np.float32) for k, s in SHAPES.items()})
    overrides = {"strategy": "fedavgm", "server-lr": 2.0, "server-momentum": 0.0, "num-rounds": 1}
    cfg = RunConfig.from_mapping({**BASE, **overrides})
    with np.errstate(over="ignore"):
        loop = _run(tmp_path, build_strategy(cfg), "seamapps:overflow_app", initial, **overrides)
    assert not loop.history[0].aggregated
    assert "NaN or Inf" in caplog.text and "keeping the previous global model" in caplog.text
    np.testing.assert_array_equal(loop.arrays["fc.bias"].numpy(), np.full(10, -3.0e38, np.float32))
    # The refused result left no trace in the strategy: FedAvgM's own copy of the model is
    # the old one, not the Inf it computed (which would poison every later round).
    current = loop.strategy.current_arrays  # type: ignore[attr-defined]
    np.testing.assert_array_equal(current["fc.bias"].numpy(), np.full(10, -3.0e38, np.float32))
    with pytest.raises(RunFailedError, match="no round aggregated"):
        require_some_round_aggregated(loop.history)


def test_every_round_config_carries_the_server_round(tmp_path: Path) -> None:
    loop = RoundLoop(RunConfig.from_mapping(BASE), FedAvg(), _initial(), _eval, tmp_path)
    for server_round in (1, 2, 7):
        record = loop._round_config(server_round)
        assert record[SERVER_ROUND] == server_round
        # What a client needs, and nothing server-only (no signing key, no export settings).
        assert "signing-key" not in record and "export-every" not in record


def test_unexpected_errors_in_checks_are_reported_as_bugs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from flwr.app import Message, MetricRecord, RecordDict

    import fedge.server.checks as checks
    from fedge.strategies import ReplySchema

    def broken(*args: object) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr(checks, "_check_update", broken)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    reply = Message(
        RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: 1})}), dst_node_id=1, message_type="train"
    )
    with caplog.at_level(logging.ERROR):
        checked, reason = checks.check_update(reply, {}, ReplySchema(), 10)
    assert checked is None and reason is not None and reason.startswith(checks.INTERNAL_ERROR)
    assert "bug" in caplog.text and "RuntimeError: boom" in caplog.text


# A valid other value for every key a resumed run may not change.
CHANGED = {
    "dataset": "mnist",
    "partition": "iid",
    "model": "cnn8",
    "strategy": "fedavgm",
    "num-clients": 7,
    "clients-per-round": 3,
    "local-epochs": 2,
    "batch-size": 16,
    "lr": 0.1,
    "momentum": 0.5,
    "local-steps": 3,
    "grad-clip-norm": 2.0,
    "seed": 7,
    "engine": "ray",
    "min-reply-fraction": 0.9,
    "max-examples-per-client": 99,
    "local-test-fraction": 0.2,
    "proximal-mu": 0.1,
    "server-lr": 0.9,
    "server-momentum": 0.5,
    "trim-beta": 0.1,
    "compression": "qsgd:4",
    "error-feedback": True,
    "downlink": "fp16",
    "secagg": True,
    "secagg-bits": 4,
    "secagg-clip": 0.1,
    "secagg-neighbors": 2,
    "secagg-threshold": 2,
    "secagg-max-dropout": 0.3,
    "secagg-drop-fraction": 0.1,
    "secagg-drop-stage": "masked-input",
    "dp": "central",
    "clip-norm": 0.5,
    "noise-multiplier": 2.0,
    "target-delta": 1e-6,
    "accountant": "pld",
    "client-sampling": "poisson",
    "clip-quantile": 0.5,
    "clip-count-stddev": 1.0,
    "dp-sgd": True,
    "dp-sgd-noise-multiplier": 2.0,
    "dp-sgd-max-grad-norm": 2.0,
    "dp-sgd-target-epsilon": 5.0,
    "registry-dir": "/elsewhere",
}


def test_resume_refuses_every_key_that_would_change_the_run(tmp_path: Path) -> None:
    from fedge.config import config_keys
    from fedge.server.checkpoint import CheckpointError

    fixed = [k for k in config_keys() if k not in MAY_CHANGE_ON_RESUME]
    assert sorted(fixed) == sorted(k for k in CHANGED if k in config_keys())  # a new key must be classified
    overrides = {"compression": "qsgd:2", "num-rounds": 1}
    _run(tmp_path, FedAvg(), **overrides)
    for key in fixed:
        values = {**BASE, **overrides, key: CHANGED[key]}
        if key == "error-feedback":
            values["compression"] = "qsgd:2"
        cfg = RunConfig.from_mapping(values)
        loop = RoundLoop(cfg, FedAvg(), _initial(), _eval, tmp_path, max_examples=1000)
        with pytest.raises(CheckpointError, match=f"different {key} "):
            loop.resume()
    # num-rounds may grow.
    grown = RunConfig.from_mapping({**BASE, **overrides, "num-rounds": 5})
    assert RoundLoop(grown, FedAvg(), _initial(), _eval, tmp_path).resume() == 1


class _WithControlVariates(FedAvg):
    """A linear strategy whose messages and replies carry a second record (as SCAFFOLD's)."""

    fedge_info = StrategyInfo(LINEAR, ReplySchema(("arrays", "cv"), metrics=("local-steps",)))

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        messages = list(super().configure_train(server_round, arrays, config, grid))
        cv = numpy_to_arrays({"c": np.full(5, 0.25, np.float32)})
        for message in messages:
            message.content["cv"] = cv
        return messages

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        from fedge.records import with_content

        (reply,) = replies  # the loop hands a linear strategy one reply: the mean
        self.cv_mean = reply.content["cv"]["c"].numpy()
        model_only = RecordDict({"arrays": reply.content["arrays"], "metrics": reply.content["metrics"]})
        return super().aggregate_train(server_round, [with_content(reply, model_only)])


@pytest.mark.parametrize(("codec", "downlink"), [("none", "fp16"), ("qsgd:8", "fp32")])
def test_declared_extra_records_are_compressed_checked_and_averaged(
    tmp_path: Path, codec: str, downlink: str
) -> None:
    from seamapps import random_step

    from fedge.server.transport import sample_clients

    overrides = {"compression": codec, "downlink": downlink, "num-rounds": 1}
    strategy = _WithControlVariates(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    loop = _run(tmp_path, strategy, "seamapps:every_record_app", **overrides)
    assert loop.history[0].clients == 4
    parts = [n - 1000 for n in sample_clients(range(1000, 1006), 4, 42, 1)]
    weights = np.array([5 + p for p in parts], dtype=np.float64)
    expected = np.tensordot(weights, np.stack([random_step(p, 1, "arraysfc.bias", (10,)) for p in parts]), 1)
    expected = _initial()["fc.bias"].numpy() + expected / weights.sum()
    # fp16 downlink: the client trained from the fp16 copy but sends its exact update,
    # which the server adds to its fp32 model; qsgd:8 on a constant-ish update is close.
    np.testing.assert_allclose(loop.arrays["fc.bias"].numpy(), expected, rtol=0, atol=2e-3)
    cv_steps = np.stack([random_step(p, 1, "cvc", (5,)) for p in parts])
    np.testing.assert_allclose(
        strategy.cv_mean, 0.25 + np.tensordot(weights, cv_steps, 1) / weights.sum(), atol=2e-3
    )


def test_a_simulated_federation_too_small_for_a_round_fails_at_once(tmp_path: Path) -> None:
    import time

    from fedge.server.transport import FederationTooSmallError

    # clients-per-round 4 on a federation of 2 (Flower's default local simulation has 2
    # SuperNodes): one line at once, not round-timeout-s of waiting.
    cfg = RunConfig.from_mapping({**BASE, "round-timeout-s": 600})
    loop = RoundLoop(cfg, FedAvg(), _initial(), _eval, tmp_path)
    start = time.monotonic()
    with (
        InProcessGrid("seamapps:random_app", 2, {}, workers=1) as grid,
        pytest.raises(FederationTooSmallError, match="has 2 clients but a round needs 4") as err,
    ):
        loop.run(grid)
    assert time.monotonic() - start < 30 and "\n" not in str(err.value)

    class InMemoryGrid:  # Flower's simulation grid, recognised by its class name
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    from fedge.server.transport import wait_for_nodes

    with pytest.raises(FederationTooSmallError, match="num-clients=2 clients-per-round=2"):
        wait_for_nodes(InMemoryGrid(), 10, timeout_s=600)  # type: ignore[arg-type]
