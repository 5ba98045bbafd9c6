"""Smooth functions of shared tensors by approximation, each with a stated range and error bound.

Every function here is defined on the whole real line (within the
comparison domain, which must hold its inputs): inside its stated range it
is accurate to the bound in docs/nonlinear.md, measured against numpy on a
dense grid (tests/test_approximations.py); outside it either *saturates*
correctly (sigmoid -> 0/1, tanh -> -1/1, silu and gelu -> 0/x, hardswish ->
0/x, exp -> 0 below its range) or the input is *detected*: a range bit that
must be 0 goes to the context's zero check, and the next
``ctx.check_comparisons()`` (run by ``reveal``) raises
:class:`~mpc.errors.ApproximationRangeError` before anything is revealed
(exp above its range, reciprocal, inv_sqrt, sqrt and layer_norm outside theirs).

Piecewise polynomials (sigmoid, tanh, silu, gelu) - one comparison batch
selects between polynomials and the asymptotes, as in the CrypTen/Sigma
family of designs, with the selection riding on the comparison for free:
  1. t = x / T (T a power of two: a change of scale, exact) at 31 fractional
     bits, and its powers t^2 .. t^6 in 3 product batches (each a Beaver
     round and a truncation round);
  2. with breakpoints b_0 < ... < b_m, segment polynomials P_0 .. P_(m-1), and
     Q_-1 = left asymptote, Q_i = P_i, Q_m = right asymptote, the payloads
     z_i = Q_i(t) - Q_(i-1)(t) are local (public coefficients at 27 bits);
  3. one DReLU batch of the m + 1 differences x - b_i carries z_i as payload:
     sum_i [x >= b_i] z_i telescopes to Q_seg(t), *exactly* in the ring: for x
     outside [b_0, b_m) the powers of t overflow, but every party adds the
     same ring values, which cancel, and the asymptote remains;
  4. one truncation from 58 fractional bits to x's.
Every truncation here is the exact protocol, whatever ``ctx.truncation``
says: the powers reach 2^62 and the sums 2^58, where local truncation would
fail with probability up to 1/2 (hardsigmoid and hardswish likewise).
With relu (silu, gelu) the comparison at b = 0 returns relu(x) too.
Rounds: 6 (powers) + R (one comparison batch) + 1.  Error: the table's fit
(<= 3.1e-5, mpc.approx_tables) plus below two units of x's scale.

The older protocols (exp by Taylor and squaring, reciprocal by Newton,
inv_sqrt and sqrt by Goldschmidt, softmax) are documented at each function.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numba
import numpy as np

from .approx_tables import GELU, GELU_TANH, SIGMOID, SILU, TANH, PiecewisePoly
from . import nonlinear
from .nonlinear import drelu
from .protocols.beaver import beaver
from .protocols.truncation import truncate, truncate_exact
from .ring import encode

if TYPE_CHECKING:
    from .context import Context
    from .tensor import SharedTensor

__all__ = [
    "piecewise",
    "sigmoid",
    "tanh",
    "silu",
    "gelu",
    "hardsigmoid",
    "hardswish",
    "exp",
    "reciprocal",
    "inv_sqrt",
    "sqrt",
    "softmax",
    "layer_norm",
    "EXP_RANGE",
    "EXP_CLAMP",
    "POWER_BITS",
]

#: fractional bits of the powers of t = x / T (|t| <= 1 in range: t^2 < 2^62)
POWER_BITS = 31
#: fractional bits of the piecewise coefficients: payloads and sums at 58 bits, |f| < 8
_PIECE_COEFF_BITS = 27
#: exp's input range: below it the argument is clamped to its low end (e^-32 < 2e-14);
#: at or above its high end the input is reported (ApproximationRangeError)
EXP_RANGE = (-32.0, 10.0)
#: softmax clamps exp's argument at -EXP_CLAMP: e^-16 < 1.2e-7 is below one unit at f = 16,
#: and on [-16, 0] every intermediate of exp stays at most 1
EXP_CLAMP = 16.0
_EXP_HALVINGS = 4  # exp(x) = T8(x / 16)^16
_EXP_DEGREE = 8
_COEFF_BITS = 24  # public polynomial coefficients of exp are encoded at this scale
# hardsigmoid / hardswish: 1/6 is encoded at up to this many fractional bits
_SIXTH_BITS = 40


# -- helpers ------------------------------------------------------------------------------
def _minus(x: "SharedTensor", value: float) -> np.ndarray:
    """Shares of x - value at x's own scale (value encoded there), flat."""
    flat = x.share.reshape(-1)
    return flat - encode(value, x.frac_bits) if x.ctx.rank == 0 else flat.copy()


