"""Secure aggregation with pairwise masks: the hub learns the sum of the updates and nothing else.

This is the protocol of Bonawitz et al. (CCS 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", section 4) for a
semi-honest hub and semi-honest, non-colluding nodes, with the recovery of
dropped nodes done by the survivors revealing their pair seeds directly
(no Shamir sharing, so a node that drops *after* the hub fixed the set of
included updates fails the round instead of being recovered).

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
3. **masked** (node -> hub, m * k/8 B): node i derives, for every j in R, the
   pair seed s_ij = HKDF-SHA256(X25519(sk_i, pk_j), context) (both ends get the
   same seed; the hub never sees it) and uploads

       y_i = encode_f(w_i u_i) + PRG(b_i) + Σ_{j in R, j > i} PRG(s_ij) - Σ_{j in R, j < i} PRG(s_ij)   (mod 2^k)

   Every pair mask appears once with each sign, so it cancels in a sum over R.
4. **unmask** (hub -> node, then node -> hub, 16 B + 16 B per dropped node): the
   hub fixes U, the nodes whose y_i arrived, and D = R \\ U.  Each node in U
   checks U ∪ D = R, U ∩ D = ∅, |U| >= 2, that it has not revealed before this
   round, and replies with b_i and s_id for every d in D.  The hub computes

       Σ_{i in U} y_i - Σ_{i in U} PRG(b_i) - Σ_{i in U, d in D} ±PRG(s_id) = encode_f(Σ_{i in U} w_i u_i)

   and divides the decoded sum by Σ_{i in U} w_i.

Bytes per node per round: 32 up, 32·|R| down, m·k/8 up (with k = 32, the size
of a float32 update: 1.0x plain FedAvg), 16·(1 + |D|) up.  Without dropouts the
only overhead over plain FedAvg is 48 + 32·|R| bytes.

Why each piece (the hub's view of y_i alone is uniform: y_i is masked by PRG(b_i)):
- pair masks hide y_i once b_i is revealed; they cancel in the sum;
- self masks b_i keep a late-arriving y_d hidden after the pair seeds of the
  dropped node d have been revealed: b_d is never revealed, since d ∉ U;
- a node reveals at most once per round, and never both b_i and pair seeds
  with a node in U, so the hub never holds all masks of any single update.

Fixed point: u_i is encoded with ``mpc.ring.encode`` at f fractional bits and
reduced mod 2^k.  Each node checks max|u_i| < 2^(k-2-f) so that the weighted sum
cannot wrap; the error of the mean is at most |U| · 2^-(f+1) / Σ_{i in U} w_i per entry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mpc.errors import EncodingRangeError, ProtocolError
from mpc.prg import SEED_BYTES, Stream, new_seed
from mpc.ring import decode, encode

from .errors import NodeDropped, RoundFailed, TooFewNodes

__all__ = [
    "Stage",
    "PUBLIC_KEY_BYTES",
    "RING_DTYPES",
    "encode_update",
    "decode_sum",
    "prg_mask",
    "update_limit",
    "NodeSecAgg",
    "HubSecAgg",
]

PUBLIC_KEY_BYTES = 32
RING_DTYPES: dict[int, np.dtype] = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
_SIGNED = {32: np.int32, 64: np.int64}
# Stream ids under a seed: masks use stream 0 (each seed is fresh per round and per use).
_MASK_STREAM = 0
# Values per piece when encoding and masking: 512 KiB of float64 temporaries stay in cache and
# below malloc's mmap threshold (larger pieces measured 5x slower here).  A multiple of 4, so that
# a stream read in pieces equals one long read (16-byte AES blocks).
_CHUNK = 1 << 16
_HKDF_INFO = b"primia/secagg/pair-seed/v1"


class Stage(enum.Enum):
    """Where a round of secure aggregation stands (the same names on the hub and the nodes)."""

    KEYS = "keys"
    MASKED = "masked"
    UNMASK = "unmask"
    DONE = "done"


def update_limit(frac_bits: int, ring_bits: int) -> float:
    """Largest |update entry| (exclusive) a node may mask: the weighted sum then cannot wrap."""
    return float(2 ** (ring_bits - 2 - frac_bits))


def _check_range(update: np.ndarray, frac_bits: int, ring_bits: int) -> None:
    limit = update_limit(frac_bits, ring_bits)
    if not update.size:
        return
    lo, hi = float(update.min()), float(update.max())  # NaN propagates into both
    if not (np.isfinite(lo) and np.isfinite(hi)) or max(-lo, hi) >= limit:
        bad = lo if not np.isfinite(lo) or -lo >= limit else hi
        raise EncodingRangeError(bad, limit, frac_bits)


def _chunks(length: int) -> range:
    return range(0, length, _CHUNK)


def _encode_chunk(values: np.ndarray, weight: float, frac_bits: int, ring_bits: int) -> np.ndarray:
    ring = encode(np.multiply(values, weight, dtype=np.float64), frac_bits)  # int64 in Z_2^64
    return ring.astype(RING_DTYPES[ring_bits]) if ring_bits == 32 else ring.view(np.uint64)


def encode_update(update: np.ndarray, weight: float, *, frac_bits: int, ring_bits: int) -> np.ndarray:
    """encode_f(weight · update) in Z_2^ring_bits, as unsigned integers.

    Raises:
        EncodingRangeError: an entry is not finite or |entry| >= :func:`update_limit`.
    """
    update = np.asarray(update)
    _check_range(update, frac_bits, ring_bits)
    out = np.empty(update.shape, dtype=RING_DTYPES[ring_bits])
    flat_in, flat_out = update.reshape(-1), out.reshape(-1)
    for start in _chunks(flat_in.size):
        stop = start + _CHUNK
        flat_out[start:stop] = _encode_chunk(flat_in[start:stop], weight, frac_bits, ring_bits)
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
    """PRG(seed) read piece by piece as ring elements; pieces of 4 values keep it equal to one long draw."""

    def __init__(self, seed: bytes, ring_bits: int):
        self._stream = Stream(seed, _MASK_STREAM)
        self._ring_bits = ring_bits

    def take(self, count: int) -> np.ndarray:
        words = -(-count * self._ring_bits // 64)
        return self._stream.ring(words).view(RING_DTYPES[self._ring_bits])[:count]


def prg_mask(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """``length`` uniform elements of Z_2^ring_bits from the AES-CTR stream of ``seed``."""
    return _MaskStream(seed, ring_bits).take(length)


def _apply_masks(acc: np.ndarray, masks: list[tuple[_MaskStream, int]]) -> None:
    """acc += sign · PRG(seed) for every (stream, sign), a cache-sized piece at a time."""
    for start in _chunks(acc.size):
        piece = acc[start : start + _CHUNK]
        for stream, sign in masks:
            _apply(piece, stream.take(piece.size), sign)


def _pair_seed(secret: X25519PrivateKey, peer_public: bytes, context: bytes, a: str, b: str) -> bytes:
    shared = secret.exchange(X25519PublicKey.from_public_bytes(peer_public))
    lo, hi = sorted((a, b))
    info = b"|".join([_HKDF_INFO, context, lo.encode(), hi.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


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
    when the hub asks to unmask).
    """

    node: str
    context: bytes  # binds the pair seeds to (run, round, attempt)
    frac_bits: int
    ring_bits: int
    _secret: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _self_seed: bytes = field(default_factory=new_seed, repr=False)
    roster: dict[str, bytes] | None = None
    stage: Stage = Stage.KEYS
    _mask_sum: np.ndarray | None = field(default=None, repr=False)

    def public_key(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._secret.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def _expect(self, *stages: Stage) -> None:
        if self.stage not in stages:
            raise ProtocolError("hub", f"secure aggregation is at stage {self.stage.value}, not {stages[0].value}")

    def set_roster(self, roster: Mapping[str, bytes]) -> None:
        """Stage 2: the public keys of every node in the round (this node's included)."""
        self._expect(Stage.KEYS)
        if roster.get(self.node) != self.public_key():
            raise ProtocolError("hub", "the roster does not hold this node's public key")
        for name, key in roster.items():
            if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                raise ProtocolError("hub", f"roster key of {name!r} is not {PUBLIC_KEY_BYTES} bytes")
        self.roster = dict(roster)
        self.stage = Stage.MASKED

    def expand_masks(self, size: int) -> None:
        """PRG(b_i) ± PRG(s_ij) for every other j, summed: the slow part of stage 3, which does not
        depend on the update, so a node can run it while it trains."""
        self._expect(Stage.MASKED)
        assert self.roster is not None
        masks = [(_MaskStream(self._self_seed, self.ring_bits), 1)]
        for other, key in self.roster.items():
            if other == self.node:
                continue
            try:
                seed = _pair_seed(self._secret, key, self.context, self.node, other)
            except ValueError as exc:  # cryptography refuses low-order points
                raise ProtocolError("hub", f"the public key of {other!r} is invalid: {exc}") from exc
            masks.append((_MaskStream(seed, self.ring_bits), _sign(self.node, other)))
        total = np.zeros(size, dtype=RING_DTYPES[self.ring_bits])
        _apply_masks(total, masks)
        self._mask_sum = total

    def mask(self, update: np.ndarray, weight: float) -> np.ndarray:
        """Stage 3: y_i = encode(w_i u_i) + PRG(b_i) ± PRG(s_ij) for every other j in the roster."""
        self._expect(Stage.MASKED)
        update = np.asarray(update).reshape(-1)
        if self._mask_sum is None or self._mask_sum.size != update.size:
            self.expand_masks(update.size)
        assert self._mask_sum is not None
        masked = encode_update(update, weight, frac_bits=self.frac_bits, ring_bits=self.ring_bits)
        masked += self._mask_sum
        self._mask_sum = None  # a mask is used once
        return masked

    def reveal(self, included: list[str], dropped: list[str]) -> tuple[bytes, dict[str, bytes]]:
        """Stage 4: this node's self seed and its pair seeds with the dropped nodes, once.

        Raises:
            ProtocolError: the sets do not partition the roster, this node is not
                included, fewer than two updates would be summed, or this node
                already revealed this round.
        """
        self._expect(Stage.MASKED)
        assert self.roster is not None
        inc, drop = set(included), set(dropped)
        if len(inc) != len(included) or len(drop) != len(dropped) or inc & drop or inc | drop != set(self.roster):
            raise ProtocolError("hub", "the included and dropped nodes do not partition the round's roster")
        if self.node not in inc:
            raise ProtocolError("hub", "asked to unmask a round this node is not included in")
        if len(inc) < 2:
            raise ProtocolError("hub", "refusing to unmask: the sum would be this node's update alone")
        self.stage = Stage.DONE  # never twice: a second reveal could expose a single update
        pair_seeds = {d: _pair_seed(self._secret, self.roster[d], self.context, self.node, d) for d in sorted(drop)}
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
    """

    round: int
    weights: Mapping[str, float]
    size: int
    frac_bits: int
    ring_bits: int
    min_nodes: int
    public_keys: dict[str, bytes] = field(default_factory=dict)
    roster: dict[str, bytes] | None = None
    stage: Stage = Stage.KEYS
    uploaded: set[str] = field(default_factory=set)
    included: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    revealed: dict[str, tuple[bytes, dict[str, bytes]]] = field(default_factory=dict)
    _total: np.ndarray | None = field(default=None, repr=False)

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
        """Fix U (uploaded) and D (the rest of the roster); returns (U, D) to send to every node in U."""
        self._expect("hub", Stage.MASKED)
        assert self.roster is not None
        self.included = sorted(self.uploaded)
        self.dropped = sorted(set(self.roster) - self.uploaded)
        self._need(Stage.MASKED.value, self.included)
        self.stage = Stage.UNMASK
        return self.included, self.dropped

    def add_reveal(self, node: str, self_seed: bytes, pair_seeds: Mapping[str, bytes]) -> None:
        self._expect(node, Stage.UNMASK)
        if node not in self.included:
            raise ProtocolError(node, "is not among the included nodes")
        if node in self.revealed:
            raise ProtocolError(node, "revealed twice")
        if not isinstance(self_seed, bytes) or len(self_seed) != SEED_BYTES:
            raise ProtocolError(node, f"self seed must be {SEED_BYTES} bytes")
        if set(pair_seeds) != set(self.dropped):
            raise ProtocolError(node, f"must reveal pair seeds for exactly the dropped nodes {self.dropped}")
        for d, seed in pair_seeds.items():
            if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
                raise ProtocolError(node, f"pair seed for {d!r} must be {SEED_BYTES} bytes")
        self.revealed[node] = (self_seed, dict(pair_seeds))

    def reveals_complete(self) -> bool:
        return self.stage is Stage.UNMASK and set(self.revealed) == set(self.included)

    def node_lost(self, node: str, reason: str) -> None:
        """A node disconnected; only fatal once the included set is fixed."""
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
        masks = []
        for node in self.included:
            self_seed, pair_seeds = self.revealed[node]
            masks.append((_MaskStream(self_seed, self.ring_bits), -1))
            masks += [(_MaskStream(seed, self.ring_bits), -_sign(node, d)) for d, seed in pair_seeds.items()]
        _apply_masks(total, masks)
        self._total = None
        self.stage = Stage.DONE
        weight = sum(self.weights[n] for n in self.included)
        mean = decode_sum(total, frac_bits=self.frac_bits, ring_bits=self.ring_bits, scale=1.0 / weight)
        return mean, list(self.included)
