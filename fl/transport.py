"""Hub and nodes over :mod:`mpc.net`: authenticated websocket channels carrying :mod:`mpc.net.wire` messages.

The hub dials each node (``ws://host:port``) and both prove they hold the
node's shared secret (:mod:`mpc.net.auth`, mutual HMAC challenge-response):
the hub's identity is ``"hub"``, the node's is its name.  Messages are a
msgpack header plus raw array bytes, large arrays go out as 1 MiB fragments
(keepalive pings pass in between), compression is off and ``max_size`` comes
from ``federation.max_message_mib``.  This module only converts between
:class:`fl.messages.Message` and the wire, and counts bytes.
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable

import msgpack

from mpc.errors import ConfigError
from mpc.net.auth import MIN_SECRET_BYTES
from mpc.net.channel import Channel, ChannelOptions, Membership, serve
from mpc.net.wire import Limits
from mpc.net.wire import Message as WireMessage

from .files import atomic_write
from .messages import Message

__all__ = [
    "FL_SESSION",
    "HUB_ID",
    "DEALER_ID",
    "limits_for",
    "options_for",
    "membership",
    "listen_for_hub",
    "port_file_writer",
    "send",
    "recv",
    "wire_size",
]

#: the session every federation handshake binds to (the secret is per node)
FL_SESSION = "primia-federation/v1"
HUB_ID = "hub"
#: the aggregation dealer's identity (aggregation.masking = 'dealer'; federation.dealer_token is its secret)
DEALER_ID = "dealer"
_PREFIX_BYTES = 12
_ALIGN = 8


def limits_for(max_message_mib: int) -> Limits:
    return Limits(max_message_bytes=max_message_mib << 20)


def options_for(*, connect_timeout_s: float = 60.0) -> ChannelOptions:
    return ChannelOptions(connect_timeout_s=connect_timeout_s)


def membership(local_id: str, token: str, *, what: str) -> Membership:
    """The membership proof for ``local_id`` with a node's shared secret.

    Raises:
        ConfigError: the secret is shorter than :data:`mpc.net.auth.MIN_SECRET_BYTES`.
    """
    secret = token.encode("utf-8")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{what}: the secret has {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
            "(make one with `openssl rand -hex 32`)"
        )
    return Membership(local_id, secret, FL_SESSION)


async def listen_for_hub(handler: Callable[[Channel], Awaitable[None]], host: str, port: int, *, who: str,
                         membership: Membership, limits: Limits, tls: ssl.SSLContext | None) -> tuple[Any, int]:
    """Listen on ``host:port`` for the hub alone (a node or the dealer); returns the server and the bound port.

    Raises:
        ConfigError: the port cannot be used (``who`` names the listener in the message).
    """
    try:
        server = await serve(
            handler, host, port,
            membership=membership,
            accept=lambda peer: None if peer == HUB_ID else f"only the hub ({HUB_ID!r}) may connect",
            label=lambda peer, address: f"hub at {address}",
            limits=limits, options=options_for(), ssl=tls,
        )
    except OSError as exc:
        raise ConfigError(f"{who} cannot listen on {host}:{port}: {exc.strerror or exc}; "
                          "choose another --port (0 picks a free one)") from None
    return server, server.sockets[0].getsockname()[1]


def port_file_writer(port_file: str | os.PathLike | None) -> Callable[[int], None]:
    """``on_ready`` for a server: writes {"port", "pid"} to ``port_file`` atomically (nothing without one)."""
    def ready(bound: int) -> None:
        if port_file is not None:
            atomic_write(Path(port_file), lambda fh: fh.write(json.dumps({"port": bound, "pid": os.getpid()})), mode="w")

    return ready


async def send(channel: Channel, msg: Message) -> int:
    """Send one message; returns the bytes it took on the wire."""
    return await channel.send(msg.kind, msg.header, msg.arrays)


async def recv(channel: Channel) -> tuple[Message, int]:
    """The next message and its size on the wire (arrays are read-only views)."""
    wire = await channel.recv()
    return Message(wire.kind, dict(wire.header), dict(wire.arrays)), wire_size(wire)


def wire_size(wire: WireMessage) -> int:
    """Bytes the sender put on the wire for ``wire`` (the same layout :func:`mpc.net.wire.encode_message` writes)."""
    meta: dict[str, Any] = {
        "kind": wire.kind,
        "sender": wire.sender,
        "session": wire.session,
        "header": wire.header,
        "arrays": [[name, arr.dtype.name, list(arr.shape)] for name, arr in wire.arrays.items()],
    }
    head = _PREFIX_BYTES + len(msgpack.packb(meta, use_bin_type=True))
    body = sum(arr.nbytes + (-arr.nbytes % _ALIGN) for arr in wire.arrays.values())
    return head + (-head % _ALIGN) + body
