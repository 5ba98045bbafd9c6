"""Deferred zero checks: shared values that must all be 0, tested together in 2 rounds.

Comparisons produce, per element, a shared term that is 0 exactly when the
compared value was in the comparison domain (:mod:`mpc.protocols.drelu`);
approximations produce 0/1 bits that must be 0 (an input outside their
range).  Opening those terms one by one would cost 8 B per element and
reveal them; instead each party folds its shares into a few *lane sums*
locally, and one check at the end opens a masked multiple of every lane.

Groups.  Terms are kept apart by a :class:`CheckLabel` (what is checked, and
the scope the program named), each group with its own lanes, so a failure
names the group.  Within a group:

- "strong" terms, whose nonzero values have 2-adic valuation at most V (a
  bound the caller states), go into sigma = ceil(STAT_BITS / (63 - V)) lanes
  S_j = sum_k rho_jk z_k with public coefficients rho_jk drawn uniformly from
  the *odd* residues mod 2^64;
- "weak" terms (any valuation, rare) go into WEAK_LANES = 64 lanes with
  uniform coefficients.

The coefficients are public: every party expands them from the coins of the
opening that produced the terms (a hash of masked values no one but the
dealer could predict before its masks were drawn), so the terms are fixed
before the coefficients are.

Soundness.  Fix a nonzero strong term z_k0 = 2^v o (o odd, v <= V) and all
other coefficients: S_j = 0 needs rho_jk0 o = t mod 2^(64-v) for one t, and
rho_jk0 mod 2^(64-v) is uniform over 2^(63-v) odd residues, so
P[S_j = 0] <= 2^-(63-V), independently per lane: a group with a nonzero strong
term passes with probability at most 2^-(sigma (63 - V)) <= 2^-STAT_BITS.  With
uniform coefficients P[S_j = 0] <= 2^-(64-v) <= 1/2 for any nonzero term, so a
nonzero weak term passes the 64 weak lanes with probability at most 2^-64.
(Odd coefficients matter: with uniform ones a single term's lane sum would
reveal v(rho_jk0), i.e. which element failed; with odd ones it does not.)

Check (2 rounds, whatever the number of terms).  With L lanes in all and a
dealer triple ([a], [b], [c = a b]) of L elements:
  1. open eta = S - a (one round, 8 L B per peer);
  2. [b S] = [c] + eta [b] (local), tau = 2b + 1 is a uniform odd mask,
     [tau S] = 2 [b S] + [S]; open tau S (one round, 8 L B per peer);
  3. the group fails if any of its lanes opened nonzero.
tau S = 0 exactly when S = 0 (tau is a unit).  Dealer: 8 L B to party 0.

What is revealed.  If every term is 0, the opened tau S are 0 and eta is
uniform: nothing.  If a group fails, each of its opened lanes is uniform over
2^v(S_j) times the units: it reveals the 2-adic valuation of the lane sum
(one number in [0, 63]) and nothing else - not the terms, not which element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from ..prg import Stream

if TYPE_CHECKING:
    from ..context import Context

__all__ = ["STAT_BITS", "WEAK_LANES", "CheckLabel", "ZeroCheck", "strong_lanes", "check_costs"]

#: statistical soundness of every group: a nonzero term passes with probability <= 2^-STAT_BITS
STAT_BITS = 40
#: lanes for terms of any valuation (rare): a nonzero one passes with probability <= 2^-64
WEAK_LANES = 64
_U64 = np.uint64


def strong_lanes(max_valuation: int) -> int:
    """Lanes with odd coefficients that give 2^-STAT_BITS for terms of valuation <= ``max_valuation``."""
    if not 0 <= max_valuation <= 62:
        raise ValueError(f"a strong term's valuation bound must be in [0, 62], got {max_valuation}")
    return math.ceil(STAT_BITS / (63 - max_valuation))


def check_costs(lanes: int, parties: int) -> dict[str, int]:
    """Exact cost of one check of ``lanes`` lanes, per party (dealer bytes: party 0)."""
    if lanes == 0:
        return {"rounds": 0, "bytes_sent": 0, "dealer_bytes_party0": 0}
    return {"rounds": 2, "bytes_sent": 16 * lanes * (parties - 1), "dealer_bytes_party0": 8 * lanes}


@dataclass(frozen=True)
class CheckLabel:
    """What a group of terms checks: ``kind`` ("comparison" or "range"), the program's
    ``scope`` (or None) and a ``detail`` (the domain bits, or the function and its range)."""

    kind: str
    scope: str | None
    detail: tuple[Any, ...]


@dataclass
class _Group:
    strong: np.ndarray = field(default_factory=lambda: np.zeros(0, _U64))
    weak: np.ndarray | None = None
    terms: int = 0

    def lanes(self) -> np.ndarray:
        return self.strong if self.weak is None else np.concatenate([self.strong, self.weak])


#: terms folded per coefficient draw (bounds the coefficients' memory: lanes x 8 MiB)
_FOLD_CHUNK = 1 << 20


@numba.njit(cache=True, nogil=True)
def _lane_sums(z, coeffs, odd, out):  # pragma: no cover - compiled
    """out[j] += sum_k (coeffs[j, k] | odd) z[k], wrapping (uint64)."""
    for j in range(coeffs.shape[0]):
        acc = np.uint64(0)
        row = coeffs[j]
        for k in range(z.shape[0]):
            acc += (row[k] | odd) * z[k]
        out[j] += acc


def _fold(lanes: np.ndarray, z: np.ndarray, stream: Stream, *, odd: bool) -> None:
    """Add the coefficient combinations of ``z`` to ``lanes`` in place, chunk by chunk."""
    terms = np.ascontiguousarray(z).view(_U64)
    odd_bit = _U64(1) if odd else _U64(0)
    for lo in range(0, terms.size, _FOLD_CHUNK):
        chunk = terms[lo : lo + _FOLD_CHUNK]
        coeffs = stream.ring((lanes.size, chunk.size)).view(_U64)
        _lane_sums(chunk, coeffs, odd_bit, lanes)


class ZeroCheck:
    """One party's pending terms, folded into lane sums; :meth:`run` checks and clears them."""

    def __init__(self) -> None:
        self._groups: dict[CheckLabel, _Group] = {}
        self._folds = 0

    @property
    def pending(self) -> int:
        """Terms added since the last check."""
        return sum(g.terms for g in self._groups.values())

    def lanes(self) -> int:
        """Lanes the next check opens (public: every party folds the same shapes)."""
        return sum(g.lanes().size for g in self._groups.values())

    def add(self, label: CheckLabel, z: np.ndarray, *, max_valuation: int, coins: bytes,
            weak: np.ndarray | None = None) -> None:
        """Fold shares ``z`` of terms that must be 0 into ``label``'s lanes (local, no messages).

        Args:
            max_valuation: every nonzero term outside ``weak`` has 2-adic valuation at most this.
            coins: public bytes the terms were fixed before (keys the coefficients).
            weak: public mask of terms that may have any valuation.
        """
        z = np.ascontiguousarray(z, dtype=np.int64).reshape(-1)
        if z.size == 0:
            return
        group = self._groups.setdefault(label, _Group())
        key = coins[:16]
        ident = self._folds
        self._folds += 1
        strong = z if weak is None else z[~weak]
        if strong.size:
            sigma = strong_lanes(max_valuation)
            if group.strong.size < sigma:
                group.strong = np.concatenate([group.strong, np.zeros(sigma - group.strong.size, _U64)])
            _fold(group.strong[:sigma], strong, Stream(key, 2 * ident), odd=True)
        if weak is not None and weak.any():
            if group.weak is None:
                group.weak = np.zeros(WEAK_LANES, _U64)
            _fold(group.weak, z[weak], Stream(key, 2 * ident + 1), odd=False)
        group.terms += z.size

    def run(self, ctx: "Context") -> list[tuple[CheckLabel, int]]:
        """Check every pending group (2 rounds if any, else none); returns the groups that failed
        with their term counts, and clears them all."""
        groups = list(self._groups.items())
        self._groups = {}
        sizes = [g.lanes().size for _, g in groups]
        total = sum(sizes)
        if total == 0:
            return []
        lanes = np.concatenate([g.lanes() for _, g in groups]).view(np.int64)
        a, b, c = ctx.dealer.get("triple", {"op": "mul", "a": [total], "b": [total]})
        (eta,) = ctx.comm.open([lanes - a])
        bs = c + eta * b
        (masked,) = ctx.comm.open([2 * bs + lanes])
        failed, at = [], 0
        for (label, group), size in zip(groups, sizes):
            if masked[at : at + size].any():
                failed.append((label, group.terms))
            at += size
        return failed
