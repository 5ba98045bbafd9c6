"""Secure comparison with the sign of a shared value, for any number of parties.

Every comparison in the engine reduces to DReLU: shares of b = [x >= 0] from
shares of x, where x is a ring element read as a signed integer with
|x| < 2^(l-1) for the comparison domain l (64 by default: every difference of
two representable values, |x| < 2^63).  Optionally the same protocol returns
[b * x] (ReLU) and [b * z_k] for extra payload tensors z_k (selection), exactly,
with no extra round.

Common frame (both the bitwise protocol here and the 2-party FSS protocol in
:mod:`mpc.fss`):
  0. The dealer draws a uniform mask r in Z_2^64 (additive shares, seed-derived),
     masks r_k for the payloads, and a uniform bit delta.  Write D = l - 1,
     r_low = r mod 2^D and m = bit D of r.
  1. Open y^ = x + r + 2^(l-1) (one round).  With y = x + 2^(l-1) in [0, 2^l),
     y^ mod 2^l = y + r mod 2^l and b = msb_l(y) = p XOR m XOR u, where p is bit D
     of y^ (public) and u = [y^_low < r_low] is the borrow out of the low D bits.
  2. Compute XOR shares of u (this module: bitwise, below; FSS: one DCF key).
  3. Open d = p XOR u XOR e, with e the parties' seed-drawn mask bits (one round,
     one bit per element); then b = d XOR delta for delta = m XOR e, which the
     dealer knows.
  4. Locally: [b] = d + (1 - 2d)[delta];  [b r] = d [r] + (1 - 2d)[delta r];
     [b x] = [b] x^ - [b r] with x^ = x + r;  likewise [b z_k] from z^_k = z_k + r_k
     (opened in step 1) and the dealer's [delta r_k].
The opened values are uniform (y^, z^_k masked by uniform ring elements, d by
the uniform bit e), so they reveal nothing.  ReLU is exact: no truncation.

Bitwise u (Damgård-Fitzi-Kiltz-Nielsen-Toft style, with lookup tables):
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
exact one only when the high parts are equal, i.e. |x| < 2^k (or |x| within
2^k of the domain edge): comparisons may go either way for differences below
2^k units, and ReLU or max is off by less than 2^k units there.

Cost per element, n parties, l-bit domain, K = ceil((l-1-k)/4) chunks,
T = ceil(log2 K) tree levels, A = AND gates, O = opened bits:
  rounds: 1 + T + 1  (l = 64: 6; l = 32: 5)
  sent per party: (n-1) * [8 (4 if l <= 32 and no product) + 8 w + (O + 1) / 8] B
  dealer: 2K B of tables + A/8 B of AND corrections (A rows of ceil(N/8) B) to party 0;
          8 (1 + [with x] + w) B of delta corrections to party 1.
  l = 64: K = 16, A = 26, O = 41;  l = 32: K = 8, A = 11, O = 18.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numba
import numpy as np

from ..dealer import Material, register_material
from ..errors import ConfigError
from ..prg import Stream

if TYPE_CHECKING:
    from ..context import Context

__all__ = [
    "COMPARISON_METHODS",
    "check_comparison_options",
    "check_comparison_slack",
    "compared_bits",
    "MIN_COMPARED_BITS",
    "MIN_BITS",
    "MAX_BITS",
    "CHUNK_BITS",
    "MAX_COMPARE_ELEMENTS",
    "MAX_PAYLOADS",
    "INJECTION_RANK",
    "DRelu",
    "InjectionMasks",
    "TreePlan",
    "tree_plan",
    "bitwise_costs",
    "validate_compare_params",
    "draw_injection",
    "injection_delivery",
    "injection_corrections",
    "assemble_injection",
    "open_masked",
    "open_xor",
    "finish",
    "BitwiseCompare",
    "drelu_bitwise",
]

MIN_BITS = 16
MAX_BITS = 64
#: at least this many high bits are compared (the DCF tree keeps one level)
MIN_COMPARED_BITS = 8
CHUNK_BITS = 4
#: largest batch of comparisons in one request; guards the dealer's memory
#: (callers split larger batches: see mpc.nonlinear.drelu)
MAX_COMPARE_ELEMENTS = 1 << 23
MAX_PAYLOADS = 4096
#: the party that receives the arithmetic (delta) corrections; binary ones go to party 0
INJECTION_RANK = 1

_U64 = np.uint64


#: ``Context.comparison`` values: "auto" is "fss" for 2 parties and "generic" otherwise
COMPARISON_METHODS = ("auto", "fss", "generic")


def check_comparison_options(method: str, bits: int, parties: int) -> tuple[str, int]:
    """Validate ``comparison`` and ``comparison_bits``; returns the resolved (method, bits).

    Raises:
        ConfigError: an unknown method, FSS with other than 2 parties, or a
            domain outside [16, 64] bits.
    """
    if method not in COMPARISON_METHODS:
        raise ConfigError(f"comparison must be one of {COMPARISON_METHODS}, got {method!r}")
    if method == "fss" and parties != 2:
        raise ConfigError(f"comparison='fss' needs exactly 2 parties, not {parties}; use 'generic' or 'auto'")
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(
            f"comparison_bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}; 64 covers every "
            "representable value, 32 suffices when compared values stay below 2^(31 - frac_bits)"
        )
    if method == "auto":
        method = "fss" if parties == 2 else "generic"
    return method, bits


class DRelu(NamedTuple):
    """Shares of b = [x >= 0] (0/1 ring integers), of b * x (if asked) and of b * z_k."""

    bit: np.ndarray
    relu: np.ndarray | None
    products: list[np.ndarray]


# -- parameters ----------------------------------------------------------------------
def validate_compare_params(params: dict[str, Any], *, max_elements: int = MAX_COMPARE_ELEMENTS) -> None:
    """The fields every comparison material shares: n, bits, with_x, payloads."""
    n = params.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_elements:
        raise ValueError(f"'n' must be an int in [1, {max_elements}], got {n!r}")
    bits = params.get("bits")
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"'bits' must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not isinstance(params.get("with_x"), bool):
        raise ValueError(f"'with_x' must be a bool, got {params.get('with_x')!r}")
    w = params.get("payloads")
    if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= MAX_PAYLOADS:
        raise ValueError(f"'payloads' must be an int in [0, {MAX_PAYLOADS}], got {w!r}")
    if n * (1 + w) > 2 * max_elements:
        raise ValueError(f"{n} comparisons with {w} payloads each exceed {2 * max_elements} masked elements")
    slack = params.get("slack", 0)
    if not isinstance(slack, int) or isinstance(slack, bool) or not 0 <= slack <= bits - 1 - MIN_COMPARED_BITS:
        raise ValueError(f"'slack' must be an int in [0, bits - {1 + MIN_COMPARED_BITS}], got {slack!r}")


def check_comparison_slack(slack: int, bits: int) -> int:
    """Validate ``comparison_slack_bits`` against the domain; returns it.

    Raises:
        ConfigError: not an int in [0, bits - 9].
    """
    if not isinstance(slack, int) or isinstance(slack, bool) or not 0 <= slack <= bits - 1 - MIN_COMPARED_BITS:
        raise ConfigError(
            f"comparison_slack_bits must be an int in [0, {bits - 1 - MIN_COMPARED_BITS}] for a {bits}-bit domain, "
            f"got {slack!r}; 0 keeps comparisons exact"
        )
    return slack


def _params(n: int, bits: int, with_x: bool, payloads: int, slack: int) -> dict[str, Any]:
    return {"n": n, "bits": bits, "with_x": with_x, "payloads": payloads, "slack": slack}


def compared_bits(bits: int, slack: int) -> int:
    """Width of the borrow comparison: the D = l - 1 low bits less the ``slack`` ignored ones."""
    return bits - 1 - slack


# -- the masks and the bit injection (steps 0, 1, 3, 4), shared with mpc.fss ------------
class InjectionMasks(NamedTuple):
    """One party's masks: r, r_k (payloads), e (mask bits of d), and shares of delta, delta r, delta r_k."""

    r: np.ndarray
    rz: np.ndarray
    e: np.ndarray
    delta: np.ndarray | None
    delta_r: np.ndarray | None
    delta_rz: np.ndarray | None


