"""Torch model -> encrypted-inference plan, by ``torch.fx`` symbolic tracing (no ONNX).

:func:`convert` traces a model in eval mode, runs the graph once on a zero
batch of two to learn every intermediate shape and constant, and hands each
graph node to the trace rule registered for its module, function or tensor
method (:data:`bridge.ops.TORCH_RULES`).  Rules emit :class:`~bridge.plan.Op`
records through the :class:`Tracer` methods below.  The result splits into what
both parties may know (the :class:`~bridge.plan.Plan`: layer types, shapes,
strides — the architecture) and what only the model owner holds (the weights,
float64 numpy arrays keyed by parameter name).

Model tensors: a parameter or buffer, and anything computed from them alone
(e.g. Swin's relative position bias), is evaluated here and becomes one of the
owner's weights; it never becomes public.

Rewrites, each exact in real arithmetic:

- an ``affine`` op (BatchNorm, a layer scale) right after a convolution or
  linear layer that has no other consumer is folded into that layer's weights;
- ``max_pool(relu(x)) = relu(max_pool(x))`` (both monotone): when a max-pool is
  a ReLU's or clamp's only consumer, pooling moves first so the comparison runs
  on the smaller map;
- Dropout, stochastic depth, Identity and ``contiguous`` disappear (eval
  semantics); a final Softmax is lifted out of the op list and applied by the
  data owner to the revealed logits (see docs/inference.md).

Anything that cannot run encrypted is collected, not raised at the first
sight: :class:`~mpc.errors.UnsupportedModelError` lists every blocker with its
module path, source line, why and what to do, before any party starts.

The rule API (what a trace rule receives as ``t``; ``c`` is the :class:`Call`):
``t.tensor(v)`` the op name holding an activation; ``t.is_tensor(v)``;
``t.constant(v)`` a model tensor's value or None; ``t.array(tensor)``;
``t.static(v)`` a non-tensor argument's value; ``t.shape(v)`` an activation's
shape without the batch; ``t.out_shape(c)``; ``t.check_batch(c)``;
``t.emit(c, kind, inputs, attrs, params)`` the node's op;
``t.sub(c, tag, kind, inputs, attrs, params)`` an intermediate op (shape
inferred); ``t.alias(c, name)``; ``t.outputs(c, names)`` for tuple results;
``t.is_tuple(v)``, ``t.tuple_item(v, i)``; ``t.rebind(x, c)`` after in-place
ops; ``t.data(v)`` an activation or a batch-expanded model tensor;
``t.emit_param(c, v)``.  Rules raise :class:`~bridge.registry.Refusal`.
"""

from __future__ import annotations

import importlib
import operator
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from mpc.errors import ConfigError, UnsupportedModelError

from .ops import KINDS, SUPPORTED, TORCH_RULES
from .plan import Op, Plan
from .registry import Refusal, TorchRule

__all__ = ["ConvertedModel", "convert", "SUPPORTED", "Call", "Tracer", "Blocker"]

_BATCH = 2  # tracing batch: distinguishes the batch dimension from size-1 dimensions
_MISSING = object()


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


@dataclass(frozen=True)
class Blocker:
    """One part of a model that cannot run encrypted."""

    where: str
    line: str
    what: str
    why: str
    fix: str = ""

    def describe(self) -> str:
        at = f"{self.where} ({self.line})" if self.line else self.where
        reason = f": {self.why}" if self.why else ""
        todo = f"; to fix: {self.fix}" if self.fix else ""
        return f"{self.what} at {at}{reason}{todo}"


def _grouped(blockers: list[Blocker]) -> list[Blocker]:
    """Blockers with the same what, why and fix as one, listing every place."""
    groups: dict[tuple[str, str, str], list[Blocker]] = {}
    for b in blockers:
        groups.setdefault((b.what, b.why, b.fix), []).append(b)
    out = []
    for (what, why, fix), same in groups.items():
        places = [f"{b.where} ({b.line})" if b.line else b.where for b in same]
        shown = ", ".join(places[:6]) + (f" and {len(places) - 6} more" if len(places) > 6 else "")
        out.append(Blocker(shown, "", what, why, fix))
    return out


