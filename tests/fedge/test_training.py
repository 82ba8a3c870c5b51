"""Local training: the step cap counts optimizer steps exactly, clipping bounds a step,
and a diverging client raises instead of returning NaN weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedge.training import DivergenceError, train_local


class _Counting(nn.Module):
    """A linear classifier that counts its training forward passes (one per optimizer step)."""

    def __init__(self, num_features: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(num_features, num_classes)
        self.train_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.train_calls += 1
        return self.fc(x)


def _data(n: int = 10, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = (scale * rng.standard_normal((n, 4))).astype(np.float32)
    return x, (np.arange(n) % 3).astype(np.int64)


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, **kwargs: object) -> object:
    settings: dict[str, object] = {"epochs": 3, "batch_size": 3, "lr": 0.01, "momentum": 0.9}
    settings.update(kwargs)
    return train_local(model, x, y, generator=torch.Generator().manual_seed(1), **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("max_steps", "expected"),
    [
        (0, 12),  # no cap: 3 epochs of ceil(10 / 3) = 4 batches
        (1, 1),
        (4, 4),  # exactly one epoch
        (5, 5),  # stops inside the second epoch
        (12, 12),
        (100, 12),  # a cap above the epochs' steps changes nothing
    ],
)
def test_local_steps_caps_optimizer_steps_exactly(max_steps: int, expected: int) -> None:
    model = _Counting()
    x, y = _data()
    result = _train(model, x, y, max_steps=max_steps)
    assert model.train_calls == expected
    assert result.num_steps == expected  # type: ignore[attr-defined]
    assert result.num_examples == 10  # type: ignore[attr-defined]  # the FedAvg weight, capped or not


def test_a_capped_run_equals_the_same_steps_uncapped() -> None:
    # 4 steps capped from 3 epochs == exactly 1 epoch: the cap only stops, it changes no step.
    x, y = _data()
    capped, one_epoch = _Counting(), _Counting()
    _train(capped, x, y, max_steps=4)
    _train(one_epoch, x, y, epochs=1)
    for a, b in zip(capped.parameters(), one_epoch.parameters(), strict=True):
        assert torch.equal(a, b)


def test_grad_clip_norm_bounds_the_first_step() -> None:
    # First SGD step with fresh momentum: w1 = w0 - lr * g, and g clipped to norm c when longer,
    # so ||w1 - w0|| = lr * c exactly (to float32 rounding).
    x, y = _data(scale=100.0)  # large inputs: the gradient norm is far above 0.5
    model = _Counting()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    _train(model, x, y, lr=0.1, max_steps=1, grad_clip_norm=0.5)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert math.isclose(float((after - before).norm()), 0.1 * 0.5, rel_tol=1e-5)


class _Mlp(_Counting):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))  # type: ignore[assignment]


def test_a_diverging_loss_raises_with_the_fix() -> None:
    x, y = _data(scale=10.0)
    model = _Mlp()
    with pytest.raises(DivergenceError, match=r"local training diverged: the loss became nan.*lower lr"):
        _train(model, x, y, lr=1e6, epochs=50)
    # It stopped at the first non-finite loss, long before the 50 epochs' 200 steps.
    assert model.train_calls < 10


def test_non_finite_weights_after_the_last_step_raise() -> None:
    # One step of lr 1e38 overflows float32 weights, and no later loss would notice.
    x, y = _data(scale=10.0)
    with pytest.raises(DivergenceError, match="a weight became non-finite after 1 steps"):
        _train(_Counting(), x, y, lr=1e38, max_steps=1)


@pytest.mark.parametrize(
    "kwargs",
    [{"epochs": 0}, {"batch_size": 0}, {"max_steps": -1}, {"grad_clip_norm": -1.0}],
)
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="must be >= 1"):
        _train(_Counting(), x, y, **kwargs)
