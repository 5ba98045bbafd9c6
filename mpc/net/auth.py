"""Who is on the other end of a websocket: a four-message handshake in which the connecting side proves itself first.

Runs on a freshly opened websocket, before any data message, in four small
msgpack messages (each at most :data:`MAX_AUTH_BYTES`)::

    client -> server  hello     {t, v, id: client id, to: server id it wants, session, nonce: 32 random bytes}
    server -> client  challenge {t, id: server id, nonce: 32 random bytes, context, key}
    client -> server  proof     {t, proof: prove("client", transcript)}
    server -> client  welcome   {t, proof: prove("server", transcript)}

    transcript = msgpack([version, session, client id, server id, client nonce, server nonce, context, binding])

``context`` is chosen by the server (a federation hub puts its run id there);
``key`` is the fingerprint of the server's public key (key-pair identities,
empty for a shared secret), which a client that pins the server's key checks
*before* it sends its proof; ``binding`` is SHA-256 of the server's TLS
certificate on ``wss://`` (RFC 5929's tls-server-end-point idea) and empty on
``ws://``, so a proof made through one TLS connection cannot be replayed
through another (no party can claim another's name behind a different
certificate).  Each proof covers this session, both identities, both fresh
nonces, the context and the channel, so it cannot be replayed elsewhere.

Two kinds of credentials prove membership (:class:`Credentials`):

- :class:`Membership`: a secret shared by every member (the MPC mesh, ``primia
  party``); proofs are HMAC-SHA256 under a key derived from it.
- :class:`Identity`: a long-term Ed25519 key pair and the public keys of the
  peers it accepts (the federation: ``primia keygen``); proofs are signatures.

The server sends nothing that depends on its secret before the client has
proved itself, so a peer that knows no secret learns nothing it could test a
guess against; and with key pairs a recorded handshake holds only public keys,
nonces and signatures — no secret that a guess could be checked against.
A shared secret recorded over plain ``ws://`` can still be guessed offline from
the client's proof if it is weak: make it with ``openssl rand -hex 32``, and
use TLS off loopback.

Refusals: the server closes with code 1008 and a reason that names the cause
(:data:`REFUSALS`), logs it with the remote address and the name the client
claimed, and raises :class:`mpc.errors.AuthenticationError`; the client turns
the close into an error naming the same cause.  An unknown name and a wrong
key are refused alike, after the proof ("not-accepted"; the server's log tells
them apart), so a stranger cannot ask which names the server knows.

What this does not do: encrypt or integrity-protect the data that follows.
Off loopback, run over TLS (``wss://``, see docs/network.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import AuthenticationError
from .wire import PeerId

__all__ = [
    "AUTH_VERSION",
    "MAX_AUTH_BYTES",
    "MIN_SECRET_BYTES",
    "REFUSALS",
    "Credentials",
    "ServerBusy",
    "Membership",
    "Identity",
    "fingerprint",
    "derive_key",
    "client_handshake",
    "server_handshake",
]

log = logging.getLogger("primia.net.auth")

AUTH_VERSION = 2
MAX_AUTH_BYTES = 1024
MIN_SECRET_BYTES = 16
_NONCE_BYTES = 32
_POLICY_VIOLATION = 1008
_ROLE_CLIENT = b"client"
_ROLE_SERVER = b"server"

#: close reasons a server sends when it refuses a client, and what each means to the client
REFUSALS = {
    "version": "it speaks another handshake version; run the same primia version on both sides",
    "session": "it belongs to another session or federation: check the hub's public key (--hub-key) or the "
               "session name",
    "wrong-endpoint": "it is not the endpoint this side dialled (check the address and the peer's name)",
    "not-accepted": "it does not accept this side: this name is not in its config, or its config holds another "
                    "key (or secret) for it — check the name, and that the peer lists this side's public key",
    "refused": "it refused this connection",
    "malformed": "it could not read this side's handshake",
    "timeout": "this side was too slow to answer the handshake",
    "busy": "it has too many connections waiting to authenticate; try again later",
}

#: ``accept(client_id)`` returns None to accept an authenticated client, or the reason for refusing.
AcceptPeer = Callable[[PeerId], "str | None"]


class Credentials(Protocol):
    """What an endpoint proves itself with, and how it checks its peers' proofs."""

    local_id: PeerId
    session: str

    def announce(self) -> bytes:
        """The fingerprint a server sends in its challenge (b"" if it has no public key)."""

    def expected(self, peer: PeerId) -> bytes | None:
        """The fingerprint a client requires the server ``peer`` to announce (None: no pin)."""

    def knows(self, peer: PeerId) -> bool:
        """Whether ``peer`` could prove itself at all (a server refuses unknown names before the proof)."""

    def prove(self, role: bytes, transcript: bytes) -> bytes:
        """This endpoint's proof for ``role`` over ``transcript``."""

    def verify(self, peer: PeerId, role: bytes, transcript: bytes, proof: Any) -> bool:
        """Whether ``proof`` is ``peer``'s valid proof for ``role`` over ``transcript``."""


