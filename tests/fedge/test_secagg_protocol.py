"""fedge.secagg.protocol: full SecAgg+ rounds between n ClientRounds and one ServerRound.

A small in-test driver (:func:`run_round`) carries every message between the clients and the
server (no Flower), lets a test drop a client after any stage and tamper with any message,
and records what the server received. The checks compare against numbers computed here:
the plain sum of the survivors' levels in Python integers, an independent set-level model of
who survives and when the round must abort (:func:`expected_outcome`), and chi-square
statistics of what a curious server can compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedge.rng import SeededSecretSource
from fedge.secagg import crypto, masking, shamir
from fedge.secagg.errors import SecAggError
from fedge.secagg.graph import find_graph_parameters, harary_graph
from fedge.secagg.protocol import (
    STAGE_MASKED_INPUT,
    STAGE_SHARE_KEYS,
    STAGE_UNMASK,
    ClientRound,
    RoundParams,
    SecAggAbortError,
    ServerRound,
    UnmaskReply,
    ciphertext_bytes,
)

FULL = 4  # a client that sends all four messages
#: A hook gets one hop's messages and the round so far, and returns the messages to deliver.
Hook = Callable[[dict[int, Any], "Outcome"], dict[int, Any]]


# -- the driver ------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One round as the driver saw it."""

    params: RoundParams
    server: ServerRound
    clients: dict[int, ClientRound]
    levels: np.ndarray  # (n, d) uint64
    #: What the server received at each stage, after the hooks: "keys", "shares", "masked", "replies".
    received: dict[str, dict[int, Any]] = field(default_factory=dict)
    #: What the server sent at each stage, after the hooks: "key_lists", "forward", "requests".
    sent: dict[str, dict[int, Any]] = field(default_factory=dict)
    refused: dict[str, dict[int, str]] = field(default_factory=dict)
    client_errors: dict[int, SecAggError] = field(default_factory=dict)
    total: np.ndarray | None = None
    abort: SecAggAbortError | None = None
    abort_stage: str | None = None

    def plain_sum(self, members: Collection[int]) -> list[int]:
        """``sum_{u in members} x_u mod 2**m`` per element, in Python integers."""
        modulus = 1 << self.params.field_bits
        return [
            sum(int(self.levels[u, i]) for u in members) % modulus for i in range(self.params.vector_length)
        ]


def run_round(
    params: RoundParams,
    seed: int,
    *,
    last_stage: Mapping[int, int] | None = None,
    hooks: Mapping[str, Hook] | None = None,
    restore_at: Collection[int] = (),
    levels: np.ndarray | None = None,
    min_survivors: int = 1,
) -> Outcome:
    """Run one round.

    ``last_stage[u]`` is how many messages client ``u`` sends before it goes offline (0: none,
    1: keys, 2: + shares, 3: + masked input, 4: + unmask reply; default 4). ``hooks[name]``
    rewrites the messages of hop ``name`` (``keys``, ``key_lists``, ``shares``, ``forward``,
    ``masked``, ``requests``, ``replies``). Before each client call at a stage in
    ``restore_at`` (1..4) the client is rebuilt from its exported state.
    """
    n, m, d = params.num_clients, params.field_bits, params.vector_length
    last = dict(last_stage or {})
    hook = dict(hooks or {})
    source = SeededSecretSource(np.random.default_rng(seed))
    if levels is None:
        high = (1 << m) // n  # n levels below 2**m / n never wrap
        assert high >= 1
        levels = np.random.default_rng(seed + 10**6).integers(0, high, size=(n, d), dtype=np.uint64)
    clients = {u: ClientRound(params, u, source.random_bytes) for u in range(n)}
    server = ServerRound(params, min_survivors=min_survivors)
    out = Outcome(params, server, clients, levels)

    def through(name: str, messages: dict[int, Any]) -> dict[int, Any]:
        return hook[name](messages, out) if name in hook else messages

    def call(stage: int, u: int, fn: Callable[[ClientRound], Any]) -> Any:
        if last.get(u, FULL) < stage:
            return None  # offline
        if stage in restore_at:
            clients[u] = ClientRound.restore(clients[u].export(), source.random_bytes)
        try:
            return fn(clients[u])
        except SecAggError as err:  # the client stops: it drops like an offline one
            out.client_errors[u] = err
            return None

    def replies_of(stage: int, targets: Mapping[int, Any], fn: Callable[[ClientRound, Any], Any]) -> dict:
        got = {}
        for u in sorted(targets):
            reply = call(stage, u, lambda c, msg=targets[u]: fn(c, msg))
            if reply is not None:
                got[u] = reply
        return got

    keys = {u: r for u in range(n) if (r := call(1, u, lambda c: c.advertise())) is not None}
    out.received["keys"] = keys = through("keys", keys)
    out.refused["keys"] = server.receive_keys(keys)

    out.sent["key_lists"] = lists = through("key_lists", server.key_lists())
    shares = replies_of(2, lists, lambda c, msg: c.share_keys(msg))
    out.received["shares"] = shares = through("shares", shares)
    commitments = {u: clients[u].self_mask_commitment for u in shares}
    out.refused["shares"] = server.receive_shares(shares, commitments)

    out.sent["forward"] = fwd = through("forward", server.forward())
    masked = replies_of(3, fwd, lambda c, msg: c.masked_input(msg, levels[c.position]))
    out.received["masked"] = masked = through("masked", masked)
    out.refused["masked"] = server.receive_masked(masked)

    try:
        requests = server.unmask_requests()
    except SecAggAbortError as err:
        out.abort, out.abort_stage = err, "requests"
        return out
    out.sent["requests"] = requests = through("requests", requests)
    replies = replies_of(4, requests, lambda c, msg: c.unmask(*msg))
    out.received["replies"] = replies = through("replies", replies)
    out.refused["replies"] = server.receive_unmask(replies)
    try:
        out.total = server.result()
    except SecAggAbortError as err:
        out.abort, out.abort_stage = err, "result"
    return out


