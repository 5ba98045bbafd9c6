"""The network runtime over real sockets on 127.0.0.1: channels, authentication, TLS, the MPC mesh,
multi-process runs equal to in-process ones, faults, and the ``primia party`` command.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

import mpc
from mpc.errors import AuthenticationError, ConfigError, FrameError, PeerFailure, PeerTimeout
from mpc.net import (
    ChannelClosed,
    ChannelOptions,
    Limits,
    Membership,
    NetworkTransport,
    connect,
    load_config,
    run_processes,
    serve,
)
from mpc.net.auth import client_handshake
from mpc.net.processes import pack_value, unpack_value
from mpc.net.tls import client_context, server_context

from . import net_programs

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"test-federation-secret-0123456789abcdef"
ULP = 2.0**-16
FAST = ChannelOptions(connect_timeout_s=20, auth_timeout_s=5, close_timeout_s=5)


# -- helpers -------------------------------------------------------------------------------
def _member(local_id, secret=SECRET, session="s1") -> Membership:
    return Membership(local_id, secret, session)


async def _echo_server(**kw):
    """A server answering every message with the same arrays and kind 'echo'."""

    async def handler(channel):
        while True:
            msg = await channel.recv()
            await channel.send("echo", {"n": msg.header.get("n")}, msg.arrays)

    return await serve(handler, "127.0.0.1", 0, **{"membership": _member("hub"), "options": FAST, **kw})


def _port(server) -> int:
    return server.sockets[0].getsockname()[1]


def _mesh(size: int, *, secrets=None, options=FAST, timeout=30) -> list[NetworkTransport]:
    """``size`` connected transports in this process (each with its own loop thread)."""
    secrets = secrets or [SECRET] * size
    ts = [NetworkTransport(i, size, membership=_member(i, secrets[i]), options=options) for i in range(size)]
    ports = {i: ("127.0.0.1", t.listen()) for i, t in enumerate(ts[:-1])}
    errors: dict[int, BaseException] = {}

    def go(i):
        try:
            ts[i].connect(ports)
        except BaseException as exc:  # noqa: BLE001 - collected for the test
            errors[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        for t in ts:
            t.abort("test set-up failed")
        raise next(iter(errors.values()))
    return ts


# -- channels: round trips, authentication, malformed frames --------------------------------
def test_channel_round_trip_with_header_and_named_arrays():
    async def main():
        server = await _echo_server()
        try:
            ch = await connect(f"ws://127.0.0.1:{_port(server)}", membership=_member("node-a"), peer_id="hub",
                               options=FAST)
            arrays = {"w": np.arange(12.0).reshape(3, 4), "b": np.array([1, 2], np.int32), "e": np.zeros((0, 3))}
            await ch.send("update", {"n": 7}, arrays)
            reply = await ch.recv()
            await ch.close()
            return reply
        finally:
            server.close()
            await server.wait_closed()

    reply = asyncio.run(main())
    assert reply.kind == "echo" and reply.sender == "hub" and reply.session == "s1" and reply.header == {"n": 7}
    np.testing.assert_array_equal(reply.arrays["w"], np.arange(12.0).reshape(3, 4))
    assert reply.arrays["b"].dtype == np.int32 and reply.arrays["e"].shape == (0, 3)


def test_wrong_secret_is_refused_on_both_sides_and_logged(caplog):
    async def main():
        server = await _echo_server()
        try:
            with pytest.raises(AuthenticationError, match="refused the connection: it does not accept this side"):
                await connect(f"ws://127.0.0.1:{_port(server)}", membership=_member("node-a", b"x" * 32),
                              peer_id="hub", options=FAST)
            # The server goes on serving members.
            ch = await connect(f"ws://127.0.0.1:{_port(server)}", membership=_member("node-b"), peer_id="hub",
                               options=FAST)
            await ch.send("ping", {"n": 1}, {})
            reply = await ch.recv()
            await ch.close()
            return reply
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="primia.net.auth"):
        reply = asyncio.run(main())
    assert reply.header == {"n": 1}
    assert any("rejected" in r.getMessage() and "node-a" in r.getMessage() and "could not prove" in r.getMessage()
               for r in caplog.records)


def test_client_refuses_a_server_that_cannot_prove_the_secret():
    """A rogue server that accepts any client and answers with a made-up proof is caught by the client."""

    async def rogue(ws):
        hello = msgpack.unpackb(await ws.recv())
        await ws.send(msgpack.packb({"t": "challenge", "id": hello["to"], "nonce": b"n" * 32, "context": "",
                                     "key": b""}))
        await ws.recv()  # the client's proof, ignored
        await ws.send(msgpack.packb({"t": "welcome", "proof": b"p" * 32}))
        await ws.wait_closed()

    async def main():
        async with ws_serve(rogue, "127.0.0.1", 0) as server:
            with pytest.raises(AuthenticationError, match="could not prove it is 'hub'"):
                await connect(f"ws://127.0.0.1:{_port(server)}", membership=_member("node-a"), peer_id="hub",
                              options=FAST)

    asyncio.run(main())


def test_server_sends_nothing_that_depends_on_its_secret_before_the_client_proved_itself(monkeypatch):
    """What an unauthenticated client gets from a server is the same whatever the server's secret:
    there is nothing in it to test a guessed secret against."""
    import mpc.net.auth as auth

    monkeypatch.setattr(auth.secrets, "token_bytes", lambda n: b"\x07" * n)  # the same nonces every time

    async def seen_by_guesser(server_secret: bytes) -> list[bytes]:
        server = await serve(lambda ch: asyncio.sleep(0), "127.0.0.1", 0,
                             membership=_member("hub", server_secret), options=FAST)
        received = []
        try:
            async with ws_connect(f"ws://127.0.0.1:{_port(server)}", compression=None) as ws:
                await ws.send(msgpack.packb({"t": "hello", "v": auth.AUTH_VERSION, "id": "eve", "to": "hub",
                                             "session": "s1", "nonce": b"\x01" * 32}))
                received.append(await ws.recv())
                await ws.send(msgpack.packb({"t": "proof", "proof": b"\x00" * 32}))  # a guess
                try:
                    received.append(await ws.recv())
                except ConnectionClosed as exc:
                    received.append(f"closed {exc.rcvd.code} {exc.rcvd.reason}".encode())
        finally:
            server.close()
            await server.wait_closed()
        return received

    first = asyncio.run(seen_by_guesser(b"a" * 32))
    second = asyncio.run(seen_by_guesser(b"b" * 32))
    assert first == second
    assert first[-1] == b"closed 1008 not-accepted"
    challenge = msgpack.unpackb(first[0])
    assert set(challenge) == {"t", "id", "nonce", "context", "key"}


@pytest.mark.parametrize(
    "session, peer_id, match",
    [("other-session", "hub", "another session"), ("s1", "not-the-hub", "dialled")],
)
def test_wrong_session_or_wrong_server_is_refused(session, peer_id, match, caplog):
    async def main():
        server = await _echo_server()
        try:
            with pytest.raises(AuthenticationError):
                await connect(f"ws://127.0.0.1:{_port(server)}", membership=_member("n", session=session),
                              peer_id=peer_id, options=FAST)
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="primia.net.auth"):
        asyncio.run(main())
    assert any(match in r.getMessage() for r in caplog.records)


def test_data_before_authentication_is_refused(caplog):
    async def main():
        server = await _echo_server()
        try:
            async with ws_connect(f"ws://127.0.0.1:{_port(server)}", compression=None) as ws:
                await ws.send(b"\x00" * 5000)  # an unauthenticated bulk message
                await asyncio.wait_for(ws.wait_closed(), 10)
                return ws.close_code
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="primia.net.auth"):
        code = asyncio.run(main())
    assert code == 1009  # refused by the pre-authentication message limit, before any of it is buffered
    assert any("rejected" in r.getMessage() and "exceeds limit of 4096 bytes" in r.getMessage()
               for r in caplog.records)


async def _authenticated_raw(port: int, local_id: str = "rogue"):
    ws = await ws_connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)
    await client_handshake(ws, _member(local_id), "hub", timeout_s=5)
    return ws


GARBAGE = [
    b"",
    b"PRMA",
    b"GET / HTTP/1.1\r\n\r\n",
    b"PRMA\x02\x00\x00\x00\x00\x00\x00\x00",
    msgpack.packb({"kind": "x"}),
]


def test_malformed_frames_close_only_that_connection(caplog):
    """Garbage after authentication: the sender's connection is closed with a reason; others are served."""

    async def main():
        server = await _echo_server()
        port = _port(server)
        try:
            good = await connect(f"ws://127.0.0.1:{port}", membership=_member("good"), peer_id="hub", options=FAST)
            codes = []
            for blob in GARBAGE:
                ws = await _authenticated_raw(port)
                await ws.send(blob)
                await asyncio.wait_for(ws.wait_closed(), 10)
                codes.append(ws.close_code)
            # a text frame and a message claiming another sender
            ws = await _authenticated_raw(port)
            await ws.send("text")
            await asyncio.wait_for(ws.wait_closed(), 10)
            codes.append(ws.close_code)
            ws = await _authenticated_raw(port, "imposter")
            forged = b"".join(bytes(c) for c in mpc.net.encode_message("x", None, {}, sender="good", session="s1"))
            await ws.send(forged)
            await asyncio.wait_for(ws.wait_closed(), 10)
            codes.append(ws.close_code)
            # the well-behaved client is still served on the same server
            await good.send("ping", {"n": 2}, {"a": np.ones(3)})
            reply = await good.recv()
            await good.close()
            return codes, reply
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="primia.net"):
        codes, reply = asyncio.run(main())
    assert codes[: len(GARBAGE)] == [1007] * len(GARBAGE)
    assert codes[len(GARBAGE) :] == [1007, 1008]
    assert reply.header == {"n": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert any("rogue" in m and "not a primia message" in m for m in messages)
    assert any("imposter" in m and "claims sender 'good'" in m for m in messages)


def test_oversized_message_and_frame_are_rejected():
    limits = Limits(max_message_bytes=1 << 16, chunk_bytes=1 << 14, max_frame_bytes=1 << 16, max_header_bytes=4096)

    async def main():
        server = await _echo_server(limits=limits)
        port = _port(server)
        try:
            codes = []
            for chunks in (
                # declared array bigger than max_message_bytes (rejected from the header)
                mpc.net.encode_message("x", None, {"a": np.zeros(1 << 14)}, sender="rogue", session="s1",
                                       chunk_bytes=1 << 14),
                # one frame larger than max_frame_bytes (rejected by websockets)
                [bytes(1 << 17)],
            ):
                ws = await _authenticated_raw(port)
                await ws.send(chunks if len(chunks) > 1 else chunks[0])
                await asyncio.wait_for(ws.wait_closed(), 10)
                codes.append(ws.close_code)
            return codes
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) == [1009, 1009]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(min_size=0, max_size=300))
def test_hypothesis_garbage_never_crashes_the_server(blob):
    async def main():
        server = await _echo_server()
        port = _port(server)
        try:
            ws = await _authenticated_raw(port)
            await ws.send(MAGIC_PREFIXES[len(blob) % 3] + blob)
            try:
                reply = await asyncio.wait_for(ws.recv(), 10)
            except Exception:
                reply = None
            await ws.close()
            # still serving
            ch = await connect(f"ws://127.0.0.1:{port}", membership=_member("good"), peer_id="hub", options=FAST)
            await ch.send("ping", {"n": 3}, {})
            assert (await ch.recv()).header == {"n": 3}
            await ch.close()
            return reply
        finally:
            server.close()
            await server.wait_closed()

    reply = asyncio.run(main())
    if reply is not None:  # the garbage happened to be a valid message: it was echoed
        assert isinstance(reply, bytes)


