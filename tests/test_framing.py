"""Large frames read straight into their arrays and written without copies (mpc.net.framing).

The fast path must be invisible: every message arrives bit for bit, in order,
in both directions (server to client unmasked, client to server masked), at
every size around the direct-payload threshold, and it must interoperate
with websockets' own reader and writer.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from websockets.utils import apply_mask

import mpc.net.wire as wire
from mpc.net import ChannelOptions, Limits, Membership, connect, serve
from mpc.net.framing import DIRECT_MIN_BYTES, unmask_in_place

SECRET = b"test-federation-secret-0123456789abcdef"
FAST = ChannelOptions(connect_timeout_s=20, auth_timeout_s=5, close_timeout_s=5)
SIZES = [0, 1, 7, DIRECT_MIN_BYTES - 1, DIRECT_MIN_BYTES, DIRECT_MIN_BYTES + 1, 3 * DIRECT_MIN_BYTES + 5, 5_000_003]


def _member(local_id):
    return Membership(local_id, SECRET, "s1")


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 63, 64, 65, (1 << 16) + 3])
def test_unmask_in_place_equals_websockets_apply_mask(length):
    rng = np.random.default_rng(length)
    payload = rng.integers(0, 256, length, dtype=np.uint8)
    key = bytes(rng.integers(0, 256, 4, dtype=np.uint8))
    expected = apply_mask(payload.tobytes(), key)
    unmask_in_place(payload, key)
    assert payload.tobytes() == expected


def test_stream_decoder_keeps_a_fragment_written_in_place_without_copying():
    arr = np.arange(300_000, dtype=np.int64)
    chunks = wire.encode_message("x", {"k": 1}, {"a": arr}, chunk_bytes=1 << 18)
    decoder = wire.StreamDecoder()
    decoder.feed(chunks[0])  # the header
    placed = []
    for chunk in chunks[1:]:
        target = decoder.reserve(len(chunk))
        assert target is not None and target.size == len(chunk)
        target[:] = np.frombuffer(chunk, dtype=np.uint8)
        placed.append(target)
        decoder.feed(memoryview(target))
    message = decoder.finish()
    np.testing.assert_array_equal(message.arrays["a"], arr)
    assert all(np.shares_memory(t, message.arrays["a"]) for t in placed)
    # no room for more: a fragment past the declared size is not given a place
    assert decoder.reserve(1) is None


def test_stream_decoder_reserves_nothing_before_the_header_is_complete():
    decoder = wire.StreamDecoder()
    assert decoder.reserve(8) is None
    chunks = wire.encode_message("x", None, {"a": np.ones(200_000)}, chunk_bytes=1 << 16)
    decoder.feed(bytes(chunks[0])[:5])
    assert decoder.reserve(8) is None


def _with_echo_server(client, options=FAST, limits=Limits()):
    """Run ``await client(port)`` against a server that echoes every message; returns its result."""

    async def handler(channel):
        while True:
            msg = await channel.recv()
            await channel.send("echo", msg.header, msg.arrays)

    async def main():
        server = await serve(handler, "127.0.0.1", 0, membership=_member("hub"), options=options, limits=limits)
        try:
            return await client(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def _messages():
    rng = np.random.default_rng(7)
    out = []
    for n in SIZES:
        out.append({"a": rng.integers(0, 256, n, dtype=np.uint8)})
    # several arrays with padding between them, a float array and a tiny one after a big one
    out.append({"x": rng.standard_normal(200_001), "y": rng.integers(-5, 5, (3, 70_001)).astype(np.int32),
                "z": np.arange(3, dtype=np.int16)})
    out.append({"t": np.zeros(1, np.int64)})
    return out


@pytest.mark.parametrize(
    "server_options, client_options",
    [(FAST, FAST),  # both sides fast: unmasked direct frames one way, masked the other
     (ChannelOptions(connect_timeout_s=20, buffered_reads=False), FAST),  # websockets' reader on the server
     (FAST, ChannelOptions(connect_timeout_s=20, buffered_reads=False))],  # and on the client
    ids=["both-direct", "library-server", "library-client"],
)
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 100_003])
def test_echo_of_every_size_is_exact_in_both_directions(server_options, client_options, chunk_bytes):
    limits = Limits(chunk_bytes=chunk_bytes)

    async def client(port):
        channel = await connect(f"ws://127.0.0.1:{port}", membership=_member("node"), peer_id="hub",
                                options=client_options, limits=limits)
        replies = []
        for i, arrays in enumerate(_messages()):
            await channel.send("ping", {"i": i}, arrays)
            replies.append(await channel.recv())
        await channel.close()
        return replies

    replies = _with_echo_server(client, server_options, limits)
    for i, (arrays, reply) in enumerate(zip(_messages(), replies)):
        assert reply.kind == "echo" and reply.header == {"i": i}
        assert list(reply.arrays) == list(arrays)
        for name, arr in arrays.items():
            got = reply.arrays[name]
            assert got.dtype == arr.dtype and got.shape == arr.shape
            np.testing.assert_array_equal(got, arr)


def test_large_fragments_are_written_in_place(monkeypatch):
    """On a steady bulk transfer the receiver writes fragments straight into the result array."""
    placed = []
    original = wire.StreamDecoder.reserve

    def counting(self, nbytes):
        target = original(self, nbytes)
        placed.append(target is not None)
        return target

    monkeypatch.setattr(wire.StreamDecoder, "reserve", counting)
    arr = np.random.default_rng(3).integers(0, 1 << 40, 4_000_000, dtype=np.int64)  # 32 MB, 31 fragments

    async def client(port):
        channel = await connect(f"ws://127.0.0.1:{port}", membership=_member("node"), peer_id="hub", options=FAST)
        await channel.send("ping", None, {"a": arr})
        reply = await channel.recv()
        await channel.close()
        return reply

    reply = _with_echo_server(client)
    np.testing.assert_array_equal(reply.arrays["a"], arr)
    # both directions: every fragment after the first array fragment is a candidate
    assert sum(placed) >= 40, f"only {sum(placed)} of {len(placed)} fragments were placed"


def _frame(opcode: int, payload: bytes, fin: bool, key: bytes) -> bytes:
    """A client's (masked) frame, written out by hand."""
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 1 << 16 \
        else bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([(0x80 if fin else 0) | opcode]) + length + key + apply_mask(payload, key)


