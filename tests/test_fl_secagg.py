"""Secure aggregation (fl.secagg) against plaintext FedAvg, and what the hub can see."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fl.config import parse_config
from fl.errors import RoundFailed, TooFewNodes
from fl.secagg import (
    RING_DTYPES,
    HubSecAgg,
    NodeSecAgg,
    Stage,
    _MASK_CHUNK,
    _apply_masks,
    components,
    decode_sum,
    encode_update,
    mask_graph,
    prg_mask,
    update_limit,
)
from mpc.errors import ConfigError, EncodingRangeError, ProtocolError
from mpc.prg import Stream
from mpc.ring import encode


def run_round(updates, weights, *, ring_bits=32, frac_bits=16, upload=None, min_nodes=2, neighbours=0):
    """Run every stage; ``upload`` names the nodes whose masked update reaches the hub (default all)."""
    names = sorted(updates)
    size = len(next(iter(updates.values())))
    hub = HubSecAgg(1, weights, size, frac_bits, ring_bits, min_nodes, neighbours=neighbours)
    nodes = {n: NodeSecAgg(n, b"test|1", frac_bits, ring_bits, neighbours) for n in names}
    for n in names:
        hub.add_public_key(n, nodes[n].public_key())
    roster = hub.close_keys()
    views = {}
    for n in names:
        nodes[n].set_roster(roster)
        masked = nodes[n].mask(updates[n], weights[n])
        views[n] = masked.copy()
        if upload is None or n in upload:
            hub.add_masked(n, masked)
    included, dropped = hub.close_uploads()
    reveals = {}
    for n in included:
        reveals[n] = nodes[n].reveal(included, dropped)
        hub.add_reveal(n, *reveals[n])
    mean, inc = hub.result()
    return mean, inc, dropped, views, reveals


def fedavg(updates, weights, names):
    total = sum(weights[n] * updates[n].astype(np.float64) for n in names)
    return total / sum(weights[n] for n in names)


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_secure_sum_equals_fedavg_within_fixed_point_error(rng, ring_bits, count):
    names = [f"node{i}" for i in range(count)]
    updates = {n: rng.normal(scale=0.05, size=1000).astype(np.float32) for n in names}
    raw = rng.integers(1, 500, size=count)
    weights = {n: float(w) / raw.sum() for n, w in zip(names, raw)}
    frac_bits = 16
    mean, included, dropped, _, _ = run_round(updates, weights, ring_bits=ring_bits, frac_bits=frac_bits)
    assert included == names and dropped == []
    bound = count * 2.0 ** -(frac_bits + 1)  # one rounding per node; the weights sum to one
    err = np.abs(mean - fedavg(updates, weights, names)).max()
    assert err <= bound
    assert err > 0  # the result really went through fixed point


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_dropped_nodes_are_recovered_from_the_survivors_pair_seeds(rng, ring_bits):
    names = ["a", "b", "c", "d", "e"]
    updates = {n: rng.normal(size=777).astype(np.float32) for n in names}
    weights = {n: 0.2 for n in names}
    mean, included, dropped, _, reveals = run_round(updates, weights, ring_bits=ring_bits, upload={"a", "c", "e"})
    assert included == ["a", "c", "e"] and dropped == ["b", "d"]
    assert all(set(pairs) == {"b", "d"} for _, pairs in reveals.values())
    survivors_weight = 0.6
    assert np.abs(mean - fedavg(updates, weights, included)).max() <= 3 * 2.0**-17 / survivors_weight


def _chi_square_uniform(values: np.ndarray, bins: int) -> float:
    counts = np.bincount(values, minlength=bins).astype(np.float64)
    expected = len(values) / bins
    return float(((counts - expected) ** 2 / expected).sum())


def _assert_uniform_ring32(view: np.ndarray) -> None:
    """Top and bottom bytes of uniform 32-bit words are uniform: chi-square far below a 1e-6 tail."""
    # For 255 degrees of freedom the 1e-6 upper tail is about 386.
    for shift in (0, 24):
        chi2 = _chi_square_uniform(((view >> shift) & 0xFF).astype(np.int64), 256)
        assert chi2 < 386, f"byte at shift {shift} is not uniform (chi-square {chi2:.0f})"
    assert abs(view.astype(np.float64).mean() / 2.0**32 - 0.5) < 0.01


@pytest.mark.parametrize("upload", [None, {"a", "b"}])
def test_the_hubs_view_of_one_update_is_uniform(upload):
    """What the hub holds about node a — its masked upload, and after unmasking that upload minus
    every mask the hub can recompute — is uniformly random, whatever a's update is."""
    size = 1 << 16
    names = ["a", "b", "c"]
    for fill in (0.0, 1000.0):  # an all-zero update and a large constant one: both look uniform
        updates = {n: np.full(size, fill if n == "a" else 0.5, dtype=np.float32) for n in names}
        weights = {n: 1 / 3 for n in names}
        _, included, dropped, views, reveals = run_round(updates, weights, upload=upload)
        upload_a = views["a"]
        _assert_uniform_ring32(upload_a)
        self_seed, pair_seeds = reveals["a"]
        residue = upload_a - prg_mask(self_seed, size, 32)
        for d, seed in pair_seeds.items():
            residue = residue - prg_mask(seed, size, 32) if "a" < d else residue + prg_mask(seed, size, 32)
        # the hub removed everything it can; what is left of a's update is still masked by b's pair mask
        _assert_uniform_ring32(residue)
        assert not np.array_equal(residue, encode_update(updates["a"], weights["a"], frac_bits=16, ring_bits=32))


