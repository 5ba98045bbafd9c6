"""Fixed-point settings sized from bounds someone measured: one function for every entry point.

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

- ``act_bits``: 12, raised to at most 20 until one unit is below 1e-3 of the
  largest logit, so rounding stays well inside the documented tolerance of 1e-2
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
from typing import Callable, Iterable, TypeVar

import numpy as np

from mpc.errors import ComparisonOverflow, ConfigError, EncodingRangeError, PrimiaError
from mpc.protocols.compare import MAX_BITS
from mpc.ring import HEADROOM_BITS, RING_BITS

from .card import Bounds
from .plaintext import run_plaintext, value_ranges
from .plan import Plan
from .secure import DEFAULT_ACT_BITS, DEFAULT_WEIGHT_BITS, comparison_bits_for

__all__ = [
    "CALIBRATION_MARGIN",
    "LOCAL_MARGIN",
    "WIDEN_BITS",
    "OVERFLOW_ERRORS",
    "FixedPoint",
    "measure_bounds",
    "size_fixed_point",
    "check_inputs",
    "run_with_retry",
    "InferenceOverflow",
]

#: margin granted to bounds measured on the model owner's validation images (other images may reach further)
CALIBRATION_MARGIN = 4.0
#: margin for bounds measured on the very images being classified (exact, up to fixed-point rounding)
LOCAL_MARGIN = 2.0
#: how much wider the comparison domain is on the one retry after a detected overflow
WIDEN_BITS = 8
#: errors that mean "a value left its domain inside the protocol", answered by one retry, wider.
#: ComparisonOverflow is raised by every party at the same protocol step (the check before a result is
#: opened), which is what makes a retry of the whole run safe.
OVERFLOW_ERRORS: tuple[type[PrimiaError], ...] = (EncodingRangeError, ComparisonOverflow)
# act_bits + weight_bits must stay within EncryptedModel's limit of 40
_MAX_ACT_BITS = 20

log = logging.getLogger("primia.sizing")


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
class FixedPoint:
    """The settings of one encrypted run (the options of :class:`bridge.secure.EncryptedModel`)."""

    act_bits: int
    weight_bits: int
    comparison_bits: int

    def options(self) -> dict[str, int]:
        return {"act_bits": self.act_bits, "weight_bits": self.weight_bits, "comparison_bits": self.comparison_bits}


def measure_bounds(plan: Plan, weights: dict[str, np.ndarray], batches: Iterable[np.ndarray], *,
                   margin: float) -> Bounds:
    """The magnitudes a float64 plaintext run of ``plan`` meets over every batch (see :class:`Bounds`)."""
    total: Bounds | None = None
    for x in batches:
        x = np.asarray(x, dtype=np.float64)
        compared, logit = value_ranges(plan, weights, x)
        top = {"value": 0.0, "at": ""}

        def largest(op, inputs, out) -> None:
            peak = float(np.abs(out).max()) if out.size else 0.0
            if peak > top["value"]:
                top["value"], top["at"] = peak, f"{op.name} ({op.kind})"

        run_plaintext(plan, weights, x, on_op=largest)
        batch = Bounds(float(np.abs(x).max()) if x.size else 0.0, compared, top["value"], logit, int(x.shape[0]),
                       margin, top["at"])
        total = batch if total is None else total.merged(batch)
    if total is None:
        raise ConfigError("no images to measure the model's value ranges on")
    return total


def size_fixed_point(bounds: Bounds | None, *, act_bits: int | None = None, weight_bits: int | None = None,
                     comparison_bits: int | None = None, widen_bits: int = 0) -> FixedPoint:
    """The fixed-point settings for ``bounds`` (see the module docstring); explicit values are kept.

    Without bounds, both ``act_bits`` and ``comparison_bits`` must be given (the
    operator takes responsibility for them).  ``widen_bits`` widens the
    comparison domain (a retry after a detected overflow).

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
        act_bits = max(min(max(wanted, DEFAULT_ACT_BITS), _MAX_ACT_BITS, room), DEFAULT_ACT_BITS)
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
    return FixedPoint(act_bits, weight_bits, min(comparison_bits + widen_bits, MAX_BITS))


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
