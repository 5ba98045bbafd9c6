"""Generic secure comparison for any number of parties: the borrow by a bitwise circuit.

The frame (masks, opening y^ = x + r + 2^(l-1), injecting the bit, the
overflow terms) is in :mod:`mpc.protocols.drelu`; this module computes its
step 2, XOR shares of the borrow u = [y^_low < r_low] over the D = l - 1 low
bits (Damgård-Fitzi-Kiltz-Nielsen-Toft style, with lookup tables):
  split the D low bits into K = ceil(D/4) chunks of 4 bits.  For each chunk j the
  dealer XOR-shares the one-hot vector of r_j (16 bits).  With the public chunk
  v_j of y^, each party gets XOR shares of lt_j = [v_j < r_j] (parity of its
  share AND the public mask of positions above v_j) and eq_j = [v_j = r_j] (bit
  v_j of its share), locally.  A log-depth tree combines (hi, lo) pairs:
  LT = lt_hi XOR (eq_hi AND lt_lo) (the two terms are exclusive), EQ = eq_hi AND
  eq_lo, with XOR-shared Beaver AND triples; the two ANDs of a node share their
  mask for eq_hi, and EQ is only computed where a later node uses it.

Slack: with k > 0 the k low bits of y^_low and r_low are dropped before
comparing (fewer chunks, smaller FSS keys).  The borrow then differs from the
exact one only when the high parts are equal, i.e. |x| < 2^k (or x within
2^k of the domain edge): comparisons may go either way for differences below
2^k units, and ReLU or max is off by less than 2^k units there.

Cost per element, n parties, l-bit domain, K = ceil((l-1-k)/4) chunks,
T = ceil(log2 K) tree levels, A = AND gates, O = opened bits, w payloads:
  rounds: 1 + T + 1  (l = 64: 6; l = 32: 5)
  sent per party: (n-1) * [8 + 8 w + (O + 1) / 8] B
  dealer: 2K B of tables + A/8 B of AND corrections (A rows of ceil(N/8) B) to party 0;
          8 (1 + [with x] + w + 2 [l < 64]) B of arithmetic corrections to party 1.
  l = 64: K = 16, A = 26, O = 41;  l = 32: K = 8, A = 11, O = 18.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from ..dealer import Material, register_material
from ..prg import Stream
from .drelu import (
    COMPARISON_METHODS,
    INJECTION_RANK,
    MAX_BITS,
    MAX_COMPARE_ELEMENTS,
    MIN_BITS,
    DRelu,
    InjectionMasks,
    assemble_injection,
    check_comparison_options,
    check_comparison_slack,
    compare_params,
    compared_bits,
    draw_injection,
    finish,
    injection_corrections,
    injection_dealer_bytes,
    injection_delivery,
    open_masked,
    split_opened,
    validate_compare_params,
)

if TYPE_CHECKING:
    from ..context import Context

__all__ = [
    # the frame's options, re-exported where callers have always found them
    "COMPARISON_METHODS",
    "check_comparison_options",
    "check_comparison_slack",
    "MIN_BITS",
    "MAX_BITS",
    "MAX_COMPARE_ELEMENTS",
    "DRelu",
    # the bitwise protocol
    "CHUNK_BITS",
    "TreePlan",
    "tree_plan",
    "bitwise_costs",
    "BitwiseCompare",
    "drelu_bitwise",
]

CHUNK_BITS = 4

_U64 = np.uint64


# -- the bitwise borrow (step 2) ---------------------------------------------------------
@dataclass(frozen=True)
class TreePlan:
    """The combining tree over K chunks, identical at the dealer and every party.

    Nodes 0..K-1 are the chunks, most significant first; internal nodes get
    the next ids.  ``levels[t]`` lists (hi, lo, parent) triples; ``need_eq[node]``
    says whether a later node uses the node's EQ.
    """

    chunks: int
    levels: tuple[tuple[tuple[int, int, int], ...], ...]
    need_eq: tuple[bool, ...]

    @property
    def and_gates(self) -> int:
        return sum(1 + self.need_eq[p] for level in self.levels for _, _, p in level)

    @property
    def opened_bits(self) -> int:
        return sum(2 + self.need_eq[p] for level in self.levels for _, _, p in level)

    def level_counts(self, t: int) -> tuple[int, int]:
        """(pairs, pairs that also need EQ) at level t."""
        level = self.levels[t]
        return len(level), sum(self.need_eq[p] for _, _, p in level)


@lru_cache(maxsize=None)
def tree_plan(chunks: int) -> TreePlan:
    levels: list[tuple[tuple[int, int, int], ...]] = []
    nodes = list(range(chunks))
    next_id = chunks
    while len(nodes) > 1:
        pairs, merged = [], []
        for i in range(0, len(nodes) - 1, 2):
            pairs.append((nodes[i], nodes[i + 1], next_id))
            merged.append(next_id)
            next_id += 1
        if len(nodes) % 2:
            merged.append(nodes[-1])  # the least significant node waits a level
        levels.append(tuple(pairs))
        nodes = merged
    need = [False] * next_id
    for level in reversed(levels):
        for hi, lo, parent in level:
            need[hi] = True
            need[lo] = need[parent]
    return TreePlan(chunks, tuple(levels), tuple(need))


def _chunks(bits: int, slack: int = 0) -> int:
    return -(-compared_bits(bits, slack) // CHUNK_BITS)


def bitwise_costs(bits: int, parties: int, *, with_x: bool = True, payloads: int = 0, slack: int = 0) -> dict[str, float]:
    """Exact per-element costs of :func:`drelu_bitwise` (see the module docstring)."""
    plan = tree_plan(_chunks(bits, slack))
    # per element; the bit-packed rows round up to whole bytes per row
    return {
        "rounds": 2 + len(plan.levels),
        "bytes_sent": (parties - 1) * (8 + 8 * payloads + (plan.opened_bits + 1) / 8),
        "dealer_bytes_party0": 2 * plan.chunks + plan.and_gates / 8 + injection_dealer_bytes(0, bits, with_x, payloads, overflow_rank=BitwiseCompare.overflow_rank),
        "dealer_bytes_party1": injection_dealer_bytes(1, bits, with_x, payloads, overflow_rank=BitwiseCompare.overflow_rank),
        "and_gates": plan.and_gates,
    }


class _Triples(NamedTuple):
    """One tree level's XOR-shared AND triples, bit-packed along the elements (rows x ceil(n/8))."""

    a: np.ndarray  # (pairs, nb): masks of eq_hi
    b1: np.ndarray  # (pairs, nb): masks of lt_lo
    b2: np.ndarray  # (eq pairs, nb): masks of eq_lo
    c1: np.ndarray | None  # a AND b1
    c2: np.ndarray | None  # a[eq rows] AND b2