def _exact(ctx: "Context", share: np.ndarray, bits: int) -> np.ndarray:
    """Exact truncation whatever ``ctx.truncation`` says: these values sit near 2^62, where
    local truncation fails with probability up to 1/2 (docs/protocols.md)."""
    flat = np.ascontiguousarray(share, dtype=np.int64)
    return truncate_exact(ctx, flat.reshape(-1), bits).reshape(flat.shape)


def _defer_range(ctx: "Context", function: str, low: float | None, high: float | None,
                 term: np.ndarray, coins: bytes) -> None:
    """Terms that must be 0 (0/1: an input outside [low, high)) go to the zero check."""
    ctx.checks.add(ctx.check_label("range", function, low, high), term, max_valuation=0, coins=coins)


def _stack(tensors: Sequence["SharedTensor"]) -> "SharedTensor":
    scale = max(t.frac_bits for t in tensors)
    return tensors[0]._like(np.stack([t.rescale(scale).share for t in tensors]), scale)


def _stack_mul(left: Sequence["SharedTensor"], right: Sequence["SharedTensor"]) -> list["SharedTensor"]:
    """Several independent elementwise products in one Beaver batch (one round + one truncation)."""
    prod = _stack(left) * _stack(right)
    return [prod[i] for i in range(len(left))]


def _power_plan(degree: int) -> list[tuple[int, list[int]]]:
    """Per batch, (top, js): multiply the largest power so far into each lower one (ceil(log2 d) batches)."""
    plan, have = [], 1
    while have < degree:
        js = list(range(1, min(have, degree - have) + 1))
        plan.append((have, js))
        have += len(js)
    return plan


# -- piecewise polynomials ------------------------------------------------------------------
def _ring_powers(ctx: "Context", t: np.ndarray, degree: int) -> list[np.ndarray | None]:
    """[None, t, t^2, .., t^degree] as shares at POWER_BITS, in ceil(log2 degree) product batches."""
    powers: list[np.ndarray | None] = [None, t]
    for top, js in _power_plan(degree):
        left = np.stack([powers[top]] * len(js))
        right = np.stack([powers[j] for j in js])
        powers.extend(_exact(ctx, beaver(ctx, left, right, "mul"), POWER_BITS))
    return powers


@numba.njit(cache=True, nogil=True)
def _payloads(powers, diffs, party0, power_bits, out):  # pragma: no cover - compiled
    """out[i, k] = sum_j diffs[i, j] powers[j-1, k] (+ diffs[i, 0] << power_bits at party 0), wrapping."""
    rows, width = diffs.shape
    for i in range(rows):
        const = (diffs[i, 0] << np.uint64(power_bits)) if party0 else np.uint64(0)
        for k in range(powers.shape[1]):
            acc = const
            for j in range(1, width):
                acc += diffs[i, j] * powers[j - 1, k]
            out[i, k] = acc


def _coefficient_rows(table: PiecewisePoly) -> np.ndarray:
    """Integer coefficients (at _PIECE_COEFF_BITS) of Q_-1 = left, the segments, Q_m = right."""
    width = table.degree + 1
    rows = [[table.left] + [0.0] * table.degree]
    rows += [list(c) + [0.0] * (width - len(c)) for c in table.coeffs]
    rows.append([table.right] + [0.0] * table.degree)
    return np.array([[round(v * 2**_PIECE_COEFF_BITS) for v in row] for row in rows], dtype=np.int64)


