"""fedge.secagg.graph: the Harary graph H(k, n) and the degree/threshold finder."""

from __future__ import annotations

import itertools
from fractions import Fraction
from math import comb

import pytest

from fedge.secagg.errors import SecAggError
from fedge.secagg.graph import failure_bounds, find_graph_parameters, harary_graph


def _connected(graph: tuple[tuple[int, ...], ...], removed: frozenset[int] = frozenset()) -> bool:
    alive = [i for i in range(len(graph)) if i not in removed]
    if not alive:
        return True
    seen, stack = {alive[0]}, [alive[0]]
    while stack:
        for j in graph[stack.pop()]:
            if j not in removed and j not in seen:
                seen.add(j)
                stack.append(j)
    return len(seen) == len(alive)


@pytest.mark.parametrize(("degree", "num_nodes"), [(2, 3), (2, 10), (4, 9), (6, 13), (8, 40), (4, 5), (5, 6)])
def test_harary_graph_is_regular_symmetric_connected(degree: int, num_nodes: int) -> None:
    graph = harary_graph(degree, num_nodes)
    assert len(graph) == num_nodes
    for i, neighbors in enumerate(graph):
        assert len(neighbors) == len(set(neighbors)) == degree
        assert i not in neighbors
        assert all(i in graph[j] for j in neighbors)
    assert _connected(graph)


def test_harary_neighbors_closed_form() -> None:
    graph = harary_graph(4, 10)
    assert graph[0] == (1, 2, 8, 9)
    assert graph[5] == (3, 4, 6, 7)
    assert harary_graph(3, 4)[0] == (1, 2, 3)  # k = n - 1: complete


@pytest.mark.parametrize(("degree", "num_nodes"), [(2, 9), (4, 9), (4, 11), (6, 12)])
def test_vertex_connectivity_is_the_degree(degree: int, num_nodes: int) -> None:
    graph = harary_graph(degree, num_nodes)
    for removed in itertools.combinations(range(num_nodes), degree - 1):
        assert _connected(graph, frozenset(removed))
    # Two blocks of k/2 consecutive positions, on opposite sides, cut it in two.
    half = degree // 2
    cut = frozenset([*range(1, 1 + half), *range(num_nodes // 2 + 1, num_nodes // 2 + 1 + half)])
    assert not _connected(graph, cut)


@pytest.mark.parametrize(("degree", "num_nodes"), [(3, 10), (0, 10), (10, 10), (2, 1)])
def test_bad_degrees_are_refused(degree: int, num_nodes: int) -> None:
    with pytest.raises(SecAggError):
        harary_graph(degree, num_nodes)


def test_failure_bounds_closed_forms() -> None:
    # n = 20, delta = 0.1: D = 2 dropped. k = 4, t = 3 fails when both dropped are among the 4
    # neighbours drawn from 19: C(2,2) C(17,2) / C(19,4) = 136 / 3876, times 20 clients.
    correctness, security = failure_bounds(20, 4, 3, 0.1)
    assert correctness == pytest.approx(20 * 136 / 3876, rel=1e-12)
    assert security == 0.0  # 2 removed cannot cover two runs of 2
    # n = 100, delta = 0.1, k = 4: C(100, 2) * (10 * 9 * 8 * 7) / (100 * 99 * 98 * 97).
    _, security = failure_bounds(100, 4, 3, 0.1)
    assert security == pytest.approx(float(Fraction(comb(100, 2) * 10 * 9 * 8 * 7, 100 * 99 * 98 * 97)))
    # Corrupt clients: n = 10, gamma = 0.2 (C = 2), k = 2, t = 2: both neighbours corrupt with
    # probability 1 / C(9, 2); plus the disconnect term for R = 2 removed: C(10,2) * 2/10 * 1/9.
    _, security = failure_bounds(10, 2, 2, 0.0, corrupt_fraction=0.2)
    assert security == pytest.approx(min(1.0, 10 / 36 + 45 * 2 / 90))


def test_finder_closed_form_small_cases() -> None:
    # No dropout: the ring (k = 2, t = 2) never loses a neighbour and never disconnects.
    found = find_graph_parameters(10, 0.0)
    assert (found.degree, found.threshold) == (2, 2)
    # n = 5, delta = 0.2 (1 dropped): k = 2 fails with probability 5 * (1 - C(3,2)/C(4,2)) = 2.5 > 0;
    # the complete graph k = 4, t = 3 keeps 3 survivors always.
    found = find_graph_parameters(5, 0.2)
    assert (found.degree, found.threshold) == (4, 3)
    # n = 20, delta = 0.1 (2 dropped): k = 4 fails (above); k = 6, t = 4 needs 3 dropped neighbours.
    found = find_graph_parameters(20, 0.1)
    assert (found.degree, found.threshold) == (6, 4)
    assert found.correctness_failure == 0.0 and found.security_failure == 0.0


@pytest.mark.parametrize("num_clients", [50, 100, 1000])
def test_more_dropout_needs_more_neighbors(num_clients: int) -> None:
    degrees = [find_graph_parameters(num_clients, d).degree for d in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)]
    assert degrees == sorted(degrees)
    assert degrees[0] < degrees[2] < degrees[-1]


@pytest.mark.parametrize(
    ("num_clients", "max_dropout"), [(100, 0.1), (1000, 0.1), (1000, 0.3), (10_000, 0.05)]
)
def test_finder_meets_targets_minimally(num_clients: int, max_dropout: float) -> None:
    found = find_graph_parameters(num_clients, max_dropout, security_bits=40, correctness_bits=20)
    assert found.degree % 2 == 0 or found.degree == num_clients - 1
    assert found.threshold > found.degree // 2
    correctness, security = failure_bounds(num_clients, found.degree, found.threshold, max_dropout)
    assert correctness <= 2.0**-20 and security <= 2.0**-40
    assert (correctness, security) == (found.correctness_failure, found.security_failure)
    smaller = found.degree - 2
    for t in range(smaller // 2 + 1, smaller + 1):
        c, s = failure_bounds(num_clients, smaller, t, max_dropout)
        assert c > 2.0**-20 or s > 2.0**-40
    if max_dropout <= 0.1:
        assert found.degree < 80  # logarithmic, far below n


def test_finder_refuses_impossible_targets() -> None:
    with pytest.raises(SecAggError, match="secagg-max-dropout"):
        find_graph_parameters(100, 0.5)
    with pytest.raises(SecAggError, match="max_dropout"):
        find_graph_parameters(100, 1.0)
    with pytest.raises(SecAggError, match="at least 2"):
        find_graph_parameters(1, 0.0)


@pytest.mark.parametrize(("degree", "num_nodes"), [(2, 5), (4, 10), (6, 9), (22, 100), (4, 5), (9, 10)])
def test_one_row_equals_the_whole_graphs_row(degree: int, num_nodes: int) -> None:
    from fedge.secagg.graph import harary_neighbors

    graph = harary_graph(degree, num_nodes)
    assert [harary_neighbors(degree, num_nodes, i) for i in range(num_nodes)] == list(graph)


def test_one_row_of_a_huge_graph_is_cheap_and_bad_rows_are_refused() -> None:
    from fedge.secagg.graph import harary_neighbors

    # A message naming 65,535 clients costs a client its own row only.
    assert harary_neighbors(22, 65_535, 0) == (*range(1, 12), *range(65_524, 65_535))
    with pytest.raises(SecAggError, match="position"):
        harary_neighbors(4, 10, 10)
    with pytest.raises(SecAggError, match="even"):
        harary_neighbors(3, 10, 0)
