"""The frame every comparison shares: masks, the masked opening, the bit injection, the overflow terms.

Every comparison in the engine reduces to DReLU: shares of b = [x >= 0] from
shares of x, where x is a ring element read as a signed integer in the
comparison domain of l bits, -2^(l-1) <= x < 2^(l-1) (64 by default: every
difference of two representable values).  Optionally the same protocol
returns [b * x] (ReLU) and [b * z_k] for extra payload tensors z_k
(selection), exactly, with no extra round.  Two protocols compute the one
non-linear step (step 2): the bitwise one in :mod:`mpc.protocols.compare`
(any n) and the 2-party FSS one in :mod:`mpc.fss`.

Steps:
  0. The dealer draws a uniform mask r in Z_2^64 (additive shares, seed-derived),
     masks r_k for the payloads, and a uniform bit delta.  Write D = l - 1,
     r_low = r mod 2^D and m = bit D of r.
  1. Open y^ = x + r + 2^(l-1) (one round, 8 B per element).  With
     y = x + 2^(l-1), y^ mod 2^l = y + r mod 2^l and, for x in the domain,
     b = msb_l(y) = p XOR m XOR u, where p is bit D of y^ (public) and
     u = [y^_low < r_low] is the borrow out of the low D bits.
  2. XOR shares of u (bitwise circuit, or one DCF key).
  3. Open d = p XOR u XOR e, with e the XOR of the parties' seed-drawn mask
     bits, eps = XOR of the e_i (one round, one bit per element); then
     b = d XOR delta for delta = m XOR eps, which the dealer knows.
  4. Locally: [b] = d + (1 - 2d)[delta];  [b r] = d [r] + (1 - 2d)[delta r];
     [b x] = [b] x^ - [b r] with x^ = x + r;  likewise [b z_k] from
     z^_k = z_k + r_k (opened in step 1) and the dealer's [delta r_k].
The opened values are uniform (y^, z^_k masked by uniform ring elements, d by
the uniform bit eps), so they reveal nothing.  ReLU is exact: no truncation.

Overflow terms (l < 64): shares of a value that is 0 exactly when x was in
the domain, so that an out-of-domain x is detected instead of giving a wrong
bit (:mod:`mpc.protocols.zerocheck` tests them all at once, later).  With
K = 64 - l, Y = y >> D, Y^ = y^ >> D and R = r >> D (integers below 2^(K+1)),
and w = [y + r >= 2^64] the wrap of the 64-bit sum, the integer identity
Y + R + u = Y^ + w 2^(K+1) gives

    o := Y^ - R - u - b = (Y - b) - w 2^(K+1) = 2 (y >> l) - w 2^(K+1),

as b = Y mod 2.  |o| < 2^(K+2) <= 2^50, so o's value in Z_2^64 is that integer.
  - x in the domain means y >> l = 0, so o = -w 2^(K+1); and w = 1 forces
    y^ = y + r - 2^64 < y < 2^l.  Hence for the "strong" elements, y^ >= 2^l
    (public), o = 0 exactly when x is in the domain, and otherwise
    0 < |o| < 2^(K+1): its 2-adic valuation is at most K.
  - For the "weak" elements, y^ < 2^l (probability 2^(l-64) each, whatever x,
    as y^ is uniform), the term is o 2^D mod 2^64 = (y >> l) 2^l mod 2^64:
    0 exactly in the domain, of valuation at most 63 otherwise.
o is linear in what the parties hold: Y^ is public, [R] and [eps] come from
the dealer (16 B per element more, to one party: the material's
``overflow_rank``, the one with less dealer traffic), [b] from
step 4, and [u] = q + (1 - 2q)[eps] with q = d XOR p public after step 3.
No extra round.

With slack k (the k low bits left out of step 2) u and b are the slack ones;
then Y^ - R - u = Y + f with f = [exact borrow] - [slack borrow] in {0, 1},
and o = 2 floor((Y + f)/2) - w 2^(K+1).  f = 1 only when the low D bits of y
lie within 2^k below 2^D.  So a passing check still means every bit is exact
except where |x| < 2^k (the documented blur) or x is within 2^k below
-2^(l-1) (where b = 0, the right sign); and x within 2^k below 2^(l-1) may
be flagged although it is in the domain: with slack the usable domain is
-2^(l-1) <= x < 2^(l-1) - 2^k.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numba
import numpy as np

from ..errors import ConfigError
from ..prg import Stream

if TYPE_CHECKING:
    from ..context import Context

__all__ = [
    "COMPARISON_METHODS",
    "MIN_BITS",
    "MAX_BITS",
    "MIN_COMPARED_BITS",
    "MAX_COMPARE_ELEMENTS",
    "MAX_PAYLOADS",
    "INJECTION_RANK",
    "COINS_BYTES",
    "check_comparison_options",
    "check_comparison_slack",
    "validate_compare_params",
    "compare_params",
    "compared_bits",
    "overflow_checked",
    "DRelu",
    "OverflowTerms",
    "InjectionMasks",
    "Opened",
    "draw_injection",
    "injection_delivery",
    "injection_corrections",
    "assemble_injection",
    "injection_dealer_bytes",
    "open_masked",
    "split_opened",
    "open_xor",
    "finish",
    "overflow_terms",
]

MIN_BITS = 16
MAX_BITS = 64
#: at least this many high bits are compared (the DCF tree keeps one level)
MIN_COMPARED_BITS = 8
#: largest batch of comparisons in one request; guards the dealer's memory
#: (callers split larger batches: see mpc.nonlinear.drelu)
MAX_COMPARE_ELEMENTS = 1 << 23
MAX_PAYLOADS = 4096
#: the party that receives the arithmetic corrections of the injection (delta, delta r, delta r_k)
INJECTION_RANK = 1
#: public coin bytes derived from each opening (keys of the zero check's coefficients)
COINS_BYTES = 16

#: ``Context.comparison`` values: "auto" is "fss" for 2 parties and "generic" otherwise
COMPARISON_METHODS = ("auto", "fss", "generic")

_U64 = np.uint64


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
            "representable value, 32 suffices when compared differences stay below 2^(31 - frac_bits)"
        )
    if method == "auto":
        method = "fss" if parties == 2 else "generic"
    return method, bits


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


def validate_compare_params(params: dict[str, Any], *, max_elements: int = MAX_COMPARE_ELEMENTS) -> None:
    """The fields every comparison material shares: n, bits, with_x, payloads, slack."""
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


def compare_params(n: int, bits: int, with_x: bool, payloads: int, slack: int) -> dict[str, Any]:
    return {"n": n, "bits": bits, "with_x": with_x, "payloads": payloads, "slack": slack}


def compared_bits(bits: int, slack: int) -> int:
    """Width of the borrow comparison: the D = l - 1 low bits less the ``slack`` ignored ones."""
    return bits - 1 - slack


def overflow_checked(bits: int) -> bool:
    """Whether a domain can be left at all (every int64 lies in the 64-bit one)."""
    return bits < MAX_BITS


class OverflowTerms(NamedTuple):
    """Shares of one term per element, 0 exactly when the compared value was in the l-bit domain.

    ``weak`` (public) marks the elements whose term may have any 2-adic
    valuation; the others' nonzero terms have valuation at most 64 - l.
    """

    z: np.ndarray
    weak: np.ndarray
    bits: int

    @property
    def max_valuation(self) -> int:
        return MAX_BITS - self.bits


class DRelu(NamedTuple):
    """Shares of b = [x >= 0] (0/1 ring integers), of b * x (if asked) and of b * z_k.

    ``overflow``: the terms the zero check must find 0 (None at l = 64);
    ``coins``: public bytes no one could predict before the masks were drawn.
    """

    bit: np.ndarray
    relu: np.ndarray | None
    products: list[np.ndarray]
    overflow: OverflowTerms | None = None
    coins: bytes = b""


# -- the masks and the bit injection (steps 0, 1, 3, 4) ------------------------------------
class InjectionMasks(NamedTuple):
    """One party's masks: r, r_k (payloads), e (mask bits of d), and shares of delta, delta r,
    delta r_k, and (l < 64) of R = r >> (l - 1) and of eps, the XOR of the e_i."""

    r: np.ndarray
    rz: np.ndarray
    e: np.ndarray
    delta: np.ndarray | None
    delta_r: np.ndarray | None
    delta_rz: np.ndarray | None
    high: np.ndarray | None = None
    eps: np.ndarray | None = None


# Every function below takes the material's ``overflow_rank``: the party that receives the
# corrections of the overflow terms (R, eps).  Each material picks the party its own key
# material loads less, so that the domain check's 16 B per comparison balance the two.
def draw_injection(rank: int, stream: Stream, params: dict[str, Any], *, overflow_rank: int) -> InjectionMasks:
    n, w, with_x = params["n"], params["payloads"], params["with_x"]
    r = stream.ring(n)
    rz = stream.ring((w, n))
    e = stream.bits(n)
    masks = InjectionMasks(r, rz, e, None, None, None)
    if rank != INJECTION_RANK:
        masks = masks._replace(delta=stream.ring(n), delta_r=stream.ring(n) if with_x else None,
                               delta_rz=stream.ring((w, n)))
    if rank != overflow_rank and overflow_checked(params["bits"]):
        masks = masks._replace(high=stream.ring(n), eps=stream.ring(n))
    return masks


def _correction_rows(rank: int, params: dict[str, Any], overflow_rank: int) -> int:
    """Rows of corrections the dealer sends ``rank`` (the rest of its shares come from its seed)."""
    rows = 0
    if rank == INJECTION_RANK:
        rows += 1 + int(params["with_x"]) + params["payloads"]
    if rank == overflow_rank and overflow_checked(params["bits"]):
        rows += 2
    return rows


def injection_dealer_bytes(rank: int, bits: int, with_x: bool, payloads: int, *, overflow_rank: int) -> int:
    """Bytes per element party ``rank`` receives for the injection and the overflow terms."""
    return 8 * _correction_rows(rank, {"with_x": with_x, "payloads": payloads, "bits": bits}, overflow_rank)


def injection_delivery(rank: int, params: dict[str, Any], *, overflow_rank: int) -> list[tuple[tuple[int, ...], Any]]:
    """The one array (or nothing) ``rank`` receives; it goes last in a material's deliveries."""
    rows = _correction_rows(rank, params, overflow_rank)
    return [((rows, params["n"]), np.int64)] if rows else []


