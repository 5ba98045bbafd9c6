"""Membership proof: mutual HMAC-SHA256 challenge-response over a federation secret.

Runs on a freshly opened websocket, before any data message, in four small
msgpack messages (each at most :data:`MAX_AUTH_BYTES`)::

    client -> server  hello     {t, v, id: client id, to: server id it wants,
                                 session, nonce: 32 random bytes}
    server -> client  challenge {t, id: server id, nonce: 32 random bytes,
                                 proof: HMAC(K, "server" || transcript)}
    client -> server  proof     {t, proof: HMAC(K, "client" || transcript)}
    server -> client  welcome   {t}

where K = HMAC-SHA256(secret, "primia-auth-v1") and transcript is the msgpack
of [session, client id, server id, client nonce, server nonce].  Each side
proves it holds the secret for *this* session, these two identities and these
fresh nonces, so a recorded handshake cannot be replayed and the secret never
crosses the wire.  The server answers only after checking the session, that
the client dialled the right endpoint, and that it accepts the client's id
(known, not already connected).

Any failure closes the connection with code 1008 (policy violation), is logged
with the remote address, and raises :class:`mpc.errors.AuthenticationError`.

What this does not do: encrypt or integrity-protect the data that follows.
On a network you do not control, run over TLS (``wss://``, see
docs/network.md) so that the authenticated connection cannot be hijacked.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from typing import Any, Callable

import msgpack

from ..errors import AuthenticationError
from .wire import PeerId

__all__ = ["AUTH_VERSION", "MAX_AUTH_BYTES", "MIN_SECRET_BYTES", "derive_key", "client_handshake", "server_handshake"]

log = logging.getLogger("primia.net.auth")

AUTH_VERSION = 1
MAX_AUTH_BYTES = 1024
MIN_SECRET_BYTES = 16
_NONCE_BYTES = 32
_POLICY_VIOLATION = 1008

#: ``accept(client_id)`` returns None to accept, or the reason for refusing.
AcceptPeer = Callable[[PeerId], "str | None"]


def derive_key(secret: bytes) -> bytes:
    """The HMAC key used in handshakes (domain-separated from any other use of the secret)."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
        raise AuthenticationError(
            f"the federation secret must be at least {MIN_SECRET_BYTES} bytes; make one with `openssl rand -hex 32`"
        )
    return hmac.new(bytes(secret), b"primia-auth-v1", hashlib.sha256).digest()


def _proof(key: bytes, role: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, role + b"\x00" + transcript, hashlib.sha256).digest()


def _transcript(session: str, client: PeerId, server: PeerId, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return msgpack.packb([session, client, server, client_nonce, server_nonce], use_bin_type=True)


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and 0 < len(value) <= 128)


