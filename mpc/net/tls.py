"""TLS contexts for ``wss://`` (server, client, mutual TLS) and the channel binding of a connection.

How to make a CA and certificates with openssl is in docs/network.md.  A
server certificate must name the host the peers dial in its subjectAltName
(``IP:10.0.0.5`` or ``DNS:node-a.example.org``); hostnames are checked.

The channel binding (:func:`server_binding`, :func:`peer_binding`) is SHA-256
of the server's certificate, which both ends put into the authentication
transcript (:mod:`mpc.net.auth`): a proof made through a TLS connection to one
certificate does not verify through a connection to another, so a party that
terminates TLS with its own certificate cannot relay someone else's proof.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["server_context", "client_context", "server_binding", "peer_binding"]

# the attribute of a server context that holds the DER of its certificate (see server_context)
_CERT_DER = "primia_certificate_der"


def _existing(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise ConfigError(f"TLS needs a {what} path; set it in the config (see docs/network.md)")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"TLS {what} file {str(p)!r} does not exist or is not a file")
    return p


def server_context(
    cert: str | Path, key: str | Path, *, ca: str | Path | None = None, mutual: bool = False
) -> ssl.SSLContext:
    """A server context presenting ``cert``/``key``; with ``mutual``, clients must present a cert signed by ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(_existing(cert, "certificate"), _existing(key, "private key"))
        setattr(ctx, _CERT_DER, _first_certificate_der(Path(cert)))
        if mutual:
            ctx.load_verify_locations(cafile=_existing(ca, "CA certificate"))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load TLS material ({cert}, {key}, ca={ca}): {exc}") from None
    return ctx


def client_context(
    ca: str | Path, *, cert: str | Path | None = None, key: str | Path | None = None
) -> ssl.SSLContext:
    """A client context trusting ``ca``; presents ``cert``/``key`` when given (for mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=_existing(ca, "CA certificate"))
        if cert is not None or key is not None:
            ctx.load_cert_chain(_existing(cert, "certificate"), _existing(key, "private key"))
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load TLS material (ca={ca}, {cert}, {key}): {exc}") from None
    return ctx


def _first_certificate_der(path: Path) -> bytes:
    """The DER of the first (leaf) certificate in a PEM file: what clients see as the server's certificate."""
    text = path.read_text(encoding="ascii", errors="replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ConfigError(f"TLS certificate file {str(path)!r} holds no PEM certificate")
    return ssl.PEM_cert_to_DER_cert(text[start: stop + len(end)] + "\n")


def server_binding(context: ssl.SSLContext | None) -> bytes:
    """The channel binding a server puts into handshakes: SHA-256 of its certificate (b"" without TLS)."""
    if context is None:
        return b""
    der = getattr(context, _CERT_DER, None)
    if der is None:
        raise ConfigError("this TLS server context was not made by mpc.net.tls.server_context; use it for wss://")
    return hashlib.sha256(der).digest()


def peer_binding(ws: Any) -> bytes:
    """The channel binding a client puts into handshakes: SHA-256 of the certificate the server presented."""
    transport = getattr(ws, "transport", None)
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return b""
    der = ssl_object.getpeercert(binary_form=True)
    return hashlib.sha256(der).digest() if der else b""
