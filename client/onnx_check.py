"""The client's side of the federated int8 check: verify the signed candidate, then score it.

The server sends a candidate manifest (``"candidate": true``), its Ed25519 signature and
the bytes of the two models it lists (``model.fp32.onnx`` and ``model.onnx``). The client
verifies the signature with the public key pinned in its node config
(``node_config["public-key"]``: a path to the run's ``signing.pub``), then the size and
sha256 of every model against the manifest, and only then hands the very bytes it
checked to ONNX Runtime. Without a pinned key, or if anything fails to verify, it loads
nothing and the handler raises, which Flower turns into an error reply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedge.deploy.artifacts import (
    CANDIDATE_FP32_FILE,
    CANDIDATE_MANIFEST,
    CANDIDATE_SIGNATURE,
    MODEL_FILE,
    ArtifactError,
    load_public_key,
    verify_candidate,
)
from fedge.records import (
    ACCURACY_FP32,
    ACCURACY_INT8,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    ONNX_FP32,
    ONNX_INT8,
)

#: node_config key of the pinned public key's path.
PUBLIC_KEY_NODE_CONFIG = "public-key"

# Record key of each model's bytes -> its file name in the candidate manifest, and the
# metric its accuracy is reported under.
_MODELS = ((ONNX_FP32, CANDIDATE_FP32_FILE, ACCURACY_FP32), (ONNX_INT8, MODEL_FILE, ACCURACY_INT8))


def pinned_public_key_path(node_config: Any) -> str:
    """The path in ``node_config["public-key"]``.

    Raises
    ------
    ArtifactError
        If the key is absent or not a non-empty string; the message says how to pin one.
    """
    value = node_config.get(PUBLIC_KEY_NODE_CONFIG) if hasattr(node_config, "get") else None
    if not isinstance(value, str) or not value:
        raise ArtifactError(
            f'no pinned public key: node_config["{PUBLIC_KEY_NODE_CONFIG}"] is {value!r}; start the '
            f'SuperNode with --node-config "{PUBLIC_KEY_NODE_CONFIG}=/path/to/signing.pub" '
            "(the server's key) to take part in the federated int8 check"
        )
    return value


def verified_candidate(record: ConfigRecord, public_key_path: str) -> dict[str, bytes]:
    """The candidate's model bytes by record key, once signature and hashes verified.

    Raises
    ------
    ArtifactError
        If the key cannot be read, a part of the message is missing, the signature does
        not verify with the pinned key, the manifest is not a candidate, or a model's
        size or sha256 differs from the manifest.
    """
    public_key = load_public_key(Path(public_key_path))
    parts: dict[str, bytes] = {}
    for key in (CANDIDATE_MANIFEST, CANDIDATE_SIGNATURE, ONNX_FP32, ONNX_INT8):
        value = record.get(key)
        if not isinstance(value, bytes) or not value:
            raise ArtifactError(
                f"evaluate.onnx message lacks the {key!r} bytes; the server must send a signed candidate"
            )
        parts[key] = value
    verify_candidate(
        parts[CANDIDATE_MANIFEST],
        parts[CANDIDATE_SIGNATURE],
        {name: parts[key] for key, name, _ in _MODELS},
        public_key,
    )
    return {key: parts[key] for key, _, _ in _MODELS}


def score_candidate(models: dict[str, bytes], x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy of each verified model on ``(x, y)`` with ONNX Runtime, by metric name."""
    from fedge.deploy.export import onnx_accuracy

    return {metric: onnx_accuracy(models[key], x, y) for key, _, metric in _MODELS}


def evaluate_candidate(msg: Message, context: Context, x: np.ndarray, y: np.ndarray) -> Message:
    """Verify the server's signed candidate with the pinned key, then score it on ``(x, y)``.

    Parameters
    ----------
    msg : Message
        The ``evaluate.onnx`` message.
    context : Context
        Its ``node_config["public-key"]`` names the pinned public key.
    x, y : numpy.ndarray
        The client's local test data.

    Returns
    -------
    Message
        The reply: ``num-examples`` and both accuracies.

    Raises
    ------
    ArtifactError
        Before any byte is loaded, if the key is not pinned or verification fails.
    """
    record = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    models = verified_candidate(record, pinned_public_key_path(context.node_config))
    accuracies = score_candidate(models, np.asarray(x), np.asarray(y))
    metrics = MetricRecord({NUM_EXAMPLES: len(y), **accuracies})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


__all__ = [
    "PUBLIC_KEY_NODE_CONFIG",
    "evaluate_candidate",
    "pinned_public_key_path",
    "score_candidate",
    "verified_candidate",
]
