"""Review of secure aggregation (fl.pairwise, fl.dealer_masking): attacks that the library's own node code does not
stop, played with the library's own maskers, aggregator and dealer (tests/secagg_helpers.SecAggRound).

Each test asserts the property the docs promise, so it fails while the weakness is there; the failure message says
what the hub recovered.  See the review report for the fixes proposed.
"""

from __future__ import annotations

import numpy as np
import pytest

from fl import shamir
from fl.dealer_masking import DealerMasker
from fl.dealer_masking import _key_statement as dealer_key_statement
from fl.errors import RoundFailed, TooFewNodes
from fl.graphs import holders
from fl.identity import Directory, sign_statement
from fl.masks import RING_DTYPES, decode_sum, prg_mask, x25519_from_seed
from fl.messages import Message
from fl.pairwise import (
    Kind,
    PairwiseAggregator,
    PairwiseMasker,
    _key_statement,
    _pair_seed,
    _positions,
    _sign_of,
    _survivor_statement,
    share_threshold,
)
from fl.strategy import NodeContext
from mpc.errors import PrimiaError

from .fl_helpers import keys_dir, private_key, public_key, signer
from .secagg_helpers import RUN_ID, SecAggRound, context_for


def updates_for(rng, names, size=512, scale=0.05):
    return {n: rng.normal(scale=scale, size=size).astype(np.float32) for n in names}


def unmask(upload: np.ndarray, self_seed: bytes, pair_seeds: list[tuple[bytes, int]], weight: float,
           ring_bits: int = 32, frac_bits: int = 16) -> np.ndarray:
    """What the hub computes from one node's upload once it knows every seed of that node's masks."""
    y = upload.astype(RING_DTYPES[ring_bits]).copy()
    y -= prg_mask(self_seed, y.size, ring_bits)
    for seed, sign in pair_seeds:
        mask = prg_mask(seed, y.size, ring_bits)
        if sign > 0:
            y -= mask
        else:
            y += mask
    return decode_sum(y, frac_bits=frac_bits, ring_bits=ring_bits) / weight


def cli_directory() -> Directory:
    """The public keys a node started as the docs say trusts: cli/node.py reads every NAME.pub in the folder of
    --hub-key (default of --peer-keys), and that folder holds hub.pub."""
    found = Directory.from_folder(keys_dir(), what="--peer-keys")
    assert "hub" in found  # what the deployment steps put there
    return found


# -- 1. the hub joins its own round under the name "hub" -----------------------------------------------------


