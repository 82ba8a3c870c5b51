"""The round loop against clients whose replies are known in closed form."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedge.config import RunConfig
from fedge.records import numpy_to_arrays
from fedge.server.loop import RoundLoop, sample_clients
from fedge.simulation.grid import InProcessGrid
from fedge.strategies import build_strategy
from fedge.training import EvalResult


def _mean_eval(arrays: ArrayRecord) -> EvalResult:
    # "accuracy" = the mean weight: lets the test read the global model from the record.
    w = arrays["w"].numpy()
    return EvalResult(num_examples=1, loss=0.0, accuracy=float(w.mean()))


def _loop(tmp_path: Path, **overrides: object) -> RoundLoop:
    cfg = RunConfig.from_mapping({"num-clients": 3, "clients-per-round": 3, "num-rounds": 1, **overrides})
    initial = numpy_to_arrays({"w": np.zeros(4, np.float32), "b": np.zeros((2, 2), np.float32)})
    return RoundLoop(cfg, build_strategy(cfg), initial, _mean_eval, tmp_path)


def test_fedavg_round_is_the_example_weighted_mean(tmp_path: Path) -> None:
    loop = _loop(tmp_path)
    with InProcessGrid("fakeapps:constant_app", 3, {}, workers=1) as grid:
        history = loop.run(grid)
    expected = (1 * 3 + 2 * 2 + 3 * 1) / 6  # values 1,2,3 weighted by 3,2,1 examples
    np.testing.assert_allclose(loop.arrays["w"].numpy(), np.full(4, expected), rtol=1e-6)
    np.testing.assert_allclose(loop.arrays["b"].numpy(), np.full((2, 2), expected), rtol=1e-6)
    assert history[0].clients == 3 and history[0].dropped == 0 and history[0].aggregated
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert line["round"] == 1 and line["clients"] == 3


def test_worker_pool_gives_the_same_mean_and_keeps_client_state(tmp_path: Path) -> None:
    loop = _loop(tmp_path, **{"num-rounds": 2})
    with InProcessGrid("fakeapps:constant_app", 3, {}, workers=2) as grid:
        loop.run(grid)
        calls = [int(grid.context(n).state["calls"]["n"]) for n in grid.get_node_ids()]
    np.testing.assert_allclose(loop.arrays["w"].numpy(), np.full(4, 10 / 6), rtol=1e-6)
    assert calls == [2, 2, 2]  # every client ran twice, in whichever worker


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_updates_are_dropped_and_the_round_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    loop = _loop(tmp_path, **{"num-clients": 10, "clients-per-round": 10, "min-reply-fraction": 0.3})
    with InProcessGrid("fakeapps:faulty_app", 10, {}, workers=workers) as grid:
        (record,) = loop.run(grid)
    # Only partitions 0, 1 and 9 are valid: values 1, 2, 10 weighted by 3, 2, 10 examples.
    expected = (1 * 3 + 2 * 2 + 10 * 10) / 15
    np.testing.assert_allclose(loop.arrays["w"].numpy(), np.full(4, expected), rtol=1e-6)
    assert (record.clients, record.dropped, record.sampled) == (3, 7, 10)
    assert record.train_loss == pytest.approx(0.5)
    text = caplog.text
    assert "simulated training crash" in text
    assert "NaN or Inf" in text
    assert text.count("expected float32[4]") >= 2  # a wrong shape, and a declared shape that lies
    assert "num-examples must be a positive whole number, got 0" in text
    assert "num-examples must be a positive whole number, got inf" in text
    assert "unreadable update" in text


def test_too_few_valid_replies_keep_the_model(tmp_path: Path) -> None:
    # 2 valid of 6 < ceil(0.5 * 6) = 3: the round completes without aggregating.
    loop = _loop(tmp_path, **{"num-clients": 6, "clients-per-round": 6, "num-rounds": 2})
    with InProcessGrid("fakeapps:faulty_app", 6, {}, workers=1) as grid:
        history = loop.run(grid)
    assert [r.aggregated for r in history] == [False, False]
    np.testing.assert_array_equal(loop.arrays["w"].numpy(), np.zeros(4))


def test_client_sampling_is_seeded_per_round() -> None:
    nodes = list(range(1000, 1050))
    a = sample_clients(nodes, 10, seed=7, server_round=3)
    assert a == sample_clients(list(reversed(nodes)), 10, seed=7, server_round=3)
    assert a != sample_clients(nodes, 10, seed=7, server_round=4)
    assert len(set(a)) == 10 and set(a) <= set(nodes)
    # Flower's node ids are unsigned 64-bit; they must come back exact, not via float64.
    big = [2**64 - 1, 2**63 + 12345, 7870859097658856447]
    assert set(sample_clients(big, 3, seed=1, server_round=1)) == set(big)


def test_min_replies_is_the_ceiling() -> None:
    cfg = RunConfig.from_mapping({"min-reply-fraction": 0.5})
    assert [cfg.min_replies(n) for n in (1, 2, 3, 10, 11)] == [1, 1, 2, 5, 6]


def test_a_client_that_never_replies_is_dropped_and_its_worker_freed(tmp_path: Path) -> None:
    loop = _loop(tmp_path, **{"num-rounds": 2, "round-timeout-s": 3})
    start = time.monotonic()
    with InProcessGrid("fakeapps:hanging_app", 3, {}, workers=2) as grid:
        history = loop.run(grid)
    # Both rounds aggregate partitions 0 and 2: (1 * 3 + 3 * 1) / 4; nobody waits 600 s.
    assert [(r.clients, r.dropped) for r in history] == [(2, 1), (2, 1)]
    np.testing.assert_allclose(loop.arrays["w"].numpy(), np.full(4, (1 * 3 + 3 * 1) / 4), rtol=1e-6)
    assert time.monotonic() - start < 60
