"""Dealer-masked secure aggregation (fl.dealer_masking, fl.dealer): sums, dropouts, the dealer session, a hub that
deviates, and the hub protocol with a dealer."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fl.transport import run_token
from fl.config import parse_config
from fl.dealer import Close, DealerSession, Reply
from fl.dealer_masking import DealerAggregator, Kind
from fl.errors import RoundFailed
from fl.hub_protocol import DEALER_LINK
from fl.identity import sign_statement
from fl.masks import x25519_public
from fl.messages import PROTOCOL_VERSION, Message
from fl.messages import Kind as Common
from mpc.errors import ConfigError, ProtocolError

from .fl_helpers import base_config, digits_folders, directory, failures, keys_dir, private_key
from .secagg_helpers import RUN_ID, SecAggRound, context_for, fedavg
from .test_fl_protocol import one_round, start

NAMES = ("a", "b", "c")


def updates_for(rng, names, size=1000, scale=0.05):
    return {n: rng.normal(scale=scale, size=size).astype(np.float32) for n in names}


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_dealer_masked_sum_equals_fedavg_within_fixed_point_error(rng, ring_bits, count):
    names = [f"node{i}" for i in range(count)]
    updates = updates_for(rng, names)
    samples = {n: int(s) for n, s in zip(names, rng.integers(1, 500, size=count))}
    result = SecAggRound(names, updates, masking="dealer", ring_bits=ring_bits, samples=samples).run()
    assert result.included == names
    err = np.abs(result.mean - fedavg(updates, result.weights, names)).max()
    assert 0 < err <= count * 2.0**-17


@pytest.mark.parametrize("lose", [{"c": "before-upload"}, {"c": Kind.KEYS}])
def test_the_dealer_leaves_nodes_lost_before_uploading_out_of_the_mask_sum(rng, lose):
    names = ["a", "b", "c", "d"]
    updates = updates_for(rng, names)
    r = SecAggRound(names, updates, masking="dealer")
    r.lose = lose
    result = r.run()
    assert result.included == ["a", "b", "d"] and result.dropped == ["c"]
    assert np.abs(result.mean - fedavg(updates, result.weights, result.included)).max() <= 3 * 2.0**-17 / 0.75


def test_a_node_lost_after_uploading_costs_nothing(rng):
    names = ["a", "b", "c"]
    updates = updates_for(rng, names)
    r = SecAggRound(names, updates, masking="dealer")
    r.lose = {"c": "upload"}
    result = r.run()
    assert result.included == names  # its mask is in the dealer's sum; two signatures of three suffice
    assert np.abs(result.mean - fedavg(updates, result.weights, names)).max() <= 3 * 2.0**-17


def test_the_hubs_view_of_one_upload_is_uniform_with_a_dealer():
    from .test_fl_secagg import _assert_uniform_ring32

    size = 1 << 16
    names = ["a", "b", "c"]
    for fill in (0.0, 1000.0):
        updates = {n: np.full(size, fill if n == "a" else 0.5, dtype=np.float32) for n in names}
        r = SecAggRound(names, updates, masking="dealer")
        r.run()
        _assert_uniform_ring32(r.uploads["a"])
    mask_sum = [m for p, m in r.to_peers if m.kind == Kind.UNMASK]
    assert mask_sum  # the dealer was asked once, for the sum over every node


# -- a hub that deviates -------------------------------------------------------------------------------


def test_malicious_hub_dealer_key_swap(rng):
    """The hub relays a dealer key of its own: it cannot sign it as the dealer the nodes pinned, so every node
    refuses the roster and nothing is uploaded."""
    names = ["a", "b", "c"]
    r = SecAggRound(names, updates_for(rng, names, size=64), masking="dealer")
    mine = x25519_public(X25519PrivateKey.generate())

    def swap(peer, msg):
        if msg.kind == Kind.ROSTER:
            dealer = {"key": mine, "signature": msg.header["dealer"]["signature"]}  # the real signature, another key
            return Message(msg.kind, {**msg.header, "dealer": dealer})
        return msg

    r.hub_to = swap
    with pytest.raises(Exception):
        r.run()
    assert not r.uploads
    assert set(r.refusals) == set(names)
    assert all("not signed by the dealer this node pinned" in reason for reason in r.refusals.values())


def test_malicious_hub_dealer_key_swap_signed_by_the_hub(rng):
    names = ["a", "b", "c"]
    r = SecAggRound(names, updates_for(rng, names, size=64), masking="dealer")
    mine = x25519_public(X25519PrivateKey.generate())

    def swap(peer, msg):
        if msg.kind == Kind.ROSTER:
            number = msg.header["round"]
            signature = sign_statement(private_key("hub"), "dealer-key", RUN_ID, number, context_for(number), mine)
            return Message(msg.kind, {**msg.header, "dealer": {"key": mine, "signature": signature}})
        return msg

    r.hub_to = swap
    with pytest.raises(Exception):
        r.run()
    assert not r.uploads and all("pinned" in reason for reason in r.refusals.values())


def test_malicious_hub_dealer_fake_member(rng):
    """The hub adds mallory, a member it controls with a key the dealer does not know, to the dealer's roster:
    the dealer refuses it and answers nothing."""
    names = ["a", "b", "c"]
    r = SecAggRound(names, updates_for(rng, names, size=64), masking="dealer")
    fake = x25519_public(X25519PrivateKey.generate())

    def add(peer, msg):
        if msg.kind == Kind.DEALER_ROSTER:
            number = msg.header["round"]
            signature = sign_statement(private_key("mallory"), "round-keys", RUN_ID, number, context_for(number),
                                       "mallory", b"", fake)
            keys = {**msg.header["keys"], "mallory": {"mask_key": fake, "signature": signature}}
            return Message(msg.kind, {**msg.header, "keys": keys})
        return msg

    r.hub_to = add
    with pytest.raises(Exception):
        r.run()
    assert "'mallory', which is not a node this dealer knows" in r.refusals[DEALER_LINK]
    assert not [m for p, m in r.to_peers if m.kind == Kind.MASK_SUM]


def test_malicious_hub_dealer_fake_member_under_a_real_name(rng):
    """The same with a key of the hub's under a configured node's name: not signed by that node."""
    names = ["a", "b", "c"]
    r = SecAggRound(names, updates_for(rng, names, size=64), masking="dealer")
    fake = x25519_public(X25519PrivateKey.generate())

    def replace(peer, msg):
        if msg.kind == Kind.DEALER_ROSTER:
            keys = dict(msg.header["keys"])
            keys["c"] = {"mask_key": fake, "signature": keys["c"]["signature"]}
            return Message(msg.kind, {**msg.header, "keys": keys})
        return msg

    r.hub_to = replace
    with pytest.raises(Exception):
        r.run()
    assert "the round key of 'c' is not signed by 'c'" in r.refusals[DEALER_LINK]


class DeviatingDealerHub(DealerAggregator):
    """A hub that skips its own check of survivor signatures and asks the dealer for whatever it likes."""

    def _on_signature(self, peer, msg):
        rnd = self._expect(peer, msg, "consistency")
        rnd.signatures[peer] = msg.header["signature"]
        rnd.waiting.discard(peer)
        return self._advance()


def test_malicious_hub_dealer_sum_over_a_subset_the_members_did_not_sign(rng):
    """The hub asks the dealer for the sum over {a, b} (to subtract b's update, known to it) with the
    signatures the nodes gave for {a, b, c}: the dealer refuses."""
    names = ["a", "b", "c"]
    r = SecAggRound(names, updates_for(rng, names, size=64), masking="dealer", aggregator=DeviatingDealerHub)

    def subset(peer, msg):
        if msg.kind == Kind.UNMASK:
            return Message(msg.kind, {**msg.header, "included": ["a", "b"], "dropped": ["c"],
                                      "signatures": {n: s for n, s in msg.header["signatures"].items() if n != "c"}})
        return msg

    r.hub_to = subset
    with pytest.raises(Exception):
        r.run()
    assert "did not sign this survivor set" in r.refusals[DEALER_LINK]


def test_malicious_hub_replays_a_survivor_signature_from_an_earlier_round(rng):
    names = ["a", "b", "c"]
    updates = updates_for(rng, names, size=64)
    dealer = DealerSession(run_token=run_token(RUN_ID), key=private_key("dealer"), directory=directory(names))
    first = SecAggRound(names, updates, masking="dealer", dealer=dealer)
    first.run()
    old = {n: m.header["signature"] for n, m in first.sent_by_nodes(Kind.SIGNATURE)}
    second = SecAggRound(names, updates, masking="dealer", number=2, dealer=dealer, aggregator=DeviatingDealerHub)

    def replay(peer, msg):
        if msg.kind == Kind.UNMASK:
            return Message(msg.kind, {**msg.header, "signatures": {**msg.header["signatures"], "b": old["b"]}})
        return msg

    second.hub_to = replay
    with pytest.raises(Exception):
        second.run()
    assert "'b' did not sign this survivor set" in second.refusals[DEALER_LINK]


def test_the_dealer_answers_one_sum_per_round_even_across_connections(rng):
    names = ["a", "b", "c"]
    updates = updates_for(rng, names, size=64)
    answered: dict = {}
    dealer = DealerSession(run_token=run_token(RUN_ID), key=private_key("dealer"),
                           directory=directory(names), answered=answered)
    SecAggRound(names, updates, masking="dealer", dealer=dealer).run()
    again = DealerSession(run_token=run_token(RUN_ID), key=private_key("dealer"),
                           directory=directory(names), answered=answered)
    with pytest.raises(ProtocolError, match="answered already"):
        again.receive(Message(Kind.DEALER_KEYS, {"protocol": PROTOCOL_VERSION, "run_id": RUN_ID, "round": 1,
                                                 "context": context_for(1), "size": 64, "ring_bits": 32,
                                                 "min_nodes": 2}))


# -- the dealer's session ---------------------------------------------------------------------------------


def _keys_msg(**header):
    base = {"protocol": PROTOCOL_VERSION, "run_id": RUN_ID, "round": 1, "context": context_for(1), "size": 8,
            "ring_bits": 32, "min_nodes": 2}
    return Message(Kind.DEALER_KEYS, {**base, **header})


def test_the_dealer_session_refuses_bad_and_out_of_order_messages():
    session = DealerSession(run_token=run_token(RUN_ID), key=private_key("dealer"), directory=directory(["a", "b"]))
    with pytest.raises(ProtocolError, match="does not handle"):
        session.receive(Message(Common.TRAIN, {"round": 1}))
    with pytest.raises(ProtocolError, match="protocol"):
        session.receive(_keys_msg(protocol=PROTOCOL_VERSION - 1))
    with pytest.raises(ProtocolError, match="no key here"):
        session.receive(Message(Kind.DEALER_ROSTER, {"round": 1, "keys": {}}))
    with pytest.raises(ProtocolError, match="--max-message-mib 2"):  # 2^19 values x 4 bytes = 2 MiB > 1 MiB
        DealerSession(run_token=run_token(RUN_ID), key=private_key("dealer"), directory=directory(["a"]),
                      max_message_bytes=1 << 20).receive(_keys_msg(size=1 << 19))
    with pytest.raises(ProtocolError, match="context"):
        session.receive(_keys_msg(context=b"short"))
    (reply,) = session.receive(_keys_msg())
    assert isinstance(reply, Reply) and reply.message.kind == Kind.DEALER_KEY and len(reply.message.header["key"]) == 32
    with pytest.raises(ProtocolError, match="round 2"):
        session.receive(Message(Kind.DEALER_ROSTER, {"round": 2, "keys": {}}))
    with pytest.raises(ProtocolError, match="unexpected field"):
        session.receive(Message(Kind.DEALER_ROSTER, {"round": 1, "keys": {}, "extra": 1}))
    with pytest.raises(ProtocolError, match="needs at least 2"):
        session.receive(Message(Kind.DEALER_ROSTER, {"round": 1, "keys": {}}))
    assert isinstance(session.receive(Message(Common.BYE, {"reason": "done"}))[0], Close)


# -- the hub protocol with a dealer (sans I/O, through the real wire format) ---------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_folders(tmp_path_factory.mktemp("digits"), NAMES, limit=300)


def dealer_start(data, names=NAMES, **sections):
    aggregation = {"masking": "dealer", **sections.pop("aggregation", {})}
    return start(data, names, aggregation=aggregation, **sections)


def test_a_dealer_masked_round_equals_a_plain_round(data):
    fed, weights = dealer_start(data)
    plain, _ = start(data, aggregation={"secure": False})
    got, _ = one_round(fed, weights)
    want, _ = one_round(plain, weights)
    assert got.included == want.included == list(NAMES)
    assert np.abs(got.mean_update - want.mean_update).max() <= 3 * 2.0**-17
    assert np.abs(want.mean_update).max() > 1e-3
    # the dealer gets its key request, the roster and the unmask request; nodes never reveal anything
    assert [m.kind for s, r, m in fed.log if r == DEALER_LINK] == [Kind.DEALER_KEYS, Kind.DEALER_ROSTER, Kind.UNMASK]
    assert not [m for s, r, m in fed.log if m.kind in ("sa_reveal", "sa_shares")]


@pytest.mark.parametrize("fault", ["lost", "silent", "bad_sum", "error"])
def test_without_a_working_dealer_the_round_fails_with_a_named_error(data, fault):
    fed, weights = dealer_start(data)
    if fault == "lost":
        fed.intercept = lambda node, msg: "lose" if node == DEALER_LINK and msg.kind == Kind.UNMASK else None
    elif fault == "silent":
        fed.dealer_reply = lambda msg: None if msg.kind == Kind.MASK_SUM else msg
    elif fault == "bad_sum":
        fed.dealer_reply = lambda msg: (Message(msg.kind, msg.header, {"sum": msg.arrays["sum"][:-1]})
                                        if msg.kind == Kind.MASK_SUM else msg)
    else:
        fed.dealer_reply = lambda msg: (Message(Common.ERROR, {"reason": "out of memory"})
                                        if msg.kind == Kind.DEALER_KEY else msg)
    events = fed.pump(fed.hub.begin_round(1, weights, 0.05, fed.now))
    if fault == "silent":
        assert not failures(events) and fed.hub.aggregator.waiting_for() == {DEALER_LINK}
        events = fed.pump(fed.hub.on_deadline(fed.now + 10_000))
    (error,) = failures(events)
    assert isinstance(error, RoundFailed) and "dealer" in str(error)
    expected = {"lost": "connection", "silent": "timeout", "bad_sum": "shape", "error": "out of memory"}[fault]
    assert expected in str(error)


def test_a_round_without_a_connected_dealer_fails_at_its_start(data):
    fed, weights = dealer_start(data)
    fed.pump(fed.hub.lost(DEALER_LINK, "connection reset", fed.now))
    _, events = one_round(fed, weights)
    (error,) = failures(events)
    assert isinstance(error, RoundFailed) and error.stage == "start" and "primia dealer" in str(error)


def test_a_dealer_that_reconnects_serves_the_next_round(data):
    fed, weights = dealer_start(data)
    first, _ = one_round(fed, weights)
    fed.pump(fed.hub.lost(DEALER_LINK, "connection reset", fed.now))
    fed.connect(DEALER_LINK)
    second, _ = one_round(fed, first.model, number=2)
    assert second.included == list(NAMES)


# -- configuration ---------------------------------------------------------------------------------------


def test_dealer_masking_is_read_and_sent_to_the_nodes():
    cfg = parse_config(base_config(list(NAMES), aggregation={"masking": "dealer"}))
    assert cfg.aggregation.masking == "dealer" and cfg.federation.dealer_public_key_file.endswith("dealer.pub")
    assert cfg.node_spec()["aggregation"]["masking"] == "dealer" and "federation" not in cfg.node_spec()


@pytest.mark.parametrize(("federation", "aggregation", "message"), [
    ({"dealer_public_key_file": ""}, {"masking": "dealer"}, "dealer_public_key_file: missing.*primia keygen"),
    ({"dealer_public_key_file": "nowhere.pub"}, {"masking": "dealer"}, "cannot read"),
    ({}, {"masking": "dealer", "neighbours": 2}, "aggregation.neighbours"),
    ({"dealer_public_key_file": "{keys}/dealer.pub"}, {"masking": "pairwise"}, "only used with"),
    ({}, {"masking": "third-party"}, "aggregation.masking"),
    ({"dealer_address": "ws://10.0.0.9:8790"}, {"masking": "dealer"}, "dealer_address: no longer used"),
])
def test_dealer_config_errors_name_the_key_and_the_fix(federation, aggregation, message):
    raw = base_config(list(NAMES), aggregation=aggregation)
    raw["federation"].update({k: v.format(keys=keys_dir()) for k, v in federation.items()})
    if federation.get("dealer_public_key_file") == "":
        del raw["federation"]["dealer_public_key_file"]
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)
