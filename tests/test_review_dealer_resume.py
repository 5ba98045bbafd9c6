"""Review: with dealer masking, `primia train --resume` after a hub crash cannot finish the run while the dealer keeps
running.  The dealer remembers each (run, round) it answered, across connections (DealerClient.answered), and the
resumed hub asks again for the round it was in — with the same run id — so the dealer refuses it and the round fails,
on every --resume, until the dealer process is restarted.  docs/federation.md: "A failed round leaves the previous
round's checkpoint intact; primia train --resume continues"; "Restart a lost dealer: it reconnects, and the next round
uses it" — here nothing was lost but the hub.

Real processes: three ``primia node`` and one ``primia dealer`` dialing a hub on 127.0.0.1."""

from __future__ import annotations

import pytest

from fl.demo import start_hub, wait_for_hub

from .fl_helpers import DealerProcess
from .test_fl_federation import config, data, federation  # noqa: F401 - module fixtures: data, node processes


class HubCrash(Exception):
    """Stands for the hub process dying (power cut, OOM kill) between the dealer's answer and the checkpoint."""


@pytest.mark.timeout(300)
def test_a_resumed_dealer_masked_run_finishes_when_the_hub_died_after_the_dealers_answer(federation, tmp_path):
    path = config(federation, tmp_path, run={"rounds": 3}, aggregation={"masking": "dealer"})

    def crash_during_round_two_evaluation(event, info):
        # the round's mask sum has come back from the dealer; the checkpoint of round 2 is written after evaluation
        if event == "send" and info["kind"] == "evaluate" and info["round"] == 2:
            raise HubCrash("the hub died during round 2's evaluation")

    hub = start_hub(path, observer=crash_during_round_two_evaluation)
    dealer = DealerProcess(tmp_path, f"ws://127.0.0.1:{federation['port']}")
    try:
        with pytest.raises(HubCrash):
            wait_for_hub(hub)
        resumed = start_hub(path, resume=True)  # the nodes and the dealer dial back on their own
        report = wait_for_hub(resumed)
    finally:
        dealer.stop()
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
