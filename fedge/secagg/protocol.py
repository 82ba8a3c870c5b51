"""SecAgg+ for one round: the client's and the server's side, as pure state machines.

Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020, semi-honest server. The cohort of ``n`` clients sits
at positions ``0..n-1`` of the ``k``-regular Harary graph (:func:`~fedge.secagg.graph.harary_graph`;
one row of it: :func:`~fedge.secagg.graph.harary_neighbors`);
``N(u)`` is position ``u``'s neighbours. Four stages, each one exchange through the server:

1. **advertise keys** (:meth:`ClientRound.advertise`): two fresh X25519 key pairs per round,
   ``c_u`` (share encryption) and ``s_u`` (mask agreement); the server keeps the clients whose
   keys are valid points (``U1``) and drops a client left with fewer than ``t`` neighbours in
   ``U1`` (it could never be unmasked).
2. **share keys** (:meth:`ClientRound.share_keys`): the client draws its self-mask seed
   ``b_u``, Shamir-shares ``b_u`` and ``s_u``'s 32 secret bytes with threshold ``t`` among its
   neighbours in ``U1`` (the share for position ``v`` is ``f(v + 1)``), and encrypts each
   neighbour's pair of shares with AES-256-GCM under ``HKDF(X25519(c_u, c_v))``, binding
   sender, receiver, round and stage as associated data. Senders form ``U2``.
3. **masked input** (:meth:`ClientRound.masked_input`): the client decrypts the shares
   addressed to it (one that fails authentication is refused and that neighbour treated as
   dropped: no pairwise mask with it), agrees ``s_uv = HKDF(X25519(s_u, s_v))`` with each
   accepted neighbour, and sends ``y_u = x_u + PRG(b_u) + sum_v sign(u, v) PRG(s_uv) mod 2**m``
   bit-packed at ``m`` bits (:mod:`fedge.secagg.masking`), with the list of neighbours it masked
   with. Senders form ``U3``.
4. **unmask** (:meth:`ClientRound.unmask`): the server names the survivors ``U3`` and the
   dropped ``D = U2 \\ U3``; each survivor reveals the ``b``-share of every surviving neighbour
   and the ``s``-share of every dropped one, **never both for one client** (the client keeps
   what it revealed and refuses a second request). The server rebuilds ``b_u`` for ``u in U3``
   and ``s_v`` for the dropped ``v`` that a survivor masked with, recomputes those ``s_uv``, and
   removes every mask from the sum of the ``y_u`` (:meth:`ServerRound.result`).

A client may drop after any stage. The round aborts (:class:`SecAggAbortError`) when a secret the
server needs has fewer than ``t`` holders left: before the unmask stage when that is already
known (nothing is revealed), or when too few unmask replies came. A late abort reveals at most
``t - 1`` shares of the secret it lacks, which are independent of it (Shamir's perfect
secrecy); the other secrets' shares that did arrive are of the kinds a successful round
reveals (never both kinds of one client).

Everything a client sends is checked before use (:class:`ServerRound`): key points, share
counts and ciphertext lengths, addressees that are not neighbours, masked vectors of the
wrong length or with set padding bits, a masked-with list that names a client whose shares it
never got, revealed shares of the wrong kind or for a client it holds none of. A client that
fails a check is dropped from the round, with the reason, exactly as if it had gone offline.
Two clients whose masked-with lists disagree about their shared edge (one masked, the other
refused its share) cannot both stay: the one that masked (the share's sender) is dropped, and
its masks are removed through its rebuilt key. (A malicious client could claim to refuse valid
shares and so evict up to ``k - t`` neighbours: like choosing its own input, that is a
malicious-client power outside the semi-honest model.) Each client commits to its self-mask
seed with its shares (:func:`~fedge.secagg.crypto.commit_seed`), and each rebuilt mask key must match the
advertised public key, so a holder that alters a share makes the round abort rather than
return a wrong sum. A malicious client can still choose its own input freely (any value in
the field): input validation inside the field is out of scope.

Randomness: every secret (key pairs, ``b_u``, polynomial coefficients, nonces) comes from the
``random_bytes`` callable given to :class:`ClientRound` (``os.urandom`` in production).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedge.secagg import crypto, masking, shamir
from fedge.secagg.errors import SecAggError
from fedge.secagg.graph import harary_neighbors

__all__ = [
    "STAGE_ADVERTISE",
    "STAGE_MASKED_INPUT",
    "STAGE_NAMES",
    "STAGE_SHARE_KEYS",
    "STAGE_UNMASK",
    "ClientRound",
    "RoundParams",
    "SecAggAbortError",
    "ServerRound",
    "UnmaskReply",
    "ciphertext_bytes",
]

STAGE_ADVERTISE = 1
STAGE_SHARE_KEYS = 2
STAGE_MASKED_INPUT = 3
STAGE_UNMASK = 4
STAGE_NAMES = {
    STAGE_ADVERTISE: "advertise-keys",
    STAGE_SHARE_KEYS: "share-keys",
    STAGE_MASKED_INPUT: "masked-input",
    STAGE_UNMASK: "unmask",
}
# The plaintext a client encrypts for one neighbour: its b-share then its s-share.
_PLAINTEXT_BYTES = 2 * shamir.SHARE_BYTES
MAX_CLIENTS = shamir.MAX_SHARES
#: The most neighbours a client accepts (each costs two agreements, a share pair, a mask):
#: a message naming more is refused, so no server message makes a client's work unbounded.
MAX_DEGREE = 1024


def ciphertext_bytes() -> int:
    """Length of one encrypted pair of shares: nonce 12 + 2 x 70 + tag 16 = 168 bytes."""
    return crypto.NONCE_BYTES + _PLAINTEXT_BYTES + crypto.TAG_BYTES


class SecAggAbortError(SecAggError):
    """The round cannot produce the sum (too few holders of a needed secret); nothing more is revealed."""


@functools.lru_cache(maxsize=65536)
def _neighbors(degree: int, num_clients: int, position: int) -> tuple[int, ...]:
    return harary_neighbors(degree, num_clients, position)


@dataclass(frozen=True)
class RoundParams:
    """What every party of one round agrees on.

    Attributes
    ----------
    server_round : int
        Bound into every ciphertext's associated data (u32).
    num_clients : int
        ``n``, the cohort, 2..65535.
    degree : int
        ``k``, neighbours per client (even in 2..n-2, or n-1).
    threshold : int
        ``t`` in ``floor(k/2)+1 .. k``: shares needed to rebuild a secret.
    field_bits : int
        ``m``: the sum is taken mod ``2**m``, 1..62.
    vector_length : int
        Elements of each input vector (>= 1).
    """

    server_round: int
    num_clients: int
    degree: int
    threshold: int
    field_bits: int
    vector_length: int

    def __post_init__(self) -> None:
        if not 0 <= self.server_round < 2**32:
            raise SecAggError(f"server_round must be in 0..2**32-1, got {self.server_round}")
        if not 2 <= self.num_clients <= MAX_CLIENTS:
            raise SecAggError(f"a SecAgg cohort needs 2..{MAX_CLIENTS} clients, got {self.num_clients}")
        _neighbors(self.degree, self.num_clients, 0)  # validates the degree
        if not self.degree // 2 + 1 <= self.threshold <= self.degree:
            raise SecAggError(
                f"threshold must be in {self.degree // 2 + 1}..{self.degree} for degree {self.degree} "
                f"(more than half the neighbours), got {self.threshold}"
            )
        if not 1 <= self.field_bits <= crypto.MAX_PRG_BITS:
            raise SecAggError(f"field_bits must be in 1..{crypto.MAX_PRG_BITS}, got {self.field_bits}")
        if not 1 <= self.vector_length < 2**40:
            raise SecAggError(f"vector_length must be in 1..2**40, got {self.vector_length}")

    def neighbors(self, position: int) -> tuple[int, ...]:
        """``N(position)``, sorted."""
        self.check_position(position)
        return _neighbors(self.degree, self.num_clients, position)

    def check_position(self, position: int) -> None:
        """Refuse a position outside the cohort."""
        if (
            isinstance(position, bool)
            or not isinstance(position, int)
            or not 0 <= position < self.num_clients
        ):
            raise SecAggError(f"position must be in 0..{self.num_clients - 1}, got {position!r}")

    def masked_bytes(self) -> int:
        """Bytes of a packed masked vector: ``ceil(vector_length * field_bits / 8)``."""
        return masking.packed_bytes(self.vector_length, self.field_bits)


@dataclass(frozen=True)
class UnmaskReply:
    """What a survivor reveals: ``b``-shares of surviving neighbours, ``s``-shares of dropped ones."""

    self_mask_shares: dict[int, bytes]
    key_shares: dict[int, bytes]


class ClientRound:
    """One client's side of one SecAgg+ round (its secrets live only here).

    Parameters
    ----------
    params : RoundParams
    position : int
        This client's graph position.
    random_bytes : callable
        ``random_bytes(n) -> bytes``, the secret source (``os.urandom`` in production).
    """

    def __init__(self, params: RoundParams, position: int, random_bytes: Callable[[int], bytes]) -> None:
        params.check_position(position)
        if params.degree > MAX_DEGREE:
            raise SecAggError(
                f"a round of degree {params.degree} would cost this client {params.degree} key agreements "
                f"and shares; at most {MAX_DEGREE} are accepted"
            )
        self.params = params
        self.position = position
        self._random_bytes = random_bytes
        self._c_secret = random_bytes(crypto.KEY_BYTES)
        self._s_secret = random_bytes(crypto.KEY_BYTES)
        self._c_key = crypto.private_key_from_secret(self._c_secret)
        self._s_key = crypto.private_key_from_secret(self._s_secret)
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        self._masked_with: tuple[int, ...] | None = None
        self._self_seed: bytes | None = None
        self._revealed = False
        self.stage = STAGE_ADVERTISE

    # -- stage 1 ---------------------------------------------------------------------------
    def advertise(self) -> tuple[bytes, bytes]:
        """``(c_u public key, s_u public key)``, 32 bytes each."""
        self._expect(STAGE_ADVERTISE)
        self.stage = STAGE_SHARE_KEYS
        return crypto.public_key_bytes(self._c_key), crypto.public_key_bytes(self._s_key)

    # -- stage 2 ---------------------------------------------------------------------------
    def share_keys(self, peer_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Encrypted share pairs for each neighbour that advertised keys.

        Parameters
        ----------
        peer_keys : mapping
            Neighbour position -> ``(c_v, s_v)`` public keys, as the server forwards them.

        Returns
        -------
        dict of int to bytes
            Neighbour position -> 168-byte ciphertext (:func:`ciphertext_bytes`).

        Raises
        ------
        SecAggError
            A position that is not a neighbour, an invalid or repeated key, or fewer than
            ``t`` neighbours (the round cannot unmask this client: it stops here).
        """
        self._expect(STAGE_SHARE_KEYS)
        self.stage = -1  # a failure below ends this client's round
        neighbors = set(self.params.neighbors(self.position))
        t = self.params.threshold
        parsed: dict[int, tuple[crypto.X25519PublicKey, bytes]] = {}
        own = {crypto.public_key_bytes(self._c_key), crypto.public_key_bytes(self._s_key)}
        for v, keys in peer_keys.items():
            if v not in neighbors:
                raise SecAggError(
                    f"the server forwarded keys of position {v!r}, not a neighbour of {self.position}"
                )
            c_pk, s_pk = keys
            c = crypto.public_key_from_bytes(c_pk)
            crypto.public_key_from_bytes(s_pk)
            if c_pk == s_pk or {bytes(c_pk), bytes(s_pk)} & own:
                raise SecAggError(f"position {v} advertised a repeated public key")
            parsed[v] = (c, bytes(s_pk))
        if len(parsed) < t:
            raise SecAggAbortError(f"only {len(parsed)} neighbours advertised keys; the threshold is {t}")
        self._peer_keys = {v: (bytes(peer_keys[v][0]), s_pk) for v, (_, s_pk) in parsed.items()}
        self._self_seed = self._random_bytes(crypto.KEY_BYTES)
        order = sorted(parsed)
        indices = [v + 1 for v in order]
        b_shares = shamir.share(self._self_seed, t, len(order), self._random_bytes, indices)
        s_shares = shamir.share(self._s_secret, t, len(order), self._random_bytes, indices)
        out: dict[int, bytes] = {}
        for v, b_share, s_share in zip(order, b_shares, s_shares, strict=True):
            key = crypto.agree(self._c_key, parsed[v][0], crypto.INFO_SHARE_KEY)
            ad = crypto.associated_data(self.position, v, self.params.server_round, STAGE_SHARE_KEYS)
            plaintext = shamir.encode_share(b_share) + shamir.encode_share(s_share)
            out[v] = crypto.encrypt_share(key, plaintext, ad, self._random_bytes(crypto.NONCE_BYTES))
        self.stage = STAGE_MASKED_INPUT
        return out

    @property
    def self_mask_commitment(self) -> bytes:
        """:func:`~fedge.secagg.crypto.commit_seed` of ``b_u``, sent with the shares."""
        if self._self_seed is None:
            raise SecAggError("the self-mask seed is drawn in the share-keys stage")
        return crypto.commit_seed(self._self_seed, self.params.server_round, self.position)

    # -- stage 3 ---------------------------------------------------------------------------
    def masked_input(
        self, ciphertexts: Mapping[int, bytes], levels: np.ndarray
    ) -> tuple[bytes, tuple[int, ...]]:
        """The packed masked vector and the neighbours it is masked with.

        Parameters
        ----------
        ciphertexts : mapping
            Sender position -> the ciphertext it addressed to this client.
        levels : ndarray of unsigned integers, shape (vector_length,)
            ``x_u``, each below ``2**field_bits``.

        Returns
        -------
        (bytes, tuple of int)
            ``pack(y_u)`` and the sorted positions whose shares were accepted (and masked with).

        Raises
        ------
        SecAggError
            Fewer than ``t`` valid shares (too few neighbours to hold this client's secrets
            with it), or levels of the wrong length or range.
        """
        self._expect(STAGE_MASKED_INPUT)
        self.stage = -1
        p = self.params
        levels = np.asarray(levels)
        if levels.shape != (p.vector_length,):
            raise SecAggError(f"the input has shape {levels.shape}, the round expects ({p.vector_length},)")
        held: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        for v, ct in ciphertexts.items():
            if v not in self._peer_keys:
                continue  # not someone this client shared with: never masked with
            c_pk, _ = self._peer_keys[v]
            try:
                key = crypto.agree(self._c_key, crypto.public_key_from_bytes(c_pk), crypto.INFO_SHARE_KEY)
                ad = crypto.associated_data(v, self.position, p.server_round, STAGE_SHARE_KEYS)
                plaintext = crypto.decrypt_share(key, bytes(ct), ad)
                if len(plaintext) != _PLAINTEXT_BYTES:
                    raise SecAggError("a decrypted share pair has the wrong length")
                b_share = shamir.decode_share(plaintext[: shamir.SHARE_BYTES])
                s_share = shamir.decode_share(plaintext[shamir.SHARE_BYTES :])
                if b_share.index != self.position + 1 or s_share.index != self.position + 1:
                    raise SecAggError("a share carries another receiver's index")
            except SecAggError:
                continue  # refused: that neighbour counts as dropped for this client
            held[v] = (b_share, s_share)
        if len(held) < p.threshold:
            raise SecAggAbortError(
                f"only {len(held)} neighbours' shares are valid; the threshold is {p.threshold}"
            )
        assert self._self_seed is not None
        pair_seeds = {
            v: crypto.agree(
                self._s_key, crypto.public_key_from_bytes(self._peer_keys[v][1]), crypto.INFO_MASK_SEED
            )
            for v in held
        }
        y = masking.mask(levels, self._self_seed, pair_seeds, self.position, p.field_bits)
        self._held = held
        self._masked_with = tuple(sorted(held))
        self.stage = STAGE_UNMASK
        return masking.pack(y, p.field_bits), self._masked_with

    # -- stage 4 ---------------------------------------------------------------------------
    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> UnmaskReply:
        """Reveal ``b``-shares of surviving neighbours and ``s``-shares of dropped ones, once.

        Raises
        ------
        SecAggError
            On a second request, overlapping lists, a list that omits this client from the
            survivors, or fewer than ``t`` surviving neighbours (revealing then could let a
            lying server collect both kinds of share of one client).
        """
        if self._revealed:
            raise SecAggError("this client already revealed its shares for this round")
        self._expect(STAGE_UNMASK)
        self._revealed = True
        self.stage = -1
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise SecAggError(f"positions {sorted(alive & gone)} are listed as both survived and dropped")
        if self.position not in alive:
            raise SecAggError("the unmask request does not list this client among the survivors")
        neighbors = set(self.params.neighbors(self.position))
        if len(alive & neighbors) < self.params.threshold:
            raise SecAggAbortError(
                f"only {len(alive & neighbors)} neighbours survived; the threshold is {self.params.threshold}"
            )
        b_out = {v: shamir.encode_share(self._held[v][0]) for v in sorted(alive) if v in self._held}
        s_out = {v: shamir.encode_share(self._held[v][1]) for v in sorted(gone) if v in self._held}
        # The secrets are no longer needed by this client.
        self._held = {}
        return UnmaskReply(b_out, s_out)

    # -- state between messages (a client's Context.state) ------------------------------
    def export(self) -> dict[str, int | bytes | bool | list[int] | list[bytes]]:
        """This round's state as plain values (secrets included: keep it in the client only)."""
        p = self.params
        held = sorted(self._held)
        peers = sorted(self._peer_keys)
        return {
            "stage": self.stage,
            "position": self.position,
            "server-round": p.server_round,
            "clients": p.num_clients,
            "degree": p.degree,
            "threshold": p.threshold,
            "field-bits": p.field_bits,
            "vector-length": p.vector_length,
            "c-secret": self._c_secret,
            "s-secret": self._s_secret,
            "self-seed": self._self_seed or b"",
            "peer-positions": peers,
            "peer-c-keys": [self._peer_keys[v][0] for v in peers],
            "peer-s-keys": [self._peer_keys[v][1] for v in peers],
            "held-positions": held,
            "held-self-mask-shares": [shamir.encode_share(self._held[v][0]) for v in held],
            "held-key-shares": [shamir.encode_share(self._held[v][1]) for v in held],
            "revealed": self._revealed,
        }

    @classmethod
    def restore(cls, state: Mapping[str, object], random_bytes: Callable[[int], bytes]) -> ClientRound:
        """Inverse of :meth:`export`.

        Raises
        ------
        SecAggError
            On a state that is not one :meth:`export` wrote.
        """
        try:
            params = RoundParams(
                int(state["server-round"]),  # type: ignore[call-overload]
                int(state["clients"]),  # type: ignore[call-overload]
                int(state["degree"]),  # type: ignore[call-overload]
                int(state["threshold"]),  # type: ignore[call-overload]
                int(state["field-bits"]),  # type: ignore[call-overload]
                int(state["vector-length"]),  # type: ignore[call-overload]
            )
            secrets = [state["c-secret"], state["s-secret"]]
            it = iter(secrets)
            client = cls(params, int(state["position"]), lambda n: bytes(next(it)))  # type: ignore[call-overload]
            client._random_bytes = random_bytes
            client.stage = int(state["stage"])  # type: ignore[call-overload]
            seed = bytes(state["self-seed"])  # type: ignore[call-overload]
            client._self_seed = seed or None
            peers = list(state["peer-positions"])  # type: ignore[call-overload]
            c_keys = list(state["peer-c-keys"])  # type: ignore[call-overload]
            s_keys = list(state["peer-s-keys"])  # type: ignore[call-overload]
            client._peer_keys = {
                int(v): (bytes(c), bytes(s)) for v, c, s in zip(peers, c_keys, s_keys, strict=True)
            }
            held = list(state["held-positions"])  # type: ignore[call-overload]
            b = list(state["held-self-mask-shares"])  # type: ignore[call-overload]
            k = list(state["held-key-shares"])  # type: ignore[call-overload]
            client._held = {
                int(v): (shamir.decode_share(bytes(x)), shamir.decode_share(bytes(y)))
                for v, x, y in zip(held, b, k, strict=True)
            }
            client._masked_with = tuple(sorted(client._held)) if client.stage == STAGE_UNMASK else None
            client._revealed = bool(state["revealed"])
        except (KeyError, TypeError, ValueError, StopIteration) as err:
            raise SecAggError(
                f"the stored secagg round state is unreadable ({err}); the client drops this round"
            ) from None
        return client

    def _expect(self, stage: int) -> None:
        if self.stage != stage:
            expected = STAGE_NAMES.get(self.stage, "none (the round ended)")
            raise SecAggError(
                f"message for stage {STAGE_NAMES[stage]!r} out of order; this client expects {expected!r}"
            )


