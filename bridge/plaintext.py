"""A plaintext float64 numpy executor of a plan: the conversion checked without any MPC.

``run_plaintext(plan, weights, x)`` must agree with the torch model to float
precision; tests use it to validate tracing and rewrites (BatchNorm folding,
pool-before-ReLU) independently of the encrypted executor, whose results are
then compared with it and with torch.  It runs each op's plaintext rule
(:mod:`bridge.ops`) in the interpreter loop the encrypted executor shares
(:func:`bridge.interpret.interpret`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .interpret import check_kinds, interpret
from .ops import KINDS
from .ops.activations import softmax_float as softmax
from .ops.products import conv2d_float
from .plan import Op, Plan

__all__ = ["run_plaintext", "measure_ranges", "conv2d_float", "softmax"]


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
    check_kinds(plan)

    def step(op: Op, xs: list[np.ndarray]) -> np.ndarray:
        params = [np.asarray(weights[k], np.float64) for k in op.params]
        return KINDS[op.kind].plaintext(op, xs, params)

    out = interpret(plan, x, step, on_op=on_op)
    if final_softmax and plan.softmax_axis is not None:
        out = softmax(out, plan.softmax_axis)
    return out


def measure_ranges(plan: Plan, weights: dict[str, np.ndarray], x: np.ndarray) -> dict[str, float]:
    """The largest magnitude of every value of the plan (input included) on the batch ``x``."""
    ranges = {plan.input_name: float(np.abs(x).max()) if np.size(x) else 0.0}

    def measure(op: Op, xs: list[np.ndarray], out: np.ndarray) -> None:
        ranges[op.name] = float(np.abs(out).max()) if out.size else 0.0

    run_plaintext(plan, weights, x, on_op=measure)
    return ranges
