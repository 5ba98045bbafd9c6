"""The bilinear ring operations Beaver triples are made for: mul, matmul, linear (x @ w.T), conv2d.

One table serves the protocol (which evaluates the op on opened masks and local
shares) and the dealer (which evaluates it on the masks themselves), so both
sides always agree on the operation and on the output shape.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .kernels import ring_conv2d, ring_matmul

__all__ = ["BILINEAR_OPS", "conv_params", "conv_output_shape", "output_shape", "evaluate"]


def _pair(v: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return int(v[0]), int(v[1])


def conv_params(stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> dict[str, Any]:
    """Normalised, msgpack-friendly conv2d options."""
    params = {
        "stride": list(_pair(stride, "stride")),
        "padding": list(_pair(padding, "padding")),
        "dilation": list(_pair(dilation, "dilation")),
        "groups": int(groups),
    }
    if min(params["stride"]) < 1 or min(params["dilation"]) < 1 or min(params["padding"]) < 0 or params["groups"] < 1:
        raise ValueError(f"invalid conv2d options {params}")
    return params


def conv_output_shape(x_shape: tuple[int, ...], w_shape: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError(f"conv2d expects NCHW input and OIHW weights, got {x_shape} and {w_shape}")
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    g = params["groups"]
    if c != cg * g or o % g:
        raise ValueError(f"conv2d channels do not match: input {x_shape}, weight {w_shape}, groups {g}")
    (sh, sw), (ph, pw), (dh, dw) = params["stride"], params["padding"], params["dilation"]
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d kernel {w_shape[2:]} does not fit input {x_shape[2:]} with {params}")
    return (n, o, ho, wo)


def _mul_shape(a: tuple[int, ...], b: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(a, b))


def _matmul_rule(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if not a or not b:
        raise ValueError("matmul operands must have at least one dimension")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ValueError(f"matmul shapes {a} and {b} do not align")
    batch = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    out = batch + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _linear_shape(a: tuple[int, ...], b: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    if len(b) != 2:
        raise ValueError(f"linear weights must be 2-D (out, in), got {b}")
    return _matmul_rule(a, (b[1], b[0]))


def _conv_shape(a: tuple[int, ...], b: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    return conv_output_shape(a, b, params)


def _mul(a: np.ndarray, b: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    return np.multiply(a, b)


def _matmul(a: np.ndarray, b: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    return ring_matmul(a, b)


def _linear(a: np.ndarray, b: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    # torch's layout: weights (out, in); x @ w.T without materialising the transpose's copy twice
    return ring_matmul(a, np.ascontiguousarray(b.T))


def _conv(a: np.ndarray, b: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    return ring_conv2d(
        a, b, stride=tuple(params["stride"]), padding=tuple(params["padding"]),
        dilation=tuple(params["dilation"]), groups=params["groups"],
    )


#: name -> (ring evaluation, output shape rule)
BILINEAR_OPS: dict[str, tuple[Callable[..., np.ndarray], Callable[..., tuple[int, ...]]]] = {
    "mul": (_mul, _mul_shape),
    "matmul": (_matmul, lambda a, b, params: _matmul_rule(a, b)),
    "conv2d": (_conv, _conv_shape),
    "linear": (_linear, _linear_shape),
}


def output_shape(op: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], params: dict[str, Any]) -> tuple[int, ...]:
    return BILINEAR_OPS[op][1](tuple(a_shape), tuple(b_shape), params)


def evaluate(op: str, a: np.ndarray, b: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    return BILINEAR_OPS[op][0](a, b, params)
