"""Data movement: reshapes, permutations, indexing, concatenation, expansion, padding, rolls; and the ops that
vanish in eval mode (Dropout, stochastic depth, Identity, contiguous).

All local and exact on shares (no communication).  The batch dimension must
stay first and whole: every attribute here refers to the dimensions after it
(``axis`` counts the batch as 0, as torch does, and is never 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpc.ring import encode
from mpc.tensor import SharedTensor

from ..plan import Op
from ..registry import OpKind, Operand, Refusal, TorchRule

__all__ = ["RECORDS", "IDENTITY_RULES", "apply_index", "trace_index", "trace_permute", "trace_reshape"]


def _like(x: SharedTensor, share: np.ndarray) -> SharedTensor:
    return SharedTensor(x.ctx, share, x.frac_bits)


# -- reshape -----------------------------------------------------------------------------------------
def trace_reshape(t: Any, c: Any, x: Any, tag: str | None = None, shape: tuple[int, ...] | None = None) -> str:
    """A reshape keeping the batch dimension first and whole (to ``shape``, or to the traced output's)."""
    if shape is None:
        t.check_batch(c)
        shape = t.out_shape(c)
    if tuple(shape) == tuple(t.shape(x)):
        if tag is None:
            t.alias(c, t.tensor(x))
        return t.tensor(x)
    if tag is None:
        return t.emit(c, "reshape", [t.tensor(x)], {"shape": tuple(shape)})
    return t.sub(c, tag, "reshape", [t.tensor(x)], {"shape": tuple(shape)})


RESHAPE = OpKind(
    kind="reshape",
    summary="Flatten/flatten/view/reshape/squeeze/unsqueeze keeping the batch dimension",
    plaintext=lambda op, xs, p: xs[0].reshape((xs[0].shape[0],) + tuple(op.attrs["shape"])),
    encrypted=lambda m, op, xs: xs[0].raw.reshape((xs[0].shape[0],) + tuple(op.attrs["shape"])),
    torch=(TorchRule(("nn.Flatten", "nn.Unflatten", "torch.flatten", "Tensor.flatten", "torch.reshape", "Tensor.reshape",
                      "Tensor.view", "torch.squeeze", "Tensor.squeeze", "torch.unsqueeze", "Tensor.unsqueeze",
                      "Tensor.view_as", "Tensor.reshape_as", "torch.unflatten", "Tensor.unflatten"),
                     lambda t, c: trace_reshape(t, c, c.arg(0, "input"))),),
)


# -- permute ----------------------------------------------------------------------------------------------
def _permutation(op: Op) -> tuple[int, ...]:
    return (0,) + tuple(a + 1 for a in op.attrs["axes"])


def trace_permute(t: Any, c: Any, x: Any, perm: tuple[int, ...], tag: str | None = None) -> str:
    """Permute the dimensions (``perm`` over all of them, batch included: it must map 0 to 0)."""
    ndim = len(t.shape(x)) + 1
    perm = tuple(int(p) % ndim for p in perm)
    if sorted(perm) != list(range(ndim)):
        raise Refusal(f"{perm} is not a permutation of {ndim} dimensions")
    if perm[0] != 0:
        if tag is not None:
            raise Refusal("the batch dimension would move", "keep dimension 0 first")
        t.move_batch(c, x, perm)  # fine if only indexed along the new first axis (qkv[0], unbind(0))
        return ""
    if perm == tuple(range(ndim)):
        if tag is None:
            t.alias(c, t.tensor(x))
        return t.tensor(x)
    attrs = {"axes": tuple(p - 1 for p in perm[1:])}
    if tag is None:
        return t.emit(c, "permute", [t.tensor(x)], attrs)
    return t.sub(c, tag, "permute", [t.tensor(x)], attrs)


def _permute_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    if c.module is not None:  # torchvision.ops.misc.Permute
        dims = c.module.dims
    elif c.label == "Tensor.permute" and len(c.args) > 2:
        dims = c.args[1:]
    else:
        dims = c.arg(1, "dims")
    trace_permute(t, c, x, tuple(t.static(dims)))


def _transpose_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    ndim = len(t.shape(x)) + 1
    a, b = int(t.static(c.arg(1, "dim0"))) % ndim, int(t.static(c.arg(2, "dim1"))) % ndim
    perm = list(range(ndim))
    perm[a], perm[b] = perm[b], perm[a]
    trace_permute(t, c, x, tuple(perm))


PERMUTE = OpKind(
    kind="permute",
    summary="permute/transpose/swapaxes of non-batch dimensions",
    plaintext=lambda op, xs, p: np.ascontiguousarray(xs[0].transpose(_permutation(op))),
    encrypted=lambda m, op, xs: xs[0].raw.transpose(_permutation(op)),
    torch=(
        TorchRule(("torch.permute", "Tensor.permute", "torchvision.ops.misc.Permute"), _permute_rule),
        TorchRule(("torch.transpose", "Tensor.transpose", "torch.swapaxes", "Tensor.swapaxes", "torch.swapdims",
                   "Tensor.swapdims"), _transpose_rule),
    ),
)


# -- indexing ----------------------------------------------------------------------------------------------
def apply_index(x: np.ndarray, entries: list) -> np.ndarray:
    """x[:, entries...] for entries ``["s", start, stop, step]``, ``["i", k]`` and ``["n"]`` (None)."""
    index: list[Any] = [slice(None)]
    for e in entries:
        if e[0] == "s":
            index.append(slice(e[1], e[2], e[3]))
        elif e[0] == "i":
            index.append(int(e[1]))
        else:
            index.append(None)
    return x[tuple(index)]


def _entries(t: Any, index: Any, ndim: int) -> list:
    """torch's index (ints, slices, None, Ellipsis) as plain entries after the batch dimension."""
    items = list(index) if isinstance(index, tuple) else [index]
    items = [t.static(i) for i in items]
    for i in items:
        if not (i is None or i is Ellipsis or isinstance(i, (int, slice)) and not isinstance(i, bool)):
            raise Refusal(f"indexing with {i!r}", "index with integers, slices, None and ... only")
        if isinstance(i, slice) and i.step is not None and int(i.step) < 1:
            raise Refusal(f"slice step {i.step}")
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if items.count(Ellipsis) > 1:
        raise Refusal("more than one ellipsis")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - used) + items[at + 1:]
    if not items or items[0] is None or not (isinstance(items[0], slice) and items[0] == slice(None)):
        raise Refusal("indexing the batch dimension", "keep it whole: x[:, ...]")
    out = []
    for i in items[1:]:
        if i is None:
            out.append(["n"])
        elif isinstance(i, slice):
            out.append(["s", None if i.start is None else int(i.start), None if i.stop is None else int(i.stop),
                        None if i.step is None else int(i.step)])
        else:
            out.append(["i", int(i)])
    return out