def test_nodes_refuse_reveals_that_would_expose_an_update():
    names = ["a", "b", "c"]
    nodes = {n: NodeSecAgg(n, b"ctx", 16, 32) for n in names}
    roster = {n: nodes[n].public_key() for n in names}
    for n in names:
        nodes[n].set_roster(roster)
        nodes[n].mask(np.zeros(4, np.float32), 1 / 3)
    with pytest.raises(ProtocolError, match="alone"):
        nodes["a"].reveal(["a"], ["b", "c"])
    with pytest.raises(ProtocolError, match="partition"):
        nodes["a"].reveal(["a", "b"], ["b", "c"])
    with pytest.raises(ProtocolError, match="partition"):
        nodes["a"].reveal(["a", "b"], [])
    with pytest.raises(ProtocolError, match="not included"):
        nodes["a"].reveal(["b", "c"], ["a"])
    nodes["a"].reveal(["a", "b"], ["c"])
    with pytest.raises(ProtocolError, match="stage"):
        nodes["a"].reveal(["a", "b", "c"], [])  # a second reveal could expose an update


def test_roster_must_hold_the_nodes_own_key():
    node = NodeSecAgg("a", b"ctx", 16, 32)
    with pytest.raises(ProtocolError, match="this node's public key"):
        node.set_roster({"a": bytes(32), "b": NodeSecAgg("b", b"ctx", 16, 32).public_key()})


def test_hub_validates_every_secure_aggregation_message():
    hub = HubSecAgg(3, {"a": 0.5, "b": 0.5}, 10, 16, 32, 2)
    with pytest.raises(ProtocolError, match="32 bytes"):
        hub.add_public_key("a", b"short")
    with pytest.raises(ProtocolError, match="not part"):
        hub.add_public_key("z", bytes(32))
    a, b = NodeSecAgg("a", b"c", 16, 32), NodeSecAgg("b", b"c", 16, 32)
    hub.add_public_key("a", a.public_key())
    with pytest.raises(ProtocolError, match="twice"):
        hub.add_public_key("a", a.public_key())
    hub.add_public_key("b", b.public_key())
    hub.close_keys()
    with pytest.raises(ProtocolError, match="uint32"):
        hub.add_masked("a", np.zeros(10, np.uint64))
    with pytest.raises(ProtocolError, match=r"\(10,\)"):
        hub.add_masked("a", np.zeros(11, np.uint32))
    hub.add_masked("a", np.zeros(10, np.uint32))
    with pytest.raises(ProtocolError, match="twice"):
        hub.add_masked("a", np.zeros(10, np.uint32))
    hub.add_masked("b", np.zeros(10, np.uint32))
    hub.close_uploads()
    with pytest.raises(ProtocolError, match="16 bytes"):
        hub.add_reveal("a", b"x", {})
    with pytest.raises(ProtocolError, match="exactly the dropped"):
        hub.add_reveal("a", bytes(16), {"b": bytes(16)})


