"""Dealer-masked secure aggregation (``aggregation.masking = 'dealer'``): the arithmetic, what the hub
and the dealer can see, the hub protocol with a dealer, and the configuration."""

from __future__ import annotations

import numpy as np
import pytest

from fl.config import parse_config
from fl.dealer import Close, Compute, DealerSession, Reply
from fl.errors import RoundFailed
from fl.hub_protocol import DEALER_LINK, Dropped, Phase
from fl.messages import PROTOCOL_VERSION, Kind, Message
from fl.secagg import DEALER, DealerSecAgg, HubSecAgg, NodeSecAgg, encode_update
from mpc.errors import ConfigError, ProtocolError

from .fl_helpers import TOKEN, failures
from .test_fl_protocol import NAMES, one_round, start
from .test_fl_protocol import data  # noqa: F401 - the module's fixture
from .test_fl_secagg import _assert_uniform_ring32, fedavg

DEALER_CFG = {"dealer_address": "ws://127.0.0.1:9999", "dealer_token": TOKEN}


def dealer_round(updates, weights, *, ring_bits=32, frac_bits=16, upload=None, min_nodes=2):
    """Every stage of a dealer-masked round; ``upload`` names the nodes whose update reaches the hub."""
    names = sorted(updates)
    size = len(next(iter(updates.values())))
    hub = HubSecAgg(1, weights, size, frac_bits, ring_bits, min_nodes, masking=DEALER)
    dealer = DealerSecAgg(1, b"test|1", size, ring_bits)
    nodes = {n: NodeSecAgg(n, b"test|1", frac_bits, ring_bits, masking=DEALER) for n in names}
    for n in names:
        hub.add_public_key(n, nodes[n].public_key())
    roster = hub.close_keys()
    dealer.set_roster(roster)
    dealer.expand()
    views = {}
    for n in names:
        nodes[n].set_roster(roster, dealer.public_key())
        views[n] = nodes[n].mask(updates[n], weights[n]).copy()
        if upload is None or n in upload:
            hub.add_masked(n, views[n].copy())
    included, dropped = hub.close_uploads()
    mask_sum = dealer.mask_sum(included, dropped)
    views["mask_sum"] = mask_sum.copy()
    hub.add_mask_sum("dealer", mask_sum)
    mean, inc = hub.result()
    return mean, inc, dropped, views


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_dealer_masked_sum_equals_fedavg_within_fixed_point_error(rng, ring_bits, count):
    names = [f"node{i}" for i in range(count)]
    updates = {n: rng.normal(scale=0.05, size=1000).astype(np.float32) for n in names}
    raw = rng.integers(1, 500, size=count)
    weights = {n: float(w) / raw.sum() for n, w in zip(names, raw)}
    mean, included, dropped, _ = dealer_round(updates, weights, ring_bits=ring_bits)
    assert included == names and dropped == []
    err = np.abs(mean - fedavg(updates, weights, names)).max()
    assert 0 < err <= count * 2.0**-17


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_the_dealer_leaves_dropped_nodes_out_of_the_mask_sum(rng, ring_bits):
    names = ["a", "b", "c", "d", "e"]
    updates = {n: rng.normal(size=777).astype(np.float32) for n in names}
    weights = {n: 0.2 for n in names}
    mean, included, dropped, _ = dealer_round(updates, weights, ring_bits=ring_bits, upload={"a", "c", "e"})
    assert included == ["a", "c", "e"] and dropped == ["b", "d"]
    assert np.abs(mean - fedavg(updates, weights, included)).max() <= 3 * 2.0**-17 / 0.6


