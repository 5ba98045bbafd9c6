"""Normalisations: BatchNorm (eval mode: an ``affine`` op), LayerNorm, GroupNorm and InstanceNorm.

``layer_norm`` normalises over the last ``dims`` dimensions without a scale
and shift; the trace rules add the module's weight and bias as an ``affine``
op (one owned product), so they fold like any other.  Encrypted, per row of
n values:

  mean = Σx / n               (local sum; one truncation of the row means)
  d = x - mean
  var = Σ d² / n              (one Beaver product, its truncation, one truncation of the row sums)
  r = 1/sqrt(var + eps)       (mpc ``inv_sqrt``: comparisons [var >= 2^j] for the
                               guess, then Goldschmidt; |err| <= 4e-5 + 5e-4 |r| at 16 bits)
  y = d r                     (one Beaver product)

The guess's exponents j run up to the comparison domain (2^j < limit / 4), so
the result is right while var < limit / 2: LayerNorm compares magnitudes up
to 2 max|x|² (var <= max|x|²).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mpc.protocols.beaver import beaver
from mpc.tensor import SharedTensor

from ..plan import Op
from ..registry import Fixed, OpKind, Operand, Refusal, TorchRule, ring_bits
from .scaling import factor_bits, times_public
from .shape import trace_reshape

__all__ = ["RECORDS", "inv_sqrt_exponents"]


def inv_sqrt_exponents(act_bits: int, comparison_bits: int) -> list[int]:
    """The guess's exponents: from 2^-(f-2) up to a quarter of the comparison domain's bound."""
    return list(range(-(act_bits - 2), max(comparison_bits - 3 - act_bits, 1) + 1))


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
    # squares truncated one by one, so that their sum over a long row has the headroom of the activation scale
    squares = SharedTensor(ctx, beaver(ctx, d.share, d.share, "mul"), 2 * d.frac_bits).rescale(f)
    var = times_public(squares.sum(axis=axes, keepdims=True), 1.0 / n).rescale(f)
    r = (var + float(op.attrs["eps"])).inv_sqrt(exponents=inv_sqrt_exponents(f, ctx.comparison_bits))
    return SharedTensor(ctx, beaver(ctx, d.share, r.share, "mul"), d.frac_bits + r.frac_bits)


def _ln_ring(op: Op, b: list[float], p: list[np.ndarray], f: Fixed) -> float:
    n = float(np.prod(op.shape[-int(op.attrs["dims"]):]))  # the row size (layer_norm keeps the shape)
    diff = 2 * b[0]
    return max(ring_bits(diff * diff, 2 * f.act_bits),  # each d² before its truncation
               ring_bits(n * diff * diff, f.act_bits) + factor_bits(1.0 / n),  # Σ d² / n before its truncation
               ring_bits(b[0], f.act_bits + factor_bits(1.0 / n)),  # the mean before its truncation
               ring_bits(math.sqrt(n), 2 * f.act_bits + 2))  # d r: normalised, |y| <= sqrt(n); r carries ~2 bits more


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

RECORDS = (LAYER_NORM,)
