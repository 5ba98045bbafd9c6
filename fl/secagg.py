"""Secure aggregation with pairwise masks: the hub learns the sum of the updates and nothing else.

This is the protocol of Bonawitz et al. (CCS 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", section 4) for a
semi-honest hub and semi-honest, non-colluding nodes, with the recovery of
dropped nodes done by the survivors revealing their pair seeds directly
(no Shamir sharing, so a node that drops *after* the hub fixed the set of
included updates fails the round instead of being recovered).  Optionally
(``aggregation.neighbours`` = k >= 2) each node masks only with its partners
on a k-connected Harary graph G (SecAgg+, Bell et al. CCS 2020): see
:func:`mask_graph`; by default G is the complete graph.

Notation: nodes i in the roster R, update u_i (float32 vector of length m),
weight w_i (Σ w_i = 1 over the nodes asked to train), f = ``frac_bits``, the
ring Z_2^k with k = ``ring_bits`` (32 or 64).  PRG(s) is the AES-128-CTR
keystream of :class:`mpc.prg.Stream` under seed s, read as ring elements.

Stages, per round:

1. **keys** (node -> hub, 32 B): asked by the hub at the start of the round,
   each node draws a fresh X25519 key pair and a 128-bit self-mask seed b_i
   (``mpc.prg.new_seed``) and sends its public key.
2. **roster** (hub -> node, 32 B per node): the hub fixes R, the nodes whose key
   arrived, and sends every public key to every node in R, just before the
   global weights, so nodes expand their masks while the weights arrive and
   while they train (:meth:`NodeSecAgg.expand_masks`).
3. **masked** (node -> hub, m * k/8 B): node i derives, for every partner j of
   i in G (every other j in R by default), the pair seed
   s_ij = HKDF-SHA256(X25519(sk_i, pk_j), context) (both ends get the same
   seed; the hub never sees it) and uploads

       y_i = encode_f(w_i u_i) + PRG(b_i) + Σ_{j in G(i), j > i} PRG(s_ij) - Σ_{j in G(i), j < i} PRG(s_ij)   (mod 2^k)

   Every pair mask appears once with each sign, so it cancels in a sum over R.
   The masks are summed a cache-sized piece at a time while the node trains
   (:meth:`NodeSecAgg.expand_masks`); after training one numba pass checks the
   range, encodes and adds them.
4. **unmask** (hub -> node, then node -> hub, 16 B + 16 B per dropped node): the
   hub fixes U, the nodes whose y_i arrived, and D = R \\ U, and fails the round
   if G restricted to U is not connected (unmasking would reveal each part's
   sum).  Each node in U checks U ∪ D = R, U ∩ D = ∅, |U| >= 2, G restricted
   to U connected, that it has not revealed before this round, and replies
   with b_i and s_id for every partner d in D.  The hub computes

       Σ_{i in U} y_i - Σ_{i in U} PRG(b_i) - Σ_{i in U, d in D ∩ G(i)} ±PRG(s_id) = encode_f(Σ_{i in U} w_i u_i)

   and divides the decoded sum by Σ_{i in U} w_i.

Bytes per node per round: 32 up, 32·|R| down, m·k/8 up (with k = 32, the size
of a float32 update: 1.0x plain FedAvg), 16·(1 + |D ∩ G(i)|) up.  Without dropouts the
only overhead over plain FedAvg is 48 + 32·|R| bytes.

Why each piece (the hub's view of y_i alone is uniform: y_i is masked by PRG(b_i)):
- pair masks hide y_i once b_i is revealed; they cancel in the sum; over the
  edges of a connected G[U] they span every zero-sum vector, so the survivors'
  uploads minus every mask the hub knows are uniform given their sum;
- self masks b_i keep a late-arriving y_d hidden after the pair seeds of the
  dropped node d have been revealed: b_d is never revealed, since d ∉ U;
- a node reveals at most once per round, and never both b_i and pair seeds
  with a node in U, so the hub never holds all masks of any single update.

Dealer masking (``aggregation.masking = 'dealer'``, PriMIA's crypto provider): node i
derives s_i = HKDF-SHA256(X25519(sk_i, pk_D), context, i) with the round's dealer key
pk_D (which the roster carries) and uploads y_i = encode_f(w_i u_i) + PRG(s_i); nodes
reveal nothing.  The dealer (:class:`DealerSecAgg`, which derives the same s_i from the
roster) sends the hub Σ_{i in U} PRG(s_i) once, and the hub decodes Σ_U y_i minus it.
The update is additively shared between hub (y_i) and dealer (s_i); the dealer never
sees y_i.  One stream per node instead of one per partner; needs a dealer that does not
collude with the hub.

Fixed point: u_i is encoded with ``mpc.ring.encode`` at f fractional bits and
reduced mod 2^k.  Each node checks max|u_i| < 2^(k-2-f) so that the weighted sum
cannot wrap; the error of the mean is at most |U| · 2^-(f+1) / Σ_{i in U} w_i per entry.
"""

