"""SecAgg+ rounds through the round loop: exact secure sums, strategies, dropouts, bad clients.

The clients run fedge's real update pipeline (``compression_mod`` with its SecAgg+ stage)
around a seeded handler (``seamapps.random_train``), so every expected sum is recomputed
here from each client's update with the same field encoding and the same rounding stream
(:func:`fedge.client.pipeline.codec_seed`) the pipeline uses: the server's unmasked sum must
equal the plain sum of the survivors' levels, exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan
from seamapps import random_step

from fedge import secagg_wire as wire
from fedge.aggregation import Aggregate
from fedge.client.pipeline import codec_seed
from fedge.config import ConfigError, RunConfig
from fedge.records import ROTATION_SEED, numpy_to_arrays
from fedge.secagg.encoding import FieldEncoding, layout
from fedge.server.loop import (
    METRICS_FILE,
    RoundEvent,
    RoundLoop,
    RunFailedError,
    require_some_round_aggregated,
)
from fedge.server.secagg import SecAggTransport
from fedge.server.transport import TRAIN, Exchange, RoundContext
from fedge.simulation.grid import FIRST_NODE_ID, InProcessGrid
from fedge.strategies import build_strategy
from fedge.training import EvalResult
from fedge.update_records import round_rotation_seed, tensor_rotation_seed

SHAPES = {"conv.weight": (4, 1, 3, 3), "fc.weight": (10, 12), "fc.bias": (10,)}
N = 5
# weights 5 + pid = 5..9: partition 4's 9 is capped at the weight cap W = 8.
MAX_EXAMPLES = 8
BASE: dict[str, object] = {
    "num-clients": N,
    "clients-per-round": N,
    "num-rounds": 1,
    "seed": 42,
    "secagg": True,
    "secagg-neighbors": 4,
    "secagg-threshold": 3,
    # random_step's updates are about 0.01 * (pid + 1) +- 0.05: some are clipped.
    "secagg-clip": 0.08,
    "fraction-evaluate": 0.0,
    "round-timeout-s": 60.0,
}
STAGES = ("advertise-keys", "share-keys", "masked-input", "unmask")


def _eval(arrays: ArrayRecord) -> EvalResult:
    return EvalResult(num_examples=1, loss=0.0, accuracy=float(arrays["fc.bias"].numpy().mean()))


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


class CapturingTransport(SecAggTransport):
    """The loop's SecAgg+ transport, keeping each training round's context and exchange."""

    def __init__(self, cfg: RunConfig, max_examples: int) -> None:
        super().__init__(cfg, max_examples)
        self.rounds: list[tuple[RoundContext, Exchange]] = []

    def exchange(self, grid: Grid, messages: list[Message], round_ctx: RoundContext) -> Exchange:
        exchange = super().exchange(grid, messages, round_ctx)
        if round_ctx.kind == TRAIN:
            self.rounds.append((round_ctx, exchange))
        return exchange


def _config(**overrides: object) -> RunConfig:
    return RunConfig.from_mapping({**BASE, **overrides})


def _loop(
    tmp_path: Path,
    cfg: RunConfig,
    strategy: object | None = None,
    initial: dict[str, np.ndarray] | None = None,
) -> tuple[RoundLoop, CapturingTransport]:
    transport = CapturingTransport(cfg, MAX_EXAMPLES)
    arrays = numpy_to_arrays(initial if initial is not None else _initial())
    loop = RoundLoop(
        cfg,
        strategy or build_strategy(cfg),  # type: ignore[arg-type]
        arrays,
        _eval,
        tmp_path,
        transport=transport,
        max_examples=MAX_EXAMPLES,
    )
    return loop, transport


def _run(
    tmp_path: Path, cfg: RunConfig, app: str = "secaggapps:honest_app", grid_cls: type = InProcessGrid
) -> tuple[RoundLoop, CapturingTransport]:
    loop, transport = _loop(tmp_path, cfg)
    with grid_cls(app, cfg.num_clients, {}, workers=1) as grid:
        loop.run(grid)
    return loop, transport


def expected_sum(
    cfg: RunConfig,
    initial: dict[str, np.ndarray],
    server_round: int,
    rotation_seed: int,
    parts: Iterable[int],
) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """``sum_i w_i x_hat_i`` per tensor, ``sum_i w_i`` and the level sum, of partitions ``parts``.

    Each client's levels are recomputed as its pipeline draws them: its update is
    ``(global + step) - global`` in float32, encoded tensor by tensor with one rounding
    stream per (seed, round, partition); the plain (unmasked) sum is then decoded.
    """
    parts = sorted(parts)
    enc = FieldEncoding.for_codec(cfg.codec(), cfg.secagg_level_bits(), cfg.secagg_clip, MAX_EXAMPLES)
    seeds = [tensor_rotation_seed(rotation_seed, i) for i in range(len(initial))]
    slots, length = layout(enc, {"arrays": initial}, seeds)
    levels = np.zeros(length, dtype=np.int64)
    for pid in parts:
        rng = np.random.default_rng(codec_seed(cfg.seed, server_round, pid))
        weight = 5 + pid
        for slot in slots:
            ref = initial[slot.name]
            local = ref + random_step(pid, server_round, slot.name, ref.shape)
            update = local.astype(np.float32) - ref
            part = enc.encode_tensor(update, weight, rng, slot.rotation_seed)
            assert part.size == slot.length and int(part.max()) <= enc.top
            levels[slot.start : slot.start + slot.length] += part
        levels[length - enc.weight_digits() :] += enc.encode_weight(weight)
    weighted = {
        slot.name: enc.decode_tensor(
            levels[slot.start : slot.start + slot.length], len(parts), slot.size, slot.rotation_seed
        ).reshape(initial[slot.name].shape)
        for slot in slots
    }
    total = sum(min(5 + pid, MAX_EXAMPLES) for pid in parts)
    return weighted, total, levels


def _survivors(aggregate: Aggregate) -> list[int]:
    gone = {d.node_id for d in aggregate.dropped}
    return [pid for pid in range(N) if FIRST_NODE_ID + pid not in gone]


def _assert_exact(
    cfg: RunConfig, transport: CapturingTransport, parts: Sequence[int], server_round: int = 1
) -> None:
    ctx, exchange = transport.rounds[server_round - 1]
    aggregate = exchange.aggregate
    assert aggregate is not None and aggregate.num_clients == len(parts)
    rotation = ctx.config.get(ROTATION_SEED, 0)
    assert isinstance(rotation, int)
    weighted, total, _ = expected_sum(cfg, _initial(), server_round, rotation, parts)
    assert aggregate.total_weight == float(total)
    assert set(aggregate.weighted_sum) == {"arrays"}
    for name, values in weighted.items():
        got = aggregate.weighted_sum["arrays"][name]
        assert got.dtype == np.float64 and got.shape == values.shape
        np.testing.assert_array_equal(got, values, err_msg=name)


# --- 1. the exact secure sum ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "bits"),
    [("none", 8), ("qsgd:4", "auto"), ("ternary", "auto"), ("rotate+qsgd:4", "auto")],
)
def test_the_secure_sum_is_the_plain_sum_of_the_quantized_levels(
    tmp_path: Path, codec: str, bits: object
) -> None:
    cfg = _config(compression=codec, **{"secagg-bits": bits})
    loop, transport = _run(tmp_path, cfg)
    (record,) = loop.history
    assert (record.aggregated, record.clients, record.sampled, record.dropped) == (True, N, N, 0)
    ctx, exchange = transport.rounds[0]
    if codec == "none":
        assert ROTATION_SEED not in ctx.config
    else:
        assert ctx.config[ROTATION_SEED] == round_rotation_seed(cfg.seed, 1)
    _assert_exact(cfg, transport, range(N))
    aggregate = exchange.aggregate
    assert aggregate is not None
    # Closed form of the decoding, for the unrotated codecs: W * c * (2 S / L - n).
    enc = FieldEncoding.for_codec(cfg.codec(), cfg.secagg_level_bits(), cfg.secagg_clip, MAX_EXAMPLES)
    _, _, levels = expected_sum(cfg, _initial(), 1, int(ctx.config.get(ROTATION_SEED, 0)), range(N))  # type: ignore[arg-type]
    if not enc.rotate:
        start = 0
        for name, shape in SHAPES.items():
            size = int(np.prod(shape))
            s = levels[start : start + size].astype(np.float64)
            closed = MAX_EXAMPLES * float(np.float32(cfg.secagg_clip)) * (2 * s / enc.top - N)
            np.testing.assert_allclose(
                aggregate.weighted_sum["arrays"][name].reshape(-1), closed, rtol=1e-12, atol=1e-12
            )
            start += size
    init = _initial()
    # FedAvg's new model is the global plus the secure mean.
    for name, ref in init.items():
        mean = aggregate.weighted_sum["arrays"][name] / aggregate.total_weight
        np.testing.assert_allclose(loop.arrays[name].numpy(), ref + mean, rtol=0, atol=1e-6)


# --- 2. strategies ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_every_linear_strategy_runs_on_the_secure_sum(tmp_path: Path, name: str) -> None:
    cfg = _config(strategy=name, compression="qsgd:4", **{"num-rounds": 2, "server-momentum": 0.9})
    loop, transport = _run(tmp_path, cfg)
    assert [(r.aggregated, r.clients, r.secagg["clients_in_sum"]) for r in loop.history] == [  # type: ignore[index]
        (True, N, N),
        (True, N, N),
    ]
    _assert_exact(cfg, transport, range(N))
    init = _initial()
    assert all(not np.array_equal(loop.arrays[k].numpy(), v) for k, v in init.items())
    assert all(np.isfinite(loop.arrays[k].numpy()).all() for k in init)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_per_client_strategies_are_refused_with_secagg(name: str) -> None:
    with pytest.raises(
        ConfigError, match=f"strategy {name!r} cannot run under secure aggregation: it needs every"
    ):
        _config(strategy=name)


def test_flowers_bulyan_is_refused_by_the_loop_before_round_one(tmp_path: Path) -> None:
    cfg = _config()
    with pytest.raises(ValueError, match=r"Bulyan needs every client's update.*secure aggregation"):
        RoundLoop(
            cfg,
            Bulyan(),
            numpy_to_arrays(_initial()),
            _eval,
            tmp_path,
            transport=SecAggTransport(cfg, MAX_EXAMPLES),
            max_examples=MAX_EXAMPLES,
        )
    assert not (tmp_path / METRICS_FILE).exists()


@pytest.mark.parametrize("codec", ["topk:0.1", "stc:0.1"])
def test_sparse_codecs_are_refused_with_secagg(codec: str) -> None:
    with pytest.raises(
        ConfigError, match=f"compression '{codec}' cannot run under secure aggregation: its sparse"
    ):
        _config(compression=codec)


# --- 3. dropouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["advertise-keys", "share-keys", "masked-input"])
def test_simulated_dropouts_within_the_threshold_keep_the_exact_sum(tmp_path: Path, stage: str) -> None:
    # 1 of 5 drops; k = 4, t = 3: every secret keeps 3 holders.
    cfg = _config(compression="qsgd:4", **{"secagg-drop-fraction": 0.2, "secagg-drop-stage": stage})
    loop, transport = _run(tmp_path, cfg)
    (record,) = loop.history
    stats = record.secagg
    assert stats is not None and stats["aborted"] is None
    assert record.aggregated
    assert stats["dropped_per_stage"] == {f"after-{stage}": 1}
    assert stats["clients_in_sum"] == record.clients == record.sampled - record.dropped
    aggregate = transport.rounds[0][1].aggregate
    assert aggregate is not None
    if stage == "masked-input":
        # It dropped after its masked input arrived: its input is in the sum, its self-mask
        # seed rebuilt from its neighbours' shares.
        assert (stats["clients_in_sum"], record.dropped) == (N, 0)
    else:
        assert (stats["clients_in_sum"], record.dropped) == (N - 1, 1)
        assert len(aggregate.dropped) == 1 and "simulated dropout" in aggregate.dropped[0].reason
    _assert_exact(cfg, transport, _survivors(aggregate))


def test_dropouts_past_the_threshold_abort_the_round_and_the_next_round_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 2 of 5 drop after sharing keys: a survivor's self-mask seed is left with 2 holders < t = 3.
    cfg = _config(**{"num-rounds": 2, "secagg-drop-fraction": 0.4, "secagg-drop-stage": "share-keys"})
    loop, transport = _loop(tmp_path, cfg)

    class Recover:
        """After round 1, the dropouts stop (a fresh cohort of round 2 that stays)."""

        def on_start(self, first_round: int, num_rounds: int) -> None:
            pass

        def on_round(self, event: RoundEvent) -> None:
            transport.cfg = dataclasses.replace(cfg, secagg_drop_fraction=0.0)

    loop.hooks.append(Recover())
    with InProcessGrid("secaggapps:honest_app", N, {}, workers=1) as grid:
        history = loop.run(grid)
    first, second = history
    assert (first.aggregated, first.clients, first.dropped) == (False, 0, N)
    assert first.secagg is not None and "fewer than the threshold 3" in first.secagg["aborted"]
    assert first.secagg["clients_in_sum"] == 0
    # Aborted before the unmask stage: no share was revealed.
    assert "unmask" not in first.secagg["bytes_down_per_stage"]
    assert "secure aggregation aborted" in caplog.text and "keeping the previous model" in caplog.text
    # The model after the aborted round is the initial one (checkpoint of round 1 = initial).
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [line["aggregated"] for line in lines] == [False, True]
    assert first.accuracy == pytest.approx(float(_initial()["fc.bias"].mean()), abs=1e-7)
    assert (second.aggregated, second.clients) == (True, N)
    # Round 2 started from the unchanged initial model, with fresh keys: its sum is exact.
    _assert_exact(cfg, transport, range(N), server_round=2)
    require_some_round_aggregated(history)  # one round aggregated: the run succeeded


def test_a_run_whose_rounds_all_abort_fails(tmp_path: Path) -> None:
    cfg = _config(**{"num-rounds": 2, "secagg-drop-fraction": 0.4, "secagg-drop-stage": "advertise-keys"})
    loop, _ = _run(tmp_path, cfg)
    assert [r.aggregated for r in loop.history] == [False, False]
    for name, values in _initial().items():
        np.testing.assert_array_equal(loop.arrays[name].numpy(), values)
    with pytest.raises(RunFailedError, match="no round aggregated"):
        require_some_round_aggregated(loop.history)


def test_the_cli_exits_non_zero_when_no_secure_round_aggregated(tmp_path: Path) -> None:
    from fedge.cli import main

    argv = ["simulate", "--num-clients", "3", "--clients-per-round", "3", "--num-rounds", "1"]
    argv += ["--local-epochs", "1", "--workers", "1", "--quiet", "--export-every", "off"]
    argv += ["--secagg", "true", "--secagg-drop-fraction", "0.5", "--secagg-drop-stage", "advertise-keys"]
    assert main([*argv, "--out", str(tmp_path / "run")]) != 0
    (line,) = (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
    assert json.loads(line)["aggregated"] is False


# --- 4. bad input from malicious clients ------------------------------------------------------

MALICIOUS_NODE = FIRST_NODE_ID  # partition 0 (secaggapps.MALICIOUS)


@pytest.mark.parametrize(
    ("app", "stage", "reason"),
    [
        # The neighbour whose share was tampered refuses it; the sender still masked toward it,
        # so the edge is lopsided and the sender leaves the sum (its masks through its rebuilt key).
        (
            "tampered_ciphertext_app",
            "masked-input",
            "masked toward position",
        ),
        ("short_masked_vector_app", "masked-input", "secagg field 'masked' must be"),
        ("wrong_stage_app", "share-keys", "the reply is for stage 3, not 2"),
        ("extra_records_app", "masked-input", "the reply carries records besides its secagg record"),
        ("small_order_key_app", "advertise-keys", "the X25519 public key is a point of small order"),
        ("error_reply_app", "share-keys", "error reply: RuntimeError: simulated client failure"),
        # Found in review: a malformed key once ended the whole run.
        ("short_key_app", "advertise-keys", "secagg field 'c-key' must be 32 bytes, got 31 bytes"),
        ("no_commitment_app", "share-keys", "secagg message lacks 'commitment'"),
    ],
    ids=[
        "tampered-ciphertext",
        "short-masked-vector",
        "wrong-stage",
        "extra-records",
        "small-order-key",
        "error-reply",
        "short-key",
        "no-commitment",
    ],
)
def test_a_malicious_client_is_dropped_and_the_others_sum_exactly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, app: str, stage: str, reason: str
) -> None:
    caplog.set_level(logging.WARNING, logger="fedge.server")
    cfg = _config(compression="qsgd:4")
    loop, transport = _run(tmp_path, cfg, f"secaggapps:{app}")
    (record,) = loop.history
    assert (record.aggregated, record.clients, record.dropped) == (True, N - 1, 1)
    assert record.secagg is not None and record.secagg["dropped_per_stage"] == {stage: 1}
    assert f"client {MALICIOUS_NODE} dropped at secagg {stage}: {reason}" in caplog.text
    aggregate = transport.rounds[0][1].aggregate
    assert aggregate is not None
    (dropped,) = aggregate.dropped
    assert dropped.node_id == MALICIOUS_NODE and dropped.reason.startswith(f"secagg {stage}: ")
    _assert_exact(cfg, transport, range(1, N))


class DuplicatingGrid(InProcessGrid):
    """Delivers partition 0's share-keys reply twice (as a faulty relay could)."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        twice = [
            r
            for r in replies
            if int(r.metadata.src_node_id) == MALICIOUS_NODE
            and r.has_content()
            and r.content.config_records.get(wire.SECAGG_KEY, {}).get(wire.STAGE) == 2
        ]
        return replies + twice


