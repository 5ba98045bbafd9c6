"""Torch model -> encrypted-inference plan, by ``torch.fx`` symbolic tracing (no ONNX).

:func:`convert` traces a model in eval mode, runs it once on a zero batch of
two to learn every intermediate shape, and turns each graph node into an
:class:`~bridge.plan.Op` record: a kind from :data:`~bridge.plan.OP_KINDS`,
input names, plain attributes and the names of its private parameters.  The
result splits into what both parties may know (the :class:`~bridge.plan.Plan`:
layer types, shapes, strides — the architecture) and what only the model
owner holds (the weights, float64 numpy arrays keyed by parameter name).

Rewrites, each exact in real arithmetic:

- BatchNorm right after a convolution or linear layer (and its only consumer)
  is folded into that layer's weights; anywhere else it becomes an ``affine``
  op (per-channel scale and shift).
- ``max_pool(relu(x)) = relu(max_pool(x))`` (both monotone): when a max-pool
  (or a chain of them) is a ReLU's only consumer, pooling moves first so that
  the ReLU runs on the smaller map.  Clamps (ReLU6) move the same way.
- Dropout, Identity and ``contiguous`` disappear (eval semantics); a final
  Softmax is lifted out of the op list and applied by the data owner to the
  revealed logits (see docs/inference.md for why this reveals nothing more).

Anything else raises :class:`~mpc.errors.UnsupportedModelError` naming the
module path, the op and what is supported — before any party starts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from mpc.errors import ConfigError, UnsupportedModelError

from .plan import Op, Plan

__all__ = ["ConvertedModel", "convert", "SUPPORTED", "unsupported"]

#: what the bridge converts, for error messages and the docs
SUPPORTED = (
    "Conv2d (stride, padding, dilation, groups; zero padding), Linear, BatchNorm1d/2d (eval), "
    "ReLU, ReLU6, Hardtanh/clamp with constant bounds, MaxPool2d (no dilation, ceil_mode=False), "
    "AvgPool2d (ceil_mode=False), AdaptiveAvgPool2d (any output size), mean over non-batch dims, "
    "Flatten/view/reshape keeping the batch dimension, tensor + tensor and tensor + constant, torch.cat "
    "(not along the batch), Dropout/Identity (eval), their torch.nn.functional and tensor-method forms, "
    "and a final Softmax"
)

_BATCH = 2  # tracing batch: distinguishes the batch dimension from size-1 dimensions


@dataclass(frozen=True)
class ConvertedModel:
    """A converted model: the public plan and the owner's private weights."""

    plan: Plan
    weights: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        expected = self.plan.param_shapes()
        for key, shape in expected.items():
            if key not in self.weights:
                raise ConfigError(f"weight {key!r} is missing for this plan")
            if tuple(self.weights[key].shape) != shape:
                raise ConfigError(f"weight {key!r} has shape {self.weights[key].shape}, the plan needs {shape}")


def unsupported(where: str, what: str, detail: str = "") -> UnsupportedModelError:
    """An error naming the module path, the op, why, and what is supported."""
    reason = f" ({detail})" if detail else ""
    exc = UnsupportedModelError(
        f"cannot convert {what} at {where or '<model>'}{reason}. Supported: {SUPPORTED}."
    )
    exc.module = where
    exc.op = what
    return exc


