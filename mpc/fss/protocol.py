"""Two-party comparison, ReLU and selection from function secret sharing (2 online rounds).

AriaNN (Ryffel, Tholoniel, Pointcheval, Bach, "AriaNN: Low-Interaction
Privacy-Preserving Deep Learning via Function Secret Sharing", PoPETs 2022)
and Boyle et al. (EUROCRYPT 2021, §4, DReLU from one DCF on l - 1 bits):
  1. open y^ = x + r + 2^(l-1) (one round, 8 B per party per element);
  2. each party evaluates its DCF key at y^_low = y^ mod 2^(l-1), getting XOR
     shares of the borrow u = [y^_low < r_low] — local, one AES block per tree
     level;
  3. open d = p XOR u XOR e (one round, 1 bit per element) and inject
     b = d XOR delta into the ring, with b * x and b * z_k for free
     (:func:`mpc.protocols.drelu.finish`, which also forms the overflow terms
     for l < 64).
Rounds: 2.  Sent per party per element: 8 + 8 w + 1/8 B.
Dealer, to each party: 16 (l - 8) + 4|8 + 16 B of DCF correction words
(l = 64: 920 B; l = 32: 404 B); party 1 also 8 (1 + with_x + w + 2 [l < 64]) B.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..protocols.drelu import (
    MAX_BITS,
    DRelu,
    compare_params,
    compared_bits,
    finish,
    injection_dealer_bytes,
    open_masked,
    split_opened,
)
from . import dcf
from .material import FssCompare, FssDraw

if TYPE_CHECKING:
    from ..context import Context

__all__ = ["drelu_fss", "fss_costs"]


def fss_costs(bits: int, *, with_x: bool = True, payloads: int = 0, slack: int = 0) -> dict[str, float]:
    """Exact per-element costs of :func:`drelu_fss`."""
    key = dcf.key_bytes(compared_bits(bits, slack))
    return {
        "rounds": 2,
        "bytes_sent": 8 + 8 * payloads + 1 / 8,
        "dealer_bytes_party0": key + injection_dealer_bytes(0, bits, with_x, payloads, overflow_rank=FssCompare.overflow_rank),
        "dealer_bytes_party1": key + injection_dealer_bytes(1, bits, with_x, payloads, overflow_rank=FssCompare.overflow_rank),
    }


def drelu_fss(
    ctx: "Context",
    x: np.ndarray,
    *,
    bits: int = MAX_BITS,
    with_x: bool = False,
    payloads: Sequence[np.ndarray] = (),
    slack: int = 0,
) -> DRelu:
    """Shares of [x >= 0] (and of [x >= 0] * x, * z_k); exactly 2 parties, -2^(bits-1) <= x < 2^(bits-1).

    Outside that domain the result's overflow terms are nonzero.  ``slack`` =
    k drops the k low bits from the comparison (keys of 16 (l - 8 - k) +
    20|24 B): the bit may be wrong for |x| < 2^k.
    """
    if ctx.parties != 2:
        raise ValueError(f"the FSS comparison needs exactly 2 parties, not {ctx.parties}; use comparison='generic'")
    x = np.ascontiguousarray(x, dtype=np.int64).reshape(-1)
    params = compare_params(x.size, bits, with_x, len(payloads), slack)
    draw: FssDraw = ctx.dealer.get(FssCompare.name, params)
    opened = open_masked(ctx, x, payloads, draw.masks, bits, with_x)
    p, point = split_opened(opened.y_hat, bits, slack)
    u = dcf.evaluate(ctx.rank, draw.seed, draw.key, point, compared_bits(bits, slack))
    return finish(ctx, u, p, draw.masks, opened, bits)
