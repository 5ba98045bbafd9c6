"""Network benchmarks: loopback throughput against a raw TCP socket, round latency, ReLU over the network.

    python -m pytest benchmarks/bench_net.py --benchmark-only      # pytest-benchmark cases
    python benchmarks/net_table.py                                   # the markdown table

Method.  Throughput: a child process (started with ``spawn``) receives one
array per message and answers with a 1-byte acknowledgement (after one
warm-up transfer of the same size, as first touches of fresh memory are slow
on virtual machines); the time is
from the first byte sent to the acknowledgement, so it covers sending,
receiving, reassembling into a fresh array and the ack's round trip.  The
raw baseline does the same over a plain TCP socket (length prefix,
``sendall`` of a memoryview, ``recv_into`` a fresh ``np.empty`` buffer) with
both children alive and the two measured alternately in one run, so that
load from other processes hits both alike.  Latency: ping-pong of an 8-byte
array through the full MPC transport (``NetworkTransport``), against the
same ping-pong over a raw socket.  ReLU: a 2-party ReLU on 10^6 elements,
timed inside party 0 between two barriers (after a small warm-up ReLU, so
that kernel compilation is not timed), over ``run_processes`` and
``run_local``.
"""

from __future__ import annotations

import multiprocessing
import socket
import statistics
import struct
import time
from typing import Any

import numpy as np
import pytest

from mpc.net.channel import ChannelOptions, Membership
from mpc.net.connection import NetworkTransport

_SECRET = b"benchmark-secret-not-for-use-0123456789"
_SESSION = "bench"
_LEN = struct.Struct("<Q")


# -- raw TCP peer --------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> np.ndarray:
    buf = np.empty(n, dtype=np.uint8)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("raw peer closed")
        got += k
    return buf


def _raw_peer(port_queue: Any) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port_queue.put(server.getsockname()[1])
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size).tobytes())
        if n == 0:
            break
        _recv_exact(conn, n)
        conn.sendall(b"k")
    conn.close()


