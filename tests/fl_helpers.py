"""Shared helpers for the federated-learning tests: configs, data folders, an in-memory federation, node processes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from fl.config import Config, parse_config
from fl.data import scan_folder
from fl.demo import write_digits
from fl.dealer import Close as DealerClose
from fl.dealer import DealerSession, Reply
from fl.hub_protocol import DEALER_LINK, Disconnect, Dropped, Failed, HubProtocol, SendTo
from fl.messages import Message
from fl.node_protocol import Close, NodeRuntime, NodeSession, Send, Work
from mpc.net.wire import decode_message, encode_message

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "0123456789abcdef-test-token"


def base_config(names: list[str], **sections: dict[str, Any]) -> dict[str, Any]:
    """A small, fast configuration as nested tables; ``sections`` override keys per table."""
    raw: dict[str, Any] = {
        "run": {"name": "test", "rounds": 2, "seed": 3},
        "federation": {
            "nodes": [{"name": n, "address": f"ws://127.0.0.1:{9000 + i}", "token": TOKEN} for i, n in enumerate(names)],
            "reply_timeout_s": 60.0,
            "train_timeout_s": 120.0,
        },
        "model": {"name": "simple_cnn", "width": 4},
        "data": {"input_size": 8, "val_fraction": 0.25, "mean": 0.3, "std": 0.4},
        "training": {"local_steps": 3, "batch_size": 16, "lr": 0.05},
        "aggregation": {"secure": True},
    }
    for section, values in sections.items():
        if section == "nodes":
            continue
        raw.setdefault(section, {}).update(values)
    return raw


def make_config(names: list[str], **sections: dict[str, Any]) -> Config:
    return parse_config(base_config(names, **sections))


def digits_folders(root: Path, names: tuple[str, ...], *, limit: int = 240) -> Path:
    """Digits PNGs split across ``names`` (plus a holdout folder)."""
    fractions = tuple([1.0 / len(names)] * len(names))
    write_digits(root, names=names, fractions=fractions, limit=limit)
    return root


def wire(message: Message, sender: str) -> Message:
    """Send a message through the real wire format (bytes) and back."""
    chunks = encode_message(message.kind, message.header, message.arrays, sender=sender, session="s")
    data = b"".join(bytes(c) for c in chunks)
    decoded = decode_message(data)
    return Message(decoded.kind, dict(decoded.header), dict(decoded.arrays))


class InMemoryFederation:
    """A hub protocol and node sessions exchanging encoded bytes, with no sockets and no threads.

    ``intercept(node, message)`` may return "drop" (the message vanishes), "lose" (the node's connection
    breaks instead of delivering) or None (deliver).  Work runs synchronously when it is handed out.
    With ``aggregation.masking = 'dealer'`` a :class:`fl.dealer.DealerSession` plays the dealer
    (link :data:`fl.hub_protocol.DEALER_LINK`; ``intercept`` sees its messages too, and
    ``dealer_reply(message)`` may replace or suppress, with None, each dealer reply).
    """

    def __init__(self, cfg: Config, runtimes: dict[str, NodeRuntime], *, run_id: str = "run-test"):
        self.hub = HubProtocol(cfg, run_id)
        self.sessions = {n: NodeSession(rt, peer="hub") for n, rt in runtimes.items()}
        self.dealer = DealerSession() if self.hub.dealer is not None else None
        self.dealer_reply: Callable[[Message], Message | None] = lambda msg: msg
        self.events: list[Any] = []
        self.intercept: Callable[[str, Message], str | None] = lambda node, msg: None
        self.lost: set[str] = set()
        self.now = 0.0

    def pump(self, actions: list[Any]) -> list[Any]:
        """Deliver everything until quiet; returns the hub events (not sends) in order."""
        queue: deque[tuple[str, Any]] = deque(("hub", a) for a in actions)
        events: list[Any] = []
        while queue:
            origin, action = queue.popleft()
            if origin == "hub":
                if isinstance(action, SendTo):
                    if action.node in self.lost:
                        continue
                    verdict = self.intercept(action.node, action.message)
                    if verdict == "drop":
                        continue
                    if verdict == "lose":
                        self.lost.add(action.node)
                        queue.extend(("hub", a) for a in self.hub.node_lost(action.node, "connection reset", self.now))
                        continue
                    if action.node == DEALER_LINK:
                        assert self.dealer is not None
                        queue.extend(("dealer", r) for r in self.dealer.receive(wire(action.message, "hub")))
                        continue
                    replies = self.sessions[action.node].receive(wire(action.message, "hub"))
                    queue.extend((action.node, r) for r in replies)
                elif isinstance(action, Disconnect):
                    self.lost.add(action.node)
                elif isinstance(action, Dropped):
                    events.append(action)
                else:
                    events.append(action)
            elif origin == "dealer":
                if DEALER_LINK in self.lost:
                    continue
                if isinstance(action, DealerClose):
                    continue
                messages = [action.message] if isinstance(action, Reply) else action.then(action.call())
                for message in messages:
                    message = self.dealer_reply(message)
                    if message is not None:
                        queue.extend(("hub", a) for a in self.hub.receive(DEALER_LINK, wire(message, "dealer"),
                                                                          self.now))
            else:
                node = origin
                if node in self.lost:
                    continue
                if isinstance(action, Send):
                    queue.extend(("hub", a) for a in self.hub.receive(node, wire(action.message, node), self.now))
                elif isinstance(action, Work):
                    session = self.sessions[node]
                    try:
                        result = action.call()
                    except Exception as exc:  # the session reports it to the hub
                        replies = session.work_failed(action.ticket, exc)
                    else:
                        replies = session.work_done(action.ticket, result)
                    queue.extend((node, r) for r in replies)
                elif isinstance(action, Close):
                    self.lost.add(node)
                    queue.extend(("hub", a) for a in self.hub.node_lost(node, action.reason, self.now))
        self.events.extend(events)
        return events

    def setup(self, classes: list[str], channels: int, layout: Any) -> list[Any]:
        events = self.pump(self.hub.start(sorted(self.sessions), {}, self.now))
        events += self.pump(self.hub.configure(classes, channels, layout, self.now))
        return events


def node_runtimes(root: Path, names: tuple[str, ...]) -> dict[str, NodeRuntime]:
    return {n: NodeRuntime(scan_folder(root / n), name=n) for n in names}


def failures(events: list[Any]) -> list[Any]:
    return [e.error for e in events if isinstance(e, Failed)]


# -- node processes ------------------------------------------------------------------------------


class NodeProcesses:
    """``primia node`` processes on 127.0.0.1, each on a free port, with restart after a kill."""

    def __init__(self, workdir: Path, data: Path, names: tuple[str, ...]):
        self.workdir, self.data, self.names = workdir, data, names
        self.token = secrets.token_hex(24)
        self.token_file = workdir / "node.key"
        self.token_file.write_text(self.token + "\n")
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def start(self, names: tuple[str, ...] | None = None) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
        todo = names or self.names
        for name in todo:
            port_file = self.workdir / f"{name}.port"
            port_file.unlink(missing_ok=True)
            log = (self.workdir / f"{name}.log").open("a")
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "node", "--data", str(self.data / name), "--name", name,
                 "--port", "0", "--port-file", str(port_file), "--token-file", str(self.token_file), "--threads", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )
        deadline = time.monotonic() + 240
        for name in todo:
            port_file = self.workdir / f"{name}.port"
            while not port_file.exists():
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"node {name} exited: {(self.workdir / f'{name}.log').read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {name} did not start")
                time.sleep(0.05)
            self.ports[name] = json.loads(port_file.read_text())["port"]

    def ensure_running(self) -> None:
        dead = tuple(n for n, p in self.procs.items() if p.poll() is not None)
        if dead:
            self.start(dead)

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)

    def config(self, names: list[str], output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
        raw = base_config(names, **sections)
        raw["run"]["output_dir"] = str(output_dir)
        raw["federation"]["nodes"] = [
            {"name": n, "address": f"ws://127.0.0.1:{self.ports[n]}", "token": self.token} for n in names
        ]
        return raw

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class DealerProcess:
    """A ``primia dealer`` process on 127.0.0.1 (a free port), for ``aggregation.masking = 'dealer'``."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.token = secrets.token_hex(24)
        key = workdir / "dealer.key"
        key.write_text(self.token + "\n")
        port_file = workdir / "dealer.port"
        port_file.unlink(missing_ok=True)
        self.log = workdir / "dealer.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "dealer", "--port", "0", "--port-file", str(port_file),
             "--token-file", str(key)],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, cwd=ROOT,
        )
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the dealer did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.port = json.loads(port_file.read_text())["port"]

    def federation(self) -> dict[str, Any]:
        """The ``[federation]`` keys that point a hub at this dealer."""
        return {"dealer_address": f"ws://127.0.0.1:{self.port}", "dealer_token": self.token}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def to_toml(raw: dict[str, Any]) -> str:
    """Just enough TOML writing for test configs (tables, arrays of tables, scalars, lists)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for section, table in raw.items():
        scalars = {k: v for k, v in table.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))}
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in scalars.items()]
        for k, v in table.items():
            if k not in scalars:
                for item in v:
                    lines.append(f"[[{section}.{k}]]")
                    lines += [f"{ik} = {value(iv)}" for ik, iv in item.items()]
        lines.append("")
    return "\n".join(lines)


def assert_close_models(a: dict[str, Any], b: dict[str, Any], atol: float) -> float:
    worst = 0.0
    for key, ta in a.items():
        if ta.is_floating_point():
            worst = max(worst, float((ta - b[key]).abs().max()))
    assert worst <= atol, f"models differ by {worst} > {atol}"
    return worst

