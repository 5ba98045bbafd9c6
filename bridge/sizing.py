"""Sizing an encrypted run: fixed-point settings from measured bounds, ring checks from weights.

The primitives:

- :func:`comparison_bound`: the largest magnitude any comparison of a plan
  meets, given the largest magnitude of every value.  Each op kind says what it
  compares (:attr:`bridge.registry.OpKind.compares`); two-operand comparisons
  count their *differences*: a max-pool over values up to R compares up to 2R.
- :func:`comparison_bits_for`: the smallest comparison domain holding a bound.
- :func:`default_act_bits`: 12 fractional bits, or what the plan's ops need for
  their documented error (16 for approximations, 20 for LayerNorm).
- :func:`check_ring` / :func:`check_weights`: refuse a plan whose products can
  leave the 64-bit ring for activations within given bounds, naming the layer
  and the fix.  The model owner runs :func:`check_weights` (in
  :class:`bridge.secure.EncryptedModel`): only it holds the weights.

Sizing one run, for every entry point alike:

Who measures (:func:`measure_bounds`): whoever holds both the model and images
like those it will see.

- The model owner, on its own validation images
  (``primia infer --role model-server --calibrate DIR``); the bounds travel in the
  model card (:class:`bridge.card.Bounds`) with the margin it grants
  (:data:`CALIBRATION_MARGIN`).
- The caller of :func:`bridge.infer_local` or ``primia infer --local``, on the very
  images it classifies (:data:`LOCAL_MARGIN`).

Every entry point then calls :func:`size_fixed_point` on those bounds, so the
model server and the data owner derive the same settings (the plan check of
:class:`bridge.secure.EncryptedModel` confirms it):

- ``act_bits``: :func:`default_act_bits` of the plan, raised to at most 20 until
  one unit is below 1e-3 of the largest logit, so rounding stays well inside the documented tolerance of 1e-2
  of the largest logit;
- ``comparison_bits``: exact for every compared *difference* up to ``margin``
  times the measured one: a ReLU compares its input with 0, a clamp the distance
  to its bound, a max-pool two of its inputs (a difference up to twice the
  largest input).  The domain l holds |d| < 2^(l - 1 - act_bits);
- refused (:class:`~mpc.errors.ConfigError` naming the op and the fix) when
  ``margin`` times the largest value does not fit the 64-bit ring at the product
  scale ``act_bits + weight_bits`` (|v| < 2^(62 - act_bits - weight_bits)), or
  the compared values no comparison domain holds.

The data owner refuses inputs beyond ``margin`` times the measured input
(:func:`check_inputs`): the calibration says nothing about them.  What can still
overflow (an input inside the margin whose activations are not) is for the
protocol to detect; :func:`run_with_retry` answers such an error by running again
once with a comparison domain :data:`WIDEN_BITS` wider, then refuses clearly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, TypeVar

import numpy as np

from mpc.errors import ApproximationRangeError, ComparisonOverflow, ConfigError, EncodingRangeError, PrimiaError
from mpc.protocols.compare import MAX_BITS, MIN_BITS
from mpc.ring import HEADROOM_BITS, RING_BITS

from .card import Bounds
from .errors import RingOverflowError
from .ops import KINDS
from .plaintext import measure_ranges
from .plan import Plan
from .registry import Fixed

__all__ = [
    "DEFAULT_ACT_BITS",
    "DEFAULT_WEIGHT_BITS",
    "DEFAULT_RANGE_BITS",
    "RING_LIMIT_BITS",
    "comparison_bound",
    "comparison_bits_for",
    "default_act_bits",
    "check_ring",
    "check_weights",
    "CALIBRATION_MARGIN",
    "LOCAL_MARGIN",
    "WIDEN_BITS",
    "OVERFLOW_ERRORS",
    "FixedPoint",
    "measure_bounds",
    "bounds_from_ranges",
    "size_fixed_point",
    "check_inputs",
    "run_with_retry",
    "InferenceOverflow",
]

#: fractional bits of activations for plans of exact ops (others need more: OpKind.min_act_bits)
DEFAULT_ACT_BITS = 12
#: fractional bits of multiplied parameters
DEFAULT_WEIGHT_BITS = 20
#: compared values stay below 2^DEFAULT_RANGE_BITS = 512 in magnitude (the default comparison domain)
DEFAULT_RANGE_BITS = 9
#: a value about to be truncated must stay below 2^62 in ring units (mpc.ring)
RING_LIMIT_BITS = RING_BITS - HEADROOM_BITS
#: margin granted to bounds measured on the model owner's validation images (other images may reach further)
CALIBRATION_MARGIN = 4.0
#: margin for bounds measured on the very images being classified (exact, up to fixed-point rounding)
LOCAL_MARGIN = 2.0
#: how much wider the comparison domain is on the one retry after a detected overflow
WIDEN_BITS = 8
#: errors that mean "a value left its domain inside the protocol", answered by one retry, wider.
#: ComparisonOverflow and ApproximationRangeError are raised by every party at the same protocol step (the
#: check before a result is opened), which is what makes a retry of the whole run safe; the ranges the bridge
#: gives inv_sqrt (LayerNorm, L2 normalisation) grow with the comparison domain.
OVERFLOW_ERRORS: tuple[type[PrimiaError], ...] = (EncodingRangeError, ComparisonOverflow, ApproximationRangeError)
# act_bits + weight_bits must stay within EncryptedModel's limit of 40
_MAX_ACT_BITS = 20

log = logging.getLogger("primia.sizing")


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


class InferenceOverflow(PrimiaError):
    """A value left its domain even after the retry with a wider one."""

    def __init__(self, widen_bits: int, cause: BaseException):
        self.widen_bits = widen_bits
        super().__init__(
            f"a value left its fixed-point domain even with comparisons {widen_bits} bits wider than sized "
            f"({cause}); "
            "the inputs reach beyond what the model was calibrated for: calibrate on images like these "
            "(--calibrate DIR), or check their preprocessing (mean, std)"
        )


@dataclass(frozen=True)
class FixedPoint(Fixed):
    """The settings of one sized run (the options of :class:`bridge.secure.EncryptedModel`)."""

    #: the activations' bound the model owner's ring check assumes (margin x measured); None: the domain's
    activation_bound: float | None = None

    def options(self) -> dict[str, int]:
        """The settings both parties must agree on (keyword arguments of EncryptedModel)."""
        return {"act_bits": self.act_bits, "weight_bits": self.weight_bits, "comparison_bits": self.comparison_bits}


def measure_bounds(plan: Plan, weights: dict[str, np.ndarray], batches: Iterable[np.ndarray], *,
                   margin: float) -> Bounds:
    """The magnitudes a float64 plaintext run of ``plan`` meets over every batch (see :class:`Bounds`)."""
    total: Bounds | None = None
    for x in batches:
        x = np.asarray(x, dtype=np.float64)
        batch = bounds_from_ranges(plan, measure_ranges(plan, weights, x), images=int(x.shape[0]), margin=margin)
        total = batch if total is None else total.merged(batch)
    if total is None:
        raise ConfigError("no images to measure the model's value ranges on")
    return total


def bounds_from_ranges(plan: Plan, ranges: Mapping[str, float], *, images: int, margin: float) -> Bounds:
    """The :class:`Bounds` of every value's largest magnitude (:func:`bridge.plaintext.measure_ranges`)."""
    top = max(plan.ops, key=lambda op: ranges[op.name], default=None)
    values, at = (ranges[top.name], f"{top.name} ({top.kind})") if top is not None else (0.0, "")
    return Bounds(ranges[plan.input_name], comparison_bound(plan, ranges), values, ranges[plan.output], images,
                  margin, at)


