"""A plaintext float64 numpy executor of a plan: the conversion checked without any MPC.

``run_plaintext(plan, weights, x)`` must agree with the torch model to float
precision; tests use it to validate tracing and rewrites (BatchNorm folding,
pool-before-ReLU) independently of the encrypted executor, whose results are
then compared with it and with torch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .plan import Op, Plan
from .windows import adaptive_counts, adaptive_sum, avg_pool_divisors, pool_windows, window_sum

__all__ = ["run_plaintext", "value_ranges", "conv2d_float", "softmax", "PLAINTEXT_OPS"]


def conv2d_float(
    x: np.ndarray, w: np.ndarray, stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], groups: int,
) -> np.ndarray:
    """``torch.nn.functional.conv2d`` (no bias) by im2col and matrix products, any float dtype."""
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    eff = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    win = np.lib.stride_tricks.sliding_window_view(xp, eff, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    ho, wo = win.shape[2], win.shape[3]
    og = o // groups
    out = np.empty((n, o, ho, wo), dtype=np.result_type(x, w))
    for g in range(groups):
        cols = win[:, g * cg:(g + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, cg * kh * kw)
        res = cols @ w[g * og:(g + 1) * og].reshape(og, -1).T
        out[:, g * og:(g + 1) * og] = res.reshape(n, ho, wo, og).transpose(0, 3, 1, 2)
    return out


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _conv(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    a = op.attrs
    out = conv2d_float(xs[0], p[0], a["stride"], a["padding"], a["dilation"], a["groups"])
    return out + _channel(p[1], 4)


def _avg_pool(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    a = op.attrs
    sums = window_sum(xs[0], a["kernel"], a["stride"], a["padding"])
    return sums / avg_pool_divisors(xs[0].shape[2:], a["kernel"], a["stride"], a["padding"],
                                    a["count_include_pad"], a["divisor"])


def _adaptive(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    out = op.attrs["output"]
    return adaptive_sum(xs[0], out) / adaptive_counts(xs[0].shape[2:], out)


def _max_pool(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    a = op.attrs
    return pool_windows(xs[0], a["kernel"], a["stride"], a["padding"], -np.inf).max(axis=(4, 5))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``."""
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


#: kind -> f(op, inputs, params) on float arrays with the batch dimension first
PLAINTEXT_OPS: dict[str, Callable[[Op, list[np.ndarray], list[np.ndarray]], np.ndarray]] = {
    "conv2d": _conv,
    "linear": lambda op, xs, p: xs[0] @ p[0].T + p[1],
    "affine": lambda op, xs, p: xs[0] * _channel(p[0], xs[0].ndim) + _channel(p[1], xs[0].ndim),
    "relu": lambda op, xs, p: np.maximum(xs[0], 0.0),
    "clamp": lambda op, xs, p: np.clip(xs[0], op.attrs["low"], op.attrs["high"]),
    "max_pool2d": _max_pool,
    "avg_pool2d": _avg_pool,
    "adaptive_avg_pool2d": _adaptive,
    "mean": lambda op, xs, p: xs[0].mean(axis=op.attrs["axes"], keepdims=op.attrs["keepdim"]),
    "reshape": lambda op, xs, p: xs[0].reshape((xs[0].shape[0],) + tuple(op.attrs["shape"])),
    "add": lambda op, xs, p: xs[0] + xs[1],
    "add_const": lambda op, xs, p: xs[0] + op.attrs["value"],
    "cat": lambda op, xs, p: np.concatenate(xs, axis=op.attrs["axis"]),
    "softmax": lambda op, xs, p: softmax(xs[0], op.attrs["axis"]),
}


def run_plaintext(
    plan: Plan,
    weights: dict[str, np.ndarray],
    x: np.ndarray,
    *,
    final_softmax: bool = False,
    on_op: Callable[[Op, list[np.ndarray], np.ndarray], None] | None = None,
) -> np.ndarray:
    """Execute ``plan`` on a batch ``x`` (N, *input_shape) in float64; returns the logits.

    With ``final_softmax`` the plan's lifted final softmax (if any) is applied.
    ``on_op(op, inputs, output)`` sees every op's values (e.g. to measure ranges).
    """
    x = np.asarray(x, dtype=np.float64)
    if tuple(x.shape[1:]) != tuple(plan.input_shape):
        raise ValueError(f"input has shape {x.shape}, the plan expects (N, {', '.join(map(str, plan.input_shape))})")
    values = {plan.input_name: x}
    remaining = plan.use_counts()
    for op in plan.ops:
        xs = [values[i] for i in op.inputs]
        values[op.name] = PLAINTEXT_OPS[op.kind](op, xs, [np.asarray(weights[k], np.float64) for k in op.params])
        if on_op is not None:
            on_op(op, xs, values[op.name])
        for i in op.inputs:
            remaining[i] -= 1
            if remaining[i] == 0 and i != plan.output:
                del values[i]
    out = values[plan.output]
    if final_softmax and plan.softmax_axis is not None:
        out = softmax(out, plan.softmax_axis)
    return out


def value_ranges(plan: Plan, weights: dict[str, np.ndarray], x: np.ndarray) -> tuple[float, float]:
    """The largest magnitude any comparison of the encrypted run meets on ``x``, and the largest output.

    ReLU compares its input with 0; a clamp compares x - low and x - high; a
    max-pool compares differences of two inputs (at most twice the largest).
    """
    peak = [0.0]

    def measure(op: Op, xs: list[np.ndarray], out: np.ndarray) -> None:
        top = float(np.abs(xs[0]).max()) if op.kind in ("relu", "clamp", "max_pool2d") else 0.0
        if op.kind == "clamp":
            top += max(abs(b) for b in (op.attrs["low"], op.attrs["high"]) if b is not None)
        elif op.kind == "max_pool2d":
            top *= 2
        peak[0] = max(peak[0], top)

    out = run_plaintext(plan, weights, x, on_op=measure)
    return peak[0], float(np.abs(out).max())
