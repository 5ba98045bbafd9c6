"""Hub, nodes and dealer over :mod:`mpc.net`: who dials whom, who proves what, and the wire.

The hub listens (``federation.listen``); nodes and the dealer dial it
(``ws://`` or ``wss://``), so no hospital opens an inbound port.  Every
connection is authenticated both ways with long-term Ed25519 keys
(:class:`mpc.net.auth.Identity`): the connecting side proves itself first, the
hub answers only members listed in its config, and a node or dealer talks only
to the hub whose key it pinned.  The handshake binds the federation (the hub's
key), the run (the hub's run id), both names, fresh nonces and, on ``wss://``,
the hub's TLS certificate.

TLS is required whenever an end is off loopback, unless the config (or a
``--allow-plaintext`` flag) says otherwise; then every start logs a warning.
Messages are a msgpack header plus raw array bytes (:mod:`mpc.net.wire`),
large arrays in 1 MiB fragments with keepalive pings in between.  This module
only converts between :class:`fl.messages.Message` and the wire, and counts
bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mpc.errors import ConfigError, PeerFailure
from mpc.net.auth import Identity, fingerprint
from mpc.net.channel import Channel, ChannelOptions, connect
from mpc.net.tls import client_context
from mpc.net.wire import Limits

from .config import is_loopback
from .files import atomic_write
from .messages import Message

__all__ = [
    "HUB_ID",
    "DEALER_ID",
    "session_for",
    "run_token",
    "hub_identity",
    "member_identity",
    "limits_for",
    "options_for",
    "hub_uri",
    "client_tls",
    "Backoff",
    "stay_connected",
    "port_file_writer",
    "send",
    "recv",
]

log = logging.getLogger("primia.transport")

HUB_ID = "hub"
#: the aggregation dealer's identity (aggregation.masking = 'dealer')
DEALER_ID = "dealer"


def run_token(run_id: str) -> str:
    """What the hub's handshake says of its run: a digest, so that the run's name reaches only authenticated
    peers (who then check that the run id the hub names hashes to the token they signed)."""
    return hashlib.sha256(b"primia-run\x00" + run_id.encode()).hexdigest()[:32]


def session_for(hub_key: Ed25519PublicKey) -> str:
    """The session every handshake of a federation binds to: its hub's key."""
    return "primia-federation/v2:" + fingerprint(hub_key).hex()


def hub_identity(private_key: Ed25519PrivateKey, members: Mapping[str, Ed25519PublicKey]) -> Identity:
    """The hub's identity: it accepts exactly ``members`` (nodes by name, and the dealer)."""
    return Identity(HUB_ID, private_key, session_for(private_key.public_key()), dict(members))


def member_identity(name: str, private_key: Ed25519PrivateKey, hub_key: Ed25519PublicKey) -> Identity:
    """A node's or the dealer's identity: it talks to the hub whose key it pinned, and to nothing else."""
    return Identity(name, private_key, session_for(hub_key), {HUB_ID: hub_key})


def limits_for(max_message_mib: int) -> Limits:
    return Limits(max_message_bytes=max_message_mib << 20)


def options_for(*, connect_timeout_s: float = 60.0, handshake_timeout_s: float = 20.0,
                max_unauthenticated: int = 64) -> ChannelOptions:
    return ChannelOptions(connect_timeout_s=connect_timeout_s, handshake_deadline_s=handshake_timeout_s,
                          max_unauthenticated=max_unauthenticated)


def hub_uri(value: Any, *, allow_plaintext: bool, option: str = "--hub") -> str:
    """A checked hub address: ``ws://HOST:PORT`` (loopback, or with ``allow_plaintext``) or ``wss://HOST:PORT``.

    Raises:
        ConfigError: not such an address, a bad port, or plaintext to another machine without ``allow_plaintext``.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{option}: give the hub's address, e.g. wss://hub.example.org:8780")
    url = urlparse(value)
    try:
        port = url.port
    except ValueError:
        raise ConfigError(f"{option}: {value!r:.80} has a port outside 0..65535") from None
    if url.scheme not in ("ws", "wss") or not url.hostname or port is None or port == 0:
        raise ConfigError(f"{option}: {value!r:.80} must look like wss://HOST:PORT (or ws://127.0.0.1:PORT on "
                          "this machine)")
    if url.scheme == "ws" and not is_loopback(url.hostname):
        if not allow_plaintext:
            raise ConfigError(
                f"{option}: {value} is another machine, so the connection needs TLS: use wss://{url.hostname}:{port} "
                "(and --tls-ca if the hub's certificate is from your own CA); pass --allow-plaintext only on a "
                "network you trust"
            )
        log.warning("connecting to %s without TLS (--allow-plaintext): anyone on the path can read and alter the "
                    "messages", value)
    return value


def client_tls(uri: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context for dialing ``uri``: None for ``ws://``; for ``wss://`` one trusting ``ca_file``
    (or the system's certificate authorities)."""
    if not uri.startswith("wss://"):
        if ca_file:
            log.warning("--tls-ca is ignored: %s is not a wss:// address", uri)
        return None
    if ca_file:
        return client_context(ca_file)
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)


class Backoff:
    """Delays between attempts: ``first`` doubling up to ``cap`` seconds; :meth:`reset` after a success."""

    def __init__(self, first: float = 0.5, cap: float = 30.0):
        self.first, self.cap = first, cap
        self.delay = first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first


async def stay_connected(hub: str, identity: Identity, serve: Callable[[Channel], Awaitable[str | None]], *,
                         tls: ssl.SSLContext | None, limits: Limits, backoff: Backoff, once: bool) -> str:
    """Dial the hub, serve the connection, and dial again after it ends — while the hub is down, after a fault,
    and (unless ``once``) after a run ends — backing off between attempts; returns why the run ended.

    ``serve(channel)`` returns why the run ended (the hub said goodbye or failed it), or None when the
    connection was lost.

    Raises:
        AuthenticationError: the hub is not the pinned one, or refused this side (a configuration to fix, not a
            fault to wait out).
    """
    while True:
        try:
            channel = await connect(hub, membership=identity, peer_id=HUB_ID, peer_label=f"the hub at {hub}",
                                    limits=limits, options=options_for(connect_timeout_s=backoff.cap), ssl=tls)
        except PeerFailure as exc:
            delay = backoff.next()
            log.info("the hub is not reachable (%s); trying again in %.1f s", exc.reason, delay)
            await asyncio.sleep(delay)
            continue
        backoff.reset()
        log.info("connected to the hub (run token %s)", channel.context or "?")
        ended = await serve(channel)
        if ended is not None and once:
            return ended
        delay = backoff.next()
        log.info("dialing the hub again in %.1f s", delay)
        await asyncio.sleep(delay)


def port_file_writer(port_file: str | os.PathLike | None) -> Callable[[int], None]:
    """``on_ready`` for a server: writes the bound port, in decimal and nothing else, to ``port_file`` atomically
    (nothing without one), so that ``int(path.read_text())`` reads it."""
    def ready(bound: int) -> None:
        if port_file is not None:
            atomic_write(Path(port_file), lambda fh: fh.write(f"{bound}\n"), mode="w")

    return ready


async def send(channel: Channel, msg: Message) -> int:
    """Send one message; returns the bytes it took on the wire."""
    return await channel.send(msg.kind, msg.header, msg.arrays)


async def recv(channel: Channel) -> tuple[Message, int]:
    """The next message and its size on the wire (arrays are read-only views)."""
    wire = await channel.recv()
    return Message(wire.kind, dict(wire.header), dict(wire.arrays)), wire.nbytes