def _blocked(blockers: list[Blocker]) -> UnsupportedModelError:
    groups = _grouped(blockers)
    if len(groups) == 1:
        text = f"cannot convert {groups[0].describe()}."
    else:
        items = "\n".join(f"  - {b.describe()}" for b in groups)
        text = f"cannot convert {len(groups)} kinds of layers:\n{items}\n"
    exc = UnsupportedModelError(f"{text} Supported: {SUPPORTED}.")
    exc.module = blockers[0].where
    exc.op = blockers[0].what
    exc.blockers = list(blockers)
    return exc


# -- rule lookup ------------------------------------------------------------------------------
def _resolve(name: str) -> tuple[str, Any] | None:
    """A registry name as ("module", class) / ("function", object) / ("method", name); None if absent here."""
    head, _, rest = name.partition(".")
    try:
        if head == "Tensor":
            return "method", rest
        if head == "nn":
            return "module", getattr(nn, rest)
        if head == "F":
            return "function", getattr(F, rest)
        if head == "torch":
            return "function", getattr(torch, rest)
        if head == "operator":
            return "function", getattr(operator, rest)
        module_name, _, attr = name.rpartition(".")
        value = getattr(importlib.import_module(module_name), attr)
        return ("module" if isinstance(value, type) else "function"), value
    except (AttributeError, ImportError):
        return None


def _tables(rules: Iterable[TorchRule]) -> tuple[dict[type, tuple], dict[Any, tuple], dict[str, tuple]]:
    modules: dict[type, tuple] = {}
    functions: dict[Any, tuple] = {}
    methods: dict[str, tuple] = {}
    for entry in rules:
        for name in entry.names:
            resolved = _resolve(name)
            if resolved is None:
                continue
            kind, key = resolved
            table = {"module": modules, "function": functions, "method": methods}[kind]
            if key in table and table[key][1] is not entry.rule:  # aliases (F.conv2d is torch.conv2d) are fine
                raise ValueError(f"torch name {name!r} has two trace rules")
            table[key] = (name, entry.rule)
    return modules, functions, methods


_MODULES, _FUNCTIONS, _METHODS = _tables(TORCH_RULES)


# -- tracing ------------------------------------------------------------------------------------
class _FxTracer(fx.Tracer):
    """torch.fx's tracer, keeping source lines, with every module type that has a rule as a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in _MODULES or super().is_leaf_module(m, qualname)


class _Recorder(fx.Interpreter):
    """Runs the traced graph once; keeps shapes, non-tensor values, and tensors that do not depend on the input."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.statics: dict[fx.Node, Any] = {}
        self.tuples: dict[fx.Node, list[tuple[int, ...] | None]] = {}
        self.constants: dict[fx.Node, torch.Tensor] = {}
        self.dynamic: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op == "placeholder" or any(i in self.dynamic for i in n.all_input_nodes):
            self.dynamic.add(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
            if n not in self.dynamic and n.op != "get_attr":
                self.constants[n] = result.detach()
        elif isinstance(result, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in result):
            self.tuples[n] = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in result]
        else:
            self.statics[n] = result
        return result


def _source_line(node: fx.Node) -> str:
    trace = node.stack_trace or ""
    found = [(path, line) for path, line in re.findall(r'File "([^"]+)", line (\d+)', trace)
             if "/torch/" not in path]  # the model's own code, not torch's internals
    if not found:
        return ""
    path, line = found[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    inner = list(stack.values())[-1] if stack else None
    path = inner[0] if isinstance(inner, tuple) else ""
    return f"{path}:{node.name}" if path else node.name


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().copy()


class _Poisoned(Exception):
    """An input of this node could not be converted (already reported)."""


@dataclass(frozen=True)
class Call:
    """One graph node as a trace rule sees it."""

    node: fx.Node
    module: nn.Module | None
    label: str  # the registry name that matched, e.g. "nn.Conv2d", "F.relu", "Tensor.view"
    where: str

    @property
    def args(self) -> tuple:
        return tuple(self.node.args)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.node.kwargs)

    def arg(self, index: int, name: str, default: Any = _MISSING) -> Any:
        """Argument ``name`` (position ``index``) as written in the graph: a node, or a literal."""
        args = self.node.args
        if len(args) > index:
            return args[index]
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        if default is _MISSING:
            raise Refusal(f"missing argument {name!r}")
        return default


