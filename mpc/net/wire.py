"""The wire format: one websocket message = a small msgpack header + raw array bytes.

Layout of a message (all integers little-endian)::

    offset 0   magic      4 bytes  b"PRMA"
    offset 4   version    u8       WIRE_VERSION (1)
    offset 5   flags      u8       0 (reserved)
    offset 6   reserved   u16      0
    offset 8   hlen       u32      length of the msgpack header
    offset 12  header     hlen bytes, a msgpack map:
                 {"kind": str, "sender": int | str, "session": str,
                  "header": {str: msgpack value},
                  "arrays": [[name, dtype name, [dim, ...]], ...]}
               zero padding to a multiple of 8
    then       each array's raw C-order little-endian bytes, in header order,
               each padded with zeros to a multiple of 8 bytes

so every array starts 8-byte aligned and decodes with ``np.frombuffer`` without
a copy.  dtypes come from an allow-list (:data:`WIRE_DTYPES`) by name; nothing
in a message is ever unpickled, and msgpack extension types are refused.

Senders get a list of chunks (:func:`encode_message`): the header, then
``memoryview`` slices of each array of at most ``chunk_bytes``, so a large
array goes out as websocket fragments without being copied here and keepalive
pings can slip in between fragments.  Receivers either decode a whole message
(:func:`decode_message`, zero-copy) or feed fragments to a
:class:`StreamDecoder`, which validates the header before any array byte
arrives and copies each fragment once into a buffer of exactly the declared
size.  Every violation raises :class:`mpc.errors.FrameError` naming the peer.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import sys
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Union

import msgpack
import numpy as np

from ..errors import FrameError

__all__ = [
    "WIRE_VERSION",
    "MAGIC",
    "WIRE_DTYPES",
    "Limits",
    "Message",
    "PeerId",
    "encode_message",
    "decode_message",
    "StreamDecoder",
    "message_nbytes",
]

WIRE_VERSION = 1
MAGIC = b"PRMA"
_PREFIX = struct.Struct("<4sBBHI")
_ALIGN = 8
_ZEROS = bytes(_ALIGN)
_OFFLOAD_BYTES = 256 << 10  # smaller fragments are copied in place: a thread hop costs more

PeerId = Union[int, str]

#: dtypes that may appear in a message, by wire name (always little-endian on the wire)
WIRE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}
_NAME_OF = {dt.newbyteorder("="): name for name, dt in WIRE_DTYPES.items()}
_MAX_NDIM = 32
_MAX_NAME = 256
_MAX_KIND = 64
_HEADER_KEYS = frozenset({"kind", "sender", "session", "header", "arrays"})


@dataclass(frozen=True)
class Limits:
    """Size limits for messages from peers, and the sender's fragment size.

    Attributes:
        max_message_bytes: largest message accepted (header and array bytes).
        max_header_bytes: largest msgpack header accepted.
        max_arrays: most arrays in one message.
        chunk_bytes: fragment size when sending large arrays.
        max_frame_bytes: largest single websocket frame accepted (bounds what an
            unauthenticated or hostile peer can make us buffer at once).
    """

    max_message_bytes: int = 2 << 30
    max_header_bytes: int = 256 << 10
    max_arrays: int = 4096
    chunk_bytes: int = 1 << 20
    max_frame_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_header_bytes", "max_arrays", "chunk_bytes", "max_frame_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.chunk_bytes > self.max_frame_bytes:
            raise ValueError(
                f"chunk_bytes ({self.chunk_bytes}) must not exceed max_frame_bytes ({self.max_frame_bytes})"
            )
        if self.max_header_bytes + _PREFIX.size + _ALIGN > self.max_frame_bytes:
            raise ValueError("max_header_bytes must leave room for the prefix within max_frame_bytes")

    @functools.cached_property
    def websocket_max_size(self) -> tuple[int, int]:
        """``max_size`` for websockets: (whole message, one frame)."""
        envelope = _PREFIX.size + self.max_header_bytes + _ALIGN * (self.max_arrays + 1)
        return (self.max_message_bytes + envelope, self.max_frame_bytes)


class Message(NamedTuple):
    """A decoded message: ``kind``, ``sender``, ``session``, a user ``header`` map and named ``arrays``.

    ``nbytes`` is its size on the wire (prefix, header, padding and array bytes).
    """

    kind: str
    sender: PeerId
    session: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    nbytes: int = 0


def _pad(n: int) -> int:
    return -n % _ALIGN


def _wire_array(name: str, arr: Any) -> tuple[str, np.ndarray]:
    """(wire dtype name, C-contiguous little-endian array) for sending."""
    arr = np.asarray(arr)
    wire_name = _NAME_OF.get(arr.dtype)  # native dtypes: the common case
    if wire_name is None:
        wire_name = _NAME_OF.get(arr.dtype.newbyteorder("="))
        if wire_name is None:
            allowed = ", ".join(WIRE_DTYPES)
            raise TypeError(f"array {name!r} has dtype {arr.dtype}, which cannot be sent; allowed: {allowed}")
    wire_dtype = WIRE_DTYPES[wire_name]
    if arr.dtype != wire_dtype:  # big-endian data, or a big-endian host
        arr = arr.astype(wire_dtype)
    # (not np.ascontiguousarray: it turns 0-d arrays into 1-d ones)
    return wire_name, arr if arr.flags.c_contiguous else arr.copy(order="C")


def encode_message(
    kind: str,
    header: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
    *,
    sender: PeerId = 0,
    session: str = "",
    chunk_bytes: int = 1 << 20,
) -> list[bytes | memoryview]:
    """Encode a message as a list of chunks to send as websocket fragments.

    Array bytes are not copied: the chunks are ``memoryview`` slices of the
    arrays (of at most ``chunk_bytes``), so the arrays must not change until
    the message is sent.  A message that fits one chunk comes back as a single
    ``bytes`` (one frame, no fragmentation).
    """
    if not isinstance(kind, str) or not 0 < len(kind) <= _MAX_KIND:
        raise ValueError(f"message kind must be a non-empty string of at most {_MAX_KIND} characters, got {kind!r}")
    wire_arrays: list[tuple[str, np.ndarray]] = []
    table = []
    for name, arr in (arrays or {}).items():
        if not isinstance(name, str) or len(name) > _MAX_NAME:
            raise ValueError(f"array names must be strings of at most {_MAX_NAME} characters, got {name!r}")
        wire_name, wire = _wire_array(name, arr)
        wire_arrays.append((name, wire))
        table.append([name, wire_name, list(wire.shape)])
    meta = {"kind": kind, "sender": sender, "session": session, "header": dict(header or {}), "arrays": table}
    packed = msgpack.packb(meta, use_bin_type=True)
    head = _PREFIX.pack(MAGIC, WIRE_VERSION, 0, 0, len(packed)) + packed
    head += _ZEROS[: _pad(len(head))]

    total = len(head) + sum(a.nbytes + _pad(a.nbytes) for _, a in wire_arrays)
    if total <= chunk_bytes:
        parts = [head]
        for _, a in wire_arrays:
            parts.append(memoryview(a).cast("B") if a.nbytes else b"")
            parts.append(_ZEROS[: _pad(a.nbytes)])
        return [b"".join(parts)]

    chunks: list[bytes | memoryview] = [head]
    for _, a in wire_arrays:
        if a.nbytes == 0:
            continue
        view = memoryview(a).cast("B")
        for start in range(0, a.nbytes, chunk_bytes):
            chunks.append(view[start : start + chunk_bytes])
        if _pad(a.nbytes):
            chunks.append(_ZEROS[: _pad(a.nbytes)])
    return chunks


def _copy_into(body: np.ndarray, pos: int, data: memoryview) -> None:
    # numpy copies with the GIL released, unlike a memoryview slice assignment.
    np.copyto(body[pos : pos + len(data)], np.frombuffer(data, dtype=np.uint8))


def _address(data: memoryview) -> int:
    return np.frombuffer(data, dtype=np.uint8).ctypes.data if len(data) else 0


def message_nbytes(chunks: list[bytes | memoryview]) -> int:
    """Total bytes of an encoded message."""
    return sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


class _Layout(NamedTuple):
    kind: str
    sender: PeerId
    session: str
    header: dict[str, Any]
    # (name, dtype, shape, offset in the body, nbytes) per array
    arrays: list[tuple[str, np.dtype, tuple[int, ...], int, int]]
    body_bytes: int


def _parse_prefix(prefix: bytes | memoryview, limits: Limits, peer: object) -> int:
    """Validate the fixed prefix; returns the header length."""
    magic, version, flags, reserved, hlen = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(peer, f"not a primia message (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != WIRE_VERSION:
        raise FrameError(
            peer,
            f"wire version {version} is not supported (this build speaks version {WIRE_VERSION}); upgrade both ends",
        )
    if flags or reserved:
        raise FrameError(peer, f"reserved prefix bits are set (flags={flags}, reserved={reserved})")
    if hlen > limits.max_header_bytes:
        raise FrameError(peer, f"header of {hlen} bytes exceeds the limit of {limits.max_header_bytes}")
    return hlen


def _parse_header(raw: bytes | memoryview, limits: Limits, peer: object) -> _Layout:
    """The header's layout, or FrameError: no other exception may escape a peer's bytes."""
    try:
        return _parse_layout(raw, limits, peer)
    except FrameError:
        raise
    except Exception as exc:  # a check we lack: still the peer's fault, still named as such
        raise FrameError(peer, f"undecodable header: {type(exc).__name__}: {exc}") from exc


def _parse_layout(raw: bytes | memoryview, limits: Limits, peer: object) -> _Layout:
    # Hot path (every message): exact type checks, errors formatted only when raised.
    try:
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise FrameError(peer, f"undecodable header: {type(exc).__name__}: {exc}") from None
    if type(meta) is not dict or meta.keys() != _HEADER_KEYS:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise FrameError(peer, f"header must be a map with keys {sorted(_HEADER_KEYS)}, got {keys}")
    kind, sender, session = meta["kind"], meta["sender"], meta["session"]
    header, arrays = meta["header"], meta["arrays"]
    if type(kind) is not str or not 0 < len(kind) <= _MAX_KIND:
        raise FrameError(peer, f"bad message kind {kind!r:.80}")
    if type(sender) is not int and type(sender) is not str:
        raise FrameError(peer, f"bad sender {sender!r:.80}")
    if type(session) is not str:
        raise FrameError(peer, f"bad session {session!r:.80}")
    if type(header) is not dict:
        raise FrameError(peer, "the user header must be a map")
    if type(arrays) is not list or len(arrays) > limits.max_arrays:
        raise FrameError(peer, f"array table must be a list of at most {limits.max_arrays} entries")
    table = []
    offset = 0
    names: set[str] = set()
    for entry in arrays:
        if type(entry) is not list or len(entry) != 3:
            raise FrameError(peer, f"array entry {entry!r:.80} is not [name, dtype, shape]")
        name, dtype_name, shape = entry
        if type(name) is not str or len(name) > _MAX_NAME or name in names:
            raise FrameError(peer, f"array name {name!r:.80} is not a unique string of at most {_MAX_NAME} characters")
        names.add(name)
        dtype = WIRE_DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dtype is None:
            raise FrameError(peer, f"array {name!r} has dtype {dtype_name!r:.40}, which is not on the allow-list")
        if type(shape) is not list or len(shape) > _MAX_NDIM:
            raise FrameError(peer, f"array {name!r} has an invalid shape {shape!r:.80}")
        # Every dimension is bounded, not just the element count: a zero-size
        # array such as [0, 2**62] holds no bytes, yet numpy refuses its shape.
        count = extent = 1
        for d in shape:
            if type(d) is not int or d < 0:  # (type(True) is bool, so booleans are refused too)
                raise FrameError(peer, f"array {name!r} has an invalid shape {shape!r:.80}")
            count *= d
            extent *= d or 1
            if extent * dtype.itemsize > limits.max_message_bytes:
                raise FrameError(
                    peer, f"array {name!r} declares shape {shape!r:.80}, whose dimensions exceed the limit of "
                    f"{limits.max_message_bytes} bytes (max_message_bytes) even where it holds no element"
                )
        nbytes = count * dtype.itemsize
        if offset + nbytes > limits.max_message_bytes:
            raise FrameError(
                peer, f"declared array bytes exceed the limit of {limits.max_message_bytes} (max_message_bytes)"
            )
        table.append((name, dtype, tuple(shape), offset, nbytes))
        offset += nbytes + (-nbytes % _ALIGN)
    return _Layout(kind, sender, session, header, table, offset)


_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def _views(body: Any, layout: _Layout) -> dict[str, np.ndarray]:
    out = {}
    for name, dtype, shape, offset, nbytes in layout.arrays:
        if nbytes == 0:
            out[name] = np.empty(shape, dtype=dtype.newbyteorder("="))
            continue
        arr = np.frombuffer(body, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        if len(shape) != 1:
            arr = arr.reshape(shape)
        # Little-endian on the wire: a copy only on big-endian hosts.
        out[name] = arr if _LITTLE_ENDIAN_HOST else arr.astype(dtype.newbyteorder("="))
    return out


def _message(layout: _Layout, body: Any, nbytes: int, peer: object) -> Message:
    try:
        arrays = _views(body, layout)
    except Exception as exc:  # the layout was validated; this is the backstop, as in _parse_header
        raise FrameError(peer, f"undecodable arrays: {type(exc).__name__}: {exc}") from exc
    return Message(layout.kind, layout.sender, layout.session, layout.header, arrays, nbytes)


def decode_message(
    data: bytes | bytearray | memoryview, *, limits: Limits = Limits(), peer: object = "peer"
) -> Message:
    """Decode one whole message without copying array bytes (the arrays view ``data``)."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    size = len(view)
    if size > limits.websocket_max_size[0]:
        raise FrameError(peer, f"message of {size} bytes exceeds the limit of {limits.max_message_bytes}")
    if size < _PREFIX.size:
        raise FrameError(peer, f"truncated message: {size} bytes is shorter than the {_PREFIX.size}-byte prefix")
    hlen = _parse_prefix(view[: _PREFIX.size], limits, peer)
    head_end = _PREFIX.size + hlen
    body_start = head_end + _pad(head_end)
    if size < body_start:
        raise FrameError(peer, f"truncated message: header needs {body_start} bytes, got {size}")
    layout = _parse_header(view[_PREFIX.size : head_end], limits, peer)
    if size - body_start != layout.body_bytes:
        what = "truncated" if size - body_start < layout.body_bytes else "oversized"
        raise FrameError(
            peer, f"{what} message: header declares {layout.body_bytes} array bytes, got {size - body_start}"
        )
    body = memoryview(view)[body_start:] if isinstance(view, bytes) else view[body_start:]
    return _message(layout, body, size, peer)


