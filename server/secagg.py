"""SecAgg+ as a transport of the round loop: four exchanges, and only the sum comes back.

:class:`SecAggTransport` runs a training round's messages through the SecAgg+ stages of
:mod:`fedge.secagg.protocol` (advertise keys, share keys, masked input, unmask), then decodes
the unmasked level sum with the round's field encoding (:mod:`fedge.secagg.encoding`) into
one :class:`~fedge.aggregation.Aggregate`: the weighted sum of the survivors' quantized
updates and their total weight. The loop takes the mean of it, exactly as of a plain round,
so every linear strategy (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad) runs on it
unchanged; per-client strategies are refused (the loop and the config say why).

Federated evaluation and the int8 check are not secret sums: they go through a plain
exchange (their replies are metrics, not updates).

Each of the four exchanges waits up to ``round-timeout-s``. Whatever a client sends is
parsed with type and size checks (:mod:`fedge.secagg_wire`) and then by
:class:`~fedge.secagg.protocol.ServerRound`; a reply that fails, an error reply, a second
reply from one node, or none at all, drops that client from the round with a logged reason,
and the round goes on while every needed secret keeps ``t`` holders. Otherwise the round
aborts before the unmask stage when it can (nothing is revealed), the loop keeps the previous
model, and the next round samples a fresh cohort with fresh keys.

The graph positions are a uniformly random permutation of the cohort drawn from the
operating system (the failure bounds of :func:`fedge.secagg.find_graph_parameters` assume
positions independent of who drops or colludes). ``secagg-drop-fraction`` (simulations only)
makes a seeded share of the cohort vanish after ``secagg-drop-stage``.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedge import secagg_wire as wire
from fedge.aggregation import Aggregate, Dropped
from fedge.config import RunConfig
from fedge.records import ROTATION_SEED, arrays_to_numpy, payload_bytes
from fedge.rng import Stream, stream_rng
from fedge.secagg import SecAggError, crypto, find_graph_parameters, shamir
from fedge.secagg.encoding import FieldEncoding, layout
from fedge.secagg.protocol import (
    STAGE_ADVERTISE,
    STAGE_MASKED_INPUT,
    STAGE_NAMES,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    RoundParams,
    SecAggAbortError,
    ServerRound,
    UnmaskReply,
    ciphertext_bytes,
)
from fedge.server.transport import TRAIN, Exchange, PlainTransport, RoundContext, federation_is_fixed
from fedge.update_records import tensor_rotation_seed

log = logging.getLogger("fedge.server")

__all__ = ["SecAggTransport"]

_DROP_STAGE = {STAGE_NAMES[s]: s for s in (STAGE_ADVERTISE, STAGE_SHARE_KEYS, STAGE_MASKED_INPUT)}


class SecAggTransport:
    """Training rounds through SecAgg+; evaluation and int8 checks plain.

    Parameters
    ----------
    cfg : RunConfig
        ``secagg-*`` keys, ``compression``, ``seed``.
    max_examples : int
        ``W``, the weight cap (the loop's ``max-examples-per-client``).
    """

    per_client = False

    def __init__(self, cfg: RunConfig, max_examples: int) -> None:
        self.cfg = cfg
        self.max_examples = int(max_examples)
        self._plain = PlainTransport()
        self._random = secrets.SystemRandom()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Keys and seeds are fresh per round: nothing lasts between rounds."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Nothing to restore."""

    def exchange(self, grid: Grid, messages: list[Message], round_ctx: RoundContext) -> Exchange:
        """A secure round for training messages; a plain exchange otherwise."""
        if round_ctx.kind != TRAIN:
            return self._plain.exchange(grid, messages, round_ctx)
        return _SecureRound(self, grid, messages, round_ctx).run()

    # -- parameters -------------------------------------------------------------------------
    def graph(self, num_clients: int) -> tuple[int, int]:
        """``(k, t)`` for a cohort of ``num_clients``."""
        if num_clients == self.cfg.clients_per_round:
            return self.cfg.secagg_graph()
        params = find_graph_parameters(num_clients, self.cfg.secagg_max_dropout)
        return params.degree, params.threshold

    def encoding(self) -> FieldEncoding:
        """The round's field encoding."""
        return FieldEncoding.for_codec(
            self.cfg.codec(), self.cfg.secagg_level_bits(), self.cfg.secagg_clip, self.max_examples
        )

    def permutation(self, num_clients: int) -> list[int]:
        """Graph positions of the sorted cohort: a permutation from the OS's CSPRNG."""
        return self._random.sample(range(num_clients), num_clients)


class _SecureRound:
    """One training round's four exchanges (an object so the stages share their bookkeeping)."""

    def __init__(
        self, owner: SecAggTransport, grid: Grid, messages: list[Message], ctx: RoundContext
    ) -> None:
        self.owner, self.grid, self.ctx = owner, grid, ctx
        self.messages = {int(m.metadata.dst_node_id): m for m in messages}
        self.sent = tuple(int(m.metadata.dst_node_id) for m in messages)
        self.dropped: dict[int, str] = {}
        self.vanished: set[int] = set()  # simulated dropouts (positions)
        self.bytes_up: dict[str, int] = {}
        self.bytes_down: dict[str, int] = {}
        self.dropped_per_stage: dict[str, int] = {}
        self.group_id = messages[0].metadata.group_id if messages else str(ctx.server_round)
        self.sizes: dict[int, int] = {}  # id(message) -> payload bytes, where already known
        self._item_bytes: dict[tuple[str, int], int] = {}

    # -- the round --------------------------------------------------------------------------
    def run(self) -> Exchange:
        """The round's exchange; a protocol error the stages did not pin on one client aborts it."""
        try:
            return self._run()
        except SecAggError as err:
            return self._abort(str(err))

    def _run(self) -> Exchange:
        n = len(self.messages)
        if n != len(self.sent):
            raise ValueError("a secure round needs one message per client")
        if n < 2:
            return self._abort(f"secure aggregation needs at least 2 clients, {n} were sampled")
        cfg = self.owner.cfg
        k, t = self.owner.graph(n)
        encoding = self.owner.encoding()
        first = next(iter(self.messages.values()))
        records = {
            key: arrays_to_numpy(first.content.array_records[key])
            for key in sorted(first.content.array_records)
        }
        rotation = self.ctx.config.get(ROTATION_SEED, 0)
        rotation_seed = int(rotation) if isinstance(rotation, int) and not isinstance(rotation, bool) else 0
        num_tensors = sum(len(tensors) for tensors in records.values())
        slots, length = layout(
            encoding, records, [tensor_rotation_seed(rotation_seed, i) for i in range(num_tensors)]
        )
        params = RoundParams(self.ctx.server_round, n, k, t, encoding.field_bits(n), length)
        order = sorted(self.messages)
        perm = self.owner.permutation(n)
        self.node_of = {perm[i]: node for i, node in enumerate(order)}
        self.position_of = {node: pos for pos, node in self.node_of.items()}
        self.server = ServerRound(params, min_survivors=cfg.min_replies(n))
        self.drop_stage = 0
        self.drop_set: set[int] = set()
        if cfg.secagg_drop_fraction > 0:
            if not federation_is_fixed(self.grid):
                raise ValueError(
                    "secagg-drop-fraction simulates dropouts and is for simulations only; set it to 0 "
                    "when clients are real SuperNodes"
                )
            rng = stream_rng(cfg.seed, Stream.SECAGG_DROPOUT, self.ctx.server_round)
            count = math.floor(cfg.secagg_drop_fraction * n)
            self.drop_set = {
                self.position_of[order[int(i)]] for i in rng.choice(n, size=count, replace=False)
            }
            self.drop_stage = _DROP_STAGE[cfg.secagg_drop_stage]
        log.info(
            "round %d: secure aggregation of %d clients (k=%d neighbours, threshold t=%d, %d-bit field, "
            "%d elements)",
            self.ctx.server_round,
            n,
            k,
            t,
            params.field_bits,
            length,
        )

        # 1. advertise keys
        common = {"server-round": params.server_round}
        replies = self._exchange(
            STAGE_ADVERTISE,
            {
                pos: self._control(
                    pos,
                    {
                        **common,
                        "position": pos,
                        "clients": n,
                        "degree": k,
                        "threshold": t,
                        "field-bits": params.field_bits,
                        "vector-length": length,
                    },
                    STAGE_ADVERTISE,
                )
                for pos in range(n)
            },
        )
        keys = {}
        for pos, rec in replies.items():
            try:
                keys[pos] = (
                    wire.get_bytes(rec, "c-key", crypto.KEY_BYTES),
                    wire.get_bytes(rec, "s-key", crypto.KEY_BYTES),
                )
            except SecAggError as err:
                self._drop(pos, STAGE_ADVERTISE, str(err))
        self._refused(self.server.receive_keys(keys), STAGE_ADVERTISE)
        self._simulate_drop(STAGE_ADVERTISE)

        # 2. share keys
        out = {}
        for u, peers in self.server.key_lists().items():
            order_v = sorted(peers)
            out[u] = self._control(
                u,
                {
                    **common,
                    "positions": order_v,
                    "c-keys": [peers[v][0] for v in order_v],
                    "s-keys": [peers[v][1] for v in order_v],
                },
                STAGE_SHARE_KEYS,
            )
        replies = self._exchange(STAGE_SHARE_KEYS, out)
        shares: dict[int, dict[int, bytes]] = {}
        commitments: dict[int, bytes] = {}
        for pos, rec in replies.items():
            try:
                positions = wire.get_int_list(rec, "positions", n - 1)
                cts = wire.get_bytes_list(rec, "ciphertexts", len(positions), ciphertext_bytes())
                commitments[pos] = wire.get_bytes(rec, "commitment", crypto.COMMITMENT_BYTES)
            except SecAggError as err:
                self._drop(pos, STAGE_SHARE_KEYS, str(err))
                continue
            shares[pos] = dict(zip(positions, cts, strict=True))
        self._refused(self.server.receive_shares(shares, commitments), STAGE_SHARE_KEYS)
        self._simulate_drop(STAGE_SHARE_KEYS)

        # 3. masked input (the training message)
        enc = {
            "level-bits": encoding.level_bits,
            "ternary": encoding.ternary,
            "rotate": encoding.rotate,
            "clip": float(encoding.clip),
            "max-weight": encoding.max_weight,
        }
        out = {}
        for v, incoming in self.server.forward().items():
            order_u = sorted(incoming)
            record = wire.to_record(
                {
                    wire.STAGE: STAGE_MASKED_INPUT,
                    **common,
                    "positions": order_u,
                    "ciphertexts": [incoming[u] for u in order_u],
                    **enc,
                }
            )
            message = self.messages[self.node_of[v]]
            plain = self._content_bytes(message.content)
            message.content = RecordDict({**dict(message.content), wire.SECAGG_KEY: record})
            out[v] = message
            # Protobuf sizes of a RecordDict's items add up: the model's is counted once a round.
            self.sizes[id(message)] = plain + payload_bytes(RecordDict({wire.SECAGG_KEY: record}))
        replies = self._exchange(STAGE_MASKED_INPUT, out)
        inputs: dict[int, tuple[bytes, list[int]]] = {}
        for pos, rec in replies.items():
            try:
                inputs[pos] = (
                    wire.get_bytes(rec, "masked", params.masked_bytes()),
                    wire.get_int_list(rec, "masked-with", n - 1),
                )
            except SecAggError as err:
                self._drop(pos, STAGE_MASKED_INPUT, str(err))
        self._refused(self.server.receive_masked(inputs), STAGE_MASKED_INPUT)
        self._simulate_drop(STAGE_MASKED_INPUT)

        # 4. unmask
        try:
            requests = self.server.unmask_requests()
        except SecAggAbortError as err:
            return self._abort(str(err))
        out = {
            u: self._control(u, {**common, "survivors": list(alive), "dropped": list(gone)}, STAGE_UNMASK)
            for u, (alive, gone) in requests.items()
        }
        replies = self._exchange(STAGE_UNMASK, out)
        reveals: dict[int, UnmaskReply] = {}
        for pos, rec in replies.items():
            try:
                b_pos = wire.get_int_list(rec, "b-positions", n - 1)
                s_pos = wire.get_int_list(rec, "s-positions", n - 1)
                b = wire.get_bytes_list(rec, "b-shares", len(b_pos), shamir.SHARE_BYTES)
                s = wire.get_bytes_list(rec, "s-shares", len(s_pos), shamir.SHARE_BYTES)
            except SecAggError as err:
                self._drop(pos, STAGE_UNMASK, str(err))
                continue
            reveals[pos] = UnmaskReply(dict(zip(b_pos, b, strict=True)), dict(zip(s_pos, s, strict=True)))
        self._refused(self.server.receive_unmask(reveals), STAGE_UNMASK)
        try:
            level_sum = self.server.result()
        except SecAggAbortError as err:
            return self._abort(str(err))

        # Decode the sum.
        survivors = len(self.server.u3)
        weight = encoding.decode_weight(level_sum[length - encoding.weight_digits() :])
        if not survivors <= weight <= survivors * encoding.max_weight:
            return self._abort(
                f"the summed weight {weight} is outside [{survivors}, {survivors * encoding.max_weight}]: "
                "a client sent values outside the field encoding"
            )
        weighted: dict[str, dict[str, np.ndarray]] = {
            key: {name: np.zeros(values.shape, dtype=np.float64) for name, values in tensors.items()}
            for key, tensors in records.items()
        }
        for slot in slots:
            part = level_sum[slot.start : slot.start + slot.length]
            shape = records[slot.record][slot.name].shape
            weighted[slot.record][slot.name] = encoding.decode_tensor(
                part, survivors, slot.size, slot.rotation_seed
            ).reshape(shape)
        aggregate = Aggregate(weighted, float(weight), survivors, self._dropped_list())
        return self._result(aggregate)

    # -- helpers ----------------------------------------------------------------------------
    def _content_bytes(self, content: RecordDict) -> int:
        """Payload bytes of ``content``, each record object sized once (strategies share the model)."""
        total = 0
        for key, record in content.items():
            item = (key, id(record))
            if item not in self._item_bytes:
                self._item_bytes[item] = payload_bytes(RecordDict({key: record}))
            total += self._item_bytes[item]
        return total

    def _control(self, pos: int, values: dict[str, Any], stage: int) -> Message:
        record = wire.to_record({wire.STAGE: stage, **values})
        return self.grid.create_message(
            RecordDict({wire.SECAGG_KEY: record}), "train", self.node_of[pos], self.group_id
        )

    def _exchange(self, stage: int, out: Mapping[int, Message]) -> dict[int, ConfigRecord]:
        """Send one stage's messages (not to vanished clients); the valid replies' records by position."""
        name = STAGE_NAMES[stage]
        targets = {pos: msg for pos, msg in out.items() if pos not in self.vanished}
        self.bytes_down[name] = sum(
            self.sizes[id(m)] if id(m) in self.sizes else payload_bytes(m.content) for m in targets.values()
        )
        if not targets:
            self.bytes_up[name] = 0
            return {}
        replies = list(self.grid.send_and_receive(list(targets.values()), timeout=self.ctx.timeout_s))
        self.bytes_up[name] = sum(payload_bytes(r.content) for r in replies if r.has_content())
        asked = {self.node_of[pos]: pos for pos in targets}
        got: dict[int, ConfigRecord] = {}
        twice: set[int] = set()
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if node not in asked:
                log.warning(
                    "round %d (%s): ignored a reply from node %d, which this stage did not ask",
                    self.ctx.server_round,
                    name,
                    node,
                )
                continue
            pos = asked[node]
            if pos in got or pos in twice:
                twice.add(pos)
                continue
            if reply.has_error():
                self._drop(pos, stage, f"error reply: {reply.error.reason}")
                twice.add(pos)  # not a record, but no longer a candidate either
                continue
            record = reply.content.config_records.get(wire.SECAGG_KEY) if reply.has_content() else None
            try:
                if record is None:
                    raise SecAggError("the reply carries no secagg record")
                if wire.stage_of(record) != stage:
                    raise SecAggError(f"the reply is for stage {wire.stage_of(record)}, not {stage}")
                if len(reply.content) != 1:
                    raise SecAggError("the reply carries records besides its secagg record")
            except SecAggError as err:
                self._drop(pos, stage, str(err))
                twice.add(pos)
                continue
            got[pos] = record
        for pos in twice:
            if pos in got:
                del got[pos]
                self._drop(pos, stage, "a second reply from the same node in one stage")
        for pos in targets:
            if pos not in got and pos not in self.dropped:
                self._drop(pos, stage, "no reply within round-timeout-s")
        return got

    def _drop(self, pos: int, stage: int, reason: str) -> None:
        node = self.node_of[pos]
        if node in self.dropped:
            return
        self.dropped[node] = f"secagg {STAGE_NAMES[stage]}: {reason}"
        name = STAGE_NAMES[stage]
        self.dropped_per_stage[name] = self.dropped_per_stage.get(name, 0) + 1
        log.warning("round %d: client %d dropped at secagg %s: %s", self.ctx.server_round, node, name, reason)

    def _refused(self, refused: Mapping[int, str], stage: int) -> None:
        for pos, reason in refused.items():
            self._drop(pos, stage, reason)

    def _simulate_drop(self, stage: int) -> None:
        if stage != self.drop_stage:
            return
        for pos in sorted(self.drop_set):
            self.vanished.add(pos)
            node = self.node_of[pos]
            if node not in self.dropped:
                self.dropped[node] = f"secagg: simulated dropout after {STAGE_NAMES[stage]}"
                name = f"after-{STAGE_NAMES[stage]}"
                self.dropped_per_stage[name] = self.dropped_per_stage.get(name, 0) + 1

    def _dropped_list(self) -> tuple[Dropped, ...]:
        in_sum = {self.node_of[u] for u in self.server.u3} if hasattr(self, "server") else set()
        return tuple(
            Dropped(node, reason) for node, reason in sorted(self.dropped.items()) if node not in in_sum
        )

    def _abort(self, reason: str) -> Exchange:
        log.warning(
            "round %d: secure aggregation aborted: %s; keeping the previous model",
            self.ctx.server_round,
            reason,
        )
        dropped = list(self._dropped_list())
        named = {d.node_id for d in dropped}
        dropped += [
            Dropped(node, f"secagg round aborted: {reason}") for node in self.sent if node not in named
        ]
        return self._result(Aggregate({}, 0.0, 0, tuple(dropped)), aborted=reason)

    def _result(self, aggregate: Aggregate, aborted: str | None = None) -> Exchange:
        stats: dict[str, Any] = {
            "clients_in_sum": aggregate.num_clients,
            "dropped_per_stage": dict(sorted(self.dropped_per_stage.items())),
            "bytes_up_per_stage": self.bytes_up,
            "bytes_down_per_stage": self.bytes_down,
            "aborted": aborted,
        }
        if hasattr(self, "server"):
            p = self.server.params
            stats.update(neighbors=p.degree, threshold=p.threshold, field_bits=p.field_bits)
        missing = tuple(n for n in self.sent if n in self.dropped and "no reply" in self.dropped[n])
        return Exchange(
            sent=self.sent,
            aggregate=aggregate,
            missing=missing,
            bytes_up=sum(self.bytes_up.values()),
            bytes_down=sum(self.bytes_down.values()),
            stats={"secagg": stats},
        )
