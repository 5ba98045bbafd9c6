"""The crypto provider (trusted dealer): correlated randomness, seed-compressed.

At set-up the dealer gives every computing party i a 128-bit seed s_i.  For the
k-th piece of material, party i's random parts are drawn from the AES-CTR stream
(s_i, k); the dealer, who knows every seed, draws the same values, computes what
makes them correlated (c = f(a, b) for a triple) and sends *one correction* —
to party 0, or to whichever party a material needs — so that the shares sum to
the right value.  Every other piece never crosses the network.

Only party 0 sends requests (SPMD: every party asks for the same material in
the same order, so the others just advance their counter).  A request is a
small msgpack map, validated by the dealer before it allocates anything.

Adding a material: subclass :class:`Material`, implement ``draw`` (a party's
seed-derived parts), ``deliveries`` (what a party receives), ``combine``
(the dealer's corrections) and ``assemble`` (a party's final material), and
register it in :data:`MATERIALS`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, ClassVar

import msgpack
import numpy as np

from . import bilinear
from .comm import Communicator
from .errors import ProtocolError
from .prg import Stream

__all__ = [
    "Material",
    "BeaverTriple",
    "TruncationPair",
    "OwnedTriple",
    "MATERIALS",
    "register_material",
    "DealerClient",
    "serve_dealer",
    "MAX_MATERIAL_ELEMENTS",
    "WEIGHT_STREAM_TAG",
]

#: stream ids under a dealer seed with this tag belong to named weights, not to requests
WEIGHT_STREAM_TAG = 1 << 56
#: largest tensor the dealer will make for one request (elements); guards its memory.
MAX_MATERIAL_ELEMENTS = 1 << 31

Receive = Callable[[tuple[int, ...], Any], np.ndarray]


class Material:
    """One kind of correlated randomness."""

    name: ClassVar[str]

    def validate(self, params: dict[str, Any]) -> None:
        """Raise ``ValueError`` if the (peer-supplied) parameters are unacceptable."""

    def draw(self, rank: int, stream: Stream, params: dict[str, Any]) -> tuple:
        """Party ``rank``'s parts drawn from its own stream (run by the party and the dealer)."""
        raise NotImplementedError

    def deliveries(self, rank: int, params: dict[str, Any]) -> list[tuple[tuple[int, ...], Any]]:
        """The (shape, dtype) of each correction party ``rank`` receives, in order."""
        return []

    def combine(self, draws: list[tuple], params: dict[str, Any]) -> dict[int, list[np.ndarray]]:
        """Dealer side: the corrections to send, per party."""
        raise NotImplementedError

    def assemble(self, rank: int, drawn: tuple, received: list[np.ndarray], params: dict[str, Any]) -> tuple:
        """Party side: the final material from the drawn parts and the corrections."""
        raise NotImplementedError


def _shape(params: dict[str, Any], key: str) -> tuple[int, ...]:
    raw = params.get(key)
    if not isinstance(raw, (list, tuple)) or len(raw) > 8 or not all(isinstance(d, int) and d >= 0 for d in raw):
        raise ValueError(f"{key!r} must be a list of at most 8 non-negative ints, got {raw!r}")
    shape = tuple(raw)
    if int(np.prod(shape, dtype=object)) > MAX_MATERIAL_ELEMENTS:
        raise ValueError(f"{key!r} {shape} exceeds {MAX_MATERIAL_ELEMENTS} elements")
    return shape


class BeaverTriple(Material):
    """(a, b, c = f(a, b)) for a bilinear f in {mul, matmul, conv2d}.

    Params: ``op``, ``a`` and ``b`` shapes, and conv2d options for ``conv2d``.
    Dealer traffic: |c| ring elements (8 B each) to party 0; nothing to the others.
    """

    name = "triple"

    def validate(self, params: dict[str, Any]) -> None:
        if params.get("op") not in bilinear.BILINEAR_OPS:
            raise ValueError(f"unknown bilinear op {params.get('op')!r}")
        c = bilinear.output_shape(params["op"], _shape(params, "a"), _shape(params, "b"), params)
        if int(np.prod(c, dtype=object)) > MAX_MATERIAL_ELEMENTS:
            raise ValueError(f"triple output {c} exceeds {MAX_MATERIAL_ELEMENTS} elements")

    @staticmethod
    def _c_shape(params: dict[str, Any]) -> tuple[int, ...]:
        return bilinear.output_shape(params["op"], tuple(params["a"]), tuple(params["b"]), params)

    def draw(self, rank: int, stream: Stream, params: dict[str, Any]) -> tuple:
        a = stream.ring(tuple(params["a"]))
        b = stream.ring(tuple(params["b"]))
        c = stream.ring(self._c_shape(params)) if rank else None
        return a, b, c

    def deliveries(self, rank: int, params: dict[str, Any]) -> list[tuple[tuple[int, ...], Any]]:
        return [(self._c_shape(params), np.int64)] if rank == 0 else []

    def combine(self, draws: list[tuple], params: dict[str, Any]) -> dict[int, list[np.ndarray]]:
        a = _sum(d[0] for d in draws)
        b = _sum(d[1] for d in draws)
        c = bilinear.evaluate(params["op"], a, b, params)
        for d in draws[1:]:
            c -= d[2]
        return {0: [c]}

    def assemble(self, rank: int, drawn: tuple, received: list[np.ndarray], params: dict[str, Any]) -> tuple:
        a, b, c = drawn
        return (a, b, received[0] if rank == 0 else c)


