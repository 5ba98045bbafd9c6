"""Normalisations: BatchNorm (eval mode: an ``affine`` op), LayerNorm, GroupNorm and InstanceNorm.

``layer_norm`` normalises over the last ``dims`` dimensions without a scale
and shift; the trace rules add the module's weight and bias as an ``affine``
op (one owned product), so they fold like any other.  Encrypted, per row of
n values:

  mean = Σx / n               (local sum; one truncation of the row means)
  d = x - mean
  var = Σ d² / n              (one Beaver product, its truncation; the row sums dropped by
                               floor(log2 n) bits, so that their product with 1/n stays in the ring
                               for var up to 2^17 at 20 bits; one truncation of that product;
                               kept at 8 more fractional bits than the activations, so that rows
                               of small values keep their precision)
  r = 1/sqrt(var + eps)       (mpc ``inv_sqrt``: comparisons [var >= 2^j] for the guess, in a
                               domain 8 bits wider, then Goldschmidt)
  y = d r                     (one Beaver product)

The guess's exponents j run up to the comparison domain (2^j < limit / 4), so
the result is right while var < limit / 2: LayerNorm compares magnitudes up
to 2 max|x|² (var <= max|x|²); a larger variance is detected (inv_sqrt's range
check) and the run retried with a wider domain.  Below, eps is at least the
guess's lowest power 2^-(f + 6) (1.5e-8 at f = 20: LayerNorm's 1e-5 is above
it; an L2 normalisation's rows of norm below 1.2e-4 are scaled as with that eps).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mpc.protocols.beaver import beaver
from mpc.protocols.compare import MAX_BITS
from mpc.ring import encode
from mpc.tensor import SharedTensor

from ..plan import Op
from ..registry import Fixed, OpKind, Operand, Refusal, TorchRule, ring_bits
from .scaling import factor_bits, times_public
from .shape import trace_reshape

__all__ = ["RECORDS", "inv_sqrt_exponents"]


#: extra fractional bits of a variance (or a sum of squares) over the activations': a row of small values
#: (var 1e-4) would otherwise keep 2 significant digits at 20 bits
VARIANCE_EXTRA_BITS = 8


def inv_sqrt_exponents(act_bits: int, comparison_bits: int) -> list[int]:
    """The guess's exponents: from 2^-(f+extra-2) up to a quarter of the comparison domain's bound."""
    return list(range(-(act_bits + VARIANCE_EXTRA_BITS - 2), max(comparison_bits - 3 - act_bits, 1) + 1))


def _divisor_shift(divisor: float) -> int:
    """Bits dropped from a row's sum before its product with 1/divisor (floor(log2 divisor))."""
    return int(math.floor(math.log2(divisor))) if divisor > 1 else 0


def rsqrt_of_sum(squares: SharedTensor, axes: tuple[int, ...], divisor: int, eps: float) -> SharedTensor:
    """1/sqrt(Σ squares / divisor + eps) over ``axes`` (kept), for squares at twice the activation scale.

    The sum is kept at ``VARIANCE_EXTRA_BITS`` more fractional bits than the
    activations, and so is the comparison domain of the guess's comparisons
    (a per-call widening: these are one comparison per row and exponent).
    """
    ctx, f = squares.ctx, squares.ctx.frac_bits
    saved = ctx.comparison_bits
    extra = min(VARIANCE_EXTRA_BITS, MAX_BITS - saved)
    fine = f + extra
    total = squares.rescale(fine).sum(axis=axes, keepdims=True)  # truncated one by one: headroom for long rows
    shift = _divisor_shift(divisor)
    if shift:  # Σ at fine - shift bits keeps var's precision (Σ = n var) and keeps Σ x 1/n inside the ring
        total = total.rescale(fine - shift)
    mean = times_public(total, 1.0 / divisor).rescale(fine)
    exponents = inv_sqrt_exponents(f, saved)
    # inv_sqrt refuses inputs below 2^exponents[0] (its guess has nothing below): a row of (near) zeros, e.g. a
    # padded window's queries, is normalised as with that floor for eps, as torch's eps floors its norm
    floor = max(eps, 2.0 ** exponents[0])
    eps_share = encode(floor, fine) if ctx.rank == 0 else np.int64(0)
    shifted = SharedTensor(ctx, mean.share + eps_share, fine)
    ctx.comparison_bits = saved + extra
    try:
        return shifted.inv_sqrt(exponents=exponents)
    finally:
        ctx.comparison_bits = saved


def _axes(op: Op, ndim: int) -> tuple[int, ...]:
    return tuple(range(ndim - int(op.attrs["dims"]), ndim))


def _ln_plain(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    axes = _axes(op, x.ndim)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + float(op.attrs["eps"]))


def _ln_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    x = xs[0].act
    ctx, f = x.ctx, x.frac_bits
    axes = _axes(op, x.ndim)
    n = int(np.prod([x.shape[a] for a in axes]))
    mean = times_public(x.sum(axis=axes, keepdims=True), 1.0 / n).rescale(f)
    d = x - mean
    squares = SharedTensor(ctx, beaver(ctx, d.share, d.share, "mul"), 2 * f)
    r = rsqrt_of_sum(squares, axes, n, float(op.attrs["eps"]))
    return SharedTensor(ctx, beaver(ctx, d.share, r.share, "mul"), f + r.frac_bits)


