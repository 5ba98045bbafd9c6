"""The hub: the one round loop, and the asyncio adapter that feeds :class:`fl.hub_protocol.HubProtocol`.

``run_hub(cfg)`` (what ``primia train`` calls):

1. Open ``run.output_dir``; with ``resume`` load ``checkpoint.pt`` (same
   configuration digest required) and continue after its round.
2. Dial every node and authenticate (:mod:`fl.transport`); say hello.
3. Take the classes (the sorted union of the nodes' class folders) and the
   channel count from the nodes, build the global model (seeded), configure
   the nodes and check they built the same model.
4. For each round: send the global weights and the round's learning rate,
   collect the updates (plain or securely aggregated), apply the server step,
   evaluate on the nodes' validation splits, then write ``checkpoint.pt``
   atomically — only then does the round count as done, so a hub restart never
   loses a completed round.
5. Say goodbye; write ``model.pt``, ``report.json``, ``metrics.png``, ``roc.png``.

The adapter owns sockets and time: one reader and one writer task per node,
one inbox, and a wait bounded by the protocol's deadline.  Aggregation (which
expands PRG masks for secure rounds) runs in a worker thread so the event loop
keeps answering keepalive pings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from mpc.errors import FrameError, PeerFailure, PrimiaError
from mpc.net.channel import Channel, connect
from mpc.net.tls import client_context

from .aggregation import ServerOptimizer
from .checkpoint import load_checkpoint, save_checkpoint, write_json
from .config import Config
from .errors import ResumeError
from .files import atomic_write
from .hub_protocol import (
    DEALER_LINK,
    Configured,
    Disconnect,
    Dropped,
    Evaluated,
    Failed,
    HubProtocol,
    NodesReady,
    RoundCollected,
    RoundResult,
    SendTo,
)
from .messages import Message
from .metrics import compute_metrics, pool
from .models import Layout, build_model
from .report import roc_curves, write_report
from .training import round_lr
from .transport import DEALER_ID, HUB_ID, limits_for, membership, options_for, recv, send

__all__ = ["Observer", "Hub", "run_hub", "CHECKPOINT_NAME", "MODEL_NAME"]

log = logging.getLogger("primia.hub")

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
#: ``observer(event, info)``: "send" (kind, node, round), "dropped" (node, stage, reason), "round" (the round record)
Observer = Callable[[str, dict[str, Any]], None]
E = TypeVar("E")


@dataclass
class _Lost:
    reason: str


@dataclass
class _Link:
    name: str
    channel: Channel
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task] = field(default_factory=list)
    sent: int = 0
    received: int = 0
    alive: bool = True


class Hub:
    """One run of a federation (see the module docstring).

    Args:
        cfg: the checked configuration.
        resume: continue from ``output_dir/checkpoint.pt``.
        observer: called on sends, dropouts and completed rounds (progress, tests).
        progress: show a progress bar (default: when stderr is a terminal).
    """

    def __init__(self, cfg: Config, *, resume: bool = False, observer: Observer | None = None, progress: bool | None = None):
        self.cfg = cfg
        self.resume = resume
        self.observer = observer or (lambda event, info: None)
        self.progress = progress
        self.out_dir = cfg.output_dir
        self.links: dict[str, _Link] = {}
        self.inbox: asyncio.Queue[tuple[str, Message | _Lost]] = asyncio.Queue()
        self.protocol: HubProtocol | None = None
        self._closing: set[asyncio.Task] = set()

    # -- the round loop ----------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run (or resume) the federation; returns the report."""
        cfg = self.cfg
        state = self._load_state()
        run_id = state["run_id"] if state else f"{cfg.run.name}-{os.urandom(6).hex()}"
        history: list[dict[str, Any]] = list(state["history"]) if state else []
        start = int(state["round"]) + 1 if state else 1
        started = time.time()
        if state and start > cfg.run.rounds:
            log.info("the checkpoint already holds all %d rounds; writing the report", cfg.run.rounds)
            return self._final_report(run_id, state["classes"], state.get("nodes", {}), history, None, started)

        self.protocol = HubProtocol(cfg, run_id)
        try:
            ready = await self._open(run_id)
            classes, channels = self._data_shape(ready, state)
            model = build_model(
                cfg.model.name, num_classes=len(classes), in_channels=channels, input_size=cfg.data.input_size,
                width=cfg.model.width, pooling=cfg.model.pooling, seed=cfg.run.seed,
            )
            layout = Layout.of(model)
            server = ServerOptimizer(lr=cfg.aggregation.server_lr, momentum=cfg.aggregation.server_momentum,
                                     param_mask=layout.param_mask())
            if state:
                model.load_state_dict(state["model"])
                server.load_state({k: v.numpy() for k, v in state["server_optimizer"].items()})
            weights = layout.flatten(model)
            configured = await self._until(self.protocol.configure(classes, channels, layout, _now()), Configured)
            nodes = {
                n: {"data": ready.summaries[n], "warnings": ready.warnings[n],
                    "train_samples": configured.train_samples[n], "val_samples": configured.val_samples[n]}
                for n in configured.train_samples
            }
            aggregation = f"secure ({cfg.aggregation.masking} masks)" if cfg.aggregation.secure else "plain"
            log.info("run %s: %d nodes, %d classes %s, model %s (%d values), %s aggregation, rounds %d-%d",
                     run_id, len(nodes), len(classes), classes, cfg.model.name, layout.size, aggregation, start,
                     cfg.run.rounds)
            last_eval: Evaluated | None = None
            bar = self._progress_bar(start)
            for number in range(start, cfg.run.rounds + 1):
                record, weights, evaluated = await self._round(number, weights, server, classes)
                last_eval = evaluated or last_eval
                layout.load(model, weights)
                history.append(record)
                self._checkpoint(run_id, number, model, server, classes, channels, nodes, history)
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
        except BaseException:
            await self._abort()
            raise

    async def _round(
        self, number: int, weights: np.ndarray, server: ServerOptimizer, classes: list[str]
    ) -> tuple[dict[str, Any], np.ndarray, Evaluated | None]:
        cfg, protocol = self.cfg, self.protocol
        assert protocol is not None
        t0 = time.perf_counter()
        bytes_before = {n: (link.sent, link.received) for n, link in self.links.items()}
        lr = round_lr(cfg.training, number - 1, cfg.run.rounds)
        await self._until(protocol.begin_round(number, weights, lr, _now()), RoundCollected)
        result: RoundResult = await asyncio.to_thread(protocol.aggregate)
        weights = server.step(weights, result.mean_update)
        t_train = time.perf_counter() - t0
        bytes_trained = {n: (link.sent, link.received) for n, link in self.links.items()}
        evaluated = None
        every = cfg.run.evaluate_every
        if every and (number % every == 0 or number == cfg.run.rounds):
            evaluated = await self._until(protocol.begin_evaluation(number, weights, _now()), Evaluated)
        record: dict[str, Any] = {
            "round": number,
            "lr": lr,
            "included": result.included,
            "dropped": result.dropped,
            "weights": result.weights,
            "train": result.figures,
            "seconds": {"train_and_aggregate": t_train, "total": time.perf_counter() - t0},
            "bytes": _traffic(bytes_before, bytes_trained),
            **({"dealer_bytes": {"to_dealer": bytes_trained[DEALER_LINK][0] - bytes_before[DEALER_LINK][0],
                                 "from_dealer": bytes_trained[DEALER_LINK][1] - bytes_before[DEALER_LINK][1]}}
               if DEALER_LINK in bytes_before else {}),
            "eval_bytes": _traffic(bytes_trained, {n: (link.sent, link.received) for n, link in self.links.items()}),
        }
        if evaluated is not None:
            record["eval"] = {
                "pooled": compute_metrics(pool(list(evaluated.summaries.values())), classes),
                "nodes": {n: compute_metrics(s, classes) for n, s in evaluated.summaries.items()},
            }
        return record, weights, evaluated

    # -- set-up -------------------------------------------------------------------------

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

    async def _open(self, run_id: str) -> NodesReady:
        """Dial and authenticate every node, then say hello."""
        cfg = self.cfg
        fed = cfg.federation
        limits, options = limits_for(fed.max_message_mib), options_for(connect_timeout_s=fed.connect_timeout_s)

        tls = client_context(fed.tls_ca) if fed.tls_ca else None

        async def dial(index: int) -> Channel:
            node = fed.nodes[index]
            return await connect(
                node.address,
                membership=membership(HUB_ID, node.token, what=f"federation.nodes[{index}].token"),
                peer_id=node.name,
                peer_label=f"node {node.name} at {node.address}",
                limits=limits,
                options=options,
                ssl=tls if node.address.startswith("wss://") else None,
            )

        async def dial_dealer() -> Channel:
            try:
                return await connect(
                    fed.dealer_address,
                    membership=membership(HUB_ID, fed.dealer_token, what="federation.dealer_token"),
                    peer_id=DEALER_ID,
                    peer_label=f"the dealer at {fed.dealer_address}",
                    limits=limits,
                    options=options,
                    ssl=tls if fed.dealer_address.startswith("wss://") else None,
                )
            except PrimiaError as exc:
                raise PeerFailure(DEALER_ID, f"cannot use the dealer at {fed.dealer_address} "
                                             f"(aggregation.masking = 'dealer'): {exc}") from None

        dialing = [dial(i) for i in range(len(fed.nodes))]
        dealer_dial = None
        if self.protocol is not None and self.protocol.dealer is not None:
            dealer_dial = asyncio.ensure_future(dial_dealer())
        results = await asyncio.gather(*dialing, return_exceptions=True)
        unreachable: dict[str, str] = {}
        for node, result in zip(fed.nodes, results):
            if isinstance(result, BaseException):
                if not isinstance(result, PrimiaError):
                    raise result
                unreachable[node.name] = str(result)
                log.error("node %s: %s", node.name, result)
            else:
                self._attach(node.name, result)
        if dealer_dial is not None:
            self._attach(DEALER_LINK, await dealer_dial)  # a failure here: _abort closes the nodes' links
        nodes = sorted(n for n in self.links if n != DEALER_LINK)
        if len(nodes) < cfg.min_nodes:
            raise PeerFailure(
                ", ".join(sorted(unreachable)),
                f"only {len(nodes)} of {len(fed.nodes)} nodes reachable, federation.min_nodes = {cfg.min_nodes}: "
                + "; ".join(f"{n}: {r}" for n, r in unreachable.items()),
            )
        assert self.protocol is not None
        return await self._until(self.protocol.start(nodes, unreachable, _now()), NodesReady)

    def _data_shape(self, ready: NodesReady, state: dict[str, Any] | None) -> tuple[list[str], int]:
        classes = sorted({c for s in ready.summaries.values() for c in s["classes"]})
        channels = self.cfg.data.channels or (3 if any(3 in s["channels"] for s in ready.summaries.values()) else 1)
        if state:
            if list(state["classes"]) != classes or int(state["channels"]) != channels:
                raise ResumeError(
                    f"the nodes now hold classes {classes} with {channels} channel(s), but the checkpoint was trained "
                    f"on {list(state['classes'])} with {int(state['channels'])}; resume with the same data"
                )
        if len(classes) < 2:
            raise PrimiaError(f"the nodes hold only the class {classes}; classification needs at least two classes")
        for name, summary in ready.summaries.items():
            counts = dict(zip(summary["classes"], summary["counts"]))
            log.info("node %s: %d images %s", name, sum(counts.values()), counts)
            for warning in ready.warnings[name]:
                log.warning("node %s: %s", name, warning)
        return classes, channels

    # -- the adapter ----------------------------------------------------------------------

    def _attach(self, name: str, channel: Channel) -> None:
        link = _Link(name, channel)
        link.tasks = [asyncio.create_task(self._reader(link)), asyncio.create_task(self._writer(link))]
        self.links[name] = link

    async def _reader(self, link: _Link) -> None:
        try:
            while True:
                msg, size = await recv(link.channel)
                link.received += size
                await self.inbox.put((link.name, msg))
        except (PeerFailure, FrameError) as exc:
            link.alive = False
            await self.inbox.put((link.name, _Lost(getattr(exc, "reason", str(exc)))))

    async def _writer(self, link: _Link) -> None:
        while True:
            msg = await link.outbox.get()
            try:
                link.sent += await send(link.channel, msg)
            except PeerFailure as exc:
                link.alive = False
                await self.inbox.put((link.name, _Lost(exc.reason)))
                return
            finally:
                link.outbox.task_done()

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
                node, item = await asyncio.wait_for(self.inbox.get(), timeout)
            except TimeoutError:
                actions = protocol.on_deadline(_now())
                continue
            if isinstance(item, _Lost):
                actions = protocol.node_lost(node, item.reason, _now())
            else:
                actions = protocol.receive(node, item, _now())

    def _apply(self, actions: list[Any]) -> list[Any]:
        events = []
        for action in actions:
            if isinstance(action, SendTo):
                link = self.links.get(action.node)
                if link is not None and link.alive:
                    link.outbox.put_nowait(action.message)
                    self.observer("send", {"kind": action.message.kind, "node": action.node,
                                           "round": action.message.header.get("round")})
            elif isinstance(action, Disconnect):
                self._disconnect(action.node, action.reason)
            elif isinstance(action, Dropped):
                log.warning("node %s dropped during %s: %s", action.node, action.stage, action.reason)
                self.observer("dropped", {"node": action.node, "stage": action.stage, "reason": action.reason})
            else:
                events.append(action)
        return events

    def _disconnect(self, name: str, reason: str) -> None:
        link = self.links.get(name)
        if link is None or not link.alive:
            return
        link.alive = False
        for task in link.tasks:
            task.cancel()
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
        for link in live:
            for task in link.tasks:
                task.cancel()
        await asyncio.gather(*(link.channel.close("run complete") for link in live), return_exceptions=True)

    async def _abort(self) -> None:
        for link in self.links.values():
            for task in link.tasks:
                task.cancel()
        await asyncio.gather(*(link.channel.abort("the hub stopped") for link in self.links.values()),
                             return_exceptions=True)

    # -- outputs ----------------------------------------------------------------------------

    def _checkpoint(self, run_id: str, number: int, model: torch.nn.Module, server: ServerOptimizer,
                    classes: list[str], channels: int, nodes: dict[str, Any], history: list[dict[str, Any]]) -> None:
        save_checkpoint(
            self.out_dir / CHECKPOINT_NAME,
            {
                "run_id": run_id,
                "config_digest": self.cfg.digest(),
                "round": number,
                "model": model.state_dict(),
                "server_optimizer": server.state(),
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
            "nodes": [{"name": n.name, "address": n.address} for n in fed.nodes],  # never the tokens
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


def _traffic(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, dict[str, int]]:
    """Bytes on the wire to and from each node between two snapshots of the links' counters
    (the dealer's are reported apart, as the round's ``dealer_bytes``)."""
    return {n: {"to_node": after[n][0] - sent, "from_node": after[n][1] - received}
            for n, (sent, received) in before.items() if n != DEALER_LINK}


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
            progress: bool | None = None) -> dict[str, Any]:
    """Run a federation to the end (blocking); returns the report.  See :class:`Hub`."""
    return asyncio.run(Hub(cfg, resume=resume, observer=observer, progress=progress).run())