def injection_corrections(draws: Sequence[InjectionMasks], m: np.ndarray, params: dict[str, Any], *,
                          overflow_rank: int) -> dict[int, np.ndarray]:
    """Dealer: INJECTION_RANK's shares of delta = m XOR eps, delta r, delta r_k, and
    ``overflow_rank``'s of R and eps: one array per receiving party."""
    r = _sum(d.r for d in draws)
    eps = np.bitwise_xor.reduce([d.e for d in draws]).astype(np.int64)
    delta = (m ^ eps).astype(np.int64)
    others = [d for i, d in enumerate(draws) if i != INJECTION_RANK]
    rows = [delta - _sum(d.delta for d in others)]
    if params["with_x"]:
        rows.append(delta * r - _sum(d.delta_r for d in others))
    if params["payloads"]:
        rz = _sum(d.rz for d in draws)
        rows.extend(delta * rz - _sum(d.delta_rz for d in others))
    out = {INJECTION_RANK: rows}
    if overflow_checked(params["bits"]):
        others = [d for i, d in enumerate(draws) if i != overflow_rank]
        high = (r.view(_U64) >> _U64(params["bits"] - 1)).view(np.int64)
        out.setdefault(overflow_rank, []).extend([high - _sum(d.high for d in others), eps - _sum(d.eps for d in others)])
    return {rank: np.stack(part) for rank, part in out.items()}


