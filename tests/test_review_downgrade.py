"""Review: the node lets the hub decide whether its update is masked at all.

`primia node` has no setting of its own for secure aggregation: the aggregation mode comes from the hub's
`configure` message (fl.node_protocol.NodeSession._on_configure -> fl.strategy.build_masker).  A hub that deviates
sends `aggregation.secure = false` and every node uploads its update in the clear, although docs/federation.md
promises "only their sum ... and this holds even against a hub that departs from the protocol".  Played with the
real HubProtocol and NodeSession over the wire format, in memory.
"""

from __future__ import annotations

import numpy as np
import pytest

from fl.hub_protocol import RoundCollected
from fl.messages import Kind
from fl.models import Layout, build_model

from .fl_helpers import InMemoryFederation, digits_folders, make_config, node_runtimes

NAMES = ("a", "b", "c")
CLASSES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_folders(tmp_path_factory.mktemp("digits"), NAMES, limit=300)


def test_malicious_hub_turns_secure_aggregation_off_and_reads_each_update(data):
    # the nodes are started exactly as for a secure federation (keys, pinned hub, peer keys, dealer key)
    runtimes = node_runtimes(data, NAMES)
    cfg = make_config(list(NAMES), aggregation={"secure": False})  # the hub's choice, sent in `configure`
    model = build_model("simple_cnn", num_classes=10, in_channels=1, input_size=8, width=4, seed=cfg.run.seed)
    layout = Layout.of(model)
    weights = layout.flatten(model)
    fed = InMemoryFederation(cfg, runtimes, run_id="run-1")
    fed.setup(CLASSES, 1, layout)
    events = fed.pump(fed.hub.begin_round(1, weights, 0.05, fed.now))
    uploads = {sender: msg.arrays["update"] for sender, _, msg in fed.sent(Kind.UPDATE)}
    if not any(isinstance(e, RoundCollected) for e in events) or not uploads:
        return  # the nodes refused to train without masking: nothing of theirs reached the hub
    truth, _ = runtimes["a"].trainer.train_round(1, weights, 0.05)
    assert not np.array_equal(uploads["a"], truth), "node a sent its update in the clear to a hub that asked"
