"""Pairwise-masked secure aggregation that holds against a hub that deviates (Bonawitz et al.; SecAgg+).

The protocol of Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", §4 with the consistency round of the
actively secure version), on any mask graph G: the complete graph, or the
k-regular Harary graph of SecAgg+ (Bell et al., CCS 2020) with k =
``aggregation.neighbours`` (:mod:`fl.graphs`).  Every statement a node makes
is signed with its long-term key (:mod:`fl.identity`); the hub relays them but
cannot forge them, and every node checks every statement it relies on against
its own copy of the federation's public keys.

Round r among the nodes R0 the hub invites (w_i: node i's weight, f fractional
bits, ring Z_2^k, PRG = :func:`fl.masks.prg_mask` over :mod:`mpc.prg`)::

  1 keys       hub -> node  sa_keys {round, context, min_nodes}
               node -> hub  sa_public {cipher_key c_i, mask_key s_i, signature on (run, r, context, i, c_i, s_i)}
                            (fresh X25519 keys; the mask key's private half comes from a 16-byte seed m_i;
                            a fresh self-mask seed b_i)
  2 shares     hub -> node  sa_roster {every signed key of R1, the nodes that answered}
               node i checks every signature, computes G on R1, the roster digest D (names and keys of R1),
               the threshold T = max(2, min_nodes, |R1|/2 + 1) and its holders H(i) = G(i) + {i};
               it Shamir-shares b_i and m_i t_i-of-|H(i)| (t_i = |H(i)|/2 + 1) and sends each share to its
               holder encrypted with AES-GCM under a key agreed from c_i, c_j
               node -> hub  sa_shares {j: ciphertext for j in G(i)}
  3 upload     hub -> node  sa_shares_in {R2: the nodes whose shares arrived, the ciphertexts for this node}
               node -> hub  update: y_i = encode_f(w_i u_i) + PRG(b_i) + Σ_{j in G(i) ∩ R2} ±PRG(s_ij)
                            (s_ij agreed from s_i and s_j; + if i < j; the node trains meanwhile)
  4 consistency hub -> node sa_survivors {U: the nodes whose upload arrived}
               node i checks U ⊆ R2, i ∈ U, |U| >= T and G restricted to U connected, and signs (run, r, D, U),
               once per round
               node -> hub  sa_signature
  5 unmask     hub -> node  sa_signatures {the signatures of the nodes that answered}
               node i checks every signature is valid on the same (D, U) and that at least T agree;
               only then does it reveal, for each owner it holds a share of, the share of b_u if u ∈ U, or
               the share of m_d if d ∈ R2 \\ U — never both for one owner
               node -> hub  sa_reveal {self_shares, key_shares}
  hub: b_u for every u ∈ U and m_d for every dropped d with a partner in U, from their holders' shares;
       Σ_U y_i - Σ_U PRG(b_u) - Σ_{d, u ∈ U ∩ G(d)} ±PRG(s_ud) = encode_f(Σ_U w_i u_i).

A node lost after uploading is in U: its b_u comes from its holders, so its
update counts.  A node lost before uploading is left out (its pair masks with
the survivors are removed through m_d).  The round fails, naming why, when
fewer than T nodes remain at a stage, when a node's shares can no longer be
opened (fewer than t live holders), or when G restricted to U falls apart
(unmasking would reveal each part's sum).

What it guarantees (docs/federation.md has the threat model): the hub, even
deviating, learns Σ_U w_i u_i for one U of at least T nodes and nothing else
about any single honest node's update, as long as fewer than 2T - |R1| nodes
collude with it (two views of U cannot both gather T signatures) and fewer than
t_i of each node's holders do.  Bytes per node per round beyond the update:
~200 + 100 |R1| down, ~130 + 2 · 50 |G(i)| up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import msgpack
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mpc.errors import ProtocolError
from mpc.prg import new_seed

from . import shamir
from .errors import RoundFailed
from .graphs import components, exposed, holders, mask_graph
from .identity import RESERVED_NAMES, SIGNATURE_BYTES, Directory, digest, verify_statement
from .masks import (
    RING_DTYPES,
    X25519_BYTES,
    agree_seed,
    apply_masks,
    encode_add,
    valid_x25519,
    x25519_from_seed,
    x25519_public,
)
from .messages import Message, check, check_map
from .strategy import (NodeContext, RoundStart, RoundSum, SendTo, StagedAggregator, StagedMasker, StagedRound,
                       majority, survivor_statement, SIGNATURE_KIND)

__all__ = ["Kind", "PairwiseAggregator", "PairwiseMasker", "share_threshold"]

_PAIR_INFO = b"primia/secagg/pair-seed/v2"
_SHARE_INFO = b"primia/secagg/share-key/v1"
_CIPHERTEXT_BYTES = 2 * shamir.SHARE_BYTES + 16  # two shares and the AES-GCM tag


class Kind:
    KEYS = "sa_keys"
    PUBLIC = "sa_public"
    ROSTER = "sa_roster"
    SHARES = "sa_shares"
    SHARES_IN = "sa_shares_in"
    SURVIVORS = "sa_survivors"
    SIGNATURE = SIGNATURE_KIND
    SIGNATURES = "sa_signatures"
    REVEAL = "sa_reveal"


def share_threshold(holder_count: int) -> int:
    """t for a node whose secrets are shared among ``holder_count`` holders: a majority of them."""
    return holder_count // 2 + 1


def _sign_of(me: str, other: str) -> int:
    """+1 if ``me`` adds the pair mask with ``other``, -1 if it subtracts it."""
    return 1 if me < other else -1


def _pair_seed(secret: X25519PrivateKey, peer_public: bytes, context: bytes, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return agree_seed(secret, peer_public, _PAIR_INFO, context, lo.encode(), hi.encode())


def _share_cipher(secret: X25519PrivateKey, peer_public: bytes, context: bytes, a: str, b: str) -> AESGCM:
    lo, hi = sorted((a, b))
    shared = secret.exchange(X25519PublicKey.from_public_bytes(peer_public))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"|".join([_SHARE_INFO, context, lo.encode(), hi.encode()])).derive(shared)
    return AESGCM(key)


def _nonce(sender: str, receiver: str) -> bytes:
    # one key per pair and round, one message each way: the direction makes the nonce unique
    return bytes(11) + (b"\x00" if sender < receiver else b"\x01")


def _aad(run_id: str, number: int, sender: str, receiver: str) -> bytes:
    return msgpack.packb([run_id, number, sender, receiver], use_bin_type=True)


def _roster_digest(run_id: str, number: int, context: bytes, keys: Mapping[str, Mapping[str, bytes]]) -> bytes:
    return digest("pairwise-roster", run_id, number, context,
                  [[n, keys[n]["cipher_key"], keys[n]["mask_key"]] for n in sorted(keys)])


def _key_statement(run_id: str, number: int, context: bytes, name: str, cipher: bytes, mask: bytes) -> tuple:
    return ("round-keys", run_id, number, context, name, cipher, mask)


def _positions(roster: list[str]) -> dict[str, int]:
    """Each node's Shamir x-coordinate: its 1-based place in the sorted roster."""
    return {name: i + 1 for i, name in enumerate(sorted(roster))}


