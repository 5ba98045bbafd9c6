"""Long-lived MPC endpoints: a fresh mesh for every session, opened through a front door.

The inference service has a data owner (endpoint 0, a client that runs one
session per command), a model server (1) and a dealer (2), both long-lived.
Each long-lived endpoint listens on its party-list address: its *front door*,
an authenticated channel (:func:`mpc.net.channel.serve`, membership of the party
list's session) that only sets sessions up.  No seed, share or weight crosses it.

Opening a session (front-door messages; kinds are the constants below)::

    data owner                      model server                    dealer
    draws S (128 random bits),
    listens for session S
    SESSION_OPEN {session: S,  -->  checks it and its capacity,
      owner: [host, port],          listens for S on a free port
      header: {...}}                SESSION_JOIN {session: S,  -->  checks it and its capacity
                                      owner, server: [host, port]}
                                                               <--  SESSION_ACCEPTED, then dials
                               <--  SESSION_ACCEPTED, then dials      both for session S
                                      the data owner
    (or SESSION_REFUSED {reason} from either, passed on to the data owner)

The three then run the session over their own mesh
(:class:`~mpc.net.connection.NetworkTransport`, membership session
``"<party-list session>/S"``): a fresh dealer seed per party, fresh pairwise
seeds, and so fresh masks for everything, weights included.  The mesh is the
same as ``primia party``'s: endpoint i dials every j < i.

Each session runs in its own thread with its own transport.  Whatever ends it
(a peer that vanishes or sends garbage, a different plan, a bug) ends that
session only: its transport is aborted, its slot freed, the error logged.

Limits (:class:`SessionLimits`): at most ``max_sessions`` sessions at once (more
are refused, naming the limit); each front-door request must arrive within the
handshake timeout (``[timeouts] auth_s``); a session's mesh must form within
``[timeouts] connect_s``; every message of a session within ``[timeouts]
recv_s``; a whole session within ``max_session_s`` (then it is aborted).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..errors import ConfigError, PrimiaError, ProtocolError
from .channel import Channel, connect, serve
from .config import NetworkConfig, check_host, check_port
from .connection import EventLoopThread, NetworkTransport
from .processes import run_endpoint
from .wire import Message

__all__ = [
    "SESSION_OPEN",
    "SESSION_JOIN",
    "SESSION_ACCEPTED",
    "SESSION_REFUSED",
    "SessionLimits",
    "SessionRefused",
    "SessionHost",
    "new_session_id",
    "session_transport",
    "run_session",
    "parse_address",
    "front_door_request",
    "serve_dealer_sessions",
]

log = logging.getLogger("primia.sessions")

SESSION_OPEN = "session-open"
SESSION_JOIN = "session-join"
SESSION_ACCEPTED = "session-accepted"
SESSION_REFUSED = "session-refused"
_SESSION_ID = re.compile(r"[0-9a-f]{32}")
_MAX_REASON = 500


@dataclass(frozen=True)
class SessionLimits:
    """How much a long-lived endpoint takes on.

    Attributes:
        max_sessions: sessions running at once; one more is refused, naming this limit.
        max_session_s: a session still running after this long is aborted.
    """

    max_sessions: int = 4
    max_session_s: float = 3600.0

    def __post_init__(self) -> None:
        if isinstance(self.max_sessions, bool) or not isinstance(self.max_sessions, int) or not 1 <= self.max_sessions <= 1024:
            raise ConfigError(f"max_sessions must be an integer in 1..1024, got {self.max_sessions!r}")
        if not isinstance(self.max_session_s, (int, float)) or not self.max_session_s > 0:
            raise ConfigError(f"max_session_s must be a positive number of seconds, got {self.max_session_s!r}")


class SessionRefused(PrimiaError):
    """A long-lived endpoint refused to open a session (``reason`` says why)."""

    def __init__(self, who: str, reason: str):
        self.who = who
        self.reason = reason
        super().__init__(f"{who} refused the session: {reason}")


def new_session_id() -> str:
    """128 random bits, hex: names one session's mesh."""
    return secrets.token_hex(16)


def session_transport(config: NetworkConfig, endpoint_id: int, session_id: str) -> NetworkTransport:
    """This endpoint's transport for one session's mesh (its membership names the session)."""
    if not _SESSION_ID.fullmatch(session_id):
        raise ProtocolError("peer", f"session id {session_id!r:.60} is not 32 lowercase hex digits")
    membership = config.membership(endpoint_id)
    return NetworkTransport(
        endpoint_id,
        len(config.endpoints),
        membership=type(membership)(endpoint_id, membership.secret, f"{config.session}/{session_id}"),
        limits=config.limits,
        options=config.options,
        server_ssl=config.server_ssl(endpoint_id),
        client_ssl=config.client_ssl(endpoint_id),
        flush_timeout_s=config.recv_timeout_s,
    )


