"""Secure aggregation rounds in memory: an aggregator and its maskers exchanging real wire messages, with
hooks for a hub that deviates (the tests play it)."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np

from fl.transport import run_token
from fl.dealer import DealerSession
from fl.dealer_masking import DealerAggregator, DealerMasker
from fl.messages import Message
from fl.pairwise import PairwiseAggregator, PairwiseMasker
from fl.strategy import DEALER_LINK, NodeContext, RoundStart, SendTo, Weighted
from mpc.errors import PrimiaError, ProtocolError

from .fl_helpers import directory, private_key, public_key, signer, wire

RUN_ID = "run-test"


def context_for(number: int) -> bytes:
    return f"context-of-round-{number:04d}".encode()


class SecAggRound:
    """One round of pairwise or dealer-masked aggregation among ``names``.

    ``hub_to(peer, message)`` may replace (or, returning None, withhold) every message the hub sends;
    ``lose`` maps a node to the message kind at which its connection breaks ("upload": right after its
    upload reached the hub).  Nodes' refusals are collected in ``refusals`` (node -> reason) and every
    message a node sends the hub in ``from_nodes`` (node, message).
    """

    def __init__(self, names: list[str], updates: dict[str, np.ndarray], *, masking: str = "pairwise",
                 neighbours: int = 0, ring_bits: int = 32, frac_bits: int = 16, min_nodes: int = 2,
                 samples: dict[str, int] | None = None, number: int = 1, run_id: str = RUN_ID,
                 maskers: dict[str, Any] | None = None, dealer: DealerSession | None = None,
                 aggregator: type | None = None):
        self.names = sorted(names)
        self.updates = updates
        self.size = len(next(iter(updates.values())))
        self.masking = masking
        self.number = number
        self.run_id = run_id
        everyone = directory(self.names)
        if masking == "dealer":
            base: Any = (aggregator or DealerAggregator)(frac_bits=frac_bits, ring_bits=ring_bits, directory=everyone,
                                                         dealer_key=public_key("dealer"))
        else:
            base = (aggregator or PairwiseAggregator)(frac_bits=frac_bits, ring_bits=ring_bits, neighbours=neighbours,
                                                      directory=everyone)
        self.agg = Weighted(base, "samples")
        self.maskers = maskers or {n: self.masker(n, masking=masking, neighbours=neighbours, ring_bits=ring_bits,
                                                  frac_bits=frac_bits, names=self.names) for n in self.names}
        self.dealer = dealer or (DealerSession(run_token=run_token(run_id), key=private_key("dealer"), directory=everyone)
                                 if masking == "dealer" else None)
        self.start = RoundStart(number, tuple(self.names), samples or {n: 10 for n in self.names}, self.size,
                                context_for(number), run_id, min_nodes)
        self.hub_to: Callable[[str, Message], Message | None] = lambda peer, msg: msg
        self.lose: dict[str, str] = {}
        self.refusals: dict[str, str] = {}
        self.from_nodes: list[tuple[str, Message]] = []
        self.to_peers: list[tuple[str, Message]] = []
        self.uploads: dict[str, np.ndarray] = {}
        self.lost: set[str] = set()
        self.dropped_by_hub: dict[str, str] = {}

    def masker(self, name: str, *, masking: str, neighbours: int, ring_bits: int, frac_bits: int,
               names: list[str]) -> Any:
        context = NodeContext(name, self.run_id, signer(name), directory(names), public_key("dealer"))
        if masking == "dealer":
            return DealerMasker(context, size=self.size, frac_bits=frac_bits, ring_bits=ring_bits)
        return PairwiseMasker(context, size=self.size, frac_bits=frac_bits, ring_bits=ring_bits, neighbours=neighbours)

    def run(self) -> Any:
        """Play the round to the end; returns the aggregator's result (or raises what the aggregator raised)."""
        for masker in self.maskers.values():
            masker.start_round(self.number)
        self.pump(self.agg.open_round(self.start))
        return self.agg.result()

    def _lose(self, node: str) -> list[SendTo]:
        self.lost.add(node)
        return self.agg.lost(node, "connection lost")

    def pump(self, sends: list[SendTo]) -> None:
        queue = deque(sends)
        while queue:
            send = queue.popleft()
            peer = send.peer
            if peer in self.lost:
                continue
            message = self.hub_to(peer, send.message)
            if message is None:
                continue
            message = wire(message, "hub")
            self.to_peers.append((peer, message))
            if self.lose.get(peer) == message.kind:
                queue.extend(self._lose(peer))
                continue
            if peer == DEALER_LINK:
                queue.extend(self._to_dealer(message))
                continue
            queue.extend(self.deliver(peer, message))

    def _to_dealer(self, message: Message) -> list[SendTo]:
        assert self.dealer is not None
        out = []
        try:
            for action in self.dealer.receive(message):
                replies = [action.message] if hasattr(action, "message") else action.then(action.call())
                for reply in replies:
                    out += self.agg.receive(DEALER_LINK, wire(reply, "dealer"))
        except PrimiaError as exc:
            self.refusals.setdefault(DEALER_LINK, str(exc))
            return out + self._lose(DEALER_LINK)
        return out

    def deliver(self, node: str, message: Message) -> list[SendTo]:
        """``message`` to ``node``'s masker: its replies go to the hub, its slow call runs, and its upload goes
        out once it is ready."""
        masker = self.maskers[node]
        try:
            replies, slow = masker.receive(message)
            if slow is not None:
                slow()
        except ProtocolError as exc:
            self.refusals.setdefault(node, exc.reason)
            return self._lose(node)
        out = []
        for reply in replies:
            reply = wire(reply, node)
            self.from_nodes.append((node, reply))
            try:
                out += self.agg.receive(node, reply)
            except ProtocolError as exc:  # as fl.hub_protocol does: a sender that breaks the protocol is dropped
                self.dropped_by_hub[node] = exc.reason
                return out + self._lose(node)
        if masker.ready() and node not in self.uploads:
            if self.lose.get(node) == "before-upload":
                return out + self._lose(node)
            upload = masker.mask(self.updates[node], self.agg.train_fields(node))
            self.uploads[node] = upload.copy()
            out += self.agg.add_update(node, upload)
            if self.lose.get(node) == "upload":
                out += self._lose(node)
        return out

    def sent_by_nodes(self, kind: str) -> list[tuple[str, Message]]:
        return [(n, m) for n, m in self.from_nodes if m.kind == kind]


def fedavg(updates: dict[str, np.ndarray], weights: dict[str, float], names: list[str]) -> np.ndarray:
    total = sum(weights[n] * updates[n].astype(np.float64) for n in names)
    return total / sum(weights[n] for n in names)
