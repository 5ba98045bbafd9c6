"""A data owner's node, sans I/O: hub messages in, messages and work out.

:class:`NodeRuntime` lives as long as the node process: the checked data
folder, decoded images (cached per input size and channel count), the node's
identity (its signing key, and the public keys it trusts) and the current
run's :class:`fl.training.LocalTrainer`, so a node that reconnects to the same
run finds its optimizer state where it left it.

:class:`NodeSession` is one hub connection.  It never touches a socket or a
thread: :meth:`NodeSession.receive` takes a decoded message and returns
actions, :class:`Send` (a reply) or :class:`Work` (a slow call, such as
training, to run off the event loop; its result comes back through
:meth:`NodeSession.work_done` or :meth:`NodeSession.work_failed`).

States and messages::

    HELLO      --hello-->      hello_ack                                     CONFIGURE
    CONFIGURE  --configure-->  [work: load images, build model]              CONFIGURING
               [done]          configured                                    READY
    READY      --train-->      [work: train] and the aggregation's set-up    TRAINING
               (the masker's messages: sa_* -> replies, and mask expansion on the mask lane)
               [trained, masker ready]  [mask lane: mask]  update            (the masker's later stages)
    READY      --evaluate-->   [work: evaluate] evaluation                   READY
    any        --bye-->        close

How an update is masked and what else a round exchanges is the masker's
business (:mod:`fl.strategy`: plain, pairwise or dealer masking).

What leaves the node: its data summary (class names and counts, image sizes),
model updates (masked in secure mode), training loss and accuracy, signed
per-round public keys and survivor sets, encrypted Shamir shares of its mask
seeds (to its neighbours, through the hub), shares it holds for others (only
after enough nodes agreed on who survived), and validation summaries
(confusion matrix and score histograms).  Never images, labels or per-image
scores.
"""

from __future__ import annotations

import enum
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from mpc.errors import ConfigError, PrimiaError, ProtocolError

from .augment import build_augmentations
from .config import Config, parse_node_spec
from .data import FolderScan, load_images, split_indices
from .messages import PROTOCOL_VERSION, Kind, Message, check
from .models import build_model
from .strategy import Masker, NodeContext, build_masker
from .transport import run_token
from .training import LocalTrainer, TrainResult

__all__ = ["NodeState", "Send", "Work", "Close", "NodeRuntime", "NodeSession", "TRAIN_LANE", "MASK_LANE"]

log = logging.getLogger("primia.node")


class NodeState(enum.Enum):
    HELLO = "hello"
    CONFIGURE = "configure"
    CONFIGURING = "configuring"
    READY = "ready"
    TRAINING = "training"
    EVALUATING = "evaluating"
    CLOSED = "closed"


@dataclass(frozen=True)
class Send:
    message: Message


TRAIN_LANE = "train"
MASK_LANE = "mask"


@dataclass(frozen=True)
class Work:
    """Run ``call()`` away from the event loop, then report to ``work_done(ticket, result)``.

    Work on the same ``lane`` runs in order, one at a time; the two lanes run
    side by side, so masks are expanded while the model trains.
    """

    ticket: int
    call: Callable[[], Any]
    lane: str = TRAIN_LANE


@dataclass(frozen=True)
class Close:
    """Close the connection; ``final``: the node refuses this run (its own policy), so it stops dialing it."""

    reason: str
    final: bool = False


Action = Send | Work | Close