@pytest.mark.parametrize("upload", [None, {"a", "b"}])
def test_the_hubs_view_of_one_update_is_uniform_with_a_dealer(upload):
    """The hub holds every masked upload and the dealer's sum: each upload alone is uniform whatever the
    update (also c's, uploaded late after it was counted as dropped), and so is the mask sum."""
    size = 1 << 16
    names = ["a", "b", "c"]
    for fill in (0.0, 1000.0):
        updates = {n: np.full(size, fill if n in "ac" else 0.5, dtype=np.float32) for n in names}
        weights = {n: 1 / 3 for n in names}
        _, included, _, views = dealer_round(updates, weights, upload=upload)
        for n in ("a", "c", "mask_sum"):
            _assert_uniform_ring32(views[n])
        encoded = encode_update(updates["a"], weights["a"], frac_bits=16, ring_bits=32)
        # removing the mask sum from a's upload leaves a masked by the others' masks, not a's update
        _assert_uniform_ring32(views["a"] - views["mask_sum"])
        assert not np.array_equal(views["a"] - views["mask_sum"], encoded)


def test_the_dealer_answers_once_and_only_for_a_partition_of_two_or_more():
    nodes = {n: NodeSecAgg(n, b"c", 16, 32, masking=DEALER) for n in "abc"}
    roster = {n: p.public_key() for n, p in nodes.items()}

    def fresh():
        dealer = DealerSecAgg(4, b"c", 8, 32)
        dealer.set_roster(roster)
        return dealer

    with pytest.raises(ProtocolError, match="one node's update alone"):
        fresh().mask_sum(["a"], ["b", "c"])
    with pytest.raises(ProtocolError, match="partition"):
        fresh().mask_sum(["a", "b"], ["b", "c"])
    with pytest.raises(ProtocolError, match="partition"):
        fresh().mask_sum(["a", "b"], [])
    dealer = fresh()
    dealer.mask_sum(["a", "b"], ["c"])
    with pytest.raises(ProtocolError, match="stage"):
        dealer.mask_sum(["a", "b", "c"], [])  # a second sum would expose c's update


def test_the_dealer_checks_the_roster_and_its_own_parameters():
    dealer = DealerSecAgg(1, b"c", 8, 32)
    with pytest.raises(ProtocolError, match="at least two"):
        dealer.set_roster({"a": NodeSecAgg("a", b"c", 16, 32).public_key()})
    with pytest.raises(ProtocolError, match="32 bytes"):
        dealer.set_roster({"a": b"short", "b": bytes(32)})
    with pytest.raises(ProtocolError, match="invalid"):  # the all-zero point has low order
        dealer.set_roster({"a": bytes(32), "b": NodeSecAgg("b", b"c", 16, 32).public_key()})
    with pytest.raises(ProtocolError, match="ring_bits"):
        DealerSecAgg(1, b"c", 8, 16)
    with pytest.raises(ProtocolError, match="size"):
        DealerSecAgg(1, b"c", 0, 32)


def test_dealer_masked_nodes_need_the_dealers_key_and_reveal_nothing():
    a, b = NodeSecAgg("a", b"c", 16, 32, masking=DEALER), NodeSecAgg("b", b"c", 16, 32, masking=DEALER)
    roster = {"a": a.public_key(), "b": b.public_key()}
    with pytest.raises(ProtocolError, match="lacks the dealer's public key"):
        a.set_roster(roster)
    with pytest.raises(ProtocolError, match="dealer.*32 bytes"):
        a.set_roster(roster, b"short")
    a.set_roster(roster, DealerSecAgg(1, b"c", 4, 32).public_key())
    a.mask(np.zeros(4, np.float32), 0.5)
    with pytest.raises(ProtocolError, match="reveal nothing"):
        a.reveal(["a", "b"], [])
    pairwise = NodeSecAgg("a", b"c", 16, 32)
    with pytest.raises(ProtocolError, match="masks pairwise"):
        pairwise.set_roster({"a": pairwise.public_key(), "b": b.public_key()}, bytes(32))