MAGIC_PREFIXES = [b"", b"PRMA\x01\x00\x00\x00", b"PRMA\x01\x00\x00\x00\x10\x00\x00\x00"]


# -- TLS -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem, key, cert):
        (d / f"{stem}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
        )
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def make_ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = make_ca("primia test CA")
    write("ca", ca_key, ca_cert)
    for stem in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(stem)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, key, cert)
    other_key, other_ca = make_ca("someone else's CA")
    write("other-ca", other_key, other_ca)
    return d


def test_mutual_tls_round_trip_and_refusals(tls_material):
    d = tls_material
    server_ssl = server_context(d / "server.pem", d / "server.key", ca=d / "ca.pem", mutual=True)

    async def main():
        server = await _echo_server(ssl=server_ssl)
        url = f"wss://127.0.0.1:{_port(server)}"
        try:
            ok = await connect(url, membership=_member("n"), peer_id="hub", options=FAST,
                               ssl=client_context(d / "ca.pem", cert=d / "client.pem", key=d / "client.key"))
            await ok.send("ping", {"n": 4}, {"x": np.arange(300_000.0)})
            reply = await ok.recv()
            await ok.close()
            refused = []
            for ctx in (client_context(d / "ca.pem"),  # no client certificate under mutual TLS
                        client_context(d / "other-ca.pem", cert=d / "client.pem", key=d / "client.key")):
                with pytest.raises((AuthenticationError, PeerFailure)) as info:
                    await connect(url, membership=_member("n"), peer_id="hub",
                                  options=ChannelOptions(connect_timeout_s=2, auth_timeout_s=2), ssl=ctx)
                refused.append(str(info.value))
            return reply, refused
        finally:
            server.close()
            await server.wait_closed()

    reply, refused = asyncio.run(main())
    np.testing.assert_array_equal(reply.arrays["x"], np.arange(300_000.0))
    assert "certificate" in refused[1].lower()  # the server's certificate is not trusted
    assert refused[0]


