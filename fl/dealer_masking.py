"""Dealer-masked secure aggregation (``aggregation.masking = "dealer"``): one mask per node, removed by a dealer.

PriMIA's design: a crypto provider (``primia dealer``) takes part in every
secure aggregation.  Node i masks its update with one stream PRG(s_i), where
s_i is agreed by X25519 between the node's fresh key for the round and the
dealer's; the dealer sends the hub Σ_{i in U} PRG(s_i) for the survivors U,
once.  The update is additively shared between the hub (y_i) and the dealer
(s_i): the dealer never sees y_i, the hub never s_i.

Every per-round key is signed by its owner's long-term key (:mod:`fl.identity`):
nodes check the dealer's against the dealer key they pinned, the dealer checks
the nodes' against its list of the federation's nodes, so a hub cannot swap in
a key of its own or slip in a member it controls.  Round r::

  1 keys       hub -> dealer  dealer_keys {protocol, round, context, size, ring_bits, min_nodes}
               dealer -> hub  dealer_key {key, signature on (run, r, context, key)}
               hub -> node    sa_keys {round, context, min_nodes}
               node -> hub    sa_public {mask_key, signature on (run, r, context, i, mask_key)}
  2 roster     hub -> node    sa_roster {every node's signed key, the dealer's signed key}
               hub -> dealer  dealer_roster {every node's signed key}
               (each checks every signature; both compute the roster digest D and T = max(2, min_nodes, |R|/2 + 1))
  3 upload     node -> hub    update: y_i = encode_f(w_i u_i) + PRG(s_i)
  4 consistency hub -> node   sa_survivors {U};  node -> hub  sa_signature on (run, r, D, U)
  5 unmask     hub -> dealer  unmask {U, D = R \\ U, the signatures}
               dealer -> hub  mask_sum: Σ_{i in U} PRG(s_i), once per round, only if at least T members of U
                              signed this U and this roster
  hub: Σ_U y_i - mask_sum = encode_f(Σ_U w_i u_i).

A node lost after uploading costs nothing (its mask is in the dealer's sum; its
signature is not needed while T others sign).  Bytes beyond the update: ~100 B
per node up and ~100 B per node of the roster down; the dealer receives the
roster and sends one update-sized sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mpc.errors import ProtocolError

from .errors import RoundFailed
from .identity import SIGNATURE_BYTES, Directory, digest, verify_statement
from .masks import RING_DTYPES, X25519_BYTES, agree_seed, apply_masks, encode_add, valid_x25519, x25519_public
from .messages import PROTOCOL_VERSION, Message, check, check_map
from .strategy import (DEALER_LINK, NodeContext, RoundStart, RoundSum, SendTo, StagedAggregator, StagedMasker,
                       StagedRound, majority, survivor_statement, SIGNATURE_KIND)

__all__ = ["Kind", "DealerAggregator", "DealerMasker", "DealerRound", "dealer_seed"]

_DEALER_INFO = b"primia/secagg/dealer-seed/v2"
_KEY_ENTRY = {"mask_key": bytes, "signature": bytes}


class Kind:
    KEYS = "sa_keys"
    PUBLIC = "sa_public"
    ROSTER = "sa_roster"
    SURVIVORS = "sa_survivors"
    SIGNATURE = SIGNATURE_KIND
    DEALER_KEYS = "dealer_keys"
    DEALER_KEY = "dealer_key"
    DEALER_ROSTER = "dealer_roster"
    UNMASK = "unmask"
    MASK_SUM = "mask_sum"


def dealer_seed(secret: X25519PrivateKey, peer_public: bytes, context: bytes, node: str) -> bytes:
    """s_i, the seed node i shares with the dealer: both ends derive it, the hub never sees it."""
    return agree_seed(secret, peer_public, _DEALER_INFO, context, node.encode())


def _key_statement(run_id: str, number: int, context: bytes, name: str, key: bytes) -> tuple:
    return ("round-keys", run_id, number, context, name, b"", key)


def _dealer_statement(run_id: str, number: int, context: bytes, key: bytes) -> tuple:
    return ("dealer-key", run_id, number, context, key)


def _roster_digest(run_id: str, number: int, context: bytes, keys: Mapping[str, bytes], dealer_key: bytes) -> bytes:
    return digest("dealer-roster", run_id, number, context, [[n, keys[n]] for n in sorted(keys)], dealer_key)


def _check_entry(peer: str, owner: str, entry: Any) -> None:
    check_map(entry, peer, f"keys of {owner!r}", _KEY_ENTRY)
    if len(entry["mask_key"]) != X25519_BYTES:
        raise ProtocolError(peer, f"the round key of {owner!r} is not {X25519_BYTES} bytes")
    if len(entry["signature"]) != SIGNATURE_BYTES:
        raise ProtocolError(peer, f"the signature of {owner!r} is not {SIGNATURE_BYTES} bytes")


def _check_signed_roster(peer: str, keys: Any, run_id: str, number: int, context: bytes,
                         directory: Directory, who: str) -> dict[str, bytes]:
    """The roster's keys by name, each checked to be signed by its configured owner."""
    if not isinstance(keys, Mapping):
        raise ProtocolError(peer, "the roster must be a map of node names to signed keys")
    out = {}
    for name, entry in sorted(keys.items()):
        if not isinstance(name, str):
            raise ProtocolError(peer, "roster: node names must be strings")
        _check_entry(peer, name, entry)
        key = directory.get(name)
        if key is None:
            raise ProtocolError(peer, f"the roster names {name!r}, which is not a node {who} knows: refusing a "
                                      "member it cannot check")
        if not verify_statement(key, entry["signature"], *_key_statement(run_id, number, context, name,
                                                                           entry["mask_key"])):
            raise ProtocolError(peer, f"the round key of {name!r} is not signed by {name!r}")
        out[name] = entry["mask_key"]
    return out