_KEY_ENTRY = {"cipher_key": bytes, "mask_key": bytes, "signature": bytes}


def _check_entry(peer: str, owner: str, entry: Any) -> None:
    check_map(entry, peer, f"keys of {owner!r}", _KEY_ENTRY)
    if len(entry["cipher_key"]) != X25519_BYTES or len(entry["mask_key"]) != X25519_BYTES:
        raise ProtocolError(peer, f"the round keys of {owner!r} are not {X25519_BYTES} bytes each")
    if len(entry["signature"]) != SIGNATURE_BYTES:
        raise ProtocolError(peer, f"the signature of {owner!r} is not {SIGNATURE_BYTES} bytes")


# -- the hub ---------------------------------------------------------------------------------


@dataclass
class _HubRound(StagedRound):
    # the roster (R1), survivors (U) and the survivors' signatures are StagedRound's
    graph: dict[str, frozenset[str]] = field(default_factory=dict)
    shares: dict[str, dict[str, bytes]] = field(default_factory=dict)   # sender -> receiver -> ciphertext
    sharers: list[str] = field(default_factory=list)          # R2
    signers: list[str] = field(default_factory=list)
    self_shares: dict[str, dict[int, bytes]] = field(default_factory=dict)  # owner -> x -> share of b_owner
    key_shares: dict[str, dict[int, bytes]] = field(default_factory=dict)   # owner -> x -> share of m_owner
    revealed: set[str] = field(default_factory=set)
    dropped: list[str] = field(default_factory=list)


