"""Secure aggregation (fl.secagg) against plaintext FedAvg, and what the hub can see."""

from __future__ import annotations

import numpy as np
import pytest

from fl.errors import RoundFailed, TooFewNodes
from fl.secagg import (
    RING_DTYPES,
    HubSecAgg,
    NodeSecAgg,
    Stage,
    decode_sum,
    encode_update,
    prg_mask,
    update_limit,
)
from mpc.errors import EncodingRangeError, ProtocolError


def run_round(updates, weights, *, ring_bits=32, frac_bits=16, upload=None, min_nodes=2):
    """Run every stage; ``upload`` names the nodes whose masked update reaches the hub (default all)."""
    names = sorted(updates)
    size = len(next(iter(updates.values())))
    hub = HubSecAgg(1, weights, size, frac_bits, ring_bits, min_nodes)
    nodes = {n: NodeSecAgg(n, b"test|1", frac_bits, ring_bits) for n in names}
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