def size_fixed_point(bounds: Bounds | None, *, plan: Plan | None = None, act_bits: int | None = None,
                     weight_bits: int | None = None, comparison_bits: int | None = None,
                     widen_bits: int = 0) -> FixedPoint:
    """The fixed-point settings for ``bounds`` (see the module docstring); explicit values are kept.

    Without bounds, both ``act_bits`` and ``comparison_bits`` must be given (the
    operator takes responsibility for them).  ``plan`` sets the least
    ``act_bits`` (:func:`default_act_bits`: its ops' documented errors need
    it); every entry point passes it.  ``widen_bits`` widens the comparison
    domain (a retry after a detected overflow).

    Raises:
        ConfigError: no bounds and no explicit settings, or values no setting holds.
    """
    weight_bits = DEFAULT_WEIGHT_BITS if weight_bits is None else weight_bits
    if bounds is None:
        if act_bits is None or comparison_bits is None:
            raise ConfigError(
                "the model has no measured value ranges to size its fixed point from: the model server "
                "measures them with --calibrate DIR (images like those it will serve), or give both "
                "--act-bits and --comparison-bits (the same on both sides)"
            )
        return FixedPoint(act_bits, weight_bits, min(comparison_bits + widen_bits, MAX_BITS))
    values = bounds.margin * bounds.values
    ring_bits = RING_BITS - HEADROOM_BITS - weight_bits  # act_bits + log2(values) must stay below this
    room = ring_bits - (math.ceil(math.log2(values)) if values > 1 else 0) - 1
    if act_bits is None:
        wanted = math.ceil(math.log2(1e3 / bounds.logit)) if bounds.logit > 0 else _MAX_ACT_BITS
        least = DEFAULT_ACT_BITS if plan is None else default_act_bits(plan)
        act_bits = max(min(max(wanted, least), _MAX_ACT_BITS, room), least)
    if act_bits > room:
        raise ConfigError(
            f"values up to {values:.4g} ({bounds.margin:g} x {bounds.values:.4g}, met at "
            f"{bounds.values_at or 'an op'}) do not fit the 64-bit ring with {act_bits} + {weight_bits} "
            f"fractional bits (at most {2.0 ** (ring_bits - act_bits - 1):.4g}); the model's weights or inputs "
            "are too large for fixed point: rescale them (e.g. check the normalisation), or lower --act-bits"
        )
    compared = bounds.margin * bounds.compared
    try:
        needed = max(comparison_bits_for(act_bits), comparison_bits_for(act_bits, compared))
    except ValueError:
        raise ConfigError(
            f"compared values up to {compared:.4g} ({bounds.margin:g} x {bounds.compared:.4g}) fit no comparison "
            f"domain at {act_bits} fractional bits; rescale the model's inputs or weights"
        ) from None
    if comparison_bits is None:
        comparison_bits = needed
    elif comparison_bits < needed:  # an explicit setting the measured values would overflow: never silently
        raise ConfigError(
            f"--comparison-bits {comparison_bits} holds compared values below "
            f"{2.0 ** (comparison_bits - 1 - act_bits):.4g} at {act_bits} fractional bits, but they reach "
            f"{compared:.4g} ({bounds.describe()}); use at least {needed}, or leave it out to have it sized"
        )
    return FixedPoint(act_bits, weight_bits, min(comparison_bits + widen_bits, MAX_BITS), values)


