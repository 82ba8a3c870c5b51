"""ClientApps for the SecAgg+ round tests: fedge's real client pipeline around a seeded handler.

Every app here is built as :func:`fedge.client.app.make_client_app` builds fedge's own
(``[*mods, fp16_downlink_mod, compression_mod]``, so the SecAgg+ stage of the update
pipeline answers the key stages and masks the update), but trains with
:func:`seamapps.random_train`: weights = received + ``random_step(pid, round, name)``,
``num-examples = 5 + pid``, so a test can recompute every client's quantized levels.

The ``*_app`` names with an attack run one malicious Flower mod on partition
:data:`MALICIOUS` only; the ``real_*`` apps put the same mod around fedge's real ClientApp
(``make_client_app(mods=[...])``, real training on the run's dataset).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from seamapps import random_train

from fedge import secagg_wire as wire
from fedge.client.app import make_client_app
from fedge.client.mods import compression_mod, fp16_downlink_mod
from fedge.secagg import crypto

#: The partition whose client misbehaves in the attack apps.
MALICIOUS = 0


def _pipeline_app(*mods: Mod) -> ClientApp:
    app = ClientApp(mods=[*mods, fp16_downlink_mod, compression_mod])
    app.train()(random_train)
    return app


def _stage(msg: Message) -> int | None:
    if not msg.has_content() or wire.SECAGG_KEY not in msg.content.config_records:
        return None
    return int(msg.content.config_records[wire.SECAGG_KEY][wire.STAGE])  # type: ignore[arg-type]


def _rewrite(reply: Message, msg: Message, change: Callable[[dict[str, object]], None]) -> Message:
    """``reply`` with its secagg record's values changed in place by ``change``."""
    values = dict(reply.content.config_records[wire.SECAGG_KEY])
    change(values)
    return Message(RecordDict({wire.SECAGG_KEY: wire.to_record(values)}), reply_to=msg)


def attack(stage: int, change: Callable[[Message, Message], Message]) -> Mod:
    """A mod that replaces the ``stage`` reply of partition :data:`MALICIOUS` by ``change(reply, msg)``."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) != MALICIOUS or _stage(msg) != stage or reply.has_error():
            return reply
        return change(reply, msg)

    return mod


def _flip_ciphertext(reply: Message, msg: Message) -> Message:
    def change(values: dict[str, object]) -> None:
        cts = list(values["ciphertexts"])  # type: ignore[call-overload]
        first = bytearray(cts[0])
        first[40] ^= 0x01  # inside the AES-GCM body: the receiver's tag check fails
        values["ciphertexts"] = [bytes(first), *cts[1:]]

    return _rewrite(reply, msg, change)


def _short_masked(reply: Message, msg: Message) -> Message:
    return _rewrite(reply, msg, lambda v: v.__setitem__("masked", bytes(v["masked"])[:-1]))  # type: ignore[arg-type]


def _wrong_stage(reply: Message, msg: Message) -> Message:
    return _rewrite(reply, msg, lambda v: v.__setitem__(wire.STAGE, 3))


def _extra_record(reply: Message, msg: Message) -> Message:
    content = RecordDict(
        {
            **dict(reply.content),
            "metrics": MetricRecord({"num-examples": 5, "train-loss": 0.25}),
            "leak": ConfigRecord({"note": "per-client"}),
        }
    )
    return Message(content, reply_to=msg)


def _small_order_key(reply: Message, msg: Message) -> Message:
    return _rewrite(reply, msg, lambda v: v.__setitem__("c-key", crypto._SMALL_ORDER_POINTS[0]))


def _short_key(reply: Message, msg: Message) -> Message:
    return _rewrite(reply, msg, lambda v: v.__setitem__("c-key", bytes(v["c-key"])[:31]))  # type: ignore[arg-type]


def _no_commitment(reply: Message, msg: Message) -> Message:
    return _rewrite(reply, msg, lambda v: v.pop("commitment"))


def _error_reply(reply: Message, msg: Message) -> Message:
    raise RuntimeError("simulated client failure in the share-keys stage")


ATTACKS: dict[str, Mod] = {
    "tampered-ciphertext": attack(2, _flip_ciphertext),
    "short-masked-vector": attack(3, _short_masked),
    "wrong-stage": attack(2, _wrong_stage),
    "extra-records": attack(3, _extra_record),
    "small-order-key": attack(1, _small_order_key),
    "error-reply": attack(2, _error_reply),
    "short-key": attack(1, _short_key),
    "no-commitment": attack(2, _no_commitment),
}

honest_app = _pipeline_app()
tampered_ciphertext_app = _pipeline_app(ATTACKS["tampered-ciphertext"])
short_masked_vector_app = _pipeline_app(ATTACKS["short-masked-vector"])
wrong_stage_app = _pipeline_app(ATTACKS["wrong-stage"])
extra_records_app = _pipeline_app(ATTACKS["extra-records"])
small_order_key_app = _pipeline_app(ATTACKS["small-order-key"])
error_reply_app = _pipeline_app(ATTACKS["error-reply"])
short_key_app = _pipeline_app(ATTACKS["short-key"])
no_commitment_app = _pipeline_app(ATTACKS["no-commitment"])

# fedge's real ClientApp (real training) with a malicious mod on one partition.
real_tampered_ciphertext_app = make_client_app(mods=[ATTACKS["tampered-ciphertext"]])
