"""The MPC mesh: a :class:`~mpc.comm.Transport` over websockets between OS processes.

Endpoints ``0 .. size-1`` (the computing parties, then the dealer) are fully
connected: endpoint i dials every j < i and accepts every j > i, each
connection authenticated (:mod:`mpc.net.auth`) and optionally TLS.

Threading model.  An asyncio event loop runs in a background thread
(:class:`EventLoopThread`) and owns every socket.  The synchronous
:class:`NetworkTransport` API used by :class:`mpc.comm.Communicator` talks to
it with one thread hop per message:

- ``send(peer, array)`` encodes in the caller's thread (no copy of a
  contiguous array: the wire chunks are memoryviews) and hands the chunks to
  the loop with ``call_soon_threadsafe``; a per-peer writer task sends them in
  order.  ``send`` never waits for the peer to read, so SPMD rounds where
  everyone sends and then receives cannot deadlock.  As with the in-process
  transport, a sent array must not be modified afterwards.
- A per-peer reader task decodes each message in the loop and puts the array
  on a ``queue.SimpleQueue``; ``recv(peer, timeout_s)`` blocks on that queue
  only, so receiving costs no extra loop round-trip.  Large fragments are
  read from the socket straight into the result array (:mod:`mpc.net.framing`),
  or, when they arrive ahead of the reader, copied there by a helper thread
  with the GIL released; a one-frame message is decoded without a copy.

Failures.  A peer that disconnects without a normal close, closes with an
error, stops answering keepalive pings, or sends a malformed frame fails the
whole mesh: every pending and later ``recv`` and ``send`` raises an error
naming that peer (:class:`~mpc.errors.PeerFailure` or
:class:`~mpc.errors.FrameError`), because an MPC computation cannot go on
without any of its parties.  A peer that closes normally (it finished) only
makes further ``recv`` from *that* peer fail.  A local failure calls
:meth:`NetworkTransport.abort`, which tells every peer why (close code 1011).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import ssl as ssl_module
import threading
from typing import Any, Callable, Coroutine, Mapping, TypeVar

import numpy as np

from ..comm import DEFAULT_TIMEOUT_S
from ..errors import ConfigError, FrameError, PeerFailure, PeerTimeout, PrimiaError, ProtocolError
from .channel import Channel, ChannelClosed, ChannelOptions, Membership, connect, serve
from .wire import Limits, encode_message

__all__ = ["EventLoopThread", "NetworkTransport", "MPC_KIND", "endpoint_name"]

log = logging.getLogger("primia.net")

#: message kind of an MPC payload (one array named "x", empty header)
MPC_KIND = "mpc"
T = TypeVar("T")


def endpoint_name(endpoint: int, size: int) -> str:
    """``"party 3"`` or ``"dealer"`` (the last endpoint)."""
    return "dealer" if endpoint == size - 1 else f"party {endpoint}"


class EventLoopThread:
    """An asyncio event loop running in a daemon thread, driven from synchronous code."""

    def __init__(self, name: str = "primia-net"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (cancelled on timeout)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"network operation did not finish within {timeout_s:g} s") from None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread.is_alive():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:  # loop already closed
                pass
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout_s)


class NetworkTransport:
    """One endpoint of the websocket mesh, with the synchronous ``Transport`` API.

    Typical use (what :func:`mpc.net.run_processes` and ``primia party`` do)::

        t = NetworkTransport(rank, size, membership=Membership(rank, secret, session))
        port = t.listen("127.0.0.1", 0)      # before telling peers where we are
        t.connect({0: ("127.0.0.1", 7000), ...})   # all other endpoints
        comm = Communicator(rank, size - 1, t)
        ...
        t.close()                             # or t.abort(reason) on failure

    Args:
        local_id: this endpoint's number.
        size: number of endpoints (computing parties + the dealer).
        membership: our id, the federation secret and the session.
        limits, options: wire limits and channel timing (see those classes).
        server_ssl / client_ssl: TLS contexts (``wss://``) or None for ``ws://``.
        flush_timeout_s: how long :meth:`close` waits for queued sends to go out.
    """

    def __init__(
        self,
        local_id: int,
        size: int,
        *,
        membership: Membership,
        limits: Limits = Limits(),
        options: ChannelOptions = ChannelOptions(),
        server_ssl: ssl_module.SSLContext | None = None,
        client_ssl: ssl_module.SSLContext | None = None,
        flush_timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        if not 0 <= local_id < size:
            raise ValueError(f"endpoint {local_id} is not in 0..{size - 1}")
        if membership.local_id != local_id:
            raise ValueError(f"membership is for {membership.local_id!r}, not endpoint {local_id}")
        self.local_id = local_id
        self.size = size
        self.membership = membership
        self.limits = limits
        self.options = options
        self.flush_timeout_s = flush_timeout_s
        self._server_ssl = server_ssl
        self._client_ssl = client_ssl
        self._inbox: dict[int, queue.SimpleQueue] = {p: queue.SimpleQueue() for p in self.peers}
        self._outbox: dict[int, asyncio.Queue] = {}
        self._queued: dict[int, int] = {}  # messages handed to a writer task and not yet written
        self._channels: dict[int, Channel] = {}
        self._tasks: list[asyncio.Task] = []
        self._all_connected: asyncio.Event | None = None
        self._rejections: list[str] = []
        self._server: Any = None
        self._failure: PrimiaError | None = None
        self._closing = False
        self._closed = False
        self._io = EventLoopThread(f"primia-net-{local_id}")
        # Copies large received fragments into their arrays with the GIL released,
        # while the loop thread goes on reading (see StreamDecoder).
        self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"primia-copy-{local_id}")

    @property
    def peers(self) -> list[int]:
        return [p for p in range(self.size) if p != self.local_id]

    def name(self, endpoint: int) -> str:
        return endpoint_name(endpoint, self.size)

    def __repr__(self) -> str:
        return f"NetworkTransport({self.name(self.local_id)}, {len(self._channels)}/{self.size - 1} peers connected)"

    # -- start-up ------------------------------------------------------------------
    def listen(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start accepting peers on ``host:port`` (0: a free port); returns the port."""
        return self._io.run(self._listen(host, port), self.options.connect_timeout_s)

    async def _listen(self, host: str, port: int) -> int:
        self._all_connected = asyncio.Event()
        try:
            self._server = await serve(
                self._serve_peer,
                host,
                port,
                membership=self.membership,
                accept=self._accept,
                on_reject=self._rejections.append,
                label=lambda peer, address: f"{self.name(peer)} (from {address})",
                limits=self.limits,
                options=self.options,
                ssl=self._server_ssl,
            )
        except OSError as exc:
            raise ConfigError(
                f"{self.name(self.local_id)} cannot listen on {host}:{port}: {exc}; "
                "is another process using the port, or is the address not local?"
            ) from None
        return self._server.sockets[0].getsockname()[1]

    def connect(self, addresses: Mapping[int, tuple[str, int]]) -> None:
        """Dial the lower endpoints and wait for the higher ones, within ``options.connect_timeout_s``.

        ``addresses`` maps endpoint numbers to (host, port); only those this
        endpoint dials (lower numbers) are needed.

        Raises:
            AuthenticationError: a peer failed the membership handshake (or TLS).
            PeerFailure: a peer could not be reached or did not connect in time.
        """
        if self._server is None and self.local_id < self.size - 1:
            raise RuntimeError("call listen() before connect(): higher endpoints dial this one")
        missing = [p for p in range(self.local_id) if p not in addresses]
        if missing:
            raise ConfigError(f"no address for {', '.join(self.name(p) for p in missing)}")
        try:
            limit = self.options.connect_timeout_s + 4 * self.options.auth_timeout_s + 10
            self._io.run(self._connect(addresses), limit)
        except BaseException:
            self.abort("start-up failed")
            raise

    async def _connect(self, addresses: Mapping[int, tuple[str, int]]) -> None:
        if self._all_connected is None:
            self._all_connected = asyncio.Event()
        scheme = "wss" if self._client_ssl is not None else "ws"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.connect_timeout_s

        async def dial(peer: int) -> None:
            host, port = addresses[peer]
            host_part = f"[{host}]" if ":" in host else host
            channel = await connect(
                f"{scheme}://{host_part}:{port}",
                membership=self.membership,
                peer_id=peer,
                peer_label=f"{self.name(peer)} (at {host}:{port})",
                limits=self.limits,
                options=self.options,
                ssl=self._client_ssl,
            )
            self._attach(channel)
            self._tasks.append(asyncio.create_task(self._read_loop(channel)))

        dials = [asyncio.create_task(dial(p)) for p in range(self.local_id)]
        try:
            if dials:
                await asyncio.gather(*dials)
            self._check_complete()
            if not self._all_connected.is_set():
                try:
                    await asyncio.wait_for(self._all_connected.wait(), max(deadline - loop.time(), 0.01))
                except asyncio.TimeoutError:
                    absent = [self.name(p) for p in self.peers if p not in self._channels]
                    rejected = f"; rejected attempts: {'; '.join(self._rejections[-5:])}" if self._rejections else ""
                    raise PeerFailure(
                        ", ".join(absent),
                        f"did not connect within {self.options.connect_timeout_s:g} s{rejected}",
                    ) from None
        finally:
            for task in dials:
                task.cancel()

    def _accept(self, peer_id: Any) -> str | None:
        if not isinstance(peer_id, int) or isinstance(peer_id, bool) or not self.local_id < peer_id < self.size:
            reason = f"id {peer_id!r} is not an endpoint that dials {self.name(self.local_id)}"
        elif peer_id in self._channels:
            reason = f"{self.name(peer_id)} is already connected"
        elif self._closing:
            reason = "shutting down"
        else:
            return None
        return reason

    async def _serve_peer(self, channel: Channel) -> None:
        self._attach(channel)
        await self._read_loop(channel)

    def _attach(self, channel: Channel) -> None:
        peer = channel.peer_id
        if peer in self._channels:
            raise ProtocolError(channel.peer_label, "connected twice")
        self._channels[peer] = channel
        channel.copier = self._copier
        outbox: asyncio.Queue = asyncio.Queue()
        self._outbox[peer] = outbox
        self._queued[peer] = 0
        self._tasks.append(asyncio.create_task(self._write_loop(channel, outbox)))
        self._check_complete()

    def _check_complete(self) -> None:
        if self._all_connected is not None and len(self._channels) == self.size - 1:
            self._all_connected.set()

    # -- the loop side ---------------------------------------------------------------
    async def _write_loop(self, channel: Channel, outbox: asyncio.Queue) -> None:
        while True:
            chunks = await outbox.get()
            try:
                await channel.send_chunks(chunks)
            except ChannelClosed as exc:
                if exc.clean:
                    # It finished normally, so nothing it still needed is lost (SPMD).
                    log.warning("%s: dropped messages to %s, which had closed", self.name(self.local_id),
                                channel.peer_label)
                elif not self._closing:
                    self._fail(exc, channel.peer_id)
                self._queued[channel.peer_id] = 0
                _drain(outbox)
                return
            finally:
                outbox.task_done()
            self._queued[channel.peer_id] -= 1

    def _enqueue(self, peer: int, chunks: list) -> None:
        """Loop side of ``send``: write a small message at once if nothing is ahead of it, else queue it."""
        if len(chunks) == 1 and not self._queued[peer] and self._channels[peer].send_now(chunks[0]):
            return
        self._queued[peer] += 1
        self._outbox[peer].put_nowait(chunks)

    async def _read_loop(self, channel: Channel) -> None:
        inbox = self._inbox[channel.peer_id]
        try:
            while True:
                message = await channel.recv()
                if message.kind != MPC_KIND or message.header or len(message.arrays) != 1:
                    await channel.abort("unexpected message kind")
                    raise FrameError(
                        channel.peer_label,
                        f"expected an MPC array message, got kind {message.kind!r} with {len(message.arrays)} arrays",
                    )
                inbox.put(next(iter(message.arrays.values())))
        except ChannelClosed as exc:
            if self._closing:
                return
            if exc.clean:
                inbox.put(exc)
            else:
                self._fail(exc, channel.peer_id)
        except FrameError as exc:
            self._fail(exc, channel.peer_id)
        except Exception as exc:  # a bug here must still wake the receivers
            log.exception("reader for %s failed", channel.peer_label)
            failure = PeerFailure(channel.peer_label, f"receiving failed: {type(exc).__name__}: {exc}")
            self._fail(failure, channel.peer_id)

    def _fail(self, error: PrimiaError, culprit: int) -> None:
        """Fail the mesh: the culprit's receivers get ``error``, everyone else's a PeerFailure naming it."""
        if self._failure is not None:
            return
        log.error("%s", error)
        self._failure = error
        reason = getattr(error, "reason", str(error))
        peer = getattr(error, "peer", self.name(culprit))
        for p, inbox in self._inbox.items():
            inbox.put(error if p == culprit else PeerFailure(peer, reason))

    # -- Transport API -------------------------------------------------------------
    def send(self, peer: int, payload: np.ndarray) -> None:
        """Queue ``payload`` for ``peer`` and return at once (it must not be modified afterwards)."""
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise PeerFailure(self.name(peer), "this transport is closed")
        if peer not in self._outbox:
            raise ValueError(f"{self.name(peer) if 0 <= peer < self.size else peer} is not a connected peer")
        chunks = encode_message(
            MPC_KIND,
            None,
            {"x": payload},
            sender=self.local_id,
            session=self.membership.session,
            chunk_bytes=self.limits.chunk_bytes,
        )
        self._io.call_soon(self._enqueue, peer, chunks)

    def recv(self, peer: int, timeout_s: float) -> np.ndarray:
        """The next array from ``peer``; raises PeerTimeout after ``timeout_s``, or the mesh's failure."""
        inbox = self._inbox.get(peer)
        if inbox is None:
            raise ValueError(f"{peer} is not a peer of {self.name(self.local_id)}")
        try:
            item = inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise PeerTimeout(self.name(peer), timeout_s) from None
        if isinstance(item, BaseException):
            inbox.put(item)  # every later recv from this peer fails the same way
            raise item.with_traceback(None)
        return item

    def close(self) -> None:
        """Send everything queued, close every connection normally, stop the loop."""
        if self._closed:
            return
        self._closing = True
        try:
            if self._io.alive:
                self._io.run(self._shutdown(None), self.flush_timeout_s + self.options.close_timeout_s + 5)
        except TimeoutError:
            log.warning("%s: closing timed out; aborting the remaining connections", self.name(self.local_id))
        finally:
            self._closed = True
            self._io.stop()
            self._copier.shutdown(wait=False)

    def abort(self, reason: str) -> None:
        """Close every connection at once with code 1011 and ``reason`` (this side failed)."""
        if self._closed:
            return
        self._closing = True
        try:
            if self._io.alive:
                self._io.run(self._shutdown(reason), self.options.close_timeout_s + 5)
        except TimeoutError:
            pass
        finally:
            self._closed = True
            self._io.stop()
            self._copier.shutdown(wait=False)

    async def _shutdown(self, failure: str | None) -> None:
        if failure is None and self._failure is None and self._outbox:
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(q.join() for q in self._outbox.values())), self.flush_timeout_s
                )
            except asyncio.TimeoutError:
                log.warning("%s: queued messages not sent within %g s", self.name(self.local_id), self.flush_timeout_s)
        channels = list(self._channels.values())
        if failure is None:
            await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        else:
            await asyncio.gather(*(c.abort(failure) for c in channels), return_exceptions=True)
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), self.options.close_timeout_s)
            except asyncio.TimeoutError:
                pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _drain(outbox: asyncio.Queue) -> None:
    while True:
        try:
            outbox.get_nowait()
        except asyncio.QueueEmpty:
            return
        outbox.task_done()
