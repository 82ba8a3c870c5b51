"""SecAgg+ messages on the wire: one ``ConfigRecord`` named ``secagg`` per message.

Every SecAgg+ message is a Flower ``train`` message whose content holds a ``ConfigRecord``
under :data:`SECAGG_KEY`; its ``stage`` says which of the four it is. Flower serializes a
ConfigRecord as protobuf (``flwr.proto.recorddict_pb2``): ints as ``sint64``, bytes as
``bytes``, lists as repeated fields, so the sizes below are the payload's, plus a few bytes
of protobuf tags and lengths per value (measured per stage in ``metrics.jsonl``).

=========================  ==================  =============================================
stage (server -> client)   key                 value
=========================  ==================  =============================================
1 advertise-keys           stage, server-round  int 1, int
                           position             int, this client's graph position
                           clients, degree,     int ``n``, ``k``, ``t``, ``m``, ``D``
                           threshold,
                           field-bits,
                           vector-length
2 share-keys               positions            list of int, the neighbours that advertised
                           c-keys, s-keys       list of 32-byte X25519 public keys (raw)
3 masked-input             positions,           list of int, list of 168-byte ciphertexts
                           ciphertexts          (nonce 12 || AES-GCM body 140 || tag 16)
                           level-bits, ternary, int ``b``, bool, bool, float ``c``, int ``W``
                           rotate, clip,        (the field encoding); the message also carries
                           max-weight           the model and the round config, as plain
4 unmask                   survivors, dropped   list of int each
=========================  ==================  =============================================

=========================  ==================  =============================================
stage (client -> server)   key                 value
=========================  ==================  =============================================
1                          c-key, s-key         32 bytes each
2                          positions,           list of int, list of 168-byte ciphertexts,
                           ciphertexts          one per neighbour that advertised
                           commitment           32 bytes, SHA-256 commitment to ``b_u``
3                          masked               ``ceil(D * m / 8)`` bytes: the masked vector,
                                                element ``i`` at stream bits ``i*m .. i*m+m-1``,
                                                least significant bit first
                           masked-with          list of int (neighbours whose shares it took)
4                          b-positions,         list of int, list of 70-byte shares
                           b-shares             (index u32 LE || value 66 bytes LE)
                           s-positions,         the same for mask-key shares
                           s-shares
=========================  ==================  =============================================

A masked-input reply holds nothing else: no weights, no metrics (the weight is inside the
field, and a per-client train loss would be a per-client number the sum is meant to hide).
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ConfigRecord

from fedge.secagg.errors import SecAggError

SECAGG_KEY = "secagg"
#: Context.state record of a client's round in progress (never persisted to disk).
STATE_KEY = "secagg-round"
STAGE = "stage"

__all__ = [
    "SECAGG_KEY",
    "STAGE",
    "STATE_KEY",
    "get_bool",
    "get_bytes",
    "get_bytes_list",
    "get_float",
    "get_int",
    "get_int_list",
    "stage_of",
    "to_record",
]


def _get(record: Mapping[str, object], key: str) -> object:
    if key not in record:
        raise SecAggError(f"secagg message lacks {key!r}")
    return record[key]


def get_int(record: Mapping[str, object], key: str, low: int = 0, high: int = 2**63 - 1) -> int:
    """An int field in ``[low, high]``."""
    value = _get(record, key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SecAggError(f"secagg field {key!r} must be a whole number in {low}..{high}, got {value!r}")
    return value


def get_float(record: Mapping[str, object], key: str) -> float:
    """A finite float field."""
    value = _get(record, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise SecAggError(f"secagg field {key!r} must be a number, got {value!r}")
    return float(value)


def get_bool(record: Mapping[str, object], key: str) -> bool:
    """A bool field."""
    value = _get(record, key)
    if not isinstance(value, bool):
        raise SecAggError(f"secagg field {key!r} must be true or false, got {value!r}")
    return value


def get_bytes(record: Mapping[str, object], key: str, size: int | None = None) -> bytes:
    """A bytes field (of exactly ``size`` bytes when given)."""
    value = _get(record, key)
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        want = f"{size} bytes" if size is not None else "bytes"
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise SecAggError(f"secagg field {key!r} must be {want}, got {got}")
    return value


def get_int_list(record: Mapping[str, object], key: str, high: int) -> list[int]:
    """A list of distinct ints in ``0..high``."""
    value = _get(record, key)
    if not isinstance(value, list) or any(
        isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= high for v in value
    ):
        raise SecAggError(f"secagg field {key!r} must be a list of whole numbers in 0..{high}")
    if len(set(value)) != len(value):
        raise SecAggError(f"secagg field {key!r} repeats a position")
    return list(value)


def get_bytes_list(
    record: Mapping[str, object], key: str, length: int, size: int | None = None
) -> list[bytes]:
    """A list of ``length`` bytes values (each of ``size`` bytes when given)."""
    value = _get(record, key)
    if not isinstance(value, list) or len(value) != length or any(not isinstance(v, bytes) for v in value):
        raise SecAggError(f"secagg field {key!r} must be a list of {length} bytes values")
    if size is not None and any(len(v) != size for v in value):
        raise SecAggError(f"secagg field {key!r} must hold values of {size} bytes")
    return list(value)


def stage_of(record: Mapping[str, object]) -> int:
    """The stage (1..4) a secagg record belongs to."""
    return get_int(record, STAGE, 1, 4)


def to_record(values: Mapping[str, object]) -> ConfigRecord:
    """A ConfigRecord of ``values`` (ints, floats, bools, bytes, lists of one of those)."""
    return ConfigRecord(dict(values))  # type: ignore[arg-type]