class NodeRuntime:
    """State that outlives a hub connection: the data and the current run's trainer."""

    def __init__(self, scan: FolderScan, *, name: str | None = None, device: str = "cpu",
                 sign: Callable[..., bytes] | None = None, directory: Any = None, dealer_key: Any = None,
                 allow_plain: bool = False, min_nodes: int = 2):
        self.scan = scan
        self.name = name
        self.device = device
        #: signs this node's statements with its long-term key (None: a node that cannot do secure rounds)
        self.sign = sign
        #: the federation's nodes' public keys (pairwise masking), and the pinned dealer key (dealer masking)
        self.directory = directory
        self.dealer_key = dealer_key
        #: the node's own policy: whether it sends updates in the clear, and its floor on the nodes in a sum
        self.allow_plain = allow_plain
        self.min_nodes = min_nodes
        #: the rounds whose sum this node helped open, as (run id, round): never twice (see claim)
        self._opened: set[tuple[str, int]] = set()
        self._images: dict[tuple[int, int], np.ndarray] = {}
        self._trainer_key: tuple[Any, ...] | None = None
        self.trainer: LocalTrainer | None = None

    def claim(self, run_id: str, number: int) -> None:
        """Record that this node helps open round ``number``'s sum (for as long as the node process lives).

        Raises:
            ProtocolError: it already did for that round of that run: a hub that runs a round again (after a
                reconnection, or a resume after the sum was opened) would get two sums of the same updates.
        """
        if (run_id, number) in self._opened:
            raise ProtocolError("hub", f"round {number} of run {run_id} was summed already (this node helped open its "
                                       "sum): a second sum of the same updates could expose one; start a new run")
        self._opened.add((run_id, number))

    def images(self, input_size: int, channels: int) -> np.ndarray:
        key = (input_size, channels)
        if key not in self._images:
            self._images.clear()  # one size at a time: images can be large
            self._images[key] = load_images(self.scan, input_size=input_size, channels=channels)
        return self._images[key]

    def prepare(self, node: str, run_id: str, cfg: Config, classes: list[str], channels: int) -> LocalTrainer:
        """The trainer for this run, reusing the existing one (and its optimizer state) if the run is the same."""
        key = (node, run_id, cfg.digest(), tuple(classes), channels)
        if self.trainer is not None and key == self._trainer_key:
            return self.trainer
        missing = [c for c in self.scan.classes if c not in classes]
        if missing:
            raise ConfigError(f"the hub's class list lacks this node's classes {missing}")
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[self.scan.classes[label]] for label in self.scan.labels], dtype=np.int64)
        images = self.images(cfg.data.input_size, channels)
        train_idx, val_idx = split_indices(labels, cfg.data.val_fraction, cfg.run.seed)
        model = build_model(
            cfg.model.name,
            num_classes=len(classes),
            in_channels=channels,
            input_size=cfg.data.input_size,
            width=cfg.model.width,
            pooling=cfg.model.pooling,
            seed=cfg.run.seed,
        )
        augment = (
            build_augmentations(cfg.data.augmentations, input_size=cfg.data.input_size, channels=channels)
            if cfg.data.augmentations
            else None
        )
        self.trainer = LocalTrainer(
            cfg, model, images, labels, train_idx, val_idx,
            num_classes=len(classes), augment=augment, node_name=node, device=self.device,
        )
        self._trainer_key = key
        return self.trainer