def assemble_injection(rank: int, drawn: InjectionMasks, received: list[np.ndarray], params: dict[str, Any], *,
                       overflow_rank: int) -> InjectionMasks:
    """``rank``'s masks from its seed draws and ``received``, its material's deliveries (the
    injection's array, if any, is the last)."""
    if not injection_delivery(rank, params, overflow_rank=overflow_rank):
        return drawn
    row = iter(received[-1])
    if rank == INJECTION_RANK:
        delta = next(row)
        delta_r = next(row) if params["with_x"] else None
        delta_rz = np.stack([next(row) for _ in range(params["payloads"])]) if params["payloads"] else np.zeros((0, params["n"]), np.int64)
        drawn = drawn._replace(delta=delta, delta_r=delta_r, delta_rz=delta_rz)
    if rank == overflow_rank and overflow_checked(params["bits"]):
        drawn = drawn._replace(high=next(row), eps=next(row))
    return drawn


class Opened(NamedTuple):
    """What step 1 makes public: y^ (all 64 bits), x^ = x + r (if asked), the z^_k rows, and coins."""

    y_hat: np.ndarray
    x_hat: np.ndarray | None
    z_hat: np.ndarray
    coins: bytes


def open_masked(
    ctx: "Context", x: np.ndarray, payloads: Sequence[np.ndarray], masks: InjectionMasks, bits: int, with_x: bool
) -> Opened:
    """Step 1: open y^ = x + r + 2^(l-1) and z^_k = z_k + r_k in one round (8 B per element each).

    All 64 bits of y^ are opened: the overflow terms need its high part.  The
    coins hash the first two values of y^: public, and uniform to anyone
    but the dealer until the masks were drawn.
    """
    offset = _U64(1) << _U64(bits - 1)
    masked = (x.view(_U64) + masks.r.view(_U64)).view(np.int64)
    if ctx.rank == 0:
        masked = (masked.view(_U64) + offset).view(np.int64)
    z_masked = [np.asarray(z, np.int64).reshape(-1) + masks.rz[k] for k, z in enumerate(payloads)]
    opened = ctx.comm.open([masked, *z_masked])
    y_hat = opened[0].view(_U64)
    x_hat = (y_hat - offset).view(np.int64) if with_x else None
    z_hat = np.stack(opened[1:]) if payloads else np.zeros((0, x.size), np.int64)
    digest = hashlib.sha256(b"primia/drelu/coins/v1" + y_hat.size.to_bytes(8, "little") + y_hat[:2].tobytes())
    return Opened(y_hat, x_hat, z_hat, digest.digest()[:COINS_BYTES])


