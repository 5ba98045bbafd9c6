"""The hub: it listens, nodes dial in; the one round loop, and the asyncio adapter that feeds
:class:`fl.hub_protocol.HubProtocol`.

``run_hub(cfg)`` (what ``primia train`` calls):

1. Open ``run.output_dir`` (checked writable before anything else); with
   ``resume`` load ``checkpoint.pt`` (same configuration digest required) and
   continue after its round.
2. Listen on ``federation.listen``; nodes (and the dealer) dial in and
   authenticate with their keys (:mod:`fl.transport`).  Wait until
   ``min_nodes`` nodes have said hello (at most ``connect_timeout_s``), and
   up to ``start_grace_s`` more for the rest.
3. Take the classes (the sorted union of the nodes' class folders) and the
   channel count from the nodes, build the global model (seeded) and the
   aggregation (:func:`fl.strategy.build_aggregator`), configure the nodes
   and check they built the same model.
4. For each round: wait for ``min_nodes`` ready nodes; send the global weights
   and the round's learning rate to every ready node, collect the updates
   through the aggregator, apply the server step, evaluate on the nodes'
   validation splits, then write ``checkpoint.pt`` atomically — only then does
   the round count as done, so a hub restart never loses a completed round.
   A node that connects during a round (a restart) joins the next one.
5. Say goodbye; write ``model.pt``, ``report.json``, ``metrics.png``, ``roc.png``.

The adapter owns sockets and time: one reader and one writer per connection,
one inbox, and a wait bounded by the protocol's deadline.  A connection that
closes is reported at once.  Aggregation (which expands PRG masks for secure
rounds) runs in a worker thread so the event loop keeps answering keepalive
pings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import torch

from mpc.errors import ConfigError, FrameError, PeerFailure, PrimiaError
from mpc.net.channel import Channel, serve
from mpc.net.tls import server_context

from .aggregation import ServerOptimizer
from .checkpoint import load_checkpoint, save_checkpoint, write_json
from .config import Config, is_loopback
from .errors import ResumeError, RoundFailed, TooFewNodes
from .files import atomic_write
from .hub_protocol import (
    DEALER_LINK,
    Disconnect,
    Dropped,
    Evaluated,
    Failed,
    HubProtocol,
    Joined,
    Ready,
    RoundCollected,
    RoundResult,
    SendTo,
)
from .identity import load_private_key, load_public_key
from .metrics import compute_metrics, pool
from .models import Layout, build_model
from .report import roc_curves, write_report
from .strategy import build_aggregator
from .training import round_lr
from .transport import DEALER_ID, hub_identity, limits_for, options_for, port_file_writer, recv, run_token, send

__all__ = ["Observer", "Hub", "run_hub", "CHECKPOINT_NAME", "MODEL_NAME"]

log = logging.getLogger("primia.hub")

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
#: ``observer(event, info)``: "listening" (port), "send" (kind, node, round), "joined", "ready" (node),
#: "dropped" (node, stage, reason), "round" (the round record)
Observer = Callable[[str, dict[str, Any]], None]
E = TypeVar("E")


@dataclass
class _Link:
    name: str
    channel: Channel
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    writer: asyncio.Task | None = None
    sent: int = 0
    received: int = 0
    alive: bool = True
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Traffic:
    """Bytes to and from each peer over the whole run (links come and go; counts stay)."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return {n: (self.sent.get(n, 0), self.received.get(n, 0)) for n in set(self.sent) | set(self.received)}