# -- an independent model of who survives -----------------------------------------------------
def expected_outcome(params: RoundParams, last_stage: Mapping[int, int]) -> tuple[set[int], str | None]:
    """``(U3, None)`` for a round of honest clients that drop as ``last_stage`` says, or
    ``(U3, "requests" | "result")`` where it must abort, straight from the protocol's rules."""
    n, t = params.num_clients, params.threshold
    graph = harary_graph(params.degree, n)
    stage = {u: last_stage.get(u, FULL) for u in range(n)}

    def prune(members: set[int]) -> set[int]:
        while True:
            weak = {u for u in members if len(set(graph[u]) & members) < t}
            if not weak:
                return members
            members -= weak

    u1 = prune({u for u in range(n) if stage[u] >= 1})
    u2 = prune({u for u in u1 if stage[u] >= 2})
    u3 = {u for u in u2 if stage[u] >= 3}
    # An honest client in U2 masks with exactly its neighbours in U2 (it gets all their shares).
    needed = {v for v in u2 - u3 if set(graph[v]) & u3}
    secrets = u3 | needed
    if not u3 or any(len(set(graph[s]) & u3) < t for s in secrets):
        return u3, "requests"
    repliers = {u for u in u3 if stage[u] >= 4}
    if any(len(set(graph[s]) & repliers) < t for s in secrets):
        return u3, "result"
    return u3, None


def assert_never_both_kinds(out: Outcome, *, raw: bool = True) -> None:
    """No client has both b-shares and s-shares in the server's view."""
    kinds: dict[int, set[str]] = {}
    for owner, kind, holder in out.server.transcript:
        assert holder in out.server.u3
        kinds.setdefault(owner, set()).add(kind)
    if raw:  # every reply the server received, refused or not
        for reply in out.received.get("replies", {}).values():
            for owner in reply.self_mask_shares:
                kinds.setdefault(owner, set()).add("b")
            for owner in reply.key_shares:
                kinds.setdefault(owner, set()).add("s")
    both = {owner for owner, seen in kinds.items() if seen == {"b", "s"}}
    assert not both, f"the server saw both kinds of share of {sorted(both)}"
    for owner, seen in kinds.items():
        assert seen == ({"b"} if owner in out.server.u3 else {"s"}), (owner, seen)


def assert_exact(out: Outcome, survivors: Collection[int]) -> None:
    assert out.abort is None, out.abort
    assert out.total is not None
    assert out.total.dtype == np.uint64
    assert set(out.server.u3) == set(survivors)
    assert out.total.tolist() == out.plain_sum(survivors)


def params_of(n: int, k: int, t: int, m: int = 16, d: int = 64, server_round: int = 3) -> RoundParams:
    return RoundParams(server_round, n, k, t, m, d)


# -- 1. exactness -----------------------------------------------------------------------------
def test_full_round_no_dropouts() -> None:
    params = params_of(10, 4, 3, m=12, d=257)
    out = run_round(params, seed=1)
    assert_exact(out, range(10))
    assert not out.client_errors
    assert all(not refused for refused in out.refused.values())
    assert out.server.dropped_at == {}
    assert_never_both_kinds(out)
    # With no one dropped, only b-shares are revealed: one per (survivor, neighbour) edge.
    assert sorted(out.server.transcript) == sorted(
        (u, "b", w) for u in range(10) for w in harary_graph(4, 10)[u]
    )
    # Wire sizes: 168-byte ciphertexts, ceil(d * m / 8)-byte masked vectors.
    assert all(
        len(ct) == ciphertext_bytes() == 168 for s in out.received["shares"].values() for ct in s.values()
    )
    assert all(len(y) == math.ceil(257 * 12 / 8) for y, _ in out.received["masked"].values())


def test_largest_levels_do_not_wrap() -> None:
    # n levels of value 2**b - 1 at m = bit_length(n * (2**b - 1)): the sum is below 2**m.
    n, b = 7, 3
    m = (n * (2**b - 1)).bit_length()
    params = params_of(n, 4, 3, m=m, d=50)
    levels = np.full((n, 50), 2**b - 1, dtype=np.uint64)
    out = run_round(params, seed=2, levels=levels)
    assert_exact(out, range(n))
    assert out.total.tolist() == [n * (2**b - 1)] * 50


def _random_params(data: st.DataObject) -> RoundParams:
    n = data.draw(st.integers(3, 25), label="n")
    if data.draw(st.booleans(), label="finder"):
        delta = data.draw(st.sampled_from([0.0, 0.1, 0.2]), label="delta")
        found = find_graph_parameters(n, delta)
        k, t = found.degree, found.threshold
    else:
        degrees = [*range(2, n - 1, 2), n - 1]
        k = data.draw(st.sampled_from(degrees), label="k")
        t = data.draw(st.integers(k // 2 + 1, k), label="t")
    m = data.draw(st.integers(n.bit_length(), 62), label="m")
    d = data.draw(st.integers(1, 120), label="d")
    return RoundParams(data.draw(st.integers(0, 2**32 - 1), label="round"), n, k, t, m, d)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_cohorts_sum_exactly_or_abort_when_the_model_says(data: st.DataObject) -> None:
    params = _random_params(data)
    n = params.num_clients
    # Each client drops with probability `rate`, after a uniformly drawn stage (0..3).
    rate = data.draw(st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.3]), label="dropout rate")
    seed = data.draw(st.integers(0, 2**31), label="seed")
    rng = np.random.default_rng(seed)
    drops = rng.random(n) < rate
    last = {u: int(rng.integers(0, 4)) for u in range(n) if drops[u]}
    out = run_round(params, seed, last_stage=last)
    survivors, abort = expected_outcome(params, last)
    event(f"abort at {abort}" if abort else "exact sum")
    assert not out.client_errors  # honest clients never fail
    assert set(out.server.u3) == survivors
    if abort is None:
        assert_exact(out, survivors)
    else:
        assert out.abort is not None and out.abort_stage == abort
        if abort == "requests":
            assert out.server.transcript == []  # nothing revealed
    assert_never_both_kinds(out)