class PairwiseAggregator(StagedAggregator):
    """The hub's side (see the module docstring).

    Args:
        frac_bits, ring_bits: the fixed point of the masked updates.
        neighbours: ``aggregation.neighbours`` (0: every pair; k >= 2: the Harary graph).
        directory: the nodes' long-term public keys (the hub checks their statements early; the nodes check
            them again, since they do not trust the hub).
        threads: threads that remove the masks in :meth:`result`.
    """

    kinds = frozenset({Kind.PUBLIC, Kind.SHARES, Kind.SIGNATURE, Kind.REVEAL})
    label = "secure (pairwise masks)"

    def __init__(self, *, frac_bits: int, ring_bits: int, neighbours: int, directory: Directory, threads: int = 2):
        self.frac_bits, self.ring_bits, self.neighbours = frac_bits, ring_bits, neighbours
        self.directory = directory
        self.threads = threads
        self._round: _HubRound | None = None
        if neighbours:
            self.label = f"secure (pairwise masks, {neighbours} neighbours)"

    def open_round(self, start: RoundStart) -> list[SendTo]:
        self._round = rnd = _HubRound(start, waiting=set(start.nodes), alive=set(start.nodes))
        header = {"round": start.number, "context": start.context, "min_nodes": start.min_nodes}
        return [SendTo(n, Message(Kind.KEYS, header)) for n in rnd.waiting]

    def receive(self, peer: str, msg: Message) -> list[SendTo]:
        handler = {Kind.PUBLIC: self._on_public, Kind.SHARES: self._on_shares, Kind.SIGNATURE: self._on_signature,
                   Kind.REVEAL: self._on_reveal}.get(msg.kind)
        if handler is None:
            raise ProtocolError(peer, f"sent {msg.kind!r}, which pairwise aggregation does not use")
        return handler(peer, msg)

    def lost(self, peer: str, reason: str) -> list[SendTo]:
        rnd = self._r()
        rnd.alive.discard(peer)
        if peer in rnd.waiting:
            rnd.waiting.discard(peer)
            if rnd.stage in ("keys", "shares", "upload"):
                rnd.dropped.append(peer)
        return self._advance()

    def _advance(self) -> list[SendTo]:
        rnd = self._r()
        if rnd.waiting or rnd.stage == "done":
            return []
        return {"keys": self._close_keys, "shares": self._close_shares, "upload": self._close_uploads,
                "consistency": self._close_consistency, "unmask": self._close_unmask}[rnd.stage]()

    # -- 1 keys -----------------------------------------------------------------------------

    def _on_public(self, peer: str, msg: Message) -> list[SendTo]:
        rnd = self._expect(peer, msg, "keys")
        check(msg, peer, Kind.PUBLIC, {"round": int, **_KEY_ENTRY})
        entry = {k: msg.header[k] for k in _KEY_ENTRY}
        _check_entry(peer, peer, entry)
        start = rnd.start
        statement = _key_statement(start.run_id, start.number, start.context, peer, entry["cipher_key"],
                                   entry["mask_key"])
        if not verify_statement(self.directory.get(peer), entry["signature"], *statement):
            raise ProtocolError(peer, "the signature on its round keys does not verify with its configured key")
        if not (valid_x25519(entry["cipher_key"]) and valid_x25519(entry["mask_key"])):
            raise ProtocolError(peer, "sent a round key no agreement can use (a low-order X25519 point)")
        rnd.keys[peer] = entry
        rnd.waiting.discard(peer)
        return self._advance()

    def _close_keys(self) -> list[SendTo]:
        rnd = self._r()
        rnd.roster = sorted(rnd.keys)
        rnd.threshold = majority(max(len(self.directory.keys), len(rnd.roster)), rnd.start.min_nodes)
        self._need("keys", rnd.roster, rnd.threshold)
        rnd.graph = mask_graph(rnd.roster, self.neighbours)
        rnd.digest = _roster_digest(rnd.start.run_id, rnd.start.number, rnd.start.context, rnd.keys)
        rnd.stage, rnd.waiting = "shares", set(rnd.roster) & rnd.alive
        header = {"round": rnd.start.number, "keys": {n: rnd.keys[n] for n in rnd.roster}}
        return [SendTo(n, Message(Kind.ROSTER, header)) for n in sorted(rnd.waiting)] + self._advance()

    # -- 2 shares ---------------------------------------------------------------------------

    def _on_shares(self, peer: str, msg: Message) -> list[SendTo]:
        rnd = self._expect(peer, msg, "shares")
        check(msg, peer, Kind.SHARES, {"round": int, "shares": dict})
        shares = msg.header["shares"]
        expected = sorted(rnd.graph[peer])
        if sorted(shares) != expected:
            raise ProtocolError(peer, f"must send one encrypted share to each of its partners {expected}")
        for receiver, blob in shares.items():
            if not isinstance(blob, bytes) or len(blob) != _CIPHERTEXT_BYTES:
                raise ProtocolError(peer, f"the share for {receiver!r} is not a {_CIPHERTEXT_BYTES}-byte ciphertext")
        rnd.shares[peer] = dict(shares)
        rnd.waiting.discard(peer)
        return self._advance()

    def _close_shares(self) -> list[SendTo]:
        rnd = self._r()
        rnd.sharers = sorted(rnd.shares)
        self._need("shares", rnd.sharers, rnd.threshold)
        rnd.stage, rnd.waiting = "upload", set(rnd.sharers) & rnd.alive
        sent = []
        for receiver in sorted(rnd.waiting):
            incoming = {s: rnd.shares[s][receiver] for s in rnd.sharers if receiver in rnd.shares[s]}
            header = {"round": rnd.start.number, "senders": rnd.sharers, "shares": incoming}
            sent.append(SendTo(receiver, Message(Kind.SHARES_IN, header)))
        return sent + self._advance()

    # -- 3 uploads --------------------------------------------------------------------------

    def _close_uploads(self) -> list[SendTo]:
        rnd = self._r()
        number = rnd.start.number
        rnd.survivors = sorted(rnd.uploaded)
        self._need("upload", rnd.survivors, rnd.threshold)
        parts = components(rnd.graph, rnd.survivors)
        if len(parts) > 1:
            raise RoundFailed(
                number, "upload",
                f"the dropouts split the masking graph among the remaining nodes into {parts}; unmasking would "
                f"reveal each part's sum (aggregation.neighbours = {self.neighbours} survives any "
                f"{self.neighbours - 1} dropouts; raise it, or 0 pairs every node with every other)",
            )
        lonely = exposed(rnd.graph, rnd.survivors)
        if lonely:
            raise RoundFailed(
                number, "upload",
                f"{', '.join(lonely)} would keep a single mask partner among the survivors (its other partners "
                f"dropped): that partner alone could open its update with the hub; aggregation.neighbours = "
                f"{self.neighbours} cannot protect it after these dropouts (use 3 or more, or 0 for every pair)",
            )
        self._check_openable("upload")
        rnd.stage, rnd.waiting = "consistency", set(rnd.survivors) & rnd.alive
        self._need("consistency", sorted(rnd.waiting), rnd.threshold)
        header = {"round": number, "survivors": rnd.survivors}
        return [SendTo(n, Message(Kind.SURVIVORS, header)) for n in sorted(rnd.waiting)] + self._advance()

    def _openers(self, owner: str) -> list[str]:
        """The live holders of ``owner``'s shares (they received them: they are in R2)."""
        rnd = self._r()
        return [h for h in holders(rnd.graph, owner) if h in rnd.alive and h in rnd.shares]

    def _to_open(self) -> tuple[list[str], list[str]]:
        """(owners whose b must be opened, owners whose m must be opened)."""
        rnd = self._r()
        survivors = set(rnd.survivors)
        lost_sharers = [d for d in rnd.sharers if d not in survivors and rnd.graph[d] & survivors]
        return rnd.survivors, lost_sharers

    def _check_openable(self, stage: str) -> None:
        rnd = self._r()
        selves, keys = self._to_open()
        for owner in selves + keys:
            live = self._openers(owner)
            need = share_threshold(len(holders(rnd.graph, owner)))
            if len(live) < need:
                what = "its update's self mask" if owner in rnd.survivors else "its pair masks with the survivors"
                raise RoundFailed(
                    rnd.start.number, stage,
                    f"{owner}'s shares can no longer be opened: {len(live)} of its holders "
                    f"{holders(rnd.graph, owner)} remain and {need} are needed to remove {what}",
                )

    # -- 4 consistency ----------------------------------------------------------------------

    def _close_consistency(self) -> list[SendTo]:
        rnd = self._r()
        rnd.signers = sorted(rnd.signatures)
        self._need("consistency", rnd.signers, rnd.threshold)
        self._check_openable("consistency")
        rnd.stage, rnd.waiting = "unmask", set(rnd.signers) & rnd.alive
        header = {"round": rnd.start.number, "signatures": dict(sorted(rnd.signatures.items()))}
        return [SendTo(n, Message(Kind.SIGNATURES, header)) for n in sorted(rnd.waiting)] + self._advance()

    # -- 5 unmask ---------------------------------------------------------------------------

    def _on_reveal(self, peer: str, msg: Message) -> list[SendTo]:
        rnd = self._expect(peer, msg, "unmask")
        check(msg, peer, Kind.REVEAL, {"round": int, "self_shares": dict, "key_shares": dict})
        selves, keys = self._to_open()
        owed_self = sorted(u for u in rnd.survivors if peer in holders(rnd.graph, u))
        owed_keys = sorted(d for d in rnd.sharers if d not in rnd.survivors and peer in holders(rnd.graph, d))
        given_self, given_keys = msg.header["self_shares"], msg.header["key_shares"]
        if sorted(given_self) != owed_self or sorted(given_keys) != owed_keys:
            raise ProtocolError(peer, f"must reveal shares of the self masks of exactly {owed_self} and of the mask "
                                      f"keys of exactly {owed_keys}")
        x = _positions(rnd.roster)[peer]
        for owner, share in [*given_self.items(), *given_keys.items()]:
            if not isinstance(share, bytes) or len(share) != shamir.SHARE_BYTES:
                raise ProtocolError(peer, f"its share for {owner!r} is not {shamir.SHARE_BYTES} bytes")
        for owner, share in given_self.items():
            rnd.self_shares.setdefault(owner, {})[x] = share
        for owner, share in given_keys.items():
            rnd.key_shares.setdefault(owner, {})[x] = share
        rnd.revealed.add(peer)
        rnd.waiting.discard(peer)
        return self._advance()

    def _close_unmask(self) -> list[SendTo]:
        rnd = self._r()
        selves, keys = self._to_open()
        for owner, shares in [*((u, rnd.self_shares.get(u, {})) for u in selves),
                              *((d, rnd.key_shares.get(d, {})) for d in keys)]:
            need = share_threshold(len(holders(rnd.graph, owner)))
            if len(shares) < need:
                raise RoundFailed(rnd.start.number, "unmask",
                                  f"only {len(shares)} of {owner}'s holders revealed their shares; {need} are needed")
        rnd.stage = "done"
        return []

    # -- the result -------------------------------------------------------------------------

    def result(self) -> RoundSum:
        rnd = self._r()
        if rnd.stage != "done" or rnd.total is None:
            raise RoundFailed(rnd.start.number, rnd.stage, "the round is not complete")
        number = rnd.start.number
        masks: list[tuple[bytes, int]] = []
        try:
            for u in rnd.survivors:
                need = share_threshold(len(holders(rnd.graph, u)))
                masks.append((shamir.combine(rnd.self_shares[u], need), -1))
            survivors = set(rnd.survivors)
            for d in self._to_open()[1]:
                need = share_threshold(len(holders(rnd.graph, d)))
                secret = x25519_from_seed(shamir.combine(rnd.key_shares[d], need))
                for u in sorted(rnd.graph[d] & survivors):
                    seed = _pair_seed(secret, rnd.keys[u]["mask_key"], rnd.start.context, d, u)
                    masks.append((seed, -_sign_of(u, d)))  # u added sign(u, d) · PRG(s_ud)
        except (shamir.ShareMismatch, ValueError) as exc:
            raise RoundFailed(number, "unmask", f"the revealed shares do not open the masks: {exc}") from exc
        weight = sum(rnd.start.weight(n) for n in rnd.survivors)
        total = np.empty(rnd.start.size, dtype=np.float64)
        # x / 2^f: decode while removing the masks, piece by piece
        apply_masks(rnd.total, masks, self.ring_bits, threads=self.threads, decode_into=total,
                    decode_scale=1.0 / float(2**self.frac_bits))
        rnd.total = None
        return RoundSum(total, weight, list(rnd.survivors), sorted(set(rnd.start.nodes) - set(rnd.survivors)),
                        {n: rnd.start.weight(n) for n in rnd.start.nodes})