def test_a_node_lost_during_unmask_fails_the_round():
    hub = HubSecAgg(7, {"a": 0.5, "b": 0.5}, 4, 16, 32, 2)
    for n in "ab":
        hub.add_public_key(n, NodeSecAgg(n, b"c", 16, 32).public_key())
    hub.close_keys()
    hub.node_lost("a", "gone")  # before the included set is fixed: not fatal here
    for n in "ab":
        hub.add_masked(n, np.zeros(4, np.uint32))
    hub.close_uploads()
    with pytest.raises(RoundFailed, match="round 7 failed during unmask"):
        hub.node_lost("b", "connection reset")


def test_too_few_uploads_is_a_named_error():
    hub = HubSecAgg(2, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 4, 16, 32, 2)
    for n in "abc":
        hub.add_public_key(n, NodeSecAgg(n, b"c", 16, 32).public_key())
    hub.close_keys()
    hub.add_masked("a", np.zeros(4, np.uint32))
    with pytest.raises(TooFewNodes, match="only 1 node"):
        hub.close_uploads()
    assert hub.stage is Stage.MASKED


def test_encoding_checks_the_range_that_keeps_the_sum_from_wrapping():
    limit = update_limit(16, 32)
    assert limit == 2.0**14
    ok = encode_update(np.array([limit * 0.99, -limit * 0.99]), 1.0, frac_bits=16, ring_bits=32)
    assert ok.dtype == RING_DTYPES[32]
    with pytest.raises(EncodingRangeError):
        encode_update(np.array([0.0, limit]), 1.0, frac_bits=16, ring_bits=32)
    with pytest.raises(EncodingRangeError):
        encode_update(np.array([np.nan]), 1.0, frac_bits=16, ring_bits=32)
    values = np.array([-3.25, 0.0, 7.5, -(limit / 2)])
    for ring_bits in (32, 64):
        back = decode_sum(encode_update(values, 1.0, frac_bits=16, ring_bits=ring_bits), frac_bits=16, ring_bits=ring_bits)
        assert np.array_equal(back, values)


def test_masks_come_from_the_seeded_stream_and_differ_between_seeds():
    seed = bytes(range(16))
    first = prg_mask(seed, 1001, 32)
    assert first.shape == (1001,) and first.dtype == np.uint32
    assert np.array_equal(first, prg_mask(seed, 1001, 32))
    assert not np.array_equal(first, prg_mask(bytes(16), 1001, 32))
    assert prg_mask(seed, 5, 64).dtype == np.uint64


