"""The long-lived model server and dealer: real processes, real sockets, real data owners.

One model server and one dealer (``primia infer --role ...``) serve every test
of this module: data owners one after another and at once, each matching
plaintext torch; a data owner killed mid-session, garbage, a different plan,
too many sessions — after each, the next session succeeds.  Both servers must
still stop cleanly at the end, having served every session.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from websockets.asyncio.client import connect as ws_connect

from bridge.images import load_batch
from bridge.models import card_from_state
from bridge.roles import receive_card
from bridge.secure import EncryptedModel, warm_up
from bridge.service import open_session, plan_for_card
from bridge.sizing import size_fixed_point
from fl.models import build_model
from mpc.net import encode_message
from mpc.net.auth import client_handshake
from mpc.net.config import load_config
from mpc.net.sessions import SESSION_JOIN, SESSION_OPEN, SessionRefused, run_session

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("normal", "viral", "bacterial")
MODEL_ARGS = ["--model", "simple_cnn", "--input-size", "16", "--classes", ",".join(CLASSES), "--mean", "0.5",
              "--std", "0.25"]
MAX_SESSIONS = 3


def _free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _images(folder: Path, seed: int, n: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@dataclass
class Service:
    root: Path
    parties: Path
    model: nn.Module
    weights: Path
    images: Path
    servers: dict[str, subprocess.Popen]
    logs: dict[str, Path]

    def owner(self, out: Path, *extra: str, images: Path | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", "infer", "--role", "data-owner", "--network", str(self.parties),
             "--port", "0", str(images or self.images), "--out", str(out), "--no-progress", *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def log(self, role: str) -> str:
        return self.logs[role].read_text()

    def check(self, out: Path, images: Path | None = None) -> None:
        """Every image's result matches plaintext torch (same argmax, probabilities within 1e-2)."""
        files = sorted((images or self.images).glob("*.png"))
        card = card_from_state("simple_cnn", self.model.state_dict(), None, input_size=16, mean=(0.5,), std=(0.25,))
        with torch.no_grad():
            want = torch.softmax(self.model(torch.from_numpy(load_batch(files, card))), 1).numpy()
        for path, probs in zip(files, want):
            record = json.loads((out / f"{path.name}.json").read_text())
            assert record["class"] == CLASSES[int(probs.argmax())]
            np.testing.assert_allclose(list(record["probabilities"].values()), probs, atol=1e-2)
        assert json.loads((out / "summary.json").read_text())["images"] == len(files)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    torch.manual_seed(0)
    model = build_model("simple_cnn", num_classes=3, in_channels=1, input_size=16, width=8).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    weights = root / "model.pt"
    torch.save(model.state_dict(), weights)
    images = root / "images"
    _images(images, 1, 3)
    _images(root / "validation", 2, 8)  # the model owner's own images, for calibration
    (root / "federation.key").write_text(os.urandom(32).hex())
    os.chmod(root / "federation.key", 0o600)
    lines = ['session = "service-test"', 'secret_file = "federation.key"', "[timeouts]", "connect_s = 15",
             "recv_s = 60", "auth_s = 5"]
    for i, port in enumerate(_free_ports(3)):
        lines += ["[[party]]", f"id = {i}", 'host = "127.0.0.1"', f"port = {port}"]
        lines += ['role = "dealer"'] if i == 2 else []
    parties = root / "parties.toml"
    parties.write_text("\n".join(lines) + "\n")
    commands = {
        "dealer": ["--role", "dealer", "--network", str(parties), "--max-sessions", str(MAX_SESSIONS + 1)],
        "model-server": ["--role", "model-server", "--network", str(parties), "--weights", str(weights), *MODEL_ARGS,
                         "--calibrate", str(root / "validation"), "--max-sessions", str(MAX_SESSIONS)],
    }
    servers, logs = {}, {}
    for role, args in commands.items():
        logs[role] = root / f"{role}.log"
        with open(logs[role], "w") as sink:
            servers[role] = subprocess.Popen([sys.executable, "-m", "cli.main", "infer", *args], cwd=ROOT,
                                             stdout=sink, stderr=subprocess.STDOUT, text=True)
    svc = Service(root, parties, model, weights, images, servers, logs)
    yield svc
    for proc in servers.values():
        proc.send_signal(signal.SIGTERM)
    for role, proc in servers.items():
        assert proc.wait(60) == 0, svc.log(role)[-3000:]
        assert "stopped:" in svc.log(role) and " 0 session(s) served" not in svc.log(role)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    return out, err