def piecewise(x: "SharedTensor", table: PiecewisePoly, *, with_relu: bool = False) -> Any:
    """The function ``table`` describes (mpc.approx_tables), on every x; with ``with_relu``
    also relu(x) from the same comparisons (the table must have a breakpoint at 0).

    See the module docstring for the protocol.  Returns the result at x's
    scale (and relu(x)).
    """
    ctx, f = x.ctx, x.frac_bits
    if any(b * 2.0**f != round(b * 2.0**f) for b in table.breaks):
        raise ValueError(f"{table.name} needs its breakpoints {table.breaks} exact at the input's scale; "
                         f"{f} fractional bits are too few (use at least 3)")
    if x.size == 0:
        empty = x._like(np.zeros(x.shape, np.int64))
        return (empty, empty) if with_relu else empty
    shift = POWER_BITS - f - int(math.log2(table.scale))
    flat = np.ascontiguousarray(x.share, dtype=np.int64).reshape(-1)
    t = flat << np.int64(shift) if shift >= 0 else _exact(ctx, flat, -shift)
    powers = _ring_powers(ctx, t, table.degree)
    ints = _coefficient_rows(table)
    diffs = ints[1:] - ints[:-1]  # payload of [x >= b_i]: Q_i - Q_(i-1), exactly telescoping
    payload = np.empty((len(table.breaks), flat.size), np.uint64)
    _payloads(np.stack(powers[1:]).view(np.uint64), diffs.view(np.uint64), ctx.rank == 0, POWER_BITS, payload)
    payload = payload.view(np.int64)
    shifted = np.concatenate([_minus(x, b) for b in table.breaks])
    res = drelu(ctx, shifted, with_x=with_relu, payloads=[payload.reshape(-1)])
    total = res.products[0].reshape(len(table.breaks), -1).sum(axis=0, dtype=np.int64)
    if ctx.rank == 0:
        total += ints[0, 0] << np.int64(POWER_BITS)
    out = x._like(_exact(ctx, total, _PIECE_COEFF_BITS + POWER_BITS - f).reshape(x.shape))
    if not with_relu:
        return out
    zero = table.breaks.index(0.0)
    return out, x._like(res.relu.reshape(len(table.breaks), -1)[zero].reshape(x.shape))


def sigmoid(x: "SharedTensor") -> "SharedTensor":
    """1 / (1 + e^-x) for every x: the SIGMOID table (7 comparisons, degree 6), 0 below -12, 1 from 12."""
    return piecewise(x, SIGMOID)


def tanh(x: "SharedTensor") -> "SharedTensor":
    """tanh(x) for every x: the TANH table (7 comparisons, degree 6), -1 below -6, 1 from 6."""
    return piecewise(x, TANH)


def silu(x: "SharedTensor") -> "SharedTensor":
    """x sigmoid(x) = relu(x) + g(x), g from the SILU table (0 beyond +-14); relu(x) is exact."""
    g, r = piecewise(x, SILU, with_relu=True)
    return r + g


def gelu(x: "SharedTensor", approximate: str = "none") -> "SharedTensor":
    """x Phi(x) (``approximate="none"``, torch's default) or its tanh form (``"tanh"``), as
    relu(x) + g(x) with g from the GELU / GELU_TANH table (0 beyond +-5); relu(x) is exact."""
    tables = {"none": GELU, "tanh": GELU_TANH}
    if approximate not in tables:
        raise ValueError(f"approximate must be 'none' or 'tanh' (as torch.nn.GELU), got {approximate!r}")
    g, r = piecewise(x, tables[approximate], with_relu=True)
    return r + g


def _clamp3(x: "SharedTensor") -> tuple["SharedTensor", "SharedTensor"]:
    """relu(x + 3) and relu(x - 3), one batch of 2 comparisons."""
    res = drelu(x.ctx, np.concatenate([_minus(x, -3.0), _minus(x, 3.0)]), with_x=True)
    up, down = res.relu.reshape(2, -1)
    return x._like(up.reshape(x.shape)), x._like(down.reshape(x.shape))


def hardsigmoid(x: "SharedTensor") -> "SharedTensor":
    """relu6(x + 3) / 6 = (relu(x + 3) - relu(x - 3)) / 6: 2 comparisons in one batch and one
    truncation (1/6 encoded at 40 bits).  Error below one unit of x's scale; exact 0 and 1 outside [-3, 3]."""
    up, down = _clamp3(x)
    value = up.share - down.share  # in [0, 6] at x's scale
    bits = min(_SIXTH_BITS, 61 - x.frac_bits)  # 6 2^f 2^bits / 6 < 2^62
    return x._like(_exact(x.ctx, value * np.int64(round(2.0**bits / 6.0)), bits))