class OwnedTriple(Material):
    """Masks for a product of a shared x with party ``owner``'s plaintext W (see mpc.protocols.owned).

    Every non-owner j draws A_j and C_j; the owner draws the fixed mask B of
    weight ``weight`` from its seed (the same B on every request for that W).
    The dealer sends the owner C_k = f(Σ A_j, B) − Σ C_j: |z| ring elements.
    """

    name = "owned_triple"

    def validate(self, params: dict[str, Any]) -> None:
        BeaverTriple().validate(params)
        if not isinstance(params.get("owner"), int) or not isinstance(params.get("weight"), int):
            raise ValueError("owned_triple needs integer 'owner' and 'weight'")
        if not 0 <= params["weight"] < 1 << 56:
            raise ValueError(f"weight id {params['weight']} out of range")

    def draw(self, rank: int, stream: Stream, params: dict[str, Any]) -> tuple:
        if rank == params["owner"]:
            b = stream.derive(WEIGHT_STREAM_TAG | params["weight"]).ring(tuple(params["b"]))
            return None, b, None
        a = stream.ring(tuple(params["a"]))
        c = stream.ring(BeaverTriple._c_shape(params))
        return a, None, c

    def deliveries(self, rank: int, params: dict[str, Any]) -> list[tuple[tuple[int, ...], Any]]:
        return [(BeaverTriple._c_shape(params), np.int64)] if rank == params["owner"] else []

    def combine(self, draws: list[tuple], params: dict[str, Any]) -> dict[int, list[np.ndarray]]:
        owner = params["owner"]
        others = [d for r, d in enumerate(draws) if r != owner]
        a = _sum(d[0] for d in others)
        c = bilinear.evaluate(params["op"], a, draws[owner][1], params)
        for d in others:
            c -= d[2]
        return {owner: [c]}

    def assemble(self, rank: int, drawn: tuple, received: list[np.ndarray], params: dict[str, Any]) -> tuple:
        a, b, c = drawn
        return (a, b, received[0]) if rank == params["owner"] else (a, b, c)


def _top_dtype(bits: int) -> type:
    for dt in (np.uint8, np.uint16, np.uint32):
        if bits <= 8 * np.dtype(dt).itemsize:
            return dt
    return np.uint64


class TruncationPair(Material):
    """Shares of a uniform r, of r >> d (logical), and of r's top bit, for exact truncation.

    The top bit is shared modulo 2^d only: the protocol multiplies it by
    2^(64-d), which makes a sharing mod 2^d exact mod 2^64.
    Params: ``shape``, ``bits`` (d, the shift).
    Dealer traffic: 8 B + ceil(d/8) B (rounded to a dtype) per element to party 0.
    """

    name = "trunc"

    def validate(self, params: dict[str, Any]) -> None:
        _shape(params, "shape")
        bits = params.get("bits")
        if not isinstance(bits, int) or not 1 <= bits <= 62:
            raise ValueError(f"truncation bits must be an int in [1, 62], got {bits!r}")

    def draw(self, rank: int, stream: Stream, params: dict[str, Any]) -> tuple:
        shape, bits = tuple(params["shape"]), params["bits"]
        r = stream.ring(shape)
        if rank == 0:
            return r, None, None
        hi = stream.ring(shape)
        top = (stream.ring(shape).view(np.uint64) & np.uint64((1 << bits) - 1)).astype(_top_dtype(bits))
        return r, hi, top

    def deliveries(self, rank: int, params: dict[str, Any]) -> list[tuple[tuple[int, ...], Any]]:
        if rank:
            return []
        shape = tuple(params["shape"])
        return [(shape, np.int64), (shape, _top_dtype(params["bits"]))]

    def combine(self, draws: list[tuple], params: dict[str, Any]) -> dict[int, list[np.ndarray]]:
        bits = params["bits"]
        r = _sum(d[0] for d in draws).view(np.uint64)
        hi = (r >> np.uint64(bits)).view(np.int64)
        top = (r >> np.uint64(63)).astype(np.uint64)
        mask = np.uint64((1 << bits) - 1)
        for d in draws[1:]:
            hi = hi - d[1]
            top = top - d[2].astype(np.uint64)
        return {0: [hi, (top & mask).astype(_top_dtype(bits))]}

    def assemble(self, rank: int, drawn: tuple, received: list[np.ndarray], params: dict[str, Any]) -> tuple:
        r, hi, top = drawn
        if rank == 0:
            hi, top = received
        return r, hi, top


