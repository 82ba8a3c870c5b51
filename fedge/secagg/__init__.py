"""SecAgg+ math: keys, Shamir shares, the Harary graph and masking (no Flower, no I/O).

The protocol is Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020, with the primitives and wire choices of Google's
``fcp/secagg``: :mod:`fedge.secagg.crypto` (X25519 + HKDF-SHA256 agreement, AES-GCM shares,
AES-CTR mask expansion), :mod:`fedge.secagg.shamir` (threshold sharing of 32-byte secrets),
:mod:`fedge.secagg.graph` (the ``k``-regular Harary graph and its degree/threshold finder)
and :mod:`fedge.secagg.masking` (masks mod ``2**m``, unmasking, bit packing).
"""

from fedge.secagg.errors import SecAggError
from fedge.secagg.graph import GraphParameters, find_graph_parameters, harary_graph
from fedge.secagg.masking import mask, pack, packed_bytes, sum_bits, unmask_sum, unpack

__all__ = [
    "GraphParameters",
    "SecAggError",
    "find_graph_parameters",
    "harary_graph",
    "mask",
    "pack",
    "packed_bytes",
    "sum_bits",
    "unmask_sum",
    "unpack",
]
