"""Authenticated websocket channels carrying wire messages (asyncio).

A :class:`Channel` is one websocket connection whose peer has passed the
membership handshake (:mod:`mpc.net.auth`).  It sends and receives
:mod:`mpc.net.wire` messages: large arrays go out as fragments of
``limits.chunk_bytes`` (so keepalive pings interleave), come in through a
:class:`~mpc.net.wire.StreamDecoder` that checks the header before accepting
array bytes, and every message is checked to come from the authenticated peer
in this session.  Compression is off: array payloads do not compress and
deflate would cost more CPU than it saves.

:func:`connect` dials with retries and exponential backoff until
``options.connect_timeout_s``; :func:`serve` accepts connections, runs the
handshake and hands each authenticated channel to a handler.  A peer that
fails the handshake, or later sends a malformed frame, is logged and its
connection closed; the server keeps serving its other peers.

Both the MPC mesh (:mod:`mpc.net.connection`) and federation hub/node
messaging use these.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

from ..errors import AuthenticationError, FrameError, PeerFailure
from .auth import MAX_AUTH_BYTES, AcceptPeer, ServerBusy, Credentials, Identity, Membership, client_handshake, server_handshake
from .framing import DirectPayloads, PayloadTarget
from .tls import peer_binding, server_binding
from .wire import Limits, Message, PeerId, StreamDecoder, decode_message, encode_message, message_nbytes

__all__ = [
    "ChannelOptions",
    "Membership",
    "Identity",
    "Credentials",
    "Channel",
    "ChannelClosed",
    "connect",
    "serve",
    "CLOSE_NORMAL",
    "CLOSE_FAILED",
]

log = logging.getLogger("primia.net")

CLOSE_NORMAL = 1000
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_FAILED = 1011
_MAX_REASON_BYTES = 120


@dataclass(frozen=True)
class ChannelOptions:
    """Timing and buffering of a channel.

    Attributes:
        connect_timeout_s: how long :func:`connect` keeps retrying a refused or
            unreachable peer (exponential backoff from 50 ms to 2 s).
        auth_timeout_s: how long each handshake step may take.
        ping_interval_s: keepalive ping period (None: no pings).
        ping_timeout_s: a peer that does not answer a ping within this time is
            declared stalled and the connection closed (None: never).
        close_timeout_s: how long a closing handshake may take.
        write_limit: bytes buffered in user space before a send waits for the
            socket (flow control).
        read_size: bytes read from the socket per call (into one reused buffer).
        buffered_reads: read with ``asyncio.BufferedProtocol``: ordinary reads
            into one reused buffer, and the payloads of large binary frames
            straight into their own buffers (:mod:`mpc.net.framing`); False
            falls back to websockets' default connection classes.
        handshake_deadline_s: a server closes a connection that has not
            authenticated this long after its websocket opened.
        max_unauthenticated: connections a server lets authenticate at once;
            more are closed at once (code 1013, "try again later"), so a flood
            of idle connections cannot starve the members.  Until it has
            authenticated, a connection may send messages of at most
            :data:`PREAUTH_MAX_BYTES` and gets a small read buffer.
    """

    connect_timeout_s: float = 60.0
    auth_timeout_s: float = 10.0
    ping_interval_s: float | None = 20.0
    ping_timeout_s: float | None = 60.0
    close_timeout_s: float = 10.0
    write_limit: int = 1 << 20
    read_size: int = 1 << 20
    buffered_reads: bool = True
    handshake_deadline_s: float = 20.0
    max_unauthenticated: int = 64

    def __post_init__(self) -> None:
        if self.max_unauthenticated < 1:
            raise ValueError("max_unauthenticated must be at least 1")
        if not self.handshake_deadline_s > 0:
            raise ValueError("handshake_deadline_s must be positive")


#: largest websocket message accepted before the peer has authenticated (the handshake's are ~300 B)
PREAUTH_MAX_BYTES = 4 * MAX_AUTH_BYTES
_PREAUTH_READ_BYTES = 16 << 10
CLOSE_TRY_AGAIN = 1013


class ChannelClosed(PeerFailure):
    """The peer's connection ended.  ``clean`` is True when it closed normally (it finished)."""

    def __init__(self, peer: object, reason: str, *, clean: bool):
        self.clean = clean
        super().__init__(peer, reason)