def test_tls_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        server_context(tmp_path / "missing.pem", tmp_path / "missing.key")


# -- the MPC mesh in one process -------------------------------------------------------------
def test_mesh_everyone_sends_then_receives_large_arrays():
    """SPMD round: every endpoint sends to every other before receiving; sends never block."""
    ts = _mesh(3)
    try:
        big = {i: np.full(3_000_000, i, dtype=np.int64) for i in range(3)}  # 24 MB each, many fragments
        for i, t in enumerate(ts):
            for p in t.peers:
                t.send(p, big[i])
        for i, t in enumerate(ts):
            for p in t.peers:
                got = t.recv(p, 30)
                assert got.dtype == np.int64 and got.shape == (3_000_000,) and got[0] == p and got[-1] == p
        # order is kept per pair
        for k in range(5):
            ts[0].send(1, np.array([k], np.uint8))
        assert [int(ts[1].recv(0, 10)[0]) for _ in range(5)] == [0, 1, 2, 3, 4]
    finally:
        for t in ts:
            t.close()


def test_mesh_failure_reaches_every_endpoint_with_the_reason():
    ts = _mesh(3)
    try:
        ts[1].abort("party 1 failed: ValueError: boom")
        for i in (0, 2):
            with pytest.raises(PeerFailure, match="boom") as info:
                ts[i].recv(1, 20)
            assert "party 1" in str(info.value)
            # waiting on a healthy peer fails too, naming the culprit
            with pytest.raises(PeerFailure, match="party 1"):
                ts[i].recv(2 - i, 20)
            with pytest.raises(PeerFailure):
                ts[i].send(2 - i, np.zeros(1))
    finally:
        for t in ts:
            t.close()


