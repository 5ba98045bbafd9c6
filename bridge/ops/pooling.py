"""Pooling, means and resampling, on the one window geometry of :mod:`bridge.windows`.

Max pooling is separable: a max over each window's columns, then over its rows
(``ceil(log2 kw) + ceil(log2 kh)`` comparison batches); it compares
differences of two inputs, so its compared magnitudes reach twice the input's.
Average pooling, means and bilinear resampling are public linear maps: exact
sums on the shares, then one multiplication by public reals that rides on the
next truncation (:mod:`.scaling`).  Nearest resampling is a gather (exact, free).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mpc.tensor import SharedTensor

from ..plan import Op
from ..registry import Fixed, OpKind, Operand, Refusal, TorchRule, ring_bits
from ..windows import adaptive_taps, gather, pool_divisors, pool_taps, resample_taps, tap_sum, Taps
from .products import pair
from .scaling import factor_bits, times_public

__all__ = ["RECORDS"]


def _differences(op: Op, r: list[float], out: float) -> float:
    """Max pooling compares differences of two inputs: up to twice the input's range."""
    return 2 * r[0]


def _separable_max(x: np.ndarray, rows: Taps, cols: Taps, reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Max over each (rows x cols) window of an NCHW array: columns first, then rows."""
    for axis, taps in ((3, cols), (2, rows)):
        if taps.index.shape[1] == 1:
            x = np.take(x, taps.index[:, 0], axis=axis)
        else:
            x = reduce(gather(x, axis, taps))
    return x


def _max_reduce(m: Any, x: SharedTensor) -> Callable[[np.ndarray], np.ndarray]:
    return lambda share: SharedTensor(x.ctx, share, x.frac_bits).max(axis=-1).share


# -- max pooling ------------------------------------------------------------------------------------
def _max_taps(op: Op, shape: tuple[int, ...]) -> tuple[Taps, Taps]:
    a = op.attrs
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a["kernel"], a["stride"], a["padding"], a["dilation"]
    return (pool_taps(shape[2], kh, sh, ph, dh, a["ceil_mode"]), pool_taps(shape[3], kw, sw, pw, dw, a["ceil_mode"]))


def _max_pool_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    x = xs[0].act
    rows, cols = _max_taps(op, x.shape)
    return SharedTensor(x.ctx, np.ascontiguousarray(_separable_max(x.share, rows, cols, _max_reduce(m, x))), x.frac_bits)


def _pool_args(t: Any, kernel: Any, stride: Any, padding: Any) -> tuple[tuple[int, int], ...]:
    k = pair(t.static(kernel))
    stride = t.static(stride)
    s = k if stride is None or stride == [] or stride == () else pair(stride)
    return k, s, pair(t.static(padding))


def _trace_max_pool(t: Any, c: Any, x: Any, kernel: Any, stride: Any, padding: Any, dilation: Any,
                    ceil_mode: Any, return_indices: Any) -> None:
    if t.static(return_indices):
        raise Refusal("return_indices=True", "pool without indices")
    k, s, p = _pool_args(t, kernel, stride, padding)
    _spatial(t, x)
    t.emit(c, "max_pool2d", [t.tensor(x)], {"kernel": k, "stride": s, "padding": p,
                                            "dilation": pair(t.static(dilation)), "ceil_mode": bool(t.static(ceil_mode))})


def _spatial(t: Any, x: Any) -> None:
    if len(t.shape(x)) != 3:
        raise Refusal(f"2-d pooling of a tensor of shape (N, {', '.join(map(str, t.shape(x)))})",
                      "pool NCHW tensors")


MAX_POOL2D = OpKind(
    kind="max_pool2d",
    summary="MaxPool2d (padding, dilation, ceil_mode)",
    plaintext=lambda op, xs, p: _separable_max(xs[0], *_max_taps(op, xs[0].shape), lambda a: a.max(axis=-1)),
    encrypted=_max_pool_secure,
    compares=_differences,
    torch=(
        TorchRule(("nn.MaxPool2d",), lambda t, c: _trace_max_pool(
            t, c, c.arg(0, "input"), c.module.kernel_size, c.module.stride, c.module.padding, c.module.dilation,
            c.module.ceil_mode, c.module.return_indices)),
        TorchRule(("F.max_pool2d", "torch.max_pool2d", "F._max_pool2d"), lambda t, c: _trace_max_pool(
            t, c, c.arg(0, "input"), c.arg(1, "kernel_size"), c.arg(2, "stride", None), c.arg(3, "padding", 0),
            c.arg(4, "dilation", 1), c.arg(5, "ceil_mode", False), c.arg(6, "return_indices", False))),
    ),
)


# -- adaptive max pooling ----------------------------------------------------------------------------
def _adaptive_taps(op: Op, shape: tuple[int, ...]) -> tuple[Taps, Taps]:
    oh, ow = op.attrs["output"]
    return adaptive_taps(shape[2], oh), adaptive_taps(shape[3], ow)


def _adaptive_max_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    x = xs[0].act
    rows, cols = _adaptive_taps(op, x.shape)
    return SharedTensor(x.ctx, np.ascontiguousarray(_separable_max(x.share, rows, cols, _max_reduce(m, x))), x.frac_bits)


def _trace_adaptive(kind: str):
    def rule(t: Any, c: Any) -> None:
        x = c.arg(0, "input")
        if c.module is None and t.static(c.arg(2, "return_indices", False)):
            raise Refusal("return_indices=True", "pool without indices")
        if c.module is not None and getattr(c.module, "return_indices", False):
            raise Refusal("return_indices=True", "pool without indices")
        _spatial(t, x)
        t.emit(c, kind, [t.tensor(x)], {"output": tuple(t.out_shape(c)[-2:])})
    return rule


ADAPTIVE_MAX_POOL2D = OpKind(
    kind="adaptive_max_pool2d",
    summary="AdaptiveMaxPool2d (any output size)",
    plaintext=lambda op, xs, p: _separable_max(xs[0], *_adaptive_taps(op, xs[0].shape), lambda a: a.max(axis=-1)),
    encrypted=_adaptive_max_secure,
    compares=_differences,
    torch=(TorchRule(("nn.AdaptiveMaxPool2d", "F.adaptive_max_pool2d"), _trace_adaptive("adaptive_max_pool2d")),),
)


# -- average pooling, adaptive average pooling, means ------------------------------------------------
def _avg_geometry(op: Op, shape: tuple[int, ...]) -> tuple[Taps, Taps, np.ndarray]:
    a = op.attrs
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
    rows = pool_taps(shape[2], kh, sh, ph, 1, a["ceil_mode"])
    cols = pool_taps(shape[3], kw, sw, pw, 1, a["ceil_mode"])
    if a["divisor"] is not None:
        div = np.full((rows.size, cols.size), int(a["divisor"]), dtype=np.int64)
    else:
        div = np.outer(pool_divisors(shape[2], kh, sh, ph, rows.size, a["count_include_pad"]),
                       pool_divisors(shape[3], kw, sw, pw, cols.size, a["count_include_pad"]))
    return rows, cols, div


def _window_sums(x: np.ndarray, rows: Taps, cols: Taps) -> np.ndarray:
    return tap_sum(tap_sum(x, 3, cols), 2, rows)


def _divide(x: Operand, sums: Callable[[np.ndarray], np.ndarray], divisors: np.ndarray) -> SharedTensor:
    """Sums of x divided by public counts; a uniform power-of-two count takes x as it is (pending)."""
    bits = factor_bits(1.0 / divisors)
    d = np.unique(divisors)
    exact_shift = d.size == 1 and bits > 0 and 2**bits == int(d[0])
    v = x.raw if exact_shift else x.act
    return times_public(SharedTensor(v.ctx, sums(v.share), v.frac_bits), 1.0 / divisors)


def _avg_pool_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    rows, cols, div = _avg_geometry(op, xs[0].shape)
    return _divide(xs[0], lambda s: _window_sums(s, rows, cols), div)


def _avg_pool_plain(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    rows, cols, div = _avg_geometry(op, xs[0].shape)
    return _window_sums(xs[0], rows, cols) / div


def _division_ring(divisors: Callable[[Op], np.ndarray]):
    def ring(op: Op, b: list[float], p: list[np.ndarray], f: Fixed) -> float:
        return ring_bits(b[0], f.act_bits + factor_bits(1.0 / divisors(op)))
    return ring


def _trace_avg_pool(t: Any, c: Any, x: Any, kernel: Any, stride: Any, padding: Any, ceil_mode: Any,
                    count_include_pad: Any, divisor_override: Any) -> None:
    k, s, p = _pool_args(t, kernel, stride, padding)
    _spatial(t, x)
    divisor = t.static(divisor_override)
    t.emit(c, "avg_pool2d", [t.tensor(x)], {
        "kernel": k, "stride": s, "padding": p, "ceil_mode": bool(t.static(ceil_mode)),
        "count_include_pad": bool(t.static(count_include_pad)), "divisor": None if divisor is None else int(divisor),
    })


def _avg_divisors(op: Op) -> np.ndarray:
    # the ring check needs the largest factor bits; any input size gives the same kernel-sized counts
    (kh, kw) = op.attrs["kernel"]
    return np.arange(1, kh * kw + 1) if op.attrs["divisor"] is None else np.array([op.attrs["divisor"]])


AVG_POOL2D = OpKind(
    kind="avg_pool2d",
    summary="AvgPool2d (padding, ceil_mode, count_include_pad, divisor_override)",
    plaintext=_avg_pool_plain,
    encrypted=_avg_pool_secure,
    ring=_division_ring(_avg_divisors),
    torch=(
        TorchRule(("nn.AvgPool2d",), lambda t, c: _trace_avg_pool(
            t, c, c.arg(0, "input"), c.module.kernel_size, c.module.stride, c.module.padding, c.module.ceil_mode,
            c.module.count_include_pad, c.module.divisor_override)),
        TorchRule(("F.avg_pool2d", "torch.avg_pool2d"), lambda t, c: _trace_avg_pool(
            t, c, c.arg(0, "input"), c.arg(1, "kernel_size"), c.arg(2, "stride", None), c.arg(3, "padding", 0),
            c.arg(4, "ceil_mode", False), c.arg(5, "count_include_pad", True), c.arg(6, "divisor_override", None))),
    ),
)


def _adaptive_avg_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    rows, cols = _adaptive_taps(op, xs[0].shape)
    div = np.outer(rows.weight.sum(axis=1), cols.weight.sum(axis=1))
    return _divide(xs[0], lambda s: _window_sums(s, rows, cols), div)


def _adaptive_avg_plain(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    rows, cols = _adaptive_taps(op, xs[0].shape)
    return _window_sums(xs[0], rows, cols) / np.outer(rows.weight.sum(axis=1), cols.weight.sum(axis=1))


ADAPTIVE_AVG_POOL2D = OpKind(
    kind="adaptive_avg_pool2d",
    summary="AdaptiveAvgPool2d (any output size)",
    plaintext=_adaptive_avg_plain,
    encrypted=_adaptive_avg_secure,
    ring=lambda op, b, p, f: ring_bits(b[0], f.act_bits + 30),  # bin counts depend on the input size
    torch=(TorchRule(("nn.AdaptiveAvgPool2d", "F.adaptive_avg_pool2d"), _trace_adaptive("adaptive_avg_pool2d")),),
)


def _mean_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    axes = tuple(op.attrs["axes"])
    count = int(np.prod([xs[0].shape[i] for i in axes]))
    keep = op.attrs["keepdim"]
    return _divide(xs[0], lambda s: s.sum(axis=axes, keepdims=keep, dtype=s.dtype), np.array([count]))


def _reduction(kind: str):
    def rule(t: Any, c: Any) -> None:
        x = c.arg(0, "input")
        dims = t.static(c.arg(1, "dim", None))
        if dims is None:
            raise Refusal(f"{kind} over every dimension, the batch included", "give the dimensions to reduce")
        ndim = len(t.shape(x)) + 1
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        axes = tuple(sorted({int(d) % ndim for d in dims}))
        if 0 in axes:
            raise Refusal(f"{kind} over the batch dimension")
        t.emit(c, kind, [t.tensor(x)], {"axes": axes, "keepdim": bool(t.static(c.arg(2, "keepdim", False)))})
    return rule


MEAN = OpKind(
    kind="mean",
    summary="mean over non-batch dimensions",
    plaintext=lambda op, xs, p: xs[0].mean(axis=tuple(op.attrs["axes"]), keepdims=op.attrs["keepdim"]),
    encrypted=_mean_secure,
    ring=lambda op, b, p, f: ring_bits(b[0], f.act_bits + 30),
    torch=(TorchRule(("torch.mean", "Tensor.mean"), _reduction("mean")),),
)


def _sum_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    x = xs[0].raw
    return SharedTensor(x.ctx, x.share.sum(axis=tuple(op.attrs["axes"]), keepdims=op.attrs["keepdim"],
                                           dtype=x.share.dtype), x.frac_bits)


SUM = OpKind(
    kind="sum",
    summary="sum over non-batch dimensions",
    plaintext=lambda op, xs, p: xs[0].sum(axis=tuple(op.attrs["axes"]), keepdims=op.attrs["keepdim"]),
    encrypted=_sum_secure,
    torch=(TorchRule(("torch.sum", "Tensor.sum"), _reduction("sum")),),
)


# -- resampling --------------------------------------------------------------------------------------
#: fractional bits of non-dyadic interpolation weights (relative error below 2^-17 each)
_WEIGHT_BITS = 16


def _resample_taps(op: Op, shape: tuple[int, ...]) -> tuple[Taps, Taps]:
    a = op.attrs
    (oh, ow), (sh, sw) = op.shape[-2:], a["scales"]
    return (resample_taps(shape[2], oh, a["mode"], a["align_corners"], sh),
            resample_taps(shape[3], ow, a["mode"], a["align_corners"], sw))


def _dyadic_bits(weights: np.ndarray) -> int:
    """The fewest fractional bits holding every weight exactly (at most _WEIGHT_BITS)."""
    for bits in range(_WEIGHT_BITS):
        scaled = weights * 2.0**bits
        if np.all(scaled == np.rint(scaled)):
            return bits
    return _WEIGHT_BITS


def _resize_plain(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    rows, cols = _resample_taps(op, xs[0].shape)
    return tap_sum(tap_sum(xs[0], 3, cols), 2, rows)


def _resize_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    rows, cols = _resample_taps(op, xs[0].shape)
    if op.attrs["mode"] != "bilinear":  # a gather: exact on the value as it is
        x = xs[0].raw
        share = np.take(np.take(x.share, cols.index[:, 0], axis=3), rows.index[:, 0], axis=2)
        return SharedTensor(x.ctx, np.ascontiguousarray(share), x.frac_bits)
    x = xs[0].act
    share, bits = x.share, 0
    for axis, taps in ((3, cols), (2, rows)):
        b = _dyadic_bits(taps.weight)
        share = tap_sum(share, axis, taps, np.rint(taps.weight * 2.0**b).astype(np.int64))
        bits += b
    return SharedTensor(x.ctx, share, x.frac_bits + bits)


def _resize_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    if c.module is not None:
        m = c.module
        mode, align, scale, recompute = m.mode, m.align_corners, m.scale_factor, m.recompute_scale_factor
    else:
        mode = t.static(c.arg(3, "mode", "nearest"))
        align = t.static(c.arg(4, "align_corners", None))
        scale = t.static(c.arg(2, "scale_factor", None))
        recompute = t.static(c.arg(5, "recompute_scale_factor", None))
        if c.label == "F.upsample_bilinear":
            mode, align = "bilinear", True
        elif c.label == "F.upsample_nearest":
            mode = "nearest"
    if mode not in ("nearest", "nearest-exact", "bilinear"):
        raise Refusal(f"mode={mode!r}", "use 'nearest', 'nearest-exact' or 'bilinear'")
    if t.static(c.kwargs.get("antialias", False)):
        raise Refusal("antialias=True", "resample without antialiasing")
    _spatial(t, x)
    scales = (None, None) if scale is None or recompute else tuple(float(v) for v in (
        scale if isinstance(scale, (list, tuple)) else (scale, scale)))
    t.emit(c, "resize", [t.tensor(x)], {"mode": mode, "align_corners": bool(align) if mode == "bilinear" else None,
                                        "scales": scales})


RESIZE = OpKind(
    kind="resize",
    summary="Upsample/interpolate, nearest, nearest-exact and bilinear (align_corners either way)",
    plaintext=_resize_plain,
    encrypted=_resize_secure,
    ring=lambda op, b, p, f: ring_bits(b[0], f.act_bits + (2 * _WEIGHT_BITS if op.attrs["mode"] == "bilinear" else 0)),
    torch=(TorchRule(("nn.Upsample", "nn.UpsamplingNearest2d", "nn.UpsamplingBilinear2d", "F.interpolate",
                      "F.upsample", "F.upsample_nearest", "F.upsample_bilinear"), _resize_rule),),
)

RECORDS = (MAX_POOL2D, ADAPTIVE_MAX_POOL2D, AVG_POOL2D, ADAPTIVE_AVG_POOL2D, MEAN, SUM, RESIZE)