class StreamDecoder:
    """Decodes a message from its fragments as they arrive.

    The header is validated as soon as it is complete, before any array byte
    is accepted; the array bytes are then copied once into a buffer of exactly
    the declared size.  :meth:`finish` checks that nothing is missing.

    With a ``copier`` (an executor), fragments of at least ``_OFFLOAD_BYTES``
    are copied by it instead of the caller: numpy releases the GIL for the
    copy, so an event loop feeding the decoder goes on reading the socket
    while earlier fragments are being copied.  Then call :meth:`wait_copies`
    (or await :meth:`copies_done`) before :meth:`finish`.
    """

    def __init__(self, *, limits: Limits = Limits(), peer: object = "peer", copier: Executor | None = None):
        self._limits = limits
        self._peer = peer
        self._copier = copier
        self._copies: list[Future] = []
        self._head = bytearray()
        self._head_needed = _PREFIX.size
        self._hlen: int | None = None
        self._layout: _Layout | None = None
        self._body: np.ndarray | None = None
        self._view: memoryview | None = None
        self._pos = 0
        self._reserved = -1
        self.received = 0

    def feed(self, fragment: bytes | bytearray | memoryview) -> None:
        data = memoryview(fragment).cast("B")
        self.received += len(data)
        if self._layout is None:
            data = self._feed_head(data)
            if self._layout is None or not len(data):
                return
        end = self._pos + len(data)
        if end > self._layout.body_bytes:
            raise FrameError(
                self._peer,
                f"oversized message: header declares {self._layout.body_bytes} array bytes, got at least {end}",
            )
        if self._reserved == self._pos and _address(data) == self._body.ctypes.data + self._pos:
            pass  # written in place by the receiver (see reserve)
        elif self._copier is not None and len(data) >= _OFFLOAD_BYTES:
            self._copies.append(self._copier.submit(_copy_into, self._body, self._pos, data))
        else:
            self._view[self._pos : end] = data
        self._pos = end

    def reserve(self, nbytes: int) -> np.ndarray | None:
        """Where the next ``nbytes`` fragment bytes go, for a receiver to write them in place.

        Returns the slice of the message body that the next fragment fills, if
        that fragment carries only array bytes (the header is complete) and fits;
        else None.  :meth:`feed` then recognises the fragment by its address and
        copies nothing.
        """
        if self._layout is None or self._pos + nbytes > self._layout.body_bytes:
            return None
        self._reserved = self._pos
        return self._body[self._pos : self._pos + nbytes]

    def wait_copies(self) -> None:
        """Wait for copies handed to the copier (re-raising any failure)."""
        for future in self._copies:
            future.result()
        self._copies.clear()

    async def copies_done(self) -> None:
        """:meth:`wait_copies` for an event loop: waits without blocking it."""
        if self._copies:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in self._copies))
            self._copies.clear()

    def _feed_head(self, data: memoryview) -> memoryview:
        """Accumulate prefix and header bytes; returns what is left of ``data``."""
        while self._layout is None and len(data):
            take = self._head_needed - len(self._head)
            self._head += data[:take]
            data = data[take:]
            if len(self._head) < self._head_needed:
                return data
            if self._hlen is None:
                self._hlen = _parse_prefix(bytes(self._head), self._limits, self._peer)
                head_end = _PREFIX.size + self._hlen
                self._head_needed = head_end + _pad(head_end)
                continue
            raw = bytes(self._head[_PREFIX.size : _PREFIX.size + self._hlen])
            self._layout = _parse_header(raw, self._limits, self._peer)
            self._body = np.empty(self._layout.body_bytes, dtype=np.uint8)
            self._view = memoryview(self._body)
        return data

    def finish(self) -> Message:
        if self._copies:
            self.wait_copies()
        if self._layout is None:
            raise FrameError(self._peer, f"truncated message: {self.received} bytes end inside the header")
        if self._pos != self._layout.body_bytes:
            raise FrameError(
                self._peer, f"truncated message: header declares {self._layout.body_bytes} array bytes, got {self._pos}"
            )
        return _message(self._layout, self._body, self.received, self._peer)