def run_session(config: NetworkConfig, transport: NetworkTransport, endpoint_id: int,
                program: Callable[..., Any] | None, args: tuple = ()) -> Any:
    """Run this endpoint's part of a session over a connected transport, then close it (abort on failure)."""
    try:
        result = run_endpoint(transport, endpoint_id, config.parties, program, args, frac_bits=config.frac_bits,
                              truncation=config.truncation, timeout_s=config.recv_timeout_s, **config.comparison)
    except BaseException as exc:
        transport.abort(f"{type(exc).__name__}: {exc}")
        raise
    transport.close()
    return result


def parse_address(value: Any, where: str) -> tuple[str, int]:
    """A peer-supplied ``[host, port]``, checked as the party list's addresses are."""
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError(f"{where} must be [host, port], got {value!r:.80}")
    return check_host(value[0], f"{where} host"), check_port(value[1], f"{where} port")


def _uri(config: NetworkConfig, endpoint_id: int) -> str:
    endpoint = config.endpoint(endpoint_id)
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{'wss' if config.tls else 'ws'}://{host}:{endpoint.port}"


async def front_door_request(config: NetworkConfig, local_id: int, door_id: int, kind: str,
                             header: dict[str, Any], *, label: str) -> Message:
    """Dial endpoint ``door_id``'s front door, send one request and return its answer.

    Raises:
        SessionRefused: the answer is a refusal.
        PeerFailure, AuthenticationError: it could not be reached or authenticated.
        ProtocolError: the answer is neither an acceptance nor a refusal.
    """
    channel = await connect(_uri(config, door_id), membership=config.membership(local_id), peer_id=door_id,
                            peer_label=label, limits=config.limits, options=config.options,
                            ssl=config.client_ssl(local_id))
    try:
        await channel.send(kind, header)
        # Setting a session up may take the door a dial of its own (the model server dials the dealer).
        reply = await asyncio.wait_for(channel.recv(), config.options.connect_timeout_s + 4 * config.options.auth_timeout_s)
    except asyncio.TimeoutError:
        raise ProtocolError(label, "did not answer the session request in time") from None
    finally:
        await channel.close()
    if reply.kind == SESSION_REFUSED:
        raise SessionRefused(label, str(reply.header.get("reason", "no reason given"))[:_MAX_REASON])
    if reply.kind != SESSION_ACCEPTED:
        raise ProtocolError(label, f"answered a session request with {reply.kind!r}")
    return reply


Handler = Callable[[Channel, Message], Awaitable[None]]