def test_mesh_clean_close_only_ends_that_peer():
    ts = _mesh(3)
    try:
        ts[2].send(0, np.arange(3))
        ts[2].close()
        np.testing.assert_array_equal(ts[0].recv(2, 10), np.arange(3))  # queued before the close: delivered
        with pytest.raises(ChannelClosed, match="closed the connection") as info:
            ts[0].recv(2, 10)
        assert info.value.clean
        ts[0].send(1, np.ones(2))  # the others carry on
        np.testing.assert_array_equal(ts[1].recv(0, 10), np.ones(2))
    finally:
        for t in ts:
            t.close()


def test_mesh_recv_timeout_names_the_silent_peer():
    ts = _mesh(3)
    try:
        with pytest.raises(PeerTimeout, match="party 1"):
            ts[0].recv(1, 0.3)
        with pytest.raises(PeerTimeout, match="dealer"):
            ts[0].recv(2, 0.1)
    finally:
        for t in ts:
            t.close()


def test_mesh_detects_a_frozen_peer_by_keepalive():
    """A peer whose event loop stops answering (a stopped process, a hung host) fails the others."""
    options = ChannelOptions(ping_interval_s=0.3, ping_timeout_s=0.6, close_timeout_s=0.5, connect_timeout_s=20)
    ts = _mesh(3, options=options)
    thaw = threading.Event()
    try:
        ts[1]._io.call_soon(thaw.wait, 60)  # freeze party 1's network thread
        with pytest.raises(PeerFailure, match="party 1.*stopped answering keepalive pings"):
            ts[0].recv(1, 60)
        with pytest.raises(PeerFailure, match="party 1"):
            ts[0].recv(2, 60)  # waiting on anyone else fails too: the computation is over
    finally:
        thaw.set()
        for t in ts:
            t.abort("test over")


