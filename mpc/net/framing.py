"""Large binary frames read straight from the socket into their own buffer.

websockets' parser (sans-I/O, pure Python) receives every byte through its
stream buffer: each socket read is appended to a ``bytearray``, a frame's
payload is sliced out of it, and the slice is unmasked into yet another
object.  For bulk array traffic those copies, and the page faults of the
fresh memory each one touches, cost more than the kernel's own copy: the
receiver became the bottleneck at about 40 % of a raw TCP socket.

:class:`DirectPayloads` sits in front of that parser (as the connection's
``asyncio.BufferedProtocol``).  It follows the frame boundaries itself:

- bytes of the HTTP opening handshake, control frames, text frames, small
  binary frames and anything unusual are forwarded unchanged to websockets,
  whose parser therefore always sees whole frames and stays authoritative for
  errors, limits, pings and the closing handshake;
- the payload of a large, well-formed binary or continuation frame is
  ``recv_into`` a buffer of exactly its size (the same copy a raw socket
  makes), unmasked in place if the peer is a client, and handed to the
  protocol as a ready :class:`websockets.frames.Frame`, exactly as its parser
  would have built it.

A frame is taken over only if websockets would accept it unchanged: the
connection is open, its parser has failed on nothing, all earlier bytes were
whole frames, no extension is negotiated, the reserved bits are clear, the
mask bit is what the RFC requires of the peer's side, and the length is
within websockets' own ``max_size`` for the message.  Everything else keeps
the library's path, so a malformed or oversized frame is refused by the same
code and with the same close code as before.  From the first frame boundary
at which the connection is no longer open, every byte is forwarded as is.
"""

from __future__ import annotations

import asyncio
import codecs
import secrets
import struct
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import numpy as np
from websockets.asyncio.messages import Assembler
from websockets.exceptions import ConcurrencyError, ProtocolError
from websockets.frames import DATA_OPCODES, CloseCode, Frame, Opcode
from websockets.protocol import CLIENT, SERVER, Protocol, State

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = ["DirectPayloads", "DIRECT_MIN_BYTES", "PayloadTarget"]

#: ``target(nbytes)`` returns where the payload of the large frame now arriving belongs
#: (a uint8 array of exactly ``nbytes``), or None for a buffer of its own
PayloadTarget = Callable[[int], "np.ndarray | None"]

#: payloads at least this large bypass websockets' stream buffer (smaller ones cost
#: more in Python bookkeeping than the copies they would save); at least 2^16, so that
#: such a frame's length always takes the 8-byte form, the minimal one (RFC 6455 §5.2)
#: that _DirectSender writes
DIRECT_MIN_BYTES = 64 << 10
_HTTP_END = b"\r\n\r\n"
_MAX_HEADER = 14
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


def unmask_in_place(payload: np.ndarray, key: bytes) -> None:
    """XOR ``payload`` (uint8) with the 4-byte masking key repeated (RFC 6455 §5.3)."""
    words = payload.size // 4
    if words:
        payload[: 4 * words].view(np.uint32).__ixor__(np.frombuffer(key, dtype=np.uint32)[0])
    for i in range(4 * words, payload.size):
        payload[i] ^= key[i % 4]


