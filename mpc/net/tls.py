"""TLS contexts for ``wss://``: server, client, and mutual TLS.

How to make a CA and certificates with openssl is in docs/network.md.  A
server certificate must name the host the peers dial in its subjectAltName
(``IP:10.0.0.5`` or ``DNS:node-a.example.org``); hostnames are checked.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ..errors import ConfigError

__all__ = ["server_context", "client_context"]


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
