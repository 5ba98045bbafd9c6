"""Pairwise secure aggregation (fl.pairwise) against plaintext FedAvg, what the hub can see, and a hub that deviates."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fl import shamir
from fl.errors import RoundFailed, TooFewNodes
from fl.graphs import components, holders, mask_graph
from fl.masks import (
    RING_DTYPES,
    _MASK_CHUNK,
    apply_masks,
    decode_sum,
    encode_update,
    prg_mask,
    update_limit,
)
from fl.messages import Message
from fl.pairwise import Kind, PairwiseAggregator, share_threshold
from mpc.errors import ConfigError, EncodingRangeError
from mpc.prg import Stream
from mpc.ring import encode

from .fl_helpers import base_config
from .secagg_helpers import SecAggRound, fedavg

from fl.config import parse_config


def updates_for(rng, names, size=1000, scale=0.05):
    return {n: rng.normal(scale=scale, size=size).astype(np.float32) for n in names}


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_secure_sum_equals_fedavg_within_fixed_point_error(rng, ring_bits, count):
    names = [f"node{i}" for i in range(count)]
    updates = updates_for(rng, names)
    samples = {n: int(s) for n, s in zip(names, rng.integers(1, 500, size=count))}
    r = SecAggRound(names, updates, ring_bits=ring_bits, samples=samples)
    result = r.run()
    assert result.included == names and result.dropped == []
    bound = count * 2.0 ** -17  # one rounding per node; the weights sum to one
    err = np.abs(result.mean - fedavg(updates, result.weights, names)).max()
    assert 0 < err <= bound  # it really went through fixed point


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_nodes_lost_before_uploading_are_left_out(rng, ring_bits):
    names = ["a", "b", "c", "d", "e"]
    updates = updates_for(rng, names, size=777, scale=1.0)
    r = SecAggRound(names, updates, ring_bits=ring_bits)
    r.lose = {"b": "before-upload", "d": "before-upload"}
    result = r.run()
    assert result.included == ["a", "c", "e"] and result.dropped == ["b", "d"]
    # the hub opened b's and d's mask keys (their pair masks with the survivors), never their self masks
    reveals = r.sent_by_nodes(Kind.REVEAL)
    assert {n for n, _ in reveals} == {"a", "c", "e"}
    for _, msg in reveals:
        assert set(msg.header["key_shares"]) <= {"b", "d"} and not set(msg.header["self_shares"]) & {"b", "d"}
    assert np.abs(result.mean - fedavg(updates, result.weights, result.included)).max() <= 3 * 2.0**-17 / 0.6


@pytest.mark.parametrize("neighbours", [0, 2])
def test_a_node_lost_right_after_uploading_is_counted_from_its_partners_shares(rng, neighbours):
    """The reviewer's case: 4 nodes, neighbours = 2, one killed just after its upload.  Its update counts."""
    names = ["a", "b", "c", "d"]
    updates = updates_for(rng, names, size=555)
    r = SecAggRound(names, updates, neighbours=neighbours)
    r.lose = {"c": "upload"}
    result = r.run()
    assert result.included == names and result.dropped == []
    assert np.abs(result.mean - fedavg(updates, result.weights, names)).max() <= 4 * 2.0**-17
    assert "c" not in {n for n, _ in r.sent_by_nodes(Kind.REVEAL)}  # c revealed nothing: it was gone


def test_too_many_lost_shareholders_fail_the_round_naming_the_node(rng):
    """Ring of 5 (neighbours 2): b's shares are held by a, b and c (2 needed); with b and c gone after uploading,
    b's self mask can no longer be opened, and the round fails before anyone is asked to reveal."""
    names = ["a", "b", "c", "d", "e"]
    r = SecAggRound(names, updates_for(rng, names, size=100), neighbours=2, min_nodes=2)
    r.lose = {"b": "upload", "c": "upload"}
    with pytest.raises(RoundFailed, match=r"b's shares can no longer be opened: 1 of its holders \['a', 'b', 'c'\]") \
            as info:
        r.run()
    assert info.value.stage == "upload"
    assert not r.sent_by_nodes(Kind.SIGNATURE) and not r.sent_by_nodes(Kind.REVEAL)


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