class RecordingHub(PairwiseAggregator):
    """A hub that relays what it likes: it keeps every survivor signature and reveal without checking them."""

    def _on_signature(self, peer, msg):
        rnd = self._expect(peer, msg, "consistency")
        rnd.signatures[peer] = msg.header["signature"]
        rnd.waiting.discard(peer)
        return self._advance()

    def _on_reveal(self, peer, msg):
        rnd = self._r()
        rnd.waiting.discard(peer)
        return []


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="review: nodes accept the hub's own key as a member's (hub.pub in --peer-keys)")
def test_malicious_hub_joins_the_round_as_node_hub_and_opens_every_update(rng):
    """The node's --peer-keys folder holds hub.pub (docs: "the node needs hub.pub and the other nodes' .pub files in
    the same folder"), so a node accepts round keys signed by the hub under the name "hub" as a member's.  With that
    one Sybil the hub splits four honest nodes into {a, b, hub} and {c, d, hub}: each group sees T = 3 valid
    signatures on its own set (the hub signs both), a's self-mask seed comes from a, b and the hub's own share, a's
    mask key from c, d and the hub's own share — every single update is opened, with no colluding node."""
    honest = ["a", "b", "c", "d"]
    names = honest + ["hub"]
    updates = updates_for(rng, honest)
    updates["hub"] = np.zeros(512, dtype=np.float32)  # the hub's own "update"
    maskers = {n: PairwiseMasker(NodeContext(n, RUN_ID, signer(n), cli_directory()), size=512, frac_bits=16,
                                 ring_bits=32, neighbours=0) for n in names}
    r = SecAggRound(names, updates, aggregator=RecordingHub, maskers=maskers)
    group_1, group_2 = ["a", "b", "hub"], ["c", "d", "hub"]
    hub_held: dict = {}

    def hub_to(peer, msg):
        rnd = r.agg.inner._round
        if msg.kind == Kind.SURVIVORS:
            hub_held.update(r.maskers["hub"]._round.held)  # the hub's own shares, as the member "hub"
            return Message(msg.kind, {**msg.header, "survivors": group_1 if peer in group_1 else group_2})
        if msg.kind == Kind.SIGNATURES:
            group = group_1 if peer in ("a", "b", "hub") else group_2
            sigs = {n: s for n, s in msg.header["signatures"].items() if n in group and n != "hub"}
            sigs["hub"] = sign_statement(private_key("hub"),
                                         *_survivor_statement(RUN_ID, 1, rnd.digest, group))
            return Message(msg.kind, {**msg.header, "signatures": sigs})
        return msg

    r.hub_to = hub_to
    for m in r.maskers.values():
        m.start_round(1)
    r.pump(r.agg.open_round(r.start))

    rnd = r.agg.inner._round
    pos = _positions(rnd.roster)
    reveals = {n: m.header for n, m in r.sent_by_nodes(Kind.REVEAL)}
    recovered = {}
    for victim in honest:
        try:
            b_shares = {pos[n]: h["self_shares"][victim] for n, h in reveals.items()
                        if n != "hub" and victim in h["self_shares"]}
            m_shares = {pos[n]: h["key_shares"][victim] for n, h in reveals.items()
                        if n != "hub" and victim in h["key_shares"]}
            b_shares[pos["hub"]], m_shares[pos["hub"]] = hub_held[victim]
            t = share_threshold(len(holders(rnd.graph, victim)))
            b_seed, m_seed = shamir.combine(b_shares, t), shamir.combine(m_shares, t)
        except (KeyError, ValueError):
            continue  # not enough shares: the attack failed for this node
        secret = x25519_from_seed(m_seed)
        pairs = [(_pair_seed(secret, rnd.keys[j]["mask_key"], rnd.start.context, victim, j), _sign_of(victim, j))
                 for j in sorted(rnd.graph[victim])]
        got = unmask(r.uploads[victim], b_seed, pairs, rnd.start.weight(victim))
        recovered[victim] = float(np.abs(got - updates[victim]).max())
    exposed = {n: e for n, e in recovered.items() if e < 1e-3}
    assert not exposed, (f"the hub, joining as 'hub', recovered single updates {sorted(exposed)} (max error "
                         f"{max(exposed.values()):.1e}); refusals: {r.refusals}")


# -- 2. sparse graphs: one colluding neighbour and one dropout, with an honest hub --------------------------------


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="review: with neighbours = 2 one colluder and one dropout expose a node")
def test_sparse_graph_one_colluding_neighbour_and_one_dropout_expose_a_node(rng):
    """docs/federation.md: the guarantee holds while c < 2T - |R1| and fewer than t_i of any honest node's holders
    collude ("with k = 2, two colluding neighbours of a node and the hub can open its masks").  With 10 nodes and
    neighbours = 2 (T = 6, 2T - |R1| = 2, t_i = 2), ONE colluding neighbour (n1) is enough once n0's other
    neighbour (n9) drops after sharing: the honest protocol opens n0's self mask (n0 is a survivor) and n9's mask
    key (n9 dropped), and n1 knows its own pair seed with n0.  The hub follows the protocol to the letter; a hub that
    deviates does not even need the dropout (it ignores n9's upload and calls n9 dropped)."""
    names = [f"n{i}" for i in range(10)]
    updates = updates_for(rng, names)
    r = SecAggRound(names, updates, neighbours=2)
    r.lose = {"n9": "before-upload"}
    result = r.run()
    assert result.dropped == ["n9"]  # an ordinary round: the hub saw one dropout
    rnd = r.agg.inner._round
    pos = _positions(rnd.roster)
    reveals = {n: m.header for n, m in r.sent_by_nodes(Kind.REVEAL)}
    victim, colluder, dropped = "n0", "n1", "n9"
    assert sorted(rnd.graph[victim]) == [colluder, dropped]
    t = share_threshold(3)
    b_seed = shamir.combine({pos[n]: h["self_shares"][victim] for n, h in reveals.items()
                             if victim in h["self_shares"]}, t)
    m_dropped = shamir.combine({pos[n]: h["key_shares"][dropped] for n, h in reveals.items()
                                if dropped in h["key_shares"]}, t)
    colluder_secret = x25519_from_seed(r.maskers[colluder]._round.mask_seed)  # what n1 hands the hub
    context = context_for(1)
    pairs = [
        (_pair_seed(colluder_secret, rnd.keys[victim]["mask_key"], context, colluder, victim),
         _sign_of(victim, colluder)),
        (_pair_seed(x25519_from_seed(m_dropped), rnd.keys[victim]["mask_key"], context, dropped, victim),
         _sign_of(victim, dropped)),
    ]
    got = unmask(r.uploads[victim], b_seed, pairs, rnd.start.weight(victim))
    err = float(np.abs(got - updates[victim]).max())
    assert err > 1e-3, (f"one colluding neighbour and one dropout exposed n0's update (max error {err:.1e}), "
                        "below the documented collusion threshold")


