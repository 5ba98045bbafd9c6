"""The hub and node protocols, sans I/O: whole rounds through the real wire format, dropouts, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fl.errors import RoundFailed, TooFewNodes
from fl.hub_protocol import Configured, Disconnect, Dropped, Evaluated, NodesReady, Phase, RoundCollected
from fl.messages import PROTOCOL_VERSION, Kind, Message
from fl.models import Layout, build_model
from fl.node_protocol import Close, NodeSession, Send

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
    fed = InMemoryFederation(cfg, node_runtimes(data, names))
    events = fed.setup(CLASSES, 1, layout)
    assert [type(e) for e in events] == [NodesReady, Configured]
    return fed, layout.flatten(model), events[1]


def one_round(fed, weights, number=1):
    events = fed.pump(fed.hub.begin_round(number, weights, 0.05, fed.now))
    if failures(events):
        return None, events
    assert isinstance(events[-1], RoundCollected)
    return fed.hub.aggregate(), events


def test_setup_reports_every_nodes_data_and_samples(data):
    fed, _, configured = start(data)
    ready = fed.events[0]
    assert set(ready.summaries) == set(NAMES)
    assert all(s["classes"] == CLASSES for s in ready.summaries.values())
    # val_fraction 0.25 of ~80 images per node
    assert all(15 <= v <= 25 for v in configured.val_samples.values())
    assert all(configured.train_samples[n] + configured.val_samples[n] == sum(ready.summaries[n]["counts"]) for n in NAMES)


def test_secure_round_equals_plain_round_within_fixed_point_error(data):
    secure, weights, configured = start(data)
    plain, _, _ = start(data, aggregation={"secure": False})
    got, _ = one_round(secure, weights)
    want, _ = one_round(plain, weights)
    assert got.included == want.included == list(NAMES)
    # each node rounds w_i * u_i once (frac_bits 16); the weights sum to one
    assert np.abs(got.mean_update - want.mean_update).max() <= 3 * 2.0**-17
    assert np.abs(want.mean_update).max() > 1e-3  # the nodes really trained
    samples = configured.train_samples
    assert got.weights == pytest.approx({n: samples[n] / sum(samples.values()) for n in NAMES})


@pytest.mark.parametrize("stage_kind", [Kind.KEYS, Kind.ROSTER, Kind.TRAIN])
def test_a_node_lost_before_uploading_leaves_the_others_average(data, stage_kind):
    """Lost when asked for its key, or after it (on the roster or the weights: its pair seeds are revealed)."""
    secure, weights, _ = start(data)
    secure.intercept = lambda node, msg: "lose" if node == "c" and msg.kind == stage_kind else None
    got, events = one_round(secure, weights)
    assert any(isinstance(e, Dropped) and e.node == "c" for e in events)
    assert got.included == ["a", "b"] and got.dropped == ["c"]
    reference, _, _ = start(data, names=("a", "b"), aggregation={"secure": False})
    want, _ = one_round(reference, weights)
    assert np.abs(got.mean_update - want.mean_update).max() <= 2 * 2.0**-17 / (sum(got.weights[n] for n in "ab"))


def test_a_node_lost_during_unmask_fails_the_round_cleanly(data):
    fed, weights, _ = start(data)
    fed.intercept = lambda node, msg: "lose" if node == "b" and msg.kind == Kind.UNMASK else None
    _, events = one_round(fed, weights)
    (error,) = failures(events)
    assert isinstance(error, RoundFailed) and error.stage == "unmask"
    assert fed.hub.phase is Phase.CLOSED


def test_on_dropout_fail_fails_the_round(data):
    fed, weights, _ = start(data, federation={"on_dropout": "fail"})
    fed.intercept = lambda node, msg: "lose" if node == "a" and msg.kind == Kind.TRAIN else None
    _, events = one_round(fed, weights)
    (error,) = failures(events)
    assert isinstance(error, RoundFailed) and "on_dropout" in str(error)


def test_dropping_below_min_nodes_is_a_named_error(data):
    fed, weights, _ = start(data, federation={"min_nodes": 3})
    fed.intercept = lambda node, msg: "lose" if node == "a" and msg.kind == Kind.ROSTER else None
    _, events = one_round(fed, weights)
    (error,) = failures(events)
    assert isinstance(error, TooFewNodes) and error.min_nodes == 3 and error.remaining == ["b", "c"]


def test_a_silent_node_is_dropped_at_the_deadline(data):
    fed, weights, _ = start(data, aggregation={"secure": False})
    fed.intercept = lambda node, msg: "drop" if node == "b" and msg.kind == Kind.TRAIN else None
    events = fed.pump(fed.hub.begin_round(1, weights, 0.05, fed.now))
    assert not events and fed.hub.phase is Phase.TRAIN  # still waiting for b
    assert fed.hub.on_deadline(fed.now + 1.0) == []  # not yet
    events = fed.pump(fed.hub.on_deadline(fed.now + 10_000))
    assert any(isinstance(e, Dropped) and e.node == "b" and "timeout" in e.reason for e in events)
    assert isinstance(events[-1], RoundCollected)
    assert fed.hub.aggregate().included == ["a", "c"]


def test_evaluation_pools_node_summaries(data):
    fed, weights, configured = start(data)
    result, _ = one_round(fed, weights)
    events = fed.pump(fed.hub.begin_evaluation(1, weights + result.mean_update.astype(np.float32), fed.now))
    (evaluated,) = [e for e in events if isinstance(e, Evaluated)]
    assert set(evaluated.summaries) == set(NAMES)
    for node, summary in evaluated.summaries.items():
        assert summary.samples == configured.val_samples[node] == summary.confusion.sum()


BAD_UPDATES = {
    "wrong kind": lambda size: Message(Kind.EVALUATION, {"round": 1}),
    "wrong dtype": lambda size: Message(Kind.UPDATE, {"round": 1, "train": _figures()}, {"update": np.zeros(size, np.float64)}),
    "wrong shape": lambda size: Message(Kind.UPDATE, {"round": 1, "train": _figures()}, {"update": np.zeros(size + 1, np.float32)}),
    "NaN": lambda size: Message(Kind.UPDATE, {"round": 1, "train": _figures()}, {"update": np.full(size, np.nan, np.float32)}),
    "unknown field": lambda size: Message(Kind.UPDATE, {"round": 1, "train": _figures(), "x": 1}, {"update": np.zeros(size, np.float32)}),
    "wrong round": lambda size: Message(Kind.UPDATE, {"round": 9, "train": _figures()}, {"update": np.zeros(size, np.float32)}),
    "bad figures": lambda size: Message(Kind.UPDATE, {"round": 1, "train": {"loss": "x"}}, {"update": np.zeros(size, np.float32)}),
}


def _figures():
    return {"loss": 1.0, "accuracy": 0.5, "samples": 10, "steps": 1}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_a_bad_message_disconnects_only_its_sender(data, case):
    fed, weights, _ = start(data, aggregation={"secure": False})
    fed.intercept = lambda node, msg: "drop" if node == "a" and msg.kind == Kind.TRAIN else None
    fed.pump(fed.hub.begin_round(1, weights, 0.05, fed.now))
    actions = fed.hub.receive("a", BAD_UPDATES[case](weights.size), fed.now)
    assert any(isinstance(x, Disconnect) and x.node == "a" for x in actions)
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


def test_a_node_refuses_a_hello_for_another_name(data):
    session = NodeSession(node_runtimes(data, ("a",))["a"])
    actions = session.receive(Message(Kind.HELLO, {"protocol": PROTOCOL_VERSION, "run_id": "r", "node": "zz"}))
    assert actions[0].message.kind == Kind.ERROR and "started as 'a'" in actions[0].message.header["reason"]


def test_a_node_with_a_different_model_is_disconnected(data):
    cfg = make_config(list(NAMES))
    other = build_model("simple_cnn", num_classes=10, in_channels=1, input_size=8, width=5)
    fed = InMemoryFederation(cfg, node_runtimes(data, NAMES))
    fed.pump(fed.hub.start(list(NAMES), {}, 0.0))
    events = fed.pump(fed.hub.configure(CLASSES, 1, Layout.of(other), 0.0))
    dropped = [e for e in events if isinstance(e, Dropped)]
    # two of three disconnected leaves fewer than min_nodes (2): the set-up fails with a named error
    assert [e.node for e in dropped] == ["a", "b"] and "builds a different model" in dropped[0].reason
    (error,) = failures(events)
    assert isinstance(error, TooFewNodes) and "set-up failed" in str(error)


@pytest.mark.parametrize("data_field", [{"channels": [[1]]}, {"counts": [1, "x"]}, {"classes": "abc"}])
def test_a_malformed_hello_ack_disconnects_its_sender(data, data_field):
    cfg = make_config(list(NAMES))
    fed = InMemoryFederation(cfg, node_runtimes(data, NAMES))
    fed.hub.start(list(NAMES), {}, 0.0)
    summary = {"classes": ["0", "1"], "counts": [1, 1], "channels": [1], "min_size": [8, 8], "max_size": [8, 8]}
    ack = Message(Kind.HELLO_ACK, {"protocol": PROTOCOL_VERSION, "node": "a", "data": {**summary, **data_field}, "warnings": []})
    actions = fed.hub.receive("a", ack, 0.0)
    (dropped,) = [x for x in actions if isinstance(x, Dropped)]
    assert dropped.node == "a" and "protocol error" in dropped.reason
    assert fed.hub.phase is Phase.HANDSHAKE and fed.hub.active == {"b", "c"}


def test_a_failed_step_abandons_the_nodes_round(data):
    """Mask expansion fails while the model trains: the node reports it, and the finished training sends nothing."""
    cfg = make_config(list(NAMES))
    fed = InMemoryFederation(cfg, node_runtimes(data, NAMES))
    model = build_model("simple_cnn", num_classes=10, in_channels=1, input_size=8, width=4, seed=cfg.run.seed)
    fed.setup(CLASSES, 1, Layout.of(model))
    session = fed.sessions["a"]
    session.receive(Message(Kind.KEYS, {"round": 1, "context": b"ctx"}))
    keys = {"a": session._secagg.public_key(), "b": bytes(32)}
    (expand,) = session.receive(Message(Kind.ROSTER, {"round": 1, "keys": keys}))
    weights = Layout.of(model).flatten(model)
    (train,) = session.receive(Message(Kind.TRAIN, {"round": 1, "lr": 0.05, "weight": 0.5}, {"weights": weights}))
    failed = session.work_failed(expand.ticket, RuntimeError("boom"))
    assert [a.message.kind for a in failed] == [Kind.ERROR] and "boom" in failed[0].message.header["reason"]
    assert session.work_done(train.ticket, train.call()) == []  # no update of any kind for the abandoned round
    assert session.state.value == "ready"


# -- sparse mask graphs (aggregation.neighbours = 2: the ring a-b-c-d-e-f-a) -------------------------

RING = ("a", "b", "c", "d", "e", "f")


@pytest.fixture(scope="module")
def ring_data(tmp_path_factory):
    return digits_folders(tmp_path_factory.mktemp("digits6"), RING, limit=360)


def test_a_sparse_mask_graph_survives_a_dropout_and_equals_plain_fedavg(ring_data):
    fed, weights, _ = start(ring_data, names=RING, aggregation={"neighbours": 2})
    fed.intercept = lambda node, msg: "lose" if node == "c" and msg.kind == Kind.TRAIN else None
    got, events = one_round(fed, weights)
    assert got.included == ["a", "b", "d", "e", "f"] and got.dropped == ["c"]
    reference, _, _ = start(ring_data, names=("a", "b", "d", "e", "f"), aggregation={"secure": False})
    want, _ = one_round(reference, weights)
    assert np.abs(want.mean_update).max() > 1e-3
    survivors = sum(got.weights[n] for n in got.included)
    assert np.abs(got.mean_update - want.mean_update).max() <= 5 * 2.0**-17 / survivors


def test_dropouts_that_disconnect_a_sparse_mask_graph_fail_the_round_cleanly(ring_data):
    fed, weights, _ = start(ring_data, names=RING, aggregation={"neighbours": 2})
    sent = []

    def intercept(node, msg):
        sent.append(msg.kind)
        return "lose" if node in ("b", "e") and msg.kind == Kind.TRAIN else None

    fed.intercept = intercept
    _, events = one_round(fed, weights)
    (error,) = failures(events)
    # survivors a, f and c, d: two parts whose sums unmasking would reveal
    assert isinstance(error, RoundFailed) and error.stage == "masked" and "aggregation.neighbours" in str(error)
    assert "[['a', 'f'], ['c', 'd']]" in str(error)
    assert fed.hub.phase is Phase.CLOSED and Kind.UNMASK not in sent  # no node was asked for its seeds