def check_inputs(x: np.ndarray, bounds: Bounds | None, names: list[str]) -> None:
    """Refuse inputs beyond the calibrated range (``names``: one per row of ``x``, for the message)."""
    if bounds is None:
        return
    limit = bounds.margin * bounds.input
    peaks = np.abs(np.asarray(x, dtype=np.float64)).reshape(len(x), -1).max(axis=1)
    bad = [(name, float(p)) for name, p in zip(names, peaks) if not p <= limit]
    if bad:
        shown = ", ".join(f"{name} (up to {p:.4g})" for name, p in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ConfigError(
            f"{len(bad)} input(s) reach beyond the range the model was calibrated for (|x| <= {limit:.4g}: "
            f"{bounds.margin:g} x the largest of {bounds.images} calibration images): {shown}{more}; their "
            "results could be wrong. Check their preprocessing (the card's mean and std), or ask the model "
            "owner to calibrate on images like these"
        )


T = TypeVar("T")


def run_with_retry(run: Callable[[int], T]) -> T:
    """``run(0)``; after an overflow error (:data:`OVERFLOW_ERRORS`), ``run(WIDEN_BITS)`` once.

    ``run(widen_bits)`` runs the whole inference with its comparison domain
    ``widen_bits`` wider than sized (pass it to :func:`size_fixed_point`); both
    parties must see the same value (a session parameter).

    Raises:
        InferenceOverflow: the retry overflowed too.
    """
    try:
        return run(0)
    except OVERFLOW_ERRORS as exc:
        log.warning("a value left its domain (%s); running once more with comparisons %d bits wider", exc,
                    WIDEN_BITS)
        try:
            return run(WIDEN_BITS)
        except OVERFLOW_ERRORS as again:
            raise InferenceOverflow(WIDEN_BITS, again) from again