# -- the node -----------------------------------------------------------------------------------


@dataclass
class _NodeRound:
    number: int
    stage: str = "new"
    context: bytes = b""
    min_nodes: int = 2
    cipher: X25519PrivateKey | None = field(default=None, repr=False)
    mask_seed: bytes = field(default=b"", repr=False)
    self_seed: bytes = field(default=b"", repr=False)
    roster: list[str] = field(default_factory=list)
    keys: dict[str, dict[str, bytes]] = field(default_factory=dict)
    graph: dict[str, frozenset[str]] = field(default_factory=dict)
    digest: bytes = b""
    threshold: int = 2
    sharers: list[str] = field(default_factory=list)
    held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)  # owner -> (b share, m share)
    survivors: list[str] = field(default_factory=list)
    mask_list: list[tuple[bytes, int]] = field(default_factory=list, repr=False)
    masks: np.ndarray | None = field(default=None, repr=False)


class PairwiseMasker(StagedMasker):
    """A node's side (see the module docstring).  Refuses, with a :class:`ProtocolError` naming the problem,
    anything that would let the hub learn more than the sum."""

    kinds = frozenset({Kind.KEYS, Kind.ROSTER, Kind.SHARES_IN, Kind.SURVIVORS, Kind.SIGNATURES})
    round_type = _NodeRound

    def __init__(self, context: NodeContext, *, size: int, frac_bits: int, ring_bits: int, neighbours: int):
        self.ctx = context
        self.size = size
        self.frac_bits, self.ring_bits, self.neighbours = frac_bits, ring_bits, neighbours

    def receive(self, msg: Message) -> tuple[list[Message], Callable[[], Any] | None]:
        handler = {Kind.KEYS: self._on_keys, Kind.ROSTER: self._on_roster, Kind.SHARES_IN: self._on_shares_in,
                   Kind.SURVIVORS: self._on_survivors, Kind.SIGNATURES: self._on_signatures}.get(msg.kind)
        if handler is None:
            raise ProtocolError("hub", f"sent {msg.kind!r}, which pairwise aggregation does not use")
        return handler(msg)

    def ready(self) -> bool:
        return self._round is not None and self._round.stage == "masking"

    def _statement_key(self, name: str) -> Any:
        if name in RESERVED_NAMES:
            raise ProtocolError("hub", f"the round includes a member named {name!r}, which is not a node's name")
        directory = self.ctx.directory
        key = directory.get(name) if directory is not None else None
        if key is None:
            where = f"in {directory.source}" if directory is not None else "(no --peer-keys folder)"
            raise ProtocolError("hub", f"the round includes node {name!r}, whose public key this node does not have "
                                       f"{where}: put {name}.pub there, or start the node with --peer-keys")
        return key

    # 1: fresh keys
    def _on_keys(self, msg: Message) -> tuple[list[Message], None]:
        check(msg, "hub", Kind.KEYS, {"round": int, "context": bytes, "min_nodes": int})
        self.start_round(msg.header["round"])
        rnd = self._expect(msg, "new")
        rnd.context, rnd.min_nodes = msg.header["context"], msg.header["min_nodes"]
        if not 16 <= len(rnd.context) <= 256:
            raise ProtocolError("hub", "sa_keys: the round context must be 16-256 bytes")
        rnd.cipher = X25519PrivateKey.generate()
        rnd.mask_seed, rnd.self_seed = new_seed(), new_seed()
        cipher_key, mask_key = x25519_public(rnd.cipher), x25519_public(x25519_from_seed(rnd.mask_seed))
        signature = self.ctx.sign(*_key_statement(self.ctx.run_id, rnd.number, rnd.context, self.ctx.name,
                                                  cipher_key, mask_key))
        rnd.stage = "keyed"
        header = {"round": rnd.number, "cipher_key": cipher_key, "mask_key": mask_key, "signature": signature}
        return [Message(Kind.PUBLIC, header)], None

    # 2: check the roster, share b_i and m_i
    def _on_roster(self, msg: Message) -> tuple[list[Message], None]:
        rnd = self._expect(msg, "keyed")
        check(msg, "hub", Kind.ROSTER, {"round": int, "keys": dict})
        keys = msg.header["keys"]
        me = self.ctx.name
        assert rnd.cipher is not None
        mine = {"cipher_key": x25519_public(rnd.cipher), "mask_key": x25519_public(x25519_from_seed(rnd.mask_seed))}
        for name, entry in keys.items():
            if not isinstance(name, str):
                raise ProtocolError("hub", "roster: node names must be strings")
            _check_entry("hub", name, entry)
        if me not in keys or any(keys[me][k] != v for k, v in mine.items()):
            raise ProtocolError("hub", "the roster does not hold this node's round keys")
        for name, entry in keys.items():
            statement = _key_statement(self.ctx.run_id, rnd.number, rnd.context, name, entry["cipher_key"],
                                       entry["mask_key"])
            if not verify_statement(self._statement_key(name), entry["signature"], *statement):
                raise ProtocolError("hub", f"the round keys of {name!r} are not signed by {name!r}: the hub relayed "
                                           "keys it made itself, or altered them")
        rnd.roster = sorted(keys)
        rnd.threshold = self.ctx.threshold(len(rnd.roster), rnd.min_nodes)
        if len(rnd.roster) < rnd.threshold:
            raise ProtocolError("hub", f"a roster of {len(rnd.roster)} node(s), below this node's threshold "
                                       f"{rnd.threshold} (a majority of the federation, and min_nodes)")
        rnd.keys = {n: {"cipher_key": keys[n]["cipher_key"], "mask_key": keys[n]["mask_key"]} for n in rnd.roster}
        rnd.graph = mask_graph(rnd.roster, self.neighbours)
        rnd.digest = _roster_digest(self.ctx.run_id, rnd.number, rnd.context, rnd.keys)
        mine_holders = holders(rnd.graph, me)
        positions = _positions(rnd.roster)
        t = share_threshold(len(mine_holders))
        xs = [positions[h] for h in mine_holders]
        b_shares = shamir.split(rnd.self_seed, t, xs)
        m_shares = shamir.split(rnd.mask_seed, t, xs)
        rnd.held[me] = (b_shares[positions[me]], m_shares[positions[me]])
        out = {}
        for j in sorted(rnd.graph[me]):
            try:
                cipher = _share_cipher(rnd.cipher, rnd.keys[j]["cipher_key"], rnd.context, me, j)
            except ValueError as exc:  # a low-order point
                raise ProtocolError("hub", f"the cipher key of {j!r} is invalid: {exc}") from exc
            x = positions[j]
            out[j] = cipher.encrypt(_nonce(me, j), b_shares[x] + m_shares[x], _aad(self.ctx.run_id, rnd.number, me, j))
        rnd.stage = "shared"
        return [Message(Kind.SHARES, {"round": rnd.number, "shares": out})], None

    # 3: the partners' shares; expand the masks while training
    def _on_shares_in(self, msg: Message) -> tuple[list[Message], Callable[[], Any] | None]:
        rnd = self._expect(msg, "shared")
        check(msg, "hub", Kind.SHARES_IN, {"round": int, "senders": list, "shares": dict})
        me = self.ctx.name
        senders = msg.header["senders"]
        if not all(isinstance(s, str) for s in senders) or len(set(senders)) != len(senders):
            raise ProtocolError("hub", "sa_shares_in: senders must be distinct names")
        if not set(senders) <= set(rnd.roster) or me not in senders:
            raise ProtocolError("hub", "sa_shares_in: the senders are not a part of the roster holding this node")
        if len(senders) < rnd.threshold:
            raise ProtocolError("hub", f"sa_shares_in: {len(senders)} senders, below the threshold {rnd.threshold}")
        partners = sorted(rnd.graph[me] & set(senders))
        incoming = msg.header["shares"]
        if sorted(incoming) != partners:
            raise ProtocolError("hub", f"sa_shares_in: expected the shares of exactly {partners}")
        assert rnd.cipher is not None
        for j in partners:
            blob = incoming[j]
            try:
                cipher = _share_cipher(rnd.cipher, rnd.keys[j]["cipher_key"], rnd.context, me, j)
                plain = cipher.decrypt(_nonce(j, me), blob, _aad(self.ctx.run_id, rnd.number, j, me))
            except (InvalidTag, ValueError, TypeError):
                raise ProtocolError("hub", f"the share from {j!r} does not decrypt: it was altered or misdirected")
            rnd.held[j] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])
        rnd.sharers = sorted(senders)
        rnd.stage = "masking"
        masks = [(rnd.self_seed, 1)]
        mask_secret = x25519_from_seed(rnd.mask_seed)
        for j in partners:
            try:
                masks.append((_pair_seed(mask_secret, rnd.keys[j]["mask_key"], rnd.context, me, j), _sign_of(me, j)))
            except ValueError as exc:
                raise ProtocolError("hub", f"the mask key of {j!r} is invalid: {exc}") from exc
        rnd.mask_list = masks
        return [], lambda: self._expand(rnd)

    def _expand(self, rnd: _NodeRound) -> None:
        """Σ of this node's masks: the slow part, run on the mask lane while the model trains."""
        if rnd.stage != "masking" or rnd.masks is not None:
            return
        total = np.empty(self.size, dtype=RING_DTYPES[self.ring_bits])
        apply_masks(total, rnd.mask_list, self.ring_bits, overwrite=True)
        rnd.masks = total

    def mask(self, update: np.ndarray, fields: Mapping[str, Any]) -> np.ndarray:
        rnd = self._round
        if rnd is None or rnd.stage != "masking":
            raise ProtocolError("hub", "asked for a masked update before the round's shares were exchanged")
        weight = float(fields["weight"])
        update = np.asarray(update).reshape(-1)
        if update.size != self.size:
            raise ValueError(f"the update has {update.size} values, the masks {self.size}")
        self._expand(rnd)
        masked, rnd.masks = rnd.masks, None  # a mask is used once
        assert masked is not None
        encode_add(update, weight, masked, self.frac_bits, self.ring_bits)
        rnd.stage = "masked"
        return masked

    # 4: sign the survivor set
    def _on_survivors(self, msg: Message) -> tuple[list[Message], None]:
        rnd = self._expect(msg, "masked")
        check(msg, "hub", Kind.SURVIVORS, {"round": int, "survivors": list})
        survivors = msg.header["survivors"]
        if not all(isinstance(s, str) for s in survivors) or len(set(survivors)) != len(survivors):
            raise ProtocolError("hub", "sa_survivors: survivors must be distinct names")
        if self.ctx.name not in survivors or not set(survivors) <= set(rnd.sharers):
            raise ProtocolError("hub", "refusing the survivor set: it must hold this node and only nodes that "
                                       "shared their secrets this round")
        if len(survivors) < rnd.threshold:
            raise ProtocolError("hub", f"refusing the survivor set: {len(survivors)} node(s), below the threshold "
                                       f"{rnd.threshold}; the sum would expose too few updates")
        parts = components(rnd.graph, survivors)
        if len(parts) > 1:
            raise ProtocolError("hub", f"refusing the survivor set: its masking graph falls apart into {parts}")
        lonely = exposed(rnd.graph, survivors)
        if lonely:
            raise ProtocolError("hub", f"refusing the survivor set: {', '.join(lonely)} would keep a single mask "
                                       "partner, who alone could open its update with the hub")
        rnd.survivors = sorted(survivors)
        rnd.stage = "signed"  # one survivor set per round; the reveal below is once per round of a run
        signature = self.ctx.sign(*survivor_statement(self.ctx.run_id, rnd.number, rnd.digest, rnd.survivors))
        return [Message(Kind.SIGNATURE, {"round": rnd.number, "signature": signature})], None

    # 5: check the others agree, then reveal
    def _on_signatures(self, msg: Message) -> tuple[list[Message], None]:
        rnd = self._expect(msg, "signed")
        check(msg, "hub", Kind.SIGNATURES, {"round": int, "signatures": dict})
        signatures = msg.header["signatures"]
        statement = survivor_statement(self.ctx.run_id, rnd.number, rnd.digest, rnd.survivors)
        for signer, signature in signatures.items():
            if signer not in rnd.survivors:
                raise ProtocolError("hub", f"inconsistent views: a signature from {signer!r}, which is not among "
                                           "the survivors this node was shown")
            if not verify_statement(self._statement_key(signer), signature, *statement):
                raise ProtocolError("hub", f"inconsistent views: {signer!r} did not sign the survivor set and roster "
                                           "this node signed (the hub showed different nodes different sets, or "
                                           "replayed an old signature)")
        if len(signatures) < rnd.threshold:
            raise ProtocolError("hub", f"only {len(signatures)} node(s) signed the survivor set; {rnd.threshold} must "
                                       "agree before this node reveals anything")
        self.ctx.claim(rnd.number)  # the point of no return: never for the same round of a run twice
        survivors = set(rnd.survivors)
        self_shares = {o: held[0] for o, held in rnd.held.items() if o in survivors}
        key_shares = {o: held[1] for o, held in rnd.held.items() if o not in survivors and o in rnd.sharers}
        rnd.stage = "done"
        rnd.held = {}
        return [Message(Kind.REVEAL, {"round": rnd.number, "self_shares": self_shares, "key_shares": key_shares})], None
