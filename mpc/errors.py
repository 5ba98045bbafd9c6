"""Errors raised by primia, under one root.

    PrimiaError
    ├── ConfigError            bad configuration value or unknown key
    ├── EncodingRangeError     a value does not fit the fixed-point ring encoding
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
