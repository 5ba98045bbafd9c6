"""Activations: exact comparisons (ReLU, clamps) and approximations of smooth functions.

Exact: ``relu`` and ``clamp`` are comparisons (:mod:`mpc.nonlinear`), bit-exact
on the fixed-point values while the compared magnitudes stay inside the
comparison domain.

Approximated, each a one-line composition of the engine's functions (see
:func:`silu` and the others below; swap the line when the engine offers a
better one).  Absolute errors against torch's exact function at 16 fractional
bits (the least a plan that approximates runs at), as :data:`ERROR_BOUNDS` states
them and ``tests/test_bridge_ops.py`` checks them over [-20, 20] and at
±100; the comparison domain must hold the magnitudes each compares
(:attr:`~bridge.registry.OpKind.compares`):

============  ===============================================  ==========================  ===============
function      how                                              error bound (abs)           compares
============  ===============================================  ==========================  ===============
sigmoid       mpc ``sigmoid`` (exp on [-16, 0], Newton 1/y)    1e-4                        |x| + 16
tanh          2 sigmoid(2x) - 1                                2e-4                        2|x| + 16
silu          x sigmoid(x)                                     1e-4 max(1, |x|)            |x| + 16
hardsigmoid   clamp(x/6 + 1/2, 0, 1) (exact comparisons)       5e-5                        |x|/6 + 1.5
hardswish     x hardsigmoid(x)                                 5e-5 max(1, |x|)            |x|/6 + 1.5
gelu          relu(x - 6) + t sigmoid(2u), t = clamp(x, ±6),   1e-3 (4.7e-4 of it: tanh    max(|x| + 6, 41)
              u = sqrt(2/pi) (t + 0.044715 t^3) (tanh form)    form against erf); 2e-4
                                                               against torch's tanh form
softmax       mpc ``softmax`` (max-subtracted, exp, 1/sum)     1e-4                        2|x| + 16, k
============  ===============================================  ==========================  ===============

Each costs about one sigmoid (34 rounds at 16 bits, 4 comparisons per element).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import mpc
from mpc import nonlinear
from mpc.ring import encode
from mpc.tensor import SharedTensor

from ..plan import Op
from ..registry import Fixed, OpKind, Operand, Refusal, TorchRule, compares_input, ring_bits

__all__ = ["RECORDS", "ERROR_BOUNDS", "silu", "hardsigmoid", "hardswish", "gelu", "softmax_float", "gelu_float"]

#: kind -> (a, b): |encrypted - exact| <= a + b |x| at 16 fractional bits, for any x (see the table above)
ERROR_BOUNDS = {
    "sigmoid": (1e-4, 0.0),
    "tanh": (2e-4, 0.0),
    "silu": (1e-4, 1e-4),
    "hardsigmoid": (5e-5, 0.0),
    "hardswish": (5e-5, 5e-5),
    "gelu": (1e-3, 0.0),
    "gelu_tanh": (2e-4, 0.0),
    "softmax": (1e-4, 0.0),
}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_GELU_CLAMP = 6.0  # beyond it gelu(x) = relu(x) within 6 Phi(-6) = 6e-9
#: largest |2u| the tanh form meets on [-6, 6]
_GELU_ARGUMENT = 2 * _SQRT_2_OVER_PI * (_GELU_CLAMP + _GELU_CUBIC * _GELU_CLAMP**3)


# -- the approximations, each one call ------------------------------------------------------------
def silu(x: SharedTensor) -> SharedTensor:
    return x * x.sigmoid()


def hardsigmoid(x: SharedTensor) -> SharedTensor:
    return (x * (1.0 / 6.0) + 0.5).clamp(0, 1)


def hardswish(x: SharedTensor) -> SharedTensor:
    return x * hardsigmoid(x)


def gelu(x: SharedTensor) -> SharedTensor:
    """GELU by the tanh form on t = clamp(x, -6, 6), plus relu(x - 6) for the linear tail."""
    both = mpc.stack([x + _GELU_CLAMP, x - _GELU_CLAMP]).relu()  # one comparison batch
    t = both[0] - both[1] - _GELU_CLAMP
    u = t * (2 * _SQRT_2_OVER_PI + (2 * _SQRT_2_OVER_PI * _GELU_CUBIC) * (t * t))
    return both[1] + t * u.sigmoid()


# -- float references (the plaintext executor: torch's definitions) --------------------------------
def gelu_float(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3)))
    from scipy.special import erf  # scipy comes with scikit-learn; imported here, where it is needed

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _sigmoid_float(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def softmax_float(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``."""
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


