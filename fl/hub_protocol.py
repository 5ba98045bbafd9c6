"""The hub, sans I/O: peers come and go, messages come in, messages to send and events go out.

:class:`HubProtocol` never touches a socket or a clock: every entry point takes
``now`` (monotonic seconds) and returns a list of actions — :class:`SendTo`,
:class:`Disconnect` — and events — :class:`Joined`, :class:`Ready`,
:class:`RoundCollected`, :class:`Evaluated`, :class:`Dropped`,
:class:`Failed`.  The runner (:mod:`fl.hub`) owns the one round loop; it
reports connections (:meth:`HubProtocol.connected`, :meth:`HubProtocol.lost`),
starts rounds and evaluations, and calls :meth:`HubProtocol.on_deadline` when
:attr:`HubProtocol.deadline` passes.

Membership.  Nodes dial the hub and may do so at any time; each node goes
through its own set-up, independent of the rounds::

    connected  -> hello       -> hello_ack (data summary)          -> Joined
    (once the runner has configured the run)
               -> configure   -> configured (model layout checked) -> Ready

A round includes the nodes that are ready when it starts; a node that connects
later (or reconnects after a restart) takes part from the next round.  How a
round's updates become one sum is the aggregator's business
(:mod:`fl.strategy`): the hub sends every node of the round ``train`` (the
global weights and the aggregator's fields), routes the aggregator's message
kinds and the nodes' ``update`` uploads to it, and tells it about lost peers.

Dropouts: a node that disconnects, times out, reports an error or breaks the
protocol leaves (a protocol breach also closes its connection).  With
``on_dropout = "continue"`` a round goes on while its aggregator can (at least
``min_nodes`` nodes, and whatever its own thresholds need); with ``"fail"``, a
node lost before the included set is fixed fails the round.  A misbehaving
node never crashes the hub: its messages are checked
(:func:`fl.messages.check`) and a violation only disconnects it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpc.errors import PrimiaError, ProtocolError

from .config import Config
from .errors import RoundFailed, TooFewNodes
from .messages import DATA_SUMMARY, PROTOCOL_VERSION, TRAIN_FIGURES, Kind, Message, check, check_map
from .metrics import SCORE_BINS, EvalSummary
from .models import Layout
from .strategy import DEALER_LINK, Aggregator, RoundStart, RoundSum, SendTo

__all__ = [
    "DEALER_LINK",
    "NodeState",
    "SendTo",
    "Disconnect",
    "Joined",
    "Ready",
    "RoundCollected",
    "Evaluated",
    "Dropped",
    "Failed",
    "RoundResult",
    "HubProtocol",
]

#: exceptions that odd values inside an otherwise valid message can raise while it is read
_MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError)


class NodeState(enum.Enum):
    HELLO = "hello"              # hello sent, waiting for hello_ack
    JOINED = "joined"            # hello_ack received; waiting for the run to be configured
    CONFIGURING = "configuring"  # configure sent
    READY = "ready"              # may be asked to train or evaluate
    TRAINING = "training"        # in a round
    EVALUATING = "evaluating"


# -- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disconnect:
    peer: str
    reason: str


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Joined:
    """A node answered hello: its data summary and warnings."""

    node: str
    summary: dict[str, Any]
    warnings: list[str]


@dataclass(frozen=True)
class Ready:
    """A node built the run's model and may train from the next round on."""

    node: str
    train_samples: int
    val_samples: int


@dataclass(frozen=True)
class RoundCollected:
    round: int


@dataclass(frozen=True)
class Evaluated:
    round: int
    summaries: dict[str, EvalSummary]


@dataclass(frozen=True)
class Dropped:
    node: str
    stage: str
    reason: str


@dataclass(frozen=True)
class Failed:
    error: PrimiaError


Action = SendTo | Disconnect | Joined | Ready | RoundCollected | Evaluated | Dropped | Failed


@dataclass
class RoundResult:
    """The outcome of a round: the new global model, the included and dropped nodes, and what they reported."""

    round: int
    model: np.ndarray
    mean_update: np.ndarray
    included: list[str]
    dropped: list[str]
    weights: dict[str, float]
    figures: dict[str, dict[str, Any]]


