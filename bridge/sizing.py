"""Sizing an encrypted run from what someone holds: value ranges -> comparison domain; weights -> ring check.

- :func:`comparison_bound`: the largest magnitude any comparison of a plan
  meets, given the largest magnitude of every value (measured by the model
  owner on its validation data, or by a plaintext run of the batch).  Each op
  kind says what it compares (:attr:`bridge.registry.OpKind.compares`);
  two-operand comparisons count their *differences*: a max-pool over values
  up to R compares up to 2R.
- :func:`comparison_bits_for`: the smallest comparison domain holding a bound.
- :func:`check_ring`: refuses a plan whose products can leave the 64-bit ring
  for activations within given bounds (a single bound, e.g. what the
  comparison domain guarantees, or one per value), naming the layer and the
  fix.  :func:`check_weights` runs it on the layers with the owner's weights,
  for activations within the domain's bound: the model owner calls it (in
  :class:`bridge.secure.EncryptedModel`), since only it holds the weights.
- :func:`default_act_bits`: 12 fractional bits, or what the plan's ops need
  for their documented error (16 for approximations, 20 for LayerNorm).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mpc.protocols.compare import MAX_BITS, MIN_BITS
from mpc.ring import HEADROOM_BITS, RING_BITS

from .errors import RingOverflowError
from .ops import KINDS
from .plan import Plan
from .registry import Fixed

__all__ = [
    "DEFAULT_ACT_BITS",
    "DEFAULT_RANGE_BITS",
    "comparison_bound",
    "comparison_bits_for",
    "default_act_bits",
    "check_ring",
    "check_weights",
    "RING_LIMIT_BITS",
]

#: fractional bits of activations for plans of exact ops (others need more: OpKind.min_act_bits)
DEFAULT_ACT_BITS = 12
#: compared values stay below 2^DEFAULT_RANGE_BITS = 512 in magnitude (the default comparison domain)
DEFAULT_RANGE_BITS = 9
#: a value about to be truncated must stay below 2^62 in ring units (mpc.ring)
RING_LIMIT_BITS = RING_BITS - HEADROOM_BITS


def comparison_bound(plan: Plan, ranges: Mapping[str, float]) -> float:
    """The largest magnitude entering any comparison, from every value's largest magnitude.

    ``ranges`` maps each value name (the input's and every op's) to its largest
    magnitude, e.g. from :func:`bridge.plaintext.measure_ranges`.
    """
    peak = 0.0
    for op in plan.ops:
        inputs = [float(ranges[name]) for name in op.inputs]
        peak = max(peak, float(KINDS[op.kind].compares(op, inputs, float(ranges[op.name]))))
    return peak


def comparison_bits_for(act_bits: int, peak: float = 2.0**DEFAULT_RANGE_BITS) -> int:
    """The smallest comparison domain exact for compared magnitudes below ``peak``.

    A value v at ``act_bits`` is the ring integer v * 2^act_bits; the domain l
    must hold |v| * 2^act_bits < 2^(l - 1).

    Raises:
        ValueError: no domain (at most 64 bits) holds ``peak``.
    """
    need = act_bits + 1 + max(int(np.ceil(np.log2(max(peak, 1.0)))), 0)
    if need > MAX_BITS:
        raise ValueError(f"values up to {peak:g} do not fit any comparison domain at {act_bits} fractional bits")
    return max(need, MIN_BITS)


def default_act_bits(plan: Plan) -> int:
    """Activation bits for a plan: 12, or the most any of its ops needs for its documented error."""
    return max([DEFAULT_ACT_BITS, *(KINDS[op.kind].min_act_bits for op in plan.ops)])


def check_ring(plan: Plan, weights: Mapping[str, np.ndarray], fixed: Fixed, bounds: float | Mapping[str, float], *,
               kinds: set[str] | None = None, assumption: str = "") -> None:
    """Refuse a plan whose ops can leave the ring for activations within ``bounds``.

    ``bounds`` is one magnitude for every value or one per value name; each op's
    record (:attr:`~bridge.registry.OpKind.ring`) turns its inputs' bounds and
    its parameters into the largest ring magnitude it forms.  ``kinds`` limits
    the check to some op kinds.

    Raises:
        RingOverflowError: names the first layer that can overflow and what to do.
    """
    def bound(name: str) -> float:
        return float(bounds) if isinstance(bounds, (int, float)) else float(bounds[name])

    where = assumption or (f"for activations up to {bounds:g}" if isinstance(bounds, (int, float))
                           else "for the given value ranges")
    for op in plan.ops:
        if kinds is not None and op.kind not in kinds:
            continue
        params = [np.asarray(weights[p], dtype=np.float64) for p in op.params]
        bits = float(KINDS[op.kind].ring(op, [bound(i) for i in op.inputs], params, fixed))
        if bits >= RING_LIMIT_BITS:
            peak = max((float(np.abs(p).max()) for p in params if p.size), default=0.0)
            fix = (f"The largest parameter of this layer is {peak:.3g}: rescale the layer's weights (and "
                   f"compensate in the next layer), or lower weight_bits ({fixed.weight_bits})."
                   if params else f"Lower act_bits ({fixed.act_bits}) or keep the layer's inputs smaller.")
            raise RingOverflowError(op.name, op.kind, op.source, bits, RING_LIMIT_BITS, where, fix)


def check_weights(plan: Plan, weights: Mapping[str, np.ndarray], fixed: Fixed,
                  activation_bound: float | Mapping[str, float] | None = None) -> None:
    """The ring check of every layer with the owner's weights (of every layer, given a range per value).

    Activations are taken to be at most ``activation_bound`` (one bound, or one
    per value name, e.g. the ranges a model card states), by default the comparison
    domain's bound ``fixed.compare_limit``: a compared magnitude beyond it fails
    its comparison, so that is what the comparisons guarantee.  A domain much
    wider than the activations need makes this check (rightly) strict.
    """
    with_weights = {kind for kind, record in KINDS.items() if "weight" in record.params}
    if isinstance(activation_bound, Mapping):  # a range for every value: every op can be checked
        check_ring(plan, weights, fixed, activation_bound)
        return
    if activation_bound is not None:
        check_ring(plan, weights, fixed, activation_bound, kinds=with_weights)
        return
    limit = fixed.compare_limit
    check_ring(plan, weights, fixed, limit, kinds=with_weights,
               assumption=f"for activations up to {limit:g} (what a {fixed.comparison_bits}-bit comparison domain "
                          f"holds at {fixed.act_bits} fractional bits; size the domain to the activations' real "
                          f"range if it is wider than they need)")