def _truncate_reason(reason: str) -> str:
    raw = reason.encode("utf-8")[:_MAX_REASON_BYTES]
    return raw.decode("utf-8", errors="ignore")


def describe_close(exc: ConnectionClosed, peer: object, ping_timeout_s: float | None = None) -> ChannelClosed:
    """Turn a websockets close into a :class:`ChannelClosed` saying what happened, in words."""
    rcvd, sent = exc.rcvd, exc.sent
    if rcvd is not None and rcvd.code in (1000, 1001):
        return ChannelClosed(peer, "closed the connection", clean=True)
    if rcvd is not None:
        detail = f": {rcvd.reason}" if rcvd.reason else ""
        return ChannelClosed(peer, f"closed the connection with code {rcvd.code}{detail}", clean=False)
    if sent is not None and sent.code == CLOSE_FAILED and "keepalive" in sent.reason:
        wait = f" within {ping_timeout_s:g} s" if ping_timeout_s else ""
        return ChannelClosed(peer, f"stopped answering keepalive pings{wait} (stalled or unreachable)", clean=False)
    if sent is not None and sent.code in (1000, 1001):
        return ChannelClosed(peer, "connection closed by this side", clean=True)
    cause = f" ({exc.__cause__})" if exc.__cause__ else ""
    return ChannelClosed(
        peer, f"connection lost without a close frame{cause}: the process died or the network dropped", clean=False
    )


def _preauth(ws: Any) -> None:
    """Until the peer has authenticated: small messages only, and a small read buffer."""
    protocol = getattr(ws, "protocol", None)
    if protocol is not None and hasattr(protocol, "max_message_size"):
        protocol.max_message_size = protocol.max_fragment_size = PREAUTH_MAX_BYTES
    if isinstance(ws, DirectPayloads):
        ws.read_size = _PREAUTH_READ_BYTES


def _tune(ws: Any, limits: Limits, options: ChannelOptions) -> None:
    """Once the peer has authenticated: the configured message limit and read buffer."""
    protocol = getattr(ws, "protocol", None)
    if protocol is not None and hasattr(protocol, "max_message_size"):
        protocol.max_message_size, protocol.max_fragment_size = limits.websocket_max_size
    if isinstance(ws, DirectPayloads):
        ws.read_size = options.read_size


class _ClientConnection(DirectPayloads, ClientConnection):
    pass


class _ServerConnection(DirectPayloads, ServerConnection):
    pass


