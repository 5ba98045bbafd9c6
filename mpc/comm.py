"""Communicators: how parties exchange arrays, with exact byte and round accounting.

Protocol code talks to a :class:`Communicator`; the communicator talks to a
:class:`Transport`, which only moves arrays between numbered endpoints.  The
same protocol code therefore runs over in-process queues (tests, ``run_local``)
and over websockets (``mpc.net``), and the accounting is identical because it
is done here, on payload bytes, not in the transport.

Endpoints are numbered ``0 .. parties-1`` for the computing parties and
``parties`` for the dealer (the crypto provider).

Accounting, per party:
- ``rounds``: communication steps among computing parties this party took part
  in (sent or received).  Messages sent within one step travel concurrently.
- ``bytes_sent`` / ``bytes_received``: array payload bytes to and from other
  computing parties (the online traffic).
- ``dealer_bytes``: payload bytes received from the dealer; ``dealer_bytes_sent``:
  request bytes sent to it.  Dealer traffic can be produced ahead of time, so it
  is kept apart from the online figures.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np

from .errors import PeerFailure, PeerTimeout, ProtocolError

__all__ = [
    "ALLOWED_DTYPES",
    "Transport",
    "Stats",
    "Communicator",
    "InProcessNetwork",
    "InProcessTransport",
    "DEFAULT_TIMEOUT_S",
]

#: dtypes that may cross between parties; anything else is a protocol error.
ALLOWED_DTYPES = frozenset(
    np.dtype(t) for t in ("int64", "uint64", "int32", "uint32", "uint16", "uint8", "float64", "float32")
)
DEFAULT_TIMEOUT_S = 300.0


class Transport(Protocol):
    """Moves whole arrays between endpoints, in order, per (sender, receiver) pair."""

    def send(self, peer: int, payload: np.ndarray) -> None: ...

    def recv(self, peer: int, timeout_s: float) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass
class Stats:
    bytes_sent: int = 0
    bytes_received: int = 0
    rounds: int = 0
    dealer_bytes: int = 0
    dealer_bytes_sent: int = 0
    dealer_requests: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Communicator:
    """Validated, accounted messaging for one party.

    Args:
        rank: this endpoint's number.
        parties: number of computing parties (the dealer is endpoint ``parties``).
        transport: moves the arrays.
        timeout_s: how long to wait for any one message before failing.
    """

    def __init__(self, rank: int, parties: int, transport: Transport, *, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank = rank
        self.parties = parties
        self.dealer = parties
        self.transport = transport
        self.timeout_s = timeout_s
        self.stats = Stats()

    @property
    def peers(self) -> list[int]:
        """The other computing parties."""
        return [p for p in range(self.parties) if p != self.rank]

    # -- among computing parties -------------------------------------------------
    def exchange(
        self,
        outgoing: Mapping[int, np.ndarray],
        incoming: Mapping[int, tuple[tuple[int, ...], np.dtype | type]],
    ) -> dict[int, np.ndarray]:
        """One communication round: send every outgoing array, then receive the expected ones.

        ``incoming`` maps each sender to the (shape, dtype) this party expects;
        anything else is rejected as a :class:`ProtocolError` naming the peer.
        """
        for peer, payload in outgoing.items():
            payload = _contiguous(payload)
            self.transport.send(peer, payload)
            self.stats.bytes_sent += payload.nbytes
        received = {}
        for peer, (shape, dtype) in incoming.items():
            arr = self.transport.recv(peer, self.timeout_s)
            _check(peer, arr, tuple(shape), np.dtype(dtype))
            self.stats.bytes_received += arr.nbytes
            received[peer] = arr
        if outgoing or incoming:
            self.stats.rounds += 1
        return received

    def open(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Reveal the sums of all parties' shares of ``arrays`` to everyone, in one round.

        Each party sends its concatenated shares to every other party:
        8 * (parties - 1) bytes per element sent and received.
        """
        flat = _concat(arrays)
        others = self.peers
        got = self.exchange({p: flat for p in others}, {p: (flat.shape, np.int64) for p in others})
        total = flat.copy()
        for arr in got.values():
            total += arr
        return _split(total, arrays)

    def open_to(self, receiver: int, arrays: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """Reveal the sums of the shares to ``receiver`` only, in one round."""
        flat = _concat(arrays)
        if self.rank != receiver:
            self.exchange({receiver: flat}, {})
            return None
        got = self.exchange({}, {p: (flat.shape, np.int64) for p in self.peers})
        total = flat.copy()
        for arr in got.values():
            total += arr
        return _split(total, arrays)

    # -- with the dealer -----------------------------------------------------------
    def send_dealer(self, payload: np.ndarray) -> None:
        payload = _contiguous(payload)
        self.transport.send(self.dealer, payload)
        self.stats.dealer_bytes_sent += payload.nbytes
        self.stats.dealer_requests += 1

    def recv_dealer(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        arr = self.transport.recv(self.dealer, self.timeout_s)
        _check("dealer", arr, tuple(shape), np.dtype(dtype))
        self.stats.dealer_bytes += arr.nbytes
        return arr

    # -- raw, unaccounted (set-up and the dealer's own side) --------------------------
    def send_raw(self, peer: int, payload: np.ndarray) -> None:
        self.transport.send(peer, _contiguous(payload))

    def recv_raw(self, peer: int, shape: tuple[int, ...] | None, dtype: np.dtype | type) -> np.ndarray:
        arr = self.transport.recv(peer, self.timeout_s)
        _check(peer, arr, None if shape is None else tuple(shape), np.dtype(dtype))
        return arr

    def reset_stats(self) -> None:
        self.stats = Stats()

    def close(self) -> None:
        self.transport.close()


def _contiguous(arr: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d array into shape (1,).
    arr = np.asarray(arr)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _check(peer: object, arr: np.ndarray, shape: tuple[int, ...] | None, dtype: np.dtype) -> None:
    if not isinstance(arr, np.ndarray):
        raise ProtocolError(peer, f"expected an array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise ProtocolError(peer, f"expected dtype {dtype}, got {arr.dtype}")
    if shape is not None and arr.shape != shape:
        raise ProtocolError(peer, f"expected shape {shape}, got {arr.shape}")


def _concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    if len(arrays) == 1:
        return np.ascontiguousarray(arrays[0], dtype=np.int64).reshape(-1)
    return np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays])


def _split(flat: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    out, start = [], 0
    for a in like:
        n = int(np.size(a))
        out.append(flat[start : start + n].reshape(np.shape(a)))
        start += n
    return out


class InProcessNetwork:
    """Queues between ``size`` endpoints in one process, with a shared abort switch.

    When any endpoint fails, :meth:`abort` wakes every waiting receiver with a
    :class:`PeerFailure` instead of letting it hang.
    """

    def __init__(self, size: int):
        self.size = size
        self._queues = {(s, d): queue.SimpleQueue() for s in range(size) for d in range(size) if s != d}
        self._aborted = threading.Event()
        self.abort_reason = ""

    def endpoint(self, rank: int) -> "InProcessTransport":
        return InProcessTransport(self, rank)

    def abort(self, reason: str) -> None:
        if not self._aborted.is_set():
            self.abort_reason = reason
            self._aborted.set()


class InProcessTransport:
    _POLL_S = 0.05

    def __init__(self, network: InProcessNetwork, rank: int):
        self._net = network
        self.rank = rank

    def send(self, peer: int, payload: np.ndarray) -> None:
        # The receiver gets a read-only view: protocol code never mutates a sent array.
        view = payload.view()
        view.flags.writeable = False
        self._net._queues[(self.rank, peer)].put(view)

    def recv(self, peer: int, timeout_s: float) -> np.ndarray:
        q = self._net._queues[(peer, self.rank)]
        deadline = time.monotonic() + timeout_s
        while True:
            if self._net._aborted.is_set():
                raise PeerFailure(peer, f"computation aborted: {self._net.abort_reason}")
            try:
                return q.get(timeout=self._POLL_S)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise PeerTimeout(peer, timeout_s) from None

    def close(self) -> None:
        pass
