"""The one exception of :mod:`fedge.secagg`."""

from __future__ import annotations


class SecAggError(ValueError):
    """A secure-aggregation input that must be refused (bad key, share, packing or parameter).

    The protocol layer treats it as the sending client dropping; the message says what was
    wrong in one line.
    """