async def _recv_small(ws: Any, timeout_s: float, what: str, peer: str) -> dict[str, Any]:
    """One handshake message, refusing anything larger than MAX_AUTH_BYTES before buffering more."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for fragment in ws.recv_streaming(decode=False):
                size += len(fragment)
                if size > MAX_AUTH_BYTES:
                    raise AuthenticationError(f"{peer} sent an oversized {what} ({size}+ bytes)")
                chunks.append(bytes(fragment))
    except TimeoutError:
        raise AuthenticationError(f"{peer} sent no {what} within {timeout_s:g} s") from None
    except AuthenticationError:
        raise
    except Exception as exc:  # connection closed or protocol error during the handshake
        rcvd = getattr(exc, "rcvd", None)
        if rcvd is not None and rcvd.code == _POLICY_VIOLATION:
            raise AuthenticationError(
                f"{peer} refused our membership proof: the federation secrets or sessions differ"
            ) from None
        raise AuthenticationError(
            f"{peer} closed the connection during authentication ({type(exc).__name__}: {exc})"
        ) from None
    try:
        msg = msgpack.unpackb(b"".join(chunks), raw=False, strict_map_key=True,
                              ext_hook=_no_ext)
    except Exception as exc:
        raise AuthenticationError(f"{peer} sent an undecodable {what}: {exc}") from None
    if not isinstance(msg, dict) or msg.get("t") != what:
        raise AuthenticationError(f"{peer} sent {str(msg)[:80]!r} where a {what} was expected")
    return msg


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("extension types are not allowed")


def _nonce(msg: dict[str, Any], peer: str) -> bytes:
    nonce = msg.get("nonce")
    if not isinstance(nonce, bytes) or len(nonce) != _NONCE_BYTES:
        raise AuthenticationError(f"{peer} sent a malformed nonce")
    return nonce


async def _refuse(ws: Any, reason: str) -> None:
    try:
        await ws.close(_POLICY_VIOLATION, "authentication failed")
    except Exception:  # already gone; nothing more to do
        pass


async def client_handshake(
    ws: Any,
    *,
    secret: bytes,
    local_id: PeerId,
    server_id: PeerId,
    session: str,
    timeout_s: float = 10.0,
    peer: str = "server",
) -> None:
    """Prove membership to the server ``server_id`` and check that it is a member too.

    Raises:
        AuthenticationError: the server is not who we dialled, does not know the
            secret, or refused us; the connection is closed.
    """
    key = derive_key(secret)
    client_nonce = secrets.token_bytes(_NONCE_BYTES)
    try:
        await ws.send(
            msgpack.packb(
                {
                    "t": "hello",
                    "v": AUTH_VERSION,
                    "id": local_id,
                    "to": server_id,
                    "session": session,
                    "nonce": client_nonce,
                },
                use_bin_type=True,
            )
        )
        challenge = await _recv_small(ws, timeout_s, "challenge", peer)
        if challenge.get("id") != server_id:
            raise AuthenticationError(f"{peer} answered as {challenge.get('id')!r:.40}, not as {server_id!r}")
        server_nonce = _nonce(challenge, peer)
        transcript = _transcript(session, local_id, server_id, client_nonce, server_nonce)
        expected = _proof(key, b"server", transcript)
        if not isinstance(challenge.get("proof"), bytes) or not hmac.compare_digest(challenge["proof"], expected):
            raise AuthenticationError(
                f"{peer} could not prove membership: wrong federation secret or session on one side"
            )
        await ws.send(msgpack.packb({"t": "proof", "proof": _proof(key, b"client", transcript)}, use_bin_type=True))
        await _recv_small(ws, timeout_s, "welcome", peer)
    except AuthenticationError as exc:
        log.warning("authentication with %s failed: %s", peer, exc)
        await _refuse(ws, str(exc))
        raise
    except Exception as exc:
        await _refuse(ws, str(exc))
        raise AuthenticationError(f"authentication with {peer} failed: {type(exc).__name__}: {exc}") from None


async def server_handshake(
    ws: Any,
    *,
    secret: bytes,
    local_id: PeerId,
    session: str,
    accept: AcceptPeer,
    timeout_s: float = 10.0,
    peer: str = "client",
) -> PeerId:
    """Check a connecting client's membership and prove ours; returns the client's id.

    Raises:
        AuthenticationError: the client failed any step; the connection is closed
            and the failure logged with ``peer`` (its address).
    """
    key = derive_key(secret)
    try:
        hello = await _recv_small(ws, timeout_s, "hello", peer)
        client_id = hello.get("id")
        if hello.get("v") != AUTH_VERSION:
            raise AuthenticationError(
                f"{peer} speaks handshake version {hello.get('v')!r:.20}, we speak {AUTH_VERSION}"
            )
        if not _valid_id(client_id):
            raise AuthenticationError(f"{peer} sent an invalid id {client_id!r:.40}")
        peer = f"{peer} (id {client_id!r})"
        if hello.get("session") != session:
            raise AuthenticationError(f"{peer} (id {client_id!r}) is in another session {hello.get('session')!r:.60}")
        if hello.get("to") != local_id:
            raise AuthenticationError(
                f"{peer} (id {client_id!r}) dialled {hello.get('to')!r:.40}, but this is {local_id!r}"
            )
        refusal = accept(client_id)
        if refusal is not None:
            raise AuthenticationError(f"{peer} (id {client_id!r}) refused: {refusal}")
        client_nonce = _nonce(hello, peer)
        server_nonce = secrets.token_bytes(_NONCE_BYTES)
        transcript = _transcript(session, client_id, local_id, client_nonce, server_nonce)
        await ws.send(
            msgpack.packb(
                {"t": "challenge", "id": local_id, "nonce": server_nonce, "proof": _proof(key, b"server", transcript)},
                use_bin_type=True,
            )
        )
        answer = await _recv_small(ws, timeout_s, "proof", peer)
        expected = _proof(key, b"client", transcript)
        if not isinstance(answer.get("proof"), bytes) or not hmac.compare_digest(answer["proof"], expected):
            raise AuthenticationError(f"{peer} (id {client_id!r}) could not prove membership: wrong federation secret")
        await ws.send(msgpack.packb({"t": "welcome"}, use_bin_type=True))
        return client_id
    except AuthenticationError as exc:
        log.warning("rejected connection: %s", exc)
        await _refuse(ws, str(exc))
        raise
    except Exception as exc:
        log.warning("rejected connection from %s: %s: %s", peer, type(exc).__name__, exc)
        await _refuse(ws, str(exc))
        raise AuthenticationError(f"authentication of {peer} failed: {type(exc).__name__}: {exc}") from None
