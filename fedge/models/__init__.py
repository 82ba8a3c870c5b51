"""The model zoo: small networks for edge devices, built by name with seeded weights.

Examples
--------
>>> from fedge.models import build_model, count_parameters
>>> model = build_model("cnn28", input_shape=(1, 28, 28), num_classes=10, seed=42)
>>> count_parameters(model) < 1_000_000
True
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from fedge.models.base import ModelError, ZooModel, init_parameters
from fedge.models.zoo import CharGru, Cnn8, Cnn28, Cnn32, Har1d, Mlp

__all__ = [
    "MODELS",
    "CharGru",
    "Cnn8",
    "Cnn28",
    "Cnn32",
    "Har1d",
    "Mlp",
    "ModelError",
    "ZooModel",
    "build_model",
    "count_parameters",
]

#: Every model the zoo builds, by the name that configs and the CLI use.
MODELS: dict[str, type[ZooModel]] = {
    "cnn8": Cnn8,
    "cnn28": Cnn28,
    "mlp": Mlp,
    "har1d": Har1d,
    "chargru": CharGru,
    "cnn32": Cnn32,
}


def _choices() -> str:
    return ", ".join(MODELS)


def _models_that_fit(input_shape: tuple[int, ...]) -> list[str]:
    return [name for name, cls in MODELS.items() if cls.fits(input_shape)]


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    vocab_size: int = 0,
) -> nn.Module:
    """Build zoo model ``name`` for the given data, with weights drawn from ``seed``.

    The same ``(name, input_shape, num_classes, vocab_size, seed)`` gives bit-identical
    initial weights in any process. The caller's global torch RNG state is neither
    read nor advanced: the model is constructed on the ``meta`` device (no draws),
    materialised on the CPU, and initialised from a private ``torch.Generator``
    seeded with ``seed``, with PyTorch's default initialisation (so the weights equal
    those of ``torch.manual_seed(seed)`` followed by constructing the class).

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`: ``cnn8``, ``cnn28``, ``mlp``, ``har1d``, ``chargru``
        or ``cnn32``.
    input_shape : tuple of int
        Shape of one sample, without the batch dimension, e.g. ``(1, 28, 28)``.
    num_classes : int
        Number of output logits, at least 1.
    seed : int
        Seed of the weight initialisation, in ``[0, 2**63)``.
    vocab_size : int, default 0
        Number of token ids for ``chargru``; 0 means ``num_classes`` (next-token
        prediction over the same alphabet). Other models ignore it.

    Returns
    -------
    torch.nn.Module
        The model in training mode, float32 parameters on the CPU, mapping a batch
        of shape ``(N, *input_shape)`` to logits of shape ``(N, num_classes)``.

    Raises
    ------
    ModelError
        If ``name`` is unknown, ``input_shape`` does not fit the model (the message
        names the models that do), or a size or the seed is out of range.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of: {_choices()}")
    cls = MODELS[name]
    try:
        # operator.index accepts NumPy integers (shapes read off arrays) but not floats.
        shape = tuple(operator.index(d) for d in input_shape)
    except TypeError:
        raise ModelError(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
    if not cls.fits(shape):
        fitting = _models_that_fit(shape)
        hint = (
            f"use model {' or '.join(repr(n) for n in fitting)} for this shape"
            if fitting
            else f"no model takes this shape; choose one of: {_choices()}"
        )
        raise ModelError(f"model {name!r} expects input_shape {cls.input_shape_hint}, got {shape}; {hint}")
    if num_classes < 1:
        raise ModelError(f"num_classes must be at least 1, got {num_classes}")
    if vocab_size < 0:
        raise ModelError(f"vocab_size must be 0 (meaning num_classes) or positive, got {vocab_size}")
    if not 0 <= seed < 2**63:
        raise ModelError(f"seed must be in [0, 2**63), got {seed}; reduce it modulo 2**63")

    # Constructing on the meta device runs no reset_parameters draws, so the global
    # RNG is untouched (fork_rng would restore it afterwards, but other threads could
    # observe it in between).
    with torch.device("meta"):
        model = cls.from_spec(
            input_shape=shape, num_classes=num_classes, vocab_size=vocab_size or num_classes
        )
    model = model.to_empty(device="cpu")
    if any(True for _ in model.buffers()):
        # to_empty leaves buffers uninitialised and init_parameters only draws parameters.
        raise TypeError(f"{cls.__name__} has buffers; initialise them in build_model first")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    init_parameters(model, generator)
    return model


def count_parameters(model: nn.Module) -> int:
    """Return the number of scalar parameters of ``model`` (trainable or not).

    Parameters
    ----------
    model : torch.nn.Module
        Any module; shared parameters are counted once.

    Returns
    -------
    int
        ``sum(p.numel() for p in model.parameters())``.
    """
    return sum(p.numel() for p in model.parameters())