def derive_key(secret: bytes) -> bytes:
    """The HMAC key used in handshakes (domain-separated from any other use of the secret)."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
        raise AuthenticationError(
            f"the federation secret must be at least {MIN_SECRET_BYTES} bytes; make one with `openssl rand -hex 32`"
        )
    return hmac.new(bytes(secret), b"primia-auth-v1", hashlib.sha256).digest()


@dataclass(frozen=True)
class Membership:
    """A member of a group that shares one secret: ``local_id``, ``secret``, ``session``."""

    local_id: PeerId
    secret: bytes = field(repr=False)
    session: str

    def __repr__(self) -> str:  # never print the secret
        return f"Membership(local_id={self.local_id!r}, session={self.session!r})"

    def announce(self) -> bytes:
        return b""

    def expected(self, peer: PeerId) -> bytes | None:
        return None

    def knows(self, peer: PeerId) -> bool:
        return True

    def prove(self, role: bytes, transcript: bytes) -> bytes:
        return hmac.new(derive_key(self.secret), role + b"\x00" + transcript, hashlib.sha256).digest()

    def verify(self, peer: PeerId, role: bytes, transcript: bytes, proof: Any) -> bool:
        return isinstance(proof, bytes) and hmac.compare_digest(proof, self.prove(role, transcript))


def fingerprint(key: Ed25519PublicKey) -> bytes:
    """SHA-256 of a public key's raw 32 bytes: what identifies a key in handshakes, logs and statements."""
    return hashlib.sha256(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).digest()


@dataclass(frozen=True)
class Identity:
    """A named Ed25519 key pair, and the public keys of the peers it talks to.

    ``peers`` maps each peer id this endpoint accepts (as a server) or dials
    (as a client) to that peer's public key: a hub lists its nodes and dealer,
    a node pins the hub.
    """

    local_id: PeerId
    private_key: Ed25519PrivateKey = field(repr=False)
    session: str
    peers: Mapping[PeerId, Ed25519PublicKey] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"Identity(local_id={self.local_id!r}, session={self.session!r}, peers={sorted(map(str, self.peers))})"

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def announce(self) -> bytes:
        return fingerprint(self.public_key)

    def expected(self, peer: PeerId) -> bytes | None:
        key = self.peers.get(peer)
        return None if key is None else fingerprint(key)

    def knows(self, peer: PeerId) -> bool:
        return peer in self.peers

    def prove(self, role: bytes, transcript: bytes) -> bytes:
        return self.private_key.sign(b"primia-auth/v2 " + role + b"\x00" + transcript)

    def verify(self, peer: PeerId, role: bytes, transcript: bytes, proof: Any) -> bool:
        key = self.peers.get(peer)
        if key is None or not isinstance(proof, bytes):
            return False
        try:
            key.verify(proof, b"primia-auth/v2 " + role + b"\x00" + transcript)
        except InvalidSignature:
            return False
        return True


class ServerBusy(AuthenticationError):
    """The server sheds connections for now (too many authenticating at once): worth another try later."""