def test_mesh_malformed_frame_raises_frame_error_naming_the_peer():
    """A member that sends garbage into the MPC mesh: FrameError for it, and the computation is failed."""
    t = NetworkTransport(0, 3, membership=_member(0), options=FAST)
    port = t.listen()
    first_received = threading.Event()

    async def rogue():
        wss = []
        for pid in (1, 2):
            ws = await ws_connect(f"ws://127.0.0.1:{port}", compression=None)
            await client_handshake(ws, _member(pid), 0, timeout_s=5)
            wss.append(ws)
        (valid,) = mpc.net.encode_message("mpc", None, {"x": np.arange(3)}, sender=1, session="s1")
        await wss[0].send(valid)
        await asyncio.get_running_loop().run_in_executor(None, first_received.wait, 20)
        await wss[1].send(b"PRMA\x01\x00\x00\x00\xff\xff\x00\x00garbage")
        await asyncio.wait_for(wss[1].wait_closed(), 10)
        await wss[0].close()
        return wss[1].close_code

    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", asyncio.run(rogue())))
    thread.start()
    try:
        t.connect({})
        np.testing.assert_array_equal(t.recv(1, 10), np.arange(3))
        first_received.set()
        with pytest.raises(FrameError, match="dealer.*truncated"):
            t.recv(2, 10)
        with pytest.raises(PeerFailure, match="dealer"):
            t.recv(1, 10)  # the other peer's channel is failed too: the computation cannot go on
    finally:
        first_received.set()
        thread.join(20)
        t.abort("test over")
    assert result["code"] == 1007


def test_mesh_with_a_wrong_secret_does_not_start():
    with pytest.raises(AuthenticationError):
        _mesh(2, secrets=[SECRET, b"z" * 32], options=ChannelOptions(connect_timeout_s=1.5, auth_timeout_s=3))


# -- results cross the pipe as msgpack, not pickle --------------------------------------------
def test_result_codec_round_trips_numpy_and_tuples():
    value = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "t": (1, 2.5, "x", None), "s": np.float32(1.5),
             "l": [np.bool_(True), b"raw"], 3: {"nested": (np.zeros(0),)}}
    back = unpack_value(pack_value(value))
    np.testing.assert_array_equal(back["a"], value["a"])
    assert back["a"].dtype == np.int16 and back["a"].flags.writeable
    assert back["t"] == (1, 2.5, "x", None) and back["s"] == np.float32(1.5) and back["s"].dtype == np.float32
    assert back[3]["nested"][0].shape == (0,)
    with pytest.raises(TypeError, match="cannot be returned"):
        pack_value(object())
    with pytest.raises(TypeError, match="dtype"):
        pack_value(np.array(["a"]))


# -- multi-process runs: equal to the in-process run --------------------------------------------
def _layers_plain():
    import torch

    rng = np.random.default_rng(11)
    a, b = rng.uniform(-2, 2, (6, 9)), rng.uniform(-2, 2, (9, 4))
    x, w = rng.uniform(-1, 1, (2, 3, 7, 7)), rng.uniform(-0.5, 0.5, (4, 3, 3, 3))
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1, stride=2).numpy()
    return {"matmul": a @ b, "conv2d": conv, "relu": np.maximum(a, 0)}