def hardswish(x: "SharedTensor") -> "SharedTensor":
    """x relu6(x + 3) / 6 = q(clamp(x, -3, 3)) + relu(x - 3) with q(c) = c (c + 3) / 6.

    One batch of 2 comparisons gives relu(x + 3) and relu(x - 3) (so the clamp
    and the tail, exactly); q is one product and one truncation (1/6 at
    min(40, 60 - 2f) bits).  Error below two units of x's scale everywhere; 0
    below -3 and x - 3 + q(3) = x (up to q's rounding) above 3.
    """
    up, down = _clamp3(x)
    lifted = up.share - down.share  # clamp(x, -3, 3) + 3, in [0, 6]
    c = lifted - encode(3.0, x.frac_bits) if x.ctx.rank == 0 else lifted  # clamp(x, -3, 3)
    f = x.frac_bits
    product = beaver(x.ctx, c.reshape(-1), lifted.reshape(-1), "mul")  # c (c + 3) at scale 2f, in [-2.25, 18]
    bits = min(_SIXTH_BITS, 60 - 2 * f)  # 18 2^(2f) 2^bits / 6 < 2^62
    q = _exact(x.ctx, product * np.int64(round(2.0**bits / 6.0)), f + bits)
    return x._like(q.reshape(x.shape)) + down


# -- exp ------------------------------------------------------------------------------------
def _poly(powers: Sequence["SharedTensor"], coeffs: Sequence[float], out_scale: int) -> "SharedTensor":
    """sum_j coeffs[j] powers[j] (powers[0] is x^0 = None), coefficients at _COEFF_BITS, one truncation."""
    base = powers[1]
    scale = base.frac_bits
    acc = np.zeros(base.shape, dtype=np.int64)
    for j in range(1, len(coeffs)):
        acc += powers[j].rescale(scale).share * np.int64(round(coeffs[j] * 2**_COEFF_BITS))
    if base.ctx.rank == 0:
        acc += np.int64(round(coeffs[0] * 2 ** (_COEFF_BITS + scale)))
    drop = _COEFF_BITS + scale - out_scale
    return base._like(truncate(base.ctx, acc, drop), out_scale)


def _powers(y: "SharedTensor", degree: int) -> list["SharedTensor"]:
    """[None, y, y^2, ..., y^degree] in ceil(log2 degree) multiplication batches."""
    powers: list[Any] = [None, y]
    for top, js in _power_plan(degree):
        powers.extend(_stack_mul([powers[top]] * len(js), [powers[j] for j in js]))
    return powers


def _exp_core(x: "SharedTensor") -> "SharedTensor":
    """T8(x / 16)^16, accurate on EXP_RANGE (no clamp, no check)."""
    f = x.frac_bits
    y = x._like(x.share, f + _EXP_HALVINGS)  # x / 2^4, exactly
    powers = _powers(y, _EXP_DEGREE)
    coeffs = [1.0 / math.factorial(j) for j in range(_EXP_DEGREE + 1)]
    z = _poly(powers, coeffs, f)
    for _ in range(_EXP_HALVINGS):
        z = z * z
    return z


def exp(x: "SharedTensor") -> "SharedTensor":
    """e^x ≈ T8(z / 16)^16 (Taylor degree 8, then 4 squarings) of z = max(x, -32).

    Range EXP_RANGE = [-32, 10): one batch of 2 comparisons clamps the
    argument below (e^-32 < 2e-14, so smaller inputs give ~0, as they should)
    and reports inputs >= 10 to the zero check (ApproximationRangeError at
    the next check: above ~10.4 the squares leave the product range).  z / 16
    is exact (the share read at scale f + 4).  Rounds: R + 3 product batches
    + 1 truncation + 4 squarings, each product 1 round + its truncation.
    """
    low, high = EXP_RANGE
    res = drelu(x.ctx, np.concatenate([_minus(x, low), _minus(x, high)]), with_x=True)
    clamped, _ = res.relu.reshape(2, -1)
    _defer_range(x.ctx, "exp", None, high, res.bit.reshape(2, -1)[1], res.coins)
    z = clamped.reshape(x.shape) + (encode(low, x.frac_bits) if x.ctx.rank == 0 else np.int64(0))
    return _exp_core(x._like(z))


# -- reciprocal, inverse square root, square root ---------------------------------------------------
def _power_bits(x: "SharedTensor", exponents: Sequence[int]) -> tuple[list["SharedTensor"], bytes]:
    """[x >= 2^j] for each j, in one batch of len(exponents) comparisons at x's scale, and the batch's coins."""
    res = drelu(x.ctx, np.concatenate([_minus(x, 2.0**j) for j in exponents]))
    bits = res.bit.reshape(len(exponents), -1)
    return [nonlinear._bits(x, b, x.shape) for b in bits], res.coins