@pytest.mark.parametrize("lose", [{}, {"c": "before-upload"}, {"a": "upload"}])
def test_the_hubs_view_of_one_upload_is_uniform(lose):
    """What the hub holds about node a — its masked upload, and that upload minus every mask the hub can
    recompute from what the nodes revealed — is uniformly random, whatever a's update is."""
    size = 1 << 16
    names = ["a", "b", "c"]
    for fill in (0.0, 1000.0):  # an all-zero update and a large constant one: both look uniform
        updates = {n: np.full(size, fill if n == "a" else 0.5, dtype=np.float32) for n in names}
        r = SecAggRound(names, updates)
        r.lose = dict(lose)
        r.run()
        upload_a = r.uploads["a"]
        _assert_uniform_ring32(upload_a)
        # a's self-mask seed is opened (a is a survivor): remove it; a's pair masks stay, as the hub cannot
        # know them while b and c are survivors (only a dropped node's mask key is opened)
        shares = {}
        for node, msg in r.sent_by_nodes(Kind.REVEAL):
            if "a" in msg.header["self_shares"]:
                shares[sorted(names).index(node) + 1] = msg.header["self_shares"]["a"]
        self_seed = shamir.combine(shares, share_threshold(3))
        residue = upload_a - prg_mask(self_seed, size, 32)
        _assert_uniform_ring32(residue)
        assert not np.array_equal(residue, encode_update(updates["a"], 1 / 3, frac_bits=16, ring_bits=32))


# -- a hub that deviates ---------------------------------------------------------------------------


def _signed_survivors(r: SecAggRound) -> dict[str, tuple[list[str], bytes]]:
    """The survivor set each node was shown and its signature on it."""
    shown = {peer: msg.header["survivors"] for peer, msg in r.to_peers if msg.kind == Kind.SURVIVORS}
    return {n: (shown[n], m.header["signature"]) for n, m in r.sent_by_nodes(Kind.SIGNATURE)}


def _inconsistent_views(victim: str, names: list[str]):
    """The reviewer's attack: the victim is told nobody dropped, the others that the victim dropped."""
    def hub_to(peer: str, msg: Message) -> Message:
        if msg.kind == Kind.SURVIVORS and peer != victim:
            return Message(msg.kind, {**msg.header, "survivors": [n for n in names if n != victim]})
        return msg
    return hub_to


def _relay_every_signature(r: SecAggRound):
    """The hub passes every survivor signature it got to every node, to reach the thresholds."""
    def hub_to(peer: str, msg: Message) -> Message:
        if msg.kind == Kind.SIGNATURES:
            everything = {n: sig for n, (_, sig) in _signed_survivors(r).items()}
            return Message(msg.kind, {**msg.header, "signatures": everything})
        return msg
    return hub_to


def _chain(*hooks):
    def hub_to(peer, msg):
        for hook in hooks:
            msg = hook(peer, msg)
            if msg is None:
                return None
        return msg
    return hub_to


class DeviatingHub(PairwiseAggregator):
    """A hub that skips its own check of the nodes' survivor signatures (it wants every one it can relay)."""

    def _on_signature(self, peer, msg):
        rnd = self._expect(peer, msg, "consistency")
        rnd.signatures[peer] = msg.header["signature"]
        rnd.waiting.discard(peer)
        return self._advance()


@pytest.mark.parametrize("names", [["a", "b", "c"], ["a", "b", "c", "d"]])
def test_malicious_hub_shows_different_survivor_sets(rng, names):
    """Victim a is shown U = everyone, the others U without a; the hub relays every signature it has.
    Every node finds a signature that is not on its own set: nobody reveals anything, and each names the
    inconsistency."""
    r = SecAggRound(names, updates_for(rng, names, size=64), aggregator=DeviatingHub)
    r.hub_to = _chain(_inconsistent_views("a", names), _relay_every_signature(r))
    with pytest.raises((RoundFailed, TooFewNodes)):
        r.run()
    assert not r.sent_by_nodes(Kind.REVEAL)
    assert set(r.refusals) == set(names)
    assert all("inconsistent views" in reason for reason in r.refusals.values())


def test_malicious_hub_relays_each_group_only_its_own_signatures(rng):
    """The split without mixing: the victim sees only its own signature and refuses (below the threshold); the
    others' view is a legitimate dropout of a, so they may open a's mask KEY — but never a's self mask, so the
    hub learns nothing about a's update."""
    names = ["a", "b", "c"]
    r = SecAggRound(names, updates_for(rng, names, size=64), aggregator=DeviatingHub)

    def own_group(peer, msg):
        if msg.kind == Kind.SIGNATURES:
            mine = _signed_survivors(r)[peer][0]
            same = {n: sig for n, (shown, sig) in _signed_survivors(r).items() if shown == mine}
            return Message(msg.kind, {**msg.header, "signatures": same})
        return msg

    r.hub_to = _chain(_inconsistent_views("a", names), own_group)
    with pytest.raises(Exception):
        r.run()
    assert "only 1 node(s) signed" in r.refusals["a"]
    self_shares_of_a = [m for n, m in r.sent_by_nodes(Kind.REVEAL) if "a" in m.header["self_shares"]]
    assert self_shares_of_a == []  # a's self mask stays closed: y_a is still masked by PRG(b_a)