def test_a_second_reply_from_one_node_drops_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # fedge's grid gives one reply per message, so no client can send two: the grid is made to.
    cfg = _config(compression="qsgd:4")
    loop, transport = _run(tmp_path, cfg, grid_cls=DuplicatingGrid)
    (record,) = loop.history
    assert (record.aggregated, record.clients, record.dropped) == (True, N - 1, 1)
    assert (
        f"client {MALICIOUS_NODE} dropped at secagg share-keys: a second reply from the same node"
        in caplog.text
    )
    _assert_exact(cfg, transport, range(1, N))


def test_fedges_real_client_app_with_a_malicious_mod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # make_client_app(mods=[...]) around real training: the tampering client leaves the sum.
    from fedge.simulation import runner

    monkeypatch.setattr(runner, "CLIENT_APP_REF", "secaggapps:real_tampered_ciphertext_app")
    cfg = RunConfig.from_mapping(
        {
            **BASE,
            "local-epochs": 1,
            "workers": 1,
            "export-every": "off",
            "max-examples-per-client": 0,
        }
    )
    summary = runner.simulate(cfg, tmp_path / "run")
    (row,) = summary["history"]
    assert (row["aggregated"], row["clients"], row["dropped"]) == (True, N - 1, 1)
    assert row["secagg"]["clients_in_sum"] == N - 1
    assert row["secagg"]["dropped_per_stage"] == {"masked-input": 1}
    assert f"client {MALICIOUS_NODE} dropped at secagg masked-input: masked toward position" in caplog.text


