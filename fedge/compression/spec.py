"""Codec specification: the text form in the run config, parsed once into a frozen dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

KIND_NONE = "none"
KIND_QSGD = "qsgd"
KIND_TOPK = "topk"
KIND_ROTATE_QSGD = "rotate+qsgd"
KIND_TERNARY = "ternary"
KIND_ROTATE_TERNARY = "rotate+ternary"
KIND_STC = "stc"
CODEC_KINDS = (KIND_NONE, KIND_QSGD, KIND_TOPK, KIND_ROTATE_QSGD, KIND_TERNARY, KIND_ROTATE_TERNARY, KIND_STC)
_BITS_KINDS = (KIND_QSGD, KIND_ROTATE_QSGD)
_FRACTION_KINDS = (KIND_TOPK, KIND_STC)
_BARE_KINDS = (KIND_NONE, KIND_TERNARY, KIND_ROTATE_TERNARY)

MIN_NUM_BITS = 1
MAX_NUM_BITS = 8

VALID_FORMS = (
    "valid forms: 'none', 'qsgd:BITS' (BITS 1..8), 'rotate+qsgd:BITS', 'ternary', 'rotate+ternary', "
    "'topk:FRACTION' (0 < FRACTION <= 1), 'stc:FRACTION', e.g. 'qsgd:4', 'rotate+ternary', 'stc:0.1'"
)


class CodecError(ValueError):
    """A bad codec text, a malformed or truncated payload, or an update that cannot be encoded."""


@dataclass(frozen=True)
class CodecSpec:
    """Which codec compresses an update, and its one parameter.

    Parameters
    ----------
    kind : str
        One of :data:`CODEC_KINDS`: ``"none"``, ``"qsgd"``, ``"rotate+qsgd"``, ``"ternary"``,
        ``"rotate+ternary"``, ``"topk"`` or ``"stc"``.
    num_bits : int, default 0
        Bits per element for ``qsgd`` and ``rotate+qsgd`` (1..8); 0 for the other kinds.
    keep_fraction : float, default 0.0
        Fraction of entries ``topk`` and ``stc`` keep, in (0, 1]; 0.0 for the other kinds.

    Raises
    ------
    CodecError
        When a field is out of range or set for a kind that does not use it.
    """

    kind: str
    num_bits: int = 0
    keep_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in CODEC_KINDS:
            raise CodecError(f"unknown codec kind {self.kind!r}; {VALID_FORMS}")
        uses_bits = self.kind in _BITS_KINDS
        if uses_bits:
            if isinstance(self.num_bits, bool) or not isinstance(self.num_bits, int):
                raise CodecError(f"num_bits must be an int, got {self.num_bits!r}; {VALID_FORMS}")
            if not MIN_NUM_BITS <= self.num_bits <= MAX_NUM_BITS:
                raise CodecError(f"{self.kind} needs num_bits in 1..8, got {self.num_bits}; {VALID_FORMS}")
        elif self.num_bits != 0:
            raise CodecError(f"{self.kind} takes no num_bits (got {self.num_bits}); leave it 0")
        if self.kind in _FRACTION_KINDS:
            fraction = self.keep_fraction
            if not (isinstance(fraction, int | float) and math.isfinite(fraction) and 0.0 < fraction <= 1.0):
                raise CodecError(
                    f"{self.kind} needs keep_fraction in (0, 1], got {fraction!r}; {VALID_FORMS}"
                )
        elif self.keep_fraction != 0.0:
            raise CodecError(f"{self.kind} takes no keep_fraction (got {self.keep_fraction}); leave it 0.0")

    def __str__(self) -> str:
        if self.kind in _FRACTION_KINDS:
            return f"{self.kind}:{self.keep_fraction!r}"
        if self.kind in _BARE_KINDS:
            return self.kind
        return f"{self.kind}:{self.num_bits}"


def parse_codec(text: str) -> CodecSpec:
    """Parse a codec's config text: ``"none"``, ``"qsgd:4"``, ``"ternary"``, ``"stc:0.1"``, ...

    Parameters
    ----------
    text : str
        The config value; surrounding whitespace is ignored.

    Returns
    -------
    CodecSpec
        The validated specification; ``str(spec)`` gives the text back.

    Raises
    ------
    CodecError
        On any other text, with the valid forms listed.
    """
    stripped = text.strip()
    kind, sep, arg = stripped.partition(":")
    if kind in _BARE_KINDS and not sep:
        return CodecSpec(kind)
    if kind in _BITS_KINDS and sep:
        if not arg.isdigit():
            raise CodecError(f"codec {text!r}: BITS must be an integer 1..8; {VALID_FORMS}")
        return CodecSpec(kind, num_bits=int(arg))
    if kind in _FRACTION_KINDS and sep:
        try:
            fraction = float(arg)
        except ValueError:
            raise CodecError(f"codec {text!r}: FRACTION must be a number in (0, 1]; {VALID_FORMS}") from None
        return CodecSpec(kind, keep_fraction=fraction)
    raise CodecError(f"unknown codec {text!r}; {VALID_FORMS}")


def secagg_compatible(spec: CodecSpec) -> bool:
    """Whether updates encoded with ``spec`` can be summed under secure aggregation.

    Secure aggregation sums dense vectors of integers modulo a power of two (pairwise masks
    cover every coordinate). ``qsgd``, ``ternary`` and their rotated forms produce a dense
    integer level per coordinate (see :mod:`fedge.compression.qsgd` for the range and the
    headroom bits); ``none`` is dense and the secagg stage fixed-point encodes it itself.
    ``topk`` and ``stc`` are not: their support differs per client, and a masked sparse
    vector is dense, so nothing is saved and the support itself would leak.

    Parameters
    ----------
    spec : CodecSpec
        The codec.

    Returns
    -------
    bool
        False for ``topk`` and ``stc``; True otherwise.
    """
    return spec.kind not in _FRACTION_KINDS


def error_feedback_compatible(spec: CodecSpec) -> bool:
    """Whether error feedback converges with ``spec``: the codec must be lossy and contractive.

    Error feedback keeps ``r' = v - C(v)`` with ``v = update + r``; the residual stays bounded
    only when ``||C(v) - v|| < ||v||`` (Karimireddy et al., ICML 2019). ``topk`` and ``stc`` are
    (they keep the largest entries, exactly or as ``sign * mean``), and so is in practice
    ``qsgd`` from 2 bits. One-bit ``qsgd`` (error ``m**2 - x**2`` per element) and
    ``ternary`` (``|x| (m - |x|)``) are not: for the many entries far below their chunk's max
    the error exceeds the entry, and the residual grows. Measured on FEMNIST (README):
    ``qsgd:1`` with feedback diverged and ``ternary`` lost 8 points with it; without
    feedback, ``ternary`` matches fp32, being unbiased. ``none`` loses nothing to feed back.

    Returns
    -------
    bool
        False for ``none``, ``qsgd:1``, ``rotate+qsgd:1``, ``ternary`` and ``rotate+ternary``.
    """
    if spec.kind in (KIND_NONE, KIND_TERNARY, KIND_ROTATE_TERNARY):
        return False
    return not (spec.kind in _BITS_KINDS and spec.num_bits < 2)


def require_secagg_compatible(spec: CodecSpec) -> None:
    """Refuse a codec that secure aggregation cannot sum, with the fix in the message.

    Raises
    ------
    CodecError
        For ``topk`` and ``stc``.
    """
    if not secagg_compatible(spec):
        raise CodecError(
            f"compression {str(spec)!r} cannot run under secure aggregation: its sparse support "
            "differs per client and pairwise masks make every coordinate dense; use qsgd:BITS, "
            "ternary or rotate+qsgd:BITS / rotate+ternary, or turn secure aggregation off"
        )
