"""Update compression: pure math on float32 arrays (no Flower, no I/O).

``parse_codec`` turns config text into a :class:`CodecSpec`; :func:`encode` and :func:`decode`
convert one tensor's update to and from a versioned payload (layout in
:mod:`fedge.compression.codec`); :func:`with_error_feedback` carries what the codec lost into
the next round. The codecs: ``qsgd:BITS`` and ``ternary`` (stochastic, unbiased,
:mod:`fedge.compression.qsgd`), their ``rotate+`` forms (randomized Hadamard rotation first,
:mod:`fedge.compression.hadamard`), ``topk:FRACTION`` (:mod:`fedge.compression.topk`) and
``stc:FRACTION`` (sparse ternary with Rice-coded positions, :mod:`fedge.compression.stc`).
Secure aggregation: see :mod:`fedge.compression.qsgd` for the level range, the modulus
``2**(num_bits + ceil(log2(N)))`` and the shared-scale helpers, and :func:`secagg_compatible`.
"""

from fedge.compression.codec import decode, encode, max_payload_bytes, payload_bytes, with_error_feedback
from fedge.compression.qsgd import (
    dequantize_level_sum,
    quantize_levels,
    secagg_sum_bits,
)
from fedge.compression.spec import (
    CodecError,
    CodecSpec,
    error_feedback_compatible,
    parse_codec,
    require_secagg_compatible,
    secagg_compatible,
)

__all__ = [
    "CodecError",
    "CodecSpec",
    "decode",
    "dequantize_level_sum",
    "encode",
    "error_feedback_compatible",
    "max_payload_bytes",
    "parse_codec",
    "payload_bytes",
    "quantize_levels",
    "require_secagg_compatible",
    "secagg_compatible",
    "secagg_sum_bits",
    "with_error_feedback",
]