def test_the_fused_encoding_equals_mpc_ring_encode_and_the_masks_equal_mpc_prg():
    rng = np.random.default_rng(5)
    values = rng.normal(scale=3.0, size=70_001).astype(np.float32)
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5]) * 2.0**-16  # round half to even, as np.rint
    for ring_bits, dtype in ((32, np.uint32), (64, np.uint64)):
        for arr, weight in ((values, 0.37), (ties, 1.0)):
            ref = encode(np.multiply(arr, weight, dtype=np.float64), 16)
            ref = ref.astype(np.uint32) if ring_bits == 32 else ref.view(np.uint64)
            assert np.array_equal(encode_update(arr, weight, frac_bits=16, ring_bits=ring_bits), ref)
        seed = bytes(range(16))
        for count in (5, 1001, 200_003):  # pieces of the keystream continue where the last ended
            words = -(-count * ring_bits // 64)
            want = Stream(seed, 0).ring(words).view(dtype)[:count]
            assert np.array_equal(prg_mask(seed, count, ring_bits), want)


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_masks_applied_in_threads_equal_one_thread(ring_bits):
    size = 4 * _MASK_CHUNK + 12_345  # more than one piece per thread, and a ragged end
    masks = [(bytes([i]) * 16, 1 if i % 2 else -1) for i in range(1, 6)]
    base = np.arange(size, dtype=RING_DTYPES[ring_bits])
    one, two = base.copy(), base.copy()
    _apply_masks(one, masks, ring_bits, threads=1)
    decoded = np.empty(size)
    _apply_masks(two, masks, ring_bits, threads=3, decode_into=decoded, decode_scale=0.25)
    assert np.array_equal(one, two)
    want = base.copy()
    for seed, sign in masks:
        want = want + prg_mask(seed, size, ring_bits) if sign > 0 else want - prg_mask(seed, size, ring_bits)
    assert np.array_equal(one, want)
    signed = one.view(np.int32 if ring_bits == 32 else np.int64).astype(np.float64)
    assert np.array_equal(decoded, signed * 0.25)


# -- sparse mask graphs (aggregation.neighbours, SecAgg+) ------------------------------------


@pytest.mark.parametrize("n", [3, 4, 5, 7, 8, 10, 11])
@pytest.mark.parametrize("k", [0, 2, 3, 4, 5])
def test_the_mask_graph_is_harary_k_connected(n, k):
    names = [f"n{i:02d}" for i in range(n)]
    graph = mask_graph(list(reversed(names)), k)  # the order given does not matter
    assert graph == mask_graph(names, k)
    assert all(a not in peers and all(a in graph[b] for b in peers) for a, peers in graph.items())  # simple, undirected
    want = n - 1 if k == 0 or k >= n - 1 else k
    assert min(len(p) for p in graph.values()) >= want
    if k and k < n - 1:
        assert max(len(p) for p in graph.values()) <= k + 1  # sparse: about k pair masks per node, not n - 1
    # connected after removing any want - 1 nodes (Harary graphs are k-connected)
    for gone in itertools.combinations(names, want - 1):
        assert len(components(graph, [x for x in names if x not in gone])) == 1, gone


def test_a_mask_graph_of_one_neighbour_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        mask_graph(["a", "b", "c", "d"], 1)


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("neighbours", [2, 3, 4])
def test_sparse_graph_sum_equals_fedavg(rng, ring_bits, neighbours):
    names = [f"node{i}" for i in range(10)]
    updates = {n: rng.normal(scale=0.05, size=999).astype(np.float32) for n in names}
    raw = rng.integers(1, 500, size=len(names))
    weights = {n: float(w) / raw.sum() for n, w in zip(names, raw)}
    mean, included, dropped, _, _ = run_round(updates, weights, ring_bits=ring_bits, neighbours=neighbours)
    assert included == names and dropped == []
    err = np.abs(mean - fedavg(updates, weights, names)).max()
    assert 0 < err <= len(names) * 2.0**-17  # one rounding per node; the weights sum to one


def test_sparse_graph_dropouts_are_recovered_from_the_partners_seeds_only(rng):
    names = [f"n{i}" for i in range(8)]  # ring of neighbours 2: n0-n1-...-n7-n0
    updates = {n: rng.normal(size=555).astype(np.float32) for n in names}
    weights = {n: 1 / 8 for n in names}
    upload = set(names) - {"n3"}
    mean, included, dropped, _, reveals = run_round(updates, weights, upload=upload, neighbours=2)
    assert dropped == ["n3"]
    assert {n for n, (_, pairs) in reveals.items() if pairs} == {"n2", "n4"}  # only n3's partners reveal
    assert all(set(pairs) <= {"n3"} for _, pairs in reveals.values())
    assert np.abs(mean - fedavg(updates, weights, included)).max() <= 7 * 2.0**-17 / (7 / 8)


def test_dropouts_that_split_the_mask_graph_fail_the_round_cleanly():
    names = [f"n{i}" for i in range(6)]
    weights = {n: 1 / 6 for n in names}
    hub = HubSecAgg(4, weights, 8, 16, 32, 2, neighbours=2)
    nodes = {n: NodeSecAgg(n, b"ctx", 16, 32, 2) for n in names}
    for n in names:
        hub.add_public_key(n, nodes[n].public_key())
    roster = hub.close_keys()
    for n in names:
        nodes[n].set_roster(roster)
        if n not in ("n1", "n4"):  # the ring n0-...-n5-n0 without n1 and n4: {n0, n5} and {n2, n3}
            hub.add_masked(n, nodes[n].mask(np.zeros(8, np.float32), 1 / 6))
    with pytest.raises(RoundFailed, match=r"round 4 failed during masked.*\[\['n0', 'n5'\], \['n2', 'n3'\]\].*neighbours"):
        hub.close_uploads()
    assert hub.stage is Stage.MASKED and not hub.revealed  # nothing was asked of the nodes
    # a node refuses to unmask such a set as well (a hub that skipped the check learns nothing more)
    with pytest.raises(ProtocolError, match="falls apart"):
        nodes["n0"].reveal(["n0", "n2", "n3", "n5"], ["n1", "n4"])
    assert nodes["n0"].stage is Stage.MASKED


def test_the_hub_wants_pair_seeds_with_dropped_partners_only():
    names = [f"n{i}" for i in range(6)]
    hub = HubSecAgg(1, {n: 1 / 6 for n in names}, 4, 16, 32, 2, neighbours=2)
    for n in names:
        hub.add_public_key(n, NodeSecAgg(n, b"c", 16, 32, 2).public_key())
    hub.close_keys()
    for n in names:
        if n != "n3":
            hub.add_masked(n, np.zeros(4, np.uint32))
    hub.close_uploads()
    assert hub.expected_pair_seeds("n2") == ["n3"] and hub.expected_pair_seeds("n0") == []
    with pytest.raises(ProtocolError, match="exactly the dropped nodes it masks with"):
        hub.add_reveal("n0", bytes(16), {"n3": bytes(16)})  # n0 does not mask with n3
    with pytest.raises(ProtocolError, match="exactly the dropped nodes it masks with"):
        hub.add_reveal("n2", bytes(16), {})


@pytest.mark.parametrize("upload", [None, set("abcdf")])
def test_the_hubs_view_of_one_update_is_uniform_with_a_sparse_graph(upload):
    """With 6 nodes on a ring (neighbours 2), node a masks with b and f only; what the hub holds
    about a — its upload, and that upload minus every mask the hub can recompute after the
    unmask (a's self mask, a's pair masks with dropped partners) — is uniform."""
    size = 1 << 16
    names = list("abcdef")
    for fill in (0.0, 1000.0):
        updates = {n: np.full(size, fill if n == "a" else 0.5, dtype=np.float32) for n in names}
        weights = {n: 1 / 6 for n in names}
        _, included, dropped, views, reveals = run_round(updates, weights, upload=upload, neighbours=2)
        _assert_uniform_ring32(views["a"])
        self_seed, pair_seeds = reveals["a"]
        assert set(pair_seeds) == set() and set(dropped) == (set() if upload is None else {"e"})
        residue = views["a"] - prg_mask(self_seed, size, 32)
        _assert_uniform_ring32(residue)
        # the same for d, whose partner e dropped: its pair mask with c still hides its update
        self_seed, pair_seeds = reveals["d"]
        residue = views["d"] - prg_mask(self_seed, size, 32)
        for partner, seed in pair_seeds.items():
            residue = residue - prg_mask(seed, size, 32) if "d" < partner else residue + prg_mask(seed, size, 32)
        _assert_uniform_ring32(residue)


@pytest.mark.parametrize(("value", "message"), [
    (1, "aggregation.neighbours: 1 would pair the nodes off"),
    (-2, "aggregation.neighbours"),
    ("4", "aggregation.neighbours"),
])
def test_neighbours_config_errors_name_the_key(value, message):
    raw = {
        "federation": {"nodes": [{"name": f"n{i}", "address": f"ws://127.0.0.1:{9000 + i}", "token": "x" * 32}
                                 for i in range(4)]},
        "aggregation": {"neighbours": value},
    }
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_neighbours_config_is_read_and_sent_to_the_nodes():
    raw = {
        "federation": {"nodes": [{"name": f"n{i}", "address": f"ws://127.0.0.1:{9000 + i}", "token": "x" * 32}
                                 for i in range(4)]},
        "aggregation": {"neighbours": 2},
    }
    cfg = parse_config(raw)
    assert cfg.aggregation.neighbours == 2 and cfg.node_spec()["aggregation"]["neighbours"] == 2
    assert parse_config({**raw, "aggregation": {}}).aggregation.neighbours == 0
