"""Tensors to and from fixed point, and a model's weights in the layout the encrypted executor uses.

Activations live at ``act_bits`` fractional bits (the context's, 16 by
default).  Weights are encoded at ``weight_bits``; a product of an activation
and a weight sits at ``act_bits + weight_bits`` and is truncated back once, so
biases and BatchNorm shifts are encoded directly at that product scale and
added before the truncation (exact, no extra rounding).

Range: a value at scale s must satisfy |v| < 2^(62 - s) (see :mod:`mpc.ring`),
i.e. about 1.07e9 for the products at 16 + 16 bits.  :func:`encode_weights`
checks every parameter against its limit and names the offending one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpc.errors import ConfigError, EncodingRangeError
from mpc.ring import decode, encode

from .plan import Plan

__all__ = ["to_fixed", "from_fixed", "param_layout", "encode_weights", "quantisation_error"]


def to_fixed(value: Any, frac_bits: int) -> np.ndarray:
    """A float tensor (torch or numpy) as int64 ring elements at ``frac_bits`` fractional bits.

    Raises:
        EncodingRangeError: a value is not finite or too large for the ring at this scale.
    """
    if hasattr(value, "detach"):  # a torch tensor: no torch import needed here
        value = value.detach().cpu().double().numpy()
    return encode(np.asarray(value, dtype=np.float64), frac_bits)


def from_fixed(ring: np.ndarray, frac_bits: int) -> np.ndarray:
    """Ring elements at ``frac_bits`` fractional bits back to float64."""
    return decode(ring, frac_bits)


def param_layout(plan: Plan) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each parameter's shape in the executor and its role: ``"weight"`` (multiplied) or ``"offset"`` (added).

    Offsets get broadcastable shapes: (1, C, 1, 1) for a conv bias, (1, C, 1, ...)
    for an affine op over an input of that rank.
    """
    shapes = {plan.input_name: (1,) + tuple(plan.input_shape)}
    shapes.update({op.name: (1,) + tuple(op.shape) for op in plan.ops})
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for op in plan.ops:
        if op.kind == "conv2d":
            w, b = op.params
            out[w] = (op.param_shapes[0], "weight")
            out[b] = ((1, op.param_shapes[1][0], 1, 1), "offset")
        elif op.kind == "linear":
            w, b = op.params
            out[w] = (op.param_shapes[0], "weight")
            out[b] = (op.param_shapes[1], "offset")
        elif op.kind == "affine":
            ndim = len(shapes[op.inputs[0]])
            channel = (1, op.param_shapes[0][0]) + (1,) * (ndim - 2)
            out[op.params[0]] = (channel, "weight")
            out[op.params[1]] = (channel, "offset")
    return out


def encode_weights(
    plan: Plan, weights: dict[str, np.ndarray], *, act_bits: int, weight_bits: int
) -> dict[str, np.ndarray]:
    """The model owner's weights as ring elements in the executor's layout.

    Multiplied parameters are encoded at ``weight_bits``; added ones (biases,
    shifts) at the product scale ``act_bits + weight_bits``.

    Raises:
        ConfigError: a parameter is too large for its scale (the message names it).
    """
    out = {}
    for name, (shape, role) in param_layout(plan).items():
        value = np.asarray(weights[name], dtype=np.float64).reshape(shape)
        scale = weight_bits if role == "weight" else act_bits + weight_bits
        try:
            out[name] = encode(value, scale)
        except EncodingRangeError as exc:
            raise ConfigError(f"model parameter {name!r} does not fit fixed point: {exc}") from exc
    return out


def quantisation_error(weights: dict[str, np.ndarray], frac_bits: int) -> dict[str, float]:
    """Largest rounding error of each parameter at ``frac_bits``, relative to its largest magnitude."""
    out = {}
    for name, value in weights.items():
        value = np.asarray(value, dtype=np.float64)
        peak = float(np.abs(value).max()) if value.size else 0.0
        err = float(np.abs(decode(encode(value, frac_bits), frac_bits) - value).max()) if value.size else 0.0
        out[name] = err / peak if peak else 0.0
    return out
