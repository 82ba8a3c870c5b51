"""fedge's client mods (Flower ``Mod``: ``(Message, Context, call_next) -> Message``).

* :func:`fp16_downlink_mod` widens every float16 tensor the server sent (an fp16
  downlink) back to float32 before any handler sees it.
* :data:`compression_mod` is the update pipeline (:mod:`fedge.client.pipeline`): a training
  reply's weights become the compressed update (``local - global``), with error feedback
  when the round asks for it, and masked with SecAgg+ (:mod:`fedge.client.secagg`) in a
  secure round.

Both read what to do from the message itself (its arrays' dtypes, the round's
``ConfigRecord``), so the server decides and a message without those keys passes through
unchanged: the mods are always installed.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedge.client.pipeline import UpdatePipeline, client_key, codec_seed
from fedge.client.privacy import ClipStage
from fedge.client.secagg import SecAggStage
from fedge.records import with_content
from fedge.update_records import has_fp16, to_fp32


def fp16_downlink_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Widen the float16 tensors of every ArrayRecord (an fp16 downlink), then call the handler."""
    if not msg.has_content():
        return call_next(msg, context)
    records = msg.content.array_records
    narrow = [key for key, record in records.items() if has_fp16(record)]
    if not narrow:
        return call_next(msg, context)
    content = RecordDict({**dict(msg.content), **{key: to_fp32(records[key]) for key in narrow}})
    # Same metadata as the received message, so the handler's reply points back to it.
    return call_next(with_content(msg, content), context)


#: The update pipeline: compression and error feedback, and in the rounds that ask for them
#: DP clipping (``clip-norm``) and SecAgg+ masking (no noise stage yet).
compression_mod = UpdatePipeline(clip=ClipStage(), mask=SecAggStage())

__all__ = ["client_key", "codec_seed", "compression_mod", "fp16_downlink_mod"]
