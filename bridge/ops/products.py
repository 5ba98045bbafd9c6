"""Products: layers with the model owner's weights (conv2d, conv_transpose2d, linear, affine) and products of
two encrypted values (mul, matmul).

With the owner's weights, each product is one owned-operand product
(:mod:`mpc.protocols.owned`): 1 round, one message of the activation's size
to the model owner; the result stays at the product scale ``act_bits +
weight_bits`` with the bias added there, and is truncated when a consumer
needs it.  Two encrypted operands take a Beaver product: 1 round, both
operands' sizes each way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpc.protocols.beaver import beaver
from mpc.tensor import SharedTensor

from ..plan import Op
from ..registry import Fixed, OpKind, Operand, Refusal, TorchRule, ring_bits
from ..windows import col2im
from .shape import trace_permute

__all__ = ["RECORDS", "conv2d_float", "pair"]


def pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))
    return int(v), int(v)


def _broadcast_layout(op: Op, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Parameters broadcast right-aligned against the input (batch first)."""
    return tuple((1,) * (len(input_shape) - len(s)) + tuple(s) for s in op.param_shapes)


# -- conv2d ---------------------------------------------------------------------------------
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


def _conv_params(op: Op) -> dict[str, Any]:
    a = op.attrs
    return {"stride": list(a["stride"]), "padding": list(a["padding"]),
            "dilation": list(a["dilation"]), "groups": int(a["groups"])}


