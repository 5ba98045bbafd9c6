"""A data owner's node server: the asyncio adapter around :class:`fl.node_protocol.NodeSession`.

``run_node(data_dir, ...)`` (what ``primia node`` calls) checks the data
folder, listens on ``host:port`` and waits for the hub.  The hub dials in and
both sides prove they hold the node's secret (:mod:`fl.transport`).  Each
connection gets a fresh :class:`~fl.node_protocol.NodeSession` over the one
:class:`~fl.node_protocol.NodeRuntime`; a new hub connection replaces an old
one (a restarted hub resuming its run).

Slow work runs in worker threads, so the event loop keeps answering keepalive
pings and the next message while the CPU trains: loading images, training and
evaluating in order on one thread, expanding and applying secure-aggregation
masks on another (masks are expanded while the model trains).
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
from typing import Any, Callable

from mpc.errors import FrameError, PeerFailure
from mpc.net.channel import Channel
from mpc.net.tls import server_context

from .data import scan_folder
from .node_protocol import MASK_LANE, TRAIN_LANE, Close, NodeRuntime, NodeSession, Send, Work
from .transport import limits_for, listen_for_hub, membership, port_file_writer, recv, send

__all__ = ["default_node_name", "NodeServer", "run_node", "share_the_gil"]

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


class NodeServer:
    """Serves one node's data to whichever authenticated hub connects.

    Args:
        runtime: the node's data and trainer.
        name: the node's identity in the handshake (must match the hub's federation.nodes[].name).
        token: the shared secret.
        once: stop serving when the first hub connection ends (goodbye, error or lost connection).
    """

    def __init__(self, runtime: NodeRuntime, *, name: str, token: str, max_message_mib: int = 1024,
                 once: bool = False, tls: ssl.SSLContext | None = None):
        self.runtime = runtime
        self.name = name
        self.membership = membership(name, token, what="node token")
        self.limits = limits_for(max_message_mib)
        self.once = once
        self.tls = tls
        # one thread per lane: work on a lane runs in order, the lanes side by side
        self.executors = {
            lane: concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"primia-{lane}")
            for lane in (TRAIN_LANE, MASK_LANE)
        }
        self.stopped = asyncio.Event()
        self._current: Channel | None = None

    async def serve(self, host: str, port: int, on_ready: Callable[[int], None] = lambda port: None) -> None:
        server, bound = await listen_for_hub(self._handle, host, port, who=f"node {self.name}",
                                             membership=self.membership, limits=self.limits, tls=self.tls)
        log.info("node %s: %s on %s://%s:%d", self.name, self._describe(), "wss" if self.tls else "ws", host, bound)
        on_ready(bound)
        try:
            await self.stopped.wait()
        finally:
            server.close()
            await server.wait_closed()
            for executor in self.executors.values():
                executor.shutdown(wait=False, cancel_futures=True)

    def _describe(self) -> str:
        scan = self.runtime.scan
        counts = [f"{c}: {n}" for c, n in scan.class_counts().items()]
        shown = ", ".join(counts[:12]) + (f", ... {len(counts) - 12} more classes" if len(counts) > 12 else "")
        return f"{len(scan.files)} images ({shown}) from {scan.root}"

    async def _handle(self, channel: Channel) -> None:
        previous, self._current = self._current, channel
        if previous is not None:
            log.info("a new hub connection replaces the previous one")
            await previous.abort("replaced by a new hub connection")
        session = NodeSession(self.runtime, peer=channel.peer_label)
        events: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                while True:
                    msg, _ = await recv(channel)
                    await events.put(("message", msg, None))
            except (PeerFailure, FrameError) as exc:
                await events.put(("lost", getattr(exc, "reason", str(exc)), None))

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
                    log.info("hub connection ended: %s", first)
                    if self.once and self._current is channel:
                        self.stopped.set()
                    return
                if what == "message":
                    actions = session.receive(first)
                elif what == "done":
                    actions = session.work_done(first, second)
                else:
                    actions = session.work_failed(first, second)
                for action in actions:
                    if isinstance(action, Send):
                        started = time.perf_counter()
                        size = await send(channel, action.message)
                        log.debug("sent %s (%d bytes) in %.3f s", action.message.kind, size, time.perf_counter() - started)
                    elif isinstance(action, Work):
                        run_work(action)
                    elif isinstance(action, Close):
                        log.info("closing the hub connection: %s", action.reason)
                        if self.once:
                            self.stopped.set()
                        return
        finally:
            reader.cancel()
            if self._current is channel:
                self._current = None


def run_node(
    data_dir: str | Path,
    *,
    token: str,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8781,
    port_file: str | Path | None = None,
    device: str = "cpu",
    strict: bool = False,
    max_message_mib: int = 1024,
    once: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> None:
    """Check ``data_dir`` and serve it until stopped (blocking).

    Raises:
        DataFolderError: the folder has errors (each one named).
        ConfigError: the token is too short, the TLS files cannot be loaded, or the port cannot be used.
    """
    name = name or default_node_name(data_dir)
    share_the_gil()
    scan = scan_folder(data_dir, strict=strict)
    for problem in scan.warnings:
        log.warning("%s", problem)
    runtime = NodeRuntime(scan, name=name, device=device)
    tls = server_context(tls_cert, tls_key) if tls_cert or tls_key else None
    server = NodeServer(runtime, name=name, token=token, max_message_mib=max_message_mib, once=once, tls=tls)
    asyncio.run(server.serve(host, port, port_file_writer(port_file)))