from __future__ import annotations

import enum
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mpc.errors import EncodingRangeError, ProtocolError
from mpc.prg import SEED_BYTES, new_seed
from mpc.ring import decode

from .errors import NodeDropped, RoundFailed, TooFewNodes

__all__ = [
    "Stage",
    "PUBLIC_KEY_BYTES",
    "RING_DTYPES",
    "encode_update",
    "decode_sum",
    "prg_mask",
    "mask_graph",
    "components",
    "update_limit",
    "NodeSecAgg",
    "HubSecAgg",
    "DealerSecAgg",
    "PAIRWISE",
    "DEALER",
    "MASKINGS",
]

PUBLIC_KEY_BYTES = 32
#: ``aggregation.masking``: pair masks between the nodes (Bonawitz et al.), or one mask per node
#: that a dealer (crypto provider) removes from the sum (PriMIA's design)
PAIRWISE = "pairwise"
DEALER = "dealer"
MASKINGS = (PAIRWISE, DEALER)
RING_DTYPES: dict[int, np.dtype] = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
_SIGNED = {32: np.int32, 64: np.int64}
# Stream ids under a seed: masks use stream 0 (each seed is fresh per round and per use).
_MASK_STREAM = 0
# Values per piece when encoding and masking: 512 KiB of float64 temporaries stay in cache and
# below malloc's mmap threshold (larger pieces measured 5x slower here).  A multiple of 4, so that
# a stream read in pieces equals one long read (16-byte AES blocks).
_CHUNK = 1 << 16
# Values per piece when expanding masks (the keystream piece and the accumulator piece, 2 x 512 KiB
# for 32-bit rings, stay in L2/L3): 128 Ki measured ~10 % less CPU than 64 Ki or 1 Mi here.
_MASK_CHUNK = 1 << 17
_HKDF_INFO = b"primia/secagg/pair-seed/v1"
_DEALER_INFO = b"primia/secagg/dealer-seed/v1"
_AES_BLOCK = 16
_ZEROS = bytes(_MASK_CHUNK * 8)  # the plaintext of a piece of keystream (64-bit ring)


class Stage(enum.Enum):
    """Where a round of secure aggregation stands (the same names on the hub and the nodes)."""

    KEYS = "keys"
    MASKED = "masked"
    UNMASK = "unmask"
    DONE = "done"


def update_limit(frac_bits: int, ring_bits: int) -> float:
    """Largest |update entry| (exclusive) a node may mask: the weighted sum then cannot wrap."""
    return float(2 ** (ring_bits - 2 - frac_bits))


def _chunks(length: int) -> range:
    return range(0, length, _CHUNK)


def _encode_add_kernel():
    """The numba kernel behind :func:`encode_update` and :meth:`NodeSecAgg.mask`, compiled on first use."""
    global _ENCODE_ADD
    if _ENCODE_ADD is None:
        from numba import njit

        @njit(cache=True, nogil=True)
        def encode_add(values, weight, scale, limit, acc):  # pragma: no cover - compiled
            # acc[i] += rint(float64(values[i]) * weight * 2^f) mod 2^k, in one pass; the same float64
            # operations in the same order as mpc.ring.encode(values * weight), so the same ring
            # elements.  Returns the index of the first entry outside (-limit, limit) (or NaN), else -1.
            for i in range(values.size):
                v = np.float64(values[i])
                if not (v < limit and v > -limit):
                    return i
                acc[i] += np.uint64(np.int64(np.rint((v * weight) * scale)))
            return -1

        _ENCODE_ADD = encode_add
    return _ENCODE_ADD


_ENCODE_ADD = None


def _encode_add(update: np.ndarray, weight: float, acc: np.ndarray, frac_bits: int, ring_bits: int) -> None:
    """acc += encode_f(weight · update) (mod 2^ring_bits), checking the range on the way.

    Raises:
        EncodingRangeError: an entry is not finite or |entry| >= :func:`update_limit`; ``acc`` is
            then partly updated (callers discard it).
    """
    values = np.ascontiguousarray(update).reshape(-1)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    if not acc.flags.c_contiguous:
        raise ValueError("the encoding is added in place to a contiguous array")
    limit = update_limit(frac_bits, ring_bits)
    bad = _encode_add_kernel()(values, float(weight), float(2**frac_bits), limit, acc.reshape(-1))
    if bad >= 0:
        raise EncodingRangeError(float(values[bad]), limit, frac_bits)


