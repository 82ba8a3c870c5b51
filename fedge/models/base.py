"""Shared pieces of the model zoo: the error type, the model base class, seeded init."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

__all__ = ["ModelError", "ZooModel", "init_parameters"]


class ModelError(ValueError):
    """A model name, input shape or size that the zoo cannot build.

    The message is one line naming the problem and the valid choices.
    """


class ZooModel(nn.Module):
    """Base class of every model in :data:`fedge.models.MODELS`.

    A subclass declares what input it takes (``input_shape_hint``, :meth:`fits`)
    and builds itself from a data description (:meth:`from_spec`). Its own
    ``__init__`` takes the natural arguments (``num_features``, ``vocab_size``...)
    and initialises weights from the global torch RNG as any ``nn.Module`` does;
    use :func:`fedge.models.build_model` for seeded, side-effect-free weights.
    """

    #: Human-readable per-sample input shape and dtype, e.g. ``"(1, 28, 28) float32"``.
    input_shape_hint: ClassVar[str] = ""

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        """Return whether this model takes per-sample inputs of ``input_shape``.

        Parameters
        ----------
        input_shape : tuple of int
            Shape of one sample, without the batch dimension.

        Returns
        -------
        bool
            True when :meth:`from_spec` accepts ``input_shape``.
        """
        raise NotImplementedError

    @classmethod
    def from_spec(cls, *, input_shape: tuple[int, ...], num_classes: int, vocab_size: int) -> ZooModel:
        """Build the model for a data description (``fits(input_shape)`` is already checked).

        Parameters
        ----------
        input_shape : tuple of int
            Shape of one sample, without the batch dimension.
        num_classes : int
            Number of output logits.
        vocab_size : int
            Number of token ids; only token models use it.

        Returns
        -------
        ZooModel
            A freshly constructed model.
        """
        raise NotImplementedError


def init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every parameter of ``model`` in place from ``generator``.

    The draws and their order are those of PyTorch's own ``reset_parameters``
    (Linear/Conv: ``kaiming_uniform_(a=sqrt(5))`` for the weight, so
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, then the bias from the same range;
    GRU/LSTM: every tensor ``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``;
    Embedding: ``N(0, 1)``, padding row zero), so the result equals ``torch.manual_seed(seed)``
    followed by construction, without touching the global RNG.

    Parameters
    ----------
    model : torch.nn.Module
        Model whose parameters are overwritten (its buffers are left alone).
    generator : torch.Generator
        CPU generator the draws come from; it is advanced.

    Raises
    ------
    TypeError
        If a module with parameters has no known initialisation; add it here.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.GRU | nn.LSTM):
            bound = 1.0 / math.sqrt(module.hidden_size)
            for param in module.parameters():
                nn.init.uniform_(param, -bound, bound, generator=generator)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, generator=generator)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].fill_(0.0)
        elif any(True for _ in module.parameters(recurse=False)):
            raise TypeError(
                f"no seeded initialisation for {type(module).__name__}; "
                "add a branch for it in fedge.models.base.init_parameters"
            )