# -- 3. a node with a low-order X25519 key stops every round --------------------------------------------------


LOW_ORDER = bytes(32)  # the X25519 point 0: every exchange with it fails


class LowOrderPairwise(PairwiseMasker):
    """A member that signs a low-order cipher key (a colluding or broken node: it holds a valid identity)."""

    def _on_keys(self, msg):
        replies, slow = super()._on_keys(msg)
        header = dict(replies[0].header)
        rnd = self._round
        header["cipher_key"] = LOW_ORDER
        header["signature"] = self.ctx.sign(*_key_statement(self.ctx.run_id, rnd.number, rnd.context, self.ctx.name,
                                                            LOW_ORDER, header["mask_key"]))
        return [Message(replies[0].kind, header)], slow


class GarbageShares(PairwiseMasker):
    """A member that sends its partners random bytes instead of encrypted shares (the hub cannot tell: AES-GCM)."""

    def _on_roster(self, msg):
        replies, slow = super()._on_roster(msg)
        header = dict(replies[0].header)
        header["shares"] = {j: bytes(len(blob)) for j, blob in header["shares"].items()}
        return [Message(replies[0].kind, header)], slow


class LowOrderDealer(DealerMasker):
    def _on_keys(self, msg):
        (reply,) = super()._on_keys(msg)
        rnd = self._round
        header = dict(reply.header, mask_key=LOW_ORDER)
        header["signature"] = self.ctx.sign(*dealer_key_statement(self.ctx.run_id, rnd.number, rnd.context,
                                                                  self.ctx.name, LOW_ORDER))
        return [Message(reply.kind, header)]


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception,
                   reason="review: one member's bad key or bad share ciphertexts fail the round for everyone")
@pytest.mark.parametrize("masking, member", [("pairwise", LowOrderPairwise), ("dealer", LowOrderDealer),
                                             ("pairwise", GarbageShares)])
def test_one_misbehaving_member_fails_the_round_for_everyone(rng, masking, member):
    """The hub checks only the length and signature of a node's round key.  A node that signs the X25519 point 0
    makes every honest node refuse the roster (blaming the hub: "the cipher key of 'c' is invalid"), or the dealer
    refuse it, so the round fails — every round, since the key is the node's own choice.  Expected: the hub refuses
    the key when it arrives, drops that node, and the round completes among the others.  Likewise a node whose
    encrypted shares do not decrypt: each partner blames the hub ("altered or misdirected") and leaves; nothing
    lets it tell a sender's garbage from the hub's tampering (the ciphertexts are not signed)."""
    names = ["a", "b", "c", "d"]
    updates = updates_for(rng, names)
    everyone = cli_directory()
    bad = member(NodeContext("c", RUN_ID, signer("c"), everyone, public_key("dealer")), size=512, frac_bits=16,
                 ring_bits=32, **({"neighbours": 0} if masking == "pairwise" else {}))
    r = SecAggRound(names, updates, masking=masking)
    r.maskers["c"] = bad
    try:
        result = r.run()
    except (RoundFailed, TooFewNodes, PrimiaError) as exc:
        pytest.fail(f"one member ({member.__name__}) failed the round: {exc}; refusals: {r.refusals}")
    assert result.included == ["a", "b", "d"]
