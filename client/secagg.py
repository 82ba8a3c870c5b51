"""The client's SecAgg+ stage: the last step of the update pipeline, and the three key stages.

:class:`SecAggStage` is installed as the ``mask`` stage of :class:`~fedge.client.pipeline.UpdatePipeline`
and acts only on messages that carry a ``secagg`` record (:mod:`fedge.secagg_wire`):

- ``advertise-keys``, ``share-keys`` and ``unmask`` are answered here, without training
  (:meth:`SecAggStage.control`);
- ``masked-input`` is the training message: the pipeline trains, takes the update, adds the
  residual, clips, and then *encodes with the shared-scale field encoding*
  (:class:`fedge.secagg.encoding.FieldEncoding`) instead of the codec; the noise stage may add
  to the levels; this stage masks them (:meth:`SecAggStage.masked_reply`).

The round's secrets (key pairs, self-mask seed, the shares held for neighbours) live in the
client's ``Context.state`` under :data:`fedge.secagg_wire.STATE_KEY` between the four
messages, and are deleted when the round ends, fails, a new one starts, or any other message
arrives (:meth:`SecAggStage.forget_stale`); fedge's simulation never writes that record to
disk (:mod:`fedge.simulation.client_state`). Secret bytes come from
the operating system (:class:`fedge.rng.OsSecretSource`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedge import secagg_wire as wire
from fedge.rng import default_secret_source
from fedge.secagg import SecAggError, crypto
from fedge.secagg.encoding import FieldEncoding
from fedge.secagg.protocol import (
    STAGE_ADVERTISE,
    STAGE_MASKED_INPUT,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    ClientRound,
    RoundParams,
    ciphertext_bytes,
)

log = logging.getLogger("fedge.client")

__all__ = ["SecAggStage"]


def secagg_record(msg: Message) -> ConfigRecord | None:
    """The message's ``secagg`` record, if it is a SecAgg+ message."""
    if not msg.has_content():
        return None
    return msg.content.config_records.get(wire.SECAGG_KEY)


