"""The one interpreter loop both executors run: each op of a plan, in order, on the values it reads.

The plaintext executor (:mod:`bridge.plaintext`) passes float arrays and a
step that applies each op's plaintext rule; the encrypted one
(:mod:`bridge.secure`) passes operands and a step that applies the encrypted
rule.  A value is dropped after its last reader.
"""

from __future__ import annotations

from typing import Any, Callable

from .ops import KINDS
from .plan import Op, Plan

__all__ = ["interpret", "check_kinds"]


def check_kinds(plan: Plan) -> None:
    """Raise ValueError naming any op kind no record describes."""
    unknown = sorted({op.kind for op in plan.ops} - KINDS.keys())
    if unknown:
        raise ValueError(f"the plan has op kinds this version cannot run: {unknown}")


def interpret(plan: Plan, x: Any, step: Callable[[Op, list[Any]], Any], *,
              on_op: Callable[[Op, list[Any], Any], None] | None = None) -> Any:
    """Run ``plan`` on the input value ``x``: ``step(op, inputs)`` computes each op's value.

    ``on_op(op, inputs, output)`` sees every op's values (ranges, profiles).
    Returns the value of the plan's output.
    """
    values = {plan.input_name: x}
    remaining = plan.use_counts()
    for op in plan.ops:
        inputs = [values[name] for name in op.inputs]
        values[op.name] = step(op, inputs)
        if on_op is not None:
            on_op(op, inputs, values[op.name])
        for name in op.inputs:
            remaining[name] -= 1
            if remaining[name] == 0 and name != plan.output:
                values.pop(name, None)
    return values[plan.output]