def _scale_guess(x: "SharedTensor", exponents: Sequence[int], g: Any, bits: Sequence["SharedTensor"]) -> "SharedTensor":
    """g(j*) for j* = floor(log2 x) (clipped to the exponents), linear in the bits [x >= 2^j]."""
    f = x.frac_bits
    acc = np.zeros(x.shape, dtype=np.int64)
    if x.ctx.rank == 0:
        acc += encode(g(exponents[0] - 1), f)
    for j, b in zip(exponents, bits):
        acc += b.share * encode(g(j) - g(j - 1), f)
    return x._like(acc, f)


def _checked_guess(x: "SharedTensor", exponents: Sequence[int], g: Any, function: str, check: bool) -> "SharedTensor":
    """The guess from the bits [x >= 2^j]; with ``check``, x outside [2^min, 2^(max+1)) goes to
    the zero check (one more comparison, [x >= 2^(max+1)], in the same batch)."""
    exps = list(exponents)
    top = exps[-1] + 1
    bits, coins = _power_bits(x, exps + [top] if check else exps)
    if check:
        outside = -bits[0].share + bits[-1].share  # (1 - [x >= 2^min]) + [x >= 2^top], in {0, 1}
        if x.ctx.rank == 0:
            outside = outside + 1
        _defer_range(x.ctx, function, 2.0 ** exps[0], 2.0**top, outside.reshape(-1), coins)
        bits = bits[:-1]
    return _scale_guess(x, exps, g, bits)