# Deterministic cases just above and just below the threshold, at every stage.
# H(4, 10): N(0) = {1, 2, 8, 9}; t = 3, so 0 may lose one neighbour, not two.
H4 = params_of(10, 4, 3, m=10, d=50)
# The complete graph K6 (k = 5, t = 3): every client may lose two neighbours, not three.
K6 = params_of(6, 5, 3, m=10, d=50)


@pytest.mark.parametrize(
    ("params", "last", "survivors", "abort", "dropped_reason"),
    [
        # Before advertising: K6 with 2 silent keeps everyone at t = 3 neighbours.
        (K6, {0: 0, 1: 0}, {2, 3, 4, 5}, None, {}),
        # ... with 3 silent, each of the rest has 2 < t: all are pruned, nobody can be unmasked.
        (K6, {0: 0, 1: 0, 2: 0}, set(), "requests", {3: "advertised keys"}),
        # After advertise: 1 silent keeps position 0 at exactly t = 3 sharing neighbours.
        (H4, {1: 1}, set(range(10)) - {1}, None, {}),
        (K6, {0: 1, 1: 1}, {2, 3, 4, 5}, None, {}),
        # ... 1 and 9 silent leave 0 with t - 1: 0 is dropped (and the ring of k = 4 unravels).
        (H4, {1: 1, 9: 1}, set(), "requests", {0: "shared keys"}),
        (K6, {0: 1, 1: 1, 2: 1}, set(), "requests", {3: "shared keys"}),
        # After share-keys: 1 dropped; 0 keeps t holders of b_0, 1's key has 4 holders.
        (H4, {1: 2}, set(range(10)) - {1}, None, {}),
        (K6, {0: 2, 1: 2}, {2, 3, 4, 5}, None, {}),
        # ... 1 and 9 dropped: b_0 has t - 1 holders: abort before anything is revealed.
        (H4, {1: 2, 9: 2}, set(range(10)) - {1, 9}, "requests", {}),
        (K6, {0: 2, 1: 2, 2: 2}, {3, 4, 5}, "requests", {}),
        # After masked input (no unmask reply): 1 silent, b_0 still gets t shares.
        (H4, {1: 3}, set(range(10)), None, {}),
        (K6, {0: 3, 1: 3}, set(range(6)), None, {}),
        # ... 1 and 9 silent: b_0 gets t - 1 shares: abort when the result is computed.
        (H4, {1: 3, 9: 3}, set(range(10)), "result", {}),
        (K6, {0: 3, 1: 3, 2: 3}, set(range(6)), "result", {}),
        # Mixed: 1 dropped after share-keys, 6 (or 2, next to 1) silent at unmask.
        (H4, {1: 2, 6: 3}, set(range(10)) - {1}, None, {}),
        (H4, {1: 2, 2: 3}, set(range(10)) - {1}, "result", {}),
    ],
)
def test_dropouts_at_the_threshold(
    params: RoundParams,
    last: dict[int, int],
    survivors: set[int],
    abort: str | None,
    dropped_reason: dict[int, str],
) -> None:
    assert expected_outcome(params, last) == (survivors, abort)  # the model agrees with the table
    out = run_round(params, seed=11, last_stage=last)
    assert not out.client_errors
    assert set(out.server.u3) == survivors
    if abort is None:
        assert_exact(out, survivors)
    else:
        assert isinstance(out.abort, SecAggAbortError)
        assert out.abort_stage == abort
        assert out.total is None
    if abort == "requests":
        assert out.server.transcript == [] and "replies" not in out.received
    for u, reason in dropped_reason.items():
        assert reason in out.server.dropped_at[u]
    assert_never_both_kinds(out)


def test_reply_lost_during_unmask_at_the_threshold() -> None:
    # The client computes its reply (and will refuse another request) but the reply is lost.
    def lose(*positions: int) -> Hook:
        return lambda replies, _out: {w: r for w, r in replies.items() if w not in positions}

    out = run_round(H4, seed=12, hooks={"replies": lose(1)})
    assert_exact(out, range(10))
    with pytest.raises(SecAggError, match="already revealed"):
        out.clients[1].unmask(*out.sent["requests"][1])
    out = run_round(H4, seed=12, hooks={"replies": lose(1, 9)})
    assert isinstance(out.abort, SecAggAbortError) and out.abort_stage == "result"
    assert "position 0" in str(out.abort)
    assert_never_both_kinds(out)