class Hub:
    """One run of a federation (see the module docstring).

    Args:
        cfg: the checked configuration.
        resume: continue from ``output_dir/checkpoint.pt``.
        observer: called on sends, dropouts and completed rounds (progress, tests).
        progress: show a progress bar (default: when stderr is a terminal).
        port_file: write the bound port here (in decimal) once the hub listens.
    """

    def __init__(self, cfg: Config, *, resume: bool = False, observer: Observer | None = None,
                 progress: bool | None = None, port_file: str | os.PathLike | None = None):
        self.cfg = cfg
        self.resume = resume
        self.observer = observer or (lambda event, info: None)
        self.progress = progress
        self.port_file = port_file
        self.out_dir = cfg.output_dir
        self.links: dict[str, _Link] = {}
        self.inbox: asyncio.Queue[tuple[str, str, _Link, Any]] = asyncio.Queue()
        self.traffic = _Traffic()
        self.protocol: HubProtocol | None = None
        self.rejections: list[str] = []
        #: nodes lost during the run and not back yet; the next round waits briefly for each (a restart)
        self._away: set[str] = set()
        self._round_started = 0.0
        self._closing: set[asyncio.Task] = set()
        self._server: Any = None

    # -- the round loop ----------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run (or resume) the federation; returns the report."""
        cfg = self.cfg
        self._check_output_dir()
        state = self._load_state()
        run_id = state["run_id"] if state else f"{cfg.run.name}-{os.urandom(6).hex()}"
        history: list[dict[str, Any]] = list(state["history"]) if state else []
        start = int(state["round"]) + 1 if state else 1
        started = time.time()
        if state and start > cfg.run.rounds:
            log.info("the checkpoint already holds all %d rounds; writing the report", cfg.run.rounds)
            return self._final_report(run_id, state["classes"], state.get("nodes", {}), history, None, started)

        self.protocol = protocol = HubProtocol(cfg, run_id, session=os.urandom(16))
        try:
            await self._listen(run_id)
            joined = await self._wait_for_nodes()
            classes, channels = self._data_shape(joined, state)
            model = build_model(
                cfg.model.name, num_classes=len(classes), in_channels=channels, input_size=cfg.data.input_size,
                width=cfg.model.width, pooling=cfg.model.pooling, seed=cfg.run.seed,
            )
            layout = Layout.of(model)
            aggregator = build_aggregator(
                cfg.aggregation, directory=self._directory(), dealer_key=self._dealer_key(),
                optimizer=ServerOptimizer(lr=cfg.aggregation.server_lr, momentum=cfg.aggregation.server_momentum,
                                          param_mask=layout.param_mask()),
            )
            if state:
                model.load_state_dict(state["model"])
                aggregator.load_state({k: v.numpy() for k, v in state["server_optimizer"].items()})
            weights = layout.flatten(model)
            self._apply(protocol.configure(classes, channels, layout, aggregator, _now()))
            log.info("run %s: %d node(s) connected, %d classes %s, model %s (%d values), %s aggregation, "
                     "rounds %d-%d", run_id, len(joined), len(classes), classes, cfg.model.name, layout.size,
                     aggregator.label, start, cfg.run.rounds)
            nodes: dict[str, Any] = {}
            last_eval: Evaluated | None = None
            bar = self._progress_bar(start)
            for number in range(start, cfg.run.rounds + 1):
                record, weights = await self._round(number, weights)
                nodes.update(self._node_records(record["included"]))
                layout.load(model, weights)
                history.append(record)
                # The round counts from here: its model is saved before any node receives it, so a hub restarted
                # from now on never runs this round again (its sum was opened; a second one could expose an update).
                self._checkpoint(run_id, number, model, aggregator.state(), classes, channels, nodes, history)
                evaluated = await self._evaluate(number, weights, record, classes)
                if evaluated is not None:
                    last_eval = evaluated
                    self._checkpoint(run_id, number, model, aggregator.state(), classes, channels, nodes, history)
                self.observer("round", record)
                # a line per round, unless a progress bar shows the same (the line would break the bar)
                _log_round(record, cfg.run.rounds, logging.DEBUG if bar is not None else logging.INFO)
                if bar is not None:
                    bar.update(1)
                    pooled = (record.get("eval") or {}).get("pooled") or {}
                    bar.set_postfix(loss=pooled.get("loss"), acc=pooled.get("accuracy"))
            if bar is not None:
                bar.close()
            await self._close()
            atomic_write(self.out_dir / MODEL_NAME, lambda fh: torch.save(model.state_dict(), fh))
            return self._final_report(run_id, classes, nodes, history, last_eval, started)
        except RoundFailed as exc:
            exc.advice = self._advice()
            await self._abort()
            raise
        except BaseException:
            await self._abort()
            raise

    def _advice(self) -> str:
        checkpoint = self.out_dir / CHECKPOINT_NAME
        if checkpoint.exists():
            return f"the completed rounds are in {checkpoint}: run the same command with --resume to go on"
        return "no round had completed, so nothing is saved: run the same command again"

    async def _round(self, number: int, weights: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """One round: training and aggregation; returns its record and the new global weights."""
        cfg, protocol = self.cfg, self.protocol
        assert protocol is not None
        await self._wait_for_round(number)
        t0 = time.perf_counter()
        bytes_before = self.traffic.snapshot()
        lr = round_lr(cfg.training, number - 1, cfg.run.rounds)
        await self._until(protocol.begin_round(number, weights, lr, _now()), RoundCollected)
        result: RoundResult = await asyncio.to_thread(protocol.aggregate)
        bytes_trained = self.traffic.snapshot()
        record: dict[str, Any] = {
            "round": number,
            "lr": lr,
            "included": result.included,
            "dropped": result.dropped,
            "weights": result.weights,
            "train": result.figures,
            "seconds": {"train_and_aggregate": time.perf_counter() - t0},
            "bytes": _traffic(bytes_before, bytes_trained, result.weights),
        }
        if DEALER_LINK in bytes_trained:
            before = bytes_before.get(DEALER_LINK, (0, 0))
            record["dealer_bytes"] = {"to_dealer": bytes_trained[DEALER_LINK][0] - before[0],
                                      "from_dealer": bytes_trained[DEALER_LINK][1] - before[1]}
        self._round_started = t0
        return record, result.model

    async def _evaluate(self, number: int, weights: np.ndarray, record: dict[str, Any],
                        classes: list[str]) -> Evaluated | None:
        """The round's evaluation, if one is due; adds its metrics and timing to ``record``."""
        protocol, every = self.protocol, self.cfg.run.evaluate_every
        assert protocol is not None
        before = self.traffic.snapshot()
        evaluated = None
        if every and (number % every == 0 or number == self.cfg.run.rounds):
            evaluated = await self._until(protocol.begin_evaluation(number, weights, _now()), Evaluated)
            record["eval"] = {
                "pooled": compute_metrics(pool(list(evaluated.summaries.values())), classes),
                "nodes": {n: compute_metrics(s, classes) for n, s in evaluated.summaries.items()},
            }
        record["eval_bytes"] = _traffic(before, self.traffic.snapshot(), record["weights"])
        record["seconds"]["total"] = time.perf_counter() - self._round_started
        return evaluated

    # -- set-up -------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        """Fail now, not after the first round, if results cannot be written."""
        probe = self.out_dir / ".primia-write-test"
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"run.output_dir: cannot write to {self.out_dir} ({exc.strerror or exc}); choose a "
                              "folder this user can create and write") from None

    def _load_state(self) -> dict[str, Any] | None:
        path = self.out_dir / CHECKPOINT_NAME
        if not self.resume:
            if path.exists():
                raise ResumeError(
                    f"{self.out_dir} already holds a run (checkpoint {path}); pass --resume to continue it, "
                    "or set run.output_dir to a new folder"
                )
            return None
        state = load_checkpoint(path)
        if state.get("config_digest") != self.cfg.digest():
            raise ResumeError(
                f"checkpoint {path} was made with a different configuration (model, data, training or aggregation "
                "settings changed); only run.rounds and run.evaluate_every may change on --resume"
            )
        log.info("resuming run %s after round %d", state["run_id"], int(state["round"]))
        return state

    def _directory(self) -> Any:
        from .identity import Directory

        fed = self.cfg.federation
        return Directory({n.name: load_public_key(n.public_key_file, what=f"node {n.name}") for n in fed.nodes})

    def _dealer_key(self) -> Any:
        path = self.cfg.federation.dealer_public_key_file
        return load_public_key(path, what="federation.dealer_public_key_file") if path else None

    async def _listen(self, run_id: str) -> None:
        fed = self.cfg.federation
        host, port = self.cfg.listen
        members = dict(self._directory().keys)
        if fed.dealer_public_key_file:
            members[DEALER_ID] = self._dealer_key()
        identity = hub_identity(load_private_key(fed.key_file, what="federation.key_file"), members)
        tls = server_context(fed.tls_cert, fed.tls_key) if fed.tls_cert else None
        if tls is None and not is_loopback(host):
            log.warning("listening on %s without TLS (federation.allow_plaintext = true): anyone on the path can "
                        "read and rewrite every message", host)
        options = options_for(connect_timeout_s=fed.connect_timeout_s, handshake_timeout_s=fed.handshake_timeout_s,
                              max_unauthenticated=fed.max_unauthenticated)
        try:
            self._server = await serve(
                self._serve_peer, host, port, membership=identity, context=run_token(run_id),
                accept=lambda peer: None, on_reject=self._rejected,
                label=lambda peer, address: f"{'the dealer' if peer == DEALER_ID else f'node {peer}'} (from {address})",
                limits=limits_for(fed.max_message_mib), options=options, ssl=tls,
            )
        except OSError as exc:
            raise ConfigError(f"federation.listen: cannot listen on {host}:{port}: {exc.strerror or exc}; choose "
                              "another port (0 picks a free one)") from None
        bound = self._server.sockets[0].getsockname()[1]
        port_file_writer(self.port_file)(bound)
        self.observer("listening", {"port": bound})
        log.info("hub listening on %s://%s:%d for %d node(s)%s", "wss" if tls else "ws", host, bound, len(fed.nodes),
                 " and the dealer" if fed.dealer_public_key_file else "")

    def _rejected(self, reason: str) -> None:
        self.rejections = (self.rejections + [reason])[-20:]

    async def _wait(self, ready: Callable[[], bool], timeout_s: float | None) -> bool:
        """Feed the protocol until ``ready()`` holds or ``timeout_s`` passes; returns ``ready()``."""
        protocol = self.protocol
        assert protocol is not None
        end = None if timeout_s is None else _now() + timeout_s
        while not ready():
            limits = [t for t in (end, protocol.deadline) if t is not None]
            timeout = max(min(limits) - _now(), 0.0) if limits else None
            try:
                item = await asyncio.wait_for(self.inbox.get(), timeout)
            except TimeoutError:
                self._apply(protocol.on_deadline(_now()))
                if end is not None and _now() >= end:
                    return ready()
                continue
            self._apply(self._feed(item))
        return True

    async def _wait_for_nodes(self) -> dict[str, dict[str, Any]]:
        """At start-up: until min_nodes nodes said hello (then up to start_grace_s for the rest)."""
        protocol, fed = self.protocol, self.cfg.federation
        assert protocol is not None
        configured = {n.name for n in fed.nodes}
        enough = lambda: len(protocol.joined_nodes()) >= self.cfg.min_nodes  # noqa: E731
        if not await self._wait(enough, fed.connect_timeout_s):
            raise self._too_few(0, "connect", sorted(protocol.joined_nodes()), fed.connect_timeout_s)
        everyone = lambda: set(protocol.joined_nodes()) >= configured  # noqa: E731
        await self._wait(everyone, fed.start_grace_s)
        return protocol.joined_nodes()

    async def _wait_for_round(self, number: int) -> None:
        """Until min_nodes nodes are ready (and the dealer is connected, where needed), then up to start_grace_s
        for nodes still setting up and for nodes lost since the last round (a restarting node takes part as soon
        as it is ready; a node that stays away is waited for once, not before every round)."""
        protocol, fed = self.protocol, self.cfg.federation
        assert protocol is not None
        needs_dealer = DEALER_LINK in protocol.aggregator.needs
        enough = lambda: len(protocol.ready_nodes()) >= self.cfg.min_nodes and (  # noqa: E731
            protocol.dealer_connected or not needs_dealer)
        if not await self._wait(enough, fed.connect_timeout_s):
            if needs_dealer and not protocol.dealer_connected:
                raise RoundFailed(number, "start", f"the dealer did not connect within {fed.connect_timeout_s:g} s "
                                                   "(aggregation.masking = 'dealer'): start `primia dealer --hub ...` "
                                                   "and check its keys" + self._rejection_note())
            raise self._too_few(number, "start", protocol.ready_nodes(), fed.connect_timeout_s)
        away = set(self._away)
        back = lambda: not protocol.in_setup() and not (away - set(protocol.ready_nodes()))  # noqa: E731
        if not await self._wait(back, fed.start_grace_s) and away - set(protocol.ready_nodes()):
            log.info("round %d starts without %s (not back within federation.start_grace_s = %g s)", number,
                     ", ".join(sorted(away - set(protocol.ready_nodes()))), fed.start_grace_s)
        self._away -= away

    def _too_few(self, number: int, stage: str, present: list[str], waited_s: float) -> TooFewNodes:
        missing = sorted({n.name for n in self.cfg.federation.nodes} - set(present))
        rule = (f"federation.min_nodes = {self.cfg.min_nodes}; waited {waited_s:g} s for "
                f"{', '.join(missing) or 'more nodes'}{self._rejection_note()}")
        return TooFewNodes(number, stage, present, self.cfg.min_nodes, rule)

    def _rejection_note(self) -> str:
        if not self.rejections:
            return ""
        return "; connections refused meanwhile: " + " | ".join(self.rejections[-3:])

    def _data_shape(self, joined: dict[str, dict[str, Any]], state: dict[str, Any] | None) -> tuple[list[str], int]:
        classes = sorted({c for s in joined.values() for c in s["classes"]})
        channels = self.cfg.data.channels or (3 if any(3 in s["channels"] for s in joined.values()) else 1)
        if state:
            if list(state["classes"]) != classes or int(state["channels"]) != channels:
                raise ResumeError(
                    f"the nodes now hold classes {classes} with {channels} channel(s), but the checkpoint was trained "
                    f"on {list(state['classes'])} with {int(state['channels'])}; resume with the same data"
                )
        if len(classes) < 2:
            raise PrimiaError(f"the nodes hold only the class {classes}; classification needs at least two classes")
        data = self.cfg.data
        for key in ("mean", "std"):
            if len(getattr(data, key)) == 3 and channels == 1:
                raise ConfigError(f"data.{key}: 3 values (RGB), but the nodes' images are grayscale (1 channel); "
                                  "give one value, or set data.channels = 3 to train on RGB copies")
        for name, summary in joined.items():
            counts = dict(zip(summary["classes"], summary["counts"]))
            log.info("node %s: %d images %s", name, sum(counts.values()), counts)
        return classes, channels

    def _node_records(self, included: list[str]) -> dict[str, Any]:
        protocol = self.protocol
        assert protocol is not None
        out = {}
        for name in included:
            node = protocol.nodes.get(name)
            if node is not None and node.summary is not None:
                out[name] = {"data": node.summary, "train_samples": node.train_samples,
                             "val_samples": node.val_samples}
        return out

    # -- the adapter ----------------------------------------------------------------------

    async def _serve_peer(self, channel: Channel) -> None:
        """One authenticated connection (run by the server): register it, read until it closes."""
        name = DEALER_LINK if channel.peer_id == DEALER_ID else str(channel.peer_id)
        old = self.links.get(name)
        if old is not None and old.alive:
            log.info("%s connected again; closing its previous connection", channel.peer_label)
            self._lose(old, "replaced by a new connection from the same peer")
            await old.channel.abort("replaced by a new connection")
        link = _Link(name, channel)
        link.writer = asyncio.create_task(self._writer(link))
        self.links[name] = link
        await self.inbox.put(("connected", name, link, None))
        try:
            while True:
                msg, size = await recv(channel)
                link.received += size
                self.traffic.received[name] = self.traffic.received.get(name, 0) + size
                await self.inbox.put(("message", name, link, msg))
        except (PeerFailure, FrameError) as exc:
            self._lose(link, getattr(exc, "reason", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug here must still report the peer lost, never hang the run
            log.exception("reading from %s failed", channel.peer_label)
            self._lose(link, f"receiving failed: {type(exc).__name__}: {exc}")
        finally:
            if link.writer is not None:
                link.writer.cancel()
            self._lose(link, "connection closed")
            link.closed.set()

    def _lose(self, link: _Link, reason: str) -> None:
        if link.alive:
            link.alive = False
            self.inbox.put_nowait(("lost", link.name, link, reason))

    async def _writer(self, link: _Link) -> None:
        while True:
            msg = await link.outbox.get()
            try:
                size = await send(link.channel, msg)
                link.sent += size
                self.traffic.sent[link.name] = self.traffic.sent.get(link.name, 0) + size
            except PeerFailure as exc:
                self._lose(link, exc.reason)
                return
            except Exception as exc:  # noqa: BLE001 - an unsendable message is a bug: lose the peer, not the run
                log.exception("sending %s to %s failed", msg.kind, link.channel.peer_label)
                self._lose(link, f"sending failed: {type(exc).__name__}: {exc}")
                return
            finally:
                link.outbox.task_done()

    def _feed(self, item: tuple[str, str, _Link, Any]) -> list[Any]:
        """One inbox item into the protocol (items of a replaced connection are stale and dropped)."""
        what, name, link, value = item
        protocol = self.protocol
        assert protocol is not None
        if self.links.get(name) is not link and what != "lost":
            return []
        if what == "connected":
            return protocol.connected(name, _now())
        if what == "lost":
            if self.links.get(name) is link:
                del self.links[name]
            return protocol.lost(name, value, _now())
        return protocol.receive(name, value, _now())

    async def _until(self, actions: list[Any], wanted: type[E]) -> E:
        """Carry out actions and feed the protocol until it emits a ``wanted`` event (or fails)."""
        protocol = self.protocol
        assert protocol is not None
        while True:
            for event in self._apply(actions):
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, wanted):
                    return event
            timeout = None if protocol.deadline is None else max(protocol.deadline - _now(), 0.0)
            try:
                item = await asyncio.wait_for(self.inbox.get(), timeout)
            except TimeoutError:
                actions = protocol.on_deadline(_now())
                continue
            actions = self._feed(item)

    def _apply(self, actions: list[Any]) -> list[Any]:
        events = []
        for action in actions:
            if isinstance(action, SendTo):
                link = self.links.get(action.peer)
                if link is not None and link.alive:
                    link.outbox.put_nowait(action.message)
                    self.observer("send", {"kind": action.message.kind, "node": action.peer,
                                           "round": action.message.header.get("round")})
            elif isinstance(action, Disconnect):
                self._disconnect(action.peer, action.reason)
            elif isinstance(action, Dropped):
                log.warning("node %s dropped during %s: %s", action.node, action.stage, action.reason)
                self._away.add(action.node)
                self.observer("dropped", {"node": action.node, "stage": action.stage, "reason": action.reason})
            elif isinstance(action, Joined):
                log.info("node %s joined", action.node)
                self._away.discard(action.node)
                for warning in action.warnings:
                    log.warning("node %s: %s", action.node, warning)
                self.observer("joined", {"node": action.node})
            elif isinstance(action, Ready):
                log.info("node %s is ready (%d training, %d validation images)", action.node, action.train_samples,
                         action.val_samples)
                self.observer("ready", {"node": action.node})
            else:
                events.append(action)
        return events

    def _disconnect(self, name: str, reason: str) -> None:
        link = self.links.pop(name, None)
        if link is None or not link.alive:
            return
        link.alive = False
        closing = asyncio.create_task(link.channel.abort(reason[:100]))
        self._closing.add(closing)  # keep a reference until it is done
        closing.add_done_callback(self._closing.discard)

    async def _close(self) -> None:
        assert self.protocol is not None
        self._apply(self.protocol.finish())
        live = [link for link in self.links.values() if link.alive]
        try:
            await asyncio.wait_for(asyncio.gather(*(link.outbox.join() for link in live)), 30)
        except TimeoutError:
            log.warning("goodbye messages were not all sent within 30 s")
        await asyncio.gather(*(link.channel.close("run complete") for link in live), return_exceptions=True)
        await self._stop_server()

    async def _abort(self) -> None:
        links = list(self.links.values())
        try:
            await asyncio.wait_for(asyncio.gather(*(link.outbox.join() for link in links if link.alive)), 5)
        except TimeoutError:
            pass
        await asyncio.gather(*(link.channel.abort("the hub stopped") for link in links), return_exceptions=True)
        await self._stop_server()

    async def _stop_server(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 10)
            except TimeoutError:
                pass
            self._server = None

    # -- outputs ----------------------------------------------------------------------------

    def _checkpoint(self, run_id: str, number: int, model: torch.nn.Module, server_state: dict[str, np.ndarray],
                    classes: list[str], channels: int, nodes: dict[str, Any], history: list[dict[str, Any]]) -> None:
        save_checkpoint(
            self.out_dir / CHECKPOINT_NAME,
            {
                "run_id": run_id,
                "config_digest": self.cfg.digest(),
                "round": number,
                "model": model.state_dict(),
                "server_optimizer": server_state,
                "classes": classes,
                "channels": channels,
                "nodes": nodes,
                "history": history,
            },
        )
        write_json(self.out_dir / "report.json", self._report(run_id, classes, nodes, history, None, None))

    def _report(self, run_id: str, classes: list[str], nodes: dict[str, Any], history: list[dict[str, Any]],
                last_eval: Evaluated | None, started: float | None) -> dict[str, Any]:
        spec = self.cfg.node_spec()
        fed = self.cfg.federation
        spec["federation"] = {
            "listen": fed.listen,
            "nodes": [{"name": n.name, "public_key_file": n.public_key_file} for n in fed.nodes],
            "min_nodes": self.cfg.min_nodes,
            "on_dropout": fed.on_dropout,
        }
        report: dict[str, Any] = {
            "run": {"id": run_id, "name": self.cfg.run.name, "rounds_done": len(history),
                    "rounds": self.cfg.run.rounds, "secure_aggregation": self.cfg.aggregation.secure},
            "config": spec,
            "classes": classes,
            "nodes": nodes,
            "rounds": history,
            "outputs": {"checkpoint": str(self.out_dir / CHECKPOINT_NAME), "model": str(self.out_dir / MODEL_NAME)},
        }
        if started is not None:
            report["run"]["seconds"] = time.time() - started
        evaluated = [r for r in history if r.get("eval")]
        if evaluated:
            report["final"] = {"round": evaluated[-1]["round"], **evaluated[-1]["eval"]}
        if last_eval is not None:
            report["roc"] = roc_curves(pool(list(last_eval.summaries.values())), classes)
        return report

    def _final_report(self, run_id: str, classes: list[str], nodes: dict[str, Any], history: list[dict[str, Any]],
                      last_eval: Evaluated | None, started: float) -> dict[str, Any]:
        report = self._report(run_id, classes, nodes, history, last_eval, started)
        paths = write_report(self.out_dir, report)
        report["outputs"].update(paths)
        return report

    def _progress_bar(self, start: int) -> Any:
        show = self.progress if self.progress is not None else _terminal_columns() > 0
        if not show:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.run.rounds, initial=start - 1, desc="rounds", unit="round")