def test_frames_cut_anywhere_by_the_network_still_arrive_whole():
    """A client's frames trickling in as odd-sized pieces: headers and payloads split at every kind of place."""
    from websockets.asyncio.client import connect as ws_connect

    from mpc.net.auth import client_handshake

    arr = np.random.default_rng(5).integers(0, 1 << 60, 40_000, dtype=np.int64)  # 320 KB: two direct fragments
    chunks = [bytes(c) for c in wire.encode_message("x", {"k": 9}, {"a": arr}, sender="rogue", session="s1",
                                                    chunk_bytes=200_000)]
    key = b"\x9a\x01\xfe\x37"
    stream = b"".join(_frame(0x2 if i == 0 else 0x0, c, i == len(chunks) - 1, key) for i, c in enumerate(chunks))
    cuts = [1, 1, 2, 3, 9, 4, 7, 1, 13, 65536, 2, 11, 100_000, 1, 5]

    async def client(port):
        ws = await ws_connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)
        await client_handshake(ws, Membership("rogue", SECRET, "s1"), "hub", timeout_s=5)
        pos = 0
        for cut in cuts + [len(stream)]:
            ws.transport.write(stream[pos : pos + cut])
            pos += cut
            await asyncio.sleep(0.005)  # separate reads on the server
            if pos >= len(stream):
                break
        reply = wire.decode_message(await ws.recv())
        await ws.close()
        return reply

    reply = _with_echo_server(client)
    assert reply.header == {"k": 9}
    np.testing.assert_array_equal(reply.arrays["a"], arr)