# -- 2. a curious server ----------------------------------------------------------------------
def _chi_square_uniform(values: np.ndarray, bins: int) -> tuple[float, float]:
    """The chi-square statistic of ``values`` against uniform on ``0..bins-1``, and the
    p = 0.001 critical value (scipy's, else the Wilson-Hilferty approximation)."""
    counts = np.bincount(values.astype(np.int64), minlength=bins)
    assert counts.size == bins
    expected = values.size / bins
    statistic = float(((counts - expected) ** 2 / expected).sum())
    df = bins - 1
    try:
        from scipy.stats import chi2

        critical = float(chi2.ppf(0.999, df))
    except ImportError:  # Wilson-Hilferty, z_{0.999} = 3.0902
        critical = df * (1 - 2 / (9 * df) + 3.0902 * math.sqrt(2 / (9 * df))) ** 3
    return statistic, critical


def _rebuild(shares: list[bytes], t: int) -> bytes:
    return shamir.reconstruct([shamir.decode_share(s) for s in shares], t)


def _pair_seed(secret: bytes, peer_public: bytes) -> bytes:
    key = crypto.private_key_from_secret(secret)
    return crypto.agree(key, crypto.public_key_from_bytes(peer_public), crypto.INFO_MASK_SEED)


def test_curious_server_learns_no_single_input() -> None:
    # H(6, 12), t = 4. Position 2 drops after share-keys (its key is rebuilt), 7 masks toward
    # 8 but 8 refuses 7's tampered share (7 is dropped, its vector was seen, its key rebuilt),
    # 10 stays silent at unmask (still a survivor). 20k elements at m = 8 for the chi-square.
    n, d, m = 12, 20_000, 8
    params = RoundParams(5, n, 6, 4, m, d)
    graph = harary_graph(6, n)

    def flip(fwd: dict[int, dict[int, bytes]], _out: Outcome) -> dict[int, dict[int, bytes]]:
        ct = bytearray(fwd[8][7])
        ct[40] ^= 0x01
        fwd[8][7] = bytes(ct)
        return fwd

    # Inputs far from uniform: every client sends the constant 5.
    levels = np.full((n, d), 5, dtype=np.uint64)
    out = run_round(params, seed=21, last_stage={2: 2, 10: 3}, hooks={"forward": flip}, levels=levels)
    survivors = set(range(n)) - {2, 7}
    assert_exact(out, survivors)
    assert out.total.tolist() == [5 * len(survivors)] * d
    assert_never_both_kinds(out)

    # The server's view: keys, ciphertexts, masked vectors, revealed shares.
    keys, masked, replies = out.received["keys"], out.received["masked"], out.received["replies"]
    t = params.threshold
    b_seeds = {
        u: _rebuild([r.self_mask_shares[u] for r in replies.values() if u in r.self_mask_shares], t)
        for u in survivors
    }
    s_secrets = {
        v: _rebuild([r.key_shares[v] for r in replies.values() if v in r.key_shares], t) for v in (2, 7)
    }
    # No b-share of a non-survivor and no s-share of a survivor was ever sent.
    assert all(set(r.self_mask_shares) <= survivors for r in replies.values())
    assert all(set(r.key_shares) <= {2, 7} for r in replies.values())

    statistic_x, critical = _chi_square_uniform(levels[0], 2**m)
    assert statistic_x > critical  # the test can tell the input is not uniform
    for u in sorted(masked):
        y = masking.unpack(masked[u][0], d, m)
        known_pairs = {(u, v): _pair_seed(s_secrets[v], keys[u][1]) for v in masked[u][1] if v in s_secrets}
        if u == 7:  # dropped: the server knows all its pairwise masks (from s_7), never b_7
            assert 7 not in b_seeds
            known_pairs = {(7, v): _pair_seed(s_secrets[7], keys[v][1]) for v in masked[7][1]}
            residual = masking.unmask_sum(y, [], known_pairs, m)
            hidden_by = {"b_7"}
        else:
            residual = masking.unmask_sum(y, [b_seeds[u]], known_pairs, m)
            hidden_by = {v for v in masked[u][1] if v in survivors}
            assert len(hidden_by) >= 1
        assert not np.array_equal(residual, levels[u]), u
        statistic, critical = _chi_square_uniform(residual, 2**m)
        assert statistic < critical, (u, statistic, critical, hidden_by)
        # Control: what hides x_u is exactly the masks the server cannot compute.
        secret_u = out.clients[u].export()["s-secret"]
        if u == 7:
            self_seed = out.clients[7].export()["self-seed"]
            assert isinstance(self_seed, bytes)
            full = masking.unmask_sum(residual, [self_seed], {}, m)
        else:
            unknown = {(u, v): _pair_seed(secret_u, keys[v][1]) for v in hidden_by}
            full = masking.unmask_sum(residual, [], unknown, m)
        np.testing.assert_array_equal(full, levels[u])
    assert 8 in graph[7] and 7 not in masked[8][1]