def test_the_hub_validates_the_mask_sum_and_survives_nodes_lost_after_uploading():
    hub = HubSecAgg(2, {"a": 0.5, "b": 0.5}, 10, 16, 32, 2, masking=DEALER)
    for n in "ab":
        hub.add_public_key(n, NodeSecAgg(n, b"c", 16, 32, masking=DEALER).public_key())
    hub.close_keys()
    with pytest.raises(ProtocolError, match="stage"):
        hub.add_mask_sum("dealer", np.zeros(10, np.uint32))  # before the included set is fixed
    for n in "ab":
        hub.add_masked(n, np.zeros(10, np.uint32))
    hub.close_uploads()
    hub.node_lost("a", "connection reset")  # its update and its mask are both in: nothing to recover
    with pytest.raises(ProtocolError, match="uint32"):
        hub.add_mask_sum("dealer", np.zeros(10, np.uint64))
    with pytest.raises(ProtocolError, match=r"\(10,\)"):
        hub.add_mask_sum("dealer", np.zeros(9, np.uint32))
    assert not hub.reveals_complete()
    hub.add_mask_sum("dealer", np.zeros(10, np.uint32))
    with pytest.raises(ProtocolError, match="twice"):
        hub.add_mask_sum("dealer", np.zeros(10, np.uint32))
    mean, included = hub.result()
    assert included == ["a", "b"] and not mean.any()


# -- the dealer's session ---------------------------------------------------------------------


def test_the_dealer_session_refuses_bad_and_out_of_order_messages():
    session = DealerSession()
    with pytest.raises(ProtocolError, match="does not handle"):
        session.receive(Message(Kind.TRAIN, {"round": 1}))
    with pytest.raises(ProtocolError, match="protocol"):
        session.receive(Message(Kind.DEALER_KEYS, {"protocol": PROTOCOL_VERSION - 1, "round": 1, "context": b"c",
                                                   "size": 8, "ring_bits": 32}))
    with pytest.raises(ProtocolError, match="no keys here"):
        session.receive(Message(Kind.DEALER_ROSTER, {"round": 1, "keys": {}}))
    with pytest.raises(ProtocolError, match="--max-message-mib 2"):  # 2^19 values x 4 bytes = 2 MiB > 1 MiB
        DealerSession(max_message_bytes=1 << 20).receive(Message(
            Kind.DEALER_KEYS, {"protocol": PROTOCOL_VERSION, "round": 1, "context": b"c", "size": 1 << 19,
                               "ring_bits": 32}))
    (reply,) = session.receive(Message(Kind.DEALER_KEYS, {"protocol": PROTOCOL_VERSION, "round": 1, "context": b"c",
                                                          "size": 8, "ring_bits": 32}))
    assert isinstance(reply, Reply) and reply.message.kind == Kind.DEALER_KEY and len(reply.message.header["key"]) == 32
    with pytest.raises(ProtocolError, match="round 2"):
        session.receive(Message(Kind.DEALER_ROSTER, {"round": 2, "keys": {}}))
    with pytest.raises(ProtocolError, match="unknown|unexpected|field"):
        session.receive(Message(Kind.DEALER_ROSTER, {"round": 1, "keys": {}, "extra": 1}))
    keys = {n: NodeSecAgg(n, b"c", 16, 32, masking=DEALER).public_key() for n in "ab"}
    (expand,) = session.receive(Message(Kind.DEALER_ROSTER, {"round": 1, "keys": keys}))
    assert isinstance(expand, Compute)
    expand.call()
    (answer,) = session.receive(Message(Kind.UNMASK, {"round": 1, "included": ["a", "b"], "dropped": []}))
    (mask_sum,) = answer.then(answer.call())
    assert mask_sum.kind == Kind.MASK_SUM and mask_sum.arrays["sum"].shape == (8,)
    with pytest.raises(ProtocolError, match="no keys here"):  # one answer per round
        session.receive(Message(Kind.UNMASK, {"round": 1, "included": ["a", "b"], "dropped": []}))
    assert isinstance(session.receive(Message(Kind.BYE, {"reason": "done"}))[0], Close)


# -- the hub protocol with a dealer (sans I/O, through the real wire format) ---------------------------