# -- the hub ---------------------------------------------------------------------------------


@dataclass
class _HubRound(StagedRound):
    dealer: dict[str, bytes] | None = None   # the dealer's signed round key
    mask_sum: np.ndarray | None = field(default=None, repr=False)


class DealerAggregator(StagedAggregator):
    """The hub's side (see the module docstring); the dealer is the peer :data:`fl.strategy.DEALER_LINK`."""

    kinds = frozenset({Kind.PUBLIC, Kind.SIGNATURE, Kind.DEALER_KEY, Kind.MASK_SUM})
    needs = frozenset({DEALER_LINK})
    label = "secure (dealer masks)"

    def __init__(self, *, frac_bits: int, ring_bits: int, directory: Directory, dealer_key: Any):
        self.frac_bits, self.ring_bits = frac_bits, ring_bits
        self.directory = directory
        self.dealer_key = dealer_key
        self._round: _HubRound | None = None

    def open_round(self, start: RoundStart) -> list[SendTo]:
        self._round = _HubRound(start, waiting={*start.nodes, DEALER_LINK}, alive={*start.nodes, DEALER_LINK})
        to_dealer = {"protocol": PROTOCOL_VERSION, "run_id": start.run_id, "round": start.number,
                     "context": start.context, "size": start.size, "ring_bits": self.ring_bits,
                     "min_nodes": start.min_nodes}
        to_nodes = {"round": start.number, "context": start.context, "min_nodes": start.min_nodes}
        return [SendTo(DEALER_LINK, Message(Kind.DEALER_KEYS, to_dealer))] + [
            SendTo(n, Message(Kind.KEYS, to_nodes)) for n in start.nodes]

    def _dealer_failed(self, reason: str) -> RoundFailed:
        rnd = self._r()
        return RoundFailed(rnd.start.number, rnd.stage, f"the dealer {reason}; aggregation.masking = 'dealer' "
                                                        "cannot go on without it")

    def receive(self, peer: str, msg: Message) -> list[SendTo]:
        if peer == DEALER_LINK:
            try:
                return self._from_dealer(msg)
            except ProtocolError as exc:
                raise self._dealer_failed(f"broke the protocol: {exc.reason}") from exc
        if msg.kind == Kind.PUBLIC:
            return self._on_public(peer, msg)
        if msg.kind == Kind.SIGNATURE:
            return self._on_signature(peer, msg)
        raise ProtocolError(peer, f"sent {msg.kind!r}, which a node does not send in dealer-masked aggregation")

    def _from_dealer(self, msg: Message) -> list[SendTo]:
        start = self._r().start
        if msg.kind == Kind.DEALER_KEY:
            rnd = self._expect(DEALER_LINK, msg, "keys")
            check(msg, "the dealer", Kind.DEALER_KEY, {"round": int, "key": bytes, "signature": bytes})
            key, signature = msg.header["key"], msg.header["signature"]
            if not valid_x25519(key) or not verify_statement(
                    self.dealer_key, signature, *_dealer_statement(start.run_id, start.number, start.context, key)):
                raise ProtocolError("the dealer", "its round key is not signed with the dealer key in the config")
            rnd.dealer = {"key": key, "signature": signature}
        elif msg.kind == Kind.MASK_SUM:
            rnd = self._expect(DEALER_LINK, msg, "unmask")
            dtype = RING_DTYPES[self.ring_bits]
            check(msg, "the dealer", Kind.MASK_SUM, {"round": int}, {"sum": (dtype, (start.size,))})
            rnd.mask_sum = msg.arrays["sum"]
        else:
            raise ProtocolError("the dealer", f"sent {msg.kind!r}, which a dealer does not send")
        rnd.waiting.discard(DEALER_LINK)
        return self._advance()

    def _on_public(self, peer: str, msg: Message) -> list[SendTo]:
        rnd = self._expect(peer, msg, "keys")
        check(msg, peer, Kind.PUBLIC, {"round": int, **_KEY_ENTRY})
        entry = {k: msg.header[k] for k in _KEY_ENTRY}
        _check_entry(peer, peer, entry)
        start = rnd.start
        if not verify_statement(self.directory.get(peer), entry["signature"],
                                *_key_statement(start.run_id, start.number, start.context, peer, entry["mask_key"])):
            raise ProtocolError(peer, "the signature on its round key does not verify with its configured key")
        if not valid_x25519(entry["mask_key"]):
            raise ProtocolError(peer, "sent a round key no agreement can use (a low-order X25519 point)")
        rnd.keys[peer] = entry
        rnd.waiting.discard(peer)
        return self._advance()

    def lost(self, peer: str, reason: str) -> list[SendTo]:
        rnd = self._r()
        if peer == DEALER_LINK:
            if rnd.stage != "done":
                raise self._dealer_failed(f"was lost: {reason}")
            return []
        rnd.alive.discard(peer)
        rnd.waiting.discard(peer)
        return self._advance()

    def _advance(self) -> list[SendTo]:
        rnd = self._r()
        if rnd.waiting or rnd.stage == "done":
            return []
        start = rnd.start
        if rnd.stage == "keys":
            rnd.roster = sorted(rnd.keys)
            assert rnd.dealer is not None
            rnd.threshold = majority(max(len(self.directory.keys), len(rnd.roster)), start.min_nodes)
            self._need("keys", rnd.roster, rnd.threshold)
            rnd.digest = _roster_digest(start.run_id, start.number, start.context,
                                        {n: rnd.keys[n]["mask_key"] for n in rnd.roster}, rnd.dealer["key"])
            rnd.stage, rnd.waiting = "upload", set(rnd.roster) & rnd.alive
            keys = {n: rnd.keys[n] for n in rnd.roster}
            return [SendTo(DEALER_LINK, Message(Kind.DEALER_ROSTER, {"round": start.number, "keys": keys}))] + [
                SendTo(n, Message(Kind.ROSTER, {"round": start.number, "keys": keys, "dealer": rnd.dealer}))
                for n in sorted(rnd.waiting)] + self._advance()
        if rnd.stage == "upload":
            rnd.survivors = sorted(rnd.uploaded)
            self._need("upload", rnd.survivors, rnd.threshold)
            rnd.stage, rnd.waiting = "consistency", set(rnd.survivors) & rnd.alive
            header = {"round": start.number, "survivors": rnd.survivors}
            return [SendTo(n, Message(Kind.SURVIVORS, header)) for n in sorted(rnd.waiting)] + self._advance()
        if rnd.stage == "consistency":
            self._need("consistency", sorted(rnd.signatures), rnd.threshold)
            rnd.stage, rnd.waiting = "unmask", {DEALER_LINK}
            header = {"round": start.number, "included": rnd.survivors,
                      "dropped": sorted(set(rnd.roster) - set(rnd.survivors)),
                      "signatures": dict(sorted(rnd.signatures.items()))}
            return [SendTo(DEALER_LINK, Message(Kind.UNMASK, header))]
        if rnd.stage == "unmask":
            rnd.stage = "done"
        return []

    def result(self) -> RoundSum:
        rnd = self._r()
        if rnd.stage != "done" or rnd.total is None or rnd.mask_sum is None:
            raise RoundFailed(rnd.start.number, rnd.stage, "the round is not complete")
        rnd.total -= rnd.mask_sum
        total = rnd.total.view(np.int32 if self.ring_bits == 32 else np.int64).astype(np.float64)
        total /= float(2**self.frac_bits)
        rnd.total, rnd.mask_sum = None, None
        start = rnd.start
        return RoundSum(total, sum(start.weight(n) for n in rnd.survivors), list(rnd.survivors),
                        sorted(set(start.nodes) - set(rnd.survivors)), {n: start.weight(n) for n in start.nodes})


