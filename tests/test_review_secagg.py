"""Review of secure aggregation (fl.pairwise, fl.dealer_masking): attacks that the library's own node code does not
stop, played with the library's own maskers, aggregator and dealer (tests/secagg_helpers.SecAggRound).

Each test asserts the property the docs promise, so it fails while the weakness is there; the failure message says
what the hub recovered.  See the review report for the fixes proposed.
"""

from __future__ import annotations

import numpy as np
import pytest

from fl.dealer_masking import DealerMasker
from fl.dealer_masking import _key_statement as dealer_key_statement
from fl.errors import RoundFailed, TooFewNodes
from fl.identity import Directory
from fl.masks import RING_DTYPES, decode_sum, prg_mask
from fl.messages import Message
from fl.pairwise import (
    Kind,
    PairwiseAggregator,
    PairwiseMasker,
    _key_statement,
)
from fl.strategy import NodeContext

from .fl_helpers import directory, keys_dir, public_key, signer
from .secagg_helpers import RUN_ID, SecAggRound


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


def test_malicious_hub_joins_the_round_as_node_hub_and_opens_every_update(rng):
    """The node's --peer-keys folder holds hub.pub (the deployment keeps every .pub together).  A hub that signs
    round keys under the name "hub" to pose as a fifth member (to split four honest nodes into {a, b, hub} and
    {c, d, hub}, each group seeing T = 3 valid signatures) is refused by every node at the roster: no member may be
    named hub or dealer, and `primia node` keeps neither the hub's nor the dealer's key among the members."""
    honest = ["a", "b", "c", "d"]
    names = honest + ["hub"]
    updates = updates_for(rng, honest)
    updates["hub"] = np.zeros(512, dtype=np.float32)  # the hub's own "update"
    maskers = {n: PairwiseMasker(NodeContext(n, RUN_ID, signer(n), cli_directory()), size=512, frac_bits=16,
                                 ring_bits=32, neighbours=0) for n in names}
    r = SecAggRound(names, updates, aggregator=RecordingHub, maskers=maskers)
    with pytest.raises((RoundFailed, TooFewNodes)):
        r.run()
    assert {n: reason for n, reason in r.refusals.items() if n in honest} == {
        n: "the round includes a member named 'hub', which is not a node's name" for n in honest}
    assert not r.sent_by_nodes(Kind.SHARES) and not r.sent_by_nodes(Kind.REVEAL) and not r.uploads
    # what `primia node` trusts: the folder's keys without the hub's and the dealer's
    members = cli_directory().nodes(not_keys=[public_key("hub"), public_key("dealer")])
    assert "hub" not in members and "dealer" not in members and "a" in members


# -- 2. sparse graphs: one colluding neighbour and one dropout, with an honest hub --------------------------------


def test_sparse_graph_one_colluding_neighbour_and_one_dropout_expose_a_node(rng):
    """With 10 nodes and neighbours = 2, ONE colluding neighbour (n1) would be enough once n0's other neighbour
    (n9) drops after sharing: the protocol would open n0's self mask (n0 survived) and n9's mask key (n9 dropped),
    and n1 knows its own pair seed with n0.  So a survivor may not keep a single mask partner: the hub fails the
    round before anyone signs or reveals (and every node would refuse to sign such a set)."""
    names = [f"n{i}" for i in range(10)]
    updates = updates_for(rng, names)
    r = SecAggRound(names, updates, neighbours=2)
    r.lose = {"n9": "before-upload"}
    with pytest.raises(RoundFailed, match="n0, n8 would keep a single mask partner"):
        r.run()
    assert not r.sent_by_nodes(Kind.SIGNATURE) and not r.sent_by_nodes(Kind.REVEAL)
    # neighbours = 3 survives the same dropout: every survivor keeps two partners or more
    r3 = SecAggRound(names, updates, neighbours=3)
    r3.lose = {"n9": "before-upload"}
    assert r3.run().dropped == ["n9"]


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


@pytest.mark.parametrize("masking, member", [("pairwise", LowOrderPairwise), ("dealer", LowOrderDealer)])
def test_a_member_with_a_low_order_key_is_dropped_by_the_hub_and_the_round_goes_on(rng, masking, member):
    """A node that signs the X25519 point 0 as its round key would make every honest node (or the dealer) refuse
    the roster; the hub checks keys when they arrive, drops that node naming it, and the round completes."""
    names = ["a", "b", "c", "d"]
    updates = updates_for(rng, names)
    bad = member(NodeContext("c", RUN_ID, signer("c"), directory(names), public_key("dealer")), size=512,
                 frac_bits=16, ring_bits=32, **({"neighbours": 0} if masking == "pairwise" else {}))
    r = SecAggRound(names, updates, masking=masking)
    r.maskers["c"] = bad
    result = r.run()
    assert result.included == ["a", "b", "d"]
    assert "a low-order X25519 point" in r.dropped_by_hub["c"] and not r.refusals


def test_a_member_sending_shares_that_do_not_decrypt_fails_the_round_without_revealing_anything(rng):
    """Known limit (docs/federation.md, threat model): the hub cannot tell a member's undecryptable shares from its
    own tampering (the shares are encrypted end to end), so each partner refuses the round.  A member can thus
    deny service; it learns nothing, and nothing is revealed."""
    names = ["a", "b", "c", "d"]
    updates = updates_for(rng, names)
    r = SecAggRound(names, updates)
    r.maskers["c"] = GarbageShares(NodeContext("c", RUN_ID, signer("c"), directory(names), public_key("dealer")),
                                   size=512, frac_bits=16, ring_bits=32, neighbours=0)
    with pytest.raises((RoundFailed, TooFewNodes)):
        r.run()
    assert all("the share from 'c' does not decrypt" in r.refusals[n] for n in ("a", "b", "d"))
    assert set(r.uploads) <= {"c"} and not r.sent_by_nodes(Kind.REVEAL)  # the honest nodes stopped before uploading
