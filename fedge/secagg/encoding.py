"""How a client's float update becomes SecAgg field elements, and how the server reads the sum.

Shared with compression (:func:`fedge.compression.quantize_levels`): every client quantizes
with the **same** scale ``c = secagg-clip`` (not its own per-chunk max, which would make the
level sum meaningless), so the sum of the levels decodes to the exact sum of the quantized
values. For a client with update ``x`` (one float32 tensor) and example count ``w``:

    v = (w / W) * x                     # weights pre-multiplied, W = max-examples-per-client
    v = R v                             # rotate+qsgd / rotate+ternary: the round's shared rotation
    v = clamp(v, -c, c)                 # value clipping to the shared scale
    q = quantize_levels(v, b, c)        # unbiased levels 0..L, L = 2**b - 1 (ternary: L = 2)

and the weight ``w`` itself travels as ``d`` base-``(L + 1)`` digits (each a level ``<= L``), so
that the server learns ``sum_i w_i`` and ``sum_i w_i x_i`` but no single ``w_i``. Over the
``n'`` clients in the sum, with level sum ``S`` per element::

    sum_i (w_i / W) x_hat_i = c * (2 S / L - n')       (then R^T for rotated codecs)
    weighted_sum = W * that,     total_weight = sum_j digit_sum_j * (L + 1)**j

and the mean is ``weighted_sum / total_weight``, FedAvg's example-weighted mean of the
quantized updates. Every element of the input vector is at most ``L``, so a sum over ``n``
clients is at most ``n * L``, below ``2**m`` for ``m = bit_length(n * L)``
(:func:`fedge.secagg.masking.sum_bits`, which is ``ceil(log2(n * (2**b - 1) + 1))``): no
headroom bits are needed, and digits of the weight need none either.

Tensors that are not float32 (integer buffers) are not sent: their update is zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedge.compression import CodecSpec, quantize_levels
from fedge.compression.hadamard import rotate, rotated_length, unrotate
from fedge.compression.qsgd import TERNARY_TOP
from fedge.secagg.errors import SecAggError

__all__ = ["FieldEncoding", "TensorSlot", "layout"]

#: Codec kinds that the field encoding reproduces.
_QSGD, _TERNARY = "qsgd", "ternary"


@dataclass(frozen=True)
class TensorSlot:
    """Where one float32 tensor sits in the input vector."""

    record: str
    name: str
    size: int
    rotation_seed: int
    start: int
    length: int


@dataclass(frozen=True)
class FieldEncoding:
    """The shared-scale field encoding of one round.

    Attributes
    ----------
    level_bits : int
        ``b`` in 1..8 (ternary: 2, levels 0..2).
    ternary : bool
        Levels ``0, 1, 2`` decode to ``-c, 0, +c``.
    rotate : bool
        Randomized Hadamard rotation first (the round's shared seed per tensor).
    clip : float
        ``c`` > 0, the shared scale.
    max_weight : int
        ``W`` >= 1: a client's weight is its example count, capped at ``W``.
    """

    level_bits: int
    ternary: bool
    rotate: bool
    clip: float
    max_weight: int

    def __post_init__(self) -> None:
        if not 1 <= self.level_bits <= 8:
            raise SecAggError(f"secagg level bits must be in 1..8, got {self.level_bits}")
        if self.ternary and self.level_bits != 2:
            raise SecAggError("ternary levels take 2 bits")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError(f"secagg-clip must be a finite number > 0, got {self.clip}")
        if not 1 <= self.max_weight < 2**53:
            raise SecAggError(f"the weight cap must be in 1..2**53, got {self.max_weight}")

    @classmethod
    def for_codec(cls, spec: CodecSpec, secagg_bits: int, clip: float, max_weight: int) -> FieldEncoding:
        """The encoding of ``spec`` under SecAgg (``none`` quantizes at ``secagg_bits``)."""
        kind = spec.kind
        rotated = kind.startswith("rotate+")
        base = kind.removeprefix("rotate+")
        if base == _TERNARY:
            return cls(2, True, rotated, clip, max_weight)
        if base == _QSGD:
            return cls(int(spec.num_bits), False, rotated, clip, max_weight)
        if kind == "none":
            return cls(secagg_bits, False, False, clip, max_weight)
        raise SecAggError(f"compression {str(spec)!r} cannot run under secure aggregation")

    @property
    def scale(self) -> float:
        """``c`` as the float32 the clients quantize with (both sides use this one value)."""
        return float(np.float32(self.clip))

    @property
    def top(self) -> int:
        """``L``, the largest level."""
        return TERNARY_TOP if self.ternary else (1 << self.level_bits) - 1

    def weight_digits(self) -> int:
        """``d``: base-``(L + 1)`` digits that hold any weight ``<= W``."""
        base, digits, reach = self.top + 1, 1, self.top + 1
        while reach <= self.max_weight:
            reach *= base
            digits += 1
        return digits

    def field_bits(self, num_clients: int) -> int:
        """``m = bit_length(n * L)``: a sum of ``n`` inputs never wraps mod ``2**m``."""
        if num_clients < 1:
            raise SecAggError(f"num_clients must be >= 1, got {num_clients}")
        return (num_clients * self.top).bit_length()

    def slot_length(self, size: int) -> int:
        """Field elements of a tensor of ``size`` values."""
        return rotated_length(size) if self.rotate else size

    def encode_tensor(
        self, update: np.ndarray, weight: int, rng: np.random.Generator, rotation_seed: int
    ) -> np.ndarray:
        """Levels (uint8) of one float32 update scaled by ``weight / W``."""
        w = self.check_weight(weight)
        v = np.asarray(update, dtype=np.float32).reshape(-1) * np.float32(w / self.max_weight)
        if not np.isfinite(v).all():
            raise SecAggError("the update holds NaN or Inf; fix the training step")
        if self.rotate:
            v = rotate(v, rotation_seed)
        c = np.float32(self.scale)
        np.clip(v, -c, c, out=v)
        return quantize_levels(v, self.level_bits, self.scale, rng, top=self.top)

    def decode_tensor(
        self, level_sum: np.ndarray, num_clients: int, size: int, rotation_seed: int
    ) -> np.ndarray:
        """``sum_i w_i x_hat_i`` of one tensor (float64, ``size`` values) from its level sum."""
        total = np.asarray(level_sum, dtype=np.float64) * (2.0 / self.top) - num_clients
        total *= self.scale
        if self.rotate:
            total = unrotate(total.astype(np.float32), size, rotation_seed).astype(np.float64)
        return total * self.max_weight

    def check_weight(self, weight: int) -> int:
        """``weight`` as an int in ``1..W``; a larger one is capped at ``W``."""
        if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or weight < 1:
            raise SecAggError(f"a secagg weight must be a whole number >= 1, got {weight!r}")
        return min(int(weight), self.max_weight)

    def encode_weight(self, weight: int) -> np.ndarray:
        """The capped weight as ``d`` base-``(L + 1)`` digits, least significant first."""
        w, base = self.check_weight(weight), self.top + 1
        digits = []
        for _ in range(self.weight_digits()):
            w, digit = divmod(w, base)
            digits.append(digit)
        return np.array(digits, dtype=np.uint8)

    def decode_weight(self, digit_sums: np.ndarray) -> int:
        """``sum_i w_i`` from the per-digit sums."""
        base = self.top + 1
        return sum(int(s) * base**j for j, s in enumerate(np.asarray(digit_sums, dtype=np.uint64).tolist()))


def layout(
    encoding: FieldEncoding, records: Mapping[str, Mapping[str, np.ndarray]], rotation_seeds: Sequence[int]
) -> tuple[list[TensorSlot], int]:
    """The input vector's slots (float32 tensors, in record and tensor order) and its length.

    ``records`` is what the server sent (record -> tensor name -> array);
    ``rotation_seeds[i]`` is the seed of the ``i``-th tensor in that order (every dtype counts,
    as in the client pipeline). The weight digits follow the last slot.
    """
    slots: list[TensorSlot] = []
    start = index = 0
    for record, tensors in records.items():
        for name, values in tensors.items():
            seed = rotation_seeds[index]
            index += 1
            # Float32 tensors are updates (float16 ones are the fp16 downlink's copy of them).
            if np.asarray(values).dtype not in (np.float32, np.float16):
                continue
            size = int(np.asarray(values).size)
            length = encoding.slot_length(size)
            slots.append(TensorSlot(record, name, size, seed, start, length))
            start += length
    return slots, start + encoding.weight_digits()