# -- relu and clamp ---------------------------------------------------------------------------------
def _bound(x: SharedTensor, value: float) -> int | SharedTensor:
    """A public bound at x's own scale: an exact integer, or a trivial sharing."""
    if float(value).is_integer():
        return int(value)
    share = encode(value, x.frac_bits) if x.ctx.rank == 0 else np.int64(0)
    return SharedTensor(x.ctx, np.broadcast_to(share, x.shape).copy(), x.frac_bits)


def _clamp_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    x = xs[0].act
    return x.clamp(*(None if b is None else _bound(x, b) for b in (op.attrs["low"], op.attrs["high"])))


def trace_clamp(t: Any, c: Any, x: Any, low: Any, high: Any, inplace: bool = False) -> None:
    for bound in (low, high):
        if t.is_tensor(bound) or t.constant(bound) is not None:
            raise Refusal("clamp bounds must be numbers, not tensors")
    low = None if low is None else float(t.static(low))
    high = None if high is None else float(t.static(high))
    if low is None and high is None:
        t.alias(c, t.tensor(x))
    elif low == 0.0 and high is None:
        t.emit(c, "relu", [t.tensor(x)])
    else:
        t.emit(c, "clamp", [t.tensor(x)], {"low": low, "high": high})
    if inplace:
        t.rebind(x, c)


def _inplace(t: Any, c: Any, index: int = 1) -> bool:
    return bool(t.static(c.arg(index, "inplace", False)))


def _module_inplace(c: Any) -> bool:
    return bool(getattr(c.module, "inplace", False))


RELU = OpKind(
    kind="relu",
    summary="ReLU",
    plaintext=lambda op, xs, p: np.maximum(xs[0], 0.0),
    encrypted=lambda m, op, xs: xs[0].act.relu(),
    compares=compares_input,
    torch=(
        TorchRule(("nn.ReLU",), lambda t, c: trace_clamp(t, c, c.arg(0, "input"), 0.0, None, _module_inplace(c))),
        TorchRule(("F.relu", "torch.relu", "Tensor.relu"),
                  lambda t, c: trace_clamp(t, c, c.arg(0, "input"), 0.0, None, _inplace(t, c))),
        TorchRule(("F.relu_", "torch.relu_", "Tensor.relu_"),
                  lambda t, c: trace_clamp(t, c, c.arg(0, "input"), 0.0, None, True)),
    ),
)