def trace_index(t: Any, c: Any, x: Any, entries: list, tag: str | None = None) -> str:
    if tag is None:
        return t.emit(c, "index", [t.tensor(x)], {"index": entries})
    return t.sub(c, tag, "index", [t.tensor(x)], {"index": entries})


def _select_moved(t: Any, c: Any, v: Any, j: int, tag: str | None = None) -> str:
    """``permute(x, perm)[j]`` where the permutation moved the batch: select j on x's axis perm[0], then permute."""
    source, perm = t.batch_moved(v)
    axis = perm[0]
    size = t.shape(source)[axis - 1]
    j = j % size if -size <= j < size else j
    picked = trace_index(t, c, source, [["s", None, None, None]] * (axis - 1) + [["i", j]], f"{tag or 'pick'}_at")
    rest = tuple(p if p < axis else p - 1 for p in perm[1:])
    if rest[0] != 0:
        raise Refusal("the batch dimension would move", "keep dimension 0 first")
    return trace_permute(t, c, picked, rest, tag or "pick")


def _getitem_rule(t: Any, c: Any) -> None:
    x, index = c.args[0], c.args[1]
    if t.is_tuple(x):  # an op with several outputs (chunk, split, attention)
        t.alias(c, t.tuple_item(x, int(t.static(index))))
        return
    if t.batch_moved(x) is not None:
        j = t.static(index)
        if not isinstance(j, int):
            raise Refusal("indexing a tensor whose batch dimension was moved, other than by one integer",
                          "index the new leading dimension with an integer first")
        t.alias(c, _select_moved(t, c, x, j))
        return
    trace_index(t, c, x, _entries(t, index, len(t.shape(x)) + 1))


