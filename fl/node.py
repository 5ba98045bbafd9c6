"""A data owner's node: it dials the hub, proves who it is, and serves its data's training — the asyncio
adapter around :class:`fl.node_protocol.NodeSession`.

``run_node(data_dir, ...)`` (what ``primia node`` calls) checks the data
folder, then connects to the hub (``--hub``) and stays connected: it retries
with exponential backoff (0.5 s doubling to 30 s) while the hub is not up, and
dials again after a network fault or a closed connection, so a node restarted
during a run takes part again from the next round.  Only outbound connections:
no hospital opens a port.  The hub must prove it holds the key the node pinned
(``--hub-key``); the node sends nothing but its hello to any other.

Each connection gets a fresh :class:`~fl.node_protocol.NodeSession` over the
one :class:`~fl.node_protocol.NodeRuntime`.  Slow work runs in worker threads,
so the event loop keeps answering keepalive pings and the next message while
the CPU trains: loading images, training and evaluating in order on one
thread, expanding and applying secure-aggregation masks on another (masks are
expanded while the model trains).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from mpc.errors import FrameError, PeerFailure
from mpc.net.channel import Channel

from .data import scan_folder
from .errors import RunRefused
from .node_protocol import MASK_LANE, TRAIN_LANE, Close, NodeRuntime, NodeSession, Send, Work
from .transport import Backoff, limits_for, recv, send, stay_connected

__all__ = ["default_node_name", "NodeClient", "run_node", "share_the_gil"]

log = logging.getLogger("primia.node")

#: how long a thread may hold the GIL while another waits (Python's default is 5 ms)
GIL_SWITCH_INTERVAL_S = 0.0005


def share_the_gil() -> None:
    """Shorten the interpreter's GIL switch interval, for a node process.

    The event loop (receiving the weights in 1 MiB fragments) and the mask
    thread (hundreds of short AES and numpy calls, each releasing and retaking
    the GIL) hand the GIL back and forth; with the default 5 ms interval each
    hand-over can stall the other thread, and expanding masks while the weights
    arrive measured 2-6x slower than alone.  0.5 ms brought it within 2x.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def default_node_name(data_dir: str | Path) -> str:
    """The data folder's name, reduced to the characters node names may use."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(data_dir).resolve().name)[:64].strip("-")
    return name or "node"


class NodeClient:
    """Connects to the hub and serves one node's data, reconnecting until the run ends (or forever).

    Args:
        runtime: the node's data, identity and trainer.
        identity: the node's :class:`mpc.net.auth.Identity` (its key, and the pinned hub key).
        hub: the hub's address (``wss://HOST:PORT``, or ``ws://`` on loopback).
        tls: the TLS context for ``wss://`` (None for ``ws://``).
        once: exit when a run ends (the hub says goodbye, or reports that the run failed) instead of
            dialing again for the next run.
    """

    def __init__(self, runtime: NodeRuntime, *, identity: Any, hub: str, tls: ssl.SSLContext | None = None,
                 max_message_mib: int = 1024, once: bool = False, reconnect_max_s: float = 30.0):
        self.runtime = runtime
        self.identity = identity
        self.hub = hub
        self.tls = tls
        self.limits = limits_for(max_message_mib)
        self.once = once
        # one thread per lane: work on a lane runs in order, the lanes side by side
        self.executors = {
            lane: concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"primia-{lane}")
            for lane in (TRAIN_LANE, MASK_LANE)
        }
        self.backoff = Backoff(cap=reconnect_max_s)

    async def run(self) -> str:
        """Serve until a run ends (with ``once``) or forever; returns why it stopped.

        Raises:
            AuthenticationError: the hub is not the one pinned, or it refused this node (a configuration to fix,
                not a fault to wait out).
        """
        log.info("node %s: %s; connecting to the hub at %s", self.runtime.name, self._describe(), self.hub)
        try:
            return await stay_connected(self.hub, self.identity, self._serve, tls=self.tls, limits=self.limits,
                                        backoff=self.backoff, once=self.once)
        finally:
            for executor in self.executors.values():
                executor.shutdown(wait=False, cancel_futures=True)

    def _describe(self) -> str:
        scan = self.runtime.scan
        counts = [f"{c}: {n}" for c, n in scan.class_counts().items()]
        shown = ", ".join(counts[:12]) + (f", ... {len(counts) - 12} more classes" if len(counts) > 12 else "")
        return f"{len(scan.files)} images ({shown}) from {scan.root}"

    async def _serve(self, channel: Channel) -> str | None:
        """One hub connection; returns why the run ended (goodbye or the hub's error), or None if the
        connection was lost."""
        session = NodeSession(self.runtime, peer=channel.peer_label, run_token=channel.context or None)
        events: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                while True:
                    msg, _ = await recv(channel)
                    await events.put(("message", msg, None))
            except (PeerFailure, FrameError) as exc:
                await events.put(("lost", getattr(exc, "reason", str(exc)), None))
            except Exception as exc:  # noqa: BLE001 - never a dead reader and a node that hangs
                log.exception("reading from the hub failed")
                await events.put(("lost", f"receiving failed: {type(exc).__name__}: {exc}", None))

        def run_work(work: Work) -> None:
            started = time.perf_counter()
            future = loop.run_in_executor(self.executors[work.lane], work.call)

            def done(f: asyncio.Future) -> None:
                if f.cancelled():
                    return
                log.debug("work %d took %.3f s", work.ticket, time.perf_counter() - started)
                exc = f.exception()
                events.put_nowait(("failed", work.ticket, exc) if exc else ("done", work.ticket, f.result()))

            future.add_done_callback(done)

        reader = asyncio.create_task(read())
        try:
            while True:
                what, first, second = await events.get()
                if what == "lost":
                    log.warning("the hub connection ended: %s", first)
                    return None
                if what == "message":
                    actions = session.receive(first)
                elif what == "done":
                    actions = session.work_done(first, second)
                else:
                    actions = session.work_failed(first, second)
                for action in actions:
                    if isinstance(action, Send):
                        started = time.perf_counter()
                        try:
                            size = await send(channel, action.message)
                        except PeerFailure as exc:
                            log.warning("the hub connection ended: %s", exc.reason)
                            return None
                        log.debug("sent %s (%d bytes) in %.3f s", action.message.kind, size,
                                  time.perf_counter() - started)
                    elif isinstance(action, Work):
                        run_work(action)
                    elif isinstance(action, Close):
                        log.info("closing the hub connection: %s", action.reason)
                        await channel.close(action.reason[:100])
                        if action.final:
                            raise RunRefused(action.reason)
                        return action.reason if _ends_run(action.reason) else None
        finally:
            reader.cancel()


def _ends_run(reason: str) -> bool:
    """Whether a close means the run is over (the hub said goodbye, or failed it), not a fault to dial back from."""
    return reason.startswith("the hub ended the run") or reason.startswith("the hub reported an error")


def run_node(
    data_dir: str | Path,
    *,
    hub: str,
    identity: Any,
    directory: Any = None,
    dealer_key: Any = None,
    name: str | None = None,
    tls: ssl.SSLContext | None = None,
    device: str = "cpu",
    strict: bool = False,
    max_message_mib: int = 1024,
    once: bool = False,
    reconnect_max_s: float = 30.0,
    allow_plain: bool = False,
    min_nodes: int = 2,
) -> str:
    """Check ``data_dir`` and serve it to the hub until stopped, or until the run ends with ``once`` (blocking).

    Raises:
        DataFolderError: the folder has errors (each one named).
        AuthenticationError: the hub is not the pinned one, or refused this node.
        RunRefused: the hub asked for a run this node's policy refuses (updates in the clear).
    """
    name = name or default_node_name(data_dir)
    share_the_gil()
    scan = scan_folder(data_dir, strict=strict)
    for problem in scan.warnings:
        log.warning("%s", problem)
    from .identity import sign_statement

    key = identity.private_key
    runtime = NodeRuntime(scan, name=name, device=device, sign=lambda *fields: sign_statement(key, *fields),
                          directory=directory, dealer_key=dealer_key, allow_plain=allow_plain, min_nodes=min_nodes)
    client = NodeClient(runtime, identity=identity, hub=hub, tls=tls, max_message_mib=max_message_mib, once=once,
                        reconnect_max_s=reconnect_max_s)
    return asyncio.run(client.run())
