"""Review of the handshake (mpc.net.auth) as the federation uses it: what a peer that holds no configured key learns.

The hub's session string is the fingerprint of its public key (public: every node and the dealer hold hub.pub).
Anyone who can reach the hub's port could ask, name by name, whether a node is in the federation, if configured and
unconfigured names were answered differently.  They are not: both get a challenge, whose context is a digest of the
run id (not its name), and after any proof the same refusal.
"""

from __future__ import annotations

import asyncio

import msgpack
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from fl.transport import hub_identity, run_token, session_for
from mpc.net import serve
from mpc.net.auth import AUTH_VERSION
from mpc.net.channel import ChannelOptions

from .fl_helpers import private_key, public_key

FAST = ChannelOptions(connect_timeout_s=20, auth_timeout_s=5, close_timeout_s=5)


async def _what_a_stranger_sees(claimed: str) -> list[str]:
    """A client with no configured key claims ``claimed``: every answer the hub gives it."""
    hub = hub_identity(private_key("hub"), {"alpha": public_key("alpha"), "beta": public_key("beta")})
    server = await serve(lambda ch: asyncio.sleep(0), "127.0.0.1", 0, membership=hub,
                         context=run_token("run-2026-study-x"),  # what fl.hub.Hub sends
                         options=FAST)
    seen: list[str] = []
    try:
        port = server.sockets[0].getsockname()[1]
        async with ws_connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            await ws.send(msgpack.packb({"t": "hello", "v": AUTH_VERSION, "id": claimed, "to": "hub",
                                         "session": session_for(public_key("hub")), "nonce": b"\x01" * 32}))
            try:
                challenge = msgpack.unpackb(await ws.recv())
                seen.append(f"challenge (context {challenge['context']!r})")
                await ws.send(msgpack.packb({"t": "proof", "proof": b"\x00" * 64}))
                await ws.recv()
            except ConnectionClosed as exc:
                seen.append(f"closed {exc.rcvd.code} {exc.rcvd.reason}")
    finally:
        server.close()
        await server.wait_closed()
    return seen


def test_a_stranger_cannot_tell_a_configured_node_name_from_any_other():
    member = asyncio.run(_what_a_stranger_sees("alpha"))
    stranger = asyncio.run(_what_a_stranger_sees("no-such-hospital"))
    assert member == stranger, f"a configured name gets {member}, any other name {stranger}"
    assert member[-1] == "closed 1008 not-accepted" and "study" not in member[0]
