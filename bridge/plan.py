"""Encrypted-inference plans: a model's architecture as a list of plain op records.

A :class:`Plan` is what both computing parties know: the sequence of ops,
their attributes (strides, kernel sizes, axes), every intermediate shape and
the names and shapes of the parameters.  It holds no weight values — those are
the model owner's, kept apart as ``{param name: ndarray}`` — and nothing about
any input but its shape.  Records are plain data (strings, ints, floats,
tuples), so a plan has a canonical byte form whose digest identifies the
architecture (:meth:`Plan.digest`): both parties check they run the same one.

Op kinds, their attributes and parameters are the records of
:mod:`bridge.ops` (one :class:`~bridge.registry.OpKind` each).  Inputs are
value names; ``shape`` excludes the batch dimension.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

__all__ = ["Op", "Plan"]


@dataclass(frozen=True)
class Op:
    """One step of a plan: ``name = kind(*inputs, **attrs)`` with private ``params``."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: tuple[str, ...] = ()
    param_shapes: tuple[tuple[int, ...], ...] = ()
    shape: tuple[int, ...] = ()
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "inputs": list(self.inputs),
            "attrs": {k: _plain(v) for k, v in sorted(self.attrs.items())},
            "params": list(self.params), "param_shapes": [list(s) for s in self.param_shapes],
            "shape": list(self.shape),
        }


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Plan:
    """A model's public architecture: ops in execution order, from one input to one output."""

    ops: tuple[Op, ...]
    input_name: str
    input_shape: tuple[int, ...]
    output: str
    softmax_axis: int | None = None

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.output == self.input_name:
            return self.input_shape
        return next(op.shape for op in self.ops if op.name == self.output)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every private parameter's name and shape, in op order."""
        return {name: tuple(shape) for op in self.ops for name, shape in zip(op.params, op.param_shapes)}

    def use_counts(self) -> dict[str, int]:
        """How many times each value is read (executors free a value after its last use)."""
        uses: dict[str, int] = {}
        for op in self.ops:
            for name in op.inputs:
                uses[name] = uses.get(name, 0) + 1
        return uses

    def counts(self) -> dict[str, int]:
        """How many ops of each kind the plan has."""
        out: dict[str, int] = {}
        for op in self.ops:
            out[op.kind] = out.get(op.kind, 0) + 1
        return out

    def pruned(self) -> "Plan":
        """The plan without ops the output does not depend on; checks names are defined before use."""
        needed = {self.output}
        for op in reversed(self.ops):
            if op.name in needed:
                needed.update(op.inputs)
        ops = tuple(op for op in self.ops if op.name in needed)
        defined = {self.input_name}
        for op in ops:
            missing = [i for i in op.inputs if i not in defined]
            if missing:
                raise ValueError(f"op {op.name!r} reads {missing} before they are computed")
            defined.add(op.name)
        if self.output not in defined:
            raise ValueError(f"the plan's output {self.output!r} is never computed")
        return replace(self, ops=ops)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": [op.to_dict() for op in self.ops],
            "input_name": self.input_name,
            "input_shape": list(self.input_shape),
            "output": self.output,
            "softmax_axis": self.softmax_axis,
        }

    def digest(self) -> str:
        """SHA-256 of the canonical form: equal digests mean the same architecture."""
        raw = msgpack.packb(self.to_dict(), use_bin_type=True)
        return hashlib.sha256(raw).hexdigest()

    def summary(self) -> str:
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        return f"{len(self.ops)} ops ({parts}); input {self.input_shape} -> output {self.output_shape}"
