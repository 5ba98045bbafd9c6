"""Who masks with whom in pairwise secure aggregation: the mask graph, and its connected parts."""

from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["mask_graph", "components", "holders", "exposed"]


def mask_graph(names: Sequence[str], neighbours: int) -> dict[str, frozenset[str]]:
    """Who masks with whom: each node's pair-mask partners among ``names``.

    ``neighbours`` = 0, or at least ``len(names) - 1``: the complete graph (Bonawitz et al.).
    Otherwise the Harary graph H(k, n) on the names in sorted order, k = ``neighbours``
    (SecAgg+, Bell et al. CCS 2020, with a deterministic k-connected graph instead of a random
    one): node i pairs with i ± 1, ..., i ± k/2 (mod n), and for odd k also with the node
    opposite it.  Every node has at least k partners and the graph stays connected after
    removing any k − 1 nodes.  Hub and nodes compute the same graph from the roster.
    """
    order = sorted(names)
    n = len(order)
    if neighbours == 1 or neighbours < 0:
        raise ValueError(f"neighbours must be 0 (every other node) or at least 2, got {neighbours}")
    if neighbours == 0 or neighbours >= n - 1:
        return {a: frozenset(b for b in order if b != a) for a in order}
    edges: set[tuple[int, int]] = set()

    def link(i: int, j: int) -> None:
        i, j = i % n, j % n
        if i != j:
            edges.add((min(i, j), max(i, j)))

    for i in range(n):
        for step in range(1, neighbours // 2 + 1):
            link(i, i + step)
    if neighbours % 2:
        if n % 2 == 0:
            for i in range(n // 2):
                link(i, i + n // 2)
        else:
            for i in range((n + 1) // 2):
                link(i, i + (n + 1) // 2)
    graph: dict[str, set[str]] = {a: set() for a in order}
    for i, j in edges:
        graph[order[i]].add(order[j])
        graph[order[j]].add(order[i])
    return {a: frozenset(peers) for a, peers in graph.items()}


def components(graph: Mapping[str, frozenset[str]], nodes: Sequence[str]) -> list[list[str]]:
    """The connected components of ``graph`` restricted to ``nodes`` (sorted lists, sorted by first name)."""
    left, found = set(nodes), []
    while left:
        first = min(left)
        seen, todo = {first}, [first]
        while todo:
            for peer in graph[todo.pop()]:
                if peer in left and peer not in seen:
                    seen.add(peer)
                    todo.append(peer)
        left -= seen
        found.append(sorted(seen))
    return sorted(found)


def holders(graph: Mapping[str, frozenset[str]], node: str) -> list[str]:
    """The holders of ``node``'s Shamir shares: its partners and itself, sorted."""
    return sorted(graph[node] | {node})


def exposed(graph: Mapping[str, frozenset[str]], survivors: Sequence[str]) -> list[str]:
    """The survivors that would keep a single mask partner among ``survivors``: that one partner, colluding with
    the hub, would open their update (the other partners' masks come off: their self masks as survivors', or
    their mask keys as dropped nodes').  Empty for a sum of two (any aggregate of two tells each its partner's)."""
    if len(survivors) < 3:
        return []
    inside = set(survivors)
    return sorted(u for u in survivors if len(graph[u] & inside) < 2)