def _sum(arrays) -> np.ndarray:
    it = iter(arrays)
    total = np.array(next(it), dtype=np.int64, copy=True)
    for a in it:
        total += a
    return total


MATERIALS: dict[str, Material] = {}


def register_material(material: Material) -> Material:
    MATERIALS[material.name] = material
    return material


register_material(BeaverTriple())
register_material(TruncationPair())
register_material(OwnedTriple())


# -- wire format of requests -----------------------------------------------------------
def _encode_request(index: int, kind: str, params: dict[str, Any]) -> np.ndarray:
    raw = msgpack.packb({"k": index, "kind": kind, "params": params}, use_bin_type=True)
    return np.frombuffer(raw, dtype=np.uint8)


_MAX_REQUEST_BYTES = 1 << 16


def _decode_request(raw: np.ndarray) -> dict[str, Any]:
    if raw.size > _MAX_REQUEST_BYTES:
        raise ProtocolError(0, f"dealer request of {raw.size} bytes exceeds {_MAX_REQUEST_BYTES}")
    try:
        req = msgpack.unpackb(raw.tobytes(), raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(0, f"undecodable dealer request: {exc}") from exc
    if not isinstance(req, dict) or not isinstance(req.get("kind"), str):
        raise ProtocolError(0, f"malformed dealer request {req!r:.200}")
    return req


# -- party side ------------------------------------------------------------------------
class DealerClient:
    """A computing party's access to the dealer's material.

    Material can be requested ahead of use with :meth:`prefetch`: the dealer
    then produces it while the parties compute, and :meth:`get` consumes it in
    the same order.
    """

    def __init__(self, comm: Communicator, seed: bytes):
        self._comm = comm
        self._seed = seed
        self._next = 0
        self._pending: deque[tuple[int, str, dict[str, Any]]] = deque()

    def _request(self, kind: str, params: dict[str, Any]) -> int:
        if kind not in MATERIALS:
            raise KeyError(f"unknown material {kind!r}; known: {sorted(MATERIALS)}")
        index = self._next
        self._next += 1
        if self._comm.rank == 0:
            self._comm.send_dealer(_encode_request(index, kind, params))
        return index

    def prefetch(self, requests: list[tuple[str, dict[str, Any]]]) -> None:
        """Ask for material now that :meth:`get` will take later, in this order (every party calls it)."""
        for kind, params in requests:
            self._pending.append((self._request(kind, params), kind, params))

    def get(self, kind: str, params: dict[str, Any]) -> tuple:
        """Material of ``kind``; every party must call this in the same order."""
        if self._pending:
            index, want_kind, want_params = self._pending.popleft()
            if (want_kind, want_params) != (kind, params):
                raise RuntimeError(
                    f"material {kind} {params} requested where {want_kind} {want_params} was prefetched; "
                    "prefetch must list requests in the order the program makes them"
                )
        else:
            index = self._request(kind, params)
        material = MATERIALS[kind]
        rank = self._comm.rank
        drawn = material.draw(rank, Stream(self._seed, index), params)
        received = [self._comm.recv_dealer(shape, dtype) for shape, dtype in material.deliveries(rank, params)]
        return material.assemble(rank, drawn, received, params)

    def named_stream(self, stream_id: int) -> Stream:
        """A stream under this party's dealer seed that the dealer can also derive."""
        return Stream(self._seed, stream_id)

    def stop(self) -> None:
        """Tell the dealer this computation is over (party 0 only)."""
        if self._comm.rank == 0:
            self._comm.send_dealer(_encode_request(self._next, "stop", {}))


# -- dealer side -----------------------------------------------------------------------
def serve_dealer(comm: Communicator, seeds: list[bytes]) -> int:
    """Answer party 0's requests until it sends ``stop``; returns the number served.

    Raises:
        ProtocolError: a request is malformed, out of order, or asks for too much.
    """
    index = 0
    while True:
        req = _decode_request(comm.recv_raw(0, None, np.uint8))
        kind = req["kind"]
        if kind == "stop":
            return index
        if req.get("k") != index:
            raise ProtocolError(0, f"dealer request index {req.get('k')!r}, expected {index}")
        material = MATERIALS.get(kind)
        params = req.get("params")
        if material is None or not isinstance(params, dict):
            raise ProtocolError(0, f"unknown material {kind!r} or malformed params")
        try:
            material.validate(params)
            owner = params.get("owner", 0)
            if not isinstance(owner, int) or not 0 <= owner < len(seeds):
                raise ValueError(f"owner {owner!r} is not a party")
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(0, f"invalid {kind} request: {exc}") from exc
        draws = [material.draw(rank, Stream(seed, index), params) for rank, seed in enumerate(seeds)]
        for rank, corrections in sorted(material.combine(draws, params).items()):
            for arr in corrections:
                comm.send_raw(rank, arr)
        index += 1