class DirectPayloads(asyncio.BufferedProtocol):
    """Mixin for websockets' asyncio connections (put it first among the bases).

    ``read_size`` is the size of the reused buffer for ordinary reads.

    ``payload_target``, when set, is asked where the next large payload goes, so
    that a receiver can have it written straight into the array it is
    assembling.  It is cleared whenever a data frame is handed on: the receiver
    sets it only while it waits with every earlier frame consumed, so that it
    always knows which bytes the next frame carries.
    """

    payload_target: PayloadTarget | None = None
    read_size = 1 << 20
    _read_buffer: memoryview | None = None
    _phase = "http"  # "http" (opening handshake), "frames" (split here), "raw" (all to websockets)
    _http_tail = b""  # last bytes seen in the http phase, to find b"\r\n\r\n" across reads
    _header = b""  # bytes of a frame header not yet complete
    _forward_left = 0  # payload bytes of the current frame still to hand to websockets as they come
    _direct: "_DirectFrame | None" = None  # the frame whose payload is being read into its own buffer
    _bulk = False  # the last frame was taken directly: read the next header alone, not into the read buffer

    def __init__(self, protocol: Protocol, *args: Any, **kwargs: Any) -> None:
        super().__init__(protocol, *args, **kwargs)
        protocol.send_frame = _DirectSender(protocol, protocol.send_frame)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        frames = self.recv_messages
        self.recv_messages = _ViewAssembler(frames.high, frames.low, pause=frames.pause, resume=frames.resume)

    def process_event(self, event: Any) -> None:
        if getattr(event, "opcode", None) in DATA_OPCODES:
            self.payload_target = None
        super().process_event(event)

    # -- asyncio.BufferedProtocol ----------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None:
            return self._direct.rest()
        if self._read_buffer is None or len(self._read_buffer) != self.read_size:
            self._read_buffer = memoryview(bytearray(self.read_size))
        if self._bulk and not self._header and not self._forward_left:
            # Within a bulk transfer the next frame is most likely large too: reading just its
            # header lets its payload go straight to its own buffer rather than through this one.
            return self._read_buffer[:_MAX_HEADER]
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None:
            self._direct.filled += nbytes
            if self._direct.complete:
                self._deliver_direct()
            return
        # websockets copies what it is given into its stream buffer, so the view may be reused.
        self._split(self._read_buffer[:nbytes])

    # -- splitting the byte stream -----------------------------------------------------
    def _forward(self, data: memoryview | bytes) -> None:
        if len(data):
            self.data_received(data)

    def _split(self, data: memoryview) -> None:
        while len(data):
            if self._phase == "raw":
                self._forward(data)
                return
            if self._phase == "http":
                data = self._split_http(data)
                continue
            if self._forward_left:
                take = min(self._forward_left, len(data))
                self._forward(data[:take])
                self._forward_left -= take
                data = data[take:]
                continue
            if self._direct is not None:  # a read that ran past a header into a direct payload
                rest = self._direct.rest()
                take = min(len(rest), len(data))
                rest[:take] = data[:take]
                self._direct.filled += take
                data = data[take:]
                if self._direct.complete:
                    self._deliver_direct()
                continue
            data = self._take_header(data)

    def _split_http(self, data: memoryview) -> memoryview:
        """Forward the opening handshake; switch to frames right after its blank line."""
        seen = self._http_tail + bytes(data[: 64 << 10])
        end = seen.find(_HTTP_END)
        if end < 0:
            if len(data) > 64 << 10:  # a handshake this long is not one websockets accepts either
                self._phase = "raw"
            self._http_tail = seen[-3:]
            self._forward(data)
            return data[len(data):]
        cut = end + len(_HTTP_END) - len(self._http_tail)
        self._forward(data[:cut])
        self._http_tail = b""
        # A server's state turns OPEN only once it has answered; each frame boundary checks it.
        self._phase = "frames"
        return data[cut:]

    def _take_header(self, data: memoryview) -> memoryview:
        """At a frame boundary: collect the header, then decide who takes the payload."""
        if self.protocol.state is not State.OPEN:
            self._phase = "raw"
            self._forward(self._header)
            self._header = b""
            return data
        header = self._header + bytes(data[:_MAX_HEADER])
        parsed = _parse_header(header)
        if parsed is None:
            self._header = header
            return data[len(data):]
        size, length = parsed
        used = size - len(self._header)
        self._header = b""
        header = header[:size]
        first, masked = header[0], bool(header[1] & 0x80)
        self._bulk = self._can_take(first, masked, length)
        if self._bulk:
            mask = header[-4:] if masked else None
            target = self.payload_target(length) if self.payload_target is not None else None
            buffer = target if target is not None else np.empty(length, dtype=np.uint8)
            self._direct = _DirectFrame(buffer, Opcode(first & 0x0F), bool(first & 0x80), mask)
        else:
            self._forward(header)
            self._forward_left = length
        return data[used:]

    def _can_take(self, first: int, masked: bool, length: int) -> bool:
        protocol = self.protocol
        if length < DIRECT_MIN_BYTES or first & 0x70 or (first & 0x0F) not in (Opcode.CONT, Opcode.BINARY):
            return False
        if masked != (protocol.side is SERVER) or protocol.extensions or protocol.parser_exc is not None:
            return False
        limit = None
        if protocol.max_message_size is not None:
            limit = protocol.max_message_size - (protocol.current_size or 0)
        if protocol.max_fragment_size is not None:
            limit = protocol.max_fragment_size if limit is None else min(limit, protocol.max_fragment_size)
        return limit is None or length <= limit

    def _deliver_direct(self) -> None:
        frame, self._direct = self._direct, None
        if frame.mask is not None:
            unmask_in_place(frame.buffer, frame.mask)
        protocol = self.protocol
        try:
            protocol.recv_frame(Frame(frame.opcode, memoryview(frame.buffer), frame.fin))
        except ProtocolError as exc:  # e.g. a continuation with no message begun: as websockets' parser would
            protocol.fail(CloseCode.PROTOCOL_ERROR, str(exc))
            protocol.parser_exc = exc
        # An empty read runs websockets' usual follow-up: process events, write replies, arm close timers.
        self.data_received(b"")