def test_malicious_hub_shows_a_subset_below_the_threshold(rng):
    names = ["a", "b", "c", "d"]
    r = SecAggRound(names, updates_for(rng, names, size=64))
    r.hub_to = lambda peer, msg: (Message(msg.kind, {**msg.header, "survivors": [peer, "b" if peer != "b" else "c"]})
                                  if msg.kind == Kind.SURVIVORS else msg)
    with pytest.raises(Exception):
        r.run()
    assert not r.sent_by_nodes(Kind.SIGNATURE) and not r.sent_by_nodes(Kind.REVEAL)
    assert all("below the threshold 3" in reason for reason in r.refusals.values())


def test_malicious_hub_swaps_two_nodes_round_keys(rng):
    """The roster names b's keys as c's and c's as b's: the signatures bind the name, every node refuses."""
    names = ["a", "b", "c"]
    r = SecAggRound(names, updates_for(rng, names, size=64))

    def swap(peer, msg):
        if msg.kind == Kind.ROSTER:
            keys = dict(msg.header["keys"])
            keys["b"], keys["c"] = keys["c"], keys["b"]
            return Message(msg.kind, {**msg.header, "keys": keys})
        return msg

    r.hub_to = swap
    with pytest.raises(Exception):
        r.run()
    assert not r.sent_by_nodes(Kind.SHARES) and not r.uploads
    assert "are not signed by" in r.refusals["a"]


def test_malicious_hub_substitutes_its_own_key_for_a_node(rng):
    """The hub replaces c's mask key with one it made (signed by a key it holds, not c's)."""
    from fl.masks import x25519_public
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from .fl_helpers import private_key

    names = ["a", "b", "c"]
    r = SecAggRound(names, updates_for(rng, names, size=64))
    mine = x25519_public(X25519PrivateKey.generate())

    def substitute(peer, msg):
        if msg.kind == Kind.ROSTER:
            keys = dict(msg.header["keys"])
            entry = dict(keys["c"], mask_key=mine)
            entry["signature"] = private_key("hub").sign(b"x")  # the hub's own key cannot sign as c
            keys["c"] = entry
            return Message(msg.kind, {**msg.header, "keys": keys})
        return msg

    r.hub_to = substitute
    with pytest.raises(Exception):
        r.run()
    assert "round keys of 'c' are not signed by 'c'" in r.refusals["a"]
    assert not r.uploads


def test_malicious_hub_replays_a_signature_from_an_earlier_round(rng):
    """Round 2's signature set holds b's signature from round 1 (the same survivors): it does not verify."""
    names = ["a", "b", "c"]
    updates = updates_for(rng, names, size=64)
    first = SecAggRound(names, updates, number=1)
    first.run()
    old = dict(_signed_survivors(first))
    second = SecAggRound(names, updates, number=2, aggregator=DeviatingHub)

    def replay(peer, msg):
        if msg.kind == Kind.SIGNATURES:
            sigs = dict(msg.header["signatures"])
            sigs["b"] = old["b"][1]
            return Message(msg.kind, {**msg.header, "signatures": sigs})
        return msg

    second.hub_to = replay
    with pytest.raises(Exception):
        second.run()
    assert "'b' did not sign the survivor set" in second.refusals["a"]
    assert {n for n, _ in second.sent_by_nodes(Kind.REVEAL)} <= {"b"}  # at most b, which saw its own round-2 set


def test_survivor_order_does_not_matter(rng):
    """Sets, not lists: a hub that sends the survivors in another order to each node is not an inconsistency."""
    names = ["a", "b", "c"]
    updates = updates_for(rng, names, size=64)
    r = SecAggRound(names, updates)
    r.hub_to = lambda peer, msg: (Message(msg.kind, {**msg.header, "survivors": sorted(msg.header["survivors"],
                                                                                        reverse=peer == "b")})
                                  if msg.kind == Kind.SURVIVORS else msg)
    result = r.run()
    assert result.included == names


# -- pieces: fixed point, masks, graphs, Shamir ---------------------------------------------------------


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


