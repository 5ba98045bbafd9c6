"""The bridge's own errors, under :class:`mpc.errors.PrimiaError` (the tree is drawn in :mod:`mpc.errors`)::

    PrimiaError
    ├── ConfigError
    │   └── RingOverflowError   a layer's products can leave the 64-bit ring (bridge.sizing.check_ring)
    └── EncryptedOpError        an op of the encrypted forward pass failed (names the layer; the
                                engine's error, e.g. a comparison outside its domain, is the cause)
"""

from __future__ import annotations

from mpc.errors import ConfigError, PrimiaError

__all__ = ["RingOverflowError", "EncryptedOpError"]


class RingOverflowError(ConfigError):
    """A layer can form a value too large for the ring at its scale: refused before it runs."""

    def __init__(self, op: str, kind: str, source: str, bits: float, limit_bits: int, assumption: str, fix: str):
        self.op = op
        self.kind = kind
        self.source = source
        self.bits = bits
        self.limit_bits = limit_bits
        super().__init__(
            f"layer {source or op} ({kind} {op}) can reach 2^{bits:.1f} in the 64-bit ring, beyond the 2^{limit_bits} "
            f"that truncation allows, {assumption}; the result would be wrong. {fix}"
        )


class EncryptedOpError(PrimiaError):
    """The encrypted forward pass failed in one op; ``cause`` is the engine's error (also ``__cause__``)."""

    def __init__(self, op: str, kind: str, source: str, cause: BaseException):
        self.op = op
        self.kind = kind
        self.source = source
        self.cause = cause
        super().__init__(f"encrypted layer {source or op} ({kind} {op}) failed: {cause}")
