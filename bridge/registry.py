"""The bridge's layer registry: one :class:`OpKind` record per plan op kind.

A record is everything the bridge knows about one kind of layer:

- ``torch``: the trace rules, :class:`TorchRule`\\ s naming the torch modules,
  functions and tensor methods they convert (``"nn.ReLU"``, ``"F.relu"``,
  ``"torch.relu"``, ``"Tensor.relu"``).  A rule receives the tracer and the
  call (see :mod:`bridge.trace` for the tracer's methods) and emits plan ops;
  it may emit other kinds than its record's (``x + 1`` is an ``add_const``,
  found under ``add``'s rules) or several ops (attention).
- ``plaintext(op, inputs, params)``: the op in float64 numpy (batch first).
- ``encrypted(model, op, operands)``: the op on secret shares.  Operands are
  :class:`Operand`\\ s: ``.act`` is the value at the activation scale
  (truncated once, however many ops read it), ``.raw`` the value at whatever
  scale its producer left it (a pending product; additions and reshapes take
  it as it is).  ``model`` gives the owner's parameters (``model.product``,
  ``model.offset``, ``model.value``).  The result may be left at a higher scale:
  its consumers truncate it when they need to.
- ``params``: the role of each private parameter, in ``op.params`` order:
  ``"weight"`` (multiplied with activations; the model owner's
  :class:`~mpc.PrivateTensor`), ``"offset"`` (added at the product scale) or
  ``"value"`` (added at the activation scale); ``layout(op, input_shape)``
  gives their shapes in the executor.
- ``compares(op, input_ranges, output_range)``: the largest magnitude that
  enters a comparison, given the largest magnitude of each input and of the
  output.  A ReLU compares its input; a max-pool compares differences of two
  inputs (up to twice the input's range); approximations compare shifted or
  scaled values.  :func:`bridge.sizing.comparison_bound` takes the largest
  over a plan to size the comparison domain.
- ``ring(op, input_bounds, params, fixed)``: log2 of the largest ring magnitude
  (value times 2^scale) any sum of shares of this op reaches, for inputs
  bounded by ``input_bounds``; :func:`bridge.sizing.check_ring` refuses a plan
  where it reaches the truncation limit 2^62.
- ``min_act_bits``: the activation fractional bits its documented error needs
  (approximations of smooth functions: 16; LayerNorm: 20); a plan runs at the
  largest of its ops' (:func:`bridge.sizing.default_act_bits`).

Adding a layer type is adding one record to a family module of
:mod:`bridge.ops` (and its line in ``KINDS`` there).  This module needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .plan import Op

if TYPE_CHECKING:
    from mpc.tensor import SharedTensor

__all__ = [
    "OpKind",
    "TorchRule",
    "Operand",
    "Fixed",
    "Refusal",
    "no_comparison",
    "compares_input",
    "no_ring",
    "ring_bits",
    "same_shape_layout",
]


class Refusal(Exception):
    """Raised by a trace rule: this call cannot run encrypted (``why``), and what to do instead (``fix``)."""

    def __init__(self, why: str, fix: str = ""):
        self.why = why
        self.fix = fix
        super().__init__(why)


@dataclass(frozen=True)
class Fixed:
    """Fixed-point settings of an encrypted run (fractional bits; the comparison domain's bits)."""

    act_bits: int
    weight_bits: int
    comparison_bits: int

    @property
    def compare_limit(self) -> float:
        """Compared magnitudes must stay below this (the domain holds |d| 2^act_bits < 2^(bits - 1))."""
        return 2.0 ** (self.comparison_bits - 1 - self.act_bits)


class Operand:
    """A shared value as the encrypted executor holds it: ``raw`` at its scale, ``act`` at the activation scale."""

    __slots__ = ("raw", "act_bits", "_act")

    def __init__(self, raw: "SharedTensor", act_bits: int):
        self.raw = raw
        self.act_bits = act_bits
        self._act: SharedTensor | None = None

    @property
    def act(self) -> "SharedTensor":
        """The value at ``act_bits`` fractional bits: truncated once (one round), then reused."""
        if self._act is None:
            self._act = self.raw.rescale(self.act_bits)
        return self._act

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape


PlainRule = Callable[[Op, list[np.ndarray], list[np.ndarray]], np.ndarray]
SecureRule = Callable[[Any, Op, list[Operand]], "SharedTensor"]
CompareRule = Callable[[Op, list[float], float], float]
RingRule = Callable[[Op, list[float], list[np.ndarray], Fixed], float]
LayoutRule = Callable[[Op, tuple[int, ...]], tuple[tuple[int, ...], ...]]


@dataclass(frozen=True)
class TorchRule:
    """A trace rule and the torch names it converts: ``nn.X`` (modules), ``F.x``/``torch.x``/``operator.x``/
    ``torchvision.a.b`` (functions), ``Tensor.x`` (methods)."""

    names: tuple[str, ...]
    rule: Callable[[Any, Any], None]


def no_comparison(op: Op, inputs: list[float], output: float) -> float:
    return 0.0


def compares_input(op: Op, inputs: list[float], output: float) -> float:
    """The op compares its (first) input with constants near zero (ReLU)."""
    return inputs[0]


def no_ring(op: Op, bounds: list[float], params: list[np.ndarray], fixed: Fixed) -> float:
    """Local data movement and comparisons: magnitudes never exceed the inputs' (checked where they are formed)."""
    return -math.inf


def ring_bits(value: float, frac_bits: int) -> float:
    """log2 of a value's ring magnitude at ``frac_bits`` fractional bits."""
    return math.log2(max(value, 2.0**-60)) + frac_bits


def same_shape_layout(op: Op, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Parameters used as stored (their plan shapes)."""
    return tuple(tuple(s) for s in op.param_shapes)


@dataclass(frozen=True)
class OpKind:
    """Everything about one plan op kind (see the module docstring)."""

    kind: str
    summary: str
    plaintext: PlainRule
    encrypted: SecureRule
    params: tuple[str, ...] = ()
    layout: LayoutRule = same_shape_layout
    compares: CompareRule = no_comparison
    ring: RingRule = no_ring
    min_act_bits: int = 0
    torch: tuple[TorchRule, ...] = field(default_factory=tuple)


def records_table(*families: Sequence[OpKind]) -> dict[str, OpKind]:
    """Kind -> record, refusing duplicates (one home per kind)."""
    table: dict[str, OpKind] = {}
    for family in families:
        for record in family:
            if record.kind in table:
                raise ValueError(f"op kind {record.kind!r} is registered twice")
            table[record.kind] = record
    return table
