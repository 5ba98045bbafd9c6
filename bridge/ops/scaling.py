"""Multiplying shares by public reals (divisors of poolings and means, constant factors, interpolation weights).

A public factor is encoded as an integer at ``factor_bits`` fractional bits;
the product stays at the raised scale and rides on the next truncation the
executor does anyway (so a division costs no round of its own).  Integer
factors are exact and keep the scale; powers of two only move it.
"""

from __future__ import annotations

import math

import numpy as np

from mpc.ring import encode
from mpc.tensor import SharedTensor

__all__ = ["factor_bits", "times_public"]

#: relative error of an encoded factor stays below 2^-(RELATIVE_BITS + 1)
RELATIVE_BITS = 17
_MAX_FACTOR_BITS = 30


def factor_bits(factor: np.ndarray | float) -> int:
    """Extra fractional bits a product with ``factor`` carries until its truncation (0: exact integers)."""
    f = np.abs(np.asarray(factor, dtype=np.float64))
    if np.all(f == np.rint(f)):
        return 0
    exps = np.log2(f[f > 0]) if np.any(f > 0) else np.zeros(1)
    if np.all(exps == np.rint(exps)) and np.unique(exps).size == 1 and exps[0] < 0:
        return int(-exps[0])  # one power of two: the scale moves, nothing is multiplied
    smallest = float(f[f > 0].min()) if np.any(f > 0) else 1.0
    return int(min(_MAX_FACTOR_BITS, RELATIVE_BITS + max(0, math.ceil(-math.log2(smallest)))))


def times_public(x: SharedTensor, factor: np.ndarray | float) -> SharedTensor:
    """x * factor (public, broadcast), exact in the ring; the result is at ``x.frac_bits + factor_bits(factor)``."""
    f = np.asarray(factor, dtype=np.float64)
    bits = factor_bits(f)
    if bits == 0:
        return SharedTensor(x.ctx, x.share * f.astype(np.int64), x.frac_bits)
    exps = np.log2(np.abs(f[f != 0])) if np.any(f != 0) else np.zeros(1)
    if np.all(f > 0) and np.all(exps == -bits):
        return SharedTensor(x.ctx, np.broadcast_to(x.share, np.broadcast_shapes(x.shape, f.shape)).copy(),
                            x.frac_bits + bits)
    return SharedTensor(x.ctx, x.share * encode(f, bits), x.frac_bits + bits)
