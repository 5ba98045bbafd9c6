"""The ring Z_2^64 on int64 arrays, and fixed-point encoding into it.

A real number v is stored as round(v * 2^f) mod 2^64, read as a signed int64.
numpy's int64 array arithmetic wraps modulo 2^64, which is exactly the ring.

The representable range is |v| < 2^(62 - f): the top two bits are kept free so
that the exact truncation protocol (mpc.protocols.truncation) can shift a value
into [0, 2^63) without wrapping.  A product of two values at scale f lives at
scale 2f, so it must satisfy |x * y| < 2^(62 - 2f) (about 1.07e9 for f = 16)
before it is truncated back.
"""

from __future__ import annotations

import numpy as np

from .errors import EncodingRangeError

__all__ = [
    "RING_BITS",
    "DEFAULT_FRAC_BITS",
    "HEADROOM_BITS",
    "max_abs",
    "encode",
    "decode",
    "as_ring",
]

RING_BITS = 64
DEFAULT_FRAC_BITS = 16
#: bits above the value kept free so that truncation never wraps
HEADROOM_BITS = 2


def max_abs(frac_bits: int) -> float:
    """Largest magnitude (exclusive) that encodes at ``frac_bits`` fractional bits."""
    return float(2 ** (RING_BITS - HEADROOM_BITS - frac_bits))


def encode(value: object, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
    """Encode reals (or integers) as fixed-point ring elements.

    Raises:
        EncodingRangeError: a value is NaN, infinite, or |v| >= 2^(62 - frac_bits).
    """
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return _encode_integers(arr, frac_bits)
    arr = np.asarray(arr, dtype=np.float64)
    limit = max_abs(frac_bits)
    if arr.size:
        finite = np.isfinite(arr)
        if not finite.all():
            raise EncodingRangeError(float(arr[~finite].flat[0]), limit, frac_bits)
        peak = np.abs(arr).max()
        if peak >= limit:
            raise EncodingRangeError(float(arr.flat[np.abs(arr).argmax()]), limit, frac_bits)
    # np.rint is round-half-to-even; the value is exact in float64 up to 2^53.
    return np.rint(arr * float(2**frac_bits)).astype(np.int64)


def _encode_integers(arr: np.ndarray, frac_bits: int) -> np.ndarray:
    limit = 2 ** (RING_BITS - HEADROOM_BITS - frac_bits)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if hi >= limit or lo <= -limit:
            bad = hi if hi >= limit else lo
            raise EncodingRangeError(bad, float(limit), frac_bits)
    return arr.astype(np.int64) << np.int64(frac_bits)


def decode(ring: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
    """Decode ring elements (signed int64) to float64 reals."""
    return np.asarray(ring, dtype=np.int64).astype(np.float64) / float(2**frac_bits)


def as_ring(value: object) -> np.ndarray:
    """View integer data as ring elements (int64, wrapping), without scaling."""
    arr = np.asarray(value)
    if arr.dtype == np.int64:
        return arr
    if arr.dtype == np.uint64:
        return arr.view(np.int64)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return arr.astype(np.int64)
    raise TypeError(f"expected integer ring data, got dtype {arr.dtype}")
