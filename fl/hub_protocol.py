"""The hub, sans I/O: node messages in, messages to send and events out.

:class:`HubProtocol` never touches a socket or a clock: every entry point
takes ``now`` (monotonic seconds) and returns a list of actions —
:class:`SendTo`, :class:`Disconnect` — and events — :class:`NodesReady`,
:class:`Configured`, :class:`RoundCollected`, :class:`Evaluated`,
:class:`Dropped`, :class:`Failed`.  The runner (:mod:`fl.hub`) owns the one
round loop: it starts each phase, waits for the event that ends it, and
calls :meth:`HubProtocol.on_deadline` when :attr:`HubProtocol.deadline` passes.

Phases::

    HANDSHAKE    hello -> hello_ack from every node                     -> NodesReady
    AWAIT_CONFIG (runner builds the model for the classes and channels)
    CONFIGURING  configure -> configured (layout checked)               -> Configured
    IDLE
    plain round:   TRAIN   train -> update                               -> RoundCollected
    secure round:  KEYS    keys -> public_key
                   UPLOADS roster and train to every node in the roster -> masked_update
                   UNMASK  unmask -> reveal                              -> RoundCollected
    dealer-masked: KEYS    keys -> public_key, and dealer_keys -> dealer_key from the dealer
                   UPLOADS roster (with the dealer's key) and train to the nodes, dealer_roster to
                           the dealer                                     -> masked_update
                   UNMASK  unmask -> mask_sum, to and from the dealer only -> RoundCollected
    COLLECTED    (runner calls aggregate(), off the event loop)         -> IDLE
    EVALUATING   evaluate -> evaluation                                 -> Evaluated
    CLOSED

Dropouts: a node that disconnects, times out, reports an error or breaks the
protocol is disconnected and leaves the run.  Within a round, with
``on_dropout = "continue"`` the round goes on while at least ``min_nodes``
nodes remain (secure rounds recover through the survivors' pair seeds, see
:mod:`fl.secagg`); otherwise the round fails with :class:`fl.errors.RoundFailed`
or :class:`fl.errors.TooFewNodes`.  A node that drops after the hub fixed
the set of included updates (stage unmask) fails the round.  A misbehaving
node never crashes the hub: its messages are checked (:func:`fl.messages.check`)
and a violation only disconnects it.  The dealer (``aggregation.masking =
'dealer'``, link :data:`DEALER_LINK`) is needed by every secure round: losing it,
a late or a bad reply from it fails the run (completed rounds stay checkpointed).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from mpc.errors import PrimiaError, ProtocolError

from .aggregation import WeightedSum, round_weights
from .config import Config
from .errors import NodeDropped, RoundFailed, TooFewNodes
from .messages import DATA_SUMMARY, PROTOCOL_VERSION, TRAIN_FIGURES, Kind, Message, check, check_map
from .metrics import SCORE_BINS, EvalSummary
from .models import Layout
from .secagg import DEALER, PUBLIC_KEY_BYTES, RING_DTYPES, HubSecAgg

__all__ = [
    "DEALER_LINK",
    "Phase",
    "SendTo",
    "Disconnect",
    "NodesReady",
    "Configured",
    "RoundCollected",
    "Evaluated",
    "Dropped",
    "Failed",
    "RoundResult",
    "HubProtocol",
]


#: the runner's name for the dealer's link (not a valid node name, so it never clashes with one)
DEALER_LINK = "@dealer"

#: exceptions that odd values inside an otherwise valid message can raise while it is read
_MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError)


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    AWAIT_CONFIG = "await_config"
    CONFIGURING = "configuring"
    IDLE = "idle"
    TRAIN = "train"
    KEYS = "keys"
    UPLOADS = "uploads"
    UNMASK = "unmask"
    COLLECTED = "collected"
    EVALUATING = "evaluating"
    CLOSED = "closed"


# -- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendTo:
    node: str
    message: Message


@dataclass(frozen=True)
class Disconnect:
    node: str
    reason: str


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodesReady:
    """Every connected node answered hello: their data summaries and warnings."""

    summaries: dict[str, dict[str, Any]]
    warnings: dict[str, list[str]]


@dataclass(frozen=True)
class Configured:
    train_samples: dict[str, int]
    val_samples: dict[str, int]


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


Action = SendTo | Disconnect | NodesReady | Configured | RoundCollected | Evaluated | Dropped | Failed


@dataclass
class RoundResult:
    """The outcome of a round: the mean update over the included nodes and what they reported."""

    round: int
    mean_update: np.ndarray
    included: list[str]
    dropped: list[str]
    weights: dict[str, float]
    figures: dict[str, dict[str, Any]]


@dataclass
class _Round:
    number: int
    weights: dict[str, float]
    pending: set[str]
    global_weights: np.ndarray = field(repr=False)
    lr: float
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    plain: WeightedSum | None = None
    secure: HubSecAgg | None = None
    dropped: list[str] = field(default_factory=list)
    dealer_key: bytes | None = None
    dealer_owes: bool = False  # the dealer owes a reply (its key, or the mask sum)


class HubProtocol:
    """The hub's side of a federation (see the module docstring).

    Args:
        cfg: the federation configuration.
        run_id: identifies the run to the nodes (kept across ``--resume``).
    """

    def __init__(self, cfg: Config, run_id: str):
        self.cfg = cfg
        self.run_id = run_id
        self.phase = Phase.HANDSHAKE
        self.deadline: float | None = None
        self.active: set[str] = set()
        self.summaries: dict[str, dict[str, Any]] = {}
        self.warnings: dict[str, list[str]] = {}
        self.train_samples: dict[str, int] = {}
        self.val_samples: dict[str, int] = {}
        self.layout: Layout | None = None
        self.classes: list[str] = []
        self._pending: set[str] = set()
        self._round: _Round | None = None
        self._eval: dict[str, EvalSummary] = {}
        self._eval_round = 0
        self._session = os.urandom(8).hex()  # binds pair seeds to this hub session
        agg = cfg.aggregation
        self.dealer: str | None = DEALER_LINK if agg.secure and agg.masking == DEALER else None
        self._dealer_lost: str | None = None  # why the dealer is gone, once it is

    @property
    def min_nodes(self) -> int:
        return self.cfg.min_nodes

    # -- phase starters (called by the runner) -----------------------------------------

    def start(self, connected: list[str], unreachable: Mapping[str, str], now: float) -> list[Action]:
        """Say hello to every connected node; nodes that could not be reached are dropped."""
        actions: list[Action] = [Dropped(n, "connect", reason) for n, reason in unreachable.items()]
        self.active = set(connected)
        if len(self.active) < self.min_nodes:
            return actions + self._fail(TooFewNodes(0, "connect", sorted(self.active), self.min_nodes))
        self._pending = set(connected)
        self.deadline = now + self.cfg.federation.reply_timeout_s
        hello = {"protocol": PROTOCOL_VERSION, "run_id": self.run_id}
        return actions + [SendTo(n, Message(Kind.HELLO, {**hello, "node": n})) for n in sorted(connected)]

    def configure(self, classes: list[str], channels: int, layout: Layout, now: float) -> list[Action]:
        """Send the training specification; nodes answer with their model layout, which must match."""
        self._expect_phase(Phase.AWAIT_CONFIG)
        self.classes, self.layout = list(classes), layout
        self.phase = Phase.CONFIGURING
        self._pending = set(self.active)
        self.deadline = now + self.cfg.federation.train_timeout_s  # loading images can take a while
        header = {"spec": self.cfg.node_spec(), "classes": list(classes), "channels": channels}
        return [SendTo(n, Message(Kind.CONFIGURE, header)) for n in sorted(self.active)]

    def begin_round(self, number: int, weights: np.ndarray, lr: float, now: float) -> list[Action]:
        """Ask every active node to train from ``weights`` at learning rate ``lr``."""
        self._expect_phase(Phase.IDLE)
        assert self.layout is not None
        if len(self.active) < self.min_nodes:
            return self._fail(TooFewNodes(number, "start", sorted(self.active), self.min_nodes))
        if self._dealer_lost is not None:
            return self._fail(RoundFailed(number, Phase.KEYS.value, self._dealer_lost))
        agg = self.cfg.aggregation
        shares = round_weights({n: self.train_samples[n] for n in sorted(self.active)}, agg.weighting)
        flat = np.ascontiguousarray(weights, dtype=np.float32)
        rnd = _Round(number, shares, set(self.active), flat, float(lr))
        self._round = rnd
        if agg.secure:
            rnd.secure = HubSecAgg(number, shares, self.layout.size, agg.frac_bits, agg.ring_bits, self.min_nodes,
                                   neighbours=agg.neighbours, masking=agg.masking)
            self.phase = Phase.KEYS
            self.deadline = now + self.cfg.federation.reply_timeout_s
            context = f"{self.run_id}|{self._session}|{number}".encode()
            actions: list[Action] = []
            if self.dealer is not None:
                rnd.dealer_owes = True
                header = {"protocol": PROTOCOL_VERSION, "round": number, "context": context,
                          "size": self.layout.size, "ring_bits": agg.ring_bits}
                actions.append(SendTo(self.dealer, Message(Kind.DEALER_KEYS, header)))
            return actions + [SendTo(n, Message(Kind.KEYS, {"round": number, "context": context}))
                              for n in sorted(self.active)]
        rnd.plain = WeightedSum()
        self.phase = Phase.TRAIN
        self.deadline = now + self.cfg.federation.train_timeout_s
        return [self._train_message(rnd, n) for n in sorted(self.active)]

    def _train_message(self, rnd: "_Round", node: str) -> SendTo:
        header = {"round": rnd.number, "lr": rnd.lr, "weight": rnd.weights[node]}
        return SendTo(node, Message(Kind.TRAIN, header, {"weights": rnd.global_weights}))

    def begin_evaluation(self, number: int, weights: np.ndarray, now: float) -> list[Action]:
        """Ask every active node for metrics of ``weights`` on its validation split."""
        self._expect_phase(Phase.IDLE)
        self.phase = Phase.EVALUATING
        self._eval, self._eval_round = {}, number
        self._pending = set(self.active)
        self.deadline = now + self.cfg.federation.train_timeout_s
        flat = np.ascontiguousarray(weights, dtype=np.float32)
        return [SendTo(n, Message(Kind.EVALUATE, {"round": number}, {"weights": flat})) for n in sorted(self.active)]

    def finish(self, reason: str = "the run is complete") -> list[Action]:
        """Say goodbye to every active node (and the dealer)."""
        self.phase = Phase.CLOSED
        self.deadline = None
        return [SendTo(n, Message(Kind.BYE, {"reason": reason})) for n in self._peers()]

    def _peers(self) -> list[str]:
        return sorted(self.active) + ([self.dealer] if self.dealer is not None else [])

    def aggregate(self) -> RoundResult:
        """The mean update of the collected round (heavy for secure rounds: run it off the event loop)."""
        self._expect_phase(Phase.COLLECTED)
        rnd = self._round
        assert rnd is not None
        if rnd.secure is not None:
            mean, included = rnd.secure.result()
        else:
            assert rnd.plain is not None
            mean, included = rnd.plain.mean(), sorted(rnd.figures)
        self.phase = Phase.IDLE
        self._round = None
        figures = {n: rnd.figures[n] for n in included}
        return RoundResult(rnd.number, mean, included, sorted(rnd.dropped), rnd.weights, figures)

    def _expect_phase(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise RuntimeError(f"the hub is in phase {self.phase.value}, not {phase.value}")

    # -- inputs --------------------------------------------------------------------------

    def receive(self, node: str, msg: Message, now: float) -> list[Action]:
        """Handle one message from ``node``.  A bad message disconnects that node, nothing more."""
        if node == self.dealer and self.phase is not Phase.CLOSED:
            return self._from_dealer(msg, now)
        if node not in self.active or self.phase is Phase.CLOSED:
            return []  # late traffic from a dropped node, or after the end: ignored, never used
        if msg.kind == Kind.ERROR:
            reason = msg.header.get("reason") if isinstance(msg.header.get("reason"), str) else "unknown error"
            return self._drop(node, f"reported: {reason}", now)
        handler = {
            Phase.HANDSHAKE: self._on_hello_ack,
            Phase.CONFIGURING: self._on_configured,
            Phase.TRAIN: self._on_update,
            Phase.KEYS: self._on_keys_stage,
            Phase.UPLOADS: self._on_masked_update,
            Phase.UNMASK: self._on_reveal,
            Phase.EVALUATING: self._on_evaluation,
        }.get(self.phase)
        try:
            if handler is None:
                raise ProtocolError(node, f"sent {msg.kind!r} while the hub is in phase {self.phase.value}")
            return handler(node, msg, now)
        except ProtocolError as exc:
            return self._drop(node, f"protocol error: {exc.reason}", now)
        except _MALFORMED as exc:  # values of a shape no check anticipated: still the sender's fault
            return self._drop(node, f"protocol error: malformed {msg.kind!r} ({type(exc).__name__}: {exc})", now)

    def node_lost(self, node: str, reason: str, now: float) -> list[Action]:
        """The connection to ``node`` closed (the runner noticed)."""
        if node == self.dealer and self.phase is not Phase.CLOSED:
            return self._dealer_failed(f"lost the connection: {reason}")
        if node not in self.active or self.phase is Phase.CLOSED:
            return []
        return self._drop(node, reason, now, disconnect=False)

    def on_deadline(self, now: float) -> list[Action]:
        """The current phase ran out of time: every node still owing a reply is dropped."""
        if self.deadline is None or now < self.deadline:
            return []
        self.deadline = None
        if self._round is not None and self._round.dealer_owes:
            return self._dealer_failed(f"no reply within the {self.phase.value} timeout "
                                       "(federation.reply_timeout_s, train_timeout_s)")
        late = sorted(self._owing())
        actions: list[Action] = []
        for node in late:
            actions += self._drop(node, f"no reply within the {self.phase.value} timeout", now)
            if self.phase in (Phase.CLOSED, Phase.COLLECTED):
                break
        return actions

    def _owing(self) -> set[str]:
        if self.phase in (Phase.TRAIN, Phase.KEYS, Phase.UPLOADS, Phase.UNMASK):
            assert self._round is not None
            return set(self._round.pending)
        if self.phase in (Phase.HANDSHAKE, Phase.CONFIGURING, Phase.EVALUATING):
            return set(self._pending)
        return set()

    # -- dropping --------------------------------------------------------------------------

    def _fail(self, error: PrimiaError) -> list[Action]:
        actions: list[Action] = [Failed(error)]
        actions += [SendTo(n, Message(Kind.ERROR, {"reason": str(error)})) for n in self._peers()]
        self.phase = Phase.CLOSED
        self.deadline = None
        return actions

    def _drop(self, node: str, reason: str, now: float, *, disconnect: bool = True) -> list[Action]:
        self.active.discard(node)
        stage = self.phase.value
        actions: list[Action] = [Dropped(node, stage, reason)]
        if disconnect:
            actions.append(Disconnect(node, reason))
        if self.phase in (Phase.HANDSHAKE, Phase.CONFIGURING, Phase.EVALUATING):
            self._pending.discard(node)
            if len(self.active) < self.min_nodes and self.phase is not Phase.EVALUATING:
                return actions + self._fail(TooFewNodes(0, stage, sorted(self.active), self.min_nodes))
            return actions + self._advance(now)
        rnd = self._round
        if rnd is None or self.phase is Phase.COLLECTED:
            return actions
        if self.phase is Phase.UNMASK and self.dealer is not None:
            return actions  # its update is in the sum already, and the dealer removes its mask
        rnd.dropped.append(node)
        try:
            if self.cfg.federation.on_dropout == "fail":
                raise RoundFailed(rnd.number, stage, f"{NodeDropped(node, stage, reason)} and federation.on_dropout = 'fail'")
            if rnd.secure is not None:
                if self.phase is Phase.KEYS:
                    rnd.secure.public_keys.pop(node, None)
                rnd.secure.node_lost(node, reason)
            rnd.pending.discard(node)
            remaining = [n for n in rnd.weights if n not in rnd.dropped]
            if len(remaining) < self.min_nodes:
                raise TooFewNodes(rnd.number, stage, sorted(remaining), self.min_nodes)
        except RoundFailed as exc:
            return actions + self._fail(exc)
        return actions + self._advance(now)

    # -- phase completion --------------------------------------------------------------------

    def _advance(self, now: float) -> list[Action]:
        """Move on if the current phase has everything it waits for."""
        try:
            return self._advance_or_raise(now)
        except RoundFailed as exc:
            return self._fail(exc)

    def _advance_or_raise(self, now: float) -> list[Action]:
        if self.phase is Phase.HANDSHAKE and not self._pending:
            self.phase, self.deadline = Phase.AWAIT_CONFIG, None
            summaries = {n: self.summaries[n] for n in sorted(self.active)}
            return [NodesReady(summaries, {n: self.warnings.get(n, []) for n in summaries})]
        if self.phase is Phase.CONFIGURING and not self._pending:
            self.phase, self.deadline = Phase.IDLE, None
            return [Configured({n: self.train_samples[n] for n in sorted(self.active)},
                               {n: self.val_samples[n] for n in sorted(self.active)})]
        if self.phase is Phase.EVALUATING and not self._pending:
            if not self._eval:
                raise RoundFailed(self._eval_round, self.phase.value, "no node returned an evaluation")
            self.phase, self.deadline = Phase.IDLE, None
            return [Evaluated(self._eval_round, dict(sorted(self._eval.items())))]
        rnd = self._round
        if rnd is None or rnd.pending or rnd.dealer_owes:
            return []
        if self.phase is Phase.TRAIN:
            return self._collected(rnd)
        assert rnd.secure is not None
        if self.phase is Phase.KEYS:
            # The roster goes out just before the weights: nodes expand their masks while the weights arrive.
            roster = rnd.secure.close_keys()
            rnd.pending = set(roster)
            self.phase = Phase.UPLOADS
            self.deadline = now + self.cfg.federation.train_timeout_s
            header: dict[str, Any] = {"round": rnd.number, "keys": roster}
            actions: list[Action] = []
            if self.dealer is not None:
                header["dealer"] = rnd.dealer_key
                # the dealer expands the sum of the masks while the nodes train
                actions.append(SendTo(self.dealer, Message(Kind.DEALER_ROSTER, {"round": rnd.number, "keys": roster})))
            for n in roster:
                actions += [SendTo(n, Message(Kind.ROSTER, header)), self._train_message(rnd, n)]
            return actions
        if self.phase is Phase.UPLOADS:
            included, dropped = rnd.secure.close_uploads()
            self.phase = Phase.UNMASK
            self.deadline = now + self.cfg.federation.reply_timeout_s
            header = {"round": rnd.number, "included": included, "dropped": dropped}
            if self.dealer is not None:
                rnd.dealer_owes = True
                return [SendTo(self.dealer, Message(Kind.UNMASK, header))]
            rnd.pending = set(included)
            return [SendTo(n, Message(Kind.UNMASK, header)) for n in included]
        if self.phase is Phase.UNMASK:
            return self._collected(rnd)
        return []

    def _collected(self, rnd: _Round) -> list[Action]:
        if self.cfg.aggregation.secure is False and not rnd.figures:
            raise RoundFailed(rnd.number, self.phase.value, "no node delivered an update")
        self.phase, self.deadline = Phase.COLLECTED, None
        return [RoundCollected(rnd.number)]

    # -- message handlers --------------------------------------------------------------------

    def _on_hello_ack(self, node: str, msg: Message, now: float) -> list[Action]:
        check(msg, node, Kind.HELLO_ACK, {"protocol": int, "node": str, "data": dict, "warnings": list})
        h = msg.header
        if h["protocol"] != PROTOCOL_VERSION or h["node"] != node:
            raise ProtocolError(node, f"answered hello as {h['node']!r} with protocol {h['protocol']}")
        data = h["data"]
        check_map(data, node, "hello_ack.data", DATA_SUMMARY)
        classes, counts = data["classes"], data["counts"]
        if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
            raise ProtocolError(node, "hello_ack: class names must be distinct, non-empty strings")
        if len(counts) != len(classes) or not all(isinstance(c, int) and c > 0 for c in counts):
            raise ProtocolError(node, "hello_ack: counts must be one positive integer per class")
        if not data["channels"] or not set(data["channels"]) <= {1, 3}:
            raise ProtocolError(node, "hello_ack: channels must be 1 and/or 3")
        if node not in self._pending:
            raise ProtocolError(node, "answered hello twice")
        self.summaries[node] = data
        self.warnings[node] = [str(w) for w in h["warnings"]]
        self._pending.discard(node)
        return self._advance(now)

    def _on_configured(self, node: str, msg: Message, now: float) -> list[Action]:
        check(msg, node, Kind.CONFIGURED, {"layout": list, "train_samples": int, "val_samples": int})
        assert self.layout is not None
        try:
            theirs = Layout.from_plain(msg.header["layout"])
        except (TypeError, ValueError) as exc:
            raise ProtocolError(node, f"configured: unreadable model layout ({exc})") from exc
        diff = self.layout.first_difference(theirs)
        if diff:
            raise ProtocolError(node, f"builds a different model ({diff}); run the same primia and torch versions")
        if msg.header["train_samples"] < 1 or msg.header["val_samples"] < 0:
            raise ProtocolError(node, "configured: needs at least one training image")
        if node not in self._pending:
            raise ProtocolError(node, "answered configure twice")
        self.train_samples[node] = msg.header["train_samples"]
        self.val_samples[node] = msg.header["val_samples"]
        self._pending.discard(node)
        return self._advance(now)

    def _round_message(self, node: str, msg: Message, kind: str, header: dict[str, Any], arrays: Any = None) -> _Round:
        rnd = self._round
        assert rnd is not None
        check(msg, node, kind, header, arrays)
        if msg.header["round"] != rnd.number:
            raise ProtocolError(node, f"{kind} for round {msg.header['round']} during round {rnd.number}")
        if node not in rnd.pending:
            raise ProtocolError(node, f"sent {kind} it does not owe")
        return rnd

    def _figures(self, node: str, figures: Any) -> dict[str, Any]:
        check_map(figures, node, "train", TRAIN_FIGURES)
        return dict(figures)

    def _on_update(self, node: str, msg: Message, now: float) -> list[Action]:
        assert self.layout is not None
        rnd = self._round_message(
            node, msg, Kind.UPDATE, {"round": int, "train": dict}, {"update": (np.float32, (self.layout.size,))}
        )
        update = msg.arrays["update"]
        if not np.isfinite(update).all():
            raise ProtocolError(node, "update contains NaN or infinity (did training diverge? lower training.lr)")
        figures = self._figures(node, msg.header["train"])
        assert rnd.plain is not None
        rnd.plain.add(update, rnd.weights[node])
        rnd.figures[node] = figures
        rnd.pending.discard(node)
        return self._advance(now)

    def _on_keys_stage(self, node: str, msg: Message, now: float) -> list[Action]:
        rnd = self._round_message(node, msg, Kind.PUBLIC_KEY, {"round": int, "key": bytes})
        assert rnd.secure is not None
        rnd.secure.add_public_key(node, msg.header["key"])
        rnd.pending.discard(node)
        return self._advance(now)

    def _on_masked_update(self, node: str, msg: Message, now: float) -> list[Action]:
        assert self.layout is not None
        dtype = RING_DTYPES[self.cfg.aggregation.ring_bits]
        rnd = self._round_message(
            node, msg, Kind.MASKED_UPDATE, {"round": int, "train": dict}, {"masked": (dtype, (self.layout.size,))}
        )
        figures = self._figures(node, msg.header["train"])
        assert rnd.secure is not None
        rnd.secure.add_masked(node, msg.arrays["masked"])
        rnd.figures[node] = figures
        rnd.pending.discard(node)
        return self._advance(now)

    def _on_reveal(self, node: str, msg: Message, now: float) -> list[Action]:
        rnd = self._round_message(node, msg, Kind.REVEAL, {"round": int, "self_seed": bytes, "pair_seeds": dict})
        assert rnd.secure is not None
        rnd.secure.add_reveal(node, msg.header["self_seed"], msg.header["pair_seeds"])
        rnd.pending.discard(node)
        return self._advance(now)

    # -- the dealer --------------------------------------------------------------------------

    def _from_dealer(self, msg: Message, now: float) -> list[Action]:
        """A message from the dealer: its key for the round, or the mask sum; anything else fails the run."""
        dealer = self.dealer
        assert dealer is not None
        rnd = self._round
        if msg.kind == Kind.ERROR:
            reason = msg.header.get("reason")
            return self._dealer_failed(f"reported an error: {reason if isinstance(reason, str) else 'unknown'}")
        try:
            if rnd is None or not rnd.dealer_owes or self.phase not in (Phase.KEYS, Phase.UNMASK):
                raise ProtocolError(dealer, f"sent {msg.kind!r} it does not owe (hub phase {self.phase.value})")
            assert rnd.secure is not None and self.layout is not None
            if self.phase is Phase.KEYS:
                check(msg, dealer, Kind.DEALER_KEY, {"round": int, "key": bytes})
                self._dealer_round(msg, rnd)
                if len(msg.header["key"]) != PUBLIC_KEY_BYTES:
                    raise ProtocolError(dealer, f"public key must be {PUBLIC_KEY_BYTES} bytes")
                rnd.dealer_key = msg.header["key"]
            else:
                dtype = RING_DTYPES[self.cfg.aggregation.ring_bits]
                check(msg, dealer, Kind.MASK_SUM, {"round": int}, {"sum": (dtype, (self.layout.size,))})
                self._dealer_round(msg, rnd)
                rnd.secure.add_mask_sum(dealer, msg.arrays["sum"])
        except ProtocolError as exc:
            return self._dealer_failed(f"broke the protocol: {exc.reason}")
        except _MALFORMED as exc:
            return self._dealer_failed(f"broke the protocol: malformed {msg.kind!r} ({type(exc).__name__}: {exc})")
        rnd.dealer_owes = False
        return self._advance(now)

    def _dealer_round(self, msg: Message, rnd: _Round) -> None:
        if msg.header["round"] != rnd.number:
            raise ProtocolError(self.dealer, f"{msg.kind} for round {msg.header['round']} during round {rnd.number}")

    def _dealer_failed(self, reason: str) -> list[Action]:
        """Without the dealer no secure round can finish: fail the round in progress, or the next one
        (an evaluation under way still completes, and with it the checkpoint of its round)."""
        actions: list[Action] = [Disconnect(DEALER_LINK, reason)]
        self.dealer = None  # no more messages to it
        self._dealer_lost = (
            f"the dealer {reason}; aggregation.masking = 'dealer' cannot go on without it (restart `primia dealer` "
            "and the hub with --resume; finished rounds are checkpointed)"
        )
        if self.phase in (Phase.KEYS, Phase.UPLOADS, Phase.UNMASK):
            assert self._round is not None
            return actions + self._fail(RoundFailed(self._round.number, self.phase.value, self._dealer_lost))
        return actions

    def _on_evaluation(self, node: str, msg: Message, now: float) -> list[Action]:
        c = len(self.classes)
        check(
            msg, node, Kind.EVALUATION,
            {"round": int, "samples": int, "loss_sum": float, "exact_auc": list},
            {
                "confusion": (np.int64, (c, c)),
                "pos_hist": (np.int64, (c, SCORE_BINS)),
                "neg_hist": (np.int64, (c, SCORE_BINS)),
            },
        )
        h, a = msg.header, msg.arrays
        if h["round"] != self._eval_round or node not in self._pending:
            raise ProtocolError(node, f"sent an evaluation it does not owe (round {h['round']})")
        if any((arr < 0).any() for arr in a.values()) or int(a["confusion"].sum()) != h["samples"]:
            raise ProtocolError(node, "evaluation: counts must be non-negative and add up to the sample count")
        aucs = h["exact_auc"]
        if len(aucs) != c or not all(v is None or (isinstance(v, float) and 0.0 <= v <= 1.0) for v in aucs):
            raise ProtocolError(node, "evaluation: exact_auc must hold one value in [0, 1] (or nil) per class")
        if not np.isfinite(h["loss_sum"]) or h["loss_sum"] < 0:
            raise ProtocolError(node, "evaluation: loss_sum must be a non-negative number")
        self._eval[node] = EvalSummary(
            h["samples"], float(h["loss_sum"]), a["confusion"], a["pos_hist"], a["neg_hist"], list(aucs)
        )
        self._pending.discard(node)
        return self._advance(now)
