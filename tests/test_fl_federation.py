"""Real federations: ``primia node`` processes on 127.0.0.1, the hub over authenticated websockets."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from fl.config import parse_config
from fl.errors import RoundFailed
from fl.hub import run_hub
from mpc.errors import ConfigError, PeerFailure

from .fl_helpers import ROOT, DealerProcess, NodeProcesses, assert_close_models, digits_folders, to_toml
from .test_net import tls_material  # noqa: F401 - a fixture: a CA and a certificate for 127.0.0.1

NAMES = ("alpha", "beta", "gamma")
FAST = {"training": {"local_steps": 8, "batch_size": 32, "lr": 0.1}, "model": {"width": 8}}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    work = tmp_path_factory.mktemp("federation")
    data = digits_folders(work / "data", NAMES, limit=450)
    procs = NodeProcesses(work, data, NAMES)
    procs.start()
    yield procs
    procs.stop()


@pytest.fixture
def live(nodes):
    nodes.ensure_running()  # a test may have killed one
    return nodes


def model_state(report):
    return torch.load(report["outputs"]["model"], weights_only=True)


@pytest.mark.timeout(300)
def test_secure_federation_of_three_nodes(live, tmp_path):
    cfg = parse_config(live.config(list(NAMES), tmp_path / "run", run={"rounds": 3}, **FAST))
    report = run_hub(cfg, progress=False)
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["included"] == list(NAMES) and r["dropped"] == [] for r in rounds)
    final = report["final"]
    assert final["pooled"]["accuracy"] > 0.5  # ten classes: chance is 0.1
    assert set(final["nodes"]) == set(NAMES)
    assert final["pooled"]["samples"] == sum(m["samples"] for m in final["nodes"].values())
    for metrics in (final["pooled"], *final["nodes"].values()):
        assert {"loss", "accuracy", "mcc", "roc_auc_macro", "confusion_matrix", "per_class"} <= set(metrics)
        assert {"sensitivity", "specificity", "roc_auc"} <= set(metrics["per_class"]["3"])
    # each node uploads one masked update of 4 bytes per value, plus a few hundred bytes of keys and seeds
    size = sum(torch.numel(t) for t in model_state(report).values() if t.is_floating_point())
    for per_node in rounds[-1]["bytes"].values():
        assert 4 * size < per_node["from_node"] < 4 * size + 4096
    for key in ("report", "metrics_plot", "roc_plot", "checkpoint", "model"):
        assert (tmp_path / "run").joinpath(report["outputs"][key].split("/")[-1]).stat().st_size > 0
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["run"]["rounds_done"] == 3 and "token" not in json.dumps(saved["config"])


@pytest.mark.timeout(300)
def test_two_node_secure_and_plain_aggregation_agree(live, tmp_path):
    two = ["alpha", "beta"]
    secure = run_hub(parse_config(live.config(two, tmp_path / "secure", run={"rounds": 1}, **FAST)), progress=False)
    plain = run_hub(parse_config(live.config(two, tmp_path / "plain", run={"rounds": 1},
                                             aggregation={"secure": False}, **FAST)), progress=False)
    # one fixed-point rounding (2^-17) per node and weight, plus float32 rounding of the new weights
    worst = assert_close_models(model_state(secure), model_state(plain), atol=2 * 2.0**-17 + 1e-6)
    assert worst > 0  # the secure path really went through fixed point
    update = max(float((model_state(plain)[k] - v).abs().max()) for k, v in _initial(live, tmp_path).items())
    assert update > 1e-2  # and the nodes really trained


@pytest.fixture(scope="module")
def dealer(tmp_path_factory):
    proc = DealerProcess(tmp_path_factory.mktemp("dealer"))
    yield proc
    proc.stop()


@pytest.mark.timeout(300)
def test_a_dealer_masked_federation_trains_the_same_model_as_pairwise_masking(live, dealer, tmp_path):
    """Three node processes, a ``primia dealer`` process and the hub: the dealer removes the masks."""
    names = list(NAMES)
    secure = run_hub(parse_config(live.config(names, tmp_path / "dealer", run={"rounds": 2},
                                              federation={"min_nodes": 2, **dealer.federation()},
                                              aggregation={"masking": "dealer"}, **FAST)), progress=False)
    pairwise = run_hub(parse_config(live.config(names, tmp_path / "pairwise", run={"rounds": 2},
                                                federation={"min_nodes": 2}, **FAST)), progress=False)
    # both sum the same fixed-point encodings exactly (mod 2^32): the same model, whoever removes the masks
    assert_close_models(model_state(secure), model_state(pairwise), atol=1e-6)
    assert all(r["included"] == names for r in secure["rounds"])
    size = sum(torch.numel(t) for t in model_state(secure).values() if t.is_floating_point())
    last = secure["rounds"][-1]
    for per_node in last["bytes"].values():  # one masked update up, as in plain FedAvg
        assert 4 * size < per_node["from_node"] < 4 * size + 4096
    # the dealer gets keys and names, and sends one mask sum per round
    assert 4 * size < last["dealer_bytes"]["from_dealer"] < 4 * size + 4096
    assert last["dealer_bytes"]["to_dealer"] < 4096
    assert "dealer_token" not in json.dumps(json.loads((tmp_path / "dealer" / "report.json").read_text())["config"])


@pytest.mark.timeout(300)
def test_a_killed_dealer_fails_the_round_and_resume_finishes_with_a_new_one(live, tmp_path):
    """Round 2 fails when the dealer process dies; round 1 stays checkpointed, and after a new dealer
    starts (elsewhere: another port) --resume runs rounds 2 and 3; a node killed mid-round meanwhile
    is left out of the dealer's mask sum."""
    for sub in ("d1", "d2"):
        (tmp_path / sub).mkdir()
    first = DealerProcess(tmp_path / "d1")
    names = list(NAMES)

    def kill_dealer_after_round_one(event, info):
        if event == "round" and info["round"] == 1:
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait()

    def config(dealer_proc):
        return parse_config(live.config(names, tmp_path / "run", run={"rounds": 3},
                                        federation={"min_nodes": 2, **dealer_proc.federation()},
                                        aggregation={"masking": "dealer"}, **FAST))

    try:
        with pytest.raises(RoundFailed, match="round 2 failed during keys: the dealer lost the connection.*--resume"):
            run_hub(config(first), observer=kill_dealer_after_round_one, progress=False)
    finally:
        first.stop()
    second = DealerProcess(tmp_path / "d2")

    def kill_gamma_on_round_three_roster(event, info):
        if event == "send" and info["kind"] == "roster" and info["round"] == 3 and info["node"] == "gamma":
            live.kill("gamma")

    try:
        report = run_hub(config(second), resume=True, observer=kill_gamma_on_round_three_roster, progress=False)
    finally:
        second.stop()
    rounds = {r["round"]: r for r in report["rounds"]}
    assert sorted(rounds) == [1, 2, 3] and rounds[2]["included"] == names
    assert rounds[3]["included"] == ["alpha", "beta"] and rounds[3]["dropped"] == ["gamma"]
    assert report["final"]["pooled"]["accuracy"] > 0.5