def draw_injection(rank: int, stream: Stream, params: dict[str, Any]) -> InjectionMasks:
    n, w, with_x = params["n"], params["payloads"], params["with_x"]
    r = stream.ring(n)
    rz = stream.ring((w, n))
    e = stream.bits(n)
    if rank == INJECTION_RANK:
        return InjectionMasks(r, rz, e, None, None, None)
    delta = stream.ring(n)
    delta_r = stream.ring(n) if with_x else None
    delta_rz = stream.ring((w, n))
    return InjectionMasks(r, rz, e, delta, delta_r, delta_rz)


def _injection_rows(params: dict[str, Any]) -> int:
    return 1 + int(params["with_x"]) + params["payloads"]


def injection_delivery(rank: int, params: dict[str, Any]) -> list[tuple[tuple[int, ...], Any]]:
    return [((_injection_rows(params), params["n"]), np.int64)] if rank == INJECTION_RANK else []


def injection_corrections(draws: Sequence[InjectionMasks], m: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Dealer: party INJECTION_RANK's shares of delta = m XOR e, delta r and delta r_k (one array)."""
    r = _sum(d.r for d in draws)
    e = np.bitwise_xor.reduce([d.e for d in draws])
    delta = (m ^ e).astype(np.int64)
    others = [d for i, d in enumerate(draws) if i != INJECTION_RANK]
    rows = [delta - _sum(d.delta for d in others)]
    if params["with_x"]:
        rows.append(delta * r - _sum(d.delta_r for d in others))
    if params["payloads"]:
        rz = _sum(d.rz for d in draws)
        rows.extend(delta * rz - _sum(d.delta_rz for d in others))
    return np.stack(rows)


def assemble_injection(rank: int, drawn: InjectionMasks, received: np.ndarray | None, params: dict[str, Any]) -> InjectionMasks:
    if rank != INJECTION_RANK:
        return drawn
    row = iter(received)
    delta = next(row)
    delta_r = next(row) if params["with_x"] else None
    delta_rz = np.stack([next(row) for _ in range(params["payloads"])]) if params["payloads"] else np.zeros((0, params["n"]), np.int64)
    return drawn._replace(delta=delta, delta_r=delta_r, delta_rz=delta_rz)


def open_masked(
    ctx: "Context", x: np.ndarray, payloads: Sequence[np.ndarray], masks: InjectionMasks, bits: int, with_x: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Step 1: open y^ = x + r + 2^(l-1) and z^_k = z_k + r_k in one round.

    Returns y^ mod 2^l as uint64, x^ = x + r (or None) and the z^ rows.  Only
    the l low bits of y^ are needed when no product is asked, so a domain of
    at most 32 bits opens 4 bytes per element instead of 8.
    """
    offset = _U64(1) << _U64(bits - 1)
    masked = (x.view(_U64) + masks.r.view(_U64)).view(np.int64)
    if ctx.rank == 0:
        masked = (masked.view(_U64) + offset).view(np.int64)
    if not with_x and not payloads and bits <= 32:
        low = masked.view(_U64).astype(np.uint32)
        peers = ctx.comm.peers
        got = ctx.comm.exchange({p: low for p in peers}, {p: (low.shape, np.uint32) for p in peers})
        total = low.copy()
        for arr in got.values():
            total += arr
        return total.astype(_U64), None, np.zeros((0, x.size), np.int64)
    z_masked = [np.asarray(z, np.int64).reshape(-1) + masks.rz[k] for k, z in enumerate(payloads)]
    opened = ctx.comm.open([masked, *z_masked])
    y_hat = opened[0].view(_U64)
    x_hat = (y_hat - offset).view(np.int64) if with_x else None
    low = y_hat if bits == 64 else y_hat & _U64((1 << bits) - 1)
    z_hat = np.stack(opened[1:]) if payloads else np.zeros((0, x.size), np.int64)
    return low, x_hat, z_hat


def open_xor(ctx: "Context", bits: np.ndarray) -> np.ndarray:
    """Reveal XOR-shared bits (uint8 0/1) to every party: one round, ceil(N/8) bytes per peer."""
    packed = np.packbits(bits)
    peers = ctx.comm.peers
    got = ctx.comm.exchange({p: packed for p in peers}, {p: (packed.shape, np.uint8) for p in peers})
    total = packed.copy()  # never mutate a sent array: in-process peers read the same buffer
    for arr in got.values():
        total ^= arr
    return np.unpackbits(total, count=bits.size)


@numba.njit(cache=True, nogil=True)
def _inject(d, delta, delta_r, r, hat, party0, bit_out, prod_out, want_bit):  # pragma: no cover - compiled
    """bit = d + (1 - 2d) delta (party 0 adds d); prod = bit * hat - (d r + (1 - 2d) delta_r), wrapping."""
    for i in range(d.shape[0]):
        di = np.int64(d[i])
        flip = np.int64(1) - 2 * di
        b = flip * delta[i]
        if party0:
            b += di
        if want_bit:
            bit_out[i] = b
        if hat.shape[0]:
            prod_out[i] = b * hat[i] - (di * r[i] + flip * delta_r[i])


def finish(
    ctx: "Context",
    u_share: np.ndarray,
    p: np.ndarray,
    masks: InjectionMasks,
    x_hat: np.ndarray | None,
    z_hat: np.ndarray,
) -> DRelu:
    """Steps 3-4: from XOR shares of the borrow u, open d and inject b = d XOR delta."""
    d_share = u_share ^ masks.e
    if ctx.rank == 0:
        d_share = d_share ^ p
    d = open_xor(ctx, d_share)
    n = d.size
    party0 = ctx.rank == 0
    none = np.zeros(0, np.int64)
    bit = np.empty(n, np.int64)
    relu = np.empty(n, np.int64) if x_hat is not None else None
    if x_hat is not None:
        _inject(d, masks.delta, masks.delta_r, masks.r, x_hat, party0, bit, relu, True)
    else:
        _inject(d, masks.delta, none, none, none, party0, bit, none, True)
    products = []
    for k in range(z_hat.shape[0]):
        out = np.empty(n, np.int64)
        _inject(d, masks.delta, masks.delta_rz[k], masks.rz[k], z_hat[k], party0, none, out, False)
        products.append(out)
    return DRelu(bit, relu, products)


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
    opened_word = 4 if (bits <= 32 and not with_x and not payloads) else 8
    rows = 1 + int(with_x) + payloads
    # per element; the bit-packed rows round up to whole bytes per row
    return {
        "rounds": 2 + len(plan.levels),
        "bytes_sent": (parties - 1) * (opened_word + 8 * payloads + (plan.opened_bits + 1) / 8),
        "dealer_bytes_party0": 2 * plan.chunks + plan.and_gates / 8,
        "dealer_bytes_party1": 8 * rows,
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

    def validate(self, params: dict[str, Any]) -> None:
        validate_compare_params(params)

    def _plan(self, params: dict[str, Any]) -> TreePlan:
        return tree_plan(_chunks(params["bits"], params.get("slack", 0)))

    def draw(self, rank: int, stream: Stream, params: dict[str, Any]) -> _BitwiseDraw:
        n = params["n"]
        nb = _packed_bytes(n)
        plan = self._plan(params)
        masks = draw_injection(rank, stream, params)
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
            return [((plan.chunks, n), np.uint16), ((plan.and_gates, _packed_bytes(n)), np.uint8)]
        return injection_delivery(rank, params)

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
        out.setdefault(INJECTION_RANK, []).append(injection_corrections([d.masks for d in draws], m, params))
        return out

    def assemble(self, rank: int, drawn: _BitwiseDraw, received: list[np.ndarray], params: dict[str, Any]) -> _BitwiseDraw:
        plan = self._plan(params)
        masks = assemble_injection(rank, drawn.masks, received[-1] if rank == INJECTION_RANK else None, params)
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

    ``x`` holds ring integers (any scale) with |x| < 2^(bits-1); ``payloads``
    are arrays of x's size.  With ``slack`` = k > 0 the k low bits are not
    compared: the bit may be wrong for |x| < 2^k (and |x| > 2^(bits-1) - 2^k).
    Rounds: 2 + ceil(log2 ceil((bits-1-k)/4)).
    """
    x = np.ascontiguousarray(x, dtype=np.int64).reshape(-1)
    n = x.size
    params = _params(n, bits, with_x, len(payloads), slack)
    draw: _BitwiseDraw = ctx.dealer.get(BitwiseCompare.name, params)
    plan = tree_plan(_chunks(bits, slack))
    low, x_hat, z_hat = open_masked(ctx, x, payloads, draw.masks, bits, with_x)
    dom = bits - 1
    p = ((low >> _U64(dom)) & _U64(1)).astype(np.uint8)
    low = (low & _U64((1 << dom) - 1)) >> _U64(slack)
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
    return finish(ctx, np.unpackbits(lt[root], count=n), p, draw.masks, x_hat, z_hat)


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