# --- 5. metrics -------------------------------------------------------------------------------


def test_metrics_carry_the_secagg_figures_and_bytes_are_their_sums(tmp_path: Path) -> None:
    cfg = _config(compression="qsgd:4", **{"num-rounds": 2, "secagg-drop-fraction": 0.2})
    loop, _ = _run(tmp_path, cfg)
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert len(lines) == 2
    for line, record in zip(lines, loop.history, strict=True):
        stats = line["secagg"]
        assert stats == record.secagg
        assert stats["clients_in_sum"] == N - 1 == line["clients"]
        assert stats["dropped_per_stage"] == {"after-share-keys": 1}
        assert (stats["neighbors"], stats["threshold"]) == (4, 3)
        for key in ("bytes_up_per_stage", "bytes_down_per_stage"):
            assert list(stats[key]) == list(STAGES) and all(v > 0 for v in stats[key].values()), key
        assert line["bytes_up"] == record.bytes_up == sum(stats["bytes_up_per_stage"].values())
        assert line["bytes_down"] == record.bytes_down == sum(stats["bytes_down_per_stage"].values())
        # The masked input of each of the 4 survivors: ceil(D * m / 8) bytes, m = bit_length(5 * 15).
        enc = FieldEncoding.for_codec(cfg.codec(), 8, cfg.secagg_clip, MAX_EXAMPLES)
        length = sum(int(np.prod(s)) for s in SHAPES.values()) + enc.weight_digits()
        assert stats["field_bits"] == (N * 15).bit_length()
        masked = -(-length * stats["field_bits"] // 8)
        assert masked * (N - 1) < stats["bytes_up_per_stage"]["masked-input"] < (masked + 200) * (N - 1)


# --- 6. secrets never on disk -----------------------------------------------------------------


def test_no_secagg_round_state_reaches_the_run_folder(tmp_path: Path) -> None:
    from fedge.simulation.runner import simulate

    # Error feedback keeps a residual in each client's state, so state files are written
    # after every stage; the client that drops after its masked input keeps its round's
    # secrets in memory past the round.
    cfg = RunConfig.from_mapping(
        {
            "num-clients": N,
            "clients-per-round": N,
            "num-rounds": 2,
            "local-epochs": 1,
            "workers": 1,
            "export-every": "off",
            "secagg": True,
            "secagg-neighbors": 4,
            "secagg-threshold": 3,
            "compression": "qsgd:4",
            "error-feedback": True,
            "secagg-drop-fraction": 0.2,
            "secagg-drop-stage": "masked-input",
        }
    )
    run = tmp_path / "run"
    summary = simulate(cfg, run)
    assert all(row["aggregated"] for row in summary["history"])
    files = [p for p in run.rglob("*") if p.is_file()]
    states = [p for p in files if p.name.startswith("state-round-")]
    assert len(states) >= N, files  # state files were written, and were checked
    needle = wire.STATE_KEY.encode()
    assert [p for p in files if needle in p.read_bytes()] == []


def test_the_secrets_check_would_see_an_unstripped_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control of the test above: with nothing stripped, the record is on disk.
    from fedge.simulation import client_state
    from fedge.simulation.runner import simulate

    monkeypatch.setattr(client_state, "EPHEMERAL_STATE_KEYS", frozenset())
    cfg = RunConfig.from_mapping(
        {
            **BASE,
            "num-rounds": 1,
            "local-epochs": 1,
            "workers": 1,
            "export-every": "off",
            "max-examples-per-client": 0,
            "secagg-drop-fraction": 0.2,
            "secagg-drop-stage": "masked-input",
        }
    )
    simulate(cfg, tmp_path / "run")
    needle = wire.STATE_KEY.encode()
    assert any(needle in p.read_bytes() for p in (tmp_path / "run").rglob("state-round-*"))


# --- 7. engines -------------------------------------------------------------------------------


@pytest.mark.slow
def test_secagg_on_flowers_ray_engine(tmp_path: Path) -> None:
    from fedge.simulation.runner import simulate

    cfg = RunConfig.from_mapping(
        {
            "num-clients": 3,
            "clients-per-round": 3,
            "num-rounds": 1,
            "local-epochs": 1,
            "workers": 1,
            "engine": "ray",
            "export-every": "off",
            "secagg": True,
            "compression": "qsgd:4",
        }
    )
    summary = simulate(cfg, tmp_path / "ray")
    (line,) = [json.loads(x) for x in (tmp_path / "ray" / METRICS_FILE).read_text().splitlines()]
    assert line["aggregated"] is True and line["secagg"]["clients_in_sum"] == 3
    assert list(line["secagg"]["bytes_up_per_stage"]) == list(STAGES)
    assert summary["rounds_completed"] == 1