@pytest.mark.timeout(300)
def test_an_unreachable_dealer_or_a_wrong_dealer_secret_is_named(live, dealer, tmp_path):
    wrong = {**dealer.federation(), "dealer_token": "not-the-dealer-secret-at-all", "connect_timeout_s": 5}
    raw = live.config(["alpha", "beta"], tmp_path / "run", federation=wrong, aggregation={"masking": "dealer"})
    with pytest.raises(PeerFailure, match="dealer at ws://127.0.0.1.*prove membership"):
        run_hub(parse_config(raw), progress=False)
    gone = {"dealer_address": "ws://127.0.0.1:9", "dealer_token": dealer.token, "connect_timeout_s": 1}
    raw = live.config(["alpha", "beta"], tmp_path / "run2", federation=gone, aggregation={"masking": "dealer"})
    with pytest.raises(PeerFailure, match="cannot use the dealer at ws://127.0.0.1:9"):
        run_hub(parse_config(raw), progress=False)


def test_the_dealer_answers_a_bad_request_with_an_error_and_keeps_serving(dealer):
    """A malformed request over the network gets a named error and a closed connection, never a crash."""
    from fl.messages import PROTOCOL_VERSION, Kind, Message
    from fl.transport import DEALER_ID, HUB_ID, membership, recv, send
    from mpc.net.channel import connect

    async def ask(header):
        channel = await connect(f"ws://127.0.0.1:{dealer.port}", membership=membership(HUB_ID, dealer.token, what="t"),
                                peer_id=DEALER_ID)
        try:
            await send(channel, Message(Kind.DEALER_KEYS, header))
            return (await recv(channel))[0]
        finally:
            await channel.abort("test over")

    request = {"protocol": PROTOCOL_VERSION, "round": 1, "context": b"c", "size": 8, "ring_bits": 32}
    refused = asyncio.run(ask({**request, "ring_bits": 16}))
    assert refused.kind == Kind.ERROR and "ring_bits must be 32 or 64" in refused.header["reason"]
    refused = asyncio.run(ask({**request, "size": "eight"}))
    assert refused.kind == Kind.ERROR and "size" in refused.header["reason"]
    answered = asyncio.run(ask(request))  # the same process, still serving
    assert answered.kind == Kind.DEALER_KEY and len(answered.header["key"]) == 32
    assert dealer.proc.poll() is None