class Tracer:
    """Walks the fx graph in order and turns each node into plan ops (the rule API; see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, recorder: _Recorder):
        self.gm = gm
        self.rec = recorder
        self.modules = dict(gm.named_modules())
        self.ops: list[Op] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # op name -> shape without the batch
        self.weights: dict[str, np.ndarray] = {}
        self.refs: dict[str, str] = {}  # node name -> op name holding its value
        self.tuples: dict[str, list[str | None]] = {}
        self.moved: dict[str, tuple[str, tuple[int, ...]]] = {}  # node -> (source op, permutation moving the batch)
        self.params: dict[str, np.ndarray] = {}  # node name -> model tensor (parameters, buffers, folded)
        self.poisoned: set[str] = set()
        self.blocked: set[str] = set()  # nodes reported as blockers; their outputs are stand-ins
        self.blockers: list[Blocker] = []
        self.input_name = ""

    # -- the rule API ----------------------------------------------------------------------------
    def tensor(self, v: Any) -> str:
        if isinstance(v, str) and v in self.shapes:
            return v
        if isinstance(v, fx.Node):
            if v.name in self.poisoned:
                raise _Poisoned(v.name)
            if v.name in self.refs:
                return self.refs[v.name]
            if v.name in self.params:
                raise Refusal("a model parameter used as data where an activation is expected",
                              "parameters may be layer weights, or added to or multiplied with activations")
            if v.name in self.moved:
                raise Refusal(f"{v.name} moves the batch dimension away from the front",
                              "keep dimension 0 first, or index the new leading dimension right away "
                              "(q, k, v = qkv[0], qkv[1], qkv[2] or qkv.unbind(0))")
        raise Refusal(f"expected an activation tensor, got {v!r}")

    def is_tensor(self, v: Any) -> bool:
        if isinstance(v, str):
            return v in self.shapes
        if isinstance(v, fx.Node) and v.name in self.poisoned:
            raise _Poisoned(v.name)
        return isinstance(v, fx.Node) and (v.name in self.refs or v.name in self.moved)

    def move_batch(self, c: Call, x: Any, perm: tuple[int, ...]) -> None:
        """A permutation moving the batch: allowed when its result is only indexed along the new first axis."""
        self.moved[c.node.name] = (self.tensor(x), tuple(perm))

    def batch_moved(self, v: Any) -> tuple[str, tuple[int, ...]] | None:
        """(source op, permutation) of a value whose batch dimension was moved, else None."""
        return self.moved.get(v.name) if isinstance(v, fx.Node) else None

    def is_tuple(self, v: Any) -> bool:
        return isinstance(v, fx.Node) and v.name in self.tuples

    def tuple_item(self, v: fx.Node, index: int) -> str:
        items = self.tuples[v.name]
        item = items[index] if -len(items) <= index < len(items) else None
        if item is None:
            if v.name in self.blocked:
                raise _Poisoned(v.name)  # a blocked layer's output: reported there
            raise Refusal(f"output {index} of {v.name} is not available encrypted")
        return item

    def constant(self, v: Any) -> np.ndarray | None:
        if isinstance(v, fx.Node) and v.name in self.params:
            return self.params[v.name]
        return None

    def array(self, value: torch.Tensor | None) -> np.ndarray | None:
        return None if value is None else _to_numpy(value)

    def static(self, v: Any) -> Any:
        if isinstance(v, fx.Node):
            if v in self.rec.statics:
                return self.rec.statics[v]
            raise Refusal(f"{v.name} is a tensor where a constant is expected")
        if isinstance(v, slice):
            return slice(self.static(v.start), self.static(v.stop), self.static(v.step))
        if isinstance(v, (list, tuple)):
            return type(v)(self.static(e) for e in v)
        return v

    def shape(self, v: Any) -> tuple[int, ...]:
        return self.shapes[self.tensor(v)]

    def out_shape(self, c: Call) -> tuple[int, ...]:
        if c.node not in self.rec.shapes:
            raise Refusal("the call does not return a tensor")
        return self.rec.shapes[c.node][1:]

    def check_batch(self, c: Call) -> None:
        full = self.rec.shapes.get(c.node, ())
        if not full or full[0] != _BATCH:
            raise Refusal("the batch dimension must stay first and whole", "keep dimension 0 as the batch")

    def emit(self, c: Call, kind: str, inputs: list[str], attrs: dict[str, Any] | None = None,
             params: dict[str, np.ndarray] | None = None) -> str:
        name = self._add(c, c.node.name, kind, inputs, attrs, params, self.out_shape(c))
        self.refs[c.node.name] = name
        return name

    def sub(self, c: Call, tag: str, kind: str, inputs: list[str], attrs: dict[str, Any] | None = None,
            params: dict[str, np.ndarray] | None = None) -> str:
        return self._add(c, f"{c.node.name}__{tag}", kind, inputs, attrs, params, None)

    def alias(self, c: Call, name: str) -> None:
        self.refs[c.node.name] = self.tensor(name)

    def outputs(self, c: Call, names: list[str | None]) -> None:
        self.tuples[c.node.name] = list(names)

    def rebind(self, x: Any, c: Call) -> None:
        """After an in-place op, later readers of x see the op's result."""
        if isinstance(x, fx.Node) and c.node.name in self.refs:
            self.refs[x.name] = self.refs[c.node.name]

    def data(self, v: Any) -> str:
        """An activation, or a model tensor expanded over the batch (its batch slices equal) as a ``param`` op."""
        if self.is_tensor(v):
            return self.tensor(v)
        value = self.constant(v)
        if value is None or value.ndim == 0 or value.shape[0] != _BATCH or not np.all(value == value[:1]):
            raise Refusal("a model tensor used as data must be expanded over the batch",
                          "expand it to the batch size (as a class token)")
        return self._param(v.name, value[:1])

    def emit_param(self, c: Call, v: Any) -> str:
        """A model tensor expanded over the batch by this call (``class_token.expand(n, -1, -1)``)."""
        value = self.constant(v)
        if value is None:
            raise Refusal(f"expected a model tensor, got {v!r}")
        self.check_batch(c)
        out = self.out_shape(c)
        try:
            expanded = np.broadcast_to(value, (1,) + out).copy() if value.ndim <= len(out) + 1 else None
        except ValueError:
            expanded = None
        if expanded is None or (value.ndim == len(out) + 1 and value.shape[0] != 1):
            raise Refusal(f"a model tensor of shape {value.shape} expanded to (N, {out})")
        name = self._param(c.node.name, expanded)
        self.refs[c.node.name] = name
        return name

    # -- internals ----------------------------------------------------------------------------------
    def _param(self, base: str, value: np.ndarray) -> str:
        name = f"{base}__value" if f"{base}__value" not in self.shapes else f"{base}__value{len(self.ops)}"
        self.ops.append(Op(name=name, kind="param", inputs=(self.input_name,), params=(f"{name}.value",),
                           param_shapes=(tuple(value.shape),), shape=tuple(value.shape[1:]), source=base))
        self.weights[f"{name}.value"] = value
        self.shapes[name] = tuple(value.shape[1:])
        return name

    def _add(self, c: Call, name: str, kind: str, inputs: list[str], attrs: dict[str, Any] | None,
             params: dict[str, np.ndarray] | None, shape: tuple[int, ...] | None) -> str:
        if name in self.shapes:
            raise ValueError(f"op name {name!r} is used twice")
        names, shapes = [], []
        for key, arr in (params or {}).items():
            full = f"{name}.{key}"
            arr = np.asarray(arr, dtype=np.float64)
            self.weights[full] = arr
            names.append(full)
            shapes.append(tuple(arr.shape))
        op = Op(name=name, kind=kind, inputs=tuple(inputs), attrs=dict(attrs or {}), params=tuple(names),
                param_shapes=tuple(shapes), shape=(), source=c.where)
        if shape is None:
            shape = self._infer_shape(op)
        op = replace(op, shape=tuple(int(d) for d in shape))
        self.ops.append(op)
        self.shapes[name] = op.shape
        return name

    def _infer_shape(self, op: Op) -> tuple[int, ...]:
        """An intermediate's shape: its plaintext rule on a zero batch of one."""
        xs = [np.zeros((1,) + self.shapes[i]) for i in op.inputs]
        out = KINDS[op.kind].plaintext(op, xs, [np.zeros(s) for s in op.param_shapes])
        return tuple(out.shape[1:])

    # -- the walk -----------------------------------------------------------------------------------
    def build(self) -> tuple[list[Op], dict[str, np.ndarray], str, int | None]:
        output = ""
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if self.input_name:
                    self._block(node, "a second input", "models must take exactly one tensor")
                    continue
                self.input_name = node.name
                self.refs[node.name] = node.name
                self.shapes[node.name] = self.rec.shapes[node][1:]
            elif node.op == "get_attr":
                value = self.gm
                for part in str(node.target).split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    self.params[node.name] = _to_numpy(value)
            elif node.op == "output":
                output = self._output(node)
            elif node in self.rec.statics:
                continue  # sizes, shapes and other constants: read where they are used
            elif node in self.rec.constants:
                self.params[node.name] = _to_numpy(self.rec.constants[node])  # a model tensor
            elif any(i.name in self.poisoned for i in node.all_input_nodes):
                self.poisoned.add(node.name)
            else:
                self._node(node)
        if self.blockers:
            raise _blocked(self.blockers)
        softmax_axis: int | None = None
        last = next((op for op in self.ops if op.name == output), None)
        if last is not None and last.kind == "softmax":
            softmax_axis = int(last.attrs["axis"])
            output = last.inputs[0]
            self.ops.remove(last)
        return self.ops, self.weights, output, softmax_axis

    def _block(self, node: fx.Node, what: str, why: str, fix: str = "") -> None:
        """Report a blocker and stand in for its output (same shape), so later layers are checked too."""
        self.blockers.append(Blocker(_module_path(node), _source_line(node), what, why, fix))
        self.blocked.add(node.name)
        self.refs.pop(node.name, None)
        self.tuples.pop(node.name, None)
        if node in self.rec.shapes:
            self.refs[node.name] = self._stand_in(node.name, self.rec.shapes[node][1:])
        elif node in self.rec.tuples:
            self.tuples[node.name] = [None if shape is None or not shape else self._stand_in(f"{node.name}__{k}", shape[1:])
                                      for k, shape in enumerate(self.rec.tuples[node])]
        else:
            self.poisoned.add(node.name)

    def _stand_in(self, name: str, shape: tuple[int, ...]) -> str:
        self.shapes[f"{name}__blocked"] = tuple(shape)
        return f"{name}__blocked"

    def _output(self, node: fx.Node) -> str:
        value = node.args[0]
        if isinstance(value, (tuple, list)) and len(value) == 1:
            value = value[0]
        if isinstance(value, fx.Node) and value.name in self.poisoned:
            return ""
        if not isinstance(value, fx.Node) or value.name not in self.refs:
            self._block(node, "the model's return value", "the model must return a single tensor")
            return ""
        return self.refs[value.name]

    def _lookup(self, node: fx.Node) -> tuple[str, Any, nn.Module | None]:
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            for cls in type(module).__mro__:
                if cls in _MODULES:
                    name, rule = _MODULES[cls]
                    return name, rule, module
            return type(module).__name__, None, module
        if node.op == "call_function":
            label = getattr(node.target, "__name__", str(node.target))
            name, rule = _FUNCTIONS.get(node.target, (label, None))
            return name, rule, None
        name, rule = _METHODS.get(str(node.target), (f"Tensor.{node.target}", None))
        return name, rule, None

    def _node(self, node: fx.Node) -> None:
        label, rule, module = self._lookup(node)
        what = type(module).__name__ if module is not None else label.split(".")[-1]
        if rule is None:
            self._block(node, what, "no encrypted implementation",
                        "replace it with a supported layer (see the list below)")
            return
        call = Call(node, module, label, _module_path(node))
        try:
            rule(self, call)
        except _Poisoned:
            self.poisoned.add(node.name)
        except Refusal as refusal:
            self._block(node, what, refusal.why, refusal.fix)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            self._block(node, what, f"cannot read its arguments: {exc}")