class _Refusal(AuthenticationError):
    """A server-side refusal: ``code`` goes to the client as the close reason."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def _transcript(session: str, client: PeerId, server: PeerId, client_nonce: bytes, server_nonce: bytes,
                context: str, binding: bytes) -> bytes:
    return msgpack.packb([AUTH_VERSION, session, client, server, client_nonce, server_nonce, context, binding],
                         use_bin_type=True)


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and 0 < len(value) <= 128)


def _refusal_text(code: str) -> str:
    return REFUSALS.get(code, f"it refused this connection ({code[:60]})")


async def _recv_small(ws: Any, timeout_s: float, what: str, peer: str) -> dict[str, Any]:
    """One handshake message, refusing anything larger than MAX_AUTH_BYTES before buffering more."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for fragment in ws.recv_streaming(decode=False):
                size += len(fragment)
                if size > MAX_AUTH_BYTES:
                    raise _Refusal("malformed", f"{peer} sent an oversized {what} ({size}+ bytes)")
                chunks.append(bytes(fragment))
    except TimeoutError:
        raise _Refusal("timeout", f"{peer} sent no {what} within {timeout_s:g} s") from None
    except AuthenticationError:
        raise
    except Exception as exc:  # connection closed or protocol error during the handshake
        raise _closed(exc, peer) from None
    try:
        msg = msgpack.unpackb(b"".join(chunks), raw=False, strict_map_key=True, ext_hook=_no_ext)
    except Exception as exc:
        raise _Refusal("malformed", f"{peer} sent an undecodable {what}: {type(exc).__name__}") from None
    if not isinstance(msg, dict) or msg.get("t") != what:
        raise _Refusal("malformed", f"{peer} sent something else where a {what} was expected")
    return msg


def _closed(exc: Exception, peer: str) -> AuthenticationError:
    """What a connection closed by the peer during the handshake means, in words."""
    rcvd = getattr(exc, "rcvd", None)
    if rcvd is not None and rcvd.code == _POLICY_VIOLATION:
        return AuthenticationError(f"{peer} refused the connection: {_refusal_text(rcvd.reason)}")
    if rcvd is not None and rcvd.code == 1013:
        return ServerBusy(f"{peer} refused the connection: {_refusal_text('busy')}")
    return AuthenticationError(f"{peer} closed the connection during authentication ({type(exc).__name__}: {exc})")


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("extension types are not allowed")


def _nonce(msg: dict[str, Any], peer: str) -> bytes:
    nonce = msg.get("nonce")
    if not isinstance(nonce, bytes) or len(nonce) != _NONCE_BYTES:
        raise _Refusal("malformed", f"{peer} sent a malformed nonce")
    return nonce


async def _close(ws: Any, code: str) -> None:
    try:
        await ws.close(_POLICY_VIOLATION, code)
    except Exception:  # already gone; nothing more to do
        pass


async def client_handshake(
    ws: Any,
    credentials: Credentials,
    server_id: PeerId,
    *,
    binding: bytes = b"",
    timeout_s: float = 10.0,
    peer: str = "server",
) -> str:
    """Prove ourselves to the server ``server_id``, then check its proof; returns the server's context.

    ``binding`` is the channel binding (:func:`mpc.net.tls.peer_binding`).  With a pinned
    key for ``server_id``, a server that announces another key is refused before
    anything of ours but the hello is sent.

    Raises:
        AuthenticationError: the server is not who we dialled, cannot prove it,
            or refused us (the message names why); the connection is closed.
    """
    client_nonce = secrets.token_bytes(_NONCE_BYTES)
    local_id, session = credentials.local_id, credentials.session
    try:
        await ws.send(msgpack.packb(
            {"t": "hello", "v": AUTH_VERSION, "id": local_id, "to": server_id, "session": session,
             "nonce": client_nonce},
            use_bin_type=True,
        ))
        challenge = await _recv_small(ws, timeout_s, "challenge", peer)
        if challenge.get("id") != server_id:
            raise AuthenticationError(f"{peer} answered as {challenge.get('id')!r:.40}, not as {server_id!r}")
        server_nonce = _nonce(challenge, peer)
        context = challenge.get("context")
        if not isinstance(context, str) or len(context) > 256:
            raise AuthenticationError(f"{peer} sent a malformed challenge context")
        pinned = credentials.expected(server_id)
        if pinned is not None and challenge.get("key") != pinned:
            shown = challenge.get("key")
            shown = shown.hex()[:16] if isinstance(shown, bytes) else "none"
            raise AuthenticationError(
                f"{peer} presents key {shown}..., not the pinned key {pinned.hex()[:16]}... for {server_id!r}: "
                "refusing to talk to it (is this the right address, and the right public key file?)"
            )
        transcript = _transcript(session, local_id, server_id, client_nonce, server_nonce, context, binding)
        await ws.send(msgpack.packb({"t": "proof", "proof": credentials.prove(_ROLE_CLIENT, transcript)},
                                    use_bin_type=True))
        welcome = await _recv_small(ws, timeout_s, "welcome", peer)
        if not credentials.verify(server_id, _ROLE_SERVER, transcript, welcome.get("proof")):
            raise AuthenticationError(
                f"{peer} could not prove it is {server_id!r}: wrong secret or key on its side, or the connection "
                "was intercepted"
            )
        return context
    except ServerBusy:
        raise
    except AuthenticationError as exc:
        log.warning("authentication with %s failed: %s", peer, exc)
        await _close(ws, "refused")
        raise AuthenticationError(str(exc)) from None
    except Exception as exc:
        error = _closed(exc, peer)
        if isinstance(error, ServerBusy):
            raise error from None
        await _close(ws, "malformed")
        raise error from None