def _initial(live, tmp_path):
    from fl.models import build_model

    return build_model("simple_cnn", num_classes=10, in_channels=1, input_size=8, width=8, seed=3).state_dict()


@pytest.mark.timeout(300)
def test_a_node_killed_mid_round_leaves_the_others_to_finish(live, tmp_path):
    def kill_gamma_on_round_two_roster(event, info):
        # The roster goes out once every key is in: gamma has joined round 2's masks but cannot upload.
        if event == "send" and info["kind"] == "roster" and info["round"] == 2 and info["node"] == "gamma":
            live.kill("gamma")

    cfg = parse_config(live.config(list(NAMES), tmp_path / "run", run={"rounds": 3},
                                   federation={"min_nodes": 2}, **FAST))
    report = run_hub(cfg, observer=kill_gamma_on_round_two_roster, progress=False)
    rounds = {r["round"]: r for r in report["rounds"]}
    assert rounds[1]["included"] == list(NAMES)
    assert rounds[2]["included"] == ["alpha", "beta"] and rounds[2]["dropped"] == ["gamma"]
    assert rounds[3]["included"] == ["alpha", "beta"]
    assert report["final"]["pooled"]["accuracy"] > 0.5
    assert set(report["final"]["nodes"]) == {"alpha", "beta"}


@pytest.mark.timeout(300)
def test_a_wrong_secret_is_refused(live, tmp_path):
    raw = live.config(["alpha", "beta"], tmp_path / "run", federation={"min_nodes": 2, "connect_timeout_s": 5})
    raw["federation"]["nodes"][0]["token"] = "not-the-right-secret-at-all"
    with pytest.raises(PeerFailure, match="alpha: .*prove membership"):
        run_hub(parse_config(raw), progress=False)


