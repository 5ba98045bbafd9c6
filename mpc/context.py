"""A party's view of one computation: rank, communicator, dealer, seeds, inputs.

Set-up (:func:`setup_party`, :func:`setup_dealer`) runs once per computation:
the dealer sends each party its 128-bit dealer seed, and each pair of parties
agrees on a pairwise seed (the lower rank draws it and sends it).  Set-up
traffic is not counted in the statistics.

Inputs are shared without sending shares: for input number k, every non-owner
j takes its share from the stream (seed_{owner,j}, k) and the owner takes
x minus all of those.  The owner only tells the others the shape (one small
message each, one round); nobody but the owner passes the value or the shape.

Comparisons in a domain narrower than 64 bits leave terms behind that must
be 0 (:mod:`mpc.protocols.drelu`); :meth:`Context.check_comparisons` tests
them all in 2 rounds and raises :class:`~mpc.errors.ComparisonOverflow` (or
:class:`~mpc.errors.ApproximationRangeError`) if one is not.
``SharedTensor.reveal`` runs it first, so no result leaves the protocol
unchecked.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .comm import Communicator
from .dealer import DealerClient
from .errors import ApproximationRangeError, ComparisonOverflow, ProtocolError
from .protocols.drelu import check_comparison_options, check_comparison_slack
from .protocols.zerocheck import CheckLabel, ZeroCheck
from .prg import SEED_BYTES, Stream, new_seed
from .ring import DEFAULT_FRAC_BITS, encode

if TYPE_CHECKING:
    from .private import PrivateTensor
    from .tensor import SharedTensor

__all__ = ["Context", "setup_party", "setup_dealer", "MAX_INPUT_ELEMENTS"]

_MAX_DIMS = 8
#: largest input a party accepts to share (elements); guards against a hostile shape
MAX_INPUT_ELEMENTS = 1 << 31
# Stream ids under pairwise seeds are domain-separated by a tag in the top byte.
_INPUT_TAG = 1 << 56
_RANDOM_TAG = 2 << 56


class Context:
    """What a party program receives: ``rank``, ``parties``, ``share()``, ``stats()``."""

    def __init__(
        self,
        comm: Communicator,
        dealer_seed: bytes,
        pair_seeds: dict[int, bytes],
        *,
        frac_bits: int = DEFAULT_FRAC_BITS,
        truncation: str = "exact",
        comparison: str = "auto",
        comparison_bits: int = 64,
        comparison_slack_bits: int = 0,
    ):
        if truncation not in ("exact", "local"):
            raise ValueError(f"truncation must be 'exact' or 'local', got {truncation!r}")
        if truncation == "local" and comm.parties != 2:
            raise ValueError("truncation='local' needs exactly 2 parties; use 'exact'")
        self.comm = comm
        self.dealer = DealerClient(comm, dealer_seed)
        self._pair_seeds = pair_seeds
        self.frac_bits = frac_bits
        self.truncation = truncation
        # Comparison protocol ("auto" = "fss" for 2 parties, else "generic") and its
        # domain: compared differences must satisfy |d| < 2^(comparison_bits - 1).
        self.comparison, self.comparison_bits = check_comparison_options(comparison, comparison_bits, comm.parties)
        # Low bits left out of comparisons (0 = exact): fewer levels, smaller keys.
        self.comparison_slack_bits = check_comparison_slack(comparison_slack_bits, comparison_bits)
        self._inputs = 0
        self._randoms = 0
        self._privates = 0
        #: terms that must be 0, pending until :meth:`check_comparisons`
        self.checks = ZeroCheck()
        self._scopes: list[str] = []

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def parties(self) -> int:
        return self.comm.parties

    def stats(self) -> dict[str, int]:
        """Bytes and rounds so far: ``bytes_sent``, ``bytes_received``, ``rounds``, ``dealer_bytes``, ..."""
        return self.comm.stats.as_dict()

    # -- the deferred comparison check ------------------------------------------------------
    @contextmanager
    def comparison_scope(self, name: str) -> Iterator[None]:
        """Name the comparisons made inside (nested names join with "/"), so that a failed
        check says where: ``with ctx.comparison_scope("layer3.relu"): ...``.  Local, free."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a comparison scope needs a non-empty name, got {name!r}")
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    @property
    def scope(self) -> str | None:
        """The current comparison scope ("/"-joined), or None."""
        return "/".join(self._scopes) if self._scopes else None

    def check_label(self, kind: str, *detail: Any) -> CheckLabel:
        """The group label for terms of ``kind`` made now (in the current scope)."""
        return CheckLabel(kind, self.scope, tuple(detail))

    @property
    def pending_checks(self) -> int:
        """Comparison (and range) terms made since the last check."""
        return self.checks.pending

    def check_comparisons(self) -> None:
        """Check that every comparison since the last check stayed in its domain, and every
        approximation's input in its range.

        2 rounds and 16 (n-1) B per lane (a few lanes per scope) if anything is
        pending, nothing otherwise; see :mod:`mpc.protocols.zerocheck`.  Every
        party calls it at the same point (``reveal`` does).

        Raises:
            ComparisonOverflow: a compared value left its domain (its results
                are wrong; nothing was revealed).
            ApproximationRangeError: an approximation's input left its range.
        """
        failed = self.checks.run(self)
        overflows = [(label, n) for label, n in failed if label.kind == "comparison"]
        if overflows:
            raise ComparisonOverflow(
                domain_bits=min(label.detail[0] for label, _ in overflows),
                scopes=tuple(dict.fromkeys(label.scope for label, _ in overflows)),
                comparisons=sum(n for _, n in overflows),
            )
        if failed:
            label = failed[0][0]
            function, low, high = label.detail
            same = [(lab, n) for lab, n in failed if lab.detail == label.detail]
            raise ApproximationRangeError(
                function, low, high, tuple(dict.fromkeys(lab.scope for lab, _ in same)), sum(n for _, n in same)
            )

    def share(self, value: Any, owner: int, *, frac_bits: int | None = None) -> "SharedTensor":
        """Secret-share ``value`` held by party ``owner``; other parties pass ``None``.

        Reals are encoded at ``frac_bits`` (default: the context's) fractional bits.
        """
        from .tensor import SharedTensor

        scale = self.frac_bits if frac_bits is None else frac_bits
        ring, shape = self._announce(value, owner, scale)
        stream_id = _INPUT_TAG | self._inputs
        self._inputs += 1
        if self.rank == owner:
            share = ring.copy()
            for p in self.comm.peers:
                share -= Stream(self._pair_seeds[p], stream_id).ring(shape)
        else:
            share = Stream(self._pair_seeds[owner], stream_id).ring(shape)
        return SharedTensor(self, share, scale)

    def private(self, value: Any, owner: int, *, frac_bits: int | None = None) -> "PrivateTensor":
        """A tensor party ``owner`` keeps in the clear (others pass ``None`` and learn its shape).

        Products of shared tensors with it use the cheaper owned-operand
        protocol (:mod:`mpc.protocols.owned`).  One round: the shape header.
        """
        from .private import PrivateTensor

        scale = self.frac_bits if frac_bits is None else frac_bits
        ring, shape = self._announce(value, owner, scale)
        return PrivateTensor(self, owner, ring, shape, scale, self._next_private_id())

    def _announce(self, value: Any, owner: int, scale: int) -> tuple[np.ndarray | None, tuple[int, ...]]:
        """The owner encodes ``value`` and tells everyone its shape (one round)."""
        if not 0 <= owner < self.parties:
            raise ValueError(f"owner {owner} is not a party (0..{self.parties - 1})")
        if self.rank == owner:
            if value is None:
                raise ValueError(f"party {owner} owns this input but passed None")
            ring = encode(value, scale)
            if ring.ndim > _MAX_DIMS:
                raise ValueError(f"inputs may have at most {_MAX_DIMS} dimensions, got {ring.ndim}")
            header = np.zeros(_MAX_DIMS + 1, dtype=np.int64)
            header[0] = ring.ndim
            header[1 : 1 + ring.ndim] = ring.shape
            self.comm.exchange({p: header for p in self.comm.peers}, {})
            return ring, ring.shape
        (header,) = self.comm.exchange({}, {owner: ((_MAX_DIMS + 1,), np.int64)}).values()
        return None, _parse_shape(owner, header)

    def _next_private_id(self) -> int:
        ident = self._privates
        self._privates += 1
        return ident

    def private_ids(self, count: int) -> range:
        """``count`` fresh :class:`PrivateTensor` ids, never handed out before in this context.

        An id names the dealer's mask B of one private tensor; as ids are never
        reused, no two tensors (the weights of two models, or of one model
        loaded twice) are masked with the same B.  Every party must call this
        in the same order.
        """
        start = self._privates
        self._privates += int(count)
        return range(start, start + int(count))

    def zero_shares(self, shape: tuple[int, ...]) -> np.ndarray:
        """This party's share of a fresh sharing of zero (no communication)."""
        index = self._randoms
        self._randoms += 1
        out = np.zeros(shape, dtype=np.int64)
        for p, seed in self._pair_seeds.items():
            mask = Stream(seed, _RANDOM_TAG | index).ring(shape)
            if p > self.rank:
                out += mask
            else:
                out -= mask
        return out

    def close(self) -> None:
        self.dealer.stop()