def _pieces(t: Any, c: Any, x: Any, sizes: list[int], axis: int) -> None:
    ndim = len(t.shape(x)) + 1
    axis = axis % ndim
    if axis == 0:
        raise Refusal("splitting the batch dimension")
    names, start = [], 0
    for k, size in enumerate(sizes):
        entries = [["s", None, None, None]] * (axis - 1) + [["s", start, start + size, None]]
        names.append(trace_index(t, c, x, entries, f"part{k}"))
        start += size
    t.outputs(c, names)


def _chunk_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    chunks, axis = int(t.static(c.arg(1, "chunks"))), int(t.static(c.arg(2, "dim", 0)))
    size = t.shape(x)[axis % (len(t.shape(x)) + 1) - 1]
    step = -(-size // chunks)
    _pieces(t, c, x, [min(step, size - s) for s in range(0, size, step)], axis)


def _split_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    split, axis = t.static(c.arg(1, "split_size_or_sections")), int(t.static(c.arg(2, "dim", 0)))
    size = t.shape(x)[axis % (len(t.shape(x)) + 1) - 1]
    sizes = list(split) if isinstance(split, (list, tuple)) else [min(split, size - s) for s in range(0, size, split)]
    _pieces(t, c, x, sizes, axis)


def _unbind_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    moved = t.batch_moved(x)
    if moved is not None and int(t.static(c.arg(1, "dim", 0))) == 0:
        count = t.shape(moved[0])[moved[1][0] - 1]
        t.outputs(c, [_select_moved(t, c, x, j, f"part{j}") for j in range(count)])
        return
    ndim = len(t.shape(x)) + 1
    axis = int(t.static(c.arg(1, "dim", 0))) % ndim
    if axis == 0:
        raise Refusal("unbinding the batch dimension")
    names = [trace_index(t, c, x, [["s", None, None, None]] * (axis - 1) + [["i", k]], f"part{k}")
             for k in range(t.shape(x)[axis - 1])]
    t.outputs(c, names)


def _select_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    ndim = len(t.shape(x)) + 1
    axis = int(t.static(c.arg(1, "dim"))) % ndim
    if axis == 0:
        raise Refusal("selecting along the batch dimension")
    trace_index(t, c, x, [["s", None, None, None]] * (axis - 1) + [["i", int(t.static(c.arg(2, "index")))]])


def _narrow_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    ndim = len(t.shape(x)) + 1
    axis = int(t.static(c.arg(1, "dim"))) % ndim
    start, length = int(t.static(c.arg(2, "start"))), int(t.static(c.arg(3, "length")))
    if axis == 0:
        raise Refusal("narrowing the batch dimension")
    trace_index(t, c, x, [["s", None, None, None]] * (axis - 1) + [["s", start, start + length, None]])


INDEX = OpKind(
    kind="index",
    summary="indexing with integers, slices, None and ..., chunk, split, unbind, select, narrow",
    plaintext=lambda op, xs, p: np.ascontiguousarray(apply_index(xs[0], op.attrs["index"])),
    encrypted=lambda m, op, xs: _like(xs[0].raw, np.ascontiguousarray(apply_index(xs[0].raw.share, op.attrs["index"]))),
    torch=(
        TorchRule(("operator.getitem",), _getitem_rule),
        TorchRule(("torch.chunk", "Tensor.chunk"), _chunk_rule),
        TorchRule(("torch.split", "Tensor.split"), _split_rule),
        TorchRule(("torch.unbind", "Tensor.unbind"), _unbind_rule),
        TorchRule(("torch.select", "Tensor.select"), _select_rule),
        TorchRule(("torch.narrow", "Tensor.narrow"), _narrow_rule),
    ),
)


# -- cat and expand -----------------------------------------------------------------------------------
def _cat_rule(t: Any, c: Any) -> None:
    tensors = c.arg(0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise Refusal("expected a list of tensors")
    ndim = len(t.out_shape(c)) + 1
    axis = int(t.static(c.arg(1, "dim", 0))) % ndim
    if axis == 0:
        raise Refusal("concatenating along the batch dimension")
    t.emit(c, "cat", [t.data(v) for v in tensors], {"axis": axis})


def _stack_rule(t: Any, c: Any) -> None:
    tensors = c.arg(0, "tensors")
    ndim = len(t.out_shape(c)) + 1
    axis = int(t.static(c.arg(1, "dim", 0))) % ndim
    if axis == 0:
        raise Refusal("stacking along the batch dimension")
    parts = []
    for k, v in enumerate(tensors):
        shape = t.shape(v)
        parts.append(trace_reshape(t, c, v, f"part{k}", shape[:axis - 1] + (1,) + shape[axis - 1:]))
    t.emit(c, "cat", parts, {"axis": axis})


def _cat_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    import mpc

    return mpc.concatenate([x.raw for x in xs], axis=op.attrs["axis"])


CAT = OpKind(
    kind="cat",
    summary="torch.cat/concat/concatenate and stack along a non-batch dimension",
    plaintext=lambda op, xs, p: np.concatenate(xs, axis=op.attrs["axis"]),
    encrypted=_cat_secure,
    torch=(TorchRule(("torch.cat", "torch.concat", "torch.concatenate"), _cat_rule),
           TorchRule(("torch.stack",), _stack_rule)),
)


def _expand_rule(t: Any, c: Any) -> None:
    x = c.arg(0, "input")
    if not t.is_tensor(x):
        t.emit_param(c, x)  # a model tensor expanded over the batch (class tokens)
        return
    t.check_batch(c)
    t.emit(c, "expand", [t.tensor(x)], {"shape": t.out_shape(c)})


EXPAND = OpKind(
    kind="expand",
    summary="expand/expand_as/broadcast_to (a model tensor expanded over the batch becomes a class token)",
    plaintext=lambda op, xs, p: np.broadcast_to(xs[0], (xs[0].shape[0],) + tuple(op.attrs["shape"])).copy(),
    encrypted=lambda m, op, xs: _like(xs[0].raw, np.broadcast_to(
        xs[0].raw.share, (xs[0].shape[0],) + tuple(op.attrs["shape"])).copy()),
    torch=(TorchRule(("Tensor.expand", "Tensor.expand_as", "torch.broadcast_to", "Tensor.broadcast_to"), _expand_rule),),
)


# -- pad and roll ----------------------------------------------------------------------------------------
def _pad_widths(op: Op) -> list[tuple[int, int]]:
    return [(0, 0)] + [tuple(p) for p in op.attrs["pads"]]


def _pad_secure(m: Any, op: Op, xs: list[Operand]) -> SharedTensor:
    x = xs[0].raw
    widths = _pad_widths(op)
    share = np.pad(x.share, widths)
    value = float(op.attrs["value"])
    if value and x.ctx.rank == 0:
        inside = np.zeros(share.shape, dtype=bool)
        inside[tuple(slice(a, a + n) for (a, _), n in zip(widths, x.shape))] = True
        share = share + np.where(inside, 0, encode(value, x.frac_bits))
    return _like(x, share)


def trace_pad(t: Any, c: Any, x: Any, pad: Any, value: float = 0.0, tag: str | None = None) -> str:
    pad = [int(v) for v in t.static(pad)]
    ndim = len(t.shape(x)) + 1
    if len(pad) % 2 or len(pad) // 2 > ndim - 1:
        raise Refusal(f"padding {pad} for a {ndim}-d tensor", "pad non-batch dimensions only")
    if min(pad, default=0) < 0:
        raise Refusal("negative padding (cropping)", "slice the tensor instead")
    pads = [[0, 0] for _ in range(ndim - 1)]
    for k in range(len(pad) // 2):  # torch lists the last dimension first
        pads[ndim - 2 - k] = [pad[2 * k], pad[2 * k + 1]]
    if not any(a or b for a, b in pads):
        if tag is None:
            t.alias(c, t.tensor(x))
        return t.tensor(x)
    attrs = {"pads": pads, "value": float(value)}
    return t.emit(c, "pad", [t.tensor(x)], attrs) if tag is None else t.sub(c, tag, "pad", [t.tensor(x)], attrs)


def _pad_rule(t: Any, c: Any) -> None:
    mode = t.static(c.arg(2, "mode", "constant"))
    if mode != "constant":
        raise Refusal(f"padding mode {mode!r}", "use mode='constant'")
    value = t.static(c.arg(3, "value", None))
    trace_pad(t, c, c.arg(0, "input"), c.arg(1, "pad"), 0.0 if value is None else float(value))


def _pad_module_rule(t: Any, c: Any) -> None:
    m = c.module
    trace_pad(t, c, c.arg(0, "input"), list(m.padding), float(getattr(m, "value", 0.0)))


PAD = OpKind(
    kind="pad",
    summary="F.pad and ZeroPad2d/ConstantPad2d with a constant",
    plaintext=lambda op, xs, p: np.pad(xs[0], _pad_widths(op), constant_values=float(op.attrs["value"])),
    encrypted=_pad_secure,
    torch=(TorchRule(("F.pad",), _pad_rule),
           TorchRule(("nn.ZeroPad2d", "nn.ConstantPad2d", "nn.ConstantPad1d", "nn.ConstantPad3d"), _pad_module_rule)),
)


def trace_roll(t: Any, c: Any, x: Any, shifts: tuple[int, ...], axes: tuple[int, ...], tag: str | None = None) -> str:
    ndim = len(t.shape(x)) + 1
    axes = tuple(int(a) % ndim for a in axes)
    if 0 in axes:
        raise Refusal("rolling the batch dimension")
    attrs = {"shifts": tuple(int(s) for s in shifts), "axes": axes}
    return t.emit(c, "roll", [t.tensor(x)], attrs) if tag is None else t.sub(c, tag, "roll", [t.tensor(x)], attrs)


def _roll_rule(t: Any, c: Any) -> None:
    shifts, dims = t.static(c.arg(1, "shifts")), t.static(c.arg(2, "dims", None))
    if dims is None:
        raise Refusal("rolling the flattened tensor", "give dims")
    shifts = tuple(shifts) if isinstance(shifts, (list, tuple)) else (shifts,)
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
    trace_roll(t, c, c.arg(0, "input"), shifts, dims)


ROLL = OpKind(
    kind="roll",
    summary="torch.roll along non-batch dimensions",
    plaintext=lambda op, xs, p: np.roll(xs[0], op.attrs["shifts"], axis=op.attrs["axes"]),
    encrypted=lambda m, op, xs: _like(xs[0].raw, np.roll(xs[0].raw.share, op.attrs["shifts"], axis=op.attrs["axes"])),
    torch=(TorchRule(("torch.roll", "Tensor.roll"), _roll_rule),),
)


# -- what eval mode removes ----------------------------------------------------------------------------
def _identity(t: Any, c: Any) -> None:
    t.alias(c, t.tensor(c.arg(0, "input")))


def _cast(t: Any, c: Any) -> None:
    for v in (*c.args[1:], *c.kwargs.values()):
        name = str(t.static(v))
        if any(word in name for word in ("int", "bool", "half", "bfloat", "complex", "uint")):
            raise Refusal(f"a cast to {name}", "keep activations in float32/float64")
    _identity(t, c)


def _dropout_module(t: Any, c: Any) -> None:
    if c.module.training:
        raise Refusal("Dropout in training mode", "call model.eval() first")
    _identity(t, c)


def _dropout_function(t: Any, c: Any) -> None:
    if t.static(c.arg(2, "training", True)):
        raise Refusal("dropout called with training=True", "pass training=self.training and call model.eval()")
    _identity(t, c)


def _stochastic_depth(t: Any, c: Any) -> None:
    if t.static(c.arg(3, "training", True)):
        raise Refusal("stochastic_depth called with training=True", "call model.eval() first")
    _identity(t, c)


def _stochastic_depth_module(t: Any, c: Any) -> None:
    if c.module.training:
        raise Refusal("StochasticDepth in training mode", "call model.eval() first")
    _identity(t, c)


#: torch calls that are the identity in eval mode; they emit no op
IDENTITY_RULES = (
    TorchRule(("nn.Identity", "Tensor.contiguous", "Tensor.clone", "torch.clone", "Tensor.detach"), _identity),
    TorchRule(("Tensor.float", "Tensor.double", "Tensor.to", "Tensor.type"), _cast),
    TorchRule(("nn.Dropout", "nn.Dropout1d", "nn.Dropout2d", "nn.Dropout3d", "nn.AlphaDropout",
               "nn.FeatureAlphaDropout"), _dropout_module),
    TorchRule(("F.dropout", "F.dropout1d", "F.dropout2d", "F.dropout3d", "F.alpha_dropout",
               "F.feature_alpha_dropout"), _dropout_function),
    TorchRule(("torchvision.ops.stochastic_depth",), _stochastic_depth),
    TorchRule(("torchvision.ops.StochasticDepth",), _stochastic_depth_module),
)
RECORDS = (RESHAPE, PERMUTE, INDEX, CAT, EXPAND, PAD, ROLL)
