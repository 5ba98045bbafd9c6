"""The party list and network settings, from TOML.

Example (``parties.toml``; paths are relative to the file)::

    session = "study-2024-05"          # every endpoint must use the same session
    secret_file = "federation.key"     # openssl rand -hex 32 > federation.key
    # allow_plaintext = false          # parties off this host need [tls] unless true

    [mpc]
    frac_bits = 16
    truncation = "exact"
    comparison = "auto"       # "fss" (2 parties), "generic" or "auto"
    comparison_bits = 64

    [timeouts]
    connect_s = 60          # keep dialling a peer that is not up yet
    auth_s = 10             # each handshake step
    recv_s = 300            # a peer silent this long has stalled
    ping_interval_s = 20
    ping_timeout_s = 60
    close_s = 10

    [limits]
    max_message_bytes = 2147483648
    chunk_bytes = 1048576

    [tls]                   # optional: wss:// with these certificates
    ca = "ca.pem"
    mutual = true           # peers must present certificates signed by the CA

    [[party]]
    id = 0
    host = "10.0.0.1"
    port = 7100
    cert = "party0.pem"     # with [tls]
    key = "party0.key"

    [[party]]
    id = 1
    host = "10.0.0.2"
    port = 7100

    [[party]]
    id = 2
    role = "dealer"         # the dealer is the last id
    host = "10.0.0.3"
    port = 7100

Unknown keys are rejected with a :class:`~mpc.errors.ConfigError` naming them
(a typo must not silently fall back to a default).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import ssl
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..comm import DEFAULT_TIMEOUT_S
from ..errors import ConfigError
from ..protocols.compare import check_comparison_options, check_comparison_slack
from .auth import MIN_SECRET_BYTES
from .channel import ChannelOptions, Membership
from .tls import client_context, server_context
from .wire import Limits

__all__ = ["Endpoint", "TLSConfig", "NetworkConfig", "load_config", "parse_config", "check_host", "check_port"]

log = logging.getLogger("primia.net.config")

_TOP_KEYS = {"session", "secret", "secret_file", "allow_plaintext", "mpc", "timeouts", "limits", "tls", "party"}
_MPC_KEYS = {"frac_bits", "truncation", "comparison", "comparison_bits", "comparison_slack_bits"}
_TIMEOUT_KEYS = {
    "connect_s": "connect_timeout_s",
    "auth_s": "auth_timeout_s",
    "recv_s": None,
    "ping_interval_s": "ping_interval_s",
    "ping_timeout_s": "ping_timeout_s",
    "close_s": "close_timeout_s",
}
_LIMIT_KEYS = {"max_message_bytes", "max_header_bytes", "max_arrays", "chunk_bytes", "max_frame_bytes"}
_TLS_KEYS = {"ca", "mutual"}
_PARTY_KEYS = {"id", "host", "port", "role", "bind", "cert", "key"}


@dataclass(frozen=True)
class Endpoint:
    """One party or the dealer: where it listens and, with TLS, its certificate."""

    id: int
    host: str
    port: int
    role: str = "party"
    bind: str | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def listen_host(self) -> str:
        return self.bind or self.host


@dataclass(frozen=True)
class TLSConfig:
    ca: Path
    mutual: bool = False


@dataclass(frozen=True)
class NetworkConfig:
    """Everything an endpoint needs to join the mesh."""

    endpoints: tuple[Endpoint, ...]
    session: str
    secret: bytes = field(repr=False)
    limits: Limits = Limits()
    options: ChannelOptions = ChannelOptions()
    recv_timeout_s: float = DEFAULT_TIMEOUT_S
    tls: TLSConfig | None = None
    frac_bits: int = 16
    truncation: str = "exact"
    #: comparison, comparison_bits, comparison_slack_bits, as for mpc.run_local
    comparison: dict[str, Any] = field(default_factory=dict)

    @property
    def parties(self) -> int:
        """Number of computing parties (the dealer is endpoint ``parties``)."""
        return len(self.endpoints) - 1

    @property
    def dealer_id(self) -> int:
        return self.parties

    def endpoint(self, endpoint_id: int) -> Endpoint:
        for e in self.endpoints:
            if e.id == endpoint_id:
                return e
        ids = ", ".join(str(e.id) for e in self.endpoints)
        raise ConfigError(f"no party with id {endpoint_id} in the config (ids: {ids})")

    def membership(self, endpoint_id: int) -> Membership:
        return Membership(endpoint_id, self.secret, self.session)

    def server_ssl(self, endpoint_id: int) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        me = self.endpoint(endpoint_id)
        return server_context(me.cert, me.key, ca=self.tls.ca, mutual=self.tls.mutual)

    def client_ssl(self, endpoint_id: int) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        me = self.endpoint(endpoint_id)
        if self.tls.mutual:
            return client_context(self.tls.ca, cert=me.cert, key=me.key)
        return client_context(self.tls.ca)

    def addresses(self) -> dict[int, tuple[str, int]]:
        return {e.id: (e.host, e.port) for e in self.endpoints}


def load_config(path: str | Path) -> NetworkConfig:
    """Read and validate a TOML party list."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, base_dir=path.parent, source=str(path))