class NodeSession:
    """One hub connection's protocol state machine (see the module docstring).

    Args:
        runtime: the node's data, identity and trainer.
        peer: how the hub is named in errors.
        run_token: what the hub's handshake said of its run (:func:`fl.transport.run_token`); a hello naming a run
            that does not hash to it is refused.
    """

    def __init__(self, runtime: NodeRuntime, peer: str = "hub", run_token: str | None = None):
        self.runtime = runtime
        self.peer = peer
        self.state = NodeState.HELLO
        self.node = runtime.name or ""
        self.run_id = ""
        self._run_token = run_token
        self.cfg: Config | None = None
        self.trainer: LocalTrainer | None = None
        self.masker: Masker | None = None
        self._tickets = itertools.count(1)
        self._pending: dict[int, Callable[[Any], list[Action]]] = {}
        self._round: int | None = None
        self._last_round = 0
        self._fields: dict[str, Any] = {}
        self._trained: tuple[np.ndarray, dict[str, Any]] | None = None

    # -- entry points ------------------------------------------------------------------

    def receive(self, msg: Message) -> list[Action]:
        """Handle one message from the hub; a protocol violation is answered with ``error`` and a close."""
        try:
            if msg.kind == Kind.BYE:
                self.state = NodeState.CLOSED
                reason = msg.header.get("reason")
                return [Close(f"the hub ended the run: {reason if isinstance(reason, str) else 'goodbye'}")]
            if msg.kind == Kind.ERROR:
                self.state = NodeState.CLOSED
                return [Close(f"the hub reported an error: {str(msg.header.get('reason', '?'))[:2000]}")]
            if self.masker is not None and msg.kind in self.masker.kinds and \
                    self.state in (NodeState.TRAINING, NodeState.READY):
                return self._on_masker(msg)
            handler = self._handlers().get((self.state, msg.kind))
            if handler is None:
                raise ProtocolError(self.peer, f"unexpected {msg.kind!r} message in state {self.state.value}")
            return handler(msg)
        except PrimiaError as exc:
            return self._refuse(str(exc))
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            return self._refuse(f"protocol error with {self.peer}: malformed {msg.kind!r} ({type(exc).__name__}: {exc})")

    def _refuse(self, reason: str) -> list[Action]:
        """The hub broke the protocol: tell it why and close (the node dials again for a fresh session)."""
        log.error("%s", reason)
        self.state = NodeState.CLOSED
        self._reset_round()
        return [Send(_error(reason)), Close(reason)]

    def work_done(self, ticket: int, result: Any) -> list[Action]:
        then = self._pending.pop(ticket, None)
        if then is None or self.state is NodeState.CLOSED:
            return []  # the connection moved on (or closed) while the work ran
        try:
            return then(result)
        except ProtocolError as exc:
            return self._refuse(str(exc))
        except PrimiaError as exc:
            return self._fail_work(exc)

    def work_failed(self, ticket: int, exc: BaseException) -> list[Action]:
        if self._pending.pop(ticket, None) is None or self.state is NodeState.CLOSED:
            return []
        if isinstance(exc, ProtocolError):
            return self._refuse(str(exc))
        return self._fail_work(exc)

    def _fail_work(self, exc: BaseException) -> list[Action]:
        # The hub decides what a failed node means for the round; this node stays usable.
        log.error("work failed: %s", exc)
        configured = self.trainer is not None
        self.state = NodeState.READY if configured else NodeState.CLOSED
        self._reset_round()
        self._pending.clear()  # the rest of the abandoned round's work reports to no one
        actions: list[Action] = [Send(_error(f"{type(exc).__name__}: {exc}"))]
        if not configured:
            actions.append(Close(str(exc)))
        return actions

    def _work(self, call: Callable[[], Any], then: Callable[[Any], list[Action]], *, lane: str = TRAIN_LANE) -> Work:
        ticket = next(self._tickets)
        self._pending[ticket] = then
        return Work(ticket, call, lane)

    def _handlers(self) -> dict[tuple[NodeState, str], Callable[[Message], list[Action]]]:
        return {
            (NodeState.HELLO, Kind.HELLO): self._on_hello,
            (NodeState.CONFIGURE, Kind.CONFIGURE): self._on_configure,
            (NodeState.READY, Kind.TRAIN): self._on_train,
            (NodeState.READY, Kind.EVALUATE): self._on_evaluate,
        }

    # -- handshake ---------------------------------------------------------------------

    def _on_hello(self, msg: Message) -> list[Action]:
        check(msg, self.peer, Kind.HELLO, {"protocol": int, "run_id": str, "node": str})
        h = msg.header
        if h["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError(self.peer, f"speaks protocol {h['protocol']}, this node speaks {PROTOCOL_VERSION}; "
                                "run the same primia version on hub and nodes")
        if self.runtime.name and h["node"] != self.runtime.name:
            raise ProtocolError(self.peer, f"calls this node {h['node']!r}, but it was started as {self.runtime.name!r}; "
                                "make federation.nodes[].name match the node's --name")
        if self._run_token is not None and run_token(h["run_id"]) != self._run_token:
            raise ProtocolError(self.peer, f"says run {h['run_id']!r:.80}, but its handshake was for another run")
        self.node, self.run_id = h["node"], h["run_id"]
        self.state = NodeState.CONFIGURE
        scan = self.runtime.scan
        reply = Message(
            Kind.HELLO_ACK,
            {
                "protocol": PROTOCOL_VERSION,
                "node": self.node,
                "data": scan.summary(),
                "warnings": [str(p) for p in scan.warnings],
            },
        )
        return [Send(reply)]

    def _on_configure(self, msg: Message) -> list[Action]:
        check(msg, self.peer, Kind.CONFIGURE, {"spec": dict, "classes": list, "channels": int})
        h = msg.header
        try:
            cfg = parse_node_spec(h["spec"])
        except ConfigError as exc:
            raise ProtocolError(self.peer, f"sent a bad training specification: {exc}") from exc
        classes = h["classes"]
        if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
            raise ProtocolError(self.peer, "configure: classes must be distinct strings")
        if h["channels"] not in (1, 3):
            raise ProtocolError(self.peer, f"configure: channels must be 1 or 3, got {h['channels']}")
        if not cfg.aggregation.secure and not self.runtime.allow_plain:
            reason = ("this node refuses the run: the hub asks for aggregation.secure = false, which would send this "
                      "node's update in the clear; start the node with --allow-plain-aggregation if that is agreed")
            log.error("%s", reason)
            self.state = NodeState.CLOSED
            return [Send(_error(reason)), Close(reason, final=True)]
        if cfg.aggregation.secure and self.runtime.sign is None:
            raise ProtocolError(self.peer, "this run uses secure aggregation, but this node has no signing key")
        self.cfg = cfg
        node, run_id = self.node, self.run_id
        agg = cfg.aggregation
        log.info("run %s: %s aggregation%s", run_id, "secure" if agg.secure else "PLAIN (updates in the clear)",
                 (f", {agg.masking} masks" + (f", {agg.neighbours} neighbours" if agg.neighbours else "")
                  if agg.secure else ""))

        def configured(trainer: LocalTrainer) -> list[Action]:
            self.trainer = trainer
            rt = self.runtime
            context = NodeContext(node, run_id, rt.sign or _no_signing, rt.directory, rt.dealer_key,
                                  min_nodes=rt.min_nodes, claim=self._claim)
            self.masker = build_masker(cfg.aggregation, context, size=trainer.layout.size)
            self.state = NodeState.READY
            header = {
                "layout": trainer.layout.as_plain(),
                "train_samples": trainer.train_samples,
                "val_samples": trainer.val_samples,
            }
            return [Send(Message(Kind.CONFIGURED, header))]

        self.state = NodeState.CONFIGURING
        return [self._work(lambda: self.runtime.prepare(node, run_id, cfg, classes, h["channels"]), configured)]

    # -- a training round ----------------------------------------------------------------

    def _claim(self, number: int) -> None:
        if number != self._last_round:
            raise ProtocolError(self.peer, f"asked to open round {number}, which this node did not just train")
        self.runtime.claim(self.run_id, number)

    def _reset_round(self) -> None:
        self._round, self._trained, self._fields = None, None, {}

    def _on_train(self, msg: Message) -> list[Action]:
        assert self.trainer is not None and self.cfg is not None and self.masker is not None
        size = self.trainer.layout.size
        check(msg, self.peer, Kind.TRAIN, _header_schema(msg.header), {"weights": (np.float32, (size,))})
        h = msg.header
        if h["round"] <= self._last_round:
            raise ProtocolError(self.peer, f"asks to train round {h['round']} after round {self._last_round}: "
                                           "a round is trained once")
        if "weight" in h and not 0.0 < h["weight"] <= 1.0:
            raise ProtocolError(self.peer, f"train: weight {h['weight']} is outside (0, 1]")
        if not np.isfinite(msg.arrays["weights"]).all():
            raise ProtocolError(self.peer, "train: the global weights contain NaN or infinity")
        self._round, self._last_round = h["round"], h["round"]
        self._fields = {k: v for k, v in h.items() if k not in ("round", "lr")}
        self.state = NodeState.TRAINING
        self.masker.start_round(h["round"])
        trainer, weights, lr, round_index = self.trainer, msg.arrays["weights"], float(h["lr"]), h["round"]
        return [self._work(lambda: trainer.train_round(round_index, weights, lr), self._trained_then)]

    def _on_masker(self, msg: Message) -> list[Action]:
        assert self.masker is not None
        replies, slow = self.masker.receive(msg)
        actions: list[Action] = [Send(m) for m in replies]
        if slow is not None:
            actions.append(self._work(slow, lambda _: [], lane=MASK_LANE))
        return actions + self._upload_if_ready()

    def _trained_then(self, result: tuple[np.ndarray, TrainResult]) -> list[Action]:
        delta, figures = result
        self._trained = (delta, {"round": self._round, "train": figures.as_plain()})
        return self._upload_if_ready()

    def _upload_if_ready(self) -> list[Action]:
        """Mask and send the trained update once the masker's set-up is complete (on the mask lane,
        after any expansion it queued there)."""
        masker, trained = self.masker, self._trained
        if trained is None or masker is None or not masker.ready():
            return []
        self._trained = None
        delta, header = trained
        fields = dict(self._fields)

        def masked_then(upload: np.ndarray) -> list[Action]:
            # the masker's later stages (survivors, unmasking) may still come, and then the next round
            self.state = NodeState.READY
            return [Send(Message(Kind.UPDATE, header, {"update": upload}))]

        return [self._work(lambda: masker.mask(delta, fields), masked_then, lane=MASK_LANE)]

    # -- evaluation ------------------------------------------------------------------------

    def _on_evaluate(self, msg: Message) -> list[Action]:
        assert self.trainer is not None
        check(msg, self.peer, Kind.EVALUATE, {"round": int}, {"weights": (np.float32, (self.trainer.layout.size,))})
        if not np.isfinite(msg.arrays["weights"]).all():
            raise ProtocolError(self.peer, "evaluate: the weights contain NaN or infinity")
        round_index, weights, trainer = msg.header["round"], msg.arrays["weights"], self.trainer
        self.state = NodeState.EVALUATING

        def evaluated(summary: Any) -> list[Action]:
            self.state = NodeState.READY
            header = {"round": round_index, **summary.header()}
            return [Send(Message(Kind.EVALUATION, header, summary.arrays()))]

        return [self._work(lambda: trainer.evaluate(weights), evaluated)]


def _header_schema(header: Any) -> dict[str, Any]:
    """A train message's fields: the round, the learning rate and, in the masked modes, the node's weight."""
    weight = {"weight": float} if isinstance(header, dict) and "weight" in header else {}
    return {"round": int, "lr": float, **weight}


def _no_signing(*fields: Any) -> bytes:
    raise ProtocolError("hub", "this node has no signing key, so it cannot take part in secure aggregation")


def _error(reason: str) -> Message:
    return Message(Kind.ERROR, {"reason": reason})