# -- tracing ---------------------------------------------------------------------------
class _Recorder(fx.Interpreter):
    """Runs the traced graph once and keeps every node's shape (tensors) or value (others)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.statics: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        else:
            self.statics[n] = result
        return result


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    inner = list(stack.values())[-1] if stack else None
    path = inner[0] if isinstance(inner, tuple) else ""
    return f"{path}:{node.name}" if path else node.name


def convert(
    model: nn.Module,
    input_shape: Iterable[int],
    *,
    fold_batchnorm: bool = True,
    pool_before_relu: bool = True,
) -> ConvertedModel:
    """Trace ``model`` for inputs of shape ``(N, *input_shape)`` into a plan and weights.

    Args:
        model: a torch module in eval mode (BatchNorm uses its running statistics).
        input_shape: one input's shape without the batch dimension, e.g. ``(3, 224, 224)``.
        fold_batchnorm: fold BatchNorm into the preceding conv/linear where possible.
        pool_before_relu: run max-pooling before the ReLU (or clamp) it follows.

    Raises:
        UnsupportedModelError: the model uses an op the bridge cannot run encrypted.
        ConfigError: the model is in training mode or ``input_shape`` is invalid.
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
        raise ConfigError(f"input_shape must be positive sizes without the batch dimension, got {shape}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ConfigError("the model is in training mode; call model.eval() before converting it")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        raise unsupported(type(model).__name__, "the forward pass", f"torch.fx cannot trace it: {exc}") from exc
    recorder = _Recorder(gm)
    try:
        with torch.no_grad():
            recorder.run(torch.zeros((_BATCH, *shape), dtype=torch.float32))
    except Exception as exc:
        dims = ", ".join(map(str, shape))
        raise ConfigError(f"the model does not run on inputs of shape (N, {dims}): {exc}") from exc
    builder = _Builder(gm, recorder)
    ops, weights, output, softmax_axis = builder.build()
    plan = Plan(
        ops=tuple(ops),
        input_name=builder.input_name,
        input_shape=shape,
        output=output,
        softmax_axis=softmax_axis,
    )
    if fold_batchnorm:
        plan, weights = _fold_affine(plan, weights)
    if pool_before_relu:
        plan = _pool_before_activation(plan)
    plan = plan.pruned()
    return ConvertedModel(plan, {k: weights[k] for k in plan.param_shapes()})


# -- node -> op ----------------------------------------------------------------------------
def _arg(args: tuple, kwargs: Mapping[str, Any], index: int, name: str, default: Any = ...) -> Any:
    if len(args) > index:
        return args[index]
    if name in kwargs:
        return kwargs[name]
    if default is ...:
        raise TypeError(f"missing argument {name!r}")
    return default


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().copy()


class _Builder:
    """Walks the fx graph in order, emitting op records and collecting weights."""

    def __init__(self, gm: fx.GraphModule, recorder: _Recorder):
        self.gm = gm
        self.shapes = recorder.shapes
        self.statics = recorder.statics
        self.modules = dict(gm.named_modules())
        self.ops: list[Op] = []
        self.weights: dict[str, np.ndarray] = {}
        self.alias: dict[str, str] = {}  # node name -> name of the op that holds its value
        self.params: dict[str, torch.Tensor] = {}  # get_attr node name -> tensor
        self.input_name = ""

    # helpers ------------------------------------------------------------------------
    def ref(self, value: Any, node: fx.Node) -> str:
        """The op name holding a tensor argument."""
        if isinstance(value, fx.Node):
            if value.name in self.params:
                raise unsupported(_module_path(node), f"{node.target} on a model parameter as data",
                                  "parameters may only be the weight/bias of a layer")
            if value in self.shapes:
                return self.alias.get(value.name, value.name)
        raise unsupported(_module_path(node), str(node.target), f"expected a tensor argument, got {value!r}")

    def static(self, value: Any) -> Any:
        """A non-tensor argument's concrete value (sizes and the like)."""
        if isinstance(value, fx.Node):
            if value not in self.statics:
                raise TypeError(f"{value.name} is a tensor where a constant is expected")
            return self.statics[value]
        if isinstance(value, (list, tuple)):
            return type(value)(self.static(v) for v in value)
        return value

    def out_shape(self, node: fx.Node) -> tuple[int, ...]:
        return self.shapes[node][1:]

    def emit(self, node: fx.Node, kind: str, inputs: list[str], attrs: dict[str, Any] | None = None,
             params: dict[str, np.ndarray] | None = None) -> None:
        names, shapes = [], []
        for key, arr in (params or {}).items():
            full = f"{node.name}.{key}"
            self.weights[full] = arr
            names.append(full)
            shapes.append(tuple(arr.shape))
        self.ops.append(Op(
            name=node.name, kind=kind, inputs=tuple(inputs), attrs=dict(attrs or {}),
            params=tuple(names), param_shapes=tuple(shapes), shape=self.out_shape(node),
            source=_module_path(node),
        ))

    def same_as(self, node: fx.Node, source: str) -> None:
        self.alias[node.name] = source

    def check_batch(self, node: fx.Node, src: fx.Node) -> None:
        if self.shapes[node][0] != _BATCH or self.shapes[src][0] != _BATCH:
            raise unsupported(_module_path(node), str(node.target), "the batch dimension must stay first and intact")

    # driver ---------------------------------------------------------------------------
    def build(self) -> tuple[list[Op], dict[str, np.ndarray], str, int | None]:
        output = ""
        softmax_axis: int | None = None
        nodes = list(self.gm.graph.nodes)
        for node in nodes:
            if node.op == "placeholder":
                if self.input_name:
                    raise unsupported(node.name, "a second input", "models must take exactly one tensor")
                self.input_name = node.name
            elif node.op == "get_attr":
                value = self.gm
                for part in str(node.target).split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    self.params[node.name] = value
                    self.shapes.pop(node, None)
                else:
                    self.statics[node] = value
            elif node.op == "output":
                output = self._output(node)
            elif node in self.statics:
                continue  # sizes, shapes and other constants: read where they are used
            else:
                self._node(node)
        # a final softmax is applied by the data owner to the revealed logits
        last = next((op for op in self.ops if op.name == output), None)
        if last is not None and last.kind == "softmax":
            softmax_axis = int(last.attrs["axis"])
            output = last.inputs[0]
            self.ops.remove(last)
        for op in self.ops:
            if op.kind == "softmax":
                raise unsupported(op.source, "Softmax", "softmax is supported only as the model's final op")
        return self.ops, self.weights, output, softmax_axis

    def _output(self, node: fx.Node) -> str:
        value = node.args[0]
        if isinstance(value, (tuple, list)) and len(value) == 1:
            value = value[0]
        if not isinstance(value, fx.Node) or value not in self.shapes:
            raise unsupported("output", "the model's return value", "the model must return a single tensor")
        return self.ref(value, node)

    def _node(self, node: fx.Node) -> None:
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            handler = _MODULE_HANDLERS.get(type(module))
            if handler is None:
                raise unsupported(str(node.target), type(module).__name__)
            handler(self, node, module)
            return
        if node.op == "call_function":
            handler = _FUNCTION_HANDLERS.get(node.target)
            label = getattr(node.target, "__name__", str(node.target))
        else:  # call_method
            handler = _METHOD_HANDLERS.get(str(node.target))
            label = f"Tensor.{node.target}"
        if handler is None:
            raise unsupported(_module_path(node), label)
        try:
            handler(self, node, tuple(node.args), dict(node.kwargs))
        except UnsupportedModelError:
            raise
        except (TypeError, ValueError, KeyError) as exc:
            raise unsupported(_module_path(node), label, str(exc)) from exc

    # layers ---------------------------------------------------------------------------
    def conv(self, node: fx.Node, x: Any, weight: torch.Tensor, bias: torch.Tensor | None,
             stride: Any, padding: Any, dilation: Any, groups: int) -> None:
        if weight.dim() != 4:
            raise unsupported(_module_path(node), "conv2d", f"expected a 4-d weight, got {tuple(weight.shape)}")
        kernel = tuple(weight.shape[2:])
        dil = _pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                pad = (0, 0)
            elif padding == "same":
                totals = [d * (k - 1) for d, k in zip(dil, kernel)]
                if any(t % 2 for t in totals):
                    raise unsupported(_module_path(node), "conv2d padding='same'",
                                      "asymmetric padding is not supported")
                pad = (totals[0] // 2, totals[1] // 2)
            else:
                raise unsupported(_module_path(node), f"conv2d padding={padding!r}")
        else:
            pad = _pair(padding)
        w = _to_numpy(weight)
        b = _to_numpy(bias) if bias is not None else np.zeros(w.shape[0])
        self.emit(node, "conv2d", [self.ref(x, node)],
                  {"stride": _pair(stride), "padding": pad, "dilation": dil, "groups": int(groups)},
                  {"weight": w, "bias": b})

    def linear(self, node: fx.Node, x: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if weight.dim() != 2:
            raise unsupported(_module_path(node), "linear", f"expected a 2-d weight, got {tuple(weight.shape)}")
        w = _to_numpy(weight)
        b = _to_numpy(bias) if bias is not None else np.zeros(w.shape[0])
        self.emit(node, "linear", [self.ref(x, node)], {}, {"weight": w, "bias": b})

    def batchnorm(self, node: fx.Node, x: Any, mean: torch.Tensor | None, var: torch.Tensor | None,
                  weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> None:
        if mean is None or var is None:
            raise unsupported(_module_path(node), "BatchNorm without running statistics",
                              "set track_running_stats=True and train the statistics")
        scale = 1.0 / np.sqrt(_to_numpy(var) + float(eps))
        if weight is not None:
            scale = scale * _to_numpy(weight)
        shift = -_to_numpy(mean) * scale
        if bias is not None:
            shift = shift + _to_numpy(bias)
        if len(self.shapes[node]) < 2:
            raise unsupported(_module_path(node), "BatchNorm", "the input needs a channel dimension")
        self.emit(node, "affine", [self.ref(x, node)], {}, {"scale": scale, "shift": shift})

    def clamp(self, node: fx.Node, x: Any, low: Any, high: Any, inplace: bool = False) -> None:
        low = None if low is None else float(self.static(low))
        high = None if high is None else float(self.static(high))
        if low is None and high is None:
            self.same_as(node, self.ref(x, node))
            return
        kind = "relu" if (low == 0.0 and high is None) else "clamp"
        attrs = {} if kind == "relu" else {"low": low, "high": high}
        self.emit(node, kind, [self.ref(x, node)], attrs)
        if inplace:
            self._rebind(x, node)

    def relu(self, node: fx.Node, x: Any, inplace: bool = False) -> None:
        self.clamp(node, x, 0.0, None, inplace)

    def _rebind(self, x: Any, node: fx.Node) -> None:
        # After an in-place op, later readers of x see the op's result.
        if isinstance(x, fx.Node):
            self.alias[x.name] = node.name

    def max_pool(self, node: fx.Node, x: Any, kernel: Any, stride: Any, padding: Any,
                 dilation: Any, ceil_mode: bool, return_indices: bool) -> None:
        where = _module_path(node)
        if _pair(dilation) != (1, 1):
            raise unsupported(where, "MaxPool2d", "dilation must be 1")
        if ceil_mode:
            raise unsupported(where, "MaxPool2d", "ceil_mode must be False")
        if return_indices:
            raise unsupported(where, "MaxPool2d", "return_indices must be False")
        k = _pair(kernel)
        s = k if stride is None or stride == [] or stride == () else _pair(stride)
        self._check_spatial(node)
        self.emit(node, "max_pool2d", [self.ref(x, node)], {"kernel": k, "stride": s, "padding": _pair(padding)})

    def avg_pool(self, node: fx.Node, x: Any, kernel: Any, stride: Any, padding: Any,
                 ceil_mode: bool, count_include_pad: bool, divisor_override: Any) -> None:
        if ceil_mode:
            raise unsupported(_module_path(node), "AvgPool2d", "ceil_mode must be False")
        k = _pair(kernel)
        s = k if stride is None or stride == [] or stride == () else _pair(stride)
        self._check_spatial(node)
        self.emit(node, "avg_pool2d", [self.ref(x, node)], {
            "kernel": k, "stride": s, "padding": _pair(padding),
            "count_include_pad": bool(count_include_pad),
            "divisor": None if divisor_override is None else int(divisor_override),
        })

    def adaptive_avg_pool(self, node: fx.Node, x: Any, output_size: Any) -> None:
        self._check_spatial(node)
        self.emit(node, "adaptive_avg_pool2d", [self.ref(x, node)], {"output": tuple(self.out_shape(node)[-2:])})

    def _check_spatial(self, node: fx.Node) -> None:
        if len(self.shapes[node]) != 4:
            raise unsupported(_module_path(node), str(node.target), "pooling expects NCHW tensors")

    def reshape(self, node: fx.Node, x: Any) -> None:
        src = x if isinstance(x, fx.Node) else None
        if src is None:
            raise unsupported(_module_path(node), "reshape", "expected a tensor")
        self.check_batch(node, src)
        if self.shapes[node] == self.shapes[src]:
            self.same_as(node, self.ref(x, node))
            return
        self.emit(node, "reshape", [self.ref(x, node)], {"shape": self.out_shape(node)})

    def mean(self, node: fx.Node, x: Any, dims: Any, keepdim: bool) -> None:
        ndim = len(self.shapes[x])
        dims = self.static(dims)
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        axes = tuple(sorted({d % ndim for d in dims}))
        if not axes or 0 in axes:
            raise unsupported(_module_path(node), "mean", "averaging over the batch dimension is not supported")
        self.emit(node, "mean", [self.ref(x, node)], {"axes": axes, "keepdim": bool(keepdim)})

    def add(self, node: fx.Node, a: Any, b: Any, alpha: Any = 1) -> None:
        if alpha != 1:
            raise unsupported(_module_path(node), "add", "alpha must be 1")
        tensors = [v for v in (a, b) if isinstance(v, fx.Node) and v in self.shapes]
        if len(tensors) == 2:
            if self.shapes[a] != self.shapes[b]:
                raise unsupported(_module_path(node), "add", f"broadcasting {self.shapes[a]} + {self.shapes[b]}")
            self.emit(node, "add", [self.ref(a, node), self.ref(b, node)])
        elif len(tensors) == 1:
            const = self.static(b if tensors[0] is a else a)
            if not isinstance(const, (int, float)):
                raise unsupported(_module_path(node), "add", f"constant {const!r}; only Python numbers are supported")
            self.emit(node, "add_const", [self.ref(tensors[0], node)], {"value": float(const)})
        else:
            raise unsupported(_module_path(node), "add", "needs a tensor operand")

    def cat(self, node: fx.Node, tensors: Any, dim: Any) -> None:
        if not isinstance(tensors, (list, tuple)) or not tensors:
            raise unsupported(_module_path(node), "cat", "expected a list of tensors")
        ndim = len(self.shapes[node])
        axis = int(self.static(dim)) % ndim
        if axis == 0:
            raise unsupported(_module_path(node), "cat", "concatenating along the batch dimension")
        self.emit(node, "cat", [self.ref(t, node) for t in tensors], {"axis": axis})

    def softmax(self, node: fx.Node, x: Any, dim: Any) -> None:
        if dim is None:
            raise unsupported(_module_path(node), "softmax", "give dim explicitly")
        ndim = len(self.shapes[node])
        axis = int(self.static(dim)) % ndim
        self.emit(node, "softmax", [self.ref(x, node)], {"axis": axis})


# -- handler tables ----------------------------------------------------------------------
def _m_conv(b: _Builder, node: fx.Node, m: nn.Conv2d) -> None:
    if m.padding_mode != "zeros":
        raise unsupported(str(node.target), "Conv2d", f"padding_mode={m.padding_mode!r}; only 'zeros'")
    b.conv(node, node.args[0], m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def _m_batchnorm(b: _Builder, node: fx.Node, m: nn.modules.batchnorm._BatchNorm) -> None:
    b.batchnorm(node, node.args[0], m.running_mean, m.running_var,
                m.weight if m.affine else None, m.bias if m.affine else None, m.eps)


def _m_hardtanh(b: _Builder, node: fx.Node, m: nn.Hardtanh) -> None:
    b.clamp(node, node.args[0], m.min_val, m.max_val, m.inplace)


def _m_identity(b: _Builder, node: fx.Node, m: nn.Module) -> None:
    if isinstance(m, nn.modules.dropout._DropoutNd) and m.training:
        raise ConfigError(f"{node.target} is a Dropout in training mode; call model.eval() first")
    b.same_as(node, b.ref(node.args[0], node))


def _m_flatten(b: _Builder, node: fx.Node, m: nn.Flatten) -> None:
    b.reshape(node, node.args[0])


def _m_softmax(b: _Builder, node: fx.Node, m: nn.Softmax) -> None:
    b.softmax(node, node.args[0], m.dim)


_MODULE_HANDLERS: dict[type, Callable[[_Builder, fx.Node, Any], None]] = {
    nn.Conv2d: _m_conv,
    nn.Linear: lambda b, n, m: b.linear(n, n.args[0], m.weight, m.bias),
    nn.BatchNorm1d: _m_batchnorm,
    nn.BatchNorm2d: _m_batchnorm,
    nn.ReLU: lambda b, n, m: b.relu(n, n.args[0], m.inplace),
    nn.ReLU6: _m_hardtanh,
    nn.Hardtanh: _m_hardtanh,
    nn.MaxPool2d: lambda b, n, m: b.max_pool(n, n.args[0], m.kernel_size, m.stride, m.padding,
                                             m.dilation, m.ceil_mode, m.return_indices),
    nn.AvgPool2d: lambda b, n, m: b.avg_pool(n, n.args[0], m.kernel_size, m.stride, m.padding,
                                             m.ceil_mode, m.count_include_pad, m.divisor_override),
    nn.AdaptiveAvgPool2d: lambda b, n, m: b.adaptive_avg_pool(n, n.args[0], m.output_size),
    nn.Flatten: _m_flatten,
    nn.Dropout: _m_identity,
    nn.Dropout1d: _m_identity,
    nn.Dropout2d: _m_identity,
    nn.Dropout3d: _m_identity,
    nn.AlphaDropout: _m_identity,
    nn.Identity: _m_identity,
    nn.Softmax: _m_softmax,
}


def _param(b: _Builder, node: fx.Node, value: Any, what: str) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, fx.Node) and value.name in b.params:
        return b.params[value.name]
    raise unsupported(_module_path(node), what, "weights must be model parameters or buffers, not computed tensors")


def _f_conv(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.conv(n, _arg(a, k, 0, "input"), _param(b, n, _arg(a, k, 1, "weight"), "conv2d"),
           _param(b, n, _arg(a, k, 2, "bias", None), "conv2d"), b.static(_arg(a, k, 3, "stride", 1)),
           b.static(_arg(a, k, 4, "padding", 0)), b.static(_arg(a, k, 5, "dilation", 1)),
           int(b.static(_arg(a, k, 6, "groups", 1))))


def _f_linear(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.linear(n, _arg(a, k, 0, "input"), _param(b, n, _arg(a, k, 1, "weight"), "linear"),
             _param(b, n, _arg(a, k, 2, "bias", None), "linear"))


def _f_batchnorm(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    if b.static(_arg(a, k, 5, "training", False)):
        raise ConfigError(f"{_module_path(n)}: batch_norm is called with training=True; use eval statistics")
    b.batchnorm(n, _arg(a, k, 0, "input"), _param(b, n, _arg(a, k, 1, "running_mean"), "batch_norm"),
                _param(b, n, _arg(a, k, 2, "running_var"), "batch_norm"),
                _param(b, n, _arg(a, k, 3, "weight", None), "batch_norm"),
                _param(b, n, _arg(a, k, 4, "bias", None), "batch_norm"), b.static(_arg(a, k, 7, "eps", 1e-5)))


def _f_relu(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.relu(n, _arg(a, k, 0, "input"), bool(b.static(_arg(a, k, 1, "inplace", False))))


def _f_relu_(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.relu(n, _arg(a, k, 0, "input"), True)


def _f_relu6(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.clamp(n, _arg(a, k, 0, "input"), 0.0, 6.0, bool(b.static(_arg(a, k, 1, "inplace", False))))


def _f_hardtanh(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.clamp(n, _arg(a, k, 0, "input"), _arg(a, k, 1, "min_val", -1.0), _arg(a, k, 2, "max_val", 1.0),
            bool(b.static(_arg(a, k, 3, "inplace", False))))


def _f_clamp(b: _Builder, n: fx.Node, a: tuple, k: dict, inplace: bool = False) -> None:
    low, high = _arg(a, k, 1, "min", None), _arg(a, k, 2, "max", None)
    for bound in (low, high):
        if isinstance(bound, fx.Node) and bound not in b.statics:
            raise unsupported(_module_path(n), "clamp", "bounds must be constants")
    b.clamp(n, _arg(a, k, 0, "input"), low, high, inplace)


def _f_clamp_min(b: _Builder, n: fx.Node, a: tuple, k: dict, inplace: bool = False) -> None:
    b.clamp(n, _arg(a, k, 0, "input"), _arg(a, k, 1, "min"), None, inplace)


def _f_max_pool(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    s = b.static
    b.max_pool(n, _arg(a, k, 0, "input"), s(_arg(a, k, 1, "kernel_size")), s(_arg(a, k, 2, "stride", None)),
               s(_arg(a, k, 3, "padding", 0)), s(_arg(a, k, 4, "dilation", 1)),
               bool(s(_arg(a, k, 5, "ceil_mode", False))), bool(s(_arg(a, k, 6, "return_indices", False))))


def _f_avg_pool(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    s = b.static
    b.avg_pool(n, _arg(a, k, 0, "input"), s(_arg(a, k, 1, "kernel_size")), s(_arg(a, k, 2, "stride", None)),
               s(_arg(a, k, 3, "padding", 0)), bool(s(_arg(a, k, 4, "ceil_mode", False))),
               bool(s(_arg(a, k, 5, "count_include_pad", True))), s(_arg(a, k, 6, "divisor_override", None)))


def _f_adaptive(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.adaptive_avg_pool(n, _arg(a, k, 0, "input"), b.static(_arg(a, k, 1, "output_size")))


def _f_flatten(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.reshape(n, _arg(a, k, 0, "input"))


def _f_reshape(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.reshape(n, a[0] if a else k.get("input"))


def _f_add(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.add(n, _arg(a, k, 0, "input"), _arg(a, k, 1, "other"), b.static(k.get("alpha", 1)))


def _f_cat(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.cat(n, _arg(a, k, 0, "tensors"), _arg(a, k, 1, "dim", 0))


def _f_dropout(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    if b.static(_arg(a, k, 2, "training", True)):
        raise ConfigError(f"{_module_path(n)}: dropout is called with training=True; pass training=self.training "
                          "and call model.eval()")
    b.same_as(n, b.ref(_arg(a, k, 0, "input"), n))


def _f_identity(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.same_as(n, b.ref(a[0], n))


def _f_softmax(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    b.softmax(n, _arg(a, k, 0, "input"), _arg(a, k, 1, "dim", None))


def _f_mean(b: _Builder, n: fx.Node, a: tuple, k: dict) -> None:
    dims = _arg(a, k, 1, "dim", None)
    if dims is None:
        raise unsupported(_module_path(n), "mean", "give the dimensions to average over")
    b.mean(n, _arg(a, k, 0, "input"), dims, bool(b.static(_arg(a, k, 2, "keepdim", False))))


def _functions() -> dict[Any, Callable[..., None]]:
    table: dict[Any, Callable[..., None]] = {
        torch.conv2d: _f_conv, F.conv2d: _f_conv, F.linear: _f_linear, F.batch_norm: _f_batchnorm,
        F.relu: _f_relu, torch.relu: _f_relu, torch.relu_: _f_relu_, F.relu_: _f_relu_,
        F.relu6: _f_relu6, F.hardtanh: _f_hardtanh, torch.clamp: _f_clamp, torch.clip: _f_clamp,
        torch.clamp_min: _f_clamp_min,
        F.max_pool2d: _f_max_pool, torch.max_pool2d: _f_max_pool,
        F.avg_pool2d: _f_avg_pool, F.adaptive_avg_pool2d: _f_adaptive,
        torch.flatten: _f_flatten, torch.reshape: _f_reshape,
        operator.add: _f_add, operator.iadd: _f_add, torch.add: _f_add,
        torch.cat: _f_cat, torch.concat: _f_cat, torch.concatenate: _f_cat,
        F.dropout: _f_dropout, F.dropout1d: _f_dropout, F.dropout2d: _f_dropout, F.alpha_dropout: _f_dropout,
        F.softmax: _f_softmax, torch.softmax: _f_softmax, torch.mean: _f_mean,
    }
    inner = getattr(F, "_max_pool2d", None)
    if inner is not None:
        table[inner] = _f_max_pool
    return table


_FUNCTION_HANDLERS = _functions()

_METHOD_HANDLERS: dict[str, Callable[..., None]] = {
    "relu": _f_relu,
    "relu_": _f_relu_,
    "clamp": _f_clamp,
    "clip": _f_clamp,
    "clamp_": lambda b, n, a, k: _f_clamp(b, n, a, k, inplace=True),
    "clamp_min": _f_clamp_min,
    "clamp_min_": lambda b, n, a, k: _f_clamp_min(b, n, a, k, inplace=True),
    "flatten": _f_flatten,
    "view": _f_reshape,
    "reshape": _f_reshape,
    "add": _f_add,
    "add_": _f_add,
    "softmax": _f_softmax,
    "mean": _f_mean,
    "contiguous": _f_identity,
}


# -- rewrites ----------------------------------------------------------------------------
def _consumers(plan: Plan) -> dict[str, list[Op]]:
    users: dict[str, list[Op]] = {}
    for op in plan.ops:
        for name in op.inputs:
            users.setdefault(name, []).append(op)
    users.setdefault(plan.output, []).append(Op(name="<output>", kind="output", inputs=(plan.output,)))
    return users


def _fold_affine(plan: Plan, weights: dict[str, np.ndarray]) -> tuple[Plan, dict[str, np.ndarray]]:
    """Fold each affine op whose input is a conv/linear used by nothing else into that layer."""
    weights = dict(weights)
    producer = {op.name: op for op in plan.ops}
    users = _consumers(plan)
    renamed: dict[str, str] = {}
    kept: list[Op] = []
    for op in plan.ops:
        op = replace(op, inputs=tuple(renamed.get(i, i) for i in op.inputs))
        src = producer.get(op.inputs[0]) if op.kind == "affine" else None
        if src is not None and src.kind in ("conv2d", "linear") and len(users.get(src.name, [])) == 1:
            scale, shift = weights[op.params[0]], weights[op.params[1]]
            if src.kind == "conv2d" or len(src.shape) == 1:  # linear on (N, F): channels are features
                w_key, b_key = src.params
                w = weights[w_key]
                weights[w_key] = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
                weights[b_key] = weights[b_key] * scale + shift
                renamed[op.name] = src.name
                continue
        kept.append(op)
    output = renamed.get(plan.output, plan.output)
    return replace(plan, ops=tuple(kept), output=output), weights


def _pool_before_activation(plan: Plan) -> Plan:
    """Swap ``act -> max_pool`` into ``max_pool -> act`` where the pool is the activation's only consumer."""
    ops = list(plan.ops)
    changed = True
    while changed:
        changed = False
        users = _consumers(replace(plan, ops=tuple(ops)))
        for i, act in enumerate(ops):
            if act.kind not in ("relu", "clamp"):
                continue
            consumers = users.get(act.name, [])
            if len(consumers) != 1 or consumers[0].kind != "max_pool2d":
                continue
            pool = consumers[0]
            j = ops.index(pool)
            # the pool now reads the activation's input; the activation reads the pool and takes its name
            new_pool = replace(pool, name=act.name + "__pooled", inputs=act.inputs)
            new_act = replace(act, name=pool.name, inputs=(new_pool.name,), shape=pool.shape)
            ops[i] = new_pool
            ops[j] = new_act
            # the op that now produces act's old name is gone: nothing else read it (single consumer)
            changed = True
            break
    return replace(plan, ops=tuple(ops))