def _unknown(table: dict[str, Any], allowed: set[str] | dict, where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(sorted(allowed))}")


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    return value


def _positive(value: Any, where: str, *, integer: bool = False, allow_none: bool = False) -> Any:
    if allow_none and value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{where} must be {kind}, got {value!r}")
    return value


def _path(value: Any, base_dir: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a file path string, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _secret(data: dict[str, Any], base_dir: Path, source: str) -> bytes:
    inline, file = data.get("secret"), data.get("secret_file")
    if inline is not None and file is not None:
        raise ConfigError(f"{source}: set either 'secret' or 'secret_file', not both")
    if inline is None and file is None:
        raise ConfigError(
            f"{source}: no federation secret; add secret_file = \"federation.key\" and make the file with "
            "`openssl rand -hex 32 > federation.key` (shared by every party, kept private)"
        )
    if inline is not None:
        if not isinstance(inline, str):
            raise ConfigError(f"{source}: 'secret' must be a string")
        raw = inline.encode("utf-8")
        where = "'secret'"
    else:
        path = _path(file, base_dir, f"{source}: 'secret_file'")
        try:
            raw = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read secret_file {str(path)!r}: {exc.strerror}") from None
        mode = path.stat().st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("secret file %s is readable by other users; run: chmod 600 %s", path, path)
        where = f"secret_file {str(path)!r}"
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{source}: {where} holds {len(raw)} bytes; use at least {MIN_SECRET_BYTES} (`openssl rand -hex 32`)"
        )
    return raw