CLAMP = OpKind(
    kind="clamp",
    summary="ReLU6, Hardtanh, clamp/clip with constant bounds",
    plaintext=lambda op, xs, p: np.clip(xs[0], op.attrs["low"], op.attrs["high"]),
    encrypted=_clamp_secure,
    compares=lambda op, r, out: r[0] + max(abs(b) for b in (op.attrs["low"], op.attrs["high"]) if b is not None),
    torch=(
        TorchRule(("nn.ReLU6", "nn.Hardtanh"), lambda t, c: trace_clamp(
            t, c, c.arg(0, "input"), c.module.min_val, c.module.max_val, _module_inplace(c))),
        TorchRule(("F.relu6",), lambda t, c: trace_clamp(t, c, c.arg(0, "input"), 0.0, 6.0, _inplace(t, c))),
        TorchRule(("F.hardtanh",), lambda t, c: trace_clamp(
            t, c, c.arg(0, "input"), c.arg(1, "min_val", -1.0), c.arg(2, "max_val", 1.0), _inplace(t, c, 3))),
        TorchRule(("torch.clamp", "torch.clip", "Tensor.clamp", "Tensor.clip"), lambda t, c: trace_clamp(
            t, c, c.arg(0, "input"), c.arg(1, "min", None), c.arg(2, "max", None))),
        TorchRule(("Tensor.clamp_", "Tensor.clip_"), lambda t, c: trace_clamp(
            t, c, c.arg(0, "input"), c.arg(1, "min", None), c.arg(2, "max", None), True)),
        TorchRule(("torch.clamp_min", "Tensor.clamp_min"), lambda t, c: trace_clamp(
            t, c, c.arg(0, "input"), c.arg(1, "min"), None)),
        TorchRule(("Tensor.clamp_min_",), lambda t, c: trace_clamp(t, c, c.arg(0, "input"), c.arg(1, "min"), None, True)),
        TorchRule(("torch.clamp_max", "Tensor.clamp_max"), lambda t, c: trace_clamp(
            t, c, c.arg(0, "input"), None, c.arg(1, "max"))),
    ),
)


def _leaky_rule(t: Any, c: Any) -> None:
    slope = c.module.negative_slope if c.module is not None else t.static(c.arg(1, "negative_slope", 0.01))
    t.emit(c, "leaky_relu", [t.tensor(c.arg(0, "input"))], {"slope": float(slope)})


LEAKY_RELU = OpKind(
    kind="leaky_relu",
    summary="LeakyReLU",
    plaintext=lambda op, xs, p: np.where(xs[0] >= 0, xs[0], xs[0] * op.attrs["slope"]),
    encrypted=lambda m, op, xs: xs[0].act.relu() * (1 - op.attrs["slope"]) + xs[0].act * op.attrs["slope"],
    compares=compares_input,
    torch=(TorchRule(("nn.LeakyReLU", "F.leaky_relu"), _leaky_rule),),
)


# -- approximated activations ---------------------------------------------------------------------
def _unary(kind: str):
    """A trace rule emitting ``kind`` on the first argument (in-place forms rebind it)."""
    def rule(t: Any, c: Any) -> None:
        x = c.arg(0, "input")
        t.emit(c, kind, [t.tensor(x)])
        if _module_inplace(c) if c.module is not None else bool(t.static(c.kwargs.get("inplace", False))):
            t.rebind(x, c)
    return rule


def _product_ring(op: Op, b: list[float], p: list[np.ndarray], f: Fixed) -> float:
    return ring_bits(b[0], 2 * f.act_bits)  # x times a factor in [0, 1]


SIGMOID = OpKind(
    kind="sigmoid",
    summary="Sigmoid (approximated)",
    plaintext=lambda op, xs, p: _sigmoid_float(xs[0]),
    encrypted=lambda m, op, xs: xs[0].act.sigmoid(),
    compares=lambda op, r, out: r[0] + nonlinear.EXP_CLAMP,
    min_act_bits=16,
    torch=(TorchRule(("nn.Sigmoid", "torch.sigmoid", "F.sigmoid", "Tensor.sigmoid"), _unary("sigmoid")),),
)

TANH = OpKind(
    kind="tanh",
    summary="Tanh (approximated)",
    plaintext=lambda op, xs, p: np.tanh(xs[0]),
    encrypted=lambda m, op, xs: xs[0].act.tanh(),
    compares=lambda op, r, out: 2 * r[0] + nonlinear.EXP_CLAMP,
    min_act_bits=16,
    torch=(TorchRule(("nn.Tanh", "torch.tanh", "F.tanh", "Tensor.tanh"), _unary("tanh")),),
)