def _conv_plain(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    a = op.attrs
    out = conv2d_float(xs[0], p[0], a["stride"], a["padding"], a["dilation"], a["groups"])
    return out + p[1].reshape(1, -1, 1, 1)


def _conv_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    return m.offset(m.product(xs[0].act, op.params[0], "conv2d", _conv_params(op)), op.params[1])


def _conv_layout(op: Op, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return (tuple(op.param_shapes[0]), (1, op.param_shapes[1][0], 1, 1))


def _rows_ring(weight_rows: np.ndarray, bias: np.ndarray, bound: float, fixed: Fixed) -> float:
    """Largest |Σ w x + b| over output units for |x| <= bound, at the product scale."""
    peak = float((np.abs(weight_rows).sum(axis=1) * bound + np.abs(bias).reshape(-1)).max()) if bias.size else 0.0
    return ring_bits(peak, fixed.act_bits + fixed.weight_bits)


def _conv_ring(op: Op, bounds: list[float], p: list[np.ndarray], fixed: Fixed) -> float:
    return _rows_ring(p[0].reshape(p[0].shape[0], -1), p[1], bounds[0], fixed)


def _trace_conv(t: Any, c: Any, x: Any, weight: np.ndarray | None, bias: np.ndarray | None, stride: Any,
                padding: Any, dilation: Any, groups: int) -> None:
    if weight is None or weight.ndim != 4:
        raise Refusal(f"expected a 4-d convolution weight held by the model, got {None if weight is None else weight.shape}",
                      "use nn.Conv2d or F.conv2d with a parameter as weight")
    kernel = weight.shape[2:]
    dil = pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0)
        else:
            totals = [d * (k - 1) for d, k in zip(dil, kernel)]
            if any(v % 2 for v in totals):
                raise Refusal("padding='same' with an even effective kernel pads asymmetrically",
                              "use an odd kernel or explicit symmetric padding")
            pad = (totals[0] // 2, totals[1] // 2)
    else:
        pad = pair(padding)
    b = bias if bias is not None else np.zeros(weight.shape[0])
    t.emit(c, "conv2d", [t.tensor(x)],
           {"stride": pair(stride), "padding": pad, "dilation": dil, "groups": int(groups)},
           {"weight": weight, "bias": b})


def _conv_module(t: Any, c: Any) -> None:
    m = c.module
    if m.padding_mode != "zeros":
        raise Refusal(f"padding_mode={m.padding_mode!r}", "use padding_mode='zeros'")
    _trace_conv(t, c, c.arg(0, "input"), t.array(m.weight), t.array(m.bias), m.stride, m.padding, m.dilation, m.groups)


def _conv_function(t: Any, c: Any) -> None:
    _trace_conv(t, c, c.arg(0, "input"), t.constant(c.arg(1, "weight")), t.constant(c.arg(2, "bias", None)),
                t.static(c.arg(3, "stride", 1)), t.static(c.arg(4, "padding", 0)),
                t.static(c.arg(5, "dilation", 1)), int(t.static(c.arg(6, "groups", 1))))


CONV2D = OpKind(
    kind="conv2d",
    summary="Conv2d (stride, padding incl. 'same'/'valid', dilation, groups; zero padding)",
    plaintext=_conv_plain,
    encrypted=_conv_secure,
    params=("weight", "offset"),
    layout=_conv_layout,
    ring=_conv_ring,
    torch=(TorchRule(("nn.Conv2d",), _conv_module), TorchRule(("F.conv2d", "torch.conv2d"), _conv_function)),
)


# -- conv_transpose2d -------------------------------------------------------------------------
def _convt_cols(op: Op, cols: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    _, cout, kh, kw = op.param_shapes[0]
    a = op.attrs
    return col2im(cols.reshape(n, h, w, cout, kh, kw), a["stride"], a["padding"], a["dilation"], a["output_padding"])


def _convt_plain(op: Op, xs: list[np.ndarray], p: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    n, cin, h, w = x.shape
    rows = x.transpose(0, 2, 3, 1).reshape(n * h * w, cin) @ p[0].reshape(cin, -1)
    return _convt_cols(op, rows, n, h, w) + p[1].reshape(1, -1, 1, 1)


def _convt_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    x = xs[0].act
    n, cin, h, w = x.shape
    rows = SharedTensor(x.ctx, np.ascontiguousarray(x.share.transpose(0, 2, 3, 1)).reshape(n * h * w, cin), x.frac_bits)
    z = m.product(rows, op.params[0], "matmul")  # (N H W, Cout kh kw): one owned product
    return m.offset(SharedTensor(x.ctx, _convt_cols(op, z.share, n, h, w), z.frac_bits), op.params[1])


def _convt_layout(op: Op, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    cin, cout, kh, kw = op.param_shapes[0]
    return ((cin, cout * kh * kw), (1, cout, 1, 1))


def _convt_ring(op: Op, bounds: list[float], p: list[np.ndarray], fixed: Fixed) -> float:
    # an output pixel receives at most every (input channel, tap) pair once
    return _rows_ring(np.abs(p[0]).transpose(1, 0, 2, 3).reshape(p[0].shape[1], -1), p[1], bounds[0], fixed)


def _trace_convt(t: Any, c: Any, x: Any, weight: np.ndarray | None, bias: np.ndarray | None, stride: Any,
                 padding: Any, dilation: Any, groups: int) -> None:
    if weight is None or weight.ndim != 4:
        raise Refusal("expected a 4-d transposed-convolution weight held by the model",
                      "use nn.ConvTranspose2d or F.conv_transpose2d with a parameter as weight")
    cin, cout_g, kh, kw = weight.shape
    s, p, d = pair(stride), pair(padding), pair(dilation)
    in_hw, out_hw = t.shape(x)[1:], t.out_shape(c)[1:]
    output_padding = tuple(o - ((i - 1) * si - 2 * pi + di * (k - 1) + 1)
                           for o, i, si, pi, di, k in zip(out_hw, in_hw, s, p, d, (kh, kw)))
    # groups: one dense (Cin, Cout, kh, kw) weight, zero outside each group's block
    cin_g = cin // groups
    dense = np.zeros((cin, cout_g * groups, kh, kw))
    for g in range(groups):
        dense[g * cin_g:(g + 1) * cin_g, g * cout_g:(g + 1) * cout_g] = weight[g * cin_g:(g + 1) * cin_g]
    b = bias if bias is not None else np.zeros(cout_g * groups)
    t.emit(c, "conv_transpose2d", [t.tensor(x)],
           {"stride": s, "padding": p, "dilation": d, "output_padding": output_padding},
           {"weight": dense, "bias": b})


def _convt_module(t: Any, c: Any) -> None:
    m = c.module
    if m.padding_mode != "zeros":
        raise Refusal(f"padding_mode={m.padding_mode!r}", "use padding_mode='zeros'")
    _trace_convt(t, c, c.arg(0, "input"), t.array(m.weight), t.array(m.bias), m.stride, m.padding, m.dilation,
                 m.groups)


def _convt_function(t: Any, c: Any) -> None:
    _trace_convt(t, c, c.arg(0, "input"), t.constant(c.arg(1, "weight")), t.constant(c.arg(2, "bias", None)),
                 t.static(c.arg(3, "stride", 1)), t.static(c.arg(4, "padding", 0)),
                 t.static(c.arg(7, "dilation", 1)), int(t.static(c.arg(6, "groups", 1))))


CONV_TRANSPOSE2D = OpKind(
    kind="conv_transpose2d",
    summary="ConvTranspose2d (stride, padding, output_padding or output_size, dilation, groups)",
    plaintext=_convt_plain,
    encrypted=_convt_secure,
    params=("weight", "offset"),
    layout=_convt_layout,
    ring=_convt_ring,
    torch=(TorchRule(("nn.ConvTranspose2d",), _convt_module),
           TorchRule(("F.conv_transpose2d", "torch.conv_transpose2d"), _convt_function)),
)


# -- linear -------------------------------------------------------------------------------------
def _linear_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    return m.offset(m.product(xs[0].act, op.params[0], "linear"), op.params[1])


def _linear_ring(op: Op, bounds: list[float], p: list[np.ndarray], fixed: Fixed) -> float:
    return _rows_ring(p[0], p[1], bounds[0], fixed)


def trace_linear(t: Any, c: Any, x: Any, weight: np.ndarray | None, bias: np.ndarray | None) -> str:
    if weight is None or weight.ndim != 2:
        raise Refusal("expected a 2-d linear weight held by the model",
                      "use nn.Linear or F.linear with a parameter as weight")
    b = bias if bias is not None else np.zeros(weight.shape[0])
    return t.emit(c, "linear", [t.tensor(x)], {}, {"weight": weight, "bias": b})


LINEAR = OpKind(
    kind="linear",
    summary="Linear (on any number of leading dimensions)",
    plaintext=lambda op, xs, p: xs[0] @ p[0].T + p[1],
    encrypted=_linear_secure,
    params=("weight", "offset"),
    ring=_linear_ring,
    torch=(TorchRule(("nn.Linear",), lambda t, c: trace_linear(t, c, c.arg(0, "input"), t.array(c.module.weight),
                                                                 t.array(c.module.bias))),
           TorchRule(("F.linear",), lambda t, c: trace_linear(t, c, c.arg(0, "input"), t.constant(c.arg(1, "weight")),
                                                              t.constant(c.arg(2, "bias", None))))),
)


# -- affine: x * scale + shift with the owner's scale and shift (BatchNorm, layer scales) -----------
def _affine_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    return m.offset(m.product(xs[0].act, op.params[0], "mul"), op.params[1])


def _affine_ring(op: Op, bounds: list[float], p: list[np.ndarray], fixed: Fixed) -> float:
    peak = float(np.max(np.abs(p[0]) * bounds[0] + np.abs(p[1]))) if p[0].size else 0.0
    return ring_bits(peak, fixed.act_bits + fixed.weight_bits)


AFFINE = OpKind(
    kind="affine",
    summary="BatchNorm1d/2d in eval mode (folded into the preceding Conv2d/Linear where it is the only consumer), "
            "tensor times a model parameter",
    plaintext=lambda op, xs, p: xs[0] * p[0] + p[1],
    encrypted=_affine_secure,
    params=("weight", "offset"),
    layout=_broadcast_layout,
    ring=_affine_ring,
)


# -- products of two encrypted values -------------------------------------------------------------
def _mul_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    a, b = xs[0].act, xs[1].act
    return SharedTensor(a.ctx, beaver(a.ctx, a.share, b.share, "mul"), a.frac_bits + b.frac_bits)


MUL = OpKind(
    kind="mul",
    summary="element-wise product of two tensors (gating, squeeze-and-excitation; broadcasting)",
    plaintext=lambda op, xs, p: xs[0] * xs[1],
    encrypted=_mul_secure,
    ring=lambda op, b, p, f: ring_bits(b[0] * b[1], 2 * f.act_bits),
)


def _matmul_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    a, b = xs[0].act, xs[1].act
    return SharedTensor(a.ctx, beaver(a.ctx, a.share, b.share, "matmul"), a.frac_bits + b.frac_bits)


def trace_matmul(t: Any, c: Any, a: Any, b: Any, tag: str | None = None) -> str:
    """An encrypted x encrypted matrix product (shapes with the batch first on both sides)."""
    sa, sb = t.shape(a), t.shape(b)
    if len(sa) < 2 or len(sb) < 2:
        raise Refusal("matrix products of vectors are not supported", "reshape the operands to matrices")
    inputs, attrs = [t.tensor(a), t.tensor(b)], {"inner": int(sa[-1])}
    return t.emit(c, "matmul", inputs, attrs) if tag is None else t.sub(c, tag, "matmul", inputs, attrs)


def _matmul_rule(t: Any, c: Any) -> None:
    a, b = c.arg(0, "input"), c.arg(1, "other")
    if not (t.is_tensor(a) and t.is_tensor(b)):
        raise Refusal("a matrix product with a model parameter or a constant",
                      "express it as nn.Linear (the model owner's weights), or multiply two activations")
    trace_matmul(t, c, a, b)


def _einsum_rule(t: Any, c: Any) -> None:
    """A two-operand einsum that is a batched matrix product (``"bgid,bgjd->bgij"``): permutes and a matmul."""
    equation = str(t.static(c.arg(0, "equation"))).replace(" ", "")
    operands = list(c.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if "->" not in equation or "." in equation or len(operands) != 2:
        raise Refusal(f"einsum {equation!r}", "write it as a matrix product of two tensors with an explicit output")
    (left, right), out = equation.split("->")[0].split(","), equation.split("->")[1]
    batch = [i for i in out if i in left and i in right]
    free_a, free_b = [i for i in left if i not in right], [i for i in right if i not in left]
    inner = [i for i in left if i in right and i not in out]
    if (len(free_a) != 1 or len(free_b) != 1 or len(inner) != 1 or not batch or batch[0] != left[0]
            or batch[0] != right[0] or batch[0] != out[0] or sorted(out) != sorted(batch + free_a + free_b)
            or len(set(left)) != len(left) or len(set(right)) != len(right)):
        raise Refusal(f"einsum {equation!r} is not a batched matrix product", "use matmul")
    a = trace_permute(t, c, operands[0], tuple(left.index(i) for i in batch + free_a + inner), "a")
    b = trace_permute(t, c, operands[1], tuple(right.index(i) for i in batch + inner + free_b), "b")
    product = trace_matmul(t, c, a, b, "product")
    order = batch + free_a + free_b
    t.alias(c, trace_permute(t, c, product, tuple(order.index(i) for i in out), "out"))


MATMUL = OpKind(
    kind="matmul",
    summary="matrix product of two tensors (attention scores and weighted values; batched, broadcasting; einsum of that form)",
    plaintext=lambda op, xs, p: xs[0] @ xs[1],
    encrypted=_matmul_secure,
    ring=lambda op, b, p, f: ring_bits(op.attrs["inner"] * b[0] * b[1], 2 * f.act_bits),
    torch=(TorchRule(("torch.matmul", "operator.matmul", "torch.bmm", "Tensor.matmul", "Tensor.bmm"), _matmul_rule),
           TorchRule(("torch.einsum",), _einsum_rule)),
)

RECORDS = (CONV2D, CONV_TRANSPOSE2D, LINEAR, AFFINE, MUL, MATMUL)