def encode_update(update: np.ndarray, weight: float, *, frac_bits: int, ring_bits: int) -> np.ndarray:
    """encode_f(weight · update) in Z_2^ring_bits, as unsigned integers.

    Raises:
        EncodingRangeError: an entry is not finite or |entry| >= :func:`update_limit`.
    """
    update = np.asarray(update)
    out = np.zeros(update.shape, dtype=RING_DTYPES[ring_bits])
    _encode_add(update, weight, out, frac_bits, ring_bits)
    return out


def decode_sum(total: np.ndarray, *, frac_bits: int, ring_bits: int, scale: float = 1.0) -> np.ndarray:
    """Read a ring sum as signed fixed point and decode it to float64, times ``scale``."""
    signed = total.view(_SIGNED[ring_bits]).reshape(-1)
    out = np.empty(signed.shape, dtype=np.float64)
    for start in _chunks(signed.size):
        stop = start + _CHUNK
        out[start:stop] = decode(signed[start:stop].astype(np.int64), frac_bits)
        out[start:stop] *= scale
    return out.reshape(total.shape)


class _MaskStream:
    """PRG(seed) — the AES-128-CTR keystream of ``mpc.prg.Stream(seed, 0)`` — read as ring elements
    from element ``start`` on, piece by piece, with one cipher context (the keystream continues
    across pieces, so pieces of any length equal one long draw)."""

    def __init__(self, seed: bytes, ring_bits: int, start: int = 0):
        offset = start * (ring_bits // 8)
        if offset % _AES_BLOCK:
            raise ValueError(f"a mask stream can start only at a {_AES_BLOCK}-byte boundary, not element {start}")
        counter = ((_MASK_STREAM << 64) + offset // _AES_BLOCK) % (1 << 128)
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
        self._dtype = RING_DTYPES[ring_bits]

    def into(self, out: np.ndarray) -> None:
        """Overwrite ``out`` (contiguous, of the ring's dtype) with the next ``out.size`` elements."""
        view = memoryview(out).cast("B")
        self._enc.update_into(_ZEROS[: len(view)], view)

    def take(self, count: int) -> np.ndarray:
        out = np.empty(count, dtype=self._dtype)
        for start in range(0, count, _MASK_CHUNK):
            self.into(out[start : start + _MASK_CHUNK])
        return out


def prg_mask(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """``length`` uniform elements of Z_2^ring_bits from the AES-CTR stream of ``seed``."""
    return _MaskStream(seed, ring_bits).take(length)


def _apply_masks_range(acc: np.ndarray, masks: Sequence[tuple[bytes, int]], ring_bits: int, lo: int, hi: int,
                       overwrite: bool, decode_into: np.ndarray | None, decode_scale: float) -> None:
    """acc[lo:hi] (+)= Σ sign · PRG(seed)[lo:hi], a cache-sized piece at a time: each piece of every
    stream is generated into a scratch buffer and added while both are in cache.  With ``overwrite``
    the first mask (sign +1) is written straight into acc instead of being added; with
    ``decode_into``, each finished piece is also decoded there (signed, times ``decode_scale``)."""
    if hi <= lo:
        return
    streams = [(_MaskStream(seed, ring_bits, lo), sign) for seed, sign in masks]
    scratch = np.empty(min(_MASK_CHUNK, hi - lo), dtype=acc.dtype)
    signed = _SIGNED[ring_bits]
    for start in range(lo, hi, _MASK_CHUNK):
        piece = acc[start : min(start + _MASK_CHUNK, hi)]
        buf = scratch[: piece.size]
        for index, (stream, sign) in enumerate(streams):
            if overwrite and index == 0:
                stream.into(piece)
                continue
            stream.into(buf)
            _apply(piece, buf, sign)
        if decode_into is not None:
            out = decode_into[start : start + piece.size]
            np.multiply(piece.view(signed), decode_scale, out=out, dtype=np.float64)


def _apply_masks(acc: np.ndarray, masks: Sequence[tuple[bytes, int]], ring_bits: int, *, overwrite: bool = False,
                 threads: int = 1, decode_into: np.ndarray | None = None, decode_scale: float = 1.0) -> None:
    """acc += Σ sign · PRG(seed) over ``masks`` (or acc = ..., with ``overwrite`` and a first sign of +1);
    with ``decode_into``, also decode_into = signed(acc) · decode_scale, piece by piece.

    ``threads`` > 1 splits acc into that many ranges expanded side by side (AES-CTR can start
    anywhere; cryptography and numpy release the GIL for most of the work)."""
    if overwrite and (not masks or masks[0][1] != 1):
        raise ValueError("overwrite needs a first mask with sign +1")
    if not acc.flags.c_contiguous:
        raise ValueError("masks are applied in place to a contiguous array")
    flat = acc.reshape(-1)
    out = None if decode_into is None else decode_into.reshape(-1)
    if threads <= 1 or flat.size < 4 * _MASK_CHUNK:
        _apply_masks_range(flat, masks, ring_bits, 0, flat.size, overwrite, out, decode_scale)
        return
    bounds = [flat.size * t // threads // _MASK_CHUNK * _MASK_CHUNK for t in range(threads)] + [flat.size]
    pool = _hub_pool(threads)
    futures = [pool.submit(_apply_masks_range, flat, masks, ring_bits, lo, hi, overwrite, out, decode_scale)
               for lo, hi in zip(bounds, bounds[1:])]
    for future in futures:
        future.result()


_POOL: ThreadPoolExecutor | None = None


def _hub_pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers < threads:  # noqa: SLF001 - grow on demand
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="primia-unmask")
    return _POOL


def mask_graph(names: Sequence[str], neighbours: int) -> dict[str, frozenset[str]]:
    """Who masks with whom: each node's pair-mask partners among ``names``.

    ``neighbours`` = 0, or at least ``len(names) - 1``: the complete graph (Bonawitz et al.).
    Otherwise the Harary graph H(k, n) on the names in sorted order, k = ``neighbours``
    (SecAgg+, Bell et al. CCS 2020, with a deterministic k-connected graph instead of a random
    one): node i pairs with i ± 1, ..., i ± k/2 (mod n), and for odd k also with the node
    opposite it.  Every node has at least k partners and the graph stays connected after
    removing any k − 1 nodes.  Hub and nodes compute the same graph from the roster.
    """
    order = sorted(names)
    n = len(order)
    if neighbours == 1 or neighbours < 0:
        raise ValueError(f"neighbours must be 0 (every other node) or at least 2, got {neighbours}")
    if neighbours == 0 or neighbours >= n - 1:
        return {a: frozenset(b for b in order if b != a) for a in order}
    edges: set[tuple[int, int]] = set()

    def link(i: int, j: int) -> None:
        i, j = i % n, j % n
        if i != j:
            edges.add((min(i, j), max(i, j)))

    for i in range(n):
        for step in range(1, neighbours // 2 + 1):
            link(i, i + step)
    if neighbours % 2:
        if n % 2 == 0:
            for i in range(n // 2):
                link(i, i + n // 2)
        else:
            for i in range((n + 1) // 2):
                link(i, i + (n + 1) // 2)
    graph: dict[str, set[str]] = {a: set() for a in order}
    for i, j in edges:
        graph[order[i]].add(order[j])
        graph[order[j]].add(order[i])
    return {a: frozenset(peers) for a, peers in graph.items()}


def components(graph: Mapping[str, frozenset[str]], nodes: Sequence[str]) -> list[list[str]]:
    """The connected components of ``graph`` restricted to ``nodes`` (sorted lists, sorted by first name)."""
    left, found = set(nodes), []
    while left:
        first = min(left)
        seen, todo = {first}, [first]
        while todo:
            for peer in graph[todo.pop()]:
                if peer in left and peer not in seen:
                    seen.add(peer)
                    todo.append(peer)
        left -= seen
        found.append(sorted(seen))
    return sorted(found)


def _pair_seed(secret: X25519PrivateKey, peer_public: bytes, context: bytes, a: str, b: str) -> bytes:
    shared = secret.exchange(X25519PublicKey.from_public_bytes(peer_public))
    lo, hi = sorted((a, b))
    info = b"|".join([_HKDF_INFO, context, lo.encode(), hi.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def _dealer_seed(secret: X25519PrivateKey, peer_public: bytes, context: bytes, node: str) -> bytes:
    """s_i, the seed node i shares with the dealer: both ends derive it, the hub never sees it."""
    shared = secret.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = b"|".join([_DEALER_INFO, context, node.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def _public_bytes(secret: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return secret.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_key(owner: str, key: Any, peer: str = "hub") -> None:
    if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
        raise ProtocolError(peer, f"the public key of {owner!r} is not {PUBLIC_KEY_BYTES} bytes")


def _sign(me: str, other: str) -> int:
    """+1 if ``me`` adds the pair mask with ``other``, -1 if it subtracts it."""
    return 1 if me < other else -1


def _apply(acc: np.ndarray, mask: np.ndarray, sign: int) -> None:
    if sign > 0:
        acc += mask
    else:
        acc -= mask


# -- node side ------------------------------------------------------------------------


@dataclass
class NodeSecAgg:
    """One node's secure-aggregation state for one round.

    Call order: :meth:`public_key` (stage keys), :meth:`set_roster`, optionally
    :meth:`expand_masks` ahead of time, :meth:`mask`, and :meth:`reveal` (once,
    when the hub asks to unmask).  ``neighbours`` is ``aggregation.neighbours``
    (see :func:`mask_graph`; 0: pair with every other node).  With ``masking`` =
    :data:`DEALER` the node's only mask is PRG(s_i), s_i shared with the dealer
    (:meth:`set_roster` takes the dealer's key), and it never reveals anything.
    """

    node: str
    context: bytes  # binds the pair seeds to (run, round, attempt)
    frac_bits: int
    ring_bits: int
    neighbours: int = 0
    masking: str = PAIRWISE
    _secret: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _self_seed: bytes = field(default_factory=new_seed, repr=False)
    roster: dict[str, bytes] | None = None
    graph: dict[str, frozenset[str]] | None = field(default=None, repr=False)
    stage: Stage = Stage.KEYS
    _mask_sum: np.ndarray | None = field(default=None, repr=False)
    _dealer_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")

    def public_key(self) -> bytes:
        return _public_bytes(self._secret)

    def _expect(self, *stages: Stage) -> None:
        if self.stage not in stages:
            raise ProtocolError("hub", f"secure aggregation is at stage {self.stage.value}, not {stages[0].value}")

    @property
    def peers(self) -> frozenset[str]:
        """The nodes this node shares pair masks with (after :meth:`set_roster`)."""
        assert self.graph is not None
        return self.graph[self.node]

    def set_roster(self, roster: Mapping[str, bytes], dealer_key: bytes | None = None) -> None:
        """Stage 2: the public keys of every node in the round (this node's included), and with
        dealer masking the dealer's public key for this round."""
        self._expect(Stage.KEYS)
        if roster.get(self.node) != self.public_key():
            raise ProtocolError("hub", "the roster does not hold this node's public key")
        for name, key in roster.items():
            _check_key(name, key)
        if self.masking == DEALER:
            if dealer_key is None:
                raise ProtocolError("hub", "the roster lacks the dealer's public key (aggregation.masking = 'dealer')")
            _check_key("dealer", dealer_key)
            self._dealer_key = dealer_key
            self.graph = {name: frozenset() for name in roster}
        else:
            if dealer_key is not None:
                raise ProtocolError("hub", "sent a dealer key, but this run masks pairwise")
            self.graph = mask_graph(list(roster), self.neighbours)
        self.roster = dict(roster)
        self.stage = Stage.MASKED

    def _masks(self) -> list[tuple[bytes, int]]:
        if self.masking == DEALER:
            assert self._dealer_key is not None
            try:
                return [(_dealer_seed(self._secret, self._dealer_key, self.context, self.node), 1)]
            except ValueError as exc:  # cryptography refuses low-order points
                raise ProtocolError("hub", f"the dealer's public key is invalid: {exc}") from exc
        return [(self._self_seed, 1)] + [(self._seed_with(j), _sign(self.node, j)) for j in sorted(self.peers)]

    def _seed_with(self, other: str) -> bytes:
        assert self.roster is not None
        try:
            return _pair_seed(self._secret, self.roster[other], self.context, self.node, other)
        except ValueError as exc:  # cryptography refuses low-order points
            raise ProtocolError("hub", f"the public key of {other!r} is invalid: {exc}") from exc

    def expand_masks(self, size: int) -> None:
        """PRG(b_i) ± PRG(s_ij) for every partner j, summed: the slow part of stage 3, which does not
        depend on the update, so a node can run it while it trains."""
        self._expect(Stage.MASKED)
        masks = self._masks()
        total = np.empty(size, dtype=RING_DTYPES[self.ring_bits])
        _apply_masks(total, masks, self.ring_bits, overwrite=True)  # the self mask is written, the rest added
        self._mask_sum = total

    def mask(self, update: np.ndarray, weight: float) -> np.ndarray:
        """Stage 3: y_i = encode(w_i u_i) + PRG(b_i) ± PRG(s_ij) for every partner j in the roster."""
        self._expect(Stage.MASKED)
        update = np.asarray(update).reshape(-1)
        if self._mask_sum is None or self._mask_sum.size != update.size:
            self.expand_masks(update.size)
        masked, self._mask_sum = self._mask_sum, None  # a mask is used once
        assert masked is not None
        _encode_add(update, weight, masked, self.frac_bits, self.ring_bits)  # in place, one pass
        return masked

    def reveal(self, included: list[str], dropped: list[str]) -> tuple[bytes, dict[str, bytes]]:
        """Stage 4: this node's self seed and its pair seeds with its dropped partners, once.

        Raises:
            ProtocolError: the sets do not partition the roster, this node is not
                included, fewer than two updates would be summed, the masking
                graph among the included nodes is not connected (the hub would
                learn partial sums), or this node already revealed this round.
        """
        self._expect(Stage.MASKED)
        assert self.roster is not None and self.graph is not None
        if self.masking == DEALER:
            raise ProtocolError("hub", "asked for seeds, but with aggregation.masking = 'dealer' the dealer removes "
                                       "the masks and nodes reveal nothing")
        inc, drop = set(included), set(dropped)
        if len(inc) != len(included) or len(drop) != len(dropped) or inc & drop or inc | drop != set(self.roster):
            raise ProtocolError("hub", "the included and dropped nodes do not partition the round's roster")
        if self.node not in inc:
            raise ProtocolError("hub", "asked to unmask a round this node is not included in")
        if len(inc) < 2:
            raise ProtocolError("hub", "refusing to unmask: the sum would be this node's update alone")
        parts = components(self.graph, sorted(inc))
        if len(parts) > 1:
            raise ProtocolError("hub", f"refusing to unmask: the included nodes' masking graph falls apart into {parts}")
        self.stage = Stage.DONE  # never twice: a second reveal could expose a single update
        pair_seeds = {d: self._seed_with(d) for d in sorted(drop & self.peers)}
        return self._self_seed, pair_seeds


# -- hub side --------------------------------------------------------------------------


@dataclass
class HubSecAgg:
    """The hub's secure-aggregation state for one round.

    Args:
        round: round number (for errors).
        weights: each invited node's weight w_i.
        size: update length m.
        min_nodes: fewest updates the round may sum (at least 2).
        neighbours: ``aggregation.neighbours`` (see :func:`mask_graph`).
        threads: threads that remove the masks in :meth:`result`.
        masking: :data:`PAIRWISE` (the survivors reveal seeds) or :data:`DEALER` (the dealer
            sends Σ_U PRG(s_i), :meth:`add_mask_sum`).
    """

    round: int
    weights: Mapping[str, float]
    size: int
    frac_bits: int
    ring_bits: int
    min_nodes: int
    neighbours: int = 0
    threads: int = 2
    masking: str = PAIRWISE
    public_keys: dict[str, bytes] = field(default_factory=dict)
    roster: dict[str, bytes] | None = None
    graph: dict[str, frozenset[str]] | None = field(default=None, repr=False)
    stage: Stage = Stage.KEYS
    uploaded: set[str] = field(default_factory=set)
    included: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    revealed: dict[str, tuple[bytes, dict[str, bytes]]] = field(default_factory=dict)
    _total: np.ndarray | None = field(default=None, repr=False)
    _mask_sum: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")

    def _expect(self, node: str, stage: Stage) -> None:
        if self.stage is not stage:
            raise ProtocolError(node, f"sent a {stage.value} message while the round is at stage {self.stage.value}")

    def _need(self, stage_name: str, remaining: list[str]) -> None:
        if len(remaining) < max(self.min_nodes, 2):
            raise TooFewNodes(self.round, stage_name, sorted(remaining), max(self.min_nodes, 2))

    def add_public_key(self, node: str, key: bytes) -> None:
        self._expect(node, Stage.KEYS)
        if node not in self.weights:
            raise ProtocolError(node, "is not part of this round")
        if node in self.public_keys:
            raise ProtocolError(node, "sent its public key twice")
        if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
            raise ProtocolError(node, f"public key must be {PUBLIC_KEY_BYTES} bytes")
        self.public_keys[node] = key

    def keys_complete(self) -> bool:
        return set(self.public_keys) == set(self.weights)

    def close_keys(self) -> dict[str, bytes]:
        """Fix the roster R (the nodes whose key arrived) and return it for broadcasting."""
        self._expect("hub", Stage.KEYS)
        self._need(Stage.KEYS.value, list(self.public_keys))
        self.roster = dict(sorted(self.public_keys.items()))
        if self.masking == DEALER:
            self.graph = {name: frozenset() for name in self.roster}
        else:
            self.graph = mask_graph(list(self.roster), self.neighbours)
        self.stage = Stage.MASKED
        return self.roster

    def add_masked(self, node: str, masked: np.ndarray) -> None:
        """Fold a masked update into the running sum (wrapping in the ring)."""
        self._expect(node, Stage.MASKED)
        assert self.roster is not None
        if node not in self.roster:
            raise ProtocolError(node, "is not in this round's roster")
        if node in self.uploaded:
            raise ProtocolError(node, "sent its masked update twice")
        dtype = RING_DTYPES[self.ring_bits]
        if not isinstance(masked, np.ndarray) or masked.dtype != dtype or masked.shape != (self.size,):
            got = f"{getattr(masked, 'dtype', type(masked).__name__)} {getattr(masked, 'shape', '')}"
            raise ProtocolError(node, f"masked update must be {dtype} of shape ({self.size},), got {got}")
        if self._total is None:
            self._total = masked.copy()
        else:
            self._total += masked
        self.uploaded.add(node)

    def uploads_complete(self) -> bool:
        return self.roster is not None and self.uploaded == set(self.roster)

    def close_uploads(self) -> tuple[list[str], list[str]]:
        """Fix U (uploaded) and D (the rest of the roster); returns (U, D) to send to every node in U.

        Raises:
            TooFewNodes: fewer than ``min_nodes`` (or 2) updates arrived.
            RoundFailed: the masking graph among U is not connected: unmasking would reveal the
                sum of each part, so the round fails instead (only with ``neighbours`` > 0).
        """
        self._expect("hub", Stage.MASKED)
        assert self.roster is not None and self.graph is not None
        included = sorted(self.uploaded)
        self._need(Stage.MASKED.value, included)
        parts = components(self.graph, included) if self.masking == PAIRWISE else [included]
        if len(parts) > 1:
            raise RoundFailed(
                self.round, Stage.MASKED.value,
                f"the dropouts split the masking graph among the remaining nodes into {parts}; unmasking would "
                f"reveal each part's sum (aggregation.neighbours = {self.neighbours} survives any "
                f"{self.neighbours - 1} dropouts; raise it, or 0 pairs every node with every other)",
            )
        self.included, self.dropped = included, sorted(set(self.roster) - self.uploaded)
        self.stage = Stage.UNMASK
        return self.included, self.dropped

    def expected_pair_seeds(self, node: str) -> list[str]:
        """The dropped nodes whose pair seeds ``node`` must reveal: its dropped partners."""
        assert self.graph is not None
        return sorted(set(self.dropped) & self.graph[node])

    def add_reveal(self, node: str, self_seed: bytes, pair_seeds: Mapping[str, bytes]) -> None:
        self._expect(node, Stage.UNMASK)
        if node not in self.included:
            raise ProtocolError(node, "is not among the included nodes")
        if node in self.revealed:
            raise ProtocolError(node, "revealed twice")
        if not isinstance(self_seed, bytes) or len(self_seed) != SEED_BYTES:
            raise ProtocolError(node, f"self seed must be {SEED_BYTES} bytes")
        expected = self.expected_pair_seeds(node)
        if sorted(pair_seeds) != expected:
            raise ProtocolError(node, f"must reveal pair seeds for exactly the dropped nodes it masks with {expected}")
        for d, seed in pair_seeds.items():
            if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
                raise ProtocolError(node, f"pair seed for {d!r} must be {SEED_BYTES} bytes")
        self.revealed[node] = (self_seed, dict(pair_seeds))

    def add_mask_sum(self, peer: str, mask_sum: np.ndarray) -> None:
        """Dealer masking: Σ_{i in U} PRG(s_i) from the dealer, once."""
        self._expect(peer, Stage.UNMASK)
        if self.masking != DEALER:
            raise ProtocolError(peer, "sent a mask sum, but this round masks pairwise")
        if self._mask_sum is not None:
            raise ProtocolError(peer, "sent the mask sum twice")
        dtype = RING_DTYPES[self.ring_bits]
        if not isinstance(mask_sum, np.ndarray) or mask_sum.dtype != dtype or mask_sum.shape != (self.size,):
            got = f"{getattr(mask_sum, 'dtype', type(mask_sum).__name__)} {getattr(mask_sum, 'shape', '')}"
            raise ProtocolError(peer, f"mask sum must be {dtype} of shape ({self.size},), got {got}")
        self._mask_sum = mask_sum

    def reveals_complete(self) -> bool:
        """Everything needed to remove the masks has arrived (the reveals, or the dealer's sum)."""
        if self.stage is not Stage.UNMASK:
            return False
        if self.masking == DEALER:
            return self._mask_sum is not None
        return set(self.revealed) == set(self.included)

    def node_lost(self, node: str, reason: str) -> None:
        """A node disconnected; with pairwise masks fatal once the included set is fixed (with a
        dealer never: the dealer removes every included node's mask)."""
        if self.masking == DEALER:
            return
        if self.stage is Stage.UNMASK and node in self.included and node not in self.revealed:
            raise RoundFailed(
                self.round,
                Stage.UNMASK.value,
                f"{NodeDropped(node, Stage.UNMASK.value, reason)}; its update is in the sum but its self mask "
                "cannot be removed without it",
            )

    def result(self) -> tuple[np.ndarray, list[str]]:
        """Remove the masks; return (Σ_U w_i u_i / Σ_U w_i as float64, U)."""
        if not self.reveals_complete():
            raise RoundFailed(self.round, Stage.UNMASK.value, "not every included node revealed its seeds")
        assert self._total is not None
        total = self._total
        masks: list[tuple[bytes, int]] = []
        if self._mask_sum is not None:
            total -= self._mask_sum
            self._mask_sum = None
        for node in self.included if self.masking == PAIRWISE else ():
            self_seed, pair_seeds = self.revealed[node]
            masks.append((self_seed, -1))
            masks += [(seed, -_sign(node, d)) for d, seed in sorted(pair_seeds.items())]
        weight = sum(self.weights[n] for n in self.included)
        mean = np.empty(self.size, dtype=np.float64)
        # x / 2^f / weight: the power of two is exact, so this equals decode_sum(total, scale=1 / weight)
        scale = 1.0 / float(2**self.frac_bits) / weight
        _apply_masks(total, masks, self.ring_bits, threads=self.threads, decode_into=mean, decode_scale=scale)
        self._total = None
        self.stage = Stage.DONE
        return mean, list(self.included)


# -- dealer side -----------------------------------------------------------------------


@dataclass
class DealerSecAgg:
    """The dealer's state for one round of dealer-masked aggregation (``aggregation.masking = 'dealer'``).

    The dealer (crypto provider) never sees an update, masked or not: it derives
    s_i = HKDF(X25519(sk_D, pk_i), context, i) for every node i in the roster,
    expands Σ_{i in R} PRG(s_i) ahead (:meth:`expand`), and sends the hub
    Σ_{i in U} PRG(s_i) once, for the U the hub names (:meth:`mask_sum`).
    Call order: :meth:`public_key`, :meth:`set_roster`, optionally :meth:`expand`,
    :meth:`mask_sum`.

    Args:
        round: round number (for errors).
        context: the round's context from the hub, bound into every seed.
        size: update length m.
        ring_bits: 32 or 64.
        threads: threads that expand the masks.
    """

    round: int
    context: bytes
    size: int
    ring_bits: int
    threads: int = 2
    roster: dict[str, bytes] | None = None
    stage: Stage = Stage.KEYS
    _secret: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _seeds: dict[str, bytes] = field(default_factory=dict, repr=False)
    _sum: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.ring_bits not in RING_DTYPES:
            raise ProtocolError("hub", f"ring_bits must be 32 or 64, got {self.ring_bits}")
        if not 2 <= self.size <= 1 << 34:
            raise ProtocolError("hub", f"update size {self.size} is out of range")

    def public_key(self) -> bytes:
        return _public_bytes(self._secret)

    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise ProtocolError("hub", f"the dealer's round is at stage {self.stage.value}, not {stage.value}")

    def set_roster(self, roster: Mapping[str, bytes]) -> None:
        """The public keys of the round's nodes (R)."""
        self._expect(Stage.KEYS)
        if len(roster) < 2:
            raise ProtocolError("hub", f"a roster of {len(roster)} node(s): a sum needs at least two")
        seeds = {}
        for name, key in sorted(roster.items()):
            if not isinstance(name, str) or not name:
                raise ProtocolError("hub", "roster: node names must be non-empty strings")
            _check_key(name, key)
            try:
                seeds[name] = _dealer_seed(self._secret, key, self.context, name)
            except ValueError as exc:  # cryptography refuses low-order points
                raise ProtocolError("hub", f"the public key of {name!r} is invalid: {exc}") from exc
        self.roster, self._seeds = dict(roster), seeds
        self.stage = Stage.MASKED

    def expand(self) -> None:
        """Σ_{i in R} PRG(s_i): the slow part, done while the nodes train."""
        self._expect(Stage.MASKED)
        self._expand()

    def _expand(self) -> None:
        if self._sum is None:
            total = np.empty(self.size, dtype=RING_DTYPES[self.ring_bits])
            masks = [(seed, 1) for _, seed in sorted(self._seeds.items())]
            _apply_masks(total, masks, self.ring_bits, overwrite=True, threads=self.threads)
            self._sum = total

    def mask_sum(self, included: list[str], dropped: list[str]) -> np.ndarray:
        """Σ_{i in U} PRG(s_i) for U = ``included``, once per round.

        Raises:
            ProtocolError: the sets do not partition the roster, fewer than two nodes are
                included (the hub would learn one update), or the dealer already answered.
        """
        self._expect(Stage.MASKED)
        assert self.roster is not None
        inc, drop = set(included), set(dropped)
        if len(inc) != len(included) or len(drop) != len(dropped) or inc & drop or inc | drop != set(self.roster):
            raise ProtocolError("hub", "the included and dropped nodes do not partition the round's roster")
        if len(inc) < 2:
            raise ProtocolError("hub", "refusing to unmask: the sum would be one node's update alone")
        self.stage = Stage.DONE  # never twice: two sums over different sets would expose an update
        self._expand()
        total, self._sum = self._sum, None
        assert total is not None
        if drop:
            _apply_masks(total, [(self._seeds[d], -1) for d in sorted(drop)], self.ring_bits, threads=self.threads)
        self._seeds = {}
        return total