@pytest.mark.parametrize("parties", [2, 3])
def test_matmul_conv2d_relu_over_processes_equal_the_in_process_run(parties):
    """Every party and the dealer in its own process, over websockets: same results, same accounting."""
    net = run_processes(net_programs.layers_program, parties=parties, timeout_s=120)
    local = mpc.run_local(net_programs.layers_program, parties=parties, timeout_s=120)
    plain = _layers_plain()
    for rank in range(parties):
        for key in ("matmul", "conv2d", "relu"):
            got = net[rank][key]
            assert got.shape == plain[key].shape
            # Exact truncation rounds down or up at random: one unit in the last place apart at most.
            assert np.abs(got - local[rank][key]).max() <= ULP, key
            np.testing.assert_allclose(got, plain[key], atol=1e-3, err_msg=key)
        assert net[rank]["stats"] == local[rank]["stats"]  # identical byte and round accounting
        assert net[rank]["stats"]["rounds"] > 0 and net[rank]["stats"]["bytes_sent"] > 0
    assert net[0]["round_trip"] and net[1]["round_trip"]  # 24 MB from party 0 to 1 and back, intact
    assert not multiprocessing.active_children()


def test_a_failing_party_is_reported_with_its_own_error():
    with pytest.raises(ValueError, match="boom") as info:
        run_processes(net_programs.failing_program, parties=3, timeout_s=60)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "raised in party 1" in notes and "failing_program" in notes
    assert not multiprocessing.active_children()


def test_a_killed_party_fails_the_others_promptly_not_by_timeout():
    with pytest.raises(PeerFailure, match="party 1") as info:
        run_processes(net_programs.killed_program, parties=3, timeout_s=600)
    assert not isinstance(info.value, PeerTimeout)
    assert "SIGKILL" in str(info.value)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    # every other endpoint failed with a clear error naming party 1, not a timeout
    for other in ("party 0", "party 2", "dealer"):
        assert f"{other}: " in notes
    assert "timeout" not in notes.split("other endpoints:")[-1]
    assert not multiprocessing.active_children()


def test_run_processes_refuses_functions_it_cannot_spawn():
    with pytest.raises(ValueError, match="module-level"):
        run_processes(lambda ctx: None)


@pytest.mark.slow
def test_500_megabyte_array_round_trip():
    """500 MB from party 0 to party 1 and back between two processes (10-25 s; 2-3 GB of memory).

    The default selection sends 24 MB there and back inside the layers test.
    """
    assert run_processes(net_programs.round_trip_program, parties=2, args=(500 * 10**6,), timeout_s=300) == [True, True]


# -- configuration and the primia party command ---------------------------------------------------
def _free_ports(n):
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _write_config(path: Path, ports, secret_file="federation.key", extra="") -> Path:
    lines = ['session = "cli-test"', f'secret_file = "{secret_file}"', "[timeouts]", "connect_s = 8",
             "recv_s = 60", extra]
    for i, port in enumerate(ports):
        role = 'role = "dealer"' if i == len(ports) - 1 else ""
        lines += ["[[party]]", f"id = {i}", 'host = "127.0.0.1"', f"port = {port}", role]
    path.write_text("\n".join(lines) + "\n")
    return path


def _start_party(config: Path, i: int, tmp: Path, dealer: bool):
    cmd = [sys.executable, "-m", "cli.main", "party", "--config", str(config), "--id", str(i)]
    if not dealer:
        cmd += ["--program", "tests.net_programs:cli_program", "--args", "[0.5]", "--output", str(tmp / f"out{i}.npy")]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_primia_party_command_runs_each_party_from_one_config(tmp_path):
    (tmp_path / "federation.key").write_text(os.urandom(32).hex())
    os.chmod(tmp_path / "federation.key", 0o600)
    config = _write_config(tmp_path / "parties.toml", _free_ports(3))
    procs = [_start_party(config, i, tmp_path, dealer=(i == 2)) for i in (2, 1, 0)]  # any start order
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    expected = (np.arange(6.0).reshape(2, 3) * 0.5) @ np.ones((3, 2))
    for i in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"out{i}.npy"), expected, atol=1e-3)


