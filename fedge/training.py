"""Local training and evaluation of a PyTorch model on in-memory arrays.

Used by the client's ``train``/``evaluate`` handlers and by the server's central
evaluation. Batches are sliced from tensors directly (no ``DataLoader``): with the
small models of the zoo, a DataLoader's per-batch overhead costs more than the
forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

_EVAL_BATCH_SIZE = 512


class DivergenceError(RuntimeError):
    """Local training produced a non-finite loss or weights; nothing it trained may be sent.

    The message is one line naming where it happened and how to fix it (a lower ``lr``,
    a larger ``batch-size``); the client replies with it as an error instead of weights.
    """


@dataclass(frozen=True)
class TrainResult:
    """What local training reports.

    Parameters
    ----------
    num_examples : int
        Training samples on the client (``len(y)``), the FedAvg weight, whether or not a
        step cap ended training before an epoch was complete.
    train_loss : float
        Mean loss over the batches of the last (possibly partial) epoch.
    num_steps : int
        Optimizer steps taken.
    """

    num_examples: int
    train_loss: float
    num_steps: int


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss and top-1 accuracy over ``num_examples`` samples."""

    num_examples: int
    loss: float
    accuracy: float


def _as_tensor(x: Any, idx: np.ndarray | slice) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x[idx]))


def train_local(
    model: nn.Module,
    x: Any,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
    max_steps: int = 0,
    grad_clip_norm: float = 0.0,
) -> TrainResult:
    """Run SGD on ``(x, y)`` for ``epochs`` epochs or ``max_steps`` steps, in place.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place.
    x : array-like
        Inputs, indexable by an integer array (numpy array or a lazy window view).
    y : numpy.ndarray
        Integer class labels, shape ``(N,)``.
    epochs, batch_size : int
        Passes over the data and mini-batch size.
    lr, momentum : float
        SGD learning rate and momentum (fresh momentum buffers each call).
    generator : torch.Generator
        Shuffles the data; seeding it makes training reproducible.
    proximal_mu : float, default 0.0
        FedProx: adds ``mu / 2 * ||w - w_global||^2`` to the loss (Li et al., 2020).
    max_steps : int, default 0
        Stop after this many optimizer steps even within an epoch; 0 means no cap
        (``epochs * ceil(N / batch_size)`` steps).
    grad_clip_norm : float, default 0.0
        Before each step, scale the mini-batch gradient down to this global L2 norm
        when it is longer (``torch.nn.utils.clip_grad_norm_``); 0 means no clipping.

    Returns
    -------
    TrainResult
        ``num_examples = len(y)``, the mean loss over the last (possibly partial) epoch
        and the number of optimizer steps taken.

    Raises
    ------
    DivergenceError
        The loss or, after the last step, a weight is NaN or infinite. Training stops at
        the first non-finite loss, before its gradient is applied; ``model`` is then
        partly trained and must not be sent.
    ValueError
        No training data, or a non-positive ``epochs`` or ``batch_size``, or a negative
        ``max_steps`` or ``grad_clip_norm``.
    """
    n = len(y)
    if n == 0:
        raise ValueError("no training data on this client; check the partition")
    if epochs < 1 or batch_size < 1 or max_steps < 0 or not grad_clip_norm >= 0:
        raise ValueError(
            "epochs and batch_size must be >= 1, max_steps (0: no cap) and grad_clip_norm "
            f"(0: off) >= 0; got {epochs}, {batch_size}, {max_steps}, {grad_clip_norm}"
        )
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    labels = torch.as_tensor(y, dtype=torch.long)
    dense = isinstance(x, np.ndarray)
    inputs = torch.as_tensor(x) if dense else None
    last_loss = 0.0
    steps = 0
    for epoch in range(epochs):
        if max_steps and steps >= max_steps:
            break
        order = torch.randperm(n, generator=generator)
        total, seen = 0.0, 0
        for start in range(0, n, batch_size):
            if max_steps and steps >= max_steps:
                break
            idx = order[start : start + batch_size]
            xb = inputs[idx] if inputs is not None else _as_tensor(x, np.sort(idx.numpy()))
            yb = labels[idx] if inputs is not None else labels[np.sort(idx.numpy())]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            if proximal_mu > 0:
                prox = sum(
                    ((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * prox
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DivergenceError(_diverged(f"the loss became {value} in epoch {epoch + 1}", steps, lr))
            loss.backward()
            if grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            optimizer.step()
            steps += 1
            total += value * len(yb)
            seen += len(yb)
        last_loss = total / seen
    # The last step's weights were never put through a loss: check them directly.
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise DivergenceError(_diverged("a weight became non-finite", steps, lr))
    return TrainResult(num_examples=n, train_loss=last_loss, num_steps=steps)


def _diverged(what: str, steps: int, lr: float) -> str:
    return (
        f"local training diverged: {what} after {steps} steps at lr {lr}; "
        "lower lr (or leave it auto), raise batch-size, or set grad-clip-norm (e.g. 1.0)"
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: Any, y: np.ndarray) -> EvalResult:
    """Mean cross-entropy and top-1 accuracy of ``model`` on ``(x, y)``."""
    n = len(y)
    if n == 0:
        return EvalResult(num_examples=0, loss=float("nan"), accuracy=float("nan"))
    model.eval()
    labels = torch.as_tensor(y, dtype=torch.long)
    loss_sum, correct = 0.0, 0
    for start in range(0, n, _EVAL_BATCH_SIZE):
        sl = slice(start, start + _EVAL_BATCH_SIZE)
        logits = model(_as_tensor(x, sl))
        loss_sum += float(nn.functional.cross_entropy(logits, labels[sl], reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels[sl]).sum())
    return EvalResult(num_examples=n, loss=loss_sum / n, accuracy=correct / n)