def dealer_start(data, names=NAMES, **sections):
    federation = {**DEALER_CFG, **sections.pop("federation", {})}
    aggregation = {"masking": "dealer", **sections.pop("aggregation", {})}
    return start(data, names, federation=federation, aggregation=aggregation, **sections)


def test_a_dealer_masked_round_equals_a_plain_round(data):
    fed, weights, _ = dealer_start(data)
    plain, _, _ = start(data, aggregation={"secure": False})
    seen = []
    fed.intercept = lambda node, msg: seen.append((node, msg.kind)) or None
    got, _ = one_round(fed, weights)
    want, _ = one_round(plain, weights)
    assert got.included == want.included == list(NAMES)
    assert np.abs(got.mean_update - want.mean_update).max() <= 3 * 2.0**-17
    assert np.abs(want.mean_update).max() > 1e-3
    # the dealer gets keys, the roster and the unmask request; nodes are never asked to reveal
    assert [k for n, k in seen if n == DEALER_LINK] == [Kind.DEALER_KEYS, Kind.DEALER_ROSTER, Kind.UNMASK]
    assert not any(k == Kind.UNMASK for n, k in seen if n != DEALER_LINK)


@pytest.mark.parametrize("stage_kind", [Kind.KEYS, Kind.TRAIN])
def test_a_node_lost_before_uploading_is_left_out_by_the_dealer(data, stage_kind):
    fed, weights, _ = dealer_start(data)
    fed.intercept = lambda node, msg: "lose" if node == "c" and msg.kind == stage_kind else None
    got, events = one_round(fed, weights)
    assert any(isinstance(e, Dropped) and e.node == "c" for e in events)
    assert got.included == ["a", "b"] and got.dropped == ["c"]
    reference, _, _ = start(data, names=("a", "b"), aggregation={"secure": False})
    want, _ = one_round(reference, weights)
    assert np.abs(got.mean_update - want.mean_update).max() <= 2 * 2.0**-17 / sum(got.weights[n] for n in "ab")


def test_a_node_lost_after_uploading_does_not_cost_the_round(data):
    fed, weights, _ = dealer_start(data)
    held = []
    fed.dealer_reply = lambda msg: held.append(msg) if msg.kind == Kind.MASK_SUM else msg
    assert not fed.pump(fed.hub.begin_round(1, weights, 0.05, fed.now)) and fed.hub.phase is Phase.UNMASK
    events = fed.pump(fed.hub.node_lost("b", "connection reset", fed.now))  # while the dealer works
    assert [type(e) for e in events] == [Dropped]
    (mask_sum,) = held
    events = fed.pump(fed.hub.receive(DEALER_LINK, mask_sum, fed.now))
    assert not failures(events)
    got = fed.hub.aggregate()
    assert got.included == list(NAMES) and got.dropped == []  # b's update and its mask are both in the sum
    plain, _, _ = start(data, aggregation={"secure": False})
    want, _ = one_round(plain, weights)
    assert np.abs(got.mean_update - want.mean_update).max() <= 3 * 2.0**-17
    assert "b" not in fed.hub.active  # and b takes no part in later rounds


@pytest.mark.parametrize("fault", ["lost", "silent", "bad_sum", "error"])
def test_without_a_working_dealer_the_run_fails_with_a_named_error(data, fault):
    fed, weights, _ = dealer_start(data)
    if fault == "lost":
        fed.intercept = lambda node, msg: "lose" if node == DEALER_LINK and msg.kind == Kind.UNMASK else None
    elif fault == "silent":
        fed.dealer_reply = lambda msg: None if msg.kind == Kind.MASK_SUM else msg
    elif fault == "bad_sum":
        fed.dealer_reply = lambda msg: (Message(msg.kind, msg.header, {"sum": msg.arrays["sum"][:-1]})
                                        if msg.kind == Kind.MASK_SUM else msg)
    else:
        fed.dealer_reply = lambda msg: Message(Kind.ERROR, {"reason": "out of memory"}) if msg.kind == Kind.DEALER_KEY else msg
    events = fed.pump(fed.hub.begin_round(1, weights, 0.05, fed.now))
    if fault == "silent":
        assert not failures(events) and fed.hub.phase is Phase.UNMASK
        events = fed.pump(fed.hub.on_deadline(fed.now + 10_000))
    (error,) = failures(events)
    assert isinstance(error, RoundFailed) and "dealer" in str(error) and "--resume" in str(error)
    expected = {"lost": "connection", "silent": "timeout", "bad_sum": "shape", "error": "out of memory"}[fault]
    assert expected in str(error)
    assert fed.hub.phase is Phase.CLOSED