def _default_exponents(frac_bits: int) -> list[int]:
    return list(range(-(frac_bits // 2), frac_bits - 1))


def _exponents(x: "SharedTensor", exponents: Sequence[int] | None) -> list[int]:
    exps = sorted(set(exponents)) if exponents is not None else _default_exponents(x.frac_bits)
    if not exps or exps != list(range(exps[0], exps[-1] + 1)):
        raise ValueError(f"exponents must be a non-empty run of consecutive integers, got {exponents!r}")
    if exps[0] < -x.frac_bits:
        raise ValueError(f"2^{exps[0]} is below one unit at {x.frac_bits} fractional bits")
    return exps


def reciprocal(
    x: "SharedTensor", *, positive: bool = False, exponents: Sequence[int] | None = None, iterations: int = 4
) -> "SharedTensor":
    """1 / x by Newton-Raphson, y <- y (2 - x y), from a guess within a factor 1.5 of 1/|x|.

    Range: |x| in [2^min(exponents), 2^(max(exponents)+1)), by default
    [2^-(f/2), 2^(f-1)) at x's f fractional bits, i.e. [2^-8, 2^15) at f = 16
    (x <= 0 is outside with ``positive=True``); inputs outside go to the zero
    check (ApproximationRangeError at the next check).  The guess is
    (2/3) 2^-floor(log2 |x|), linear in the bits [|x| >= 2^j], so |1 - x y0|
    <= 1/3 and 4 iterations reach 3^-16 before rounding.  Costs: (positive=False:
    1 comparison for the sign) + len(exponents) + 1 comparisons in one batch
    + 1 product for the sign + 2 products per iteration.
    """
    return _reciprocal(x, positive, _exponents(x, exponents), iterations, check=True)


def _reciprocal(x: "SharedTensor", positive: bool, exps: list[int], iterations: int, *, check: bool) -> "SharedTensor":
    if positive:
        mag, sgn = x, None
    else:
        res = drelu(x.ctx, x.share, with_x=True)
        mag = x._like((2 * res.relu - x.share.reshape(-1)).reshape(x.shape))
        sgn = nonlinear._bits(x, 2 * res.bit, x.shape) - 1
    y = _checked_guess(mag, exps, lambda j: (2.0 / 3.0) * 2.0 ** (-j), "reciprocal", check)
    if sgn is not None:
        y = y * sgn
    for _ in range(iterations):
        y = y * (2 - x * y)
    return y


def _sqrt_pair(x: "SharedTensor", exponents: Sequence[int] | None, iterations: int,
               function: str) -> tuple["SharedTensor", "SharedTensor"]:
    """(sqrt(x), 1 / (2 sqrt(x))) by Goldschmidt's coupled iteration, for x in range.

    y0 = c 2^(-j*/2) with c^2 = 2/3 from the bits [x >= 2^j], so x y0^2 lies
    in [2/3, 4/3); g = x y0, h = y0 / 2, then per iteration r = 1/2 - g h and
    (g, h) += (g, h) r (one product, then one batch of two).  g approaches
    sqrt(x) and h 1/(2 sqrt(x)), each computed at its own magnitude (Newton's
    y^2 would underflow the fixed point for large x).
    """
    exps = _exponents(x, exponents)
    c = math.sqrt(2.0 / 3.0)
    y0 = _checked_guess(x, exps, lambda j: c * 2.0 ** (-j / 2.0), function, True)
    g = x * y0
    h = y0._like(y0.share, y0.frac_bits + 1)  # y0 / 2, exactly
    for _ in range(iterations):
        r = 0.5 - g * h
        g, h = (gh + gh_r for gh, gh_r in zip((g, h), _stack_mul([g, h], [r, r])))
    return g, h


def inv_sqrt(x: "SharedTensor", *, exponents: Sequence[int] | None = None, iterations: int = 4) -> "SharedTensor":
    """1 / sqrt(x) (Goldschmidt, see :func:`_sqrt_pair`).

    Range: x in [2^min(exponents), 2^(max(exponents)+1)), by default
    [2^-8, 2^15) at f = 16; inputs outside (x <= 0 included) go to the zero
    check.  Costs len(exponents) + 1 comparisons in one batch, then 1 + 2 per
    iteration product rounds (each with its truncation).
    """
    _, h = _sqrt_pair(x, exponents, iterations, "inv_sqrt")
    return 2 * h


def sqrt(x: "SharedTensor", *, exponents: Sequence[int] | None = None, iterations: int = 4) -> "SharedTensor":
    """sqrt(x), same method and range as :func:`inv_sqrt`, plus one Newton correction.

    g is limited by h's fixed-point resolution for large x (h ~ 1/(2 sqrt x)
    has few units there), so a last step g += (x - g^2) h uses the residual
    x - g^2 computed exactly at scale 2f: 3 more product rounds.
    """
    g, h = _sqrt_pair(x, exponents, iterations, "sqrt")
    scale = g.frac_bits
    g_squared = g._like(beaver(x.ctx, g.share, g.share, "mul"), 2 * scale)
    residual = x.rescale(2 * scale) - g_squared
    return (g.rescale(2 * scale) + residual * h).rescale(scale)


# -- softmax and layer norm -----------------------------------------------------------------
def softmax(x: "SharedTensor", axis: int = -1) -> "SharedTensor":
    """Max-subtracted softmax along ``axis``, for every x.

    m = max (tree), z = max(x - m, -16) (one batch), e = exp(z) on [-16, 0]
    (no check needed), s = sum e in [1, k], result e * (1 / s) with the
    reciprocal's guess from [s >= 2^j], j = 1 .. ceil(log2 k) (s is in range
    by construction: no check).  Compared differences x - m need the domain.
    """
    ax = axis % x.ndim
    k = x.shape[ax]
    m = nonlinear.max(x, axis=ax, keepdims=True)
    z = nonlinear.relu(x - m + EXP_CLAMP) - EXP_CLAMP
    e = _exp_core(z)
    s = e.sum(axis=ax, keepdims=True)
    exps = list(range(1, max(1, math.ceil(math.log2(k))) + 1))
    return e * _reciprocal(s, True, exps, 4, check=False)


def layer_norm(
    x: "SharedTensor",
    axis: int | Sequence[int] = -1,
    eps: float = 1e-5,
    *,
    exponents: Sequence[int] | None = None,
) -> "SharedTensor":
    """(x - mean) / sqrt(var + eps) over ``axis`` (torch's LayerNorm without the affine part).

    mean and var (biased, as torch) by exact sums and one truncation each; the
    squares by one Beaver batch; 1/sqrt(var + eps) by :func:`inv_sqrt`, so
    var + eps must lie in its range (by default [2^-8, 2^15) at f = 16:
    standard deviations from 0.0625 to 181; ``exponents=`` widens it) or the
    next check raises ApproximationRangeError.  Apply the affine part as
    products with the weights.  eps is encoded at x's scale (1e-5 is below
    one unit at f = 16 and rounds to one unit).
    """
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(sorted(int(a) % x.ndim for a in axes))
    centred = x - x.mean(axis=axes, keepdims=True)
    var = (centred * centred).mean(axis=axes, keepdims=True)
    eps_units = max(1, round(eps * 2**var.frac_bits)) if eps > 0 else 0
    shifted = var._like(var.share + (np.int64(eps_units) if x.ctx.rank == 0 else np.int64(0)))
    return centred * inv_sqrt(shifted, exponents=exponents)
