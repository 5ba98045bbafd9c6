"""primia's network layer: MPC parties and federation nodes over authenticated websockets.

- :mod:`mpc.net.wire`: the message format (msgpack header + raw little-endian arrays).
- :mod:`mpc.net.auth`: the handshake (the connecting side proves itself first; Ed25519 keys or a shared secret).
- :mod:`mpc.net.channel`: authenticated asyncio channels, ``connect`` and ``serve``.
- :mod:`mpc.net.connection`: the MPC mesh as a synchronous ``Transport``.
- :mod:`mpc.net.config`: the TOML party list.
- :mod:`mpc.net.processes`: :func:`run_processes`, every party in its own process.

See docs/network.md.
"""

from .channel import Channel, ChannelClosed, ChannelOptions, Identity, Membership, connect, serve
from .config import Endpoint, NetworkConfig, TLSConfig, load_config, parse_config
from .connection import EventLoopThread, NetworkTransport
from .processes import RemoteError, run_endpoint, run_processes
from .wire import WIRE_DTYPES, WIRE_VERSION, Limits, Message, StreamDecoder, decode_message, encode_message

__all__ = [
    "run_processes",
    "run_endpoint",
    "RemoteError",
    "NetworkTransport",
    "EventLoopThread",
    "Channel",
    "ChannelClosed",
    "ChannelOptions",
    "Membership",
    "Identity",
    "connect",
    "serve",
    "Endpoint",
    "NetworkConfig",
    "TLSConfig",
    "load_config",
    "parse_config",
    "Limits",
    "Message",
    "StreamDecoder",
    "encode_message",
    "decode_message",
    "WIRE_DTYPES",
    "WIRE_VERSION",
]