@pytest.mark.timeout(600)
def test_resume_after_the_hub_is_killed_continues_the_same_run(live, tmp_path):
    rounds = 5
    reference = run_hub(parse_config(live.config(list(NAMES), tmp_path / "ref", run={"rounds": rounds}, **FAST)),
                        progress=False)
    raw = live.config(list(NAMES), tmp_path / "run", run={"rounds": rounds}, **FAST)
    config = tmp_path / "federation.toml"
    config.write_text(to_toml(raw))
    hub = subprocess.Popen([sys.executable, "-m", "cli.main", "train", "--config", str(config), "--no-progress"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "run" / "report.json"
    deadline = time.monotonic() + 240
    while not (progress.exists() and json.loads(progress.read_text())["run"]["rounds_done"] >= 2):
        assert hub.poll() is None and time.monotonic() < deadline, "the hub ended before round 2"
        time.sleep(0.02)
    hub.send_signal(signal.SIGKILL)
    hub.wait()
    done_before_kill = json.loads(progress.read_text())["run"]["rounds_done"]
    assert done_before_kill < rounds, "the hub finished before it could be killed; make the run longer"

    resumed = run_hub(parse_config(raw), resume=True, progress=False)
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, rounds + 1))
    # same seeds, same data, the nodes' optimizer state per round: the resumed run is the uninterrupted one
    assert_close_models(model_state(resumed), model_state(reference), atol=1e-6)


def test_cli_names_bad_config_keys_and_bad_data_folders(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nlrr = 0.1\n')
    run = subprocess.run([sys.executable, "-m", "cli.main", "train", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "training.lrr: unknown key (did you mean training.lr?)" in run.stderr
    check = subprocess.run([sys.executable, "-m", "cli.main", "node", "--data", str(tmp_path / "nothing"), "--check"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "does not exist" in check.stderr


@pytest.mark.timeout(300)
def test_a_node_over_tls(tmp_path, tls_material):
    """wss:// with the node's certificate; the node runs its real server, in a thread of this process."""
    import asyncio
    import threading

    from fl.data import scan_folder
    from fl.node import NodeServer
    from fl.node_protocol import NodeRuntime
    from mpc.net.tls import server_context

    data = digits_folders(tmp_path / "data", ("solo",), limit=120)
    token = "tls-test-secret-0123456789"
    server = NodeServer(NodeRuntime(scan_folder(data / "solo"), name="solo"), name="solo", token=token, once=True,
                        tls=server_context(tls_material / "server.pem", tls_material / "server.key"))
    ready = threading.Event()
    port = []
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve("127.0.0.1", 0, lambda p: (port.append(p), ready.set()))), daemon=True
    )
    thread.start()
    assert ready.wait(60)
    raw = {
        "run": {"rounds": 1, "output_dir": str(tmp_path / "run")},
        "federation": {"nodes": [{"name": "solo", "address": f"wss://127.0.0.1:{port[0]}", "token": token}],
                       "tls_ca": str(tls_material / "ca.pem")},
        "model": {"width": 4}, "data": {"input_size": 8}, "training": {"local_steps": 2},
        "aggregation": {"secure": False},
    }
    report = run_hub(parse_config(raw), progress=False)
    thread.join(30)
    assert report["rounds"][0]["included"] == ["solo"] and not thread.is_alive()
    with pytest.raises(ConfigError, match="federation.tls_ca: missing"):
        parse_config({**raw, "federation": {"nodes": raw["federation"]["nodes"]}})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "demo-summary.json").read_text())
    assert summary["holdout_accuracy"] > 0.95
    assert summary["final"]["pooled"]["accuracy"] > 0.95
    for name in ("report.json", "metrics.png", "roc.png", "model.pt", "checkpoint.pt"):
        assert (out / "run" / name).stat().st_size > 0
    encrypted = summary["encrypted_inference"]
    assert encrypted is not None and encrypted["agreement"] >= 7 / 8
    assert f"Outputs in {out}" in run.stdout


@pytest.mark.timeout(300)
def test_the_demo_runs_with_dealer_masking(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--out", str(out), "--rounds", "3",
                          "--masking", "dealer"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["config"]["aggregation"]["masking"] == "dealer"
    assert all(r["dealer_bytes"]["from_dealer"] > 0 for r in report["rounds"])  # the dealer answered every round
    assert json.loads((out / "demo-summary.json").read_text())["final"]["pooled"]["accuracy"] > 0.8
