"""Aggregation as a strategy: the interface the hub and the nodes compose, and the wrappers around it.

The hub (:mod:`fl.hub_protocol`) owns membership, the round loop, training and
evaluation messages; how the nodes' updates become one sum is an
:class:`Aggregator` — one per mode, each in its own module:

- :class:`fl.plain.PlainAggregator`: updates in the clear (FedAvg);
- :class:`fl.pairwise.PairwiseAggregator`: pair masks on any mask graph, with
  Shamir-shared seeds and a consistency round (Bonawitz et al.; SecAgg+);
- :class:`fl.dealer_masking.DealerAggregator`: one mask per node, removed by
  the aggregation dealer (PriMIA's crypto provider).

An aggregator is sans I/O, like the hub: it opens a round (:meth:`Aggregator.open_round`),
takes the messages of its own kinds and the nodes' uploads, hears of lost
peers, says whom it waits for, and finally returns the sum and the included
nodes (:meth:`Aggregator.result`).  Its node-side twin is a :class:`Masker`
(built by the same module), which turns an update into what is uploaded.

Weighting and the server optimizer wrap any aggregator (:class:`Weighted`,
:class:`ServerStep`), as Flower's strategies wrap each other; differential
privacy will wrap it the same way.  :func:`build_aggregator` and
:func:`build_masker` are the only places that read ``cfg.aggregation``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from mpc.errors import ProtocolError

from .aggregation import ServerOptimizer, round_weights
from .errors import TooFewNodes
from .identity import verify_statement
from .messages import Message, check

if TYPE_CHECKING:
    from .config import AggregationConfig
    from .identity import Directory

__all__ = [
    "DEALER_LINK",
    "SendTo",
    "RoundStart",
    "RoundSum",
    "Aggregator",
    "StagedAggregator",
    "StagedRound",
    "survivor_statement",
    "SIGNATURE_KIND",
    "StagedMasker",
    "Wrapper",
    "Weighted",
    "ServerStep",
    "NodeContext",
    "Masker",
    "Upload",
    "build_aggregator",
    "build_masker",
    "majority",
    "threshold_rule",
]

#: the hub's name for the dealer's link (not a valid node name, so it never clashes with one)
DEALER_LINK = "@dealer"


@dataclass(frozen=True)
class SendTo:
    """Send ``message`` to ``peer`` (a node's name, or :data:`DEALER_LINK`)."""

    peer: str
    message: Message


@dataclass(frozen=True)
class RoundStart:
    """What an aggregator knows when a round opens.

    Attributes:
        number: the round (1, 2, ...).
        nodes: the nodes asked to train, sorted.
        samples: each node's training-sample count.
        size: values in an update.
        context: bytes unique to this round of this run: every key and statement of the round is bound to them.
        run_id: the run.
        min_nodes: fewest nodes whose updates may be summed.
        model: the global weights the nodes train from.
        weights: each node's weight in the sum (set by :class:`Weighted`; w_i = 1 without it).
    """

    number: int
    nodes: tuple[str, ...]
    samples: Mapping[str, int]
    size: int
    context: bytes
    run_id: str
    min_nodes: int
    model: np.ndarray | None = field(default=None, repr=False)
    weights: Mapping[str, float] = field(default_factory=dict)

    def weight(self, node: str) -> float:
        return float(self.weights.get(node, 1.0))


@dataclass
class RoundSum:
    """The outcome of a round: Σ_U w_i u_i over the included nodes U, and what wrappers add."""

    total: np.ndarray = field(repr=False)
    weight: float
    included: list[str]
    dropped: list[str]
    weights: dict[str, float]
    model: np.ndarray | None = field(default=None, repr=False)

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.weight


def majority(count: int, min_nodes: int) -> int:
    """The consistency threshold of a round among ``count`` nodes: at least ``min_nodes``, at least 2, and
    more than half, so that two different views of the round cannot both gather it (see docs/federation.md)."""
    return max(2, min_nodes, count // 2 + 1)


def threshold_rule(count: int, min_nodes: int) -> str:
    """Why a secure round needs :func:`majority` nodes, in words (for errors)."""
    return (f"secure aggregation's threshold: more than half of the {count} nodes in the round's roster, at least "
            f"2 and at least federation.min_nodes = {min_nodes}")


class Aggregator(abc.ABC):
    """The hub's side of one aggregation mode, one round at a time, sans I/O.

    Methods raise :class:`mpc.errors.ProtocolError` when a peer's message is
    wrong (the hub drops that peer) and :class:`fl.errors.RoundFailed` when the
    round cannot complete (the hub fails it, naming the reason).
    """

    #: message kinds from nodes (and the dealer) this aggregator consumes, besides the nodes' uploads
    kinds: frozenset[str] = frozenset()
    #: peers other than nodes it needs (e.g. :data:`DEALER_LINK`)
    needs: frozenset[str] = frozenset()
    #: what it calls itself in logs and reports
    label: str = "aggregation"

    @abc.abstractmethod
    def open_round(self, start: RoundStart) -> list[SendTo]:
        """Start a round; returns the messages that set it up."""

    def train_fields(self, node: str) -> dict[str, Any]:
        """Fields this aggregator adds to ``node``'s train message."""
        return {}

    @abc.abstractmethod
    def receive(self, peer: str, msg: Message) -> list[SendTo]:
        """A message of one of :attr:`kinds`."""

    @abc.abstractmethod
    def add_update(self, node: str, update: np.ndarray) -> list[SendTo]:
        """``node``'s upload (the array of its ``update`` message)."""

    @abc.abstractmethod
    def lost(self, peer: str, reason: str) -> list[SendTo]:
        """``peer`` left (disconnected, timed out or broke the protocol)."""

    @abc.abstractmethod
    def waiting_for(self) -> set[str]:
        """The peers whose answer the current stage waits for."""

    @property
    @abc.abstractmethod
    def stage(self) -> str:
        """The current stage's name (for errors, logs and deadlines)."""

    @property
    def training(self) -> bool:
        """Whether the current stage waits for training (the longer deadline applies)."""
        return False

    @property
    def sum_fixed(self) -> bool:
        """Whether the set of included updates is fixed (a node lost now no longer changes the sum)."""
        return False

    @abc.abstractmethod
    def complete(self) -> bool:
        """Whether :meth:`result` can be called."""

    @abc.abstractmethod
    def result(self) -> RoundSum:
        """The round's sum (heavy for masked modes: run it off the event loop)."""

    # the server-side state a wrapper may carry across rounds (checkpointed)
    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        pass


#: the consistency round's message, the same in every masked mode: a node's signature on the survivor set
SIGNATURE_KIND = "sa_signature"


def survivor_statement(run_id: str, number: int, roster: bytes, survivors: list[str]) -> tuple:
    """What a node signs in the consistency round: the survivor set it was shown, bound to the run, the round
    and the digest of the roster (and keys) it was shown."""
    return ("survivors", run_id, number, roster, sorted(survivors))


@dataclass
class StagedRound:
    """What every masked round keeps at the hub; each mode's round record adds its own fields."""

    start: RoundStart
    stage: str = "keys"
    waiting: set[str] = field(default_factory=set)   # who owes a message at this stage
    alive: set[str] = field(default_factory=set)
    keys: dict[str, dict[str, bytes]] = field(default_factory=dict)   # node -> its signed round keys
    roster: list[str] = field(default_factory=list)
    digest: bytes = b""
    threshold: int = 2
    total: np.ndarray | None = field(default=None, repr=False)   # the running sum of the masked uploads
    uploaded: set[str] = field(default_factory=set)
    survivors: list[str] = field(default_factory=list)
    signatures: dict[str, bytes] = field(default_factory=dict)   # node -> its signature on the survivor set


class StagedAggregator(Aggregator):
    """What the masked aggregators share: one round at a time in ``self._round``, stages named as in their
    module docstrings, "upload" the one that waits for training; uploads are ring integers of ``ring_bits``
    summed as they come."""

    _round: StagedRound | None = None
    directory: "Directory"
    ring_bits: int

    def _r(self) -> Any:
        assert self._round is not None, "no round is open"
        return self._round

    @property
    def stage(self) -> str:
        return self._round.stage if self._round is not None else "idle"

    @property
    def training(self) -> bool:
        return self.stage == "upload"

    @property
    def sum_fixed(self) -> bool:
        return self.stage in ("consistency", "unmask", "done")

    def waiting_for(self) -> set[str]:
        return set(self._r().waiting)

    def complete(self) -> bool:
        return self._round is not None and self._round.stage == "done"

    def train_fields(self, node: str) -> dict[str, Any]:
        return {"weight": self._r().start.weight(node)}

    def _expect(self, peer: str, msg: Message, stage: str) -> Any:
        """The open round, if ``peer`` owes ``msg`` at ``stage`` of it; else a ProtocolError naming why not."""
        rnd = self._r()
        if rnd.stage != stage:
            raise ProtocolError(peer, f"sent {msg.kind!r} while the round is at stage {rnd.stage}")
        if peer not in rnd.waiting:
            raise ProtocolError(peer, f"sent {msg.kind!r} it does not owe")
        if msg.header.get("round") != rnd.start.number:
            raise ProtocolError(peer, f"{msg.kind} for round {msg.header.get('round')!r} during round {rnd.start.number}")
        return rnd

    def add_update(self, node: str, update: np.ndarray) -> list[SendTo]:
        """Add a masked upload (ring integers of ``self.ring_bits``) to the round's running total."""
        from .masks import RING_DTYPES

        rnd = self._r()
        if rnd.stage != "upload" or node not in rnd.waiting:
            raise ProtocolError(node, f"sent an update it does not owe (stage {rnd.stage})")
        dtype = RING_DTYPES[self.ring_bits]
        if update.dtype != dtype or update.shape != (rnd.start.size,):
            raise ProtocolError(node, f"masked update must be {dtype} of shape ({rnd.start.size},), got "
                                      f"{update.dtype} {update.shape}")
        if rnd.total is None:
            rnd.total = update.copy()
        else:
            rnd.total += update
        rnd.uploaded.add(node)
        rnd.waiting.discard(node)
        return self._advance()

    def _on_signature(self, peer: str, msg: Message) -> list[SendTo]:
        """A node's signature on the survivor set of the consistency stage, checked against its key."""
        rnd = self._expect(peer, msg, "consistency")
        check(msg, peer, SIGNATURE_KIND, {"round": int, "signature": bytes})
        start = rnd.start
        statement = survivor_statement(start.run_id, start.number, rnd.digest, rnd.survivors)
        if not verify_statement(self.directory.get(peer), msg.header["signature"], *statement):
            raise ProtocolError(peer, "its signature on the survivor set does not verify")
        rnd.signatures[peer] = msg.header["signature"]
        rnd.waiting.discard(peer)
        return self._advance()

    def _advance(self) -> list[SendTo]:
        raise NotImplementedError

    def _need(self, stage: str, remaining: list[str], threshold: int) -> None:
        """Fail the round when fewer than ``threshold`` nodes remain at ``stage``."""
        if len(remaining) < threshold:
            rnd = self._r()
            count = len(rnd.roster) if rnd.roster else len(rnd.start.nodes)
            raise TooFewNodes(rnd.start.number, stage, sorted(remaining), threshold,
                              threshold_rule(count, rnd.start.min_nodes))


class Wrapper(Aggregator):
    """An aggregator around another: every call goes through unless overridden."""

    def __init__(self, inner: Aggregator):
        self.inner = inner
        self.kinds, self.needs, self.label = inner.kinds, inner.needs, inner.label

    def open_round(self, start: RoundStart) -> list[SendTo]:
        return self.inner.open_round(start)

    def train_fields(self, node: str) -> dict[str, Any]:
        return self.inner.train_fields(node)

    def receive(self, peer: str, msg: Message) -> list[SendTo]:
        return self.inner.receive(peer, msg)

    def add_update(self, node: str, update: np.ndarray) -> list[SendTo]:
        return self.inner.add_update(node, update)

    def lost(self, peer: str, reason: str) -> list[SendTo]:
        return self.inner.lost(peer, reason)

    def waiting_for(self) -> set[str]:
        return self.inner.waiting_for()

    @property
    def stage(self) -> str:
        return self.inner.stage

    @property
    def training(self) -> bool:
        return self.inner.training

    @property
    def sum_fixed(self) -> bool:
        return self.inner.sum_fixed

    def complete(self) -> bool:
        return self.inner.complete()

    def result(self) -> RoundSum:
        return self.inner.result()

    def state(self) -> dict[str, np.ndarray]:
        return self.inner.state()

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.load_state(state)


class Weighted(Wrapper):
    """FedAvg weighting: w_i from the nodes' sample counts (or equal), normalised over the nodes asked to
    train; the mean is then Σ_U w_i u_i / Σ_U w_i over the included ones."""

    def __init__(self, inner: Aggregator, weighting: str):
        super().__init__(inner)
        round_weights({"check": 1}, weighting)  # refuses an unknown weighting now, not in round 1
        self.weighting = weighting

    def open_round(self, start: RoundStart) -> list[SendTo]:
        weights = round_weights({n: start.samples[n] for n in start.nodes}, self.weighting)
        return self.inner.open_round(replace(start, weights=weights))


class ServerStep(Wrapper):
    """The server optimizer (FedAvgM) on the mean update: the round's result carries the new global model."""

    def __init__(self, inner: Aggregator, optimizer: ServerOptimizer):
        super().__init__(inner)
        self.optimizer = optimizer
        self._model: np.ndarray | None = None

    def open_round(self, start: RoundStart) -> list[SendTo]:
        if start.model is None:
            raise ValueError("ServerStep needs the round's global model")
        self._model = start.model
        return self.inner.open_round(start)

    def result(self) -> RoundSum:
        outcome = self.inner.result()
        assert self._model is not None
        outcome.model = self.optimizer.step(self._model, outcome.mean)
        return outcome

    def state(self) -> dict[str, np.ndarray]:
        return self.optimizer.state()

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.optimizer.load_state(state)


# -- the node side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeContext:
    """What a node's masker needs to know about itself and whom it trusts.

    Attributes:
        name: the node's name.
        run_id: the run the hub said (bound into every statement).
        sign: signs a statement with the node's long-term key (:func:`fl.identity.sign_statement`).
        directory: the public keys of the federation's nodes (pairwise masking checks their statements against
            them, and the consistency threshold is a majority of them, whatever roster the hub shows).
        dealer_key: the pinned public key of the aggregation dealer (dealer masking checks its statements).
        min_nodes: the node's own floor on the nodes in a sum (the hub's ``min_nodes`` can only raise it).
        claim: called with the round number before the node helps open the round's sum (pairwise: before it
            reveals; dealer: before it signs the survivor set the dealer needs); raises
            :class:`mpc.errors.ProtocolError` if it already did for that round of the run (two sums of the same
            updates would expose one).
    """

    name: str
    run_id: str
    sign: Callable[..., bytes]
    directory: "Directory | None" = None
    dealer_key: Any = None
    min_nodes: int = 2
    claim: Callable[[int], None] = lambda number: None

    def threshold(self, roster_size: int, hub_min_nodes: int) -> int:
        """T for a round: a majority of the federation as this node knows it (or of the roster, without a
        directory), at least 2 and at least both floors."""
        members = len(self.directory.keys) if self.directory is not None and self.directory.keys else roster_size
        return majority(max(members, roster_size), max(hub_min_nodes, self.min_nodes))


@dataclass(frozen=True)
class Upload:
    """What a masker hands the node to send: the array of its ``update`` message."""

    array: np.ndarray


class Masker(abc.ABC):
    """A node's side of one aggregation mode: the round's set-up messages in, the masked update out.

    :meth:`receive` returns messages to send and, optionally, a slow call to
    run on the node's mask lane (expanding masks while the model trains);
    :meth:`mask` is called (on the mask lane) once the update is trained and
    :meth:`ready` holds.  Methods raise :class:`mpc.errors.ProtocolError` when
    the hub's messages are wrong or inconsistent: the node then refuses the
    round and reveals nothing more.
    """

    kinds: frozenset[str] = frozenset()

    @abc.abstractmethod
    def start_round(self, number: int) -> None:
        """A new round begins (its train message arrived, or its first set-up message)."""

    @abc.abstractmethod
    def receive(self, msg: Message) -> tuple[list[Message], Callable[[], Any] | None]:
        """A set-up message: (replies, a slow call for the mask lane or None)."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """Whether :meth:`mask` may be called now (the round's set-up is complete)."""

    @abc.abstractmethod
    def mask(self, update: np.ndarray, fields: Mapping[str, Any]) -> np.ndarray:
        """The upload for ``update`` (``fields``: the round's train message header)."""


class StagedMasker(Masker):
    """A masker whose node-side round moves through named stages: one round at a time, each message checked
    against the round it names and the stage it belongs to.  ``round_type(number)`` makes a round with
    ``.number`` and ``.stage``."""

    round_type: Callable[[int], Any]
    _round: Any = None

    def start_round(self, number: int) -> None:
        if self._round is None or self._round.number != number:
            self._round = type(self).round_type(number)

    def _expect(self, msg: Message, stage: str) -> Any:
        rnd = self._round
        if rnd is None or msg.header.get("round") != rnd.number:
            raise ProtocolError("hub", f"{msg.kind} for round {msg.header.get('round')!r}, which is not running here")
        if rnd.stage != stage:
            raise ProtocolError("hub", f"sent {msg.kind!r} while this node's round is at stage {rnd.stage}")
        return rnd


def build_aggregator(agg: "AggregationConfig", *, directory: "Directory", dealer_key: Any = None,
                     optimizer: ServerOptimizer) -> Aggregator:
    """The hub's aggregator for ``[aggregation]``, weighted and with the server step."""
    if not agg.secure:
        from .plain import PlainAggregator

        base: Aggregator = PlainAggregator()
    elif agg.masking == "dealer":
        from .dealer_masking import DealerAggregator

        base = DealerAggregator(frac_bits=agg.frac_bits, ring_bits=agg.ring_bits, directory=directory,
                                dealer_key=dealer_key)
    else:
        from .pairwise import PairwiseAggregator

        base = PairwiseAggregator(frac_bits=agg.frac_bits, ring_bits=agg.ring_bits, neighbours=agg.neighbours,
                                  directory=directory)
    return ServerStep(Weighted(base, agg.weighting), optimizer)


def build_masker(agg: "AggregationConfig", context: NodeContext, *, size: int) -> Masker:
    """A node's masker for the ``[aggregation]`` the hub sent (``size``: values in an update)."""
    if not agg.secure:
        from .plain import PlainMasker

        return PlainMasker()
    if agg.masking == "dealer":
        from .dealer_masking import DealerMasker

        return DealerMasker(context, size=size, frac_bits=agg.frac_bits, ring_bits=agg.ring_bits)
    from .pairwise import PairwiseMasker

    return PairwiseMasker(context, size=size, frac_bits=agg.frac_bits, ring_bits=agg.ring_bits,
                          neighbours=agg.neighbours)
