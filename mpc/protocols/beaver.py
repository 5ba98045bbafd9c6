"""Beaver multiplication for any bilinear ring op (mul, matmul, conv2d).

Beaver, "Efficient multiparty protocols using circuit randomization", CRYPTO 1991.

Given shares [x], [y] and a dealer triple ([a], [b], [c] = f(a, b)):
  1. open eps = x - a and delta = y - b together (one round);
  2. [z] = [c] + f(eps, [b]) + f([a] + eps*[party 0], delta),
which sums to f(a + eps, b + delta) = f(x, y).

Cost per party: 1 round; 8 (n-1) (|x| + |y|) bytes sent and as many received;
two local evaluations of f; the dealer sends |z| ring elements to party 0.
The result is at the sum of the operands' scales: truncate afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import bilinear

if TYPE_CHECKING:
    from ..context import Context

__all__ = ["beaver"]


def beaver(ctx: "Context", x: np.ndarray, y: np.ndarray, op: str, params: dict[str, Any] | None = None) -> np.ndarray:
    """Shares of f(x, y) from shares of x and y."""
    params = dict(params or {})
    out_shape = bilinear.output_shape(op, x.shape, y.shape, params)
    if op == "mul":
        # 0-d operands become 1-element arrays: numpy scalars warn on wrap-around.
        x, y = np.atleast_1d(x), np.atleast_1d(y)
    request = {"op": op, "a": list(x.shape), "b": list(y.shape), **params}
    a, b, c = ctx.dealer.get("triple", request)
    eps, delta = ctx.comm.open([x - a, y - b])
    left = a + eps if ctx.rank == 0 else a
    z = bilinear.evaluate(op, eps, b, params)
    z += c
    z += bilinear.evaluate(op, left, delta, params)
    return z.reshape(out_shape)