def _ln_ring(op: Op, b: list[float], p: list[np.ndarray], f: Fixed) -> float:
    n = float(np.prod(op.shape[-int(op.attrs["dims"]):]))  # the row size (layer_norm keeps the shape)
    return _squares_ring(n, n, 2 * b[0], b[0] * b[0], f)  # |x - mean| <= 2 max|x|; var <= max|x|²


def _squares_ring(n: float, divisor: float, value: float, mean_square: float, f: Fixed) -> float:
    """Ring magnitudes of a row of n squares of values up to ``value``: each square, their sum at the finer
    scale, that sum times 1/divisor (at most ``mean_square``; a public product's *result* sits at the factor's
    extra bits), a row's mean, and the normalised product."""
    fine = f.act_bits + VARIANCE_EXTRA_BITS
    per = factor_bits(1.0 / divisor)
    return max(ring_bits(value * value, 2 * f.act_bits),  # each square before its truncation
               ring_bits(n * value * value, fine),  # their sum
               ring_bits(mean_square, fine - _divisor_shift(divisor) + per),  # Σ / divisor before its truncation
               ring_bits(value / 2, f.act_bits + per),  # a mean before its truncation
               ring_bits(math.sqrt(n), 2 * f.act_bits + VARIANCE_EXTRA_BITS + 2))  # x r, |y| <= sqrt(n)