def _traffic(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
             nodes: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Bytes on the wire to and from each of ``nodes`` between two snapshots of the traffic counters
    (the dealer's are reported apart, as the round's ``dealer_bytes``)."""
    out = {}
    for n in sorted(nodes):
        sent, received = before.get(n, (0, 0))
        now_sent, now_received = after.get(n, (sent, received))
        out[n] = {"to_node": now_sent - sent, "from_node": now_received - received}
    return out


def _terminal_columns() -> int:
    """Width of the terminal on stderr; 0 when stderr is not one (or one without a size)."""
    try:
        return os.get_terminal_size(2).columns if os.isatty(2) else 0
    except OSError:
        return 0


def _now() -> float:
    return time.monotonic()


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _log_round(record: dict[str, Any], rounds: int, level: int) -> None:
    pooled = (record.get("eval") or {}).get("pooled") or {}
    up = [b["from_node"] for b in record["bytes"].values()]
    log.log(
        level,
        "round %d/%d: %d node(s)%s, val loss %s, accuracy %s, MCC %s, %.1f s, %.2f MB up per node",
        record["round"], rounds, len(record["included"]),
        f" ({len(record['dropped'])} dropped: {', '.join(record['dropped'])})" if record["dropped"] else "",
        _fmt(pooled.get("loss")), _fmt(pooled.get("accuracy")), _fmt(pooled.get("mcc")),
        record["seconds"]["total"], (max(up) if up else 0) / 1e6,
    )


def run_hub(cfg: Config, *, resume: bool = False, observer: Observer | None = None,
            progress: bool | None = None, port_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run a federation to the end (blocking); returns the report.  See :class:`Hub`."""
    return asyncio.run(Hub(cfg, resume=resume, observer=observer, progress=progress, port_file=port_file).run())