# -- convert ------------------------------------------------------------------------------------
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
        fold_batchnorm: fold affine ops (BatchNorm, layer scales) into the preceding conv/linear where possible.
        pool_before_relu: run max-pooling before the ReLU (or clamp) it follows.

    Raises:
        UnsupportedModelError: the model uses something the bridge cannot run encrypted
            (every such part is listed, with its module path and source line).
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
        graph = _FxTracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        raise _blocked([Blocker(type(model).__name__, "", "the forward pass", f"torch.fx cannot trace it: {exc}",
                                "remove data-dependent control flow from forward")]) from exc
    gm = fx.GraphModule(model, graph)
    recorder = _Recorder(gm)
    try:
        with torch.no_grad():
            recorder.run(torch.zeros((_BATCH, *shape), dtype=torch.float32))
    except Exception as exc:
        dims = ", ".join(map(str, shape))
        raise ConfigError(f"the model does not run on inputs of shape (N, {dims}): {exc}") from exc
    tracer = Tracer(gm, recorder)
    ops, weights, output, softmax_axis = tracer.build()
    plan = Plan(ops=tuple(ops), input_name=tracer.input_name, input_shape=shape, output=output,
                softmax_axis=softmax_axis)
    if fold_batchnorm:
        plan, weights = _fold_affine(plan, weights)
    if pool_before_relu:
        plan = _pool_before_activation(plan)
    plan = plan.pruned()
    return ConvertedModel(plan, {k: weights[k] for k in plan.param_shapes()})