@dataclass
class _Node:
    state: NodeState
    deadline: float | None = None
    summary: dict[str, Any] | None = None
    train_samples: int = 0
    val_samples: int = 0


@dataclass
class _Round:
    number: int
    nodes: tuple[str, ...]
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    uploaded: set[str] = field(default_factory=set)
    stage: str = ""
    deadline: float | None = None


class HubProtocol:
    """The hub's side of a federation (see the module docstring).

    Args:
        cfg: the federation configuration.
        run_id: identifies the run to the nodes (kept across ``--resume``).
        session: bytes unique to this hub process, bound into every round's context.

    The aggregator (how updates become one sum, :func:`fl.strategy.build_aggregator`) comes with
    :meth:`configure`, once the model is known.
    """

    def __init__(self, cfg: Config, run_id: str, *, session: bytes):
        self.cfg = cfg
        self.run_id = run_id
        self.session = session
        self._aggregator: Aggregator | None = None
        self.nodes: dict[str, _Node] = {}
        self.dealer_connected = False
        self.spec: dict[str, Any] | None = None  # set by configure()
        self.layout: Layout | None = None
        self.classes: list[str] = []
        self.closed = False
        self._round: _Round | None = None
        self._eval: dict[str, EvalSummary] = {}
        self._eval_round = 0
        self._evaluating: set[str] = set()
        self._eval_deadline: float | None = None

    @property
    def min_nodes(self) -> int:
        return self.cfg.min_nodes

    @property
    def aggregator(self) -> Aggregator:
        if self._aggregator is None:
            raise RuntimeError("the run is not configured yet")
        return self._aggregator

    def in_setup(self) -> list[str]:
        """Nodes that connected but are not ready yet (saying hello, or building the model)."""
        return sorted(n for n, node in self.nodes.items() if node.state in (NodeState.HELLO, NodeState.CONFIGURING))

    @property
    def timeouts(self) -> tuple[float, float]:
        fed = self.cfg.federation
        return fed.reply_timeout_s, fed.train_timeout_s

    def ready_nodes(self) -> list[str]:
        return sorted(n for n, node in self.nodes.items() if node.state is NodeState.READY)

    def joined_nodes(self) -> dict[str, dict[str, Any]]:
        return {n: node.summary for n, node in sorted(self.nodes.items()) if node.summary is not None}

    @property
    def busy(self) -> bool:
        return self._round is not None or bool(self._evaluating)

    @property
    def deadline(self) -> float | None:
        times = [node.deadline for node in self.nodes.values() if node.deadline is not None]
        if self._round is not None and self._round.deadline is not None:
            times.append(self._round.deadline)
        if self._eval_deadline is not None:
            times.append(self._eval_deadline)
        return min(times) if times else None

    # -- connections -------------------------------------------------------------------------

    def connected(self, peer: str, now: float) -> list[Action]:
        """A peer authenticated (a node by its name, or :data:`DEALER_LINK`)."""
        if self.closed:
            return [SendTo(peer, Message(Kind.BYE, {"reason": "the run is over"}))]
        if peer == DEALER_LINK:
            self.dealer_connected = True
            return []
        self.nodes[peer] = _Node(NodeState.HELLO, deadline=now + self.timeouts[0])
        hello = {"protocol": PROTOCOL_VERSION, "run_id": self.run_id, "node": peer}
        return [SendTo(peer, Message(Kind.HELLO, hello))]

    def lost(self, peer: str, reason: str, now: float) -> list[Action]:
        """The connection to ``peer`` closed (the runner noticed at once, or the peer stalled)."""
        if peer == DEALER_LINK:
            self.dealer_connected = False
            return self._round_lost(peer, reason, now)
        if peer not in self.nodes:
            return []
        return self._leave(peer, reason, now, disconnect=False)

    # -- the run's set-up --------------------------------------------------------------------

    def configure(self, classes: list[str], channels: int, layout: Layout, aggregator: Aggregator,
                  now: float) -> list[Action]:
        """Fix the run's classes, channels, model and aggregation; every joined node (and every later one) is
        configured."""
        self.classes, self.layout, self._aggregator = list(classes), layout, aggregator
        self.spec = {"spec": self.cfg.node_spec(), "classes": list(classes), "channels": channels}
        actions: list[Action] = []
        for name, node in sorted(self.nodes.items()):
            if node.state is NodeState.JOINED:
                actions += self._configure(name, now)
        return actions

    def _configure(self, name: str, now: float) -> list[Action]:
        assert self.spec is not None
        node = self.nodes[name]
        node.state, node.deadline = NodeState.CONFIGURING, now + self.timeouts[1]  # loading images takes a while
        return [SendTo(name, Message(Kind.CONFIGURE, self.spec))]

    # -- rounds ------------------------------------------------------------------------------

    def begin_round(self, number: int, model: np.ndarray, lr: float, now: float) -> list[Action]:
        """Ask every ready node to train from ``model`` at learning rate ``lr``."""
        if self.busy:
            raise RuntimeError("a round or an evaluation is still running")
        assert self.layout is not None
        nodes = tuple(self.ready_nodes())
        if len(nodes) < self.min_nodes:
            return self._fail(TooFewNodes(number, "start", list(nodes), self.min_nodes))
        missing = sorted(self.aggregator.needs - ({DEALER_LINK} if self.dealer_connected else set()))
        if missing:
            return self._fail(RoundFailed(number, "start", "the dealer is not connected (aggregation.masking = "
                                                           "'dealer': start `primia dealer`)"))
        import msgpack

        context = msgpack.packb(["primia-round", self.run_id, self.session, number], use_bin_type=True)
        start = RoundStart(number, nodes, {n: self.nodes[n].train_samples for n in nodes}, self.layout.size,
                           context, self.run_id, self.min_nodes, model=np.ascontiguousarray(model, np.float32))
        self._round = rnd = _Round(number, nodes)
        for n in nodes:
            self.nodes[n].state = NodeState.TRAINING
        try:
            setup = self.aggregator.open_round(start)
        except RoundFailed as exc:
            return self._fail(exc)
        flat = start.model
        actions: list[Action] = []
        for n in nodes:
            header = {"round": number, "lr": float(lr), **self.aggregator.train_fields(n)}
            actions.append(SendTo(n, Message(Kind.TRAIN, header, {"weights": flat})))
        actions += setup
        return actions + self._round_progress(rnd, now)

    def aggregate(self) -> RoundResult:
        """The collected round's result (heavy for masked modes: run it off the event loop)."""
        rnd = self._round
        if rnd is None or not self.aggregator.complete():
            raise RuntimeError("no collected round to aggregate")
        try:
            outcome: RoundSum = self.aggregator.result()
        finally:
            self._end_round()
        assert outcome.model is not None
        figures = {n: rnd.figures[n] for n in outcome.included if n in rnd.figures}
        return RoundResult(rnd.number, outcome.model, outcome.mean, outcome.included, outcome.dropped,
                           outcome.weights, figures)

    def _end_round(self) -> None:
        rnd, self._round = self._round, None
        if rnd is None:
            return
        for n in rnd.nodes:
            node = self.nodes.get(n)
            if node is not None and node.state is NodeState.TRAINING:
                node.state = NodeState.READY

    def _round_progress(self, rnd: _Round, now: float) -> list[Action]:
        """Move the round's deadline with its stage; report completion."""
        if self._round is not rnd:
            return []
        agg = self.aggregator
        if agg.complete():
            rnd.deadline = None
            return [RoundCollected(rnd.number)]
        if agg.stage != rnd.stage:
            rnd.stage = agg.stage
            reply, train = self.timeouts
            rnd.deadline = now + (train if agg.training else reply)
        return []

    def _round_lost(self, peer: str, reason: str, now: float) -> list[Action]:
        """``peer`` is gone: the round goes on without it, or fails."""
        rnd = self._round
        if rnd is None or (peer != DEALER_LINK and peer not in rnd.nodes) or self.aggregator.complete():
            return []
        actions: list[Action] = []
        agg = self.aggregator
        try:
            if peer != DEALER_LINK and not agg.sum_fixed and peer not in rnd.uploaded:
                if self.cfg.federation.on_dropout == "fail":
                    raise RoundFailed(rnd.number, agg.stage,
                                      f"node {peer} dropped during {agg.stage}: {reason}, and federation.on_dropout "
                                      "= 'fail'")
            actions += agg.lost(peer, reason)
        except RoundFailed as exc:
            return actions + self._fail(exc)
        return actions + self._round_progress(rnd, now)

    # -- evaluation ----------------------------------------------------------------------------

    def begin_evaluation(self, number: int, model: np.ndarray, now: float) -> list[Action]:
        """Ask every ready node for metrics of ``model`` on its validation split."""
        if self.busy:
            raise RuntimeError("a round or an evaluation is still running")
        self._eval, self._eval_round = {}, number
        nodes = self.ready_nodes()
        self._evaluating = set(nodes)
        self._eval_deadline = now + self.timeouts[1]
        flat = np.ascontiguousarray(model, dtype=np.float32)
        for n in nodes:
            self.nodes[n].state = NodeState.EVALUATING
        return [SendTo(n, Message(Kind.EVALUATE, {"round": number}, {"weights": flat})) for n in nodes] + \
            self._evaluation_progress()

    def _evaluation_progress(self) -> list[Action]:
        if self._evaluating or self._eval_deadline is None:
            return []
        self._eval_deadline = None
        if not self._eval:
            return self._fail(RoundFailed(self._eval_round, "evaluating", "no node returned an evaluation"))
        return [Evaluated(self._eval_round, dict(sorted(self._eval.items())))]

    def finish(self, reason: str = "the run is complete") -> list[Action]:
        """Say goodbye to every node (and the dealer)."""
        self.closed = True
        peers = sorted(self.nodes) + ([DEALER_LINK] if self.dealer_connected else [])
        return [SendTo(p, Message(Kind.BYE, {"reason": reason})) for p in peers]

    # -- inputs ----------------------------------------------------------------------------------

    def receive(self, peer: str, msg: Message, now: float) -> list[Action]:
        """Handle one message from ``peer``.  A bad message drops that peer, nothing more."""
        if self.closed:
            return []
        if peer == DEALER_LINK:
            return self._from_dealer(msg, now)
        node = self.nodes.get(peer)
        if node is None:
            return []  # late traffic from a node that left: ignored, never used
        if msg.kind == Kind.ERROR:
            reason = msg.header.get("reason") if isinstance(msg.header.get("reason"), str) else "unknown error"
            return self._leave(peer, f"reported: {reason[:500]}", now)
        try:
            return self._dispatch(peer, node, msg, now)
        except ProtocolError as exc:
            return self._leave(peer, f"protocol error: {exc.reason}", now)
        except _MALFORMED as exc:  # values of a shape no check anticipated: still the sender's fault
            return self._leave(peer, f"protocol error: malformed {msg.kind!r} ({type(exc).__name__}: {exc})", now)

    def _dispatch(self, peer: str, node: _Node, msg: Message, now: float) -> list[Action]:
        if msg.kind == Kind.HELLO_ACK and node.state is NodeState.HELLO:
            return self._on_hello_ack(peer, node, msg, now)
        if msg.kind == Kind.CONFIGURED and node.state is NodeState.CONFIGURING:
            return self._on_configured(peer, node, msg, now)
        if msg.kind == Kind.EVALUATION and node.state is NodeState.EVALUATING:
            return self._on_evaluation(peer, node, msg)
        rnd = self._round
        if node.state is NodeState.TRAINING and rnd is not None:
            try:
                if msg.kind == Kind.UPDATE:
                    actions = self._on_update(peer, rnd, msg)
                elif msg.kind in self.aggregator.kinds:
                    actions = list(self.aggregator.receive(peer, msg))
                else:
                    raise ProtocolError(peer, f"sent {msg.kind!r} during stage {self.aggregator.stage} of round "
                                              f"{rnd.number}")
            except RoundFailed as exc:
                return self._fail(exc)
            return actions + self._round_progress(rnd, now)
        raise ProtocolError(peer, f"sent {msg.kind!r} while it is {node.state.value}")

    def on_deadline(self, now: float) -> list[Action]:
        """Every peer that owes a reply past its deadline is dropped."""
        actions: list[Action] = []
        for name, node in sorted(self.nodes.items()):
            if node.deadline is not None and now >= node.deadline:
                actions += self._leave(name, f"no reply within the {node.state.value} timeout "
                                             "(federation.reply_timeout_s, train_timeout_s)", now)
        if self._eval_deadline is not None and now >= self._eval_deadline:
            for name in sorted(self._evaluating):
                actions += self._leave(name, "no evaluation within federation.train_timeout_s", now)
        rnd = self._round
        if rnd is not None and rnd.deadline is not None and now >= rnd.deadline:
            rnd.deadline = None
            stage = self.aggregator.stage
            for peer in sorted(self.aggregator.waiting_for()):
                if self._round is not rnd:
                    break
                reason = f"no reply within the {stage} timeout (federation.reply_timeout_s, train_timeout_s)"
                if peer == DEALER_LINK:
                    actions += [Disconnect(DEALER_LINK, reason)] + self._round_lost(DEALER_LINK, reason, now)
                else:
                    actions += self._leave(peer, reason, now)
            if self._round is rnd:
                actions += self._round_progress(rnd, now)
        return actions

    # -- leaving ---------------------------------------------------------------------------------

    def _leave(self, name: str, reason: str, now: float, *, disconnect: bool = True) -> list[Action]:
        node = self.nodes.pop(name, None)
        if node is None:
            return []
        stage = node.state.value if self._round is None else self.aggregator.stage
        actions: list[Action] = [Dropped(name, stage, reason)]
        if disconnect:
            actions.append(Disconnect(name, reason))
        if node.state is NodeState.TRAINING:
            actions += self._round_lost(name, reason, now)
        elif node.state is NodeState.EVALUATING and name in self._evaluating:
            self._evaluating.discard(name)
            actions += self._evaluation_progress()
        return actions

    def _fail(self, error: PrimiaError) -> list[Action]:
        """The run cannot go on: tell every peer why (they stay usable for a resumed run)."""
        self._round = None
        self._evaluating = set()
        self._eval_deadline = None
        self.closed = True
        peers = sorted(self.nodes) + ([DEALER_LINK] if self.dealer_connected else [])
        return [Failed(error)] + [SendTo(p, Message(Kind.ERROR, {"reason": str(error)[:2000]})) for p in peers]

    # -- message handlers --------------------------------------------------------------------------

    def _on_hello_ack(self, name: str, node: _Node, msg: Message, now: float) -> list[Action]:
        check(msg, name, Kind.HELLO_ACK, {"protocol": int, "node": str, "data": dict, "warnings": list})
        h = msg.header
        if h["protocol"] != PROTOCOL_VERSION or h["node"] != name:
            raise ProtocolError(name, f"answered hello as {h['node']!r} with protocol {h['protocol']}")
        data = h["data"]
        check_map(data, name, "hello_ack.data", DATA_SUMMARY)
        classes, counts = data["classes"], data["counts"]
        if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
            raise ProtocolError(name, "hello_ack: class names must be distinct, non-empty strings")
        if len(counts) != len(classes) or not all(isinstance(c, int) and c > 0 for c in counts):
            raise ProtocolError(name, "hello_ack: counts must be one positive integer per class")
        if not data["channels"] or not set(data["channels"]) <= {1, 3}:
            raise ProtocolError(name, "hello_ack: channels must be 1 and/or 3")
        node.summary = data
        node.state, node.deadline = NodeState.JOINED, None
        actions: list[Action] = [Joined(name, data, [str(w) for w in h["warnings"]])]
        if self.spec is not None:
            actions += self._configure(name, now)
        return actions

    def _on_configured(self, name: str, node: _Node, msg: Message, now: float) -> list[Action]:
        check(msg, name, Kind.CONFIGURED, {"layout": list, "train_samples": int, "val_samples": int})
        assert self.layout is not None
        try:
            theirs = Layout.from_plain(msg.header["layout"])
        except (TypeError, ValueError) as exc:
            raise ProtocolError(name, f"configured: unreadable model layout ({exc})") from exc
        diff = self.layout.first_difference(theirs)
        if diff:
            raise ProtocolError(name, f"builds a different model ({diff}); run the same primia and torch versions")
        if msg.header["train_samples"] < 1 or msg.header["val_samples"] < 0:
            raise ProtocolError(name, "configured: needs at least one training image")
        node.train_samples, node.val_samples = msg.header["train_samples"], msg.header["val_samples"]
        node.state, node.deadline = NodeState.READY, None
        return [Ready(name, node.train_samples, node.val_samples)]

    def _on_update(self, name: str, rnd: _Round, msg: Message) -> list[Action]:
        check_map(msg.header, name, Kind.UPDATE, {"round": int, "train": dict})
        if set(msg.arrays) != {"update"}:
            raise ProtocolError(name, f"update: expected one array named 'update', got {sorted(msg.arrays)}")
        if msg.header["round"] != rnd.number:
            raise ProtocolError(name, f"update for round {msg.header['round']} during round {rnd.number}")
        if name in rnd.uploaded:
            raise ProtocolError(name, "sent its update twice")
        check_map(msg.header["train"], name, "update.train", TRAIN_FIGURES)
        actions = list(self.aggregator.add_update(name, msg.arrays["update"]))
        rnd.uploaded.add(name)
        rnd.figures[name] = dict(msg.header["train"])
        return actions

    def _on_evaluation(self, name: str, node: _Node, msg: Message) -> list[Action]:
        c = len(self.classes)
        check(
            msg, name, Kind.EVALUATION,
            {"round": int, "samples": int, "loss_sum": float, "exact_auc": list},
            {
                "confusion": (np.int64, (c, c)),
                "pos_hist": (np.int64, (c, SCORE_BINS)),
                "neg_hist": (np.int64, (c, SCORE_BINS)),
            },
        )
        h, a = msg.header, msg.arrays
        if h["round"] != self._eval_round or name not in self._evaluating:
            raise ProtocolError(name, f"sent an evaluation it does not owe (round {h['round']})")
        if any((arr < 0).any() for arr in a.values()) or int(a["confusion"].sum()) != h["samples"]:
            raise ProtocolError(name, "evaluation: counts must be non-negative and add up to the sample count")
        aucs = h["exact_auc"]
        if len(aucs) != c or not all(v is None or (isinstance(v, float) and 0.0 <= v <= 1.0) for v in aucs):
            raise ProtocolError(name, "evaluation: exact_auc must hold one value in [0, 1] (or nil) per class")
        if not np.isfinite(h["loss_sum"]) or h["loss_sum"] < 0:
            raise ProtocolError(name, "evaluation: loss_sum must be a non-negative number")
        self._eval[name] = EvalSummary(
            h["samples"], float(h["loss_sum"]), a["confusion"], a["pos_hist"], a["neg_hist"], list(aucs)
        )
        node.state = NodeState.READY
        self._evaluating.discard(name)
        return self._evaluation_progress()

    # -- the dealer --------------------------------------------------------------------------------

    def _from_dealer(self, msg: Message, now: float) -> list[Action]:
        rnd = self._round
        if msg.kind == Kind.ERROR:
            reason = msg.header.get("reason")
            reason = f"reported an error: {reason if isinstance(reason, str) else 'unknown'}"
            return [Disconnect(DEALER_LINK, reason)] + self._round_lost(DEALER_LINK, reason, now)
        if rnd is None or msg.kind not in self.aggregator.kinds:
            reason = f"sent {msg.kind!r}, which no round expects now"
            return [Disconnect(DEALER_LINK, reason)] + self._round_lost(DEALER_LINK, reason, now)
        try:
            actions = list(self.aggregator.receive(DEALER_LINK, msg))
        except RoundFailed as exc:
            return [Disconnect(DEALER_LINK, exc.reason)] + self._fail(exc)
        except _MALFORMED as exc:
            error = RoundFailed(rnd.number, self.aggregator.stage,
                                f"the dealer broke the protocol: malformed {msg.kind!r} ({type(exc).__name__})")
            return [Disconnect(DEALER_LINK, error.reason)] + self._fail(error)
        return actions + self._round_progress(rnd, now)
