"""The SecAgg+ communication graph: a k-regular Harary graph and its parameter finder.

In SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, CCS 2020) a client masks its input
only with its ``k`` neighbours and shares its secrets only among them, so its cost grows
with ``k = O(log n)`` instead of ``n``. The paper draws a random ``k``-regular graph; Google's
``fcp/secagg`` uses a Harary graph ``H(k, n)`` over a random permutation of the cohort,
which is what is built here: the caller assigns positions ``0..n-1`` to the sampled clients
by a uniformly random permutation drawn after sampling, so which positions drop or are
corrupt is a uniformly random set with respect to the graph (the bounds below assume it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedge.secagg.errors import SecAggError

DEFAULT_SECURITY_BITS = 40
DEFAULT_CORRECTNESS_BITS = 20


def harary_graph(degree: int, num_nodes: int) -> tuple[tuple[int, ...], ...]:
    """Neighbours of each position in the Harary graph ``H(degree, num_nodes)``.

    For even ``k = degree < n - 1`` position ``i`` is adjacent to ``i ± 1, ..., i ± k/2
    (mod n)``: a circulant graph, ``k``-regular and ``k``-vertex-connected. ``degree = n - 1``
    is the complete graph (plain SecAgg, any parity). Odd ``k < n - 1`` is refused: Harary's
    odd construction adds diameter chords, which for odd ``n`` makes one node of degree
    ``k + 1``; the parameter finder only returns even degrees or ``n - 1``.

    Parameters
    ----------
    degree : int
        ``k``: even in ``2..n-2``, or ``n - 1``.
    num_nodes : int
        ``n >= 2``, the cohort size.

    Returns
    -------
    tuple of tuple of int
        ``result[i]`` is the sorted neighbours of position ``i`` (``i`` itself excluded).

    Raises
    ------
    SecAggError
        On a degree or size out of range.
    """
    if num_nodes < 2:
        raise SecAggError(f"a SecAgg graph needs at least 2 nodes, got {num_nodes}")
    if degree == num_nodes - 1:
        return tuple(tuple(j for j in range(num_nodes) if j != i) for i in range(num_nodes))
    if not (2 <= degree < num_nodes - 1 and degree % 2 == 0):
        raise SecAggError(
            f"degree must be even in 2..{num_nodes - 2} or equal to num_nodes - 1 = {num_nodes - 1}, "
            f"got {degree}"
        )
    half = degree // 2
    return tuple(
        tuple(sorted({(i + d) % num_nodes for d in range(-half, half + 1) if d != 0}))
        for i in range(num_nodes)
    )


def harary_neighbors(degree: int, num_nodes: int, position: int) -> tuple[int, ...]:
    """``harary_graph(degree, num_nodes)[position]``, without building the whole graph.

    A client gets ``n`` and ``k`` from the server: computing only its own row keeps its
    work at ``O(k)`` (``O(n)`` for the complete graph), whatever ``n`` a message names.

    Raises
    ------
    SecAggError
        As :func:`harary_graph`, or on a position outside ``0..n-1``.
    """
    if num_nodes < 2:
        raise SecAggError(f"a SecAgg graph needs at least 2 nodes, got {num_nodes}")
    if not 0 <= position < num_nodes:
        raise SecAggError(f"position must be in 0..{num_nodes - 1}, got {position}")
    if degree == num_nodes - 1:
        return tuple(j for j in range(num_nodes) if j != position)
    if not (2 <= degree < num_nodes - 1 and degree % 2 == 0):
        raise SecAggError(
            f"degree must be even in 2..{num_nodes - 2} or equal to num_nodes - 1 = {num_nodes - 1}, "
            f"got {degree}"
        )
    half = degree // 2
    return tuple(sorted({(position + d) % num_nodes for d in range(-half, half + 1) if d != 0}))


def _hypergeometric_sf(k: int, population: int, marked: int, draws: int) -> float:
    """``P[X >= k]`` for ``X`` the marked items among ``draws`` drawn without replacement."""
    total = math.comb(population, draws)
    upper = min(marked, draws)
    return min(
        1.0,
        sum(
            math.comb(marked, i) * math.comb(population - marked, draws - i)
            for i in range(max(k, 0), upper + 1)
        )
        / total,
    )


@dataclass(frozen=True)
class GraphParameters:
    """The degree and threshold a cohort runs with, and the failure bounds they meet.

    Attributes
    ----------
    degree : int
        ``k``, neighbours per client.
    threshold : int
        ``t``, Shamir threshold among a client's ``k`` neighbours.
    correctness_failure : float
        Upper bound on the probability that some client keeps fewer than ``t`` surviving
        neighbours (the round then aborts).
    security_failure : float
        Upper bound on the probability that the honest survivors' graph disconnects or some
        client has ``t`` corrupt neighbours.
    """

    degree: int
    threshold: int
    correctness_failure: float
    security_failure: float


def failure_bounds(
    num_clients: int, degree: int, threshold: int, max_dropout: float, corrupt_fraction: float = 0.0
) -> tuple[float, float]:
    """Union bounds ``(correctness_failure, security_failure)`` for ``H(degree, num_clients)``.

    As in the paper, ``delta = max_dropout`` and ``gamma = corrupt_fraction`` bound the
    fractions of the cohort that drop and that collude with the server: at most
    ``D = floor(delta * n)`` clients drop and ``C = floor(gamma * n)`` are corrupt. Those sets
    may be chosen by anyone who does not know the graph; the positions are a uniformly random
    permutation, so a client's ``k`` neighbours are ``k`` draws without replacement from the
    other ``n - 1`` clients, and the number of dropped (corrupt) ones among them is
    hypergeometric ``X ~ HG(n - 1, D, k)`` (``HG(n - 1, C, k)``). With ``k = degree`` and
    ``t = threshold``:

    - correctness fails if some client keeps fewer than ``t`` surviving neighbours, so its
      self-mask or pairwise masks cannot be removed:
      ``P_c <= n * P[HG(n - 1, D, k) >= k - t + 1]``;
    - security fails if some client has ``t`` or more corrupt neighbours (they could rebuild
      its secrets), ``n * P[HG(n - 1, C, k) >= t]``, or if the graph of honest survivors is
      disconnected (the server would learn the sums of its parts, not just the total). In
      the circulant ``H(k, n)`` the remaining nodes stay connected unless two disjoint runs of
      ``k/2`` consecutive positions are all removed (dropped or corrupt, ``R = D + C`` of
      them); there are at most ``C(n, 2)`` pairs of run starts, so
      ``P <= C(n, 2) * prod_{i<k} (R - i) / (n - i)``. ``P_s`` is the sum of the two.
      The complete graph (``k = n - 1``) cannot disconnect.

    The semi-honest server of the issue's threat model never receives both shares of one
    client, whatever ``t``; ``t > k/2`` is still required (:func:`find_graph_parameters`) so
    that a server lying about who dropped cannot collect both, as in the paper.
    """
    n, k, t = num_clients, degree, threshold
    dropped = math.floor(max_dropout * n)
    corrupt = math.floor(corrupt_fraction * n)
    correctness = min(1.0, n * _hypergeometric_sf(k - t + 1, n - 1, dropped, k))
    collusion = n * _hypergeometric_sf(t, n - 1, corrupt, k) if corrupt > 0 else 0.0
    removed = min(n, dropped + corrupt)
    disconnect = 0.0
    if k < n - 1:
        disconnect = float(math.comb(n, 2))
        for i in range(k):
            disconnect *= max(removed - i, 0) / (n - i)
    return correctness, min(1.0, collusion + disconnect)


def find_graph_parameters(
    num_clients: int,
    max_dropout: float,
    security_bits: int = DEFAULT_SECURITY_BITS,
    correctness_bits: int = DEFAULT_CORRECTNESS_BITS,
    corrupt_fraction: float = 0.0,
) -> GraphParameters:
    """The smallest degree ``k`` (and its threshold ``t``) meeting both failure targets.

    Searches ``k = 2, 4, 6, ... < n - 1``, then ``k = n - 1`` (the complete graph: plain
    SecAgg). For each ``k`` the threshold is the smallest ``t >= floor(k/2) + 1`` whose
    security bound (:func:`failure_bounds`) is at most ``2**-security_bits``: the smallest
    secure ``t`` leaves the most room for dropouts. The first ``k`` whose correctness bound
    at that ``t`` is at most ``2**-correctness_bits`` is returned.

    This implements the paper's conditions (Bell et al., CCS 2020, Sec. 3: each neighbourhood
    keeps ``t`` survivors, fewer than ``t`` corrupt, the honest survivors stay connected) with
    the union bounds written in :func:`failure_bounds`, for FCP's Harary graph; it does not
    reproduce FCP's graph parameter finder number for number (those tables are not available
    here), and its bounds are conservative (a union bound over clients and runs).

    Parameters
    ----------
    num_clients : int
        ``n``, the cohort size (>= 2).
    max_dropout : float
        ``delta`` in [0, 1): declared fraction of clients that may drop.
    security_bits : int, default 40
        ``sigma``: security failure at most ``2**-sigma``.
    correctness_bits : int, default 20
        ``eta``: the round aborts with probability at most ``2**-eta``.
    corrupt_fraction : float, default 0.0
        ``gamma`` in [0, 1): clients that may collude with the server.

    Returns
    -------
    GraphParameters

    Raises
    ------
    SecAggError
        On parameters out of range, or if even the complete graph misses a target (lower
        ``max_dropout``, sample more clients, or relax the bits).
    """
    if num_clients < 2:
        raise SecAggError(f"secure aggregation needs at least 2 clients, got {num_clients}")
    if not 0.0 <= max_dropout < 1.0:
        raise SecAggError(f"max_dropout must be in [0, 1), got {max_dropout}")
    if not 0.0 <= corrupt_fraction < 1.0:
        raise SecAggError(f"corrupt_fraction must be in [0, 1), got {corrupt_fraction}")
    if security_bits < 1 or correctness_bits < 1:
        raise SecAggError("security_bits and correctness_bits must be >= 1")
    security_target, correctness_target = 2.0**-security_bits, 2.0**-correctness_bits
    degrees = [*range(2, num_clients - 1, 2), num_clients - 1]
    for k in degrees:
        for t in range(k // 2 + 1, k + 1):
            correctness, security = failure_bounds(num_clients, k, t, max_dropout, corrupt_fraction)
            if security <= security_target:
                if correctness <= correctness_target:
                    return GraphParameters(k, t, correctness, security)
                break  # a larger t only lowers correctness further
    raise SecAggError(
        f"no degree meets 2**-{security_bits} security and 2**-{correctness_bits} correctness for "
        f"{num_clients} clients with max_dropout={max_dropout}: lower secagg-max-dropout or sample "
        "more clients"
    )