class _BitwiseDraw(NamedTuple):
    masks: InjectionMasks
    tables: np.ndarray | None  # (K, n) uint16 one-hot shares, most significant chunk first
    triples: list[_Triples]


def _stream_array(stream: Stream, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """Uniform values of an unsigned integer dtype from the stream."""
    count = shape[0] * shape[1] * np.dtype(dtype).itemsize
    return stream.ring(-(-count // 8)).view(np.uint8)[:count].view(dtype).reshape(shape)


def _packed_bytes(n: int) -> int:
    return -(-n // 8)


class BitwiseCompare(Material):
    """Masks, one-hot chunk tables and AND triples for :func:`drelu_bitwise` (any n).

    Params: ``n`` elements, ``bits`` (the domain l), ``with_x``, ``payloads`` (w).
    Dealer traffic: party 0 gets 2K bytes per element of table corrections and
    A rows of ceil(n/8) bytes of AND-triple corrections; party 1 gets
    8 (1 + with_x + w) bytes per element; the others nothing.
    """

    name = "cmp_bitwise"
    #: party 0 gets the tables and AND triples (17.4 B at l = 32), more than party 1's injection
    #: corrections (16 B for a ReLU): the domain check's go to party 1
    overflow_rank = INJECTION_RANK

    def validate(self, params: dict[str, Any]) -> None:
        validate_compare_params(params)

    def _plan(self, params: dict[str, Any]) -> TreePlan:
        return tree_plan(_chunks(params["bits"], params.get("slack", 0)))

    def draw(self, rank: int, stream: Stream, params: dict[str, Any]) -> _BitwiseDraw:
        n = params["n"]
        nb = _packed_bytes(n)
        plan = self._plan(params)
        masks = draw_injection(rank, stream, params, overflow_rank=self.overflow_rank)
        tables = None if rank == 0 else _stream_array(stream, (plan.chunks, n), np.uint16)
        triples = []
        for t in range(len(plan.levels)):
            pairs, eqs = plan.level_counts(t)
            a, b1 = _stream_array(stream, (pairs, nb), np.uint8), _stream_array(stream, (pairs, nb), np.uint8)
            b2 = _stream_array(stream, (eqs, nb), np.uint8)
            c1 = None if rank == 0 else _stream_array(stream, (pairs, nb), np.uint8)
            c2 = None if rank == 0 else _stream_array(stream, (eqs, nb), np.uint8)
            triples.append(_Triples(a, b1, b2, c1, c2))
        return _BitwiseDraw(masks, tables, triples)

    def deliveries(self, rank: int, params: dict[str, Any]) -> list[tuple[tuple[int, ...], Any]]:
        n = params["n"]
        plan = self._plan(params)
        if rank == 0:
            return [((plan.chunks, n), np.uint16), ((plan.and_gates, _packed_bytes(n)), np.uint8)] + injection_delivery(rank, params, overflow_rank=self.overflow_rank)
        return injection_delivery(rank, params, overflow_rank=self.overflow_rank)

    def combine(self, draws: list[_BitwiseDraw], params: dict[str, Any]) -> dict[int, list[np.ndarray]]:
        bits, slack = params["bits"], params.get("slack", 0)
        plan = self._plan(params)
        r = _sum(d.masks.r for d in draws).view(_U64)
        low = (r & _U64((1 << (bits - 1)) - 1)) >> _U64(slack)
        m = ((r >> _U64(bits - 1)) & _U64(1)).astype(np.uint8)
        tables = np.empty((plan.chunks, r.size), dtype=np.uint16)
        for node in range(plan.chunks):  # most significant chunk first
            chunk = ((low >> _U64(CHUNK_BITS * (plan.chunks - 1 - node))) & _U64(15)).astype(np.uint16)
            np.left_shift(np.uint16(1), chunk, out=tables[node])
        for d in draws[1:]:
            tables ^= d.tables
        c_rows = []
        for t in range(len(plan.levels)):
            a = _xor_all(d.triples[t].a for d in draws)
            b1 = _xor_all(d.triples[t].b1 for d in draws)
            b2 = _xor_all(d.triples[t].b2 for d in draws)
            eq_rows = [i for i, (_, _, p) in enumerate(plan.levels[t]) if plan.need_eq[p]]
            c1 = a & b1
            c2 = a[eq_rows] & b2
            for d in draws[1:]:
                c1 ^= d.triples[t].c1
                c2 ^= d.triples[t].c2
            c_rows.extend([c1, c2])
        packed = np.concatenate(c_rows) if c_rows else np.zeros((0, _packed_bytes(r.size)), np.uint8)
        out = {0: [tables, packed]}
        for rank, corrections in injection_corrections([d.masks for d in draws], m, params,
                                                        overflow_rank=self.overflow_rank).items():
            out.setdefault(rank, []).append(corrections)
        return out

    def assemble(self, rank: int, drawn: _BitwiseDraw, received: list[np.ndarray], params: dict[str, Any]) -> _BitwiseDraw:
        plan = self._plan(params)
        masks = assemble_injection(rank, drawn.masks, received, params, overflow_rank=self.overflow_rank)
        if rank != 0:
            return drawn._replace(masks=masks)
        tables, packed = received[0], received[1]
        triples, at = [], 0
        for t, tri in enumerate(drawn.triples):
            pairs, eqs = plan.level_counts(t)
            triples.append(tri._replace(c1=packed[at : at + pairs], c2=packed[at + pairs : at + pairs + eqs]))
            at += pairs + eqs
        return _BitwiseDraw(masks, tables, triples)


register_material(BitwiseCompare())

# parity of every 16-bit value, and the positions strictly above each chunk value
_PARITY16 = (np.unpackbits(np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2), axis=1).sum(axis=1) & 1).astype(np.uint8)
_ABOVE = np.array([(0xFFFF << (v + 1)) & 0xFFFF for v in range(1 << CHUNK_BITS)], dtype=np.uint16)


def _open_xor_packed(ctx: "Context", packed: np.ndarray) -> np.ndarray:
    """Reveal XOR-shared packed bits (any shape of uint8) to every party, one round."""
    flat = np.ascontiguousarray(packed).reshape(-1)
    peers = ctx.comm.peers
    got = ctx.comm.exchange({p: flat for p in peers}, {p: (flat.shape, np.uint8) for p in peers})
    total = flat.copy()
    for arr in got.values():
        total ^= arr
    return total.reshape(packed.shape)


def _and_level(
    ctx: "Context", tri: _Triples, hi_eq: np.ndarray, lo_lt: np.ndarray, lo_eq: np.ndarray, eq_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """XOR shares of hi_eq AND lo_lt (every row) and hi_eq[eq_rows] AND lo_eq, in one round.

    All operands are bit-packed rows.  The two ANDs of a row share the mask a
    of hi_eq, so each node opens hi_eq XOR a once: 2 bits per LT gate, 1 more
    per EQ gate.
    """
    pairs, eqs = hi_eq.shape[0], lo_eq.shape[0]
    opened = _open_xor_packed(ctx, np.concatenate([hi_eq ^ tri.a, lo_lt ^ tri.b1, lo_eq ^ tri.b2]))
    e, d1, d2 = opened[:pairs], opened[pairs : 2 * pairs], opened[2 * pairs : 2 * pairs + eqs]
    e_eq, a_eq = e[eq_rows], tri.a[eq_rows]
    z1 = tri.c1 ^ (e & tri.b1) ^ (d1 & tri.a)
    z2 = tri.c2 ^ (e_eq & tri.b2) ^ (d2 & a_eq)
    if ctx.rank == 0:
        z1 ^= e & d1
        z2 ^= e_eq & d2
    return z1, z2


def drelu_bitwise(
    ctx: "Context",
    x: np.ndarray,
    *,
    bits: int = MAX_BITS,
    with_x: bool = False,
    payloads: Sequence[np.ndarray] = (),
    slack: int = 0,
) -> DRelu:
    """Shares of [x >= 0] (and of [x >= 0] * x, * z_k) for any number of parties.

    ``x`` holds ring integers (any scale) in the domain -2^(bits-1) <= x <
    2^(bits-1); outside it the result's overflow terms are nonzero (the
    caller hands them to the zero check).  ``payloads`` are arrays of x's size.
    With ``slack`` = k > 0 the k low bits are not compared: the bit may be
    wrong for |x| < 2^k.  Rounds: 2 + ceil(log2 ceil((bits-1-k)/4)).
    """
    x = np.ascontiguousarray(x, dtype=np.int64).reshape(-1)
    n = x.size
    params = compare_params(n, bits, with_x, len(payloads), slack)
    draw: _BitwiseDraw = ctx.dealer.get(BitwiseCompare.name, params)
    plan = tree_plan(_chunks(bits, slack))
    opened = open_masked(ctx, x, payloads, draw.masks, bits, with_x)
    p, low = split_opened(opened.y_hat, bits, slack)
    # leaves: XOR shares of lt_j and eq_j from the one-hot tables (most significant
    # chunk first), bit-packed for the tree
    lt: dict[int, np.ndarray] = {}
    eq: dict[int, np.ndarray] = {}
    for node in range(plan.chunks):
        v = ((low >> _U64(CHUNK_BITS * (plan.chunks - 1 - node))) & _U64(15)).astype(np.uint16)
        table = draw.tables[node]
        lt[node] = np.packbits(_PARITY16[table & _ABOVE[v]])
        if plan.need_eq[node]:
            eq[node] = np.packbits(((table >> v) & np.uint16(1)).astype(np.uint8))
    empty = np.zeros((0, _packed_bytes(n)), np.uint8)
    for t, level in enumerate(plan.levels):
        eq_pairs = [i for i, (_, _, parent) in enumerate(level) if plan.need_eq[parent]]
        hi_eq = np.stack([eq[hi] for hi, _, _ in level])
        lo_lt = np.stack([lt[lo] for _, lo, _ in level])
        lo_eq = np.stack([eq[level[i][1]] for i in eq_pairs]) if eq_pairs else empty
        z1, z2 = _and_level(ctx, draw.triples[t], hi_eq, lo_lt, lo_eq, np.asarray(eq_pairs, dtype=np.intp))
        for row, (hi, _, parent) in enumerate(level):
            lt[parent] = lt[hi] ^ z1[row]
        for row, i in enumerate(eq_pairs):
            eq[level[i][2]] = z2[row]
    root = plan.levels[-1][0][2] if plan.levels else 0
    return finish(ctx, np.unpackbits(lt[root], count=n), p, draw.masks, opened, bits)


def _xor_all(arrays) -> np.ndarray:
    it = iter(arrays)
    total = np.array(next(it), copy=True)
    for a in it:
        total ^= a
    return total


def _sum(arrays) -> np.ndarray:
    it = iter(arrays)
    total = np.array(next(it), dtype=np.int64, copy=True)
    for a in it:
        total += a
    return total