class Channel:
    """An authenticated connection to one peer, carrying :class:`~mpc.net.wire.Message` s.

    ``send`` may be called by one coroutine at a time per channel (messages
    are kept in order); ``recv`` likewise.  Both raise :class:`ChannelClosed`
    once the connection is gone; ``recv`` raises :class:`~mpc.errors.FrameError`
    (and closes the connection) when the peer sends a malformed message.
    """

    def __init__(self, ws: Any, membership: Credentials, peer_id: PeerId, peer_label: str, limits: Limits,
                 options: ChannelOptions, copier: Executor | None = None, context: str = ""):
        self.ws = ws
        self.membership = membership
        #: what the server said in its challenge (a federation hub: its run id)
        self.context = context
        self.peer_id = peer_id
        self.peer_label = peer_label
        self.limits = limits
        self.options = options
        #: optional executor that copies large received fragments off the event loop thread
        self.copier = copier

    def __repr__(self) -> str:
        return f"Channel({self.membership.local_id!r} <-> {self.peer_label})"

    @property
    def remote_address(self) -> str:
        addr = getattr(self.ws, "remote_address", None)
        return f"{addr[0]}:{addr[1]}" if addr else "?"

    # -- sending -------------------------------------------------------------------
    def encode(self, kind: str, header: Mapping[str, Any] | None = None,
               arrays: Mapping[str, np.ndarray] | None = None) -> list[bytes | memoryview]:
        """Encode a message from this endpoint (cheap: arrays are not copied if contiguous little-endian)."""
        return encode_message(kind, header, arrays, sender=self.membership.local_id, session=self.membership.session,
                              chunk_bytes=self.limits.chunk_bytes)

    async def send(self, kind: str, header: Mapping[str, Any] | None = None,
                   arrays: Mapping[str, np.ndarray] | None = None) -> int:
        """Send one message; returns its size in bytes.

        Encoding runs in the calling coroutine; it copies nothing for C-contiguous
        little-endian arrays.  Encode other arrays in a worker thread with
        :meth:`encode` and pass the chunks to :meth:`send_chunks`.
        """
        return await self.send_chunks(self.encode(kind, header, arrays))

    def send_now(self, data: bytes) -> bool:
        """Write a one-frame message at once, without a task switch; False if that is not possible now.

        For the loop thread only, and only when no other send on this channel is
        under way (the caller keeps order).  It declines when a fragmented
        message is being sent, the write buffer is above its limit (flow
        control) or the connection is not open; then use :meth:`send_chunks`.
        """
        ws = self.ws
        try:
            if ws.send_in_progress is not None or ws.paused or ws.protocol.state is not State.OPEN:
                return False
            ws.protocol.send_binary(data)
        except AttributeError:  # a websockets version without these internals
            return False
        try:
            ws.send_data()
        except Exception:  # noqa: BLE001 - the connection is broken; its reader reports how
            pass
        return True

    async def send_chunks(self, chunks: list[bytes | memoryview]) -> int:
        """Send an already encoded message (see :meth:`encode`)."""
        try:
            if len(chunks) == 1:
                await self.ws.send(chunks[0])
            else:
                await self.ws.send(chunks)
        except ConnectionClosed as exc:
            raise describe_close(exc, self.peer_label, self.options.ping_timeout_s) from None
        return message_nbytes(chunks)

    # -- receiving -----------------------------------------------------------------
    async def recv(self) -> Message:
        """The next message from the peer, validated against the limits, sender and session."""
        fragments = self.ws.recv_streaming()
        first: Any = None
        decoder: StreamDecoder | None = None

        def start_decoder() -> StreamDecoder:
            nonlocal decoder
            if decoder is None:
                new = StreamDecoder(limits=self.limits, peer=self.peer_label, copier=self.copier)
                new.feed(first)
                decoder = new
            return decoder

        def payload_target(nbytes: int) -> np.ndarray | None:
            # Called by the connection at the header of a large fragment, while we wait for it.
            try:
                return start_decoder().reserve(nbytes)
            except FrameError:
                return None  # raised again below, where the fragment is fed

        try:
            first = await anext(fragments)
            _check_binary(first, self.peer_label)
            self._expect(payload_target)
            second = await anext(fragments, None)
            if second is None:
                message = decode_message(first, limits=self.limits, peer=self.peer_label)
            else:
                start_decoder()
                fragment = second
                while fragment is not None:
                    _check_binary(fragment, self.peer_label)
                    decoder.feed(fragment)
                    self._expect(payload_target)
                    fragment = await anext(fragments, None)
                await decoder.copies_done()
                message = decoder.finish()
        except ConnectionClosed as exc:
            raise describe_close(exc, self.peer_label, self.options.ping_timeout_s) from None
        except FrameError as exc:
            await fragments.aclose()
            log.warning("closing connection to %s: %s", self.peer_label, exc)
            too_big = "exceed" in exc.reason or "oversized" in exc.reason
            code = CLOSE_TOO_BIG if too_big else CLOSE_INVALID_DATA
            await self._close(code, f"malformed frame: {exc.reason}")
            raise
        except UnicodeDecodeError:
            # websockets has already failed the connection (1007).
            raise FrameError(self.peer_label, "text frame with invalid UTF-8") from None
        except Exception as exc:  # any other failure to decode a peer's bytes is still the peer's malformed frame
            await fragments.aclose()
            reason = f"undecodable message ({type(exc).__name__}: {exc})"[:300]
            log.warning("closing connection to %s: %s", self.peer_label, reason)
            await self._close(CLOSE_INVALID_DATA, "malformed frame")
            raise FrameError(self.peer_label, reason) from None
        finally:
            self._expect(None)
        if message.sender != self.peer_id or message.session != self.membership.session:
            reason = (
                f"message claims sender {message.sender!r} in session {message.session!r:.40}, but the connection "
                f"authenticated {self.peer_id!r} in session {self.membership.session!r}"
            )
            log.warning("closing connection to %s: %s", self.peer_label, reason)
            await self._close(CLOSE_POLICY, "sender or session mismatch")
            raise FrameError(self.peer_label, reason)
        return message

    def _expect(self, target: PayloadTarget | None) -> None:
        """Let the connection write the next large fragment in place (only with every earlier one fed)."""
        if isinstance(self.ws, DirectPayloads):
            self.ws.payload_target = target

    # -- closing -------------------------------------------------------------------
    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code, _truncate_reason(reason))
        except Exception:  # the connection is already gone: that was the goal
            pass

    async def close(self, reason: str = "done") -> None:
        """Close normally (code 1000), after everything sent so far has been written."""
        await self._close(CLOSE_NORMAL, reason)

    async def abort(self, reason: str) -> None:
        """Close with code 1011 and ``reason``, telling the peer that this side failed."""
        await self._close(CLOSE_FAILED, reason)

    async def wait_closed(self) -> None:
        await self.ws.wait_closed()


