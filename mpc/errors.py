"""Errors raised by primia, under one root.

    PrimiaError
    ├── ConfigError            bad configuration value or unknown key
    ├── EncodingRangeError     a value does not fit the fixed-point ring encoding
    ├── ComparisonOverflow     a compared value left the comparison domain (found by the check)
    ├── ApproximationRangeError  an approximation's input left its stated range (found by the check)
    ├── ProtocolError          a peer broke the protocol (wrong shape, dtype, order, size)
    │   └── FrameError         a network frame is malformed, truncated or oversized
    ├── PeerFailure            a peer disconnected, stalled past the timeout, or failed
    │   └── PeerTimeout
    ├── AuthenticationError    a connection could not prove membership
    └── UnsupportedModelError  a torch model uses a layer the bridge cannot convert

Every error carries the fields it is about and a message that names the problem
and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = [
    "PrimiaError",
    "ConfigError",
    "EncodingRangeError",
    "ComparisonOverflow",
    "ApproximationRangeError",
    "ProtocolError",
    "FrameError",
    "PeerFailure",
    "PeerTimeout",
    "AuthenticationError",
    "UnsupportedModelError",
]


class PrimiaError(Exception):
    """Root of every error primia raises on purpose."""


class ConfigError(PrimiaError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class EncodingRangeError(PrimiaError, ValueError):
    """A value cannot be represented in fixed point without wrapping."""

    def __init__(self, value: float, limit: float, frac_bits: int):
        self.value = value
        self.limit = limit
        self.frac_bits = frac_bits
        super().__init__(
            f"value {value!r} is outside the fixed-point range (-{limit:g}, {limit:g}) "
            f"for {frac_bits} fractional bits; scale the input down or use fewer fractional bits"
        )


def _where(scopes: tuple[str | None, ...]) -> str:
    named = [s for s in scopes if s is not None]
    if not named:
        return "(no scope named; wrap layers in ctx.comparison_scope(name) to name them)"
    return ", ".join(repr(s) for s in named) + (" and unscoped operations" if len(named) < len(scopes) else "")


class ComparisonOverflow(PrimiaError, ArithmeticError):
    """A compared value (for two operands: their difference) left the comparison domain.

    Raised by :meth:`mpc.Context.check_comparisons` (which ``reveal`` runs first),
    at every party, before anything is revealed: the results of the checked
    comparisons may be wrong and must not be used.

    Fields: ``domain_bits`` (the smallest failing domain l: the values had to
    satisfy -2^(l-1) <= d < 2^(l-1) ring units), ``scopes`` (the
    ``ctx.comparison_scope`` names of the failing groups, None for unscoped
    ones), ``comparisons`` (how many comparisons those groups held).
    """

    def __init__(self, domain_bits: int, scopes: tuple[str | None, ...], comparisons: int):
        self.domain_bits = domain_bits
        self.scopes = scopes
        self.comparisons = comparisons
        super().__init__(
            f"a compared value left the {domain_bits}-bit comparison domain (|d| >= 2^{domain_bits - 1} ring "
            f"units; for two operands d is their difference) in {_where(scopes)}, among {comparisons} "
            "comparisons; nothing was revealed. Widen comparison_bits to cover the largest compared "
            "difference, or scale the values down"
        )


class ApproximationRangeError(PrimiaError, ValueError):
    """An input of an approximation (exp, reciprocal, inv_sqrt, ...) left the range it is accurate on.

    Raised by :meth:`mpc.Context.check_comparisons` before anything is revealed.
    Fields: ``function``, ``low`` and ``high`` (the range, in real units; None
    for an open end), ``scopes`` and ``elements`` (how many inputs the failing
    groups held).
    """

    def __init__(self, function: str, low: float | None, high: float | None,
                 scopes: tuple[str | None, ...], elements: int):
        self.function = function
        self.low = low
        self.high = high
        self.scopes = scopes
        self.elements = elements
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        super().__init__(
            f"an input of {function} left its range [{lo}, {hi}) in {_where(scopes)}, among {elements} inputs; "
            "nothing was revealed. Rescale the inputs, or widen the range where the function takes one "
            "(e.g. exponents=)"
        )


class ProtocolError(PrimiaError):
    """A peer sent something the protocol does not allow at this point."""

    def __init__(self, peer: object, reason: str):
        self.peer = peer
        self.reason = reason
        super().__init__(f"protocol error with peer {peer}: {reason}")


class FrameError(ProtocolError):
    """A network frame is malformed, truncated, oversized or of a forbidden dtype."""


class PeerFailure(PrimiaError):
    """A peer disconnected or failed; the computation cannot continue."""

    def __init__(self, peer: object, reason: str):
        self.peer = peer
        self.reason = reason
        super().__init__(f"peer {peer} failed: {reason}")


class PeerTimeout(PeerFailure):
    """A peer sent nothing within the configured timeout."""

    def __init__(self, peer: object, timeout_s: float):
        self.timeout_s = timeout_s
        super().__init__(peer, f"no message within {timeout_s:g} s (timeout)")


class AuthenticationError(PrimiaError):
    """A connection failed to prove membership of the federation."""


class UnsupportedModelError(PrimiaError, TypeError):
    """A torch model contains something the bridge cannot convert."""