def _parse_shape(owner: int, header: np.ndarray) -> tuple[int, ...]:
    ndim = int(header[0])
    if not 0 <= ndim <= _MAX_DIMS:
        raise ProtocolError(owner, f"input header claims {ndim} dimensions")
    shape = tuple(int(d) for d in header[1 : 1 + ndim])
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=object)) > MAX_INPUT_ELEMENTS:
        raise ProtocolError(owner, f"input shape {shape} is negative or larger than {MAX_INPUT_ELEMENTS} elements")
    if header[1 + ndim :].any():
        raise ProtocolError(owner, "input header has data past its dimensions")
    return shape


def setup_party(comm: Communicator, **options: Any) -> Context:
    """Receive the dealer seed and agree on pairwise seeds; returns a ready context."""
    dealer_seed = comm.recv_raw(comm.dealer, (SEED_BYTES,), np.uint8).tobytes()
    pair_seeds: dict[int, bytes] = {}
    for p in comm.peers:
        if comm.rank < p:
            seed = new_seed()
            pair_seeds[p] = seed
            comm.send_raw(p, np.frombuffer(seed, dtype=np.uint8))
    for p in comm.peers:
        if p < comm.rank:
            pair_seeds[p] = comm.recv_raw(p, (SEED_BYTES,), np.uint8).tobytes()
    comm.reset_stats()
    return Context(comm, dealer_seed, pair_seeds, **options)


def setup_dealer(comm: Communicator) -> list[bytes]:
    """Draw and send every party's dealer seed; returns them in rank order."""
    seeds = [new_seed() for _ in range(comm.parties)]
    for rank, seed in enumerate(seeds):
        comm.send_raw(rank, np.frombuffer(seed, dtype=np.uint8))
    return seeds