def _check_binary(fragment: Any, peer: object) -> None:
    if isinstance(fragment, str):
        raise FrameError(peer, "text frame where a binary message was expected")


def _ws_kwargs(limits: Limits, options: ChannelOptions) -> dict[str, Any]:
    return dict(
        compression=None,
        max_size=limits.websocket_max_size,
        ping_interval=options.ping_interval_s,
        ping_timeout=options.ping_timeout_s,
        close_timeout=options.close_timeout_s,
        write_limit=options.write_limit,
        open_timeout=options.auth_timeout_s,
    )


async def connect(
    uri: str,
    *,
    membership: Credentials,
    peer_id: PeerId,
    peer_label: str | None = None,
    limits: Limits = Limits(),
    options: ChannelOptions = ChannelOptions(),
    ssl: ssl_module.SSLContext | None = None,
) -> Channel:
    """Dial ``uri`` (``ws://host:port`` or ``wss://...``), retrying, and authenticate to ``peer_id``.

    Connection failures (refused, unreachable, handshake timeouts) are retried
    with exponential backoff until ``options.connect_timeout_s``; TLS and
    authentication failures are not retried.

    Raises:
        PeerFailure: the peer could not be reached in time.
        AuthenticationError: TLS or the authentication handshake failed.
    """
    label = peer_label or f"{peer_id} at {uri}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + options.connect_timeout_s
    delay, attempts = 0.05, 0
    while True:
        attempts += 1
        try:
            ws = await ws_connect(uri, ssl=ssl, proxy=None, user_agent_header=None,
                                  create_connection=_ClientConnection if options.buffered_reads else None,
                                  **_ws_kwargs(limits, options))
            _preauth(ws)
            context = await client_handshake(ws, membership, peer_id, binding=peer_binding(ws),
                                             timeout_s=options.auth_timeout_s, peer=label)
            break
        except ssl_module.SSLError as exc:
            raise AuthenticationError(f"TLS handshake with {label} failed: {exc}") from None
        except InvalidURI as exc:
            raise PeerFailure(label, f"invalid address {uri!r}: {exc}") from None
        except (OSError, asyncio.TimeoutError, InvalidHandshake, ServerBusy) as exc:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PeerFailure(
                    label, f"unreachable after {attempts} attempts in {options.connect_timeout_s:g} s: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            log.debug("connecting to %s failed (%s); retrying in %.2f s", label, exc, delay)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)
    _tune(ws, limits, options)
    return Channel(ws, membership, peer_id, label, limits, options, context=context)


Handler = Callable[[Channel], Awaitable[None]]


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    membership: Credentials,
    accept: AcceptPeer = lambda peer_id: None,
    label: Callable[[PeerId, str], str] = lambda peer_id, address: f"{peer_id} at {address}",
    on_reject: Callable[[str], None] | None = None,
    context: str = "",
    limits: Limits = Limits(),
    options: ChannelOptions = ChannelOptions(),
    ssl: ssl_module.SSLContext | None = None,
) -> Server:
    """Listen on ``host:port`` (0: any free port); run ``handler(channel)`` for each authenticated peer.

    ``accept(peer_id)`` returns None to admit a peer that proved itself, or a
    reason to refuse it; ``on_reject(reason)`` hears about every connection that
    failed to authenticate.  ``context`` goes to every client in the challenge.
    At most ``options.max_unauthenticated`` connections authenticate at once,
    each within ``options.handshake_deadline_s``; the rest are shed.
    A connection is closed when its handler returns; a handler that raises
    has its connection aborted (code 1011) and the error logged, and the server
    goes on serving everyone else.  Use ``server.close(); await
    server.wait_closed()`` (or ``async with``) to stop.
    """
    binding = server_binding(ssl)
    authenticating = 0

    async def on_connection(ws: Any) -> None:
        nonlocal authenticating
        address = "{}:{}".format(*ws.remote_address[:2]) if ws.remote_address else "?"
        if authenticating >= options.max_unauthenticated:
            log.warning("shed a connection from %s: %d connections are already authenticating", address,
                        authenticating)
            await _close_quietly(ws, CLOSE_TRY_AGAIN, "busy")
            return
        authenticating += 1
        try:
            _preauth(ws)
            async with asyncio.timeout(options.handshake_deadline_s):
                peer_id = await server_handshake(ws, membership, accept=accept, context=context, binding=binding,
                                                 timeout_s=options.auth_timeout_s, peer=address)
        except AuthenticationError as exc:
            if on_reject is not None:
                on_reject(str(exc))
            return  # logged and closed by the handshake
        except TimeoutError:
            log.warning("closed a connection from %s: not authenticated within %g s", address,
                        options.handshake_deadline_s)
            if on_reject is not None:
                on_reject(f"{address}: not authenticated within {options.handshake_deadline_s:g} s")
            await _close_quietly(ws, CLOSE_POLICY, "timeout")
            return
        finally:
            authenticating -= 1
        _tune(ws, limits, options)
        channel = Channel(ws, membership, peer_id, label(peer_id, address), limits, options, context=context)
        try:
            await handler(channel)
        except (FrameError, ChannelClosed) as exc:
            log.info("connection to %s ended: %s", channel.peer_label, exc)
        except Exception as exc:  # a handler bug must not take the server down
            log.exception("handler for %s failed", channel.peer_label)
            await channel.abort(f"{type(exc).__name__}: {exc}")
        else:
            await channel.close()

    return await ws_serve(
        on_connection, host, port, ssl=ssl, server_header=None,
        create_connection=_ServerConnection if options.buffered_reads else None,
        **_ws_kwargs(limits, options)
    )


async def _close_quietly(ws: Any, code: int, reason: str) -> None:
    try:
        await ws.close(code, reason)
    except Exception:  # already gone
        pass
