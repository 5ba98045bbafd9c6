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

from .ops import KINDS
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
    """Each parameter's shape in the executor and its role (:attr:`bridge.registry.OpKind.params`).

    Roles: ``"weight"`` (multiplied with activations), ``"offset"`` (added at the
    product scale), ``"value"`` (added at the activation scale).  Shapes come from
    each op kind's layout rule, e.g. (1, C, 1, 1) for a conv bias.
    """
    shapes = {plan.input_name: (1,) + tuple(plan.input_shape)}
    shapes.update({op.name: (1,) + tuple(op.shape) for op in plan.ops})
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for op in plan.ops:
        record = KINDS[op.kind]
        layout = record.layout(op, shapes[op.inputs[0]] if op.inputs else ())
        for name, shape, role in zip(op.params, layout, record.params):
            out[name] = (tuple(shape), role)
    return out


def encode_weights(
    plan: Plan, weights: dict[str, np.ndarray], *, act_bits: int, weight_bits: int
) -> dict[str, np.ndarray]:
    """The model owner's weights as ring elements in the executor's layout.

    Multiplied parameters are encoded at ``weight_bits``; offsets (biases,
    shifts) at the product scale ``act_bits + weight_bits``; values (position
    embeddings, class tokens) at ``act_bits``.

    Raises:
        ConfigError: a parameter is too large for its scale (the message names it).
    """
    out = {}
    for name, (shape, role) in param_layout(plan).items():
        value = np.asarray(weights[name], dtype=np.float64).reshape(shape)
        scale = {"weight": weight_bits, "offset": act_bits + weight_bits, "value": act_bits}[role]
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