# -- rewrites ----------------------------------------------------------------------------
def _consumers(plan: Plan) -> dict[str, list[Op]]:
    users: dict[str, list[Op]] = {}
    for op in plan.ops:
        for name in op.inputs:
            users.setdefault(name, []).append(op)
    users.setdefault(plan.output, []).append(Op(name="<output>", kind="output", inputs=(plan.output,)))
    return users


def _foldable(src: Op, scale: np.ndarray) -> bool:
    """A per-output-channel scale: (C, 1, 1) after a conv, (F,) on a linear layer's last axis."""
    if src.kind == "conv2d":
        return scale.shape == (src.shape[0], 1, 1)
    return src.kind == "linear" and scale.shape == (src.shape[-1],)


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
        if src is not None and len(users.get(src.name, [])) == 1 and _foldable(src, weights[op.params[0]]):
            scale, shift = weights[op.params[0]].reshape(-1), weights[op.params[1]]
            shift = np.broadcast_to(shift, weights[op.params[0]].shape).reshape(-1)
            w_key, b_key = src.params
            w = weights[w_key]
            weights[w_key] = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            weights[b_key] = weights[b_key] * scale + shift
            renamed[op.name] = src.name
            continue
        kept.append(op)
    output = renamed.get(plan.output, plan.output)
    return _fold_affine_forward(replace(plan, ops=tuple(kept), output=output), weights)