def test_a_dealer_lost_between_rounds_fails_the_next_round_not_the_evaluation(data):
    fed, weights, _ = dealer_start(data)
    first, _ = one_round(fed, weights)
    assert first.included == list(NAMES)
    fed.intercept = lambda node, msg: "drop" if node == "c" and msg.kind == Kind.EVALUATE else None
    events = fed.pump(fed.hub.begin_evaluation(1, weights, fed.now))
    assert fed.hub.phase is Phase.EVALUATING  # waiting for c
    events += fed.pump(fed.hub.node_lost(DEALER_LINK, "connection reset", fed.now))
    assert not failures(events) and fed.hub.phase is Phase.EVALUATING
    events += fed.pump(fed.hub.on_deadline(fed.now + 10_000))  # c is dropped; a and b evaluated
    assert not failures(events) and fed.hub.phase is Phase.IDLE
    _, events = one_round(fed, weights, number=2)
    (error,) = failures(events)
    assert isinstance(error, RoundFailed) and error.round == 2 and "dealer lost the connection: connection reset" in str(error)


# -- configuration ---------------------------------------------------------------------------------


def _raw(**federation):
    return {
        "federation": {"nodes": [{"name": f"n{i}", "address": f"ws://127.0.0.1:{9000 + i}", "token": TOKEN}
                                 for i in range(3)], **federation},
        "aggregation": {"masking": "dealer"},
    }


def test_dealer_masking_is_read_and_sent_to_the_nodes(tmp_path):
    key = tmp_path / "dealer.key"
    key.write_text(TOKEN + "\n")
    cfg = parse_config(_raw(dealer_address="ws://10.0.0.9:8790", dealer_token_file="dealer.key"), base_dir=tmp_path)
    assert cfg.federation.dealer_token == TOKEN and cfg.aggregation.masking == "dealer"
    assert cfg.node_spec()["aggregation"]["masking"] == "dealer" and "federation" not in cfg.node_spec()
    assert parse_config({"federation": _raw()["federation"]}).aggregation.masking == "pairwise"


@pytest.mark.parametrize(("federation", "aggregation", "message"), [
    ({}, {}, "federation.dealer_address: missing.*primia dealer"),
    ({"dealer_address": "10.0.0.9:8790", "dealer_token": TOKEN}, {}, "dealer_address.*ws://HOST:PORT"),
    ({"dealer_address": "ws://10.0.0.9:8790"}, {}, "federation.dealer_token: missing"),
    ({"dealer_address": "ws://10.0.0.9:8790", "dealer_token": "short"}, {}, "dealer_token: the secret has 5 bytes"),
    ({"dealer_address": "ws://10.0.0.9:8790", "dealer_token": TOKEN}, {"masking": "pairwise"}, "only used with"),
    ({"dealer_address": "ws://10.0.0.9:8790", "dealer_token": TOKEN}, {"neighbours": 2}, "aggregation.neighbours"),
    ({}, {"masking": "third-party"}, "aggregation.masking"),
])
def test_dealer_config_errors_name_the_key_and_the_fix(federation, aggregation, message):
    raw = _raw(**federation)
    raw["aggregation"].update(aggregation)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)
