"""Local training and evaluation of a PyTorch model on in-memory arrays.

Used by the client's ``train``/``evaluate`` handlers and by the server's central
evaluation. Batches are sliced from tensors directly (no ``DataLoader``): with the
small models of the zoo, a DataLoader's per-batch overhead costs more than the
forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

_EVAL_BATCH_SIZE = 512


@dataclass(frozen=True)
class TrainResult:
    """What local training reports: examples seen per epoch and the mean loss of the last epoch."""

    num_examples: int
    train_loss: float


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
) -> TrainResult:
    """Run SGD on ``(x, y)`` for ``epochs`` epochs, in place.

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

    Returns
    -------
    TrainResult
        ``num_examples = len(y)`` and the mean loss over the last epoch.
    """
    n = len(y)
    if n == 0:
        raise ValueError("no training data on this client; check the partition")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    labels = torch.as_tensor(y, dtype=torch.long)
    dense = isinstance(x, np.ndarray)
    inputs = torch.as_tensor(x) if dense else None
    last_loss = 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total, seen = 0.0, 0
        for start in range(0, n, batch_size):
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
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(yb)
            seen += len(yb)
        last_loss = total / seen
    return TrainResult(num_examples=n, train_loss=last_loss)


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
