"""Element-wise arithmetic: sums of activations, public constants, and the model owner's tensors used as data.

``+``, ``-``, ``*``, ``/`` and unary minus, as Python operators, ``torch.*``
functions and tensor methods (in-place forms too), dispatch here on what the
operands are:

=========================  =================================================
activation + activation    ``add`` (local; broadcasting)
activation + number        ``add_const`` (local)
activation + model tensor  ``bias`` (local: the owner's value as a sharing)
activation * number        ``scale_const`` (local; reals ride on the next truncation)
activation * model tensor  ``affine`` (one owned product, :mod:`.products`)
activation * activation    ``mul`` (one Beaver product, :mod:`.products`)
=========================  =================================================

A model tensor (a parameter, a buffer, or anything computed from them alone)
is the model owner's: it never becomes public.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from mpc.ring import encode
from mpc.tensor import SharedTensor

from ..plan import Op
from ..registry import OpKind, Operand, Refusal, TorchRule, ring_bits, same_shape_layout
from .scaling import factor_bits, times_public

__all__ = ["RECORDS", "constant_sharing", "trace_scale", "trace_add_const"]


def _right_aligned(op: Op, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple((1,) * (len(input_shape) - len(s)) + tuple(s) for s in op.param_shapes)


def constant_sharing(x: SharedTensor, value: Any) -> SharedTensor:
    """A public constant as a sharing at x's scale and shape (party 0 holds it, the others zeros)."""
    shape = np.broadcast_shapes(x.shape, np.shape(value))
    share = encode(np.broadcast_to(np.asarray(value, dtype=np.float64), shape), x.frac_bits) if x.ctx.rank == 0 \
        else np.zeros(shape, dtype=np.int64)
    return SharedTensor(x.ctx, share, x.frac_bits)


# -- trace rules --------------------------------------------------------------------------------
def _number(t: Any, v: Any) -> float | None:
    """A Python number (or a traced constant that is one), else None."""
    if t.is_tensor(v) or t.constant(v) is not None:
        return None
    value = t.static(v)
    return float(value) if isinstance(value, numbers.Real) else None


def _model_tensor(t: Any, v: Any, activation: Any) -> np.ndarray:
    """A model tensor broadcast against the activation, without the batch dimension."""
    value = t.constant(v)
    full = (2,) + t.shape(activation)  # any batch size
    if value.ndim == len(full):
        if value.shape[0] != 1:
            raise Refusal(f"a model tensor of shape {value.shape} varies along the batch dimension",
                          "give it a leading dimension of 1")
        value = value[0]
    try:
        np.broadcast_shapes(value.shape, full[1:])
    except ValueError:
        raise Refusal(f"a model tensor of shape {value.shape} does not broadcast to the activation "
                      f"{full[1:]}") from None
    if np.broadcast_shapes(value.shape, full[1:]) != full[1:]:
        raise Refusal("a model tensor would enlarge the activation by broadcasting",
                      "expand the activation explicitly first")
    return value


def trace_add_const(t: Any, c: Any, x: Any, value: Any, tag: str | None = None) -> str:
    attrs = {"value": value if isinstance(value, float) else np.asarray(value, dtype=np.float64).tolist()}
    if tag is None:
        return t.emit(c, "add_const", [t.tensor(x)], attrs)
    return t.sub(c, tag, "add_const", [t.tensor(x)], attrs)


def trace_scale(t: Any, c: Any, x: Any, factor: float, tag: str | None = None) -> str:
    if tag is None:
        return t.emit(c, "scale_const", [t.tensor(x)], {"factor": float(factor)})
    return t.sub(c, tag, "scale_const", [t.tensor(x)], {"factor": float(factor)})


def _add_rule(sign: float, inplace: bool = False):
    """a + sign * alpha * b for any mix of activations, numbers and model tensors."""
    def rule(t: Any, c: Any) -> None:
        a, b = c.arg(0, "input"), c.arg(1, "other")
        alpha = t.static(c.kwargs.get("alpha", 1))
        s = sign * float(alpha)
        if t.is_tensor(a) and t.is_tensor(b):
            if abs(s) != 1:
                raise Refusal(f"alpha={alpha}", "scale the operand explicitly")
            t.emit(c, "add", [t.tensor(a), t.tensor(b)], {"subtract": s < 0})
        else:
            if t.is_tensor(a):
                x, x_factor, other, other_factor = a, 1.0, b, s
            elif t.is_tensor(b):
                x, x_factor, other, other_factor = b, s, a, 1.0
            else:
                raise Refusal("needs a tensor operand")
            src = x if x_factor == 1 else trace_scale(t, c, x, x_factor, "scaled")
            number = _number(t, other)
            if number is not None:
                trace_add_const(t, c, src, number * other_factor)
            elif t.constant(other) is not None:
                t.emit(c, "bias", [t.tensor(src)], {}, {"value": _model_tensor(t, other, x) * other_factor})
            else:
                raise Refusal(f"an operand that is neither a tensor nor a number: {t.static(other)!r}")
        if inplace:
            t.rebind(a, c)
    return rule


