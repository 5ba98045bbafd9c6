"""Products of a shared tensor with a tensor one party knows in the clear (e.g. model weights).

Let party k own W, and let x be shared.  The dealer derives a fixed mask B for W
from k's dealer seed (the same B for every use of W), and for each product
fresh masks A_j for every other party j, with [C] = f(A, B), A = Σ_{j≠k} A_j.

Once per W:   k opens δ = W − B to the others (1 round, |W| ring elements each).
Per product:
  1. every j ≠ k sends m_j = x_j − A_j to k (1 round, one direction);
  2. j ≠ k:  z_j = C_j + f(A_j, δ)          (input-independent: can be precomputed)
     k:      z_k = C_k + f(x_k + Σ_j m_j, W).
Σ z = f(x − A, W) + f(A, W − B) + f(A, B) = f(x, W).

Cost per product: 8 |x| bytes from each non-owner to the owner and nothing
back, one round; one evaluation of f per party; the dealer sends |z| ring
elements to the owner.  Compare Beaver on two shared operands: 8 (n−1)(|x| +
|W|) bytes in both directions and two evaluations of f per party.

Security: m_j is x_j masked by the uniform A_j, and δ is W masked by the
uniform B (opened once: reusing B with the same W reveals nothing new).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import bilinear
from ..dealer import WEIGHT_STREAM_TAG

if TYPE_CHECKING:
    from ..context import Context
    from ..private import PrivateTensor

__all__ = ["owned_product", "open_masked_weight"]


def weight_mask(ctx: "Context", private: "PrivateTensor") -> np.ndarray:
    return ctx.dealer.named_stream(WEIGHT_STREAM_TAG | private.ident).ring(private.shape)


def open_masked_weight(ctx: "Context", private: "PrivateTensor") -> np.ndarray:
    """Open δ = W − B from the owner to every other party (one round)."""
    others = [p for p in range(ctx.parties) if p != private.owner]
    if ctx.rank == private.owner:
        delta = private.value - weight_mask(ctx, private)
        ctx.comm.exchange({p: delta for p in others}, {})
        return delta
    (delta,) = ctx.comm.exchange({}, {private.owner: (private.shape, np.int64)}).values()
    return delta


def owned_product(ctx: "Context", x: np.ndarray, private: "PrivateTensor", op: str, params: dict[str, Any] | None = None) -> np.ndarray:
    """Shares of f(x, W) from shares of x and the owner's W (W is the right operand)."""
    params = dict(params or {})
    delta = private.prepare()
    owner = private.owner
    request = {"op": op, "a": list(x.shape), "b": list(private.shape), "owner": owner, "weight": private.ident, **params}
    a, _, c = ctx.dealer.get("owned_triple", request)
    if ctx.rank != owner:
        ctx.comm.exchange({owner: x - a}, {})
        z = bilinear.evaluate(op, a, delta, params)
        z += c
        return z
    others = [p for p in range(ctx.parties) if p != owner]
    received = ctx.comm.exchange({}, {p: (x.shape, np.int64) for p in others})
    total = x.copy()
    for m in received.values():
        total += m
    z = bilinear.evaluate(op, total, private.value, params)
    z += c
    return z