async def server_handshake(
    ws: Any,
    credentials: Credentials,
    *,
    accept: AcceptPeer = lambda peer_id: None,
    context: str = "",
    binding: bytes = b"",
    timeout_s: float = 10.0,
    peer: str = "client",
) -> PeerId:
    """Check a connecting client's proof, then prove ourselves; returns the client's id.

    ``accept(client_id)`` is asked once the client has proved itself.

    Raises:
        AuthenticationError: the client failed any step; the connection is closed
            with a reason naming the cause, and the failure is logged with
            ``peer`` (its address) and the name the client claimed.
    """
    local_id, session = credentials.local_id, credentials.session
    try:
        hello = await _recv_small(ws, timeout_s, "hello", peer)
        client_id = hello.get("id")
        if hello.get("v") != AUTH_VERSION:
            raise _Refusal("version", f"{peer} speaks handshake version {hello.get('v')!r:.20}, we speak {AUTH_VERSION}")
        if not _valid_id(client_id):
            raise _Refusal("malformed", f"{peer} sent an invalid id {client_id!r:.40}")
        peer = f"{peer} (claiming to be {client_id!r})"
        if hello.get("session") != session:
            raise _Refusal("session", f"{peer} is in another session {hello.get('session')!r:.80}")
        if hello.get("to") != local_id:
            raise _Refusal("wrong-endpoint", f"{peer} dialled {hello.get('to')!r:.40}, but this is {local_id!r}")
        # An unknown name is refused only after its proof, with the same reason as a wrong key: a peer that holds
        # no configured key cannot tell which names the server knows.
        known = credentials.knows(client_id)
        client_nonce = _nonce(hello, peer)
        server_nonce = secrets.token_bytes(_NONCE_BYTES)
        await ws.send(msgpack.packb(
            {"t": "challenge", "id": local_id, "nonce": server_nonce, "context": context,
             "key": credentials.announce()},
            use_bin_type=True,
        ))
        transcript = _transcript(session, client_id, local_id, client_nonce, server_nonce, context, binding)
        answer = await _recv_small(ws, timeout_s, "proof", peer)
        if not known:
            raise _Refusal("not-accepted", f"{peer} is not a known peer: no public key is configured for that name")
        if not credentials.verify(client_id, _ROLE_CLIENT, transcript, answer.get("proof")):
            raise _Refusal("not-accepted", f"{peer} could not prove it: wrong secret, or a key that is not the one "
                                           "configured for that name")
        refusal = accept(client_id)
        if refusal is not None:
            raise _Refusal("refused", f"{peer} refused: {refusal}")
        await ws.send(msgpack.packb({"t": "welcome", "proof": credentials.prove(_ROLE_SERVER, transcript)},
                                    use_bin_type=True))
        return client_id
    except _Refusal as exc:
        log.warning("rejected connection: %s", exc)
        await _close(ws, exc.code)
        raise AuthenticationError(str(exc)) from None
    except AuthenticationError as exc:
        log.warning("rejected connection: %s", exc)
        await _close(ws, "refused")
        raise
    except Exception as exc:
        log.warning("rejected connection from %s: %s: %s", peer, type(exc).__name__, exc)
        await _close(ws, "malformed")
        raise AuthenticationError(f"authentication of {peer} failed: {type(exc).__name__}: {exc}") from None