def _alive(service: Service) -> None:
    for role, proc in service.servers.items():
        assert proc.poll() is None, f"the {role} died:\n{service.log(role)[-3000:]}"


def test_data_owners_one_after_another(service, tmp_path):
    for k in range(2):
        owner = service.owner(tmp_path / f"out{k}")
        out, err = _finish(owner)
        assert owner.returncode == 0, err[-3000:]
        service.check(tmp_path / f"out{k}")
    _alive(service)


def test_data_owners_at_once(service, tmp_path):
    _images(tmp_path / "other", 7, 2)  # the second one classifies other images
    owners = [service.owner(tmp_path / "a"), service.owner(tmp_path / "b", images=tmp_path / "other")]
    results = [_finish(p) for p in owners]
    assert [p.returncode for p in owners] == [0, 0], [r[1][-3000:] for r in results]
    service.check(tmp_path / "a")
    service.check(tmp_path / "b", images=tmp_path / "other")
    _alive(service)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_data_owner_killed_mid_session_then_another_succeeds(service, tmp_path):
    many = tmp_path / "many"
    _images(many, 3, 12)
    failed_before = service.log("model-server").count("failed after")
    victim = service.owner(tmp_path / "killed", images=many)
    _wait_for(lambda: any((tmp_path / "killed").glob("*.json")) or victim.poll() is not None, 240,
              "the first result of the session")
    assert victim.poll() is None, "the session ended before it could be killed mid-way"
    victim.kill()
    victim.communicate()
    assert not (tmp_path / "killed" / "summary.json").exists()
    _wait_for(lambda: service.log("model-server").count("failed after") > failed_before, 60,
              "the model server to notice the lost data owner")
    owner = service.owner(tmp_path / "next")
    out, err = _finish(owner)
    assert owner.returncode == 0, err[-3000:]
    service.check(tmp_path / "next")
    _alive(service)


async def _garbage(parties: Path) -> dict[str, object]:
    """Every kind of garbage at the model server's and the dealer's front doors; what each got back."""
    config = load_config(parties)
    seen: dict[str, object] = {}
    for role, endpoint in (("model-server", 1), ("dealer", 2)):
        port = config.endpoint(endpoint).port
        # 1. not even a websocket
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(os.urandom(300) + b"\r\n\r\n")
        await writer.drain()
        seen[f"{role} raw"] = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        # 2. a websocket that never authenticates, sending junk instead
        async with ws_connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            await ws.send(b"\x00junk" * 50)
            await asyncio.wait_for(ws.wait_closed(), 10)
            seen[f"{role} unauthenticated"] = ws.close_code
        # 3. an authenticated member sending malformed frames, or the wrong message
        client_id = 0 if endpoint == 1 else 1
        for name, payload in (("garbage", b"PRMA\x01\x00\x00\x00\xff\xff\x00\x00garbage"),
                              ("wrong kind", encode_message("hello", {"x": 1}, sender=client_id,
                                                            session=config.session)[0])):
            async with ws_connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
                await client_handshake(ws, config.membership(client_id), endpoint, timeout_s=5)
                await ws.send(payload)
                try:
                    reply = await asyncio.wait_for(ws.recv(), 10)
                except Exception:  # noqa: BLE001 - closed without a reply
                    reply = None
                await asyncio.wait_for(ws.wait_closed(), 10)
                seen[f"{role} {name}"] = (ws.close_code, reply)
    # 4. session requests with a bad address or a bad session id
    requests = (("model-server", 1, 0, SESSION_OPEN, "bad owner", {"session": "ab" * 16, "owner": ["127.0.0.1:99999", 5]}),
                ("model-server", 1, 0, SESSION_OPEN, "bad id", {"session": "../../x", "owner": ["127.0.0.1", 5000]}),
                ("dealer", 2, 1, SESSION_JOIN, "bad owner", {"session": "cd" * 16, "owner": [None, None],
                                                             "server": ["127.0.0.1", 5000]}),
                ("dealer", 2, 1, SESSION_JOIN, "bad id", {"session": 7, "owner": ["127.0.0.1", 5000],
                                                          "server": ["127.0.0.1", 5001]}))
    for role, endpoint, client_id, kind, name, header in requests:
        async with ws_connect(f"ws://127.0.0.1:{config.endpoint(endpoint).port}", compression=None) as ws:
            await client_handshake(ws, config.membership(client_id), endpoint, timeout_s=5)
            await ws.send(encode_message(kind, header, sender=client_id, session=config.session)[0])
            seen[f"{role} {name}"] = await asyncio.wait_for(ws.recv(), 10)
    return seen