def parse_config(data: dict[str, Any], *, base_dir: Path = Path("."), source: str = "config") -> NetworkConfig:
    """Validate a decoded TOML document (see the module docstring for the format)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a table")
    _unknown(data, _TOP_KEYS, source)

    session = data.get("session")
    if not isinstance(session, str) or not 0 < len(session) <= 128:
        raise ConfigError(f"{source}: 'session' must be a non-empty string (at most 128 characters), got {session!r}")
    secret = _secret(data, base_dir, source)

    mpc = _table(data, "mpc", source)
    _unknown(mpc, _MPC_KEYS, f"{source} [mpc]")
    frac_bits = mpc.get("frac_bits", 16)
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= 40:
        raise ConfigError(f"{source} [mpc]: frac_bits must be an integer in [0, 40], got {frac_bits!r}")
    truncation = mpc.get("truncation", "exact")
    if truncation not in ("exact", "local"):
        raise ConfigError(f"{source} [mpc]: truncation must be \"exact\" or \"local\", got {truncation!r}")
    comparison = {
        "comparison": mpc.get("comparison", "auto"),
        "comparison_bits": mpc.get("comparison_bits", 64),
        "comparison_slack_bits": mpc.get("comparison_slack_bits", 0),
    }

    timeouts = _table(data, "timeouts", source)
    _unknown(timeouts, _TIMEOUT_KEYS, f"{source} [timeouts]")
    option_values: dict[str, Any] = {}
    for key, attr in _TIMEOUT_KEYS.items():
        if key in timeouts and attr is not None:
            option_values[attr] = _positive(timeouts[key], f"{source} [timeouts] {key}")
    recv_timeout_s = _positive(timeouts.get("recv_s", DEFAULT_TIMEOUT_S), f"{source} [timeouts] recv_s")
    options = ChannelOptions(**option_values)

    limits_table = _table(data, "limits", source)
    _unknown(limits_table, _LIMIT_KEYS, f"{source} [limits]")
    for key, value in limits_table.items():
        _positive(value, f"{source} [limits] {key}", integer=True)
    try:
        limits = Limits(**limits_table)
    except ValueError as exc:
        raise ConfigError(f"{source} [limits]: {exc}") from None

    tls = None
    if "tls" in data:
        tls_table = _table(data, "tls", source)
        _unknown(tls_table, _TLS_KEYS, f"{source} [tls]")
        if "ca" not in tls_table:
            raise ConfigError(
                f"{source} [tls]: 'ca' (the CA certificate that signed every party's certificate) is required"
            )
        mutual = tls_table.get("mutual", False)
        if not isinstance(mutual, bool):
            raise ConfigError(f"{source} [tls]: 'mutual' must be true or false")
        tls = TLSConfig(_path(tls_table["ca"], base_dir, f"{source} [tls] ca"), mutual)

    endpoints = _endpoints(data.get("party"), base_dir, source, tls is not None)
    try:
        bits = check_comparison_options(comparison["comparison"], comparison["comparison_bits"], len(endpoints) - 1)[1]
        check_comparison_slack(comparison["comparison_slack_bits"], bits)
    except ConfigError as exc:
        raise ConfigError(f"{source} [mpc]: {exc}") from None
    allow_plaintext = data.get("allow_plaintext", False)
    if not isinstance(allow_plaintext, bool):
        raise ConfigError(f"{source}: 'allow_plaintext' must be true or false")
    remote = [e.host for e in endpoints if not _is_loopback(e.host)]
    if tls is None and remote and not allow_plaintext:
        raise ConfigError(
            f"{source}: parties on other hosts ({', '.join(sorted(set(remote)))}) need a [tls] table: without TLS, "
            "seeds and shares cross the network unencrypted (the handshake authenticates, it does not encrypt). "
            "See docs/network.md for making certificates; set allow_plaintext = true only on a network you trust."
        )
    return NetworkConfig(
        endpoints=endpoints,
        session=session,
        secret=secret,
        limits=limits,
        options=options,
        recv_timeout_s=recv_timeout_s,
        tls=tls,
        frac_bits=frac_bits,
        truncation=truncation,
        comparison=comparison,
    )


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


def check_host(host: Any, where: str) -> str:
    """A host name or IP address to listen on or dial, or ConfigError saying what is wrong with it.

    The port is never part of the host (``"10.0.0.1:7100"`` is refused with that
    advice), IPv6 addresses are written without brackets, and a name holds only
    letters, digits, ``-``, ``.`` and ``_``.
    """
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where} must be a host name or IP address (a non-empty string), got {host!r}")
    if host.startswith("[") and host.endswith("]"):
        raise ConfigError(f"{where}: write the IPv6 address without brackets: {host[1:-1]!r}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            name, _, tail = host.rpartition(":")
            if "://" in host:
                advice = "give the bare host name, without a scheme such as ws://"
            else:
                advice = f"give the port separately (port = {tail!r} is not part of the host)"
            raise ConfigError(f"{where} {host!r} is not a host name or IP address; {advice}") from None
        return host
    if len(host) > 253 or not set(host) <= _HOST_CHARS:
        raise ConfigError(f"{where} {host!r} is not a host name or IP address "
                          "(letters, digits, '-', '.' and '_', at most 253 characters)")
    return host


def check_port(port: Any, where: str, *, allow_any: bool = False) -> int:
    """A TCP port in 1..65535 (0, "any free port", only with ``allow_any``), or ConfigError."""
    low = 0 if allow_any else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        free = " (0: any free port)" if allow_any else ""
        raise ConfigError(f"{where} must be an integer in {low}..65535{free}, got {port!r}")
    return port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _endpoints(raw: Any, base_dir: Path, source: str, tls: bool) -> tuple[Endpoint, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: list the parties and the dealer as [[party]] tables (id, host, port)")
    endpoints = []
    for n, entry in enumerate(raw, 1):
        where = f"{source} [[party]] #{n}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        _unknown(entry, _PARTY_KEYS, where)
        for key in ("id", "host", "port"):
            if key not in entry:
                raise ConfigError(f"{where}: '{key}' is required")
        pid = entry["id"]
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
            raise ConfigError(f"{where}: id must be a non-negative integer, got {pid!r}")
        host = check_host(entry["host"], f"{where}: host")
        port = check_port(entry["port"], f"{where}: port")
        role = entry.get("role", "party")
        if role not in ("party", "dealer"):
            raise ConfigError(f"{where}: role must be \"party\" or \"dealer\", got {role!r}")
        bind = entry.get("bind")
        if bind is not None:
            bind = check_host(bind, f"{where}: bind")
        cert = _path(entry["cert"], base_dir, f"{where} cert") if "cert" in entry else None
        key = _path(entry["key"], base_dir, f"{where} key") if "key" in entry else None
        if tls and (cert is None or key is None):
            raise ConfigError(f"{where}: with [tls], every party needs 'cert' and 'key' (see docs/network.md)")
        endpoints.append(Endpoint(pid, host, port, role, bind, cert, key))
    endpoints.sort(key=lambda e: e.id)
    ids = [e.id for e in endpoints]
    if ids != list(range(len(ids))):
        raise ConfigError(f"{source}: party ids must be 0, 1, ..., n without gaps or repeats, got {ids}")
    dealers = [e.id for e in endpoints if e.role == "dealer"]
    if dealers != [len(ids) - 1]:
        raise ConfigError(
            f"{source}: exactly one [[party]] must have role = \"dealer\", and it must have the highest id "
            f"({len(ids) - 1}); found dealers {dealers}"
        )
    if len(ids) < 3:
        raise ConfigError(f"{source}: need at least 2 computing parties and the dealer, got {len(ids)} entries")
    return tuple(endpoints)
