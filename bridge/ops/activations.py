"""Activations: exact comparisons (ReLU, clamps) and approximations of smooth functions.

Exact: ``relu`` and ``clamp`` are comparisons (:mod:`mpc.nonlinear`), bit-exact
on the fixed-point values while the compared magnitudes stay inside the
comparison domain.

Approximated: each is one call of the engine's function (:mod:`mpc.approximations`:
piecewise polynomials selected by one comparison batch for sigmoid, tanh, silu
and gelu; exact comparisons and one truncation for hardsigmoid and hardswish;
max-subtracted exp and a reciprocal for softmax), so a better engine function
is picked up here unchanged.  Absolute errors against torch's exact function at
16 fractional bits (the least a plan that approximates runs at), as
:data:`ERROR_BOUNDS` states them (docs/nonlinear.md derives them) and
``tests/test_bridge_ops.py`` checks them over [-20, 20] and at ±100.  The
comparison domain must hold what each compares
(:attr:`~bridge.registry.OpKind.compares`): x minus each breakpoint of its
table (|x| + 12 for sigmoid, + 6 tanh, + 14 silu, + 5 gelu, + 3 hardsigmoid and
hardswish); softmax compares differences of its row (2|x|), those plus 16, and
its row's sum against powers of two up to the row length.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mpc import approximations
from mpc.approx_tables import GELU as GELU_TABLE
from mpc.approx_tables import GELU_TANH, SIGMOID as SIGMOID_TABLE, SILU as SILU_TABLE, TANH as TANH_TABLE
from mpc.ring import encode
from mpc.tensor import SharedTensor

from ..plan import Op
from ..registry import OpKind, Operand, Refusal, TorchRule, compares_input

__all__ = ["RECORDS", "ERROR_BOUNDS", "softmax_float", "gelu_float"]

#: kind -> (a, b): |encrypted - exact| <= a + b |x| at 16 fractional bits, for any x (see the table above)
ERROR_BOUNDS = {
    "sigmoid": (1e-4, 0.0),
    "tanh": (2e-4, 0.0),
    "silu": (1e-4, 1e-4),
    "hardsigmoid": (5e-5, 0.0),
    "hardswish": (5e-5, 5e-5),
    "gelu": (1e-3, 0.0),
    "gelu_tanh": (2e-4, 0.0),
    "softmax": (2e-4, 0.0),
}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
#: the largest |breakpoint| of each piecewise table: x - b is compared for every breakpoint b
_REACH = {table.name: max(abs(b) for b in table.breaks) for table in (SIGMOID_TABLE, TANH_TABLE, SILU_TABLE, GELU_TABLE, GELU_TANH)}
#: hardsigmoid and hardswish compare x + 3 and x - 3
_HARD_REACH = 3.0


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


SIGMOID = OpKind(
    kind="sigmoid",
    summary="Sigmoid (approximated)",
    plaintext=lambda op, xs, p: _sigmoid_float(xs[0]),
    encrypted=lambda m, op, xs: xs[0].act.sigmoid(),
    compares=lambda op, r, out: r[0] + _REACH["sigmoid"],
    min_act_bits=16,
    torch=(TorchRule(("nn.Sigmoid", "torch.sigmoid", "F.sigmoid", "Tensor.sigmoid"), _unary("sigmoid")),),
)

TANH = OpKind(
    kind="tanh",
    summary="Tanh (approximated)",
    plaintext=lambda op, xs, p: np.tanh(xs[0]),
    encrypted=lambda m, op, xs: xs[0].act.tanh(),
    compares=lambda op, r, out: r[0] + _REACH["tanh"],
    min_act_bits=16,
    torch=(TorchRule(("nn.Tanh", "torch.tanh", "F.tanh", "Tensor.tanh"), _unary("tanh")),),
)

SILU = OpKind(
    kind="silu",
    summary="SiLU/Swish (approximated)",
    plaintext=lambda op, xs, p: xs[0] * _sigmoid_float(xs[0]),
    encrypted=lambda m, op, xs: xs[0].act.silu(),
    compares=lambda op, r, out: r[0] + _REACH["silu"],
    min_act_bits=16,
    torch=(TorchRule(("nn.SiLU", "F.silu"), _unary("silu")),),
)

HARDSIGMOID = OpKind(
    kind="hardsigmoid",
    summary="Hardsigmoid",
    plaintext=lambda op, xs, p: np.clip(xs[0] / 6.0 + 0.5, 0.0, 1.0),
    encrypted=lambda m, op, xs: xs[0].act.hardsigmoid(),
    compares=lambda op, r, out: r[0] + _HARD_REACH,
    torch=(TorchRule(("nn.Hardsigmoid", "F.hardsigmoid"), _unary("hardsigmoid")),),
)

HARDSWISH = OpKind(
    kind="hardswish",
    summary="Hardswish",
    plaintext=lambda op, xs, p: xs[0] * np.clip(xs[0] / 6.0 + 0.5, 0.0, 1.0),
    encrypted=lambda m, op, xs: xs[0].act.hardswish(),
    compares=lambda op, r, out: r[0] + _HARD_REACH,
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
    encrypted=lambda m, op, xs: xs[0].act.gelu(op.attrs["approximate"]),
    compares=lambda op, r, out: r[0] + _REACH["gelu" if op.attrs["approximate"] == "none" else "gelu_tanh"],
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
    compares=lambda op, r, out: max(2 * r[0] + approximations.EXP_CLAMP, float(op.shape[op.attrs["axis"] - 1])),
    min_act_bits=16,
    torch=(TorchRule(("nn.Softmax", "F.softmax", "torch.softmax", "Tensor.softmax"), _softmax_rule),),
)

RECORDS = (RELU, CLAMP, LEAKY_RELU, SIGMOID, TANH, SILU, HARDSIGMOID, HARDSWISH, GELU, SOFTMAX)