# -- the node ----------------------------------------------------------------------------------


@dataclass
class _NodeRound:
    number: int
    stage: str = "new"
    context: bytes = b""
    min_nodes: int = 2
    secret: X25519PrivateKey | None = field(default=None, repr=False)
    roster: list[str] = field(default_factory=list)
    digest: bytes = b""
    threshold: int = 2
    seed: bytes = field(default=b"", repr=False)
    masks: np.ndarray | None = field(default=None, repr=False)


class DealerMasker(StagedMasker):
    """A node's side: one mask per round, shared with the dealer whose key this node pinned."""

    kinds = frozenset({Kind.KEYS, Kind.ROSTER, Kind.SURVIVORS})
    round_type = _NodeRound

    def __init__(self, context: NodeContext, *, size: int, frac_bits: int, ring_bits: int):
        self.ctx = context
        self.size, self.frac_bits, self.ring_bits = size, frac_bits, ring_bits

    def receive(self, msg: Message) -> tuple[list[Message], Callable[[], Any] | None]:
        if msg.kind == Kind.KEYS:
            return self._on_keys(msg), None
        if msg.kind == Kind.ROSTER:
            return [], self._on_roster(msg)
        if msg.kind == Kind.SURVIVORS:
            return self._on_survivors(msg), None
        raise ProtocolError("hub", f"sent {msg.kind!r}, which dealer-masked aggregation does not use")

    def ready(self) -> bool:
        return self._round is not None and self._round.stage == "masking"

    def _on_keys(self, msg: Message) -> list[Message]:
        check(msg, "hub", Kind.KEYS, {"round": int, "context": bytes, "min_nodes": int})
        if self.ctx.dealer_key is None:
            raise ProtocolError("hub", "this run masks with a dealer, but this node has no pinned dealer key: "
                                       "start it with --dealer-key dealer.pub")
        self.start_round(msg.header["round"])
        rnd = self._expect(msg, "new")
        rnd.context, rnd.min_nodes = msg.header["context"], msg.header["min_nodes"]
        if not 16 <= len(rnd.context) <= 256:
            raise ProtocolError("hub", "sa_keys: the round context must be 16-256 bytes")
        rnd.secret = X25519PrivateKey.generate()
        key = x25519_public(rnd.secret)
        signature = self.ctx.sign(*_key_statement(self.ctx.run_id, rnd.number, rnd.context, self.ctx.name, key))
        rnd.stage = "keyed"
        return [Message(Kind.PUBLIC, {"round": rnd.number, "mask_key": key, "signature": signature})]

    def _on_roster(self, msg: Message) -> Callable[[], Any]:
        rnd = self._expect(msg, "keyed")
        check(msg, "hub", Kind.ROSTER, {"round": int, "keys": dict, "dealer": dict})
        dealer = msg.header["dealer"]
        check_map(dealer, "hub", "sa_roster.dealer", {"key": bytes, "signature": bytes})
        run_id, number = self.ctx.run_id, rnd.number
        if not verify_statement(self.ctx.dealer_key, dealer["signature"],
                                *_dealer_statement(run_id, number, rnd.context, dealer["key"])):
            raise ProtocolError("hub", "the dealer's round key is not signed by the dealer this node pinned: the hub "
                                       "substituted a key, or the dealer is not the one in --dealer-key")
        keys = msg.header["keys"]
        if not isinstance(keys, Mapping) or self.ctx.name not in keys:
            raise ProtocolError("hub", "the roster does not hold this node")
        assert rnd.secret is not None
        for name, entry in keys.items():
            if not isinstance(name, str):
                raise ProtocolError("hub", "roster: node names must be strings")
            _check_entry("hub", name, entry)
        if keys[self.ctx.name]["mask_key"] != x25519_public(rnd.secret):
            raise ProtocolError("hub", "the roster does not hold this node's round key")
        rnd.roster = sorted(keys)
        rnd.threshold = self.ctx.threshold(len(rnd.roster), rnd.min_nodes)
        if len(rnd.roster) < rnd.threshold:
            raise ProtocolError("hub", f"a roster of {len(rnd.roster)} node(s), below this node's threshold "
                                       f"{rnd.threshold} (a majority of the federation, and min_nodes)")
        rnd.digest = _roster_digest(run_id, number, rnd.context, {n: keys[n]["mask_key"] for n in rnd.roster},
                                    dealer["key"])
        try:
            rnd.seed = dealer_seed(rnd.secret, dealer["key"], rnd.context, self.ctx.name)
        except ValueError as exc:  # a low-order point
            raise ProtocolError("hub", f"the dealer's round key is invalid: {exc}") from exc
        rnd.stage = "masking"
        return lambda: self._expand(rnd)

    def _expand(self, rnd: _NodeRound) -> None:
        if rnd.stage != "masking" or rnd.masks is not None:
            return
        total = np.empty(self.size, dtype=RING_DTYPES[self.ring_bits])
        apply_masks(total, [(rnd.seed, 1)], self.ring_bits, overwrite=True)
        rnd.masks = total

    def mask(self, update: np.ndarray, fields: Mapping[str, Any]) -> np.ndarray:
        rnd = self._round
        if rnd is None or rnd.stage != "masking":
            raise ProtocolError("hub", "asked for a masked update before the round's roster")
        update = np.asarray(update).reshape(-1)
        if update.size != self.size:
            raise ValueError(f"the update has {update.size} values, the masks {self.size}")
        self._expand(rnd)
        masked, rnd.masks = rnd.masks, None  # a mask is used once
        assert masked is not None
        encode_add(update, float(fields["weight"]), masked, self.frac_bits, self.ring_bits)
        rnd.stage, rnd.seed = "masked", b""
        return masked

    def _on_survivors(self, msg: Message) -> list[Message]:
        rnd = self._expect(msg, "masked")
        check(msg, "hub", Kind.SURVIVORS, {"round": int, "survivors": list})
        survivors = msg.header["survivors"]
        if not all(isinstance(s, str) for s in survivors) or len(set(survivors)) != len(survivors):
            raise ProtocolError("hub", "sa_survivors: survivors must be distinct names")
        if self.ctx.name not in survivors or not set(survivors) <= set(rnd.roster):
            raise ProtocolError("hub", "refusing the survivor set: it must hold this node and only nodes of the roster")
        if len(survivors) < rnd.threshold:
            raise ProtocolError("hub", f"refusing the survivor set: {len(survivors)} node(s), below the threshold "
                                       f"{rnd.threshold}; the sum would expose too few updates")
        self.ctx.claim(rnd.number)  # the dealer answers only with these signatures: never twice per round of a run
        rnd.stage = "done"
        signature = self.ctx.sign(*survivor_statement(self.ctx.run_id, rnd.number, rnd.digest, survivors))
        return [Message(Kind.SIGNATURE, {"round": rnd.number, "signature": signature})]