def _mul_rule(divide: bool = False, inplace: bool = False):
    def rule(t: Any, c: Any) -> None:
        a, b = c.arg(0, "input"), c.arg(1, "other")
        a_t, b_t = t.is_tensor(a), t.is_tensor(b)
        if a_t and b_t:
            if divide:
                raise Refusal("division by an encrypted tensor", "divide by a constant, or multiply instead")
            t.emit(c, "mul", [t.tensor(a), t.tensor(b)])
        elif a_t or b_t:
            x, other = (a, b) if a_t else (b, a)
            if divide and not a_t:
                raise Refusal("division by an encrypted tensor", "divide by a constant, or multiply instead")
            number = _number(t, other)
            if number is not None:
                if divide and number == 0:
                    raise Refusal("division by zero")
                trace_scale(t, c, x, 1.0 / number if divide else number)
            elif t.constant(other) is not None:
                scale = _model_tensor(t, other, x)
                if divide:
                    scale = 1.0 / scale
                t.emit(c, "affine", [t.tensor(x)], {}, {"scale": scale, "shift": np.zeros_like(scale)})
            else:
                raise Refusal(f"an operand that is neither a tensor nor a number: {t.static(other)!r}")
        else:
            raise Refusal("needs a tensor operand")
        if inplace:
            t.rebind(a, c)
    return rule


def _neg_rule(t: Any, c: Any) -> None:
    trace_scale(t, c, c.arg(0, "input"), -1.0)


_ADD_RULES = (
    TorchRule(("operator.add", "torch.add", "Tensor.add"), _add_rule(1.0)),
    TorchRule(("operator.iadd", "Tensor.add_"), _add_rule(1.0, inplace=True)),
    TorchRule(("operator.sub", "torch.sub", "torch.subtract", "Tensor.sub"), _add_rule(-1.0)),
    TorchRule(("operator.isub", "Tensor.sub_"), _add_rule(-1.0, inplace=True)),
)
_MUL_RULES = (
    TorchRule(("operator.mul", "torch.mul", "torch.multiply", "Tensor.mul"), _mul_rule()),
    TorchRule(("operator.imul", "Tensor.mul_"), _mul_rule(inplace=True)),
    TorchRule(("operator.truediv", "torch.div", "torch.true_divide", "Tensor.div"), _mul_rule(divide=True)),
    TorchRule(("operator.itruediv", "Tensor.div_"), _mul_rule(divide=True, inplace=True)),
    TorchRule(("operator.neg", "torch.neg", "Tensor.neg"), _neg_rule),
)


# -- add ------------------------------------------------------------------------------------------
def _add_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    a, b = xs[0].raw, xs[1].raw
    return a - b if op.attrs["subtract"] else a + b


ADD = OpKind(
    kind="add",
    summary="tensor + tensor and tensor - tensor (broadcasting)",
    plaintext=lambda op, xs, p: xs[0] - xs[1] if op.attrs["subtract"] else xs[0] + xs[1],
    encrypted=_add_secure,
    torch=_ADD_RULES,
)


def _add_const_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    x = xs[0].raw
    return x + constant_sharing(x, op.attrs["value"])


ADD_CONST = OpKind(
    kind="add_const",
    summary="tensor + a Python number or public constant array",
    plaintext=lambda op, xs, p: xs[0] + np.asarray(op.attrs["value"], dtype=np.float64),
    encrypted=_add_const_secure,
)


def _scale_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    factor = float(op.attrs["factor"])
    x = xs[0].raw if factor_bits(factor) == 0 else xs[0].act
    return times_public(x, factor)


SCALE_CONST = OpKind(
    kind="scale_const",
    summary="tensor times or divided by a Python number, unary minus",
    plaintext=lambda op, xs, p: xs[0] * float(op.attrs["factor"]),
    encrypted=_scale_secure,
    ring=lambda op, b, p, f: ring_bits(b[0] * abs(op.attrs["factor"]), f.act_bits + factor_bits(op.attrs["factor"])),
    torch=_MUL_RULES,
)


def _bias_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    return xs[0].raw + m.value(op.params[0])


BIAS = OpKind(
    kind="bias",
    summary="tensor + a model parameter (e.g. position embeddings, relative position biases)",
    plaintext=lambda op, xs, p: xs[0] + p[0],
    encrypted=_bias_secure,
    params=("value",),
    layout=_right_aligned,
)


def _param_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    v = m.value(op.params[0])
    n = xs[0].shape[0]
    return SharedTensor(v.ctx, np.broadcast_to(v.share, (n,) + v.shape[1:]).copy(), v.frac_bits)


# its one input only gives the batch size
PARAM = OpKind(
    kind="param",
    summary="a model parameter expanded over the batch (class tokens)",
    plaintext=lambda op, xs, p: np.broadcast_to(p[0], (xs[0].shape[0],) + p[0].shape[1:]).copy(),
    encrypted=_param_secure,
    params=("value",),
    layout=same_shape_layout,
)


RECORDS = (ADD, ADD_CONST, SCALE_CONST, BIAS, PARAM)
