"""Record keys and conversions shared by the server and the client (the in-record wire format).

Every key that crosses the wire is a module constant here, in Flower's kebab casing.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto

# RecordDict keys.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

# MetricRecord keys of replies.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"

# The federated check of an int8 candidate (message type "evaluate.onnx").
ONNX_ACTION = "onnx"
ONNX_FP32 = "model-fp32-onnx"
ONNX_INT8 = "model-int8-onnx"
ACCURACY_FP32 = "accuracy-fp32"
ACCURACY_INT8 = "accuracy-int8"

# ConfigRecord keys of a round's instructions (the server's config travels with the model,
# so a client needs no copy of the server's settings).
SERVER_ROUND = "server-round"
LR = "lr"
MOMENTUM = "momentum"
LOCAL_EPOCHS = "local-epochs"
# The most optimizer steps of a round (0: no cap) and the per-batch gradient-norm clip
# (0: off); RunConfig.train_settings gives every training key's resolved value.
LOCAL_STEPS = "local-steps"
GRAD_CLIP_NORM = "grad-clip-norm"
BATCH_SIZE = "batch-size"
PROXIMAL_MU = "proximal-mu"
SEED = "seed"
# What a client needs to load its data and build the model (RunConfig.client_settings):
# sent with every message, so clients never parse the server's run config.
DATASET = "dataset"
PARTITION = "partition"
NUM_PARTITIONS = "num-partitions"
DATA_SEED = "data-seed"
MODEL = "model"
LOCAL_TEST_FRACTION = "local-test-fraction"
# Update compression (fedge.update_records): the codec text (fedge.compression.parse_codec),
# whether the client keeps an error-feedback residual, and the round's shared rotation seed.
CODEC = "codec"
ERROR_FEEDBACK = "error-feedback"
ROTATION_SEED = "rotation-seed"
# Differential privacy: the L2 bound of a client's update (dp = central).
CLIP_NORM = "clip-norm"
# Adaptive clipping: a client's bit, 1 when its update (residual included) was within the clip.
CLIP_BELOW = "clip-below"
# On-device DP-SGD (Opacus): sent with every training message when dp-sgd = true.
DP_SGD_NOISE_MULTIPLIER = "dp-sgd-noise-multiplier"
DP_SGD_MAX_GRAD_NORM = "dp-sgd-max-grad-norm"
DP_SGD_TARGET_EPSILON = "dp-sgd-target-epsilon"
DP_SGD_DELTA = "dp-sgd-delta"
# What a DP-SGD client reports: its device's total epsilon, from its privacy ledger (every
# DP-SGD call it ever recorded, composed with Opacus's RDP accountant, at the delta sent).
DP_SGD_EPSILON = "dp-sgd-epsilon"


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Pack named numpy arrays into an :class:`ArrayRecord`, keeping their order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def model_to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """Pack a model's ``state_dict`` into an :class:`ArrayRecord` (a copy, detached)."""
    return numpy_to_arrays({k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()})


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an :class:`ArrayRecord` into named numpy arrays."""
    return {k: v.numpy() for k, v in arrays.items()}


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Copy ``arrays`` into ``model`` in place (strict: names and shapes must match)."""
    state = {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in arrays.items()}
    model.load_state_dict(state, strict=True)


def with_content(message: Message, content: RecordDict) -> Message:
    """``message`` with other content and the same metadata (sender, ids, reply-to).

    Flower's typed overloads do not list ``metadata=``, which its constructor accepts for
    exactly this.
    """
    return Message(content, metadata=message.metadata)  # type: ignore[call-overload]


def payload_bytes(content: RecordDict) -> int:
    """Size in bytes of ``content`` as Flower serializes it on the wire (protobuf)."""
    return int(recorddict_to_proto(content).ByteSize())