# -- the dealer ---------------------------------------------------------------------------------


@dataclass
class DealerRound:
    """The dealer's state for one round.

    Call order: :meth:`public_key` (signed by the dealer's long-term key through ``sign``),
    :meth:`set_roster`, optionally :meth:`expand`, :meth:`mask_sum` (once).
    """

    run_id: str
    round: int
    context: bytes
    size: int
    ring_bits: int
    min_nodes: int
    directory: Directory
    threads: int = 2
    stage: str = "keys"
    _secret: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    roster: list[str] = field(default_factory=list)
    digest: bytes = b""
    threshold: int = 2
    _seeds: dict[str, bytes] = field(default_factory=dict, repr=False)
    _sum: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.ring_bits not in RING_DTYPES:
            raise ProtocolError("hub", f"ring_bits must be 32 or 64, got {self.ring_bits}")
        if not 2 <= self.size <= 1 << 34:
            raise ProtocolError("hub", f"update size {self.size} is out of range")
        if not 16 <= len(self.context) <= 256:
            raise ProtocolError("hub", "the round context must be 16-256 bytes")
        if not 0 <= self.min_nodes <= 1 << 20:
            raise ProtocolError("hub", f"min_nodes {self.min_nodes} is out of range")

    def public_key(self) -> bytes:
        return x25519_public(self._secret)

    def statement(self) -> tuple:
        """What the dealer signs for this round: its key, bound to the run, round and context."""
        return _dealer_statement(self.run_id, self.round, self.context, self.public_key())

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise ProtocolError("hub", f"the dealer's round is at stage {self.stage}, not {stage}")

    def set_roster(self, keys: Any) -> None:
        """The nodes' signed keys: every one must be a configured node's, signed by it."""
        self._expect("keys")
        checked = _check_signed_roster("hub", keys, self.run_id, self.round, self.context, self.directory,
                                       "this dealer")
        threshold = majority(max(len(self.directory.keys), len(checked)), self.min_nodes)
        if len(checked) < threshold:
            raise ProtocolError("hub", f"a roster of {len(checked)} node(s): a sum needs at least {threshold} (a "
                                       "majority of the federation's nodes, and min_nodes)")
        seeds = {}
        for name, key in checked.items():
            try:
                seeds[name] = dealer_seed(self._secret, key, self.context, name)
            except ValueError as exc:
                raise ProtocolError("hub", f"the round key of {name!r} is invalid: {exc}") from exc
        self.roster = sorted(checked)
        self.threshold = threshold
        self.digest = _roster_digest(self.run_id, self.round, self.context, checked, self.public_key())
        self._seeds = seeds
        self.stage = "masked"

    def expand(self) -> None:
        """Σ_{i in R} PRG(s_i): the slow part, done while the nodes train."""
        self._expect("masked")
        self._expand()

    def _expand(self) -> None:
        if self._sum is None:
            total = np.empty(self.size, dtype=RING_DTYPES[self.ring_bits])
            masks = [(seed, 1) for _, seed in sorted(self._seeds.items())]
            apply_masks(total, masks, self.ring_bits, overwrite=True, threads=self.threads)
            self._sum = total

    def check_unmask(self, included: list[str], dropped: list[str], signatures: Any) -> None:
        """Refuse an unmask request that could expose an update (call before :meth:`mask_sum`).

        Raises:
            ProtocolError: the sets do not partition the roster, fewer than the threshold are included or
                signed, a signature is not by a member of U on this U and roster, or the dealer answered already.
        """
        self._expect("masked")
        inc, drop = set(included), set(dropped)
        if len(inc) != len(included) or len(drop) != len(dropped) or inc & drop or inc | drop != set(self.roster):
            raise ProtocolError("hub", "the included and dropped nodes do not partition the round's roster")
        if len(inc) < self.threshold:
            raise ProtocolError("hub", f"refusing to unmask: {len(inc)} node(s) included, below the threshold "
                                       f"{self.threshold}")
        if not isinstance(signatures, Mapping):
            raise ProtocolError("hub", "unmask: signatures must be a map")
        statement = survivor_statement(self.run_id, self.round, self.digest, sorted(included))
        for signer, signature in signatures.items():
            if signer not in inc:
                raise ProtocolError("hub", f"inconsistent views: a signature from {signer!r}, which is not included")
            if not verify_statement(self.directory.get(signer), signature, *statement):
                raise ProtocolError("hub", f"inconsistent views: {signer!r} did not sign this survivor set and roster")
        if len(signatures) < self.threshold:
            raise ProtocolError("hub", f"only {len(signatures)} included node(s) signed the survivor set; "
                                       f"{self.threshold} must")

    def mask_sum(self, included: list[str], dropped: list[str], signatures: Any) -> np.ndarray:
        """Σ_{i in U} PRG(s_i) for U = ``included``, once per round (after :meth:`check_unmask`)."""
        self.check_unmask(included, dropped, signatures)
        self.stage = "done"  # never twice: two sums over different sets would expose an update
        self._expand()
        total, self._sum = self._sum, None
        assert total is not None
        if dropped:
            apply_masks(total, [(self._seeds[d], -1) for d in sorted(dropped)], self.ring_bits, threads=self.threads)
        self._seeds = {}
        return total
