"""Fixed-point truncation: shares of x / 2^d from shares of x.

``exact`` (default, any number of parties, 1 round)
    The dealer provides shares of a uniform r in Z_2^64, of r_hi = r >> d
    (logical shift) and of r's top bit t (shared mod 2^d).
      1. Every party adds its share of r (party 0 also adds K = 2^62) and the
         sum c = x + K + r mod 2^64 is opened (one round; c is uniform, so it
         reveals nothing about x).
      2. Because x + K lies in [0, 2^63), the addition wrapped exactly when
         t = 1 and c's top bit is 0: w = t * (1 - c_63) is linear in [t].
      3. [x >> d] = (c >> d) - [r_hi] + w * 2^(64-d) - (K >> d), with c >> d
         and the constant added by party 0 only.
    Result: floor(x / 2^d) or floor(x / 2^d) + 1, i.e. an error below one unit
    in the last place, for every |x| < 2^62, with probability 1 — no rare
    large errors and no dependence on the number of parties.
    Cost: 8 (n-1) B sent and received per element, 1 round; the dealer sends
    8 + ceil(d/8) B per element (rounded up to a dtype) to party 0.

``local`` (2 parties only, 0 rounds; SecureML, Mohassel-Zhang 2017, Thm. 1)
    Party 0 shifts its share, party 1 negates, shifts and negates back.  With
    |x| < 2^l the result is off by at most one unit, except with probability
    about 2^(l + 1 - 64) per element, when it is off by about 2^(64 - d):
    for products of magnitude 2^10 at 16 fractional bits (l = 42) that is
    2^-21 per element, a 5 % chance of one wrong element in 10^5.  Use it only
    where rounds matter more than that risk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..context import Context

__all__ = ["truncate", "truncate_exact", "truncate_local", "TRUNCATION_METHODS"]

_OFFSET_BITS = 62


def truncate_exact(ctx: "Context", x: np.ndarray, bits: int) -> np.ndarray:
    r, r_hi, r_top = ctx.dealer.get("trunc", {"shape": list(x.shape), "bits": bits})
    masked = x + r
    if ctx.rank == 0:
        masked += np.int64(1 << _OFFSET_BITS)
    (c,) = ctx.comm.open([masked])
    cu = c.view(np.uint64)
    no_top = np.uint64(1) - (cu >> np.uint64(63))
    wrap = (r_top.astype(np.uint64) * no_top) << np.uint64(64 - bits)
    out = wrap.view(np.int64) - r_hi
    if ctx.rank == 0:
        out += (cu >> np.uint64(bits)).view(np.int64)
        out -= np.int64(1 << (_OFFSET_BITS - bits))
    return out


def truncate_local(ctx: "Context", x: np.ndarray, bits: int) -> np.ndarray:
    if ctx.parties != 2:
        raise ValueError("local truncation is only correct for 2 parties; use truncation='exact'")
    if ctx.rank == 0:
        return x >> np.int64(bits)
    return -((-x) >> np.int64(bits))


TRUNCATION_METHODS = {"exact": truncate_exact, "local": truncate_local}


def truncate(ctx: "Context", x: np.ndarray, bits: int) -> np.ndarray:
    """Shares of x / 2^bits by the context's configured method."""
    x = np.asarray(x)
    if bits == 0:
        return x
    # Work on a flat array: numpy scalars (from 0-d arrays) warn on wrap-around.
    flat = x.reshape(-1)
    return TRUNCATION_METHODS[ctx.truncation](ctx, flat, bits).reshape(x.shape)
