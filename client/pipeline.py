"""The client's update pipeline: what happens to a trained model before it is sent, in one order.

::

    train                      (the ClientApp's handler)
    update   = local - global  (per float32 tensor of every ArrayRecord the server sent)
    + error-feedback residual  (when the round asks for it)
    clip                       (a stage: DP clipping, later) - bounds what is sent, residual included
    encode                     (the round's codec; the new residual is what the codec dropped)
    noise                      (a stage on the encoded update: distributed DP's integer noise, later)
    mask                       (a stage on the encoded update: secure aggregation, later)

:data:`STAGES` declares the order and :class:`UpdatePipeline` is the one place that runs
it, as one Flower mod around the handler. Clipping sits after the residual is added, so
the residual cannot push the sent norm past the clip; masking is last, so no codec ever
sees (and destroys) a mask. Ordinary Flower mods given to
:func:`fedge.client.app.make_client_app` wrap the whole pipeline: they see the message as
received and the reply as sent.

With no codec in the round config and no stage installed, the reply's plain weights pass
through unchanged, as from any Flower client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedge.client.state import load_residual, save_residual
from fedge.compression import CodecError, decode, encode, parse_codec
from fedge.records import (
    ARRAYS_KEY,
    CODEC,
    CONFIG_KEY,
    ERROR_FEEDBACK,
    METRICS_KEY,
    NUM_EXAMPLES,
    ROTATION_SEED,
    SEED,
    SERVER_ROUND,
    arrays_to_numpy,
)
from fedge.rng import Stream, stream_seed_sequence
from fedge.secagg.encoding import FieldEncoding
from fedge.secagg.encoding import layout as field_layout
from fedge.update_records import CODEC_STYPE, has_codec_payloads, is_float32, tensor_rotation_seed, to_fp32

#: The pipeline's stages, in the order they run.
STAGES: tuple[str, ...] = ("train", "update", "error-feedback", "clip", "encode", "noise", "mask")
# Codec of an update that a stage needs when the round names none: exact float32.
_EXACT = "none"

# record key -> tensor name -> values.
Updates = dict[str, dict[str, np.ndarray]]


@dataclass(frozen=True)
class StageContext:
    """What a stage learns about the round it works on."""

    server_round: int
    round_config: ConfigRecord
    context: Context
    #: Metrics a stage adds to the reply (the clip stage's adaptive-clipping bit).
    metrics: dict[str, int | float] = field(default_factory=dict)


#: ``(updates, stage_context) -> updates``: float32 updates before encoding (``clip``).
UpdateStage = Callable[[Updates, StageContext], Updates]
#: ``(records, stage_context) -> records``: encoded ArrayRecords by key (``noise``, ``mask``).
EncodedStage = Callable[[dict[str, ArrayRecord], StageContext], dict[str, ArrayRecord]]


class SecureStage(Protocol):
    """A ``mask`` stage that runs a secure-aggregation protocol (:class:`fedge.client.secagg.SecAggStage`).

    With ``conditional = True`` it acts only on the messages it :meth:`applies` to; their
    key-exchange stages it answers itself (:meth:`control`), and on the training message
    the pipeline encodes with the round's :meth:`encoding` (shared-scale levels instead of
    the codec), runs ``noise`` on the levels, and hands the whole input vector to
    :meth:`masked_reply`, whose content is the reply: nothing of the plain update leaves.
    """

    conditional: bool

    def applies(self, msg: Message) -> bool: ...

    def control(self, msg: Message, context: Context) -> Message | None: ...

    def encoding(self, msg: Message) -> FieldEncoding: ...

    def masked_reply(self, msg: Message, context: Context, levels: np.ndarray) -> RecordDict: ...


def codec_seed(seed: int, server_round: int, client_key: int) -> np.random.SeedSequence:
    """Seed of a client's stochastic rounding in a round (:data:`fedge.rng.Stream.CODEC_ROUNDING`)."""
    return stream_seed_sequence(seed, Stream.CODEC_ROUNDING, server_round, client_key)


def client_key(context: Context) -> int:
    """The partition id where there is one (stable across engines and restarts), else the node id."""
    pid = context.node_config.get("partition-id")
    if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0:
        return pid
    if isinstance(pid, str) and pid.isdigit():
        return int(pid)
    return int(context.node_id)