# -- 3. masked vectors look uniform -----------------------------------------------------------
def test_masked_vector_is_uniform() -> None:
    n, d, m = 5, 20_000, 8
    params = RoundParams(1, n, 4, 3, m, d)
    ramp = np.tile(np.arange(50, dtype=np.uint64), (n, d // 50))  # levels 0..49, far from uniform
    out = run_round(params, seed=31, levels=ramp)
    assert_exact(out, range(n))
    for u in (0, 3):
        y = masking.unpack(out.received["masked"][u][0], d, m)
        statistic, critical = _chi_square_uniform(y, 2**m)
        assert statistic < critical, (u, statistic, critical)
    assert _chi_square_uniform(ramp[0], 2**m)[0] > critical


# -- 4. bad input -----------------------------------------------------------------------------
H6 = params_of(12, 6, 4, m=9, d=50)  # 50 * 9 = 450 bits: the last byte has 6 padding bits


def _flip_share(sender: int, receiver: int) -> Hook:
    def hook(fwd: dict[int, dict[int, bytes]], _out: Outcome) -> dict[int, dict[int, bytes]]:
        ct = bytearray(fwd[receiver][sender])
        ct[-1] ^= 0x80
        fwd[receiver][sender] = bytes(ct)
        return fwd

    return hook


def _assert_lopsided(out: Outcome, sender: int, receiver: int) -> None:
    """``receiver`` refused ``sender``'s share: it did not mask with it, and ``sender`` (which
    masked toward ``receiver``) is dropped; the rest sum exactly."""
    n = out.params.num_clients
    assert sender not in out.received["masked"][receiver][1]
    assert receiver in out.received["masked"][sender][1]
    assert "did not accept" in out.refused["masked"][sender]
    assert out.server.dropped_at[sender].startswith("masked-input")
    assert_exact(out, set(range(n)) - {sender})
    assert_never_both_kinds(out)
    assert {(o, k) for o, k, _ in out.server.transcript if o == sender} == {(sender, "s")}


def test_flipped_ciphertext_bit_drops_the_masking_side() -> None:
    out = run_round(H6, seed=41, hooks={"forward": _flip_share(3, 4)})
    _assert_lopsided(out, sender=3, receiver=4)
    assert not out.client_errors


def test_flipped_bit_with_the_sender_at_the_higher_position() -> None:
    out = run_round(H4, seed=42, hooks={"forward": _flip_share(9, 0)})
    _assert_lopsided(out, sender=9, receiver=0)


def test_replayed_ciphertext_for_another_receiver_fails_authentication() -> None:
    # 3's share for 4 replayed to 5 (both neighbours of 3).
    def replay(fwd: dict[int, dict[int, bytes]], _out: Outcome) -> dict[int, dict[int, bytes]]:
        fwd[5][3] = fwd[4][3]
        return fwd

    out = run_round(H6, seed=43, hooks={"forward": replay})
    _assert_lopsided(out, sender=3, receiver=5)


def _reencrypt(round_delta: int, stage: int, sender: int = 3, receiver: int = 4) -> Hook:
    """Re-encrypt ``sender``'s true plaintext for ``receiver`` under the right key but with the
    associated data of another round or stage (what a share replayed from there carries)."""

    def hook(fwd: dict[int, dict[int, bytes]], out: Outcome) -> dict[int, dict[int, bytes]]:
        p = out.params
        secret = out.clients[sender].export()["c-secret"]
        assert isinstance(secret, bytes)
        peer = crypto.public_key_from_bytes(out.received["keys"][receiver][0])
        key = crypto.agree(crypto.private_key_from_secret(secret), peer, crypto.INFO_SHARE_KEY)
        true_ad = crypto.associated_data(sender, receiver, p.server_round, STAGE_SHARE_KEYS)
        plaintext = crypto.decrypt_share(key, fwd[receiver][sender], true_ad)
        ad = crypto.associated_data(sender, receiver, p.server_round + round_delta, stage)
        fwd[receiver][sender] = crypto.encrypt_share(key, plaintext, ad, b"\x07" * crypto.NONCE_BYTES)
        return fwd

    return hook


@pytest.mark.parametrize(
    ("round_delta", "stage", "refused"),
    [(0, STAGE_SHARE_KEYS, False), (1, STAGE_SHARE_KEYS, True), (0, STAGE_MASKED_INPUT, True)],
)
def test_ciphertext_from_another_round_or_stage_fails_authentication(
    round_delta: int, stage: int, refused: bool
) -> None:
    out = run_round(H6, seed=44, hooks={"forward": _reencrypt(round_delta, stage)})
    if refused:
        _assert_lopsided(out, sender=3, receiver=4)
    else:  # the control: the same plaintext under the right associated data is accepted
        assert_exact(out, range(H6.num_clients))


def test_masked_vector_of_the_wrong_length_or_with_padding_bits() -> None:
    def tamper(masked: dict[int, tuple[bytes, tuple[int, ...]]], _out: Outcome) -> dict:
        y2, w2 = masked[2]
        masked[2] = (y2[:-1], w2)  # one byte short
        y6, w6 = masked[6]
        masked[6] = (y6 + b"\x00", w6)  # one byte long
        y9, w9 = masked[9]
        masked[9] = (y9[:-1] + bytes([y9[-1] | 0x80]), w9)  # a padding bit set
        return masked

    assert (H6.vector_length * H6.field_bits) % 8 == 2
    out = run_round(H6, seed=45, hooks={"masked": tamper})
    refused = out.refused["masked"]
    assert set(refused) == {2, 6, 9}
    assert "bytes" in refused[2] and "bytes" in refused[6]
    assert "padding" in refused[9]
    assert_exact(out, set(range(12)) - {2, 6, 9})
    assert_never_both_kinds(out)


def test_duplicate_and_invalid_keys_are_refused_at_advertise() -> None:
    small = crypto._SMALL_ORDER_POINTS[0]
    params = params_of(16, 8, 5, m=9, d=50)  # each client may lose 3 of its 8 neighbours

    def tamper(keys: dict[int, tuple[bytes, bytes]], _out: Outcome) -> dict:
        keys[0] = (keys[0][0], small)  # an invalid (small-order) point
        keys[5] = (keys[5][0], keys[5][0])  # its two keys equal
        keys[11] = (keys[10][0], keys[11][1])  # copies 10's c-key
        return keys

    out = run_round(params, seed=46, hooks={"keys": tamper})
    refused = out.refused["keys"]
    assert set(refused) == {0, 5, 10, 11}
    assert "small order" in refused[0]
    # Whoever holds a repeated key cannot stay (the server cannot tell which is genuine).
    assert all("repeats" in refused[u] for u in (5, 10, 11))
    survivors = set(range(16)) - set(refused)
    assert out.server.u1 == survivors
    assert_exact(out, survivors)
    assert_never_both_kinds(out)


def test_duplicate_key_copied_by_a_lower_position_never_corrupts_the_sum() -> None:
    # Position 1 advertises 10's mask key: whichever of them the server kept, masks that do not
    # cancel would corrupt the sum silently, so neither may stay.
    def tamper(keys: dict[int, tuple[bytes, bytes]], _out: Outcome) -> dict:
        keys[1] = (keys[1][0], keys[10][1])
        return keys

    out = run_round(H6, seed=47, hooks={"keys": tamper})
    assert {1, 10} <= set(out.refused["keys"])
    assert_exact(out, set(range(12)) - {1, 10})


def test_client_refuses_an_invalid_forwarded_key() -> None:
    # A server forwarding a small-order key: the client stops (drops), nothing is sent by it.
    small = crypto._SMALL_ORDER_POINTS[2]

    def tamper(lists: dict[int, dict[int, tuple[bytes, bytes]]], _out: Outcome) -> dict:
        lists[0][1] = (small, lists[0][1][1])
        return lists

    out = run_round(H6, seed=48, hooks={"key_lists": tamper})
    assert set(out.client_errors) == {0}
    assert "small order" in str(out.client_errors[0])
    assert 0 not in out.received["shares"]
    assert_exact(out, set(range(12)) - {0})


def test_shares_addressed_to_a_non_neighbour() -> None:
    def tamper(shares: dict[int, dict[int, bytes]], _out: Outcome) -> dict:
        shares[3][9] = shares[3][4]  # 9 is not a neighbour of 3 in H(6, 12)
        shares[7] = {v: ct for v, ct in shares[7].items() if v != 8}  # one neighbour missing
        shares[10][11] = shares[10][11][:-1]  # a truncated ciphertext
        return shares

    assert 9 not in harary_graph(6, 12)[3]
    out = run_round(H6, seed=49, hooks={"shares": tamper})
    assert set(out.refused["shares"]) == {3, 7, 10}
    assert "not to its neighbours" in out.refused["shares"][3]
    assert "not to its neighbours" in out.refused["shares"][7]
    assert "168 bytes" in out.refused["shares"][10]
    assert_exact(out, set(range(12)) - {3, 7, 10})
    assert_never_both_kinds(out)


def test_masked_with_list_naming_a_non_neighbour() -> None:
    def tamper(masked: dict[int, tuple[bytes, tuple[int, ...]]], _out: Outcome) -> dict:
        y, listed = masked[3]
        masked[3] = (y, (*listed, 9))
        y, listed = masked[5]
        masked[5] = (y, (*listed, listed[0]))  # a repeated entry
        return masked

    out = run_round(H6, seed=50, hooks={"masked": tamper})
    assert set(out.refused["masked"]) == {3, 5}
    assert "masked-with" in out.refused["masked"][3]
    assert_exact(out, set(range(12)) - {3, 5})
    assert_never_both_kinds(out)


def test_unmask_reply_of_the_wrong_kind_is_refused() -> None:
    # Position 0 reveals its s-share of survivor 1 in place of the b-share.
    def tamper(replies: dict[int, UnmaskReply], _out: Outcome) -> dict:
        r = replies[0]
        share_1 = r.self_mask_shares[1]
        replies[0] = UnmaskReply(
            {u: s for u, s in r.self_mask_shares.items() if u != 1}, {**r.key_shares, 1: share_1}
        )
        return replies

    out = run_round(H6, seed=51, hooks={"replies": tamper})
    assert set(out.refused["replies"]) == {0}
    assert "asked for" in out.refused["replies"][0]
    assert all(w != 0 for _, _, w in out.server.transcript)  # nothing of the refused reply kept
    assert_exact(out, range(12))  # 5 other holders of each of 0's neighbours' b
    assert_never_both_kinds(out, raw=False)


def test_unmask_reply_with_unreadable_or_misindexed_shares_is_refused() -> None:
    def tamper(replies: dict[int, UnmaskReply], _out: Outcome) -> dict[int, UnmaskReply]:
        r0 = replies[0]
        first = min(r0.self_mask_shares)
        raw = bytearray(r0.self_mask_shares[first])
        raw[0] ^= 0x02  # index 1 -> 3: holder 2's index
        replies[0] = replace(r0, self_mask_shares={**r0.self_mask_shares, first: bytes(raw)})
        r1 = replies[1]
        replies[1] = replace(r1, self_mask_shares={u: b"abc" for u in r1.self_mask_shares})
        return replies

    out = run_round(H6, seed=57, hooks={"replies": tamper})
    assert set(out.refused["replies"]) == {0, 1}
    assert "another holder's index" in out.refused["replies"][0]
    assert "70 bytes" in out.refused["replies"][1]
    assert_exact(out, range(12))  # every b still has 4 = t holders among the other repliers
    assert_never_both_kinds(out)


def test_unmask_reply_with_a_swapped_share_value_aborts() -> None:
    # Position 0 sends its s-share of survivor 1 labelled as the b-share. More than t holders
    # reply, so the server finds that the shares of b_1 do not agree and aborts: never a
    # wrong sum, never a crash.
    stolen: dict[str, bytes] = {}

    def grab(requests: dict[int, Any], out: Outcome) -> dict[int, Any]:
        state: dict[str, Any] = dict(out.clients[0].export())
        held = dict(zip(state["held-positions"], state["held-key-shares"], strict=True))
        stolen["s"] = held[1]
        return requests

    def swap(replies: dict[int, UnmaskReply], out: Outcome) -> dict[int, UnmaskReply]:
        r = replies[0]
        assert r.self_mask_shares[1] != stolen["s"]
        replies[0] = replace(r, self_mask_shares={**r.self_mask_shares, 1: stolen["s"]})
        return replies

    out = run_round(H6, seed=52, hooks={"requests": grab, "replies": swap})
    assert isinstance(out.abort, SecAggAbortError) and out.abort_stage == "result"
    assert "position 1" in str(out.abort)
    assert out.total is None


def test_client_refuses_a_second_request_and_overlapping_lists() -> None:
    out = run_round(H6, seed=53)
    assert_exact(out, range(12))
    client = out.clients[4]
    with pytest.raises(SecAggError, match="already revealed"):
        client.unmask(*out.sent["requests"][4])
    # A fresh round stopped before unmask: overlapping lists are refused, and so is any
    # later request (a client reveals at most once).
    out = run_round(H6, seed=54, last_stage={4: 3})
    client = out.clients[4]
    survivors = tuple(range(12))
    with pytest.raises(SecAggError, match="both survived and dropped"):
        client.unmask(survivors, (5,))
    with pytest.raises(SecAggError, match="already revealed"):
        client.unmask(survivors, ())
    # A request that omits the client, or leaves it fewer than t surviving neighbours.
    out = run_round(H6, seed=55, last_stage={4: 3, 5: 3})
    with pytest.raises(SecAggError, match="among the survivors"):
        out.clients[4].unmask(tuple(set(survivors) - {4}), ())
    with pytest.raises(SecAggAbortError, match="neighbours survived"):
        out.clients[5].unmask((1, 2, 3, 5), ())


def test_out_of_order_messages_are_refused() -> None:
    params = H4
    source = SeededSecretSource(np.random.default_rng(56))
    client = ClientRound(params, 0, source.random_bytes)
    with pytest.raises(SecAggError, match="out of order"):
        client.masked_input({}, np.zeros(params.vector_length, dtype=np.uint64))
    client.advertise()
    with pytest.raises(SecAggError, match="out of order"):
        client.advertise()
    server = ServerRound(params)
    refused = server.receive_shares({0: {}}, {0: bytes(32)})
    assert "without having advertised" in refused[0]


# -- 5. export / restore ----------------------------------------------------------------------
@pytest.mark.parametrize("stages", [(1,), (2,), (3,), (4,), (1, 2, 3, 4)])
def test_export_restore_at_every_stage_matches_an_uninterrupted_client(stages: tuple[int, ...]) -> None:
    last = {1: 2, 6: 3}  # with dropouts, so that s-shares are revealed too
    plain = run_round(H6, seed=61, last_stage=last)
    resumed = run_round(H6, seed=61, last_stage=last, restore_at=stages)
    assert_exact(plain, set(range(12)) - {1})
    assert_exact(resumed, set(range(12)) - {1})
    assert resumed.total.tolist() == plain.total.tolist()
    # Byte for byte the same messages (the secret source is consumed in the same order).
    for name in ("keys", "shares", "masked", "replies"):
        assert resumed.received[name] == plain.received[name], name
    assert resumed.server.transcript == plain.server.transcript


def test_restore_after_unmask_still_refuses_a_second_request() -> None:
    out = run_round(H6, seed=62)
    state = out.clients[3].export()
    assert state["stage"] == -1 and state["revealed"] is True
    again = ClientRound.restore(state, lambda n: bytes(n))
    with pytest.raises(SecAggError, match="already revealed"):
        again.unmask(*out.sent["requests"][3])


def test_restore_refuses_a_state_it_did_not_write() -> None:
    out = run_round(H6, seed=63, last_stage={0: 2})
    state = out.clients[0].export()
    assert state["stage"] == STAGE_MASKED_INPUT
    for broken in (
        {k: v for k, v in state.items() if k != "c-secret"},
        {**state, "peer-c-keys": 7},
        {**state, "held-positions": [1, 2]},  # lengths disagree
    ):
        with pytest.raises(SecAggError, match="unreadable"):
            ClientRound.restore(broken, lambda n: bytes(n))
    restored = ClientRound.restore(state, lambda n: bytes(n))
    assert restored.export() == state
    assert restored.stage == STAGE_MASKED_INPUT != STAGE_UNMASK


# -- the field encoding through a round ---------------------------------------------------------
@pytest.mark.parametrize("codec", ["qsgd:8", "ternary", "rotate+qsgd:4"])
def test_encoded_updates_through_a_round_decode_to_the_weighted_sum(codec: str) -> None:
    from fedge.compression import parse_codec
    from fedge.secagg.encoding import FieldEncoding, layout

    n, max_weight = 8, 50
    enc = FieldEncoding.for_codec(parse_codec(codec), 8, 0.2, max_weight)
    records = {"model": {"w": np.zeros((6, 7), dtype=np.float32), "b": np.zeros(9, dtype=np.float32)}}
    seeds = [5, 6]
    slots, length = layout(enc, records, seeds)
    rng = np.random.default_rng(71)
    weights = [int(w) for w in rng.integers(1, 80, n)]  # some above the cap
    updates = [
        {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in records["model"].items()}
        for _ in range(n)
    ]
    levels = np.zeros((n, length), dtype=np.uint64)
    for i in range(n):
        for slot in slots:
            q = enc.encode_tensor(
                updates[i][slot.name], weights[i], np.random.default_rng(i), slot.rotation_seed
            )
            levels[i, slot.start : slot.start + slot.length] = q
        levels[i, length - enc.weight_digits() :] = enc.encode_weight(weights[i])
    params = RoundParams(9, n, 4, 3, enc.field_bits(n), length)
    out = run_round(params, seed=72, last_stage={2: 2}, levels=levels)
    survivors = set(range(n)) - {2}
    assert_exact(out, survivors)
    assert out.total is not None
    assert enc.decode_weight(out.total[length - enc.weight_digits() :]) == sum(
        min(weights[i], max_weight) for i in survivors
    )
    for slot in slots:
        got = enc.decode_tensor(
            out.total[slot.start : slot.start + slot.length], len(survivors), slot.size, slot.rotation_seed
        )
        each = sum(
            enc.decode_tensor(
                levels[i, slot.start : slot.start + slot.length], 1, slot.size, slot.rotation_seed
            )
            for i in survivors
        )
        np.testing.assert_allclose(
            got, each, rtol=1e-5 if enc.rotate else 1e-9, atol=1e-5 if enc.rotate else 1e-12
        )


def test_keys_from_outside_the_cohort_and_late_senders_are_refused() -> None:
    def tamper(keys: dict[int, tuple[bytes, bytes]], _out: Outcome) -> dict:
        keys[99] = keys.pop(4)
        return keys

    out = run_round(H6, seed=73, hooks={"keys": tamper})
    assert "position must be in" in out.refused["keys"][99]
    assert_exact(out, set(range(12)) - {4})
    server = ServerRound(H6)
    assert "without having shared keys" in server.receive_masked({0: (b"", ())})[0]
    assert "without being a survivor" in server.receive_unmask({0: UnmaskReply({}, {})})[0]


# -- found in review --------------------------------------------------------------------------
def test_an_altered_share_with_exactly_t_holders_aborts_instead_of_a_wrong_sum() -> None:
    # K4 (k = 3 = t): client 0's self-mask seed has exactly t holders, so no second
    # reconstruction can cross-check it. Holder 3 shifts its share so that the rebuilt seed
    # is b_0 + 1, a valid 32-byte value: only the seed commitment can catch it.
    params = params_of(4, 3, 3, m=10, d=50)
    xs = [2, 3, 4]  # holders 1, 2, 3 -> share indices
    lam = 1
    for x in xs[:2]:
        lam = lam * x * pow(x - 4, -1, shamir.PRIME) % shamir.PRIME  # Lagrange coefficient of x = 4 at 0

    def shift(replies: dict[int, UnmaskReply], _out: Outcome) -> dict[int, UnmaskReply]:
        r = replies[3]
        share = shamir.decode_share(r.self_mask_shares[0])
        moved = shamir.Share(share.index, (share.value + pow(lam, -1, shamir.PRIME)) % shamir.PRIME)
        replies[3] = replace(r, self_mask_shares={**r.self_mask_shares, 0: shamir.encode_share(moved)})
        return replies

    out = run_round(params, seed=61, hooks={"replies": shift})
    assert isinstance(out.abort, SecAggAbortError) and out.abort_stage == "result"
    assert "committed to" in str(out.abort) and "position 0" in str(out.abort)
    assert out.total is None
    # The control: the same shift without a commitment check would have rebuilt b_0 + 1.
    honest = out.clients[0].export()["self-seed"]
    assert isinstance(honest, bytes)
    rebuilt = shamir.reconstruct(
        [
            shamir.decode_share(r.self_mask_shares[0])
            for _, r in sorted(out.received["replies"].items())
            if 0 in r.self_mask_shares
        ],
        3,
    )
    assert int.from_bytes(rebuilt, "little") == int.from_bytes(honest, "little") + 1


def test_a_round_below_the_loops_minimum_aborts_before_any_share_is_revealed() -> None:
    # 0 and 5 drop after share-keys: 8 masked inputs, but the round needs 9.
    out = run_round(H4, seed=62, last_stage={0: 2, 5: 2}, min_survivors=9)
    assert isinstance(out.abort, SecAggAbortError) and out.abort_stage == "requests"
    assert "fewer than the 9" in str(out.abort)
    assert out.server.transcript == [] and "replies" not in out.received
    # With a minimum of 8 the same round sums exactly.
    assert_exact(run_round(H4, seed=62, last_stage={0: 2, 5: 2}, min_survivors=8), set(range(10)) - {0, 5})


def test_a_client_refuses_a_degree_beyond_its_cap() -> None:
    from fedge.secagg.protocol import MAX_DEGREE

    params = RoundParams(1, 3000, MAX_DEGREE + 2, MAX_DEGREE // 2 + 2, 16, 10)
    with pytest.raises(SecAggError, match=f"at most {MAX_DEGREE}"):
        ClientRound(params, 0, SeededSecretSource(np.random.default_rng(63)).random_bytes)


def test_shares_without_a_valid_commitment_are_refused() -> None:
    params = H4
    source = SeededSecretSource(np.random.default_rng(64))
    clients = {u: ClientRound(params, u, source.random_bytes) for u in range(params.num_clients)}
    server = ServerRound(params)
    server.receive_keys({u: c.advertise() for u, c in clients.items()})
    lists = server.key_lists()
    shares = {u: clients[u].share_keys(lists[u]) for u in clients}
    commitments = {u: clients[u].self_mask_commitment for u in clients}
    del commitments[1]  # two positions far apart: each neighbour keeps t = 3 others
    commitments[6] = commitments[6][:31]
    refused = server.receive_shares(shares, commitments)
    assert set(refused) == {1, 6} and all("commitment" in r for r in refused.values())