class SecAggStage:
    """SecAgg+ on the client (see the module docstring).

    Parameters
    ----------
    random_bytes : callable, optional
        Secret source; default the operating system's CSPRNG. Tests pass a seeded one.
    """

    #: Acts only on messages with a ``secagg`` record (the pipeline checks :meth:`applies`).
    conditional = True

    def __init__(self, random_bytes: Callable[[int], bytes] | None = None) -> None:
        self._random_bytes = random_bytes or default_secret_source().random_bytes

    def applies(self, msg: Message) -> bool:
        """Whether ``msg`` is a SecAgg+ message."""
        return secagg_record(msg) is not None

    def forget_stale(self, msg: Message, context: Context) -> None:
        """Delete an unfinished round's secrets when a message of anything else arrives.

        A round that aborted before the unmask stage, or dropped this client after its
        masked input, never sends it another secure message: its keys, seed and held shares
        go with the next message (evaluation, a plain round), not with the next secure round.
        """
        if not self.applies(msg):
            self._forget(context)

    # -- state ------------------------------------------------------------------------------
    def _load(self, context: Context, server_round: int) -> ClientRound:
        record = context.state.config_records.get(wire.STATE_KEY)
        if record is None:
            raise SecAggError(f"no secagg round in progress for round {server_round}; this client drops it")
        client = ClientRound.restore(record, self._random_bytes)
        if client.params.server_round != server_round:
            raise SecAggError(
                f"the secagg round in progress is round {client.params.server_round}, not {server_round}"
            )
        return client

    @staticmethod
    def _save(context: Context, client: ClientRound) -> None:
        context.state[wire.STATE_KEY] = wire.to_record(client.export())

    @staticmethod
    def _forget(context: Context) -> None:
        if wire.STATE_KEY in context.state:
            del context.state[wire.STATE_KEY]

    # -- stages 1, 2, 4 -----------------------------------------------------------------------
    def control(self, msg: Message, context: Context) -> Message | None:
        """Answer a key stage; ``None`` for the masked-input stage (the pipeline's)."""
        record = secagg_record(msg)
        assert record is not None
        stage = wire.stage_of(record)
        if stage == STAGE_MASKED_INPUT:
            return None
        server_round = wire.get_int(record, "server-round", 0, 2**32 - 1)
        try:
            if stage == STAGE_ADVERTISE:
                self._forget(context)  # a new round: whatever an unfinished one left goes
                params = RoundParams(
                    server_round,
                    wire.get_int(record, "clients", 2, 2**16 - 1),
                    wire.get_int(record, "degree", 1, 2**16 - 1),
                    wire.get_int(record, "threshold", 1, 2**16 - 1),
                    wire.get_int(record, "field-bits", 1, crypto.MAX_PRG_BITS),
                    wire.get_int(record, "vector-length", 1, 2**40 - 1),
                )
                client = ClientRound(
                    params, wire.get_int(record, "position", 0, 2**16 - 1), self._random_bytes
                )
                c_pk, s_pk = client.advertise()
                out: dict[str, Any] = {"c-key": c_pk, "s-key": s_pk}
            elif stage == STAGE_SHARE_KEYS:
                client = self._load(context, server_round)
                high = client.params.num_clients - 1
                positions = wire.get_int_list(record, "positions", high)
                c_keys = wire.get_bytes_list(record, "c-keys", len(positions), crypto.KEY_BYTES)
                s_keys = wire.get_bytes_list(record, "s-keys", len(positions), crypto.KEY_BYTES)
                shares = client.share_keys(
                    dict(zip(positions, zip(c_keys, s_keys, strict=True), strict=True))
                )
                order = sorted(shares)
                out = {
                    "positions": order,
                    "ciphertexts": [shares[v] for v in order],
                    "commitment": client.self_mask_commitment,
                }
            else:
                client = self._load(context, server_round)
                high = client.params.num_clients - 1
                reply = client.unmask(
                    wire.get_int_list(record, "survivors", high), wire.get_int_list(record, "dropped", high)
                )
                b_pos, s_pos = sorted(reply.self_mask_shares), sorted(reply.key_shares)
                out = {
                    "b-positions": b_pos,
                    "b-shares": [reply.self_mask_shares[v] for v in b_pos],
                    "s-positions": s_pos,
                    "s-shares": [reply.key_shares[v] for v in s_pos],
                }
        except SecAggError:
            self._forget(context)
            raise
        if stage == STAGE_UNMASK:
            self._forget(context)  # the round is over for this client
        else:
            self._save(context, client)
        return Message(
            RecordDict({wire.SECAGG_KEY: wire.to_record({wire.STAGE: stage, **out})}), reply_to=msg
        )

    # -- stage 3 ---------------------------------------------------------------------------------
    def encoding(self, msg: Message) -> FieldEncoding:
        """The round's field encoding, from the masked-input message."""
        record = secagg_record(msg)
        assert record is not None
        return FieldEncoding(
            wire.get_int(record, "level-bits", 1, 8),
            wire.get_bool(record, "ternary"),
            wire.get_bool(record, "rotate"),
            wire.get_float(record, "clip"),
            wire.get_int(record, "max-weight", 1, 2**53 - 1),
        )

    def masked_reply(self, msg: Message, context: Context, levels: np.ndarray) -> RecordDict:
        """Mask ``levels`` (the whole input vector) and build the reply's content."""
        record = secagg_record(msg)
        assert record is not None
        server_round = wire.get_int(record, "server-round", 0, 2**32 - 1)
        try:
            client = self._load(context, server_round)
            high = client.params.num_clients - 1
            positions = wire.get_int_list(record, "positions", high)
            ciphertexts = wire.get_bytes_list(record, "ciphertexts", len(positions), ciphertext_bytes())
            packed, masked_with = client.masked_input(dict(zip(positions, ciphertexts, strict=True)), levels)
        except SecAggError:
            self._forget(context)
            raise
        rejected = sorted(set(positions) - set(masked_with))
        if rejected:
            log.warning(
                "secagg round %d: refused the shares of positions %s (failed authentication); "
                "they count as dropped",
                server_round,
                rejected,
            )
        self._save(context, client)
        return RecordDict(
            {
                wire.SECAGG_KEY: wire.to_record(
                    {wire.STAGE: STAGE_MASKED_INPUT, "masked": packed, "masked-with": list(masked_with)}
                )
            }
        )