def test_primia_party_with_a_wrong_secret_fails_cleanly(tmp_path):
    (tmp_path / "federation.key").write_text(os.urandom(32).hex())
    (tmp_path / "impostor.key").write_text(os.urandom(32).hex())
    ports = _free_ports(3)
    good = _write_config(tmp_path / "parties.toml", ports)
    bad = _write_config(tmp_path / "impostor.toml", ports, secret_file="impostor.key")
    procs = [_start_party(good, 0, tmp_path, False), _start_party(bad, 1, tmp_path, False),
             _start_party(good, 2, tmp_path, True)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode != 0 for p in procs), outs
    assert "AuthenticationError" in outs[1][1] or "authentication" in outs[1][1].lower()
    # party 0 logged the rejected connection and says why party 1 never joined
    assert "rejected connection" in outs[0][1] and "wrong secret" in outs[0][1]
    assert "did not connect" in outs[0][1] and "rejected attempts" in outs[0][1]
    assert "party 1" in outs[2][1]  # the dealer could not join party 1 either (refused, or it was gone)
    assert not (tmp_path / "out0.npy").exists() and not (tmp_path / "out1.npy").exists()  # no half-written output
    assert not list(tmp_path.glob(".out*"))


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    (tmp_path / "federation.key").write_text("k" * 40)
    ports = [7001, 7002, 7003]
    path = _write_config(tmp_path / "p.toml", ports, extra="connect_timeout = 3")
    with pytest.raises(ConfigError, match="unknown key 'connect_timeout'.*allowed keys"):
        load_config(path)
    path = _write_config(tmp_path / "p.toml", ports, extra="recv_s = -1")
    with pytest.raises(ConfigError):
        load_config(path)
    path.write_text(path.read_text().replace('role = "dealer"', ""))
    with pytest.raises(ConfigError):
        load_config(path)
    (tmp_path / "short.key").write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        load_config(_write_config(tmp_path / "q.toml", ports, secret_file="short.key"))
    cfg = load_config(_write_config(tmp_path / "ok.toml", ports))
    assert cfg.parties == 2 and cfg.dealer_id == 2 and cfg.endpoint(1).port == 7002
    assert cfg.options.connect_timeout_s == 8 and cfg.recv_timeout_s == 60
    assert "k" * 40 not in repr(cfg)
    toml_with_typo = tmp_path / "typo.toml"
    text = (tmp_path / "ok.toml").read_text().replace("[[party]]\nid = 0", "[[party]]\nid = 0\nprot = 1", 1)
    toml_with_typo.write_text(text)
    with pytest.raises(ConfigError, match="'prot'"):
        load_config(toml_with_typo)


def test_comparison_options_reach_the_processes():
    import mpc
    from tests.net_programs import relu_stats

    x = np.linspace(-3, 3, 64)
    got = mpc.run_processes(relu_stats, parties=2, args=(x,), comparison="generic", comparison_bits=32)
    want = mpc.run_local(relu_stats, parties=2, args=(x,), comparison="generic", comparison_bits=32)
    for (value, stats), (ref_value, ref_stats) in zip(got, want):
        np.testing.assert_allclose(value, np.maximum(x, 0), atol=2**-16)
        assert stats == ref_stats
    # the generic protocol takes more than FSS's 2 rounds: the option really arrived
    assert got[0][1]["rounds"] > 3


def test_a_flood_of_idle_connections_is_shed_while_members_are_served(caplog):
    """Connections beyond max_unauthenticated are closed at once (1013); idle ones at the handshake deadline;
    a member connecting during the flood is served."""
    options = ChannelOptions(connect_timeout_s=20, auth_timeout_s=5, close_timeout_s=2, handshake_deadline_s=1.5,
                             max_unauthenticated=8)

    async def main():
        server = await _echo_server(options=options)
        port = _port(server)
        try:
            idle = [await ws_connect(f"ws://127.0.0.1:{port}", compression=None) for _ in range(20)]
            member = await connect(f"ws://127.0.0.1:{port}", membership=_member("node-a"), peer_id="hub",
                                   options=options)
            for ws in idle:
                await asyncio.wait_for(ws.wait_closed(), 10)
            await member.send("ping", {"n": 3}, {"a": np.arange(4)})
            reply = await member.recv()
            await member.close()
            return [ws.close_code for ws in idle], reply
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="primia.net"):
        codes, reply = asyncio.run(main())
    assert reply.header == {"n": 3}
    assert codes.count(1013) == 12 and codes.count(1008) == 8, codes  # 12 shed at once, 8 timed out
    assert any("not authenticated within 1.5 s" in r.getMessage() for r in caplog.records)
