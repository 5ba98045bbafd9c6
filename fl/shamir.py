"""Shamir's t-of-n secret sharing of 128-bit seeds, over the prime field GF(2^130 - 5).

A seed s (16 bytes, read as an integer below 2^128 < p) is the constant term of
a random polynomial f of degree t - 1 with coefficients from the operating
system's CSPRNG; holder x gets f(x) for its x in 1..n.  Any t shares give s
back by Lagrange interpolation at 0; t - 1 shares are uniform and independent
of s.  Shares are 17 bytes (big-endian field elements).

Used by secure aggregation (:mod:`fl.pairwise`) so that the hub can recover
the masks of a node lost after uploading from its neighbours' shares.
"""

from __future__ import annotations

import secrets
from typing import Mapping

__all__ = ["PRIME", "SHARE_BYTES", "split", "combine", "ShareMismatch"]

#: 2^130 - 5, the prime of Poly1305: the smallest common prime above 2^128
PRIME = (1 << 130) - 5
SHARE_BYTES = 17
_SECRET_BYTES = 16


class ShareMismatch(ValueError):
    """Shares of one secret that do not lie on one polynomial of the expected degree."""


def split(secret: bytes, threshold: int, holders: list[int]) -> dict[int, bytes]:
    """Shares of ``secret`` for the holders with x-coordinates ``holders`` (distinct, in 1..p-1).

    Raises:
        ValueError: a secret that is not 16 bytes, or a threshold outside 1..len(holders).
    """
    if len(secret) != _SECRET_BYTES:
        raise ValueError(f"secrets are {_SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be in 1..{len(holders)} (the number of holders)")
    if len(set(holders)) != len(holders) or not all(0 < x < PRIME for x in holders):
        raise ValueError("holders must be distinct x-coordinates in 1..p-1")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in holders}


def _evaluate(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def _interpolate_at(points: list[tuple[int, int]], x0: int) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (x0 - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares; every share beyond the first ``threshold`` is checked
    to lie on the same polynomial.

    Raises:
        ValueError: fewer than ``threshold`` shares, or a malformed share.
        ShareMismatch: the shares do not agree (one was altered or belongs to another secret).
    """
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} share(s) cannot open a secret shared {threshold}-of-n")
    points = []
    for x, share in sorted(shares.items()):
        if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
            raise ValueError(f"share {x} is not {SHARE_BYTES} bytes")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise ValueError(f"share {x} is not a field element")
        points.append((x, y))
    base = points[:threshold]
    for x, y in points[threshold:]:
        if _interpolate_at(base, x) != y:
            raise ShareMismatch(f"share {x} does not lie on the polynomial of the others")
    secret = _interpolate_at(base, 0)
    if secret >> (8 * _SECRET_BYTES):
        raise ShareMismatch("the shares open to a value that is not a 16-byte secret")
    return secret.to_bytes(_SECRET_BYTES, "big")