SILU = OpKind(
    kind="silu",
    summary="SiLU/Swish (approximated)",
    plaintext=lambda op, xs, p: xs[0] * _sigmoid_float(xs[0]),
    encrypted=lambda m, op, xs: silu(xs[0].act),
    compares=lambda op, r, out: r[0] + nonlinear.EXP_CLAMP,
    ring=_product_ring,
    min_act_bits=16,
    torch=(TorchRule(("nn.SiLU", "F.silu"), _unary("silu")),),
)

HARDSIGMOID = OpKind(
    kind="hardsigmoid",
    summary="Hardsigmoid",
    plaintext=lambda op, xs, p: np.clip(xs[0] / 6.0 + 0.5, 0.0, 1.0),
    encrypted=lambda m, op, xs: hardsigmoid(xs[0].act),
    compares=lambda op, r, out: r[0] / 6.0 + 1.5,
    ring=_product_ring,
    torch=(TorchRule(("nn.Hardsigmoid", "F.hardsigmoid"), _unary("hardsigmoid")),),
)

HARDSWISH = OpKind(
    kind="hardswish",
    summary="Hardswish",
    plaintext=lambda op, xs, p: xs[0] * np.clip(xs[0] / 6.0 + 0.5, 0.0, 1.0),
    encrypted=lambda m, op, xs: hardswish(xs[0].act),
    compares=lambda op, r, out: r[0] / 6.0 + 1.5,
    ring=_product_ring,
    torch=(TorchRule(("nn.Hardswish", "F.hardswish"), _unary("hardswish")),),
)


def _gelu_rule(t: Any, c: Any) -> None:
    approximate = c.module.approximate if c.module is not None else t.static(c.kwargs.get("approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise Refusal(f"approximate={approximate!r}", "use 'none' or 'tanh'")
    t.emit(c, "gelu", [t.tensor(c.arg(0, "input"))], {"approximate": approximate})


GELU = OpKind(
    kind="gelu",
    summary="GELU, erf or tanh form (approximated)",
    plaintext=lambda op, xs, p: gelu_float(xs[0], op.attrs["approximate"]),
    encrypted=lambda m, op, xs: gelu(xs[0].act),
    compares=lambda op, r, out: max(r[0] + _GELU_CLAMP, _GELU_ARGUMENT + nonlinear.EXP_CLAMP),
    ring=lambda op, b, p, f: ring_bits(_GELU_CLAMP * _GELU_ARGUMENT, 2 * f.act_bits),
    min_act_bits=16,
    torch=(TorchRule(("nn.GELU", "F.gelu"), _gelu_rule),),
)


# -- softmax ---------------------------------------------------------------------------------------
def _softmax_rule(t: Any, c: Any) -> None:
    dim = c.module.dim if c.module is not None else c.arg(1, "dim", None)
    dim = t.static(dim)
    if dim is None:
        raise Refusal("softmax without dim", "give dim explicitly")
    ndim = len(t.shape(c.arg(0, "input"))) + 1
    axis = int(dim) % ndim
    if axis == 0:
        raise Refusal("softmax over the batch dimension")
    t.emit(c, "softmax", [t.tensor(c.arg(0, "input"))], {"axis": axis})


SOFTMAX = OpKind(
    kind="softmax",
    summary="Softmax (a final one is applied by the data owner to the revealed logits, exactly; "
            "others are approximated)",
    plaintext=lambda op, xs, p: softmax_float(xs[0], op.attrs["axis"]),
    encrypted=lambda m, op, xs: xs[0].act.softmax(axis=op.attrs["axis"]),
    compares=lambda op, r, out: max(2 * r[0] + nonlinear.EXP_CLAMP, float(op.shape[op.attrs["axis"] - 1])),
    min_act_bits=16,
    torch=(TorchRule(("nn.Softmax", "F.softmax", "torch.softmax", "Tensor.softmax"), _softmax_rule),),
)

RECORDS = (RELU, CLAMP, LEAKY_RELU, SIGMOID, TANH, SILU, HARDSIGMOID, HARDSWISH, GELU, SOFTMAX)