def _int(record: ConfigRecord, key: str, default: int | None = None) -> int:
    value = record.get(key, default)
    if value is None:
        raise ValueError(f"round config lacks {key!r}; the server must send it (upgrade the server)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"round config {key!r} must be a whole number >= 0, got {value!r}")
    return value


def _flat(key: str, name: str) -> str:
    # Residuals of the model keep their tensor names (the state file's format since v1);
    # another record's tensors are prefixed with the record's key.
    return name if key == ARRAYS_KEY else f"{key}/{name}"


def _active(stage: object, msg: Message) -> bool:
    """Whether ``stage`` runs on ``msg``: installed, and unconditional or applying to it."""
    if stage is None:
        return False
    if not getattr(stage, "conditional", False):
        return True
    return bool(stage.applies(msg))  # type: ignore[attr-defined]


class UpdatePipeline:
    """The update pipeline as one Flower mod (``(msg, context, call_next) -> reply``).

    Parameters
    ----------
    clip : UpdateStage, optional
        Runs on the float32 updates (residual included) before encoding.
    noise : EncodedStage, optional
        Runs on the encoded records.
    mask : EncodedStage, optional
        Runs last, on what ``noise`` returned.

    Notes
    -----
    Acts on training messages only; evaluation passes through. A reply that is an error
    passes through, and the residual is then unchanged; so does a reply whose handler
    already encoded its update. Bad round settings raise ``ValueError`` / ``CodecError``,
    which the ClientApp turns into an error reply that the server logs and drops.
    """

    def __init__(
        self,
        clip: UpdateStage | None = None,
        noise: EncodedStage | None = None,
        mask: EncodedStage | None = None,
    ) -> None:
        self.clip = clip
        self.noise = noise
        self.mask = mask

    @property
    def has_stages(self) -> bool:
        """Whether any optional stage is installed."""
        return any(
            stage is not None and not getattr(stage, "conditional", False)
            for stage in (self.clip, self.noise, self.mask)
        )

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        forget = getattr(self.mask, "forget_stale", None)
        if forget is not None:
            forget(msg, context)  # an unfinished secure round's secrets go now
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        secure: SecureStage | None = None
        mask = self.mask
        if mask is not None and getattr(mask, "conditional", False):
            # A secure-aggregation stage acts only on the messages of a secure round.
            if mask.applies(msg):  # type: ignore[attr-defined]
                secure = mask  # type: ignore[assignment]
                assert secure is not None
                control = secure.control(msg, context)
                if control is not None:
                    return control  # a key stage: no training
            else:
                mask = None
        clip = self.clip if _active(self.clip, msg) else None
        noise = self.noise if _active(self.noise, msg) else None
        has_stages = any(stage is not None for stage in (clip, noise, mask))
        round_cfg = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        codec_text = round_cfg.get(CODEC)
        if codec_text is None and not has_stages:
            return call_next(msg, context)
        if codec_text is None:
            codec_text = _EXACT
        if not isinstance(codec_text, str):
            raise CodecError(
                f"round config {CODEC!r} must be a codec text such as 'qsgd:4', got {codec_text!r}"
            )
        spec = parse_codec(codec_text)
        error_feedback = round_cfg.get(ERROR_FEEDBACK, False)
        if not isinstance(error_feedback, bool):
            raise ValueError(f"round config {ERROR_FEEDBACK!r} must be true or false, got {error_feedback!r}")
        stage_ctx = StageContext(_int(round_cfg, SERVER_ROUND), round_cfg, context)
        rotation_seed = _int(round_cfg, ROTATION_SEED, 0)
        seed = _int(round_cfg, SEED, 0)
        # What the client started from, as the handler saw it (widened by fp16_downlink_mod).
        references = {
            key: arrays_to_numpy(to_fp32(record)) for key, record in msg.content.array_records.items()
        }

        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        records = reply.content.array_records
        if any(has_codec_payloads(record) for record in records.values()):
            if has_stages:
                # Clipping, noise and masking must see every update: never bypassed.
                raise CodecError(
                    "the handler encoded its update itself, bypassing the clip/noise/mask stages"
                )
            return reply  # the handler encoded its update itself
        # 1. update = local - global, for every record the server sent and the reply returns
        updates: Updates = {}
        passthrough: dict[str, dict[str, np.ndarray]] = {}
        for key, record in records.items():
            if key not in references:
                if has_stages:
                    raise CodecError(
                        f"the reply carries a record {key!r} the server did not send; with clip/noise/mask "
                        "stages every record sent must be an update of one the server sent"
                    )
                continue  # a record of the client's own: sent as it is
            local = arrays_to_numpy(record)
            reference = references[key]
            if set(local) != set(reference):
                missing, extra = sorted(set(reference) - set(local)), sorted(set(local) - set(reference))
                raise CodecError(
                    f"trained record {key!r} names other tensors than the received one "
                    f"(missing {missing}, unexpected {extra})"
                )
            updates[key], passthrough[key] = {}, {}
            for name, ref in reference.items():
                values = np.asarray(local[name])
                if values.shape != ref.shape:
                    raise CodecError(f"tensor {name!r} is {values.shape} after training, {ref.shape} before")
                if is_float32(ref):
                    updates[key][name] = values.astype(np.float32) - ref
                else:
                    passthrough[key][name] = values
        # 2. + residual
        residual = None
        if error_feedback:
            flat_ref = {_flat(k, n): v for k, tensors in updates.items() for n, v in tensors.items()}
            residual = load_residual(context, flat_ref)
            updates = {
                k: {n: u + residual[_flat(k, n)] for n, u in tensors.items()}
                for k, tensors in updates.items()
            }
        # 3. clip
        if clip is not None:
            updates = clip(updates, stage_ctx)
        # 4. encode (the residual keeps what the codec dropped from the clipped update)
        rng = np.random.default_rng(codec_seed(seed, stage_ctx.server_round, client_key(context)))
        if secure is not None:
            content = self._secure_encode(
                secure, msg, reply, context, references, updates, residual, rng, rotation_seed, stage_ctx
            )
            return Message(content, reply_to=msg)
        encoded: dict[str, ArrayRecord] = {}
        new_residual: dict[str, np.ndarray] = {}
        index = 0
        for key, reference in references.items():
            if key not in updates:
                continue
            arrays: dict[str, Array] = {}
            for name, ref in reference.items():
                # Tensor i of the round's message rotates with seed i, whatever its dtype.
                tensor_seed = tensor_rotation_seed(rotation_seed, index)
                index += 1
                if name in passthrough[key]:
                    arrays[name] = Array(np.ascontiguousarray(passthrough[key][name]))
                    continue
                update = np.asarray(updates[key][name], dtype=np.float32)
                payload = encode(update, spec, rng, rotation_seed=tensor_seed)
                if residual is not None:
                    new_residual[_flat(key, name)] = update - decode(payload, update.shape)
                arrays[name] = Array(dtype="float32", shape=tuple(ref.shape), stype=CODEC_STYPE, data=payload)
            encoded[key] = ArrayRecord(arrays)
        # 5. noise, 6. mask
        if noise is not None:
            encoded = noise(encoded, stage_ctx)
        if mask is not None:
            encoded = mask(encoded, stage_ctx)
        if residual is not None:
            save_residual(context, new_residual)
        content = RecordDict({**dict(reply.content), **encoded})
        if stage_ctx.metrics:
            metrics = reply.content.metric_records.get(METRICS_KEY, MetricRecord())
            content[METRICS_KEY] = MetricRecord({**dict(metrics), **stage_ctx.metrics})
        return Message(content, reply_to=msg)

    def _secure_encode(
        self,
        secure: SecureStage,
        msg: Message,
        reply: Message,
        context: Context,
        references: dict[str, dict[str, np.ndarray]],
        updates: Updates,
        residual: dict[str, np.ndarray] | None,
        rng: np.random.Generator,
        rotation_seed: int,
        stage_ctx: StageContext,
    ) -> RecordDict:
        """Encode with the round's shared-scale field encoding, add noise, mask (secure rounds)."""
        encoding = secure.encoding(msg)
        if set(updates) != set(references):
            raise CodecError(
                f"a secure round sums every record the server sent ({sorted(references)}); "
                f"the reply returned {sorted(updates)}"
            )
        metrics = reply.content.metric_records.get(METRICS_KEY)
        weight = metrics.get(NUM_EXAMPLES) if metrics is not None else None
        if isinstance(weight, float) and weight.is_integer():
            weight = int(weight)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise CodecError(
                f"the training reply's {NUM_EXAMPLES!r} must be a whole number >= 1, got {weight!r}"
            )
        ordered = {key: references[key] for key in sorted(references)}
        seeds = [tensor_rotation_seed(rotation_seed, i) for i in range(sum(len(t) for t in ordered.values()))]
        slots, _ = field_layout(encoding, ordered, seeds)
        encoded: dict[str, ArrayRecord] = {}
        new_residual: dict[str, np.ndarray] = {}
        arrays: dict[str, dict[str, Array]] = {key: {} for key in ordered}
        for slot in slots:
            update = np.asarray(updates[slot.record][slot.name], dtype=np.float32)
            levels = encoding.encode_tensor(update, weight, rng, slot.rotation_seed)
            if residual is not None:
                sent = encoding.decode_tensor(
                    levels, 1, slot.size, slot.rotation_seed
                ) / encoding.check_weight(weight)
                new_residual[_flat(slot.record, slot.name)] = update - sent.reshape(update.shape).astype(
                    np.float32
                )
            arrays[slot.record][slot.name] = Array(levels)
        encoded = {key: ArrayRecord(tensors) for key, tensors in arrays.items() if tensors}
        # 5. noise (on the levels), 6. mask
        if self.noise is not None:
            encoded = self.noise(encoded, stage_ctx)
        parts = [np.asarray(encoded[slot.record][slot.name].numpy()).reshape(-1) for slot in slots]
        parts.append(encoding.encode_weight(weight))
        vector = np.concatenate(parts)  # the levels' own narrow dtype (uint8); masking widens once
        content = secure.masked_reply(msg, context, vector)
        if residual is not None:
            save_residual(context, new_residual)
        return content


__all__ = [
    "STAGES",
    "EncodedStage",
    "StageContext",
    "UpdatePipeline",
    "UpdateStage",
    "client_key",
    "codec_seed",
]
