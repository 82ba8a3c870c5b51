"""The client's DP clip stage: bound what it sends to the round's ``clip-norm``.

Installed as the ``clip`` stage of :class:`~fedge.client.pipeline.UpdatePipeline`; it acts only
on training messages whose round config carries ``clip-norm`` (``dp = "central"``). It clips
the update *with the error-feedback residual added* (the pipeline's order), to one global L2
norm over every tensor of every record (:func:`fedge.privacy.clip_l2`), so the sensitivity the
server's accountant assumes holds for what leaves the device; the codec's residual then keeps
what the clip and the codec dropped. The server re-clips each decoded update (a codec's
rounding can stretch it a little past the clip).
"""

from __future__ import annotations

import math

from flwr.app import ConfigRecord, Message

from fedge.client.pipeline import StageContext, Updates
from fedge.privacy import clip_l2
from fedge.records import CLIP_BELOW, CLIP_NORM, CONFIG_KEY

__all__ = ["ClipStage"]


def _clip_norm(msg: Message) -> object:
    if not msg.has_content():
        return None
    return msg.content.config_records.get(CONFIG_KEY, ConfigRecord()).get(CLIP_NORM)


class ClipStage:
    """Clip an update to the round's ``clip-norm`` (see the module docstring)."""

    #: Acts only on rounds that ask for it (the pipeline checks :meth:`applies`).
    conditional = True

    def applies(self, msg: Message) -> bool:
        """Whether the round config asks for clipping."""
        return _clip_norm(msg) is not None

    def __call__(self, updates: Updates, stage_ctx: StageContext) -> Updates:
        value = stage_ctx.round_config.get(CLIP_NORM)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value > 0)
        ):
            raise ValueError(f"round config {CLIP_NORM!r} must be a number > 0, got {value!r}")
        clipped, norm = clip_l2(updates, float(value))
        # Adaptive clipping's bit (Andrew et al. 2021): was the update within the clip?
        stage_ctx.metrics[CLIP_BELOW] = int(norm <= float(value))
        return clipped
