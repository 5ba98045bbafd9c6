"""The hub and node protocols, sans I/O: whole rounds through the real wire format, membership, dropouts, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fl.errors import RoundFailed, TooFewNodes
from fl.hub_protocol import Disconnect, Dropped, Evaluated, Joined, Ready, RoundCollected
from fl.messages import PROTOCOL_VERSION, Kind, Message
from fl.models import Layout, build_model
from fl.node_protocol import Close, NodeSession, Send
from fl.pairwise import Kind as SA
from fl.transport import run_token

from .fl_helpers import InMemoryFederation, digits_folders, failures, make_config, node_runtimes

NAMES = ("a", "b", "c")
CLASSES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_folders(tmp_path_factory.mktemp("digits"), NAMES, limit=300)


def start(data, names=NAMES, **sections):
    cfg = make_config(list(names), **sections)
    model = build_model("simple_cnn", num_classes=10, in_channels=1, input_size=8, width=4, seed=cfg.run.seed)
    layout = Layout.of(model)
    plain = not cfg.aggregation.secure
    fed = InMemoryFederation(cfg, node_runtimes(data, names, allow_plain=plain))
    events = fed.setup(CLASSES, 1, layout)
    assert sorted(e.node for e in events if isinstance(e, Joined)) == sorted(names)
    assert sorted(e.node for e in events if isinstance(e, Ready)) == sorted(names)
    return fed, layout.flatten(model)


def one_round(fed, weights, number=1):
    events = fed.pump(fed.hub.begin_round(number, weights, 0.05, fed.now))
    if failures(events):
        return None, events
    assert isinstance(events[-1], RoundCollected), events
    return fed.hub.aggregate(), events


def test_setup_reports_every_nodes_data_and_samples(data):
    fed, _ = start(data)
    joined = {e.node: e.summary for e in fed.events if isinstance(e, Joined)}
    ready = {e.node: e for e in fed.events if isinstance(e, Ready)}
    assert all(s["classes"] == CLASSES for s in joined.values())
    # val_fraction 0.25 of ~80 images per node
    assert all(15 <= r.val_samples <= 25 for r in ready.values())
    assert all(r.train_samples + r.val_samples == sum(joined[n]["counts"]) for n, r in ready.items())
    assert fed.hub.ready_nodes() == list(NAMES)


@pytest.mark.parametrize("secure", [{"secure": True}, {"secure": True, "masking": "dealer"},
                                    {"secure": True, "neighbours": 2}])
def test_secure_round_equals_plain_round_within_fixed_point_error(data, secure):
    fed, weights = start(data, aggregation=secure)
    plain, _ = start(data, aggregation={"secure": False})
    got, _ = one_round(fed, weights)
    want, _ = one_round(plain, weights)
    assert got.included == want.included == list(NAMES)
    # each node rounds w_i * u_i once (frac_bits 16); the weights sum to one
    assert np.abs(got.mean_update - want.mean_update).max() <= 3 * 2.0**-17
    assert np.abs(want.mean_update).max() > 1e-3  # the nodes really trained
    samples = {n: fed.hub.nodes[n].train_samples for n in NAMES}
    assert got.weights == pytest.approx({n: samples[n] / sum(samples.values()) for n in NAMES})
    np.testing.assert_allclose(got.model, weights + got.mean_update.astype(np.float32), atol=1e-6)


@pytest.mark.parametrize("stage_kind", [SA.KEYS, SA.ROSTER, SA.SHARES_IN, Kind.TRAIN])
def test_a_node_lost_before_uploading_leaves_the_others_average(data, stage_kind):
    """Lost when asked for its keys, at the roster, when its partners' shares arrive or on the weights: it is
    left out, and its pair masks with the survivors are removed through its shared mask key."""
    fed, weights = start(data)
    fed.intercept = lambda node, msg: "lose" if node == "c" and msg.kind == stage_kind else None
    got, events = one_round(fed, weights)
    assert any(isinstance(e, Dropped) and e.node == "c" for e in events)
    assert got.included == ["a", "b"] and got.dropped == ["c"]
    reference, _ = start(data, names=("a", "b"), aggregation={"secure": False})
    want, _ = one_round(reference, weights)
    assert np.abs(got.mean_update - want.mean_update).max() <= 2 * 2.0**-17 / (sum(got.weights[n] for n in "ab"))


@pytest.mark.parametrize("stage_kind", [SA.SURVIVORS, SA.SIGNATURES])
def test_a_node_lost_after_uploading_is_counted(data, stage_kind):
    """Lost after its upload reached the hub: its self mask is opened from its partners' shares, so its update
    counts and the round completes without waiting."""
    fed, weights = start(data)
    fed.intercept = lambda node, msg: "lose" if node == "c" and msg.kind == stage_kind else None
    got, events = one_round(fed, weights)
    assert got.included == list(NAMES) and got.dropped == []
    plain, _ = start(data, aggregation={"secure": False})
    want, _ = one_round(plain, weights)
    assert np.abs(got.mean_update - want.mean_update).max() <= 3 * 2.0**-17


def test_on_dropout_fail_fails_the_round(data):
    fed, weights = start(data, federation={"on_dropout": "fail"})
    fed.intercept = lambda node, msg: "lose" if node == "a" and msg.kind == Kind.TRAIN else None
    _, events = one_round(fed, weights)
    (error,) = failures(events)
    assert isinstance(error, RoundFailed) and "on_dropout" in str(error)


def test_dropping_below_min_nodes_is_a_named_error(data):
    fed, weights = start(data, federation={"min_nodes": 3})
    fed.intercept = lambda node, msg: "lose" if node == "a" and msg.kind == SA.ROSTER else None
    _, events = one_round(fed, weights)
    (error,) = failures(events)
    assert isinstance(error, TooFewNodes) and error.needed == 3 and error.remaining == ["b", "c"]
    assert "federation.min_nodes = 3" in str(error)


def test_a_silent_node_is_dropped_at_the_deadline(data):
    fed, weights = start(data, aggregation={"secure": False})
    fed.intercept = lambda node, msg: "drop" if node == "b" and msg.kind == Kind.TRAIN else None
    events = fed.pump(fed.hub.begin_round(1, weights, 0.05, fed.now))
    assert not events and fed.hub.aggregator.waiting_for() == {"b"}  # still waiting for b
    assert fed.hub.on_deadline(fed.now + 1.0) == []  # not yet
    events = fed.pump(fed.hub.on_deadline(fed.now + 10_000))
    assert any(isinstance(e, Dropped) and e.node == "b" and "timeout" in e.reason for e in events)
    assert isinstance(events[-1], RoundCollected)
    assert fed.hub.aggregate().included == ["a", "c"]


def test_evaluation_pools_node_summaries(data):
    fed, weights = start(data)
    result, _ = one_round(fed, weights)
    events = fed.pump(fed.hub.begin_evaluation(1, result.model, fed.now))
    (evaluated,) = [e for e in events if isinstance(e, Evaluated)]
    assert set(evaluated.summaries) == set(NAMES)
    for node, summary in evaluated.summaries.items():
        assert summary.samples == fed.hub.nodes[node].val_samples == summary.confusion.sum()


def test_a_node_that_reconnects_takes_part_from_the_next_round(data):
    """c is lost in round 1, connects again (a restarted process: a fresh session), and trains in round 2."""
    fed, weights = start(data)
    fed.intercept = lambda node, msg: "lose" if node == "c" and msg.kind == Kind.TRAIN else None
    first, _ = one_round(fed, weights)
    assert first.included == ["a", "b"] and first.dropped == ["c"]
    fed.intercept = lambda node, msg: None
    events = fed.connect("c")
    assert [type(e) for e in events] == [Joined, Ready]
    second, _ = one_round(fed, first.model, number=2)
    assert second.included == list(NAMES)


def test_a_node_that_joins_during_a_round_waits_for_the_next(data):
    fed, weights = start(data, names=("a", "b"), aggregation={"secure": False})
    fed.runtimes.update(node_runtimes(data, ("c",), allow_plain=True))
    fed.intercept = lambda node, msg: "drop" if msg.kind == Kind.TRAIN else None  # hold the round open
    fed.pump(fed.hub.begin_round(1, weights, 0.05, fed.now))
    fed.intercept = lambda node, msg: None
    fed.cfg.federation.nodes  # c is not configured in this hub's config, but the protocol takes any authenticated peer
    events = fed.connect("c")
    assert [type(e) for e in events] == [Joined, Ready]
    assert fed.hub.aggregator.waiting_for() == {"a", "b"}  # the open round does not wait for c


BAD_UPDATES = {
    "wrong kind": lambda size: Message(Kind.EVALUATION, {"round": 1}),
    "wrong dtype": lambda size: Message(Kind.UPDATE, {"round": 1, "train": _figures()}, {"update": np.zeros(size, np.float64)}),
    "wrong shape": lambda size: Message(Kind.UPDATE, {"round": 1, "train": _figures()}, {"update": np.zeros(size + 1, np.float32)}),
    "NaN": lambda size: Message(Kind.UPDATE, {"round": 1, "train": _figures()}, {"update": np.full(size, np.nan, np.float32)}),
    "unknown field": lambda size: Message(Kind.UPDATE, {"round": 1, "train": _figures(), "x": 1}, {"update": np.zeros(size, np.float32)}),
    "wrong round": lambda size: Message(Kind.UPDATE, {"round": 9, "train": _figures()}, {"update": np.zeros(size, np.float32)}),
    "bad figures": lambda size: Message(Kind.UPDATE, {"round": 1, "train": {"loss": "x"}}, {"update": np.zeros(size, np.float32)}),
    "extra array": lambda size: Message(Kind.UPDATE, {"round": 1, "train": _figures()},
                                        {"update": np.zeros(size, np.float32), "x": np.zeros(1)}),
}


def _figures():
    return {"loss": 1.0, "accuracy": 0.5, "samples": 10, "steps": 1}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_a_bad_message_disconnects_only_its_sender(data, case):
    fed, weights = start(data, aggregation={"secure": False})
    fed.intercept = lambda node, msg: "drop" if node == "a" and msg.kind == Kind.TRAIN else None
    fed.pump(fed.hub.begin_round(1, weights, 0.05, fed.now))
    actions = fed.hub.receive("a", BAD_UPDATES[case](weights.size), fed.now)
    assert any(isinstance(x, Disconnect) and x.peer == "a" for x in actions)
    (dropped,) = [x for x in actions if isinstance(x, Dropped)]
    assert "protocol error" in dropped.reason
    assert isinstance(actions[-1], RoundCollected)  # b and c already delivered: the round goes on
    assert fed.hub.aggregate().included == ["b", "c"]


def test_a_node_answers_out_of_order_messages_with_an_error(data):
    session = NodeSession(node_runtimes(data, ("a",))["a"])
    actions = session.receive(Message(Kind.TRAIN, {"round": 1}))
    assert isinstance(actions[0], Send) and actions[0].message.kind == Kind.ERROR
    assert "unexpected 'train' message in state hello" in actions[0].message.header["reason"]
    assert isinstance(actions[1], Close)


def test_a_node_refuses_a_hello_for_another_name_or_run(data):
    session = NodeSession(node_runtimes(data, ("a",))["a"])
    actions = session.receive(Message(Kind.HELLO, {"protocol": PROTOCOL_VERSION, "run_id": "r", "node": "zz"}))
    assert actions[0].message.kind == Kind.ERROR and "started as 'a'" in actions[0].message.header["reason"]
    session = NodeSession(node_runtimes(data, ("a",))["a"], run_token=run_token("run-1"))
    actions = session.receive(Message(Kind.HELLO, {"protocol": PROTOCOL_VERSION, "run_id": "run-2", "node": "a"}))
    assert "its handshake was for another run" in actions[0].message.header["reason"]


def test_a_node_trains_a_round_number_once(data):
    """A hub that asks again for a round the node trained (to difference two sums) is refused."""
    fed, weights = start(data, aggregation={"secure": False})
    one_round(fed, weights)
    session = fed.sessions["a"]
    actions = session.receive(Message(Kind.TRAIN, {"round": 1, "lr": 0.05}, {"weights": weights}))
    assert actions[0].message.kind == Kind.ERROR and "a round is trained once" in actions[0].message.header["reason"]


def test_a_node_with_a_different_model_is_disconnected(data):
    cfg = make_config(list(NAMES))
    other = build_model("simple_cnn", num_classes=10, in_channels=1, input_size=8, width=5)
    fed = InMemoryFederation(cfg, node_runtimes(data, NAMES))
    events = fed.setup(CLASSES, 1, Layout.of(other))
    dropped = [e for e in events if isinstance(e, Dropped)]
    assert sorted(e.node for e in dropped) == list(NAMES) and "builds a different model" in dropped[0].reason
    assert fed.hub.ready_nodes() == []
    events = fed.pump(fed.hub.begin_round(1, Layout.of(other).flatten(other), 0.05, 0.0))
    (error,) = failures(events)
    assert isinstance(error, TooFewNodes) and error.stage == "start"


@pytest.mark.parametrize("data_field", [{"channels": [[1]]}, {"counts": [1, "x"]}, {"classes": "abc"}])
def test_a_malformed_hello_ack_disconnects_its_sender(data, data_field):
    cfg = make_config(list(NAMES))
    fed = InMemoryFederation(cfg, node_runtimes(data, NAMES))
    fed.hub.connected("a", 0.0)
    summary = {"classes": ["0", "1"], "counts": [1, 1], "channels": [1], "min_size": [8, 8], "max_size": [8, 8]}
    ack = Message(Kind.HELLO_ACK, {"protocol": PROTOCOL_VERSION, "node": "a", "data": {**summary, **data_field}, "warnings": []})
    actions = fed.hub.receive("a", ack, 0.0)
    (dropped,) = [x for x in actions if isinstance(x, Dropped)]
    assert dropped.node == "a" and "protocol error" in dropped.reason
    assert "a" not in fed.hub.nodes


def test_a_failed_step_abandons_the_nodes_round(data):
    """Training fails on a node: it reports it, the round goes on without it, and the node stays usable."""
    fed, weights = start(data)
    trainer = fed.runtimes["a"].trainer
    original = trainer.train_round
    trainer.train_round = lambda *args: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        got, events = one_round(fed, weights)
    finally:
        trainer.train_round = original
    dropped = [e for e in events if isinstance(e, Dropped)]
    assert [e.node for e in dropped] == ["a"] and "boom" in dropped[0].reason
    assert got.included == ["b", "c"]


# -- sparse mask graphs (aggregation.neighbours = 2: the ring a-b-c-d-e-f-a) -------------------------

RING = ("a", "b", "c", "d", "e", "f")


@pytest.fixture(scope="module")
def ring_data(tmp_path_factory):
    return digits_folders(tmp_path_factory.mktemp("digits6"), RING, limit=360)


def test_a_sparse_mask_graph_survives_a_dropout_and_equals_plain_fedavg(ring_data):
    fed, weights = start(ring_data, names=RING, aggregation={"neighbours": 2})
    fed.intercept = lambda node, msg: "lose" if node == "c" and msg.kind == Kind.TRAIN else None
    got, events = one_round(fed, weights)
    assert got.included == ["a", "b", "d", "e", "f"] and got.dropped == ["c"]
    reference, _ = start(ring_data, names=("a", "b", "d", "e", "f"), aggregation={"secure": False})
    want, _ = one_round(reference, weights)
    assert np.abs(want.mean_update).max() > 1e-3
    survivors = sum(got.weights[n] for n in got.included)
    assert np.abs(got.mean_update - want.mean_update).max() <= 5 * 2.0**-17 / survivors


def test_dropouts_that_disconnect_a_sparse_mask_graph_fail_the_round_cleanly(ring_data):
    fed, weights = start(ring_data, names=RING, aggregation={"neighbours": 2})
    # lost after the mask graph was fixed on the roster (nodes lost earlier are left out of the graph)
    fed.intercept = lambda node, msg: "lose" if node in ("b", "e") and msg.kind == SA.SHARES_IN else None
    _, events = one_round(fed, weights)
    (error,) = failures(events)
    # survivors a, f and c, d: two parts whose sums unmasking would reveal
    assert isinstance(error, RoundFailed) and error.stage == "upload" and "aggregation.neighbours" in str(error)
    assert "[['a', 'f'], ['c', 'd']]" in str(error)
    assert not fed.sent(SA.SURVIVORS) and not fed.sent(SA.REVEAL)  # nobody was asked to reveal anything