@dataclass
class _DirectFrame:
    buffer: np.ndarray  # uint8, exactly the payload's size
    opcode: Opcode
    fin: bool
    mask: bytes | None  # the masking key of a client's frame
    filled: int = 0

    def rest(self) -> memoryview:
        return memoryview(self.buffer)[self.filled :]

    @property
    def complete(self) -> bool:
        return self.filled == self.buffer.size


def _parse_header(header: bytes) -> tuple[int, int] | None:
    """(header size, payload length) of the frame header that starts ``header``; None while incomplete."""
    if len(header) < 2:
        return None
    code = header[1] & 0x7F
    size = 2 + (2 if code == 126 else 8 if code == 127 else 0) + (4 if header[1] & 0x80 else 0)
    if len(header) < size:
        return None
    if code == 126:
        return size, _U16.unpack_from(header, 2)[0]
    if code == 127:
        return size, _U64.unpack_from(header, 2)[0]
    return size, code


class _ViewAssembler(Assembler):
    """websockets' frame assembler, except that streamed binary fragments are not copied.

    The library turns each fragment into ``bytes`` before yielding it, a copy
    of every byte received; here a binary fragment is yielded as its frame
    holds it (``bytes``, ``bytearray`` or a ``memoryview`` of a direct
    payload).  Text is decoded as the library does; whole-message reads
    (``get``) are unchanged.
    """

    async def get_iter(self, decode: bool | None = None) -> AsyncIterator[Any]:
        if self.get_in_progress:
            raise ConcurrencyError("get() or get_iter() is already running")
        self.get_in_progress = True
        try:
            frame = await self.frames.get(not self.closed)
        except asyncio.CancelledError:
            self.get_in_progress = False
            raise
        self.maybe_resume()
        text = decode if decode is not None else frame.opcode is Opcode.TEXT
        utf8 = codecs.getincrementaldecoder("utf-8")() if text else None
        yield utf8.decode(frame.data, frame.fin) if utf8 else frame.data
        while not frame.fin:
            # As in the library: cancelling here leaves the assembler stuck, which only happens when
            # the whole connection is being torn down.
            frame = await self.frames.get(not self.closed)
            self.maybe_resume()
            yield utf8.decode(frame.data, frame.fin) if utf8 else frame.data
        self.get_in_progress = False


class _DirectSender:
    """``Protocol.send_frame`` that writes a large data frame's payload as it is.

    websockets serialises every frame into one new ``bytes`` (header and
    payload copied together); for a large fragment the header goes out as its
    own write and the payload as the caller's memoryview (or, from a client,
    as the one masked copy the RFC requires).  Other frames, and any frame
    with extension bits, take the library's path.
    """

    def __init__(self, protocol: Protocol, send_frame: Any):
        self._protocol = protocol
        self._send_frame = send_frame

    def __call__(self, frame: Frame) -> None:
        protocol = self._protocol
        length = len(frame.data)
        if (length < DIRECT_MIN_BYTES or frame.opcode not in (Opcode.CONT, Opcode.BINARY) or protocol.extensions
                or frame.rsv1 or frame.rsv2 or frame.rsv3):
            self._send_frame(frame)
            return
        first = (0x80 if frame.fin else 0) | frame.opcode
        if protocol.side is CLIENT:
            key = secrets.token_bytes(4)
            protocol.writes.append(struct.pack("!BBQ", first, 0x80 | 127, length) + key)
            protocol.writes.append(apply_mask(frame.data, key))
        else:
            protocol.writes.append(struct.pack("!BBQ", first, 127, length))
            protocol.writes.append(frame.data)
