"""Long-term identities of a federation: Ed25519 key pairs made by ``primia keygen``, and signed statements.

Every party — the hub, each node, the aggregation dealer — has a key pair:
``NAME.key`` (PKCS#8 PEM, private, mode 0600) and ``NAME.pub`` (one OpenSSH
line, public, shared with everyone).  The hub's config lists each node's name
and public key; nodes and the dealer pin the hub's key, and where they need
them the keys of the dealer and of the other nodes (a folder of ``.pub``
files: :class:`Directory`).

Connections are authenticated with these keys (:class:`mpc.net.auth.Identity`).
Inside a round, what a party says about itself — its per-round public keys, the
survivor set it saw — is a :func:`sign_statement` that the hub can relay but not
forge: a statement is the msgpack of ``[domain, kind, *fields]``, signed with
the owner's key and checked with :func:`verify_statement`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import msgpack
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mpc.errors import ConfigError
from mpc.net.auth import fingerprint

__all__ = [
    "KEY_SUFFIX",
    "PUB_SUFFIX",
    "SIGNATURE_BYTES",
    "generate_keys",
    "load_private_key",
    "load_public_key",
    "public_key_text",
    "fingerprint",
    "fingerprint_text",
    "Directory",
    "sign_statement",
    "verify_statement",
    "check_name",
    "NAME_CHARS",
    "RESERVED_NAMES",
]

log = logging.getLogger("primia.identity")

#: names no node may take: the hub's and the dealer's identities
RESERVED_NAMES = ("hub", "dealer")
KEY_SUFFIX = ".key"
PUB_SUFFIX = ".pub"
SIGNATURE_BYTES = 64
_DOMAIN = "primia-federation/v1"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_name(name: Any, what: str) -> str:
    """A party name: 1-64 letters, digits, '-', '_' or '.' (it names files and appears in logs)."""
    if not isinstance(name, str) or not name or len(name) > 64 or not set(name) <= NAME_CHARS or name.startswith("."):
        raise ConfigError(f"{what}: {name!r:.80} must be 1-64 letters, digits, '-', '_' or '.' (not starting with '.')")
    return name


def fingerprint_text(key: Ed25519PublicKey) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` shows it: what people compare when they exchange keys."""
    return "SHA256:" + base64.b64encode(fingerprint(key)).decode().rstrip("=")


def public_key_text(key: Ed25519PublicKey, name: str) -> str:
    """The one line of a ``.pub`` file: ``ssh-ed25519 <base64> <name>``."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {name}\n"


def generate_keys(name: str, out_dir: str | os.PathLike, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``out_dir/NAME.key`` (mode 0600) and ``out_dir/NAME.pub``; returns both paths.

    Raises:
        ConfigError: a bad name, a folder that cannot be written, or key files
            that exist already (without ``force``: a new key would lock the old one out).
    """
    check_name(name, "--name")
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out: cannot create folder {folder}: {exc.strerror or exc}") from None
    key_path, pub_path = folder / f"{name}{KEY_SUFFIX}", folder / f"{name}{PUB_SUFFIX}"
    existing = [str(p) for p in (key_path, pub_path) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{' and '.join(existing)} already exist; a new key pair would replace an identity others may have "
            "configured: choose another --out or --name, or pass --force"
        )
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        key_path.unlink(missing_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        pub_path.write_text(public_key_text(private.public_key(), name), encoding="ascii")
    except OSError as exc:
        raise ConfigError(f"--out: cannot write the key files in {folder}: {exc.strerror or exc}") from None
    return key_path, pub_path


def load_private_key(path: str | os.PathLike, *, what: str) -> Ed25519PrivateKey:
    """Read a private key made by ``primia keygen``, refusing one that other users can read.

    Raises:
        ConfigError: missing or unreadable, readable by group or others (the fix: ``chmod 600``),
            or not an Ed25519 private key (e.g. a ``.pub`` file given by mistake).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{what}: the private key {path} can be read by other users (mode {stat.S_IMODE(mode):o}); "
                          f"run: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        hint = " (that is a public key: give the .key file)" if data.startswith(b"ssh-") else ""
        raise ConfigError(f"{what}: {path} is not a private key made by `primia keygen`{hint}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{what}: {path} holds a {type(key).__name__}, not an Ed25519 key; make one with "
                          "`primia keygen`")
    return key


def load_public_key(path: str | os.PathLike, *, what: str) -> Ed25519PublicKey:
    """Read a ``.pub`` file made by ``primia keygen`` (an ``ssh-ed25519`` line; a PEM public key also works).

    Raises:
        ConfigError: missing, unreadable, or not an Ed25519 public key (e.g. the private ``.key`` given by mistake).
    """
    path = Path(path)
    try:
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        if data.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(b" ".join(data.split()[:2]))
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        hint = " (that is a private key: give the .pub file)" if b"PRIVATE KEY" in data else ""
        raise ConfigError(f"{what}: {path} is not a public key made by `primia keygen`{hint}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{what}: {path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class Directory:
    """Names and public keys of a federation's parties, as a node or the dealer knows them."""

    keys: Mapping[str, Ed25519PublicKey]
    source: str = "the configuration"

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, what: str) -> "Directory":
        """Every ``NAME.pub`` in ``folder``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"{what}: {folder} is not a folder of .pub files")
        keys = {}
        for path in sorted(folder.glob(f"*{PUB_SUFFIX}")):
            name = path.name[: -len(PUB_SUFFIX)]
            if set(name) <= NAME_CHARS and name:
                keys[name] = load_public_key(path, what=what)
        return cls(keys, str(folder))

    def nodes(self, *, not_keys: Iterable[Ed25519PublicKey] = ()) -> "Directory":
        """Only the federation's nodes: without the reserved names (``hub``, ``dealer``) and without any key that
        is one of ``not_keys`` (the pinned hub and dealer keys), so that neither can pose as a member."""
        banned = {fingerprint(k) for k in not_keys}
        keys = {n: k for n, k in self.keys.items() if n not in RESERVED_NAMES and fingerprint(k) not in banned}
        return Directory(keys, self.source)

    def get(self, name: str) -> Ed25519PublicKey | None:
        return self.keys.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.keys

    def names(self) -> list[str]:
        return sorted(self.keys)

    def fingerprints(self, names: Iterable[str]) -> dict[str, str]:
        return {n: fingerprint(self.keys[n]).hex() for n in names if n in self.keys}


def _statement(kind: str, fields: Iterable[Any]) -> bytes:
    return msgpack.packb([_DOMAIN, kind, *fields], use_bin_type=True)


def sign_statement(key: Ed25519PrivateKey, kind: str, *fields: Any) -> bytes:
    """Sign ``[domain, kind, *fields]`` (plain msgpack values): what this party vouches for."""
    return key.sign(_statement(kind, fields))


def verify_statement(key: Ed25519PublicKey | None, signature: Any, kind: str, *fields: Any) -> bool:
    """Whether ``signature`` is the owner of ``key`` signing ``[domain, kind, *fields]``."""
    if key is None or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        key.verify(signature, _statement(kind, fields))
    except InvalidSignature:
        return False
    return True


def digest(*fields: Any) -> bytes:
    """SHA-256 of the msgpack of ``fields``: a short name for a long, exact view (a round's roster)."""
    return hashlib.sha256(msgpack.packb(list(fields), use_bin_type=True)).digest()
