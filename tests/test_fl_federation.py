"""Real federations: a hub that listens, ``primia node`` and ``primia dealer`` processes that dial it, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect as ws_connect

from fl.config import parse_config
from fl.demo import start_hub, wait_for_hub
from fl.errors import RoundFailed
from fl.hub import Hub
from fl.identity import fingerprint, load_public_key

from .fl_helpers import (
    ROOT,
    DealerProcess,
    HubProcess,
    NodeProcesses,
    assert_close_models,
    base_config,
    digits_folders,
    keys_dir,
    to_toml,
)
from .test_net import tls_material  # noqa: F401 - a fixture: a CA and a certificate for 127.0.0.1

NAMES = ("alpha", "beta", "gamma")
FAST = {"training": {"local_steps": 8, "batch_size": 32, "lr": 0.1}, "model": {"width": 8}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return digits_folders(tmp_path_factory.mktemp("data"), NAMES, limit=450)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, data):
    """Three node processes that keep dialing one port of 127.0.0.1, run after run (as hospitals' nodes would)."""
    work = tmp_path_factory.mktemp("nodes")
    port = free_port()
    procs = NodeProcesses(work, data, NAMES)
    # these nodes also serve the plain runs the tests compare with (a node refuses them by default)
    procs.start(f"ws://127.0.0.1:{port}", extra=["--reconnect-max-s", "1", "--allow-plain-aggregation"], once=False)
    yield {"port": port, "nodes": procs, "work": work}
    procs.stop()


@pytest.fixture(autouse=True)
def stop_what_the_test_started():
    """Node processes a test starts (rogues, TLS nodes) are stopped even when it fails."""
    before = list(NodeProcesses.started)
    yield
    for procs in NodeProcesses.started:
        if procs not in before:
            procs.stop()
    NodeProcesses.started[:] = before


def config(env, tmp_path, names=NAMES, **sections):
    raw = base_config(list(names), **{**FAST, **sections})
    raw["federation"]["listen"] = f"127.0.0.1:{env['port']}"
    raw["run"]["output_dir"] = str(tmp_path / "run")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "federation.toml"
    path.write_text(to_toml(raw))
    return path


def config_held_open(env, tmp_path, *, grace_s=5, **sections):
    """A config whose hub stays up at least ``grace_s`` before round 1: a fourth configured node that never comes
    holds it in its start grace.  A short run could otherwise end between two attempts of a process dialing
    with backoff, which would then dial a hub that is gone (or, for idle connections, be closed by the end
    of the run instead of the handshake deadline)."""
    federation = {**sections.pop("federation", {}), "start_grace_s": grace_s}
    return config(env, tmp_path, names=(*NAMES, "delta"), federation=federation, **sections)


def model_state(report):
    return torch.load(report["outputs"]["model"], weights_only=True)


def ensure_running(federation):
    nodes = federation["nodes"]
    dead = tuple(n for n, p in nodes.procs.items() if p.poll() is not None)
    if dead:
        nodes.start(nodes.hub_uri, dead, extra=["--reconnect-max-s", "1", "--allow-plain-aggregation"], once=False)


@pytest.mark.timeout(300)
def test_three_nodes_dial_out_and_train_with_secure_aggregation(federation, tmp_path):
    ensure_running(federation)
    hub = start_hub(config(federation, tmp_path, run={"rounds": 3}))
    report = wait_for_hub(hub)
    assert [r["included"] for r in report["rounds"]] == [list(NAMES)] * 3
    assert report["final"]["pooled"]["accuracy"] > 0.5
    assert report["config"]["aggregation"]["secure"] and report["run"]["secure_aggregation"]
    # the upload of each node is its masked update: the size of a float32 update plus a small header
    size = sum(p.numel() for p in model_state(report).values())
    for record in report["rounds"]:
        for traffic in record["bytes"].values():
            assert 4 * size <= traffic["from_node"] <= 1.05 * 4 * size + 4096


@pytest.mark.timeout(300)
def test_secure_and_plain_federations_agree_within_the_fixed_point_bound(federation, tmp_path):
    ensure_running(federation)
    secure = wait_for_hub(start_hub(config(federation, tmp_path / "s", run={"rounds": 2}, aggregation={"secure": True})))
    plain = wait_for_hub(start_hub(config(federation, tmp_path / "p", run={"rounds": 2}, aggregation={"secure": False})))
    # each round: one rounding of 2^-17 per node, then training amplifies it a little
    worst = assert_close_models(model_state(secure), model_state(plain), atol=2e-3)
    assert worst > 0  # the secure run really went through fixed point


@pytest.mark.timeout(300)
def test_a_node_killed_and_restarted_rejoins_within_the_same_run(federation, tmp_path):
    """gamma is SIGKILLed when round 2 starts and restarted at once: round 2 goes on without it, round 3 waits
    for it to come back (start_grace_s) and includes it."""
    ensure_running(federation)
    nodes = federation["nodes"]
    killed = []

    def kill_gamma_in_round_two(event, info):
        if event == "send" and info["kind"] == "train" and info["round"] == 2 and info["node"] == "gamma" \
                and not killed:
            nodes.kill("gamma")
            killed.append(time.monotonic())
            nodes.start(nodes.hub_uri, ("gamma",), extra=["--reconnect-max-s", "1", "--allow-plain-aggregation"],
                        once=False)

    hub = start_hub(config(federation, tmp_path, run={"rounds": 4}, federation={"start_grace_s": 120}),
                    observer=kill_gamma_in_round_two)
    report = wait_for_hub(hub)
    rounds = {r["round"]: r for r in report["rounds"]}
    assert killed
    assert rounds[1]["included"] == list(NAMES)
    assert rounds[2]["included"] == ["alpha", "beta"] and rounds[2]["dropped"] == ["gamma"]
    assert rounds[3]["included"] == list(NAMES) and rounds[4]["included"] == list(NAMES)
    assert set(report["final"]["nodes"]) == set(NAMES)


@pytest.mark.timeout(300)
def test_a_node_killed_after_uploading_is_counted_without_waiting(federation, tmp_path):
    """Pairwise masks with neighbours = 2: gamma is killed once its round-2 upload is in (the hub asks the
    survivors to sign).  Its self mask is opened from its partners' shares: the round completes with its update,
    as soon as the lost connection is noticed, far from the 300 s reply timeout."""
    ensure_running(federation)
    nodes = federation["nodes"]
    killed = []

    def kill_after_upload(event, info):
        if event == "send" and info["kind"] == "sa_survivors" and info["round"] == 2 and info["node"] == "gamma" \
                and not killed:
            nodes.kill("gamma")
            killed.append(True)

    hub = start_hub(config(federation, tmp_path, run={"rounds": 2}, aggregation={"neighbours": 2},
                           federation={"reply_timeout_s": 300, "start_grace_s": 1}), observer=kill_after_upload)
    report = wait_for_hub(hub)
    second = report["rounds"][1]
    assert killed and second["included"] == list(NAMES) and second["dropped"] == []
    assert second["seconds"]["train_and_aggregate"] < 60  # no wait for a timeout: the loss is seen at once


@pytest.mark.timeout(300)
def test_an_unknown_key_is_refused_while_the_run_goes_on(federation, tmp_path, caplog):
    ensure_running(federation)
    rogues = NodeProcesses(tmp_path, federation["nodes"].data, ("alpha",))
    # claims to be alpha, with mallory's key (which no config lists); it dials until the hub is up
    rogues.start(f"ws://127.0.0.1:{federation['port']}", ("alpha",), key="mallory",
                 extra=["--reconnect-max-s", "0.5"])
    rogues.wait_for_output("alpha", "connecting to the hub")
    with caplog.at_level("WARNING", logger="primia.net.auth"):
        hub = start_hub(config_held_open(federation, tmp_path, run={"rounds": 2}))
        assert rogues.wait(120) == {"alpha": 1}
        report = wait_for_hub(hub)
    assert any("claiming to be 'alpha'" in r.getMessage() and "not the one configured" in r.getMessage()
               for r in caplog.records)
    assert report["rounds"][-1]["included"] == list(NAMES)
    said = rogues.output("alpha")
    assert "refused the connection: it does not accept this side" in said


@pytest.mark.timeout(300)
def test_an_unknown_name_is_refused_and_logged_with_the_name_it_claimed(federation, tmp_path, caplog):
    ensure_running(federation)
    rogue = NodeProcesses(tmp_path, federation["nodes"].data, ("alpha",))
    rogue.start(f"ws://127.0.0.1:{federation['port']}", ("alpha",), key="mallory",
                extra=["--name", "mallory", "--reconnect-max-s", "0.5"])
    rogue.wait_for_output("alpha", "connecting to the hub")
    with caplog.at_level("WARNING", logger="primia.net.auth"):
        hub = start_hub(config_held_open(federation, tmp_path, run={"rounds": 2}))
        assert rogue.wait(120) == {"alpha": 1}
        report = wait_for_hub(hub)
    assert report["rounds"][-1]["included"] == list(NAMES)
    assert "it does not accept this side: this name is not in its config" in rogue.output("alpha")
    assert any("claiming to be 'mallory'" in r.getMessage() and "not a known peer" in r.getMessage()
               for r in caplog.records)


@pytest.mark.timeout(120)
def test_a_node_pinned_to_another_hub_key_refuses_to_talk(federation, tmp_path, caplog):
    """The node's hello names the federation by its pinned hub key: the real hub refuses it at once (and an
    impostor that answered would be refused by the node, which checks the announced key before proving itself:
    see test_net).  The node sends its hello and nothing else, and exits naming the fix."""
    impostor_pin = keys_dir() / "mallory.pub"
    node = NodeProcesses(tmp_path, federation["nodes"].data, ("alpha",))
    node.start(f"ws://127.0.0.1:{federation['port']}", ("alpha",), hub_key=impostor_pin,
               extra=["--reconnect-max-s", "0.5"])
    node.wait_for_output("alpha", "connecting to the hub")
    with caplog.at_level("WARNING"):
        hub = start_hub(config_held_open(federation, tmp_path, run={"rounds": 1}, federation={"connect_timeout_s": 30}))
        codes = node.wait(120)
        report = wait_for_hub(hub)  # the federation's own nodes still train
    said = node.output("alpha")
    assert codes == {"alpha": 1}, f"the node did not exit as refused (-999: still running); it said:\n{said[-4000:]}"
    assert "refused the connection: it belongs to another session or federation" in said and "--hub-key" in said
    assert report["rounds"][0]["included"] == list(NAMES)
    pinned = fingerprint(load_public_key(impostor_pin, what="pin")).hex()
    assert any("claiming to be 'alpha'" in r.getMessage() and pinned[:40] in r.getMessage() for r in caplog.records)


def test_plaintext_off_loopback_is_refused_without_sending_anything(tmp_path):
    """A node asked to reach another machine over ws://, and a hub asked to listen on every interface without TLS,
    both refuse before opening any socket (nothing is sent off this machine)."""
    keys = keys_dir()
    data = digits_folders(tmp_path / "data", ("alpha",), limit=60)
    node = subprocess.run(
        [sys.executable, "-m", "cli.main", "node", "--data", str(data / "alpha"), "--key", str(keys / "alpha.key"),
         "--hub", "ws://192.0.2.10:8780", "--hub-key", str(keys / "hub.pub")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert node.returncode == 1
    assert "192.0.2.10:8780 is another machine, so the connection needs TLS: use wss://192.0.2.10:8780" in node.stderr
    raw = base_config(list(NAMES))
    raw["federation"]["listen"] = "0.0.0.0:0"
    path = tmp_path / "federation.toml"
    path.write_text(to_toml(raw))
    hub = subprocess.run([sys.executable, "-m", "cli.main", "train", "--config", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert hub.returncode == 1 and "the hub needs TLS: set federation.tls_cert and tls_key" in hub.stderr
    assert "listening" not in hub.stderr


@pytest.mark.timeout(300)
def test_tls_with_a_ca_made_in_the_test(tmp_path, data, tls_material):
    port = free_port()
    raw = base_config(["alpha", "beta"], run={"rounds": 1}, **FAST)
    raw["federation"].update(listen=f"127.0.0.1:{port}", tls_cert=str(tls_material / "server.pem"),
                             tls_key=str(tls_material / "server.key"))
    raw["run"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "federation.toml"
    path.write_text(to_toml(raw))
    hub = start_hub(path)
    nodes = NodeProcesses(tmp_path, data, ("alpha", "beta"))
    nodes.start(f"wss://127.0.0.1:{port}", ("alpha",), extra=["--tls-ca", str(tls_material / "ca.pem")])
    nodes.start(f"wss://127.0.0.1:{port}", ("beta",), extra=["--tls-ca", str(tls_material / "ca.pem")])
    untrusting = NodeProcesses(tmp_path / "u", data, ("alpha",))
    (tmp_path / "u").mkdir()
    untrusting.start(f"wss://127.0.0.1:{port}", ("alpha",), extra=["--tls-ca", str(tls_material / "other-ca.pem")])
    try:
        report = wait_for_hub(hub)
        assert nodes.wait(60) == {"alpha": 0, "beta": 0}
        assert report["rounds"][0]["included"] == ["alpha", "beta"]
        assert untrusting.wait(60) == {"alpha": 1}
        assert "TLS handshake with the hub" in untrusting.output("alpha") and "certificate verify failed" in \
            untrusting.output("alpha")
    finally:
        nodes.stop()
        untrusting.stop()


def _frames(stream: bytes) -> list[bytes]:
    """The payloads of the websocket frames after the HTTP upgrade (unmasked), in order."""
    data = stream[stream.index(b"\r\n\r\n") + 4:]
    out, pos = [], 0
    while pos + 2 <= len(data):
        b1, b2 = data[pos], data[pos + 1]
        length, pos = b2 & 0x7F, pos + 2
        if length == 126:
            length, pos = int.from_bytes(data[pos:pos + 2], "big"), pos + 2
        elif length == 127:
            length, pos = int.from_bytes(data[pos:pos + 8], "big"), pos + 8
        mask = None
        if b2 & 0x80:
            mask, pos = data[pos:pos + 4], pos + 4
        payload = data[pos:pos + length]
        if len(payload) < length:
            break
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if b1 & 0x0F == 2:
            out.append(payload)
        pos += length
    return out


@pytest.mark.timeout(300)
def test_nothing_in_a_recorded_handshake_lets_a_guessed_secret_be_checked(tmp_path, data):
    """A real node's handshake with a real hub, recorded on the wire by a relay: it holds names, key
    fingerprints, fresh nonces and two Ed25519 signatures that the public keys alone verify — no value derived
    from a secret that a guess could be tested against, and none of the private keys' bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from fl.identity import load_private_key
    from mpc.net.auth import _transcript
    from fl.transport import session_for

    port = free_port()
    raw = base_config(["alpha", "beta"], run={"rounds": 1}, **FAST)
    raw["federation"]["listen"] = f"127.0.0.1:{port}"
    raw["run"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "federation.toml"
    path.write_text(to_toml(raw))
    recorded = {"up": b"", "down": b""}
    relay_port = free_port()
    ready = threading.Event()

    async def relay():
        async def pipe(reader, writer, key):
            while chunk := await reader.read(65536):
                recorded[key] += chunk
                writer.write(chunk)
                await writer.drain()
            writer.close()

        async def handle(client_reader, client_writer):
            hub_reader, hub_writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.gather(pipe(client_reader, hub_writer, "up"), pipe(hub_reader, client_writer, "down"))

        server = await asyncio.start_server(handle, "127.0.0.1", relay_port)
        ready.set()
        async with server:
            await asyncio.sleep(120)

    threading.Thread(target=lambda: asyncio.run(relay()), daemon=True).start()
    ready.wait(10)
    hub = start_hub(path)
    nodes = NodeProcesses(tmp_path, data, ("alpha", "beta"))
    nodes.start(f"ws://127.0.0.1:{relay_port}", ("alpha",))
    nodes.start(f"ws://127.0.0.1:{port}", ("beta",))
    try:
        wait_for_hub(hub)
        nodes.wait(60)
    finally:
        nodes.stop()
    up, down = _frames(recorded["up"]), _frames(recorded["down"])
    hello, proof = (msgpack.unpackb(f) for f in up[:2])
    challenge, welcome = (msgpack.unpackb(f) for f in down[:2])
    assert set(hello) == {"t", "v", "id", "to", "session", "nonce"} and set(proof) == {"t", "proof"}
    assert set(challenge) == {"t", "id", "nonce", "context", "key"} and set(welcome) == {"t", "proof"}
    keys = keys_dir()
    hub_key, node_key = (load_public_key(keys / f"{n}.pub", what=n) for n in ("hub", "alpha"))
    assert hello["session"] == session_for(hub_key) and challenge["key"] == fingerprint(hub_key)
    transcript = _transcript(hello["session"], "alpha", "hub", hello["nonce"], challenge["nonce"],
                             challenge["context"], b"")
    # the proofs are signatures over public values: the public keys verify them, nothing else is needed
    node_key.verify(proof["proof"], b"primia-auth/v2 client\x00" + transcript)
    hub_key.verify(welcome["proof"], b"primia-auth/v2 server\x00" + transcript)
    everything = recorded["up"] + recorded["down"]
    for name in ("hub", "alpha"):
        secret = load_private_key(keys / f"{name}.key", what=name).private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        assert secret not in everything


@pytest.mark.timeout(300)
def test_a_hostile_node_sending_an_impossible_array_is_dropped_at_once(federation, tmp_path, caplog):
    """An authenticated node sends an array table that declares shape [0, 2**62]: the hub names the protocol
    error, closes that connection and trains on with the others (no wait for a reply timeout)."""
    ensure_running(federation)
    import mpc.net.wire as wire
    from fl.identity import load_private_key
    from fl.transport import member_identity
    from mpc.net.channel import connect

    keys = keys_dir()
    path = config(federation, tmp_path, names=(*NAMES, "mallory"), run={"rounds": 2},
                  federation={"reply_timeout_s": 300, "start_grace_s": 1})
    closed = {}

    async def hostile():
        identity = member_identity("mallory", load_private_key(keys / "mallory.key", what="k"),
                                   load_public_key(keys / "hub.pub", what="h"))
        channel = await connect(f"ws://127.0.0.1:{federation['port']}", membership=identity, peer_id="hub")
        await channel.recv()  # hello
        (chunk,) = wire.encode_message("hello_ack", {"node": "mallory"}, {"x": np.zeros((0, 4), np.float32)},
                                       sender="mallory", session=identity.session)
        chunk = bytes(chunk).replace(msgpack.packb([0, 4]), msgpack.packb([0, 2**62]))
        await channel.ws.send(chunk)
        try:
            await asyncio.wait_for(channel.ws.wait_closed(), 60)
        finally:
            closed["code"] = channel.ws.close_code

    with caplog.at_level("WARNING"):
        hub = start_hub(path)
        asyncio.run(hostile())
        report = wait_for_hub(hub)
    assert closed["code"] in (1007, 1009)
    assert report["rounds"][-1]["included"] == list(NAMES)
    assert any("mallory" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(300)
def test_a_flood_of_idle_connections_is_shed_while_the_federation_trains(federation, tmp_path):
    ensure_running(federation)
    # the hub is held open 5 s while the flood's connections reach the 1 s handshake deadline
    path = config_held_open(federation, tmp_path, run={"rounds": 2},
                            federation={"handshake_timeout_s": 1, "max_unauthenticated": 16})
    hub = start_hub(path)
    codes = []

    async def flood():
        sockets = []
        for _ in range(80):
            try:
                sockets.append(await ws_connect(f"ws://127.0.0.1:{federation['port']}", compression=None))
            except Exception:  # noqa: BLE001 - refused outright is also shedding
                codes.append("refused")
        for ws in sockets:
            try:
                await asyncio.wait_for(ws.wait_closed(), 30)
            finally:
                codes.append(ws.close_code)

    asyncio.run(flood())
    report = wait_for_hub(hub)
    assert report["rounds"][-1]["included"] == list(NAMES)
    assert codes.count(1013) >= 40  # turned away at once: more than 16 were authenticating
    assert set(codes) <= {1013, 1008, "refused"}  # the rest closed at the handshake deadline


@pytest.mark.timeout(600)
def test_a_dealer_masked_federation_trains_the_same_model_as_pairwise_masking(federation, tmp_path):
    ensure_running(federation)
    pairwise = wait_for_hub(start_hub(config(federation, tmp_path / "p", run={"rounds": 2})))
    hub = start_hub(config(federation, tmp_path / "d", run={"rounds": 2}, aggregation={"masking": "dealer"}))
    dealer = DealerProcess(tmp_path, f"ws://127.0.0.1:{federation['port']}")
    try:
        report = wait_for_hub(hub)
    finally:
        dealer.stop()
    assert all(r["dealer_bytes"]["from_dealer"] > 0 for r in report["rounds"])
    assert_close_models(model_state(report), model_state(pairwise), atol=1e-6)
    assert "round 2: mask sum over 3 nodes" in dealer.output()


@pytest.mark.timeout(600)
def test_a_killed_dealer_fails_the_round_and_resume_finishes_with_a_new_one(federation, tmp_path):
    ensure_running(federation)
    path = config(federation, tmp_path, run={"rounds": 3}, aggregation={"masking": "dealer"})
    dealers = []

    def kill_the_dealer_in_round_two(event, info):
        if event == "send" and info["kind"] == "dealer_keys" and info["round"] == 2 and dealers:
            dealers[0].proc.send_signal(signal.SIGKILL)

    hub = start_hub(path, observer=kill_the_dealer_in_round_two)
    dealers.append(DealerProcess(tmp_path, f"ws://127.0.0.1:{federation['port']}"))
    with pytest.raises(RoundFailed, match=r"round 2 failed.*dealer.*--resume"):
        wait_for_hub(hub)
    hub = start_hub(path, resume=True)
    dealers.append(DealerProcess(tmp_path, f"ws://127.0.0.1:{federation['port']}"))
    try:
        report = wait_for_hub(hub)
    finally:
        for dealer in dealers:
            dealer.stop()
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]


@pytest.mark.timeout(600)
def test_resume_after_the_hub_is_killed_continues_the_same_run(federation, tmp_path):
    ensure_running(federation)
    rounds = 5
    reference = wait_for_hub(start_hub(config(federation, tmp_path / "ref", run={"rounds": rounds})))
    raw = base_config(list(NAMES), run={"rounds": rounds}, **FAST)
    raw["federation"]["listen"] = f"127.0.0.1:{federation['port']}"
    raw["run"]["output_dir"] = str(tmp_path / "run")
    hub = HubProcess(tmp_path, raw)
    progress = tmp_path / "run" / "report.json"
    deadline = time.monotonic() + 240
    while not (progress.exists() and json.loads(progress.read_text())["run"]["rounds_done"] >= 2):
        assert hub.proc.poll() is None and time.monotonic() < deadline, hub.output()[-3000:]
        time.sleep(0.02)
    hub.proc.send_signal(signal.SIGKILL)
    hub.proc.wait()
    assert json.loads(progress.read_text())["run"]["rounds_done"] < rounds, "the run ended before the kill"
    resumed = wait_for_hub(start_hub(hub.config, resume=True))
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, rounds + 1))
    # same seeds, same data: the resumed run is the uninterrupted one (the nodes reconnected on their own)
    assert_close_models(model_state(resumed), model_state(reference), atol=1e-6)


def test_too_few_nodes_at_start_up_names_the_missing_ones_and_the_advice(tmp_path):
    raw = base_config(["alpha", "beta"], federation={"connect_timeout_s": 0.5, "min_nodes": 2})
    raw["run"]["output_dir"] = str(tmp_path / "run")
    cfg = parse_config(raw)
    with pytest.raises(RoundFailed) as info:
        asyncio.run(Hub(cfg).run())
    text = str(info.value)
    assert "waited 0.5 s for alpha, beta" in text and "no round had completed" in text and "--resume" not in text


def test_an_output_dir_under_a_file_is_named_before_any_node_is_awaited(tmp_path):
    (tmp_path / "file").write_text("x")
    raw = base_config(["alpha", "beta"])
    raw["run"]["output_dir"] = str(tmp_path / "file" / "run")
    path = tmp_path / "federation.toml"
    path.write_text(to_toml(raw))
    run = subprocess.run([sys.executable, "-m", "cli.main", "train", "--config", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "run.output_dir: cannot write to" in run.stderr


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path):
    run = subprocess.run([sys.executable, "-m", "cli.main", "keygen", "--name", "hospital-a", "--out",
                          str(tmp_path / "keys")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    key, pub = tmp_path / "keys" / "hospital-a.key", tmp_path / "keys" / "hospital-a.pub"
    assert key.stat().st_mode & 0o777 == 0o600
    assert pub.read_text().startswith("ssh-ed25519 ") and pub.read_text().strip().endswith(" hospital-a")
    assert "SHA256:" in run.stdout
    again = subprocess.run([sys.executable, "-m", "cli.main", "keygen", "--name", "hospital-a", "--out",
                            str(tmp_path / "keys")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already exist" in again.stderr


def test_cli_names_bad_config_keys_bad_data_folders_and_bad_node_options(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nlrr = 0.1\n')
    run = subprocess.run([sys.executable, "-m", "cli.main", "train", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "training.lrr: unknown key (did you mean training.lr?)" in run.stderr
    check = subprocess.run([sys.executable, "-m", "cli.main", "node", "--data", str(tmp_path / "nothing"), "--check"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "does not exist" in check.stderr
    keys = keys_dir()
    data = digits_folders(tmp_path / "data", ("alpha",), limit=60)
    for args, message in [
        (["--hub", "ws://127.0.0.1:99999"], "--hub: 'ws://127.0.0.1:99999' has a port outside 0..65535"),
        (["--hub", "ws://127.0.0.1:None"], "--hub: 'ws://127.0.0.1:None' has a port outside 0..65535"),
        (["--hub", "127.0.0.1:8780"], "must look like wss://HOST:PORT"),
        (["--hub", "ws://127.0.0.1:8780", "--hub-key", str(keys / "hub.key")], "that is a private key"),
    ]:
        base = ["--data", str(data / "alpha"), "--key", str(keys / "alpha.key"), "--hub-key", str(keys / "hub.pub")]
        run = subprocess.run([sys.executable, "-m", "cli.main", "node", *base, *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and message in run.stderr, (args, run.stderr)


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
    assert (out / "keys" / "hub.key").stat().st_mode & 0o777 == 0o600
