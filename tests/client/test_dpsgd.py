"""On-device DP-SGD (Opacus): the client's reported epsilon is Opacus's own accountant over
the device's whole history, per-sample clipping bounds the update, the privacy ledger
refuses a spent budget across runs and refuses a corrupt file, and every zoo model trains
and comes back under its plain state_dict names."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant
from torch import nn

from fedge.client.app import make_client_app
from fedge.client.ledger import LEDGER_FILE
from fedge.config import RunConfig
from fedge.models import build_model
from fedge.records import (
    ARRAYS_KEY,
    BATCH_SIZE,
    CONFIG_KEY,
    DP_SGD_DELTA,
    DP_SGD_EPSILON,
    DP_SGD_MAX_GRAD_NORM,
    DP_SGD_NOISE_MULTIPLIER,
    DP_SGD_TARGET_EPSILON,
    LOCAL_EPOCHS,
    LOCAL_STEPS,
    METRICS_KEY,
    SERVER_ROUND,
    arrays_to_numpy,
    model_to_arrays,
)
from fedge.training import train_local_dp

CFG = RunConfig(num_clients=10, clients_per_round=2)
PID = 3
NM, C, DELTA, BATCH, STEPS = 1.1, 1.0, 1e-5, 16, 3


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1


def _context(run_id: int, state_dir: Path | None) -> Context:
    node_config: dict[str, int | str] = {"partition-id": PID}
    if state_dir is not None:
        node_config["state-dir"] = str(state_dir)
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config={})  # type: ignore[arg-type]


def _train(context: Context, server_round: int = 1, target: float = 0.0, dp: bool = True) -> Message:
    spec = CFG.federated_data().spec
    round_config: dict[str, object] = {
        SERVER_ROUND: server_round,
        LOCAL_EPOCHS: 1,
        LOCAL_STEPS: STEPS,
        BATCH_SIZE: BATCH,
    }
    if dp:
        round_config |= {
            DP_SGD_NOISE_MULTIPLIER: NM,
            DP_SGD_MAX_GRAD_NORM: C,
            DP_SGD_TARGET_EPSILON: target,
            DP_SGD_DELTA: DELTA,
        }
    content = RecordDict(
        {
            ARRAYS_KEY: model_to_arrays(CFG.build_model(spec)),
            CONFIG_KEY: ConfigRecord(round_config),  # type: ignore[arg-type]
        }
    )
    message = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = uuid4().hex
    return make_client_app(CFG)(message, context)


def _sample_rate() -> float:
    # Opacus's Poisson rate for the client's data: one expected batch of BATCH per 1/q steps.
    _, y = CFG.federated_data().client_train(PID)
    return 1 / math.ceil(len(y) / BATCH)


def _opacus_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(DELTA))


def _epsilon(reply: Message) -> float:
    assert not reply.has_error(), reply.error.reason
    return float(reply.content.metric_records[METRICS_KEY][DP_SGD_EPSILON])


def test_the_reported_epsilon_is_opacus_accountant_over_the_devices_history(tmp_path: Path) -> None:
    q = _sample_rate()
    first = _epsilon(_train(_context(1, tmp_path), server_round=1))
    assert first == pytest.approx(_opacus_epsilon([(NM, q, STEPS)]), rel=1e-9)
    # A second run on the same device: the total composes both runs' steps.
    second = _epsilon(_train(_context(2, tmp_path), server_round=1))
    assert second == pytest.approx(_opacus_epsilon([(NM, q, STEPS), (NM, q, STEPS)]), rel=1e-9)
    assert second > first
    ledger = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert [
        (e["noise_multiplier"], e["sample_rate"], e["steps"], e["run_id"]) for e in ledger["entries"]
    ] == [
        (NM, q, STEPS, 1),
        (NM, q, STEPS, 2),
    ]
    assert ledger["epsilon"] == pytest.approx(second, rel=1e-12) and ledger["delta"] == DELTA
    assert stat.S_IMODE((tmp_path / LEDGER_FILE).stat().st_mode) == 0o600


def test_without_a_state_dir_the_ledger_lives_in_the_context(tmp_path: Path) -> None:
    context = _context(1, None)
    q = _sample_rate()
    _epsilon(_train(context, server_round=1))
    second = _epsilon(_train(context, server_round=2))
    assert second == pytest.approx(_opacus_epsilon([(NM, q, 2 * STEPS)]), rel=1e-9)
    assert not (tmp_path / LEDGER_FILE).exists()


def test_a_spent_budget_is_refused_across_runs_and_not_recorded(tmp_path: Path) -> None:
    q = _sample_rate()
    one, two = _opacus_epsilon([(NM, q, STEPS)]), _opacus_epsilon([(NM, q, 2 * STEPS)])
    target = (one + two) / 2  # one call fits, a second does not
    assert _epsilon(_train(_context(1, tmp_path), target=target)) == pytest.approx(one, rel=1e-9)
    before = (tmp_path / LEDGER_FILE).read_bytes()
    reply = _train(_context(2, tmp_path), target=target)  # a new run, a new context, same device
    assert reply.has_error() and not reply.has_content()
    assert "dp-sgd privacy budget of this device is spent" in reply.error.reason
    assert f"{target:g}" in reply.error.reason
    assert (tmp_path / LEDGER_FILE).read_bytes() == before  # a refused call spends nothing
    # A larger budget lets the device train again.
    assert _epsilon(_train(_context(3, tmp_path), target=two * 1.01)) == pytest.approx(two, rel=1e-9)


@pytest.mark.parametrize("kind", ["garbage", "wrong-format", "bad-entry", "fifo", "symlink"])
def test_an_untrustworthy_ledger_is_refused_with_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / LEDGER_FILE
    if kind == "garbage":
        path.write_text("{not json")
    elif kind == "wrong-format":
        path.write_text(json.dumps({"format": "other", "entries": []}))
    elif kind == "bad-entry":
        entry = {"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 3, "run_id": 1, "server_round": 1}
        path.write_text(
            json.dumps({"format": "fedge-privacy-ledger-1", "epsilon": 0, "delta": 0, "entries": [entry]})
        )
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        (tmp_path / "elsewhere.json").write_text("{}")
        path.symlink_to(tmp_path / "elsewhere.json")
    reply = _train(_context(1, tmp_path))
    assert reply.has_error() and not reply.has_content()
    reason = reply.error.reason
    assert "privacy ledger" in reason and "refusing to train" in reason and "\n" not in reason
    if kind in ("garbage", "wrong-format", "bad-entry"):
        assert path.is_file() and not path.is_symlink()  # never overwritten (that would reset the budget)


def test_without_dp_sgd_keys_there_is_no_ledger_and_no_epsilon(tmp_path: Path) -> None:
    reply = _train(_context(1, tmp_path), dp=False)
    assert not reply.has_error()
    assert DP_SGD_EPSILON not in reply.content.metric_records[METRICS_KEY]
    assert not (tmp_path / LEDGER_FILE).exists()


def _per_sample_clipped_mean(
    model: nn.Module, x: np.ndarray, y: np.ndarray, bound: float
) -> list[torch.Tensor]:
    """mean_i g_i * min(1, bound / ||g_i||): DP-SGD's noiseless gradient, by plain autograd."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for xi, yi in zip(torch.as_tensor(x), torch.as_tensor(y), strict=True):
        loss = nn.functional.cross_entropy(model(xi[None]), yi[None])
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        for t, g in zip(total, grads, strict=True):
            t += g * min(1.0, bound / (norm + 1e-6))
    return [t / len(y) for t in total]


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_per_sample_clipping_bounds_and_shapes_the_update() -> None:
    rng = np.random.default_rng(11)
    n, lr, bound = 24, 5.0, 1e-3
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = rng.integers(0, 3, n)
    model = build_model("mlp", input_shape=(6,), num_classes=3, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _per_sample_clipped_mean(model, x, y, bound)
    # batch_size >= n: sample rate 1, every sample in every batch, expected batch size n.
    result = train_local_dp(
        model, x, y, epochs=1, batch_size=n, lr=lr, momentum=0.0,
        noise_multiplier=1e-6, max_grad_norm=bound, delta=DELTA,
    )  # fmt: skip
    assert result.sample_rate == 1.0 and result.num_steps == 1
    step = [model.state_dict()[k] - start[k] for k in start]
    # One step: exactly -lr * mean of per-sample clipped gradients (noise std lr * 1e-9 / n).
    for got, want in zip(step, expected, strict=True):
        torch.testing.assert_close(got, -lr * want, atol=5e-8, rtol=1e-4)  # float32 rounding of w
    # Every clipped gradient is <= bound, so their mean is too: ||step|| <= lr * bound.
    norm = float(torch.sqrt(sum((s**2).sum() for s in step)))
    assert norm <= lr * bound * (1 + 1e-4)
    # Several steps (momentum 0): ||w_T - w_0|| <= sum_t ||step_t|| <= steps * lr * bound,
    # while unclipped SGD moves by orders of magnitude more.
    model = build_model("mlp", input_shape=(6,), num_classes=3, seed=0)
    train_local_dp(
        model, x, y, epochs=5, batch_size=n, lr=lr, momentum=0.0,
        noise_multiplier=1e-6, max_grad_norm=bound, delta=DELTA,
    )  # fmt: skip
    moved = float(torch.sqrt(sum(((model.state_dict()[k] - start[k]) ** 2).sum() for k in start)))
    assert 0 < moved <= 5 * lr * bound * (1 + 1e-4)
    unclipped = float(torch.sqrt(sum((g**2).sum() for g in _per_sample_clipped_mean(model, x, y, 1e9))))
    assert lr * unclipped > 100 * lr * bound


ZOO = [
    ("cnn8", (1, 8, 8), 10, 0),
    ("cnn28", (1, 28, 28), 10, 0),
    ("cnn32", (3, 32, 32), 10, 0),
    ("mlp", (12,), 4, 0),
    ("har1d", (6, 32), 6, 0),
    ("chargru", (6,), 20, 20),  # GRU -> Opacus's DPGRU, state_dict names kept
]


@pytest.mark.parametrize(("name", "shape", "classes", "vocab"), ZOO, ids=[z[0] for z in ZOO])
def test_every_zoo_model_trains_and_returns_its_plain_state_dict(
    name: str, shape: tuple[int, ...], classes: int, vocab: int
) -> None:
    rng = np.random.default_rng(5)
    n = 12
    if vocab:
        x = rng.integers(0, vocab, (n, *shape)).astype(np.int64)
    else:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n)
    model = build_model(name, input_shape=shape, num_classes=classes, seed=0, vocab_size=vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local_dp(
        model, x, y, epochs=1, batch_size=4, lr=0.1, momentum=0.9,
        noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA,
    )  # fmt: skip
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].shape == before[k].shape for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert result.num_steps == 3 and result.sample_rate == pytest.approx(1 / 3)
    assert result.epsilon == pytest.approx(_opacus_epsilon([(1.0, 1 / 3, 3)]), rel=1e-9)
    # The plain model is left without Opacus's hooks or per-sample gradients.
    assert type(model).__name__ != "GradSampleModule"
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert arrays_to_numpy(model_to_arrays(model)).keys() == before.keys()
