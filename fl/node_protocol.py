"""A data owner's node, sans I/O: hub messages in, messages and work out.

:class:`NodeRuntime` lives as long as the node process: the checked data
folder, decoded images (cached per input size and channel count) and the
current run's :class:`fl.training.LocalTrainer`, so a hub that reconnects
(``--resume``) finds the node's optimizer state where it left it.

:class:`NodeSession` is one hub connection.  It never touches a socket or a
thread: :meth:`NodeSession.receive` takes a decoded message and returns
actions, :class:`Send` (a reply) or :class:`Work` (a slow call, such as
training, to run off the event loop; its result comes back through
:meth:`NodeSession.work_done` or :meth:`NodeSession.work_failed`).

States and messages::

    HELLO      --hello-->      hello_ack       CONFIGURE
    CONFIGURE  --configure-->  [work: load images, build model]             CONFIGURING
               [done]          configured                                    READY
    plain round:
    READY      --train-->      [work: train]                                 TRAINING
               [trained]       update                                        READY
    secure round:
    READY      --keys-->       public_key                                    KEYED
    KEYED      --roster-->     [mask lane: expand the masks]                 ROSTERED
    ROSTERED   --train-->      [work: train, then mask lane: mask]           TRAINING
               [masked]        masked_update                                 (dealer masking: READY)
    TRAINING   --unmask-->     reveal                                        READY
    READY      --evaluate-->   [work: evaluate] evaluation                   READY
    any        --bye-->        close

What leaves the node: its data summary (class names and counts, image sizes),
model updates (masked in secure mode), training loss and accuracy, and
validation summaries (confusion matrix and score histograms).  Never images,
labels or per-image scores.
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
from .secagg import DEALER, NodeSecAgg
from .training import LocalTrainer, TrainResult

__all__ = ["NodeState", "Send", "Work", "Close", "NodeRuntime", "NodeSession", "TRAIN_LANE", "MASK_LANE"]

log = logging.getLogger("primia.node")


class NodeState(enum.Enum):
    HELLO = "hello"
    CONFIGURE = "configure"
    CONFIGURING = "configuring"
    READY = "ready"
    KEYED = "keyed"
    ROSTERED = "rostered"
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
    reason: str


Action = Send | Work | Close


class NodeRuntime:
    """State that outlives a hub connection: the data and the current run's trainer."""

    def __init__(self, scan: FolderScan, *, name: str | None = None, device: str = "cpu"):
        self.scan = scan
        self.name = name
        self.device = device
        self._images: dict[tuple[int, int], np.ndarray] = {}
        self._trainer_key: tuple[Any, ...] | None = None
        self.trainer: LocalTrainer | None = None

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
    """One hub connection's protocol state machine (see the module docstring)."""

    def __init__(self, runtime: NodeRuntime, peer: str = "hub"):
        self.runtime = runtime
        self.peer = peer
        self.state = NodeState.HELLO
        self.node = runtime.name or ""
        self.run_id = ""
        self.cfg: Config | None = None
        self.trainer: LocalTrainer | None = None
        self._tickets = itertools.count(1)
        self._pending: dict[int, Callable[[Any], list[Action]]] = {}
        self._round: int | None = None
        self._secagg: NodeSecAgg | None = None

    # -- entry points ------------------------------------------------------------------

    def receive(self, msg: Message) -> list[Action]:
        """Handle one message from the hub; a protocol violation is answered with ``error`` and a close."""
        try:
            if msg.kind == Kind.BYE:
                self.state = NodeState.CLOSED
                return [Close("the hub ended the run")]
            if msg.kind == Kind.ERROR:
                self.state = NodeState.CLOSED
                return [Close(f"the hub reported an error: {msg.header.get('reason', '?')}")]
            handler = self._handlers().get((self.state, msg.kind))
            if handler is None:
                raise ProtocolError(self.peer, f"unexpected {msg.kind!r} message in state {self.state.value}")
            return handler(msg)
        except PrimiaError as exc:
            self.state = NodeState.CLOSED
            return [Send(_error(str(exc))), Close(str(exc))]
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            reason = f"protocol error with {self.peer}: malformed {msg.kind!r} ({type(exc).__name__}: {exc})"
            self.state = NodeState.CLOSED
            return [Send(_error(reason)), Close(reason)]

    def work_done(self, ticket: int, result: Any) -> list[Action]:
        then = self._pending.pop(ticket, None)
        if then is None or self.state is NodeState.CLOSED:
            return []  # the connection moved on (or closed) while the work ran
        try:
            return then(result)
        except PrimiaError as exc:
            return self._fail_work(exc)

    def work_failed(self, ticket: int, exc: BaseException) -> list[Action]:
        if self._pending.pop(ticket, None) is None or self.state is NodeState.CLOSED:
            return []
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
            (NodeState.READY, Kind.KEYS): self._on_keys,
            (NodeState.KEYED, Kind.ROSTER): self._on_roster,
            (NodeState.ROSTERED, Kind.TRAIN): self._on_train,
            (NodeState.READY, Kind.TRAIN): self._on_train,
            (NodeState.TRAINING, Kind.UNMASK): self._on_unmask,
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
        self.cfg = cfg
        node, run_id = self.node, self.run_id

        def configured(trainer: LocalTrainer) -> list[Action]:
            self.trainer = trainer
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

    def _reset_round(self) -> None:
        self._round, self._secagg = None, None

    def _on_keys(self, msg: Message) -> list[Action]:
        """Secure round, stage 1: fresh keys for this round."""
        assert self.cfg is not None
        check(msg, self.peer, Kind.KEYS, {"round": int, "context": bytes})
        if not self.cfg.aggregation.secure:
            raise ProtocolError(self.peer, "asked for keys, but this run's aggregation is not secure")
        agg = self.cfg.aggregation
        self._round = msg.header["round"]
        self._secagg = NodeSecAgg(self.node, msg.header["context"], agg.frac_bits, agg.ring_bits, agg.neighbours,
                                  masking=agg.masking)
        self.state = NodeState.KEYED
        return [Send(Message(Kind.PUBLIC_KEY, {"round": self._round, "key": self._secagg.public_key()}))]

    def _on_roster(self, msg: Message) -> list[Action]:
        """Secure round, stage 2: the round's public keys; the masks are expanded while the weights arrive."""
        assert self.trainer is not None and self._secagg is not None
        secagg, size = self._secagg, self.trainer.layout.size
        schema: dict[str, Any] = {"round": int, "keys": dict}
        if secagg.masking == DEALER:
            schema["dealer"] = bytes
        check(msg, self.peer, Kind.ROSTER, schema)
        self._check_round(msg)
        keys = msg.header["keys"]
        if not all(isinstance(k, str) for k in keys):
            raise ProtocolError(self.peer, "roster: node names must be strings")
        secagg.set_roster(keys, msg.header.get("dealer"))
        self.state = NodeState.ROSTERED
        return [self._work(lambda: secagg.expand_masks(size), lambda _: [], lane=MASK_LANE)]

    def _on_train(self, msg: Message) -> list[Action]:
        assert self.trainer is not None and self.cfg is not None
        size = self.trainer.layout.size
        check(msg, self.peer, Kind.TRAIN, {"round": int, "lr": float, "weight": float},
              {"weights": (np.float32, (size,))})
        h = msg.header
        secure = self.state is NodeState.ROSTERED
        if self.cfg.aggregation.secure and not secure:
            raise ProtocolError(self.peer, "sent train before the round's keys and roster (secure aggregation)")
        if secure:
            self._check_round(msg)
        if not 0.0 < h["weight"] <= 1.0:
            raise ProtocolError(self.peer, f"train: weight {h['weight']} is outside (0, 1]")
        if not np.isfinite(msg.arrays["weights"]).all():
            raise ProtocolError(self.peer, "train: the global weights contain NaN or infinity")
        self._round = h["round"]
        self.state = NodeState.TRAINING
        trainer, weights, lr, round_index = self.trainer, msg.arrays["weights"], float(h["lr"]), h["round"]
        weight = float(h["weight"])
        return [self._work(lambda: trainer.train_round(round_index, weights, lr),
                           lambda result: self._trained_then(result, weight))]

    def _trained_then(self, result: tuple[np.ndarray, TrainResult], weight: float) -> list[Action]:
        delta, figures = result
        header = {"round": self._round, "train": figures.as_plain()}
        secagg = self._secagg
        if secagg is None:
            self.state = NodeState.READY
            self._reset_round()
            return [Send(Message(Kind.UPDATE, header, {"update": delta}))]

        def masked_then(masked: np.ndarray) -> list[Action]:
            if secagg.masking == DEALER:  # nothing to reveal: the dealer removes the mask
                self.state = NodeState.READY
                self._reset_round()
            return [Send(Message(Kind.MASKED_UPDATE, header, {"masked": masked}))]

        # on the mask lane, after expand_masks: the masks are ready when this runs
        return [self._work(lambda: secagg.mask(delta, weight), masked_then, lane=MASK_LANE)]

    def _on_unmask(self, msg: Message) -> list[Action]:
        check(msg, self.peer, Kind.UNMASK, {"round": int, "included": list, "dropped": list})
        self._check_round(msg)
        if self._secagg is None:
            raise ProtocolError(self.peer, "sent unmask in a round without secure aggregation")
        h = msg.header
        if not all(isinstance(n, str) for n in [*h["included"], *h["dropped"]]):
            raise ProtocolError(self.peer, "unmask: node names must be strings")
        self_seed, pair_seeds = self._secagg.reveal(list(h["included"]), list(h["dropped"]))
        reply = Message(Kind.REVEAL, {"round": self._round, "self_seed": self_seed, "pair_seeds": pair_seeds})
        self.state = NodeState.READY
        self._reset_round()
        return [Send(reply)]

    def _check_round(self, msg: Message) -> None:
        if msg.header["round"] != self._round:
            raise ProtocolError(self.peer, f"{msg.kind}: round {msg.header['round']} while round {self._round} runs")

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


def _error(reason: str) -> Message:
    return Message(Kind.ERROR, {"reason": reason})