def _fold_affine_forward(plan: Plan, weights: dict[str, np.ndarray]) -> tuple[Plan, dict[str, np.ndarray]]:
    """Fold an affine op over the last axis into the linear layer that is its only consumer.

    linear(x s + t) = x (W diag s)^T + (W t + b): LayerNorm's weight and bias before
    an attention or MLP projection cost nothing.
    """
    weights = dict(weights)
    users = _consumers(plan)
    dropped: dict[str, str] = {}
    for op in plan.ops:
        consumers = users.get(op.name, [])
        if op.kind != "affine" or len(consumers) != 1 or consumers[0].kind != "linear":
            continue
        linear = consumers[0]
        scale, shift = weights[op.params[0]], weights[op.params[1]]
        w_key, b_key = linear.params
        w = weights[w_key]
        if scale.shape != (w.shape[1],) or np.broadcast_shapes(shift.shape, scale.shape) != scale.shape:
            continue
        shift = np.broadcast_to(shift, scale.shape)
        weights[b_key] = weights[b_key] + w @ shift
        weights[w_key] = w * scale[None, :]
        dropped[op.name] = op.inputs[0]
    ops = tuple(replace(op, inputs=tuple(dropped.get(i, i) for i in op.inputs))
                for op in plan.ops if op.name not in dropped)
    return replace(plan, ops=ops), weights


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
            changed = True
            break
    return replace(plan, ops=tuple(ops))