def test_garbage_at_the_front_doors_then_a_session_succeeds(service, tmp_path):
    seen = asyncio.run(_garbage(service.parties))
    for role in ("model-server", "dealer"):
        assert seen[f"{role} unauthenticated"] == 1008
        code, reply = seen[f"{role} garbage"]
        assert code == 1007 and reply is None
        code, reply = seen[f"{role} wrong kind"]
        assert b"session-refused" in reply and b"expected a" in reply
    assert b"give the port separately" in seen["model-server bad owner"]
    assert b"32 lowercase hex digits" in seen["model-server bad id"]
    assert b"owner host must be a host name" in seen["dealer bad owner"]
    assert b"32 lowercase hex digits" in seen["dealer bad id"]
    owner = service.owner(tmp_path / "out")
    out, err = _finish(owner)
    assert owner.returncode == 0, err[-3000:]
    service.check(tmp_path / "out")
    _alive(service)


def test_garbage_inside_a_session_fails_only_that_session(service, tmp_path):
    config = load_config(service.parties)
    failed_before = service.log("model-server").count("failed after")
    transport = open_session(config, port=0)
    # Where the model server expects the pairwise seed (16 bytes), a member sends something else.
    transport.send(1, np.zeros(7, dtype=np.uint8))
    _wait_for(lambda: service.log("model-server").count("failed after") > failed_before, 60,
              "the model server to drop the session")
    transport.abort("test over")
    assert "expected shape (16,)" in service.log("model-server")
    owner = service.owner(tmp_path / "out")
    out, err = _finish(owner)
    assert owner.returncode == 0, err[-3000:]
    service.check(tmp_path / "out")
    _alive(service)


def test_a_different_plan_fails_that_session_only(service, tmp_path):
    wrong = service.owner(tmp_path / "wrong", "--act-bits", "13", "--comparison-bits", "40")
    out, err = _finish(wrong)
    assert wrong.returncode == 1
    assert "different model or fixed-point setting" in err, err[-3000:]
    owner = service.owner(tmp_path / "out")
    out, err = _finish(owner)
    assert owner.returncode == 0, err[-3000:]
    service.check(tmp_path / "out")
    _alive(service)


def _masked_weights(ctx):
    """A data owner that builds the model (the server opens W - B), asks for no batch, returns W - B."""
    warm_up(ctx)
    card = receive_card(ctx)
    model = EncryptedModel(ctx, plan_for_card(card), None, **size_fixed_point(card.bounds).options())
    ctx.comm.exchange({1: np.array([0], dtype=np.int64)}, {})  # announces 0 batches
    return {name: tensor.prepare().copy() for name, tensor in model.weights.items()}


def test_every_session_gets_fresh_weight_masks(service):
    config = load_config(service.parties)
    first, second = (run_session(config, open_session(config, port=0), 0, _masked_weights) for _ in range(2))
    assert first.keys() == second.keys() and first
    for name in first:
        a, b = first[name], second[name]
        assert a.shape == b.shape
        # W - B1 and W - B2: the masks differ everywhere, so the data owner learns nothing from the pair
        assert np.mean(a != b) > 0.99, name
        assert len(np.unique(a - b)) > 0.99 * a.size, name


def test_one_session_too_many_is_refused_naming_the_limit(service, tmp_path):
    config = load_config(service.parties)
    held = []
    try:
        for _ in range(MAX_SESSIONS):
            held.append(open_session(config, port=0))
        with pytest.raises(SessionRefused, match=f"busy.*max_sessions = {MAX_SESSIONS}"):
            open_session(config, port=0)
    finally:
        for transport in held:
            transport.abort("test over")
    deadline = time.monotonic() + 60
    while True:  # the held sessions fail at the server as their data owner hangs up; then there is room again
        owner = service.owner(tmp_path / "out")
        out, err = _finish(owner)
        if owner.returncode == 0 or "busy" not in err or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert owner.returncode == 0, err[-3000:]
    service.check(tmp_path / "out")
    _alive(service)