class RawLink:
    """The sender's end of a plain TCP connection to a spawned receiver."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        self.proc = ctx.Process(target=_raw_peer, args=(q,), daemon=True)
        self.proc.start()
        self.sock = socket.create_connection(("127.0.0.1", q.get(timeout=60)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round(self, arr: np.ndarray) -> float:
        start = time.perf_counter()
        self.sock.sendall(_LEN.pack(arr.nbytes))
        self.sock.sendall(memoryview(arr).cast("B"))
        if self.sock.recv(1) != b"k":
            raise ConnectionError("raw peer did not acknowledge")
        return time.perf_counter() - start

    def close(self) -> None:
        self.sock.sendall(_LEN.pack(0))
        self.sock.close()
        self.proc.join(10)


# -- websocket peer ------------------------------------------------------------------------
def _ws_peer(port_queue: Any, options: ChannelOptions) -> None:
    t = NetworkTransport(1, 2, membership=Membership(1, _SECRET, _SESSION), options=options)
    t.connect({0: ("127.0.0.1", port_queue.get(timeout=60))})
    ack = np.zeros(1, dtype=np.uint8)
    while True:
        a = t.recv(0, 600)
        if a.size == 0:
            break
        t.send(0, ack)
    t.close()


class WsLink:
    """Endpoint 0 of a two-endpoint websocket mesh whose endpoint 1 runs in a spawned process."""

    def __init__(self, options: ChannelOptions = ChannelOptions()) -> None:
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        self.proc = ctx.Process(target=_ws_peer, args=(q, options), daemon=True)
        self.proc.start()
        self.t = NetworkTransport(0, 2, membership=Membership(0, _SECRET, _SESSION), options=options)
        q.put(self.t.listen("127.0.0.1", 0))
        self.t.connect({})

    def round(self, arr: np.ndarray) -> float:
        start = time.perf_counter()
        self.t.send(1, arr)
        self.t.recv(1, 600)
        return time.perf_counter() - start

    def close(self) -> None:
        self.t.send(1, np.zeros(0, dtype=np.uint8))
        self.t.close()
        self.proc.join(10)


def throughput(nbytes: int, repeat: int = 5) -> dict[str, float]:
    """MB/s (10^6 B/s) of raw TCP and of the websocket transport, measured alternately; best and median."""
    arr = np.ones(nbytes, dtype=np.uint8)
    raw, ws = RawLink(), WsLink()
    try:
        raw.round(arr), ws.round(arr)  # warm-up: first touch of fresh memory is slow on VMs
        raw_t, ws_t = [], []
        for _ in range(repeat):
            raw_t.append(raw.round(arr))
            ws_t.append(ws.round(arr))
    finally:
        raw.close()
        ws.close()
    mb = nbytes / 1e6
    return {
        "raw_best": mb / min(raw_t),
        "raw_median": mb / statistics.median(raw_t),
        "ws_best": mb / min(ws_t),
        "ws_median": mb / statistics.median(ws_t),
    }


def latency(repeat: int = 2000) -> dict[str, float]:
    """Median round-trip time in microseconds of an 8-byte message, raw socket and websocket transport."""
    arr = np.zeros(1, dtype=np.int64)
    raw, ws = RawLink(), WsLink()
    try:
        for _ in range(50):
            raw.round(arr), ws.round(arr)
        raw_t = [raw.round(arr) for _ in range(repeat)]
        ws_t = [ws.round(arr) for _ in range(repeat)]
    finally:
        raw.close()
        ws.close()
    return {"raw_us": 1e6 * statistics.median(raw_t), "ws_us": 1e6 * statistics.median(ws_t)}


# -- ReLU over the network -------------------------------------------------------------------
def relu_program(ctx: Any, n: int) -> dict[str, Any]:
    """Share n values, then time x.relu() between barriers (party 0's clock), after a small warm-up ReLU."""
    ctx.share(np.linspace(-1, 1, 1000) if ctx.rank == 0 else None, owner=0).relu()  # JIT compile / cache load
    x = ctx.share(np.linspace(-5, 5, n) if ctx.rank == 0 else None, owner=0)
    ctx.comm.open([np.zeros(1, np.int64)])  # barrier: everyone is here
    before = ctx.stats()
    start = time.perf_counter()
    y = x.relu()
    ctx.comm.open([np.zeros(1, np.int64)])
    elapsed = time.perf_counter() - start
    after = ctx.stats()
    return {
        "seconds": elapsed,
        "rounds": after["rounds"] - before["rounds"] - 1,
        "bytes_sent": after["bytes_sent"] - before["bytes_sent"] - 8,
        "dealer_bytes": after["dealer_bytes"] - before["dealer_bytes"],
        "max": float(y.reveal().max()),
    }


def relu(n: int = 10**6) -> dict[str, Any] | None:
    """ReLU on n elements with 2 parties over the network and in-process; None if ReLU is not available."""
    import mpc

    if not hasattr(mpc.SharedTensor, "relu"):
        return None
    net = mpc.run_processes(relu_program, parties=2, args=(n,))[0]
    local = mpc.run_local(relu_program, parties=2, args=(n,))[0]
    return {"network": net, "local": local}


# -- pytest-benchmark cases --------------------------------------------------------------------
@pytest.fixture(scope="module")
def links():
    raw, ws = RawLink(), WsLink()
    yield raw, ws
    raw.close()
    ws.close()


@pytest.mark.parametrize("megabytes", [100])
@pytest.mark.parametrize("kind", ["raw", "ws"])
def test_throughput(benchmark, links, kind, megabytes):
    link = links[0] if kind == "raw" else links[1]
    arr = np.ones(megabytes * 10**6, dtype=np.uint8)
    benchmark.pedantic(link.round, args=(arr,), rounds=5, warmup_rounds=1)
    benchmark.extra_info["MB/s"] = megabytes / benchmark.stats.stats.min


@pytest.mark.parametrize("kind", ["raw", "ws"])
def test_small_message_round_trip(benchmark, links, kind):
    link = links[0] if kind == "raw" else links[1]
    arr = np.zeros(1, dtype=np.int64)
    benchmark.pedantic(link.round, args=(arr,), rounds=500, warmup_rounds=20)