def split_opened(y_hat: np.ndarray, bits: int, slack: int) -> tuple[np.ndarray, np.ndarray]:
    """(p, point): bit D = l - 1 of y^ and the compared low bits, y^ mod 2^D without the slack bits."""
    dom = bits - 1
    p = ((y_hat >> _U64(dom)) & _U64(1)).astype(np.uint8)
    point = (y_hat & _U64((1 << dom) - 1)) >> _U64(slack)
    return p, point


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


@numba.njit(cache=True, nogil=True)
def _overflow_kernel(y_hat, d, p, high, eps, bit, party0, bits, z, weak):  # pragma: no cover - compiled
    """z = o = Y^ - R - u - b (party 0 adds the public Y^ - q), or o 2^D where y^ < 2^l; uint64, wrapping."""
    one = np.uint64(1)
    dom = np.uint64(bits - 1)
    limit = one << np.uint64(bits)
    for i in range(y_hat.shape[0]):
        q = np.uint64(d[i] ^ p[i])
        sign = one - (q << one)  # 1 - 2q: 1 or -1 mod 2^64
        e = np.uint64(0) - high[i] - sign * eps[i] - bit[i]
        if party0:
            e += (y_hat[i] >> dom) - q
        w = y_hat[i] < limit
        weak[i] = w
        z[i] = (e << dom) if w else e


def overflow_terms(
    rank: int, y_hat: np.ndarray, d: np.ndarray, p: np.ndarray, masks: InjectionMasks, bit: np.ndarray, bits: int
) -> OverflowTerms:
    """This party's shares of the overflow terms (module docstring), from public y^, d, p and its shares."""
    n = y_hat.size
    z = np.empty(n, np.uint64)
    weak = np.empty(n, np.bool_)
    _overflow_kernel(
        y_hat, d, p, masks.high.view(_U64), masks.eps.view(_U64), bit.view(_U64), rank == 0, bits, z, weak
    )
    return OverflowTerms(z.view(np.int64), weak, bits)


def finish(
    ctx: "Context",
    u_share: np.ndarray,
    p: np.ndarray,
    masks: InjectionMasks,
    opened: Opened,
    bits: int,
) -> DRelu:
    """Steps 3-4: from XOR shares of the borrow u, open d, inject b = d XOR delta, and the overflow terms."""
    d_share = u_share ^ masks.e
    if ctx.rank == 0:
        d_share = d_share ^ p
    d = open_xor(ctx, d_share)
    n = d.size
    party0 = ctx.rank == 0
    none = np.zeros(0, np.int64)
    bit = np.empty(n, np.int64)
    x_hat, z_hat = opened.x_hat, opened.z_hat
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
    terms = overflow_terms(ctx.rank, opened.y_hat, d, p, masks, bit, bits) if overflow_checked(bits) else None
    return DRelu(bit, relu, products, terms, opened.coins)


def _sum(arrays) -> np.ndarray:
    it = iter(arrays)
    total = np.array(next(it), dtype=np.int64, copy=True)
    for a in it:
        total += a
    return total