@dataclass
class _ServerClient:
    c_pk: bytes = b""
    s_pk: bytes = b""
    sent_to: frozenset[int] = frozenset()
    ciphertexts: dict[int, bytes] = field(default_factory=dict)
    masked_with: frozenset[int] = frozenset()
    commitment: bytes = b""


class ServerRound:
    """The server's side of one SecAgg+ round; it sees only what :attr:`transcript` lists.

    Each ``receive_*`` takes the replies of one stage by position and returns the positions
    it refused with the reason; clients that did not reply are passed in nowhere and simply
    drop. Call the stages in order: :meth:`receive_keys`, :meth:`key_lists`,
    :meth:`receive_shares`, :meth:`forward`, :meth:`receive_masked`, :meth:`unmask_requests`,
    :meth:`receive_unmask`, :meth:`result`.
    """

    def __init__(self, params: RoundParams, min_survivors: int = 1) -> None:
        self.params = params
        #: Fewer masked inputs than this and the round aborts before anything is revealed
        #: (the loop's ``min-reply-fraction``: a sum the loop would throw away is never unmasked).
        self.min_survivors = max(1, int(min_survivors))
        self._clients: dict[int, _ServerClient] = {}
        self.u1: set[int] = set()
        self.u2: set[int] = set()
        self.u3: set[int] = set()
        self._sum: np.ndarray | None = None
        self._dropped_needed: set[int] = set()
        self._b_shares: dict[int, dict[int, shamir.Share]] = {}
        self._s_shares: dict[int, dict[int, shamir.Share]] = {}
        self.dropped_at: dict[int, str] = {}
        #: Every share the server received in the clear: (client whose secret, kind "b" or "s").
        self.transcript: list[tuple[int, str, int]] = []

    # -- stage 1 ---------------------------------------------------------------------------
    def receive_keys(self, keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, str]:
        """Keep the clients whose two keys are valid, distinct, unrepeated X25519 points."""
        refused: dict[int, str] = {}
        valid: dict[int, tuple[bytes, bytes]] = {}
        for u in sorted(keys):
            c_pk, s_pk = keys[u]
            try:
                self.params.check_position(u)
                crypto.public_key_from_bytes(c_pk)
                crypto.public_key_from_bytes(s_pk)
            except SecAggError as err:
                refused[u] = str(err)
                continue
            valid[u] = (bytes(c_pk), bytes(s_pk))
        # Every client holding a repeated key is refused, not just the later one: the server
        # cannot tell which is genuine, and a kept copy of another's mask key would leave
        # pairwise masks that do not cancel (a silently wrong sum).
        counts: dict[bytes, int] = {}
        for pair in valid.values():
            for key in pair:
                counts[key] = counts.get(key, 0) + 1
        for u, (c_pk, s_pk) in valid.items():
            if counts[c_pk] > 1 or counts[s_pk] > 1:
                refused[u] = "a public key repeats another key of this round"
                continue
            self._clients[u] = _ServerClient(c_pk, s_pk)
            self.u1.add(u)
        # A client with fewer than t neighbours left could never be unmasked: drop it (and
        # again, since that lowers its neighbours' counts).
        self._prune(self.u1, lambda u: set(self.params.neighbors(u)) & self.u1, refused, "advertised keys")
        self._note(refused, STAGE_ADVERTISE)
        return refused

    def key_lists(self) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """For each client in ``U1``: its neighbours' public keys."""
        return {
            u: {
                v: (self._clients[v].c_pk, self._clients[v].s_pk)
                for v in self.params.neighbors(u)
                if v in self.u1
            }
            for u in sorted(self.u1)
        }

    # -- stage 2 ---------------------------------------------------------------------------
    def receive_shares(
        self, shares: Mapping[int, Mapping[int, bytes]], commitments: Mapping[int, bytes]
    ) -> dict[int, str]:
        """Keep the clients that sent one well-formed ciphertext to each neighbour in ``U1``,
        and a 32-byte commitment to their self-mask seed (:attr:`ClientRound.self_mask_commitment`)."""
        refused: dict[int, str] = {}
        size = ciphertext_bytes()
        for u in sorted(shares):
            if u not in self.u1:
                refused[u] = "sent shares without having advertised keys"
                continue
            commitment = commitments.get(u)
            if not isinstance(commitment, bytes) or len(commitment) != crypto.COMMITMENT_BYTES:
                refused[u] = f"its self-mask commitment is not {crypto.COMMITMENT_BYTES} bytes"
                continue
            expected = set(self.params.neighbors(u)) & self.u1
            got = shares[u]
            if set(got) != expected:
                refused[u] = f"addressed shares to {sorted(got)}, not to its neighbours {sorted(expected)}"
                continue
            if any(not isinstance(ct, bytes) or len(ct) != size for ct in got.values()):
                refused[u] = f"an encrypted share is not {size} bytes"
                continue
            self._clients[u].sent_to = frozenset(got)
            self._clients[u].ciphertexts = dict(got)
            self._clients[u].commitment = commitment
            self.u2.add(u)
        self._prune(self.u2, lambda u: self._clients[u].sent_to & self.u2, refused, "shared keys")
        self._note(refused, STAGE_SHARE_KEYS)
        return refused

    def forward(self) -> dict[int, dict[int, bytes]]:
        """For each client in ``U2``: the ciphertexts its neighbours in ``U2`` addressed to it."""
        return {
            v: {u: self._clients[u].ciphertexts[v] for u in sorted(self.u2) if v in self._clients[u].sent_to}
            for v in sorted(self.u2)
        }

    # -- stage 3 ---------------------------------------------------------------------------
    def receive_masked(self, inputs: Mapping[int, tuple[bytes, Sequence[int]]]) -> dict[int, str]:
        """Add up the well-formed masked vectors of clients in ``U2``."""
        p = self.params
        refused: dict[int, str] = {}
        total = np.zeros(p.vector_length, dtype=np.uint64)
        for u in sorted(inputs):
            packed, masked_with = inputs[u]
            if u not in self.u2:
                refused[u] = "sent a masked input without having shared keys"
                continue
            offered = {v for v in self.u2 if u in self._clients[v].sent_to}
            listed = set(masked_with)
            if len(listed) != len(masked_with) or not listed <= offered or len(listed) < p.threshold:
                refused[u] = (
                    f"its masked-with list {sorted(listed)} is not {p.threshold} or more of the neighbours "
                    "whose "
                    f"shares it was sent {sorted(offered)}"
                )
                continue
            if not isinstance(packed, bytes) or len(packed) != p.masked_bytes():
                got = len(packed) if isinstance(packed, bytes) else type(packed).__name__
                refused[u] = f"its masked vector is {got} bytes, not {p.masked_bytes()}"
                continue
            try:
                y = masking.unpack(packed, p.vector_length, p.field_bits)
            except SecAggError as err:
                refused[u] = str(err)
                continue
            total += y  # wraps mod 2**64, which 2**m divides
            self._clients[u].masked_with = frozenset(listed)
            self.u3.add(u)
        # An edge masked on one side only cannot cancel between two survivors: the client that
        # masked toward a neighbour that did not mask back is dropped (the sender of a share its
        # receiver refused: a share that fails authentication drops its sender), and its masks
        # are removed through its rebuilt key (its vector leaves the sum).
        lopsided = {
            u: f"masked toward position {v}, a neighbour that did not accept its shares"
            for u in sorted(self.u3)
            for v in sorted(self._clients[u].masked_with)
            if v in self.u3 and u not in self._clients[v].masked_with
        }
        for u, reason in lopsided.items():
            refused[u] = reason
            total -= masking.unpack(inputs[u][0], p.vector_length, p.field_bits)
            self.u3.discard(u)
        self._sum = total
        self._note(refused, STAGE_MASKED_INPUT)
        return refused

    def unmask_requests(self) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
        """For each survivor: ``(survivors, dropped)`` to reveal shares of.

        Raises
        ------
        SecAggAbortError
            If a needed secret already has fewer than ``t`` holders among the survivors, or
            no client survived: the round stops before anything is revealed.
        """
        t = self.params.threshold
        if not self.u3:
            raise SecAggAbortError("no client sent a valid masked input")
        if len(self.u3) < self.min_survivors:
            raise SecAggAbortError(
                f"only {len(self.u3)} masked inputs are valid, fewer than the {self.min_survivors} the round "
                "needs; the round is aborted before anything is revealed"
            )
        dropped = self.u2 - self.u3
        needed = {v for v in dropped if any(v in self._clients[u].masked_with for u in self.u3)}
        for secret_of in sorted(self.u3 | needed):
            holders = self._holders(secret_of)
            if len(holders) < t:
                kind = "self-mask seed" if secret_of in self.u3 else "mask key"
                raise SecAggAbortError(
                    f"the {kind} of position {secret_of} has {len(holders)} surviving holders, fewer than "
                    f"the threshold {t}; the round is aborted before anything is revealed"
                )
        self._dropped_needed = needed
        survivors, gone = tuple(sorted(self.u3)), tuple(sorted(needed))
        return {u: (survivors, gone) for u in survivors}

    # -- stage 4 ---------------------------------------------------------------------------
    def receive_unmask(self, replies: Mapping[int, UnmaskReply]) -> dict[int, str]:
        """Keep the revealed shares that are of the kind asked, for clients the sender holds."""
        refused: dict[int, str] = {}
        for w in sorted(replies):
            reply = replies[w]
            if w not in self.u3:
                refused[w] = "revealed shares without being a survivor"
                continue
            holds = self._clients[w].masked_with
            want_b = {u for u in self.u3 if u in holds}
            want_s = {v for v in self._dropped_needed if v in holds}
            if set(reply.self_mask_shares) != want_b or set(reply.key_shares) != want_s:
                refused[w] = (
                    f"revealed shares for {sorted(reply.self_mask_shares)} / {sorted(reply.key_shares)}, "
                    f"asked for {sorted(want_b)} / {sorted(want_s)}"
                )
                continue
            try:
                b = {u: shamir.decode_share(data) for u, data in reply.self_mask_shares.items()}
                s = {v: shamir.decode_share(data) for v, data in reply.key_shares.items()}
            except SecAggError as err:
                refused[w] = str(err)
                continue
            if any(share.index != w + 1 for share in (*b.values(), *s.values())):
                refused[w] = "a revealed share carries another holder's index"
                continue
            for u, share in b.items():
                self._b_shares.setdefault(u, {})[w] = share
                self.transcript.append((u, "b", w))
            for v, share in s.items():
                self._s_shares.setdefault(v, {})[w] = share
                self.transcript.append((v, "s", w))
        self._note(refused, STAGE_UNMASK)
        return refused

    def result(self) -> np.ndarray:
        """``sum_{u in U3} x_u mod 2**m`` (uint64).

        Raises
        ------
        SecAggAbortError
            Too few shares of a needed secret arrived, or shares that do not agree (a
            rebuilt mask key whose public key is not the advertised one).
        """
        assert self._sum is not None, "receive_masked first"
        p = self.params
        self_seeds = []
        for u in sorted(self.u3):
            seed = self._rebuild(self._b_shares.get(u, {}), u, "self-mask seed")
            if crypto.commit_seed(seed, p.server_round, u) != self._clients[u].commitment:
                raise SecAggAbortError(
                    f"the self-mask shares of position {u} do not rebuild the seed it committed to "
                    "(a holder altered its share)"
                )
            self_seeds.append(seed)
        pair_seeds: dict[tuple[int, int], bytes] = {}
        for v in sorted(self._dropped_needed):
            secret = self._rebuild(self._s_shares.get(v, {}), v, "mask key")
            key = crypto.private_key_from_secret(secret)
            if crypto.public_key_bytes(key) != self._clients[v].s_pk:
                raise SecAggAbortError(f"the key shares of position {v} do not rebuild its advertised key")
            for u in sorted(self.u3):
                if v in self._clients[u].masked_with:
                    peer = crypto.public_key_from_bytes(self._clients[u].s_pk)
                    pair_seeds[(u, v)] = crypto.agree(key, peer, crypto.INFO_MASK_SEED)
        return masking.unmask_sum(self._sum, self_seeds, pair_seeds, p.field_bits)

    # -- helpers ---------------------------------------------------------------------------
    def _holders(self, secret_of: int) -> set[int]:
        """Survivors that accepted (and so hold) ``secret_of``'s shares."""
        return {w for w in self.u3 if secret_of in self._clients[w].masked_with}

    def _rebuild(self, shares: Mapping[int, shamir.Share], owner: int, kind: str) -> bytes:
        t = self.params.threshold
        if len(shares) < t:
            raise SecAggAbortError(
                f"only {len(shares)} shares of the {kind} of position {owner} arrived; need {t}"
            )
        ordered = [shares[w] for w in sorted(shares)]
        try:  # mixed shares may not even rebuild a 32-byte value: that is an abort too
            secret = shamir.reconstruct(ordered[:t], t)
            agrees = len(ordered) == t or shamir.reconstruct(ordered[-t:], t) == secret
        except SecAggError as err:
            raise SecAggAbortError(
                f"the shares of the {kind} of position {owner} do not agree ({err})"
            ) from None
        if not agrees:
            raise SecAggAbortError(f"the shares of the {kind} of position {owner} do not agree")
        return secret

    def _prune(
        self,
        members: set[int],
        neighbours_in: Callable[[int], set[int] | frozenset[int]],
        refused: dict[int, str],
        what: str,
    ) -> None:
        t = self.params.threshold
        changed = True
        while changed:
            changed = False
            for u in sorted(members):
                left = len(neighbours_in(u))
                if left < t:
                    members.discard(u)
                    refused[u] = f"only {left} of its neighbours {what}; the threshold is {t}"
                    changed = True

    def _note(self, refused: Mapping[int, str], stage: int) -> None:
        for u, reason in refused.items():
            self.dropped_at.setdefault(u, f"{STAGE_NAMES[stage]}: {reason}")