# -- L2 normalisation (F.normalize, Swin V2's cosine attention) -----------------------------------------------
def _l2_plain(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    norm = np.sqrt((x * x).sum(axis=op.attrs["axis"], keepdims=True))
    return x / np.maximum(norm, float(op.attrs["eps"]))


def _l2_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    x = xs[0].act
    ctx, f = x.ctx, x.frac_bits
    squares = SharedTensor(ctx, beaver(ctx, x.share, x.share, "mul"), 2 * f)
    r = rsqrt_of_sum(squares, (op.attrs["axis"],), 1, 0.0)
    return SharedTensor(ctx, beaver(ctx, x.share, r.share, "mul"), f + r.frac_bits)


def _l2_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    if float(t.static(c.arg(1, "p", 2.0))) != 2.0:
        raise Refusal("a norm other than p=2", "normalise with p=2")
    ndim = len(t.shape(x)) + 1
    axis = int(t.static(c.arg(2, "dim", 1))) % ndim
    if axis == 0:
        raise Refusal("normalising along the batch dimension")
    t.emit(c, "l2_normalize", [t.tensor(x)], {"axis": axis, "eps": float(t.static(c.arg(3, "eps", 1e-12)))})


def _l2_row(op: Op) -> float:
    return float(op.shape[op.attrs["axis"] - 1])


L2_NORMALIZE = OpKind(
    kind="l2_normalize",
    summary="F.normalize with p=2 (approximated 1/sqrt)",
    plaintext=_l2_plain,
    encrypted=_l2_secure,
    # the sum of squares of a row enters the guess's comparisons (as var does in layer_norm)
    compares=lambda op, r, out: 2 * _l2_row(op) * r[0] * r[0],
    ring=lambda op, b, p, f: _squares_ring(_l2_row(op), 1, b[0], _l2_row(op) * b[0] * b[0], f),
    min_act_bits=20,
    torch=(TorchRule(("F.normalize",), _l2_rule),),
)


# -- trace rules ---------------------------------------------------------------------------------------
def trace_layer_norm(t: Any, c: Any, x: Any, dims: int, eps: float, weight: np.ndarray | None,
                     bias: np.ndarray | None, tag: str | None = None) -> str:
    """layer_norm over the last ``dims`` dimensions, then the affine weight and bias if any."""
    if dims < 1 or dims > len(t.shape(x)):
        raise Refusal(f"normalising {dims} dimensions of a tensor of shape (N, {t.shape(x)})",
                      "normalise dimensions after the batch")
    attrs = {"dims": int(dims), "eps": float(eps)}
    if weight is None and bias is None:
        if tag is None:
            return t.emit(c, "layer_norm", [t.tensor(x)], attrs)
        return t.sub(c, tag, "layer_norm", [t.tensor(x)], attrs)
    normed = t.sub(c, "normed" if tag is None else f"{tag}_normed", "layer_norm", [t.tensor(x)], attrs)
    shape = t.shape(normed)[-dims:]
    scale = np.ones(shape) if weight is None else weight.reshape(shape)
    shift = np.zeros(shape) if bias is None else bias.reshape(shape)
    params = {"scale": scale, "shift": shift}
    if tag is None:
        return t.emit(c, "affine", [normed], {}, params)
    return t.sub(c, tag, "affine", [normed], {}, params)


def _ln_module(t: Any, c: Any) -> None:
    m = c.module
    trace_layer_norm(t, c, c.arg(0, "input"), len(m.normalized_shape), m.eps, t.array(m.weight),
                     t.array(getattr(m, "bias", None)))


def _ln_function(t: Any, c: Any) -> None:
    shape = t.static(c.arg(1, "normalized_shape"))
    dims = 1 if isinstance(shape, int) else len(shape)
    trace_layer_norm(t, c, c.arg(0, "input"), dims, float(t.static(c.arg(4, "eps", 1e-5))),
                     t.constant(c.arg(2, "weight", None)), t.constant(c.arg(3, "bias", None)))


def _trace_group_norm(t: Any, c: Any, x: Any, groups: int, eps: float, weight: np.ndarray | None,
                      bias: np.ndarray | None) -> None:
    shape = t.shape(x)
    if len(shape) < 2 or shape[0] % groups:
        raise Refusal(f"{groups} groups for {shape[0]} channels")
    grouped = trace_reshape(t, c, x, "grouped", (groups, shape[0] // groups) + shape[1:])
    normed = t.sub(c, "normed", "layer_norm", [grouped], {"dims": len(shape), "eps": float(eps)})
    back = trace_reshape(t, c, normed, "ungrouped", shape)
    if weight is None and bias is None:
        t.alias(c, back)
        return
    channel = (shape[0],) + (1,) * (len(shape) - 1)
    t.emit(c, "affine", [back], {}, {
        "scale": np.ones(channel) if weight is None else weight.reshape(channel),
        "shift": np.zeros(channel) if bias is None else bias.reshape(channel)})


def _group_norm_module(t: Any, c: Any) -> None:
    m = c.module
    _trace_group_norm(t, c, c.arg(0, "input"), m.num_groups, m.eps, t.array(m.weight), t.array(m.bias))


def _instance_norm_module(t: Any, c: Any) -> None:
    m = c.module
    if m.track_running_stats:
        _trace_batchnorm(t, c, c.arg(0, "input"), t.array(m.running_mean), t.array(m.running_var),
                         t.array(m.weight), t.array(m.bias), m.eps)
        return
    _trace_group_norm(t, c, c.arg(0, "input"), m.num_features, m.eps, t.array(m.weight), t.array(m.bias))


def _trace_batchnorm(t: Any, c: Any, x: Any, mean: np.ndarray | None, var: np.ndarray | None,
                     weight: np.ndarray | None, bias: np.ndarray | None, eps: float) -> None:
    if mean is None or var is None:
        raise Refusal("BatchNorm without running statistics", "set track_running_stats=True and train them")
    shape = t.shape(x)
    if not shape:
        raise Refusal("BatchNorm needs a channel dimension")
    scale = 1.0 / np.sqrt(var + float(eps))
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    channel = (shape[0],) + (1,) * (len(shape) - 1)
    t.emit(c, "affine", [t.tensor(x)], {}, {"scale": scale.reshape(channel), "shift": shift.reshape(channel)})


def _batchnorm_module(t: Any, c: Any) -> None:
    m = c.module
    if m.training and not m.track_running_stats:
        raise Refusal("BatchNorm in training mode", "call model.eval() first")
    _trace_batchnorm(t, c, c.arg(0, "input"), t.array(m.running_mean), t.array(m.running_var),
                     t.array(m.weight) if m.affine else None, t.array(m.bias) if m.affine else None, m.eps)


def _batchnorm_function(t: Any, c: Any) -> None:
    if t.static(c.arg(5, "training", False)):
        raise Refusal("batch_norm called with training=True", "use the running statistics (model.eval())")
    _trace_batchnorm(t, c, c.arg(0, "input"), t.constant(c.arg(1, "running_mean")),
                     t.constant(c.arg(2, "running_var")), t.constant(c.arg(3, "weight", None)),
                     t.constant(c.arg(4, "bias", None)), float(t.static(c.arg(7, "eps", 1e-5))))


LAYER_NORM = OpKind(
    kind="layer_norm",
    summary="LayerNorm (incl. ConvNeXt's LayerNorm2d), GroupNorm, InstanceNorm2d (approximated 1/sqrt)",
    plaintext=_ln_plain,
    encrypted=_ln_secure,
    compares=lambda op, r, out: 2 * r[0] * r[0] + float(op.attrs["eps"]),
    ring=_ln_ring,
    min_act_bits=20,
    torch=(TorchRule(("nn.LayerNorm",), _ln_module), TorchRule(("F.layer_norm",), _ln_function),
           TorchRule(("nn.GroupNorm",), _group_norm_module),
           TorchRule(("nn.InstanceNorm1d", "nn.InstanceNorm2d", "nn.InstanceNorm3d"), _instance_norm_module)),
)

#: BatchNorm emits ``affine`` (:mod:`.products`); its rules live here with the other normalisations
BATCHNORM_RULES = (
    TorchRule(("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d"), _batchnorm_module),
    TorchRule(("F.batch_norm",), _batchnorm_function),
)

RECORDS = (LAYER_NORM, L2_NORMALIZE)
