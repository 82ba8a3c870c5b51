"""Local training and evaluation of a PyTorch model on in-memory arrays.

Used by the client's ``train``/``evaluate`` handlers and by the server's central
evaluation. Batches are sliced from tensors directly (no ``DataLoader``): with the
small models of the zoo, a DataLoader's per-batch overhead costs more than the
forward pass.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
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


# --- On-device DP-SGD (Opacus) ----------------------------------------------------------


@dataclass(frozen=True)
class DpSgdPlan:
    """The privacy-relevant shape of one DP-SGD training call, known before it runs.

    Parameters
    ----------
    sample_rate : float
        Poisson sampling rate of a local batch, ``1 / ceil(N / batch_size)`` (Opacus's
        ``1 / len(data_loader)``): each sample joins each batch independently with it.
    steps : int
        Noised optimizer steps: ``epochs * int(1 / sample_rate)`` (Opacus's Poisson loader
        length), capped by ``max_steps``.
    """

    sample_rate: float
    steps: int


def dp_sgd_plan(num_examples: int, *, epochs: int, batch_size: int, max_steps: int = 0) -> DpSgdPlan:
    """The sample rate and step count :func:`train_local_dp` will use (for a budget check first).

    Raises
    ------
    ValueError
        No training data, or a non-positive ``epochs``/``batch_size``, or a negative ``max_steps``.
    """
    if num_examples < 1:
        raise ValueError("no training data on this client; check the partition")
    if epochs < 1 or batch_size < 1 or max_steps < 0:
        raise ValueError(
            "epochs and batch_size must be >= 1, max_steps (0: no cap) >= 0; "
            f"got {epochs}, {batch_size}, {max_steps}"
        )
    sample_rate = 1 / math.ceil(num_examples / batch_size)
    # Opacus's UniformWithReplacementSampler has int(1 / sample_rate) batches per epoch.
    steps = epochs * int(1 / sample_rate)
    return DpSgdPlan(sample_rate=sample_rate, steps=min(steps, max_steps) if max_steps else steps)


@dataclass(frozen=True)
class DpTrainResult(TrainResult):
    """What DP-SGD local training reports, besides :class:`TrainResult`'s fields.

    Parameters
    ----------
    noise_multiplier, sample_rate : float
        The Gaussian noise multiplier and the Poisson sampling rate of every step.
    epsilon : float
        Epsilon of this call alone (its Opacus RDP accountant) at ``delta``; a device's
        total over all its calls is its ledger's (:mod:`fedge.client.ledger`).
    delta : float
        The delta ``epsilon`` is stated at.
    """

    noise_multiplier: float
    sample_rate: float
    epsilon: float
    delta: float


class _Samples(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``(x[i], y[i])`` pairs; a batch is one fancy-indexing read (``__getitems__``)."""

    def __init__(self, x: Any, y: np.ndarray) -> None:
        self.x = x
        self.y = torch.as_tensor(y, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _as_tensor(self.x, np.asarray([i]))[0], self.y[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = np.sort(np.asarray(indices, dtype=np.int64))
        if len(idx) == 0:
            return []
        xb = _as_tensor(self.x, idx)
        return list(zip(xb.unbind(0), self.y[torch.as_tensor(idx)].unbind(0), strict=True))


def os_seeded_generator() -> torch.Generator:
    """A ``torch.Generator`` seeded from the OS's CSPRNG (``os.urandom``), never from the run seed."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def dp_sgd_module(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that Opacus can compute per-sample gradients of.

    Supported zoo modules (Conv, Linear, Embedding) are copied as they are; ``nn.GRU`` and
    ``nn.LSTM`` become Opacus's ``DPGRU``/``DPLSTM`` (``ModuleValidator.fix``, which keeps
    the weights and accepts and emits the plain module's state_dict names).

    Raises
    ------
    ValueError
        Opacus cannot train the model even after ``fix`` (one line naming the layers).
    """
    from opacus.validators import ModuleValidator

    twin = copy.deepcopy(model)
    if ModuleValidator.validate(twin, strict=False):
        twin = ModuleValidator.fix(twin)
    errors = ModuleValidator.validate(twin, strict=False)
    if errors:
        reasons = "; ".join(str(e).splitlines()[0] for e in errors)
        raise ValueError(f"dp-sgd cannot train {type(model).__name__} with Opacus: {reasons}")
    return twin


def train_local_dp(
    model: nn.Module,
    x: Any,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    max_steps: int = 0,
    noise_generator: torch.Generator | None = None,
    sample_generator: torch.Generator | None = None,
) -> DpTrainResult:
    """DP-SGD (Abadi et al., 2016) on ``(x, y)`` with Opacus, in place; sample-level privacy.

    Each step draws a Poisson batch (every sample independently with probability
    ``sample_rate``, Opacus's ``DPDataLoader`` via ``make_private(poisson_sampling=True)``),
    clips each sample's gradient to L2 norm ``max_grad_norm``, adds Gaussian noise of
    standard deviation ``noise_multiplier * max_grad_norm`` to their sum and divides by
    the expected batch size before the SGD step. Opacus's RDP accountant gives the
    call's epsilon at ``delta``.

    The model is trained as a copy (:func:`dp_sgd_module`: Opacus's grad-sample hooks, and
    ``DPGRU`` for a GRU, never touch ``model``), and the trained weights are loaded back
    into ``model`` under its own state_dict names (no ``_module.`` prefix).

    Randomness: the noise and the Poisson sampling come from generators seeded from
    ``os.urandom`` (:func:`os_seeded_generator`), never from the run seed: whoever knows
    the run config (every client, the server) would otherwise know the noise and the
    batches, and could subtract the one and void the sampling amplification the
    accountant counts on. Opacus's ``secure_mode=True`` would draw them from torchcsprng
    and add its floating-point-attack mitigation, but torchcsprng is not installed (and no
    longer built for current PyTorch), so ``secure_mode=False`` with an OS-seeded
    ``torch.Generator``: a Mersenne Twister, unpredictable without its seed but not a
    CSPRNG, and without the mitigation of Holohan et al. (arXiv:2107.10138). Tests may
    pass their own generators.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place (through a copy); its state_dict keys are unchanged.
    x, y
        As :func:`train_local`.
    epochs, batch_size, max_steps : int
        As :func:`train_local`; ``batch_size`` is the *expected* Poisson batch size
        (:func:`dp_sgd_plan`).
    lr, momentum : float
        SGD learning rate and momentum.
    noise_multiplier : float
        Noise standard deviation over ``max_grad_norm``; > 0.
    max_grad_norm : float
        Per-sample gradient clipping bound; > 0.
    delta : float
        The delta of the reported epsilon, in ``(0, 1)``.
    noise_generator, sample_generator : torch.Generator, optional
        The noise's and the batch sampling's; default :func:`os_seeded_generator`.

    Returns
    -------
    DpTrainResult
        Loss, steps and ``num_examples = len(y)`` as :func:`train_local`, with the noise
        multiplier, sample rate and this call's epsilon at ``delta``.

    Raises
    ------
    DivergenceError
        As :func:`train_local`; ``model`` is then left untouched.
    ValueError
        Bad settings (as :func:`dp_sgd_plan`, or a non-positive noise multiplier or clipping
        bound, or a delta outside ``(0, 1)``), or a model Opacus cannot train.
    """
    from opacus import PrivacyEngine

    plan = dp_sgd_plan(len(y), epochs=epochs, batch_size=batch_size, max_steps=max_steps)
    if not (noise_multiplier > 0 and max_grad_norm > 0 and 0 < delta < 1):
        raise ValueError(
            "dp-sgd needs a noise multiplier > 0, a max grad norm > 0 and a delta in (0, 1); "
            f"got {noise_multiplier}, {max_grad_norm}, {delta}"
        )
    twin = dp_sgd_module(model)
    twin.train()
    loader = torch.utils.data.DataLoader(
        _Samples(x, y), batch_size=batch_size, generator=sample_generator or os_seeded_generator()
    )
    optimizer = torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum)
    with warnings.catch_warnings():
        # "Secure RNG turned off": deliberate, see the docstring.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=twin,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator or os_seeded_generator(),
    )
    loss_fn = nn.CrossEntropyLoss()
    last_loss, steps = 0.0, 0
    try:
        with warnings.catch_warnings():
            # Opacus's hooks on a first layer whose input needs no gradient: expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for epoch in range(epochs):
                if steps >= plan.steps:
                    break
                total, seen = 0.0, 0
                for xb, yb in dp_loader:
                    if steps >= plan.steps:
                        break
                    dp_optimizer.zero_grad(set_to_none=True)
                    # An empty Poisson batch still takes its (pure-noise) step: the accountant
                    # counts every step, and skipping one would make the step count data-dependent.
                    loss = loss_fn(dp_model(xb), yb)
                    value = float(loss.detach()) if len(yb) else 0.0
                    if not math.isfinite(value):
                        raise DivergenceError(
                            _diverged(f"the loss became {value} in epoch {epoch + 1}", steps, lr)
                        )
                    loss.backward()
                    dp_optimizer.step()
                    steps += 1
                    total += value * len(yb)
                    seen += len(yb)
                last_loss = total / seen if seen else last_loss
    finally:
        dp_model.remove_hooks()
    history = list(engine.accountant.history)
    if steps != plan.steps or sum(h[2] for h in history) != steps:
        raise RuntimeError(f"bug: dp-sgd took {steps} steps, its plan {plan.steps}, its accountant {history}")
    if not all(bool(torch.isfinite(p).all()) for p in twin.parameters()):
        raise DivergenceError(_diverged("a weight became non-finite", steps, lr))
    trained = twin.state_dict()
    model.load_state_dict({name: trained[name] for name in model.state_dict()})
    return DpTrainResult(
        num_examples=len(y),
        train_loss=last_loss,
        num_steps=steps,
        noise_multiplier=noise_multiplier,
        sample_rate=plan.sample_rate,
        epsilon=float(engine.accountant.get_epsilon(delta)),
        delta=delta,
    )