def test_the_fused_encoding_equals_mpc_ring_encode_and_the_masks_are_mpc_prg_streams():
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
    assert not np.array_equal(prg_mask(bytes(16), 100, 32), prg_mask(bytes(range(16)), 100, 32))


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_masks_applied_in_threads_equal_one_thread(ring_bits):
    size = 4 * _MASK_CHUNK + 12_345  # more than one piece per thread, and a ragged end
    masks = [(bytes([i]) * 16, 1 if i % 2 else -1) for i in range(1, 6)]
    base = np.arange(size, dtype=RING_DTYPES[ring_bits])
    one, two = base.copy(), base.copy()
    apply_masks(one, masks, ring_bits, threads=1)
    decoded = np.empty(size)
    apply_masks(two, masks, ring_bits, threads=3, decode_into=decoded, decode_scale=0.25)
    assert np.array_equal(one, two)
    want = base.copy()
    for seed, sign in masks:
        want = want + prg_mask(seed, size, ring_bits) if sign > 0 else want - prg_mask(seed, size, ring_bits)
    assert np.array_equal(one, want)
    signed = one.view(np.int32 if ring_bits == 32 else np.int64).astype(np.float64)
    assert np.array_equal(decoded, signed * 0.25)


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
    assert all(holders(graph, a) == sorted(graph[a] | {a}) for a in names)


def test_a_mask_graph_of_one_neighbour_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        mask_graph(["a", "b", "c", "d"], 1)


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("neighbours", [2, 3, 4])
def test_sparse_graph_sum_equals_fedavg(rng, ring_bits, neighbours):
    names = [f"node{i}" for i in range(10)]
    updates = updates_for(rng, names, size=999)
    samples = {n: int(s) for n, s in zip(names, rng.integers(1, 500, size=len(names)))}
    result = SecAggRound(names, updates, ring_bits=ring_bits, neighbours=neighbours, samples=samples).run()
    assert result.included == names and result.dropped == []
    err = np.abs(result.mean - fedavg(updates, result.weights, names)).max()
    assert 0 < err <= len(names) * 2.0**-17  # one rounding per node; the weights sum to one


def test_sparse_graph_dropouts_open_only_the_partners_keys(rng):
    names = [f"n{i}" for i in range(8)]  # Harary graph of 4 neighbours: n_i with n_i±1 and n_i±2
    updates = updates_for(rng, names, size=555, scale=1.0)
    r = SecAggRound(names, updates, neighbours=4)
    r.lose = {"n3": "before-upload"}
    result = r.run()
    assert result.dropped == ["n3"]
    holders_of_keys = {n for n, m in r.sent_by_nodes(Kind.REVEAL) if "n3" in m.header["key_shares"]}
    assert holders_of_keys == {"n1", "n2", "n4", "n5"}  # n3's partners, the holders of its shares
    assert np.abs(result.mean - fedavg(updates, result.weights, result.included)).max() <= 7 * 2.0**-17 / (7 / 8)


@pytest.mark.parametrize("threshold, holders_", [(1, [1]), (2, [1, 2, 3]), (3, [2, 5, 7, 9, 11]), (6, list(range(1, 11)))])
def test_shamir_opens_from_any_threshold_shares_and_checks_the_rest(threshold, holders_):
    secret = bytes(range(16))
    shares = shamir.split(secret, threshold, holders_)
    for subset in itertools.islice(itertools.combinations(sorted(shares), threshold), 20):
        assert shamir.combine({x: shares[x] for x in subset}, threshold) == secret
    assert shamir.combine(shares, threshold) == secret
    if len(shares) > threshold:
        x = max(shares)
        bad = dict(shares)
        bad[x] = (int.from_bytes(bad[x], "big") ^ 1).to_bytes(shamir.SHARE_BYTES, "big")
        with pytest.raises(shamir.ShareMismatch):
            shamir.combine(bad, threshold)
    if threshold > 1:
        with pytest.raises(ValueError, match="cannot open"):
            shamir.combine(dict(list(shares.items())[: threshold - 1]), threshold)


def test_shamir_shares_below_the_threshold_say_nothing_about_the_secret():
    """t - 1 shares of two different secrets are identically distributed: a single share is uniform."""
    firsts = [int.from_bytes(shamir.split(bytes(16), 2, [1, 2])[1], "big") for _ in range(2000)]
    others = [int.from_bytes(shamir.split(b"\xff" * 16, 2, [1, 2])[1], "big") for _ in range(2000)]
    for sample in (firsts, others):
        top = np.array([v >> 122 for v in sample])  # the top 8 bits of a 130-bit field element
        assert 0.4 < (top < 128).mean() < 0.6


@pytest.mark.parametrize(("value", "message"), [
    (1, "aggregation.neighbours: 1 would pair the nodes off"),
    (-2, "aggregation.neighbours"),
    ("4", "aggregation.neighbours"),
])
def test_neighbours_config_errors_name_the_key(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(base_config(["a", "b", "c", "d"], aggregation={"neighbours": value}))


def test_neighbours_config_is_read_and_sent_to_the_nodes():
    cfg = parse_config(base_config(["a", "b", "c", "d"], aggregation={"neighbours": 2}))
    assert cfg.aggregation.neighbours == 2 and cfg.node_spec()["aggregation"]["neighbours"] == 2