class SessionHost:
    """A long-lived endpoint: its front door, its running sessions, their limits.

    ``on_request(channel, message)`` (a coroutine, on the front door's event
    loop) handles one request of kind ``request_kind`` from endpoint
    ``accept_from``: it calls :meth:`reserve`, answers with :meth:`accept` or
    :meth:`refuse`, and starts the session with :meth:`launch`.
    """

    def __init__(self, config: NetworkConfig, endpoint_id: int, *, accept_from: int, request_kind: str,
                 on_request: Handler, limits: SessionLimits = SessionLimits()):
        self.config = config
        self.endpoint_id = endpoint_id
        self.accept_from = accept_from
        self.request_kind = request_kind
        self.on_request = on_request
        self.limits = limits
        self.name = {1: "model server", 2: "dealer"}.get(endpoint_id, f"endpoint {endpoint_id}")
        self._lock = threading.Lock()
        self._active: dict[str, NetworkTransport | None] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stopped = threading.Event()
        self.completed = 0
        self.failed = 0
        self._io: EventLoopThread | None = None
        self._server: Any = None

    # -- the front door ----------------------------------------------------------------------
    def start(self) -> int:
        """Listen on the party list's address for this endpoint; returns the port."""
        me = self.config.endpoint(self.endpoint_id)
        self._io = EventLoopThread(f"primia-{self.name.replace(' ', '-')}-door")
        self._server = self._io.run(self._listen(me.listen_host, me.port), self.config.options.connect_timeout_s)
        return self._server.sockets[0].getsockname()[1]

    async def _listen(self, host: str, port: int) -> Any:
        def accept(peer_id: Any) -> str | None:
            if peer_id != self.accept_from:
                return f"the {self.name} takes session requests from endpoint {self.accept_from} only"
            return "shutting down" if self._stopped.is_set() else None

        try:
            return await serve(self._handle, host, port, membership=self.config.membership(self.endpoint_id),
                               accept=accept, limits=self.config.limits, options=self.config.options,
                               ssl=self.config.server_ssl(self.endpoint_id),
                               label=lambda peer, address: f"endpoint {peer} (from {address})")
        except OSError as exc:
            raise ConfigError(f"the {self.name} cannot listen on {host}:{port}: {exc}; is another process using "
                              "the port, or is the address not local?") from None

    async def _handle(self, channel: Channel) -> None:
        try:
            message = await asyncio.wait_for(channel.recv(), self.config.options.auth_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s: %s sent no session request within %g s; closing", self.name, channel.peer_label,
                        self.config.options.auth_timeout_s)
            return
        if message.kind != self.request_kind:
            await self.refuse(channel, f"expected a {self.request_kind!r} request, got {message.kind!r:.40}")
            return
        await self.on_request(channel, message)

    @staticmethod
    async def accept(channel: Channel, header: dict[str, Any] | None = None) -> None:
        await channel.send(SESSION_ACCEPTED, header or {})

    async def refuse(self, channel: Channel, reason: str) -> None:
        log.warning("%s: refused a session request from %s: %s", self.name, channel.peer_label, reason)
        await channel.send(SESSION_REFUSED, {"reason": reason[:_MAX_REASON]})

    # -- sessions -------------------------------------------------------------------------------
    def reserve(self, session_id: Any) -> str | None:
        """Take a slot for ``session_id``; returns why not (the request is then refused)."""
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            return f"session id {session_id!r:.60} is not 32 lowercase hex digits"
        with self._lock:
            if self._stopped.is_set():
                return f"the {self.name} is shutting down"
            if session_id in self._active:
                return f"session {session_id} is already open"
            if len(self._active) >= self.limits.max_sessions:
                return (f"the {self.name} is busy: {len(self._active)} sessions are running, its limit "
                        f"(max_sessions = {self.limits.max_sessions}); try again later")
            self._active[session_id] = None
        return None

    def release(self, session_id: str) -> None:
        with self._lock:
            self._active.pop(session_id, None)
            self._threads.pop(session_id, None)

    def launch(self, session_id: str, transport: NetworkTransport, body: Callable[[], Any]) -> None:
        """Run ``body()`` (this endpoint's part of the session) in its own thread, then free the slot."""
        with self._lock:
            self._active[session_id] = transport
        thread = threading.Thread(target=self._run, args=(session_id, transport, body),
                                  name=f"primia-session-{session_id[:8]}", daemon=True)
        with self._lock:
            self._threads[session_id] = thread
        thread.start()

    def _run(self, session_id: str, transport: NetworkTransport, body: Callable[[], Any]) -> None:
        short = session_id[:8]
        start = time.monotonic()
        deadline = threading.Timer(self.limits.max_session_s, transport.abort,
                                   args=(f"session exceeded max_session_s = {self.limits.max_session_s:g} s",))
        deadline.daemon = True
        deadline.start()
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - one session's failure never ends the service
            transport.abort(f"{type(exc).__name__}: {exc}")
            log.error("%s: session %s failed after %.1f s: %s: %s", self.name, short, time.monotonic() - start,
                      type(exc).__name__, exc)
            outcome = "failed"
        else:
            log.info("%s: session %s finished in %.1f s", self.name, short, time.monotonic() - start)
            outcome = "completed"
        finally:
            deadline.cancel()
            self.release(session_id)
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._active)

    # -- running until stopped -------------------------------------------------------------------
    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until :meth:`stop` (True) or ``timeout_s`` (False)."""
        return self._stopped.wait(timeout_s)

    def stop(self, reason: str = "the service is stopping") -> None:
        """Close the front door, abort the running sessions and wait briefly for their threads."""
        self._stopped.set()
        if self._io is not None and self._server is not None:
            async def close() -> None:
                self._server.close()
                await self._server.wait_closed()

            try:
                self._io.run(close(), self.config.options.close_timeout_s + 5)
            except (TimeoutError, RuntimeError):
                pass
        with self._lock:
            running = [(t, self._threads.get(s)) for s, t in self._active.items()]
        for transport, _ in running:
            if transport is not None:
                transport.abort(reason)
        for _, thread in running:
            if thread is not None:
                thread.join(self.config.options.close_timeout_s + 5)
        if self._io is not None:
            self._io.stop()


# -- the long-lived dealer --------------------------------------------------------------------------
def serve_dealer_sessions(config: NetworkConfig, limits: SessionLimits = SessionLimits()) -> SessionHost:
    """Start the dealer (the last endpoint) as a long-lived service; returns its host (call ``stop`` to end).

    It takes :data:`SESSION_JOIN` requests from the model server (endpoint 1)
    and, for each, joins the session's mesh and serves its material
    (:func:`mpc.dealer.serve_dealer`) with fresh seeds.
    """
    dealer = config.dealer_id

    async def on_join(channel: Channel, message: Message) -> None:
        header = message.header
        session_id = header.get("session")
        try:
            owner = parse_address(header.get("owner"), "owner")
            server = parse_address(header.get("server"), "server")
        except ConfigError as exc:
            await host.refuse(channel, str(exc))
            return
        reason = host.reserve(session_id)
        if reason is not None:
            await host.refuse(channel, reason)
            return
        transport = None
        try:
            transport = session_transport(config, dealer, session_id)
            await host.accept(channel)
        except BaseException:
            host.release(session_id)
            if transport is not None:
                transport.abort("session set-up failed")
            raise

        def body() -> None:
            transport.connect({0: owner, 1: server})
            run_session(config, transport, dealer, None)

        host.launch(session_id, transport, body)

    host = SessionHost(config, dealer, accept_from=1, request_kind=SESSION_JOIN, on_request=on_join, limits=limits)
    host.start()
    return host
