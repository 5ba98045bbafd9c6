"""Shared helpers for the federated-learning tests: keys, configs, data folders, an in-memory federation, and\nhub, node and dealer processes."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from fl.transport import run_token
from fl.aggregation import ServerOptimizer
from fl.config import Config, parse_config
from fl.data import scan_folder
from fl.dealer import Close as DealerClose
from fl.dealer import DealerSession, Reply
from fl.demo import write_digits
from fl.hub_protocol import DEALER_LINK, Disconnect, Failed, HubProtocol, SendTo
from fl.identity import NAME_CHARS, Directory, generate_keys, load_private_key, load_public_key, sign_statement
from fl.messages import Kind, Message
from fl.models import Layout
from fl.node_protocol import Close, NodeRuntime, NodeSession, Send, Work
from fl.strategy import build_aggregator
from mpc.errors import PrimiaError
from mpc.net.wire import decode_message, encode_message

ROOT = Path(__file__).resolve().parent.parent
#: every name the tests use: key pairs made once per test session (see keys_dir)
KEY_NAMES = ("hub", "dealer", "a", "b", "c", "d", "e", "f", "alpha", "beta", "gamma", "node-x", "mallory")
_KEYS: dict[str, Path] = {}


def keys_dir() -> Path:
    """A folder of key pairs (NAME.key, NAME.pub) for :data:`KEY_NAMES`, made once per test session."""
    if "dir" not in _KEYS:
        folder = Path(tempfile.mkdtemp(prefix="primia-test-keys-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        for name in KEY_NAMES:
            generate_keys(name, folder)
        _KEYS["dir"] = folder
    return _KEYS["dir"]


def _ensure(name: str) -> Path:
    folder = keys_dir()
    if not (folder / f"{name}.key").exists():
        generate_keys(name, folder)
    return folder


def private_key(name: str) -> Any:
    return load_private_key(_ensure(name) / f"{name}.key", what=name)


def public_key(name: str) -> Any:
    return load_public_key(_ensure(name) / f"{name}.pub", what=name)


def members_folder(names: tuple[str, ...] | list[str]) -> Path:
    """A folder holding only the federation's public keys: ``names`` and the hub's and the dealer's (what a node's
    --peer-keys and a dealer's --node-keys point at)."""
    folder = keys_dir() / ("members-" + "-".join(sorted(names)))
    if not folder.is_dir():
        folder.mkdir()
        for name in (*names, "hub", "dealer"):
            shutil.copy(_ensure(name) / f"{name}.pub", folder / f"{name}.pub")
    return folder


def directory(names: tuple[str, ...] | list[str]) -> Directory:
    return Directory({n: public_key(n) for n in names})


def signer(name: str) -> Callable[..., bytes]:
    key = private_key(name)
    return lambda *fields: sign_statement(key, *fields)


def base_config(names: list[str], **sections: dict[str, Any]) -> dict[str, Any]:
    """A small, fast configuration as nested tables; ``sections`` override keys per table."""
    keys = keys_dir()
    for name in names:
        if set(name) <= NAME_CHARS and name not in ("hub", "dealer"):
            _ensure(name)
    raw: dict[str, Any] = {
        "run": {"name": "test", "rounds": 2, "seed": 3},
        "federation": {
            "listen": "127.0.0.1:0",
            "key_file": str(keys / "hub.key"),
            "nodes": [{"name": n, "public_key_file": str(keys / f"{n}.pub")} for n in names],
            "reply_timeout_s": 60.0,
            "train_timeout_s": 120.0,
            "start_grace_s": 20.0,
            "connect_timeout_s": 120.0,
        },
        "model": {"name": "simple_cnn", "width": 4},
        "data": {"input_size": 8, "val_fraction": 0.25, "mean": 0.3, "std": 0.4},
        "training": {"local_steps": 3, "batch_size": 16, "lr": 0.05},
        "aggregation": {"secure": True},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    agg = raw["aggregation"]
    if agg.get("secure", True) and agg.get("masking") == "dealer":
        raw["federation"].setdefault("dealer_public_key_file", str(keys / "dealer.pub"))
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


def hub_aggregator(cfg: Config, layout: Layout) -> Any:
    """The aggregator a hub builds for ``cfg`` (nodes' and dealer's keys from :func:`keys_dir`)."""
    names = [n.name for n in cfg.federation.nodes]
    optimizer = ServerOptimizer(lr=cfg.aggregation.server_lr, momentum=cfg.aggregation.server_momentum,
                                param_mask=layout.param_mask())
    return build_aggregator(cfg.aggregation, directory=directory(names), dealer_key=public_key("dealer"),
                            optimizer=optimizer)


class InMemoryFederation:
    """A hub protocol and node sessions exchanging encoded bytes, with no sockets and no threads.

    ``intercept(peer, message)`` sees every message the hub sends and may return "drop" (it vanishes), "lose"
    (the peer's connection breaks instead of delivering) or None (deliver); ``tamper(peer, message)`` may
    replace it.  Work runs synchronously when it is handed out.  With ``aggregation.masking = 'dealer'`` a
    :class:`fl.dealer.DealerSession` plays the dealer (link :data:`fl.strategy.DEALER_LINK`), and
    ``dealer_reply(message)`` may replace or suppress (None) each dealer reply.  ``node_sent(peer, message)``
    sees (and may replace, or suppress with None) what each node sends.
    """

    def __init__(self, cfg: Config, runtimes: dict[str, NodeRuntime], *, run_id: str = "run-test"):
        self.cfg = cfg
        self.run_id = run_id
        self.hub = HubProtocol(cfg, run_id, session=b"s" * 16)
        self.runtimes = runtimes
        self.sessions = {n: NodeSession(rt, peer="hub", run_token=run_token(run_id)) for n, rt in runtimes.items()}
        dealer = cfg.aggregation.secure and cfg.aggregation.masking == "dealer"
        self.dealer = DealerSession(run_token=run_token(run_id), key=private_key("dealer"), directory=directory(list(runtimes)),
                                    ) if dealer else None
        self.dealer_reply: Callable[[Message], Message | None] = lambda msg: msg
        self.node_sent: Callable[[str, Message], Message | None] = lambda node, msg: msg
        self.events: list[Any] = []
        self.intercept: Callable[[str, Message], str | None] = lambda node, msg: None
        self.tamper: Callable[[str, Message], Message] = lambda node, msg: msg
        self.lost: set[str] = set()
        self.log: list[tuple[str, str, Message]] = []  # (sender, receiver, message)
        self.now = 0.0

    def connect(self, name: str) -> list[Any]:
        """``name`` (a node, or DEALER_LINK) connects to the hub (again, after a restart: a fresh session)."""
        self.lost.discard(name)
        if name != DEALER_LINK:
            self.sessions[name] = NodeSession(self.runtimes[name], peer="hub", run_token=run_token(self.run_id))
        return self.pump(self.hub.connected(name, self.now))

    def pump(self, actions: list[Any]) -> list[Any]:
        """Deliver everything until quiet; returns the hub events (not sends) in order."""
        queue: deque[tuple[str, Any]] = deque(("hub", a) for a in actions)
        events: list[Any] = []
        while queue:
            origin, action = queue.popleft()
            if origin == "hub":
                if isinstance(action, SendTo):
                    if action.peer in self.lost:
                        continue
                    verdict = self.intercept(action.peer, action.message)
                    if verdict == "drop":
                        continue
                    if verdict == "lose":
                        self.lost.add(action.peer)
                        queue.extend(("hub", a) for a in self.hub.lost(action.peer, "connection reset", self.now))
                        continue
                    message = wire(self.tamper(action.peer, action.message), "hub")
                    self.log.append(("hub", action.peer, message))
                    if action.peer == DEALER_LINK:
                        assert self.dealer is not None
                        try:
                            replies = self.dealer.receive(message)
                        except PrimiaError as exc:
                            replies = [Reply(Message(Kind.ERROR, {"reason": str(exc)}))]
                        queue.extend(("dealer", r) for r in replies)
                        continue
                    replies = self.sessions[action.peer].receive(message)
                    queue.extend((action.peer, r) for r in replies)
                elif isinstance(action, Disconnect):
                    self.lost.add(action.peer)
                else:
                    events.append(action)
            elif origin == "dealer":
                if DEALER_LINK in self.lost or isinstance(action, DealerClose):
                    continue
                try:
                    messages = [action.message] if isinstance(action, Reply) else action.then(action.call())
                except PrimiaError as exc:
                    messages = [Message(Kind.ERROR, {"reason": str(exc)})]
                for message in messages:
                    message = self.dealer_reply(message)
                    if message is not None:
                        message = wire(message, "dealer")
                        self.log.append((DEALER_LINK, "hub", message))
                        queue.extend(("hub", a) for a in self.hub.receive(DEALER_LINK, message, self.now))
            else:
                node = origin
                if node in self.lost:
                    continue
                if isinstance(action, Send):
                    message = self.node_sent(node, action.message)
                    if message is None:
                        continue
                    message = wire(message, node)
                    self.log.append((node, "hub", message))
                    queue.extend(("hub", a) for a in self.hub.receive(node, message, self.now))
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
                    queue.extend(("hub", a) for a in self.hub.lost(node, action.reason, self.now))
        self.events.extend(events)
        return events

    def setup(self, classes: list[str], channels: int, layout: Layout) -> list[Any]:
        """Every node (and the dealer) connects and says hello; the run is configured."""
        events = []
        if self.dealer is not None:
            events += self.connect(DEALER_LINK)
        for name in sorted(self.sessions):
            events += self.connect(name)
        events += self.pump(self.hub.configure(classes, channels, layout, hub_aggregator(self.cfg, layout), self.now))
        return events

    def sent(self, kind: str) -> list[tuple[str, str, Message]]:
        return [entry for entry in self.log if entry[2].kind == kind]


def node_runtimes(root: Path, names: tuple[str, ...], *, allow_plain: bool = False,
                  members: tuple[str, ...] | None = None) -> dict[str, NodeRuntime]:
    """Node runtimes on ``root/<name>``, each trusting the federation ``members`` (default: ``names``)."""
    federation = directory(members or names)
    return {n: NodeRuntime(scan_folder(root / n), name=n, sign=signer(n), directory=federation,
                           dealer_key=public_key("dealer"), allow_plain=allow_plain)
            for n in names}


def failures(events: list[Any]) -> list[Any]:
    return [e.error for e in events if isinstance(e, Failed)]


# -- real processes ------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}


class HubProcess:
    """``primia train`` in its own process, on a free port of 127.0.0.1 (read from its port file)."""

    def __init__(self, workdir: Path, raw: dict[str, Any], *, resume: bool = False, name: str = "hub"):
        self.workdir = workdir
        self.config = workdir / f"{name}.toml"
        self.config.write_text(to_toml(raw))
        port_file = workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.log = workdir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "train", "--config", str(self.config), "--port-file", str(port_file),
             "--no-progress", *(["--resume"] if resume else [])],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
        )
        deadline = time.monotonic() + 180
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the hub did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())  # the number alone (the API contract)

    @property
    def uri(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class NodeProcesses:
    """``primia node`` processes that dial a hub, each restartable after a kill.

    Every instance is listed in ``NodeProcesses.started`` so that a fixture can stop what a failed test left.
    """

    started: list["NodeProcesses"] = []

    def __init__(self, workdir: Path, data: Path, names: tuple[str, ...], *, members: tuple[str, ...] | None = None):
        self.workdir, self.data, self.names = workdir, data, names
        self.members = members or names  # the federation the nodes know (their --peer-keys)
        self.procs: dict[str, subprocess.Popen] = {}
        self.hub_uri = ""
        NodeProcesses.started.append(self)

    def start(self, hub_uri: str, names: tuple[str, ...] | None = None, *, extra: list[str] | None = None,
              key: str | None = None, hub_key: Path | None = None, once: bool = True) -> None:
        self.hub_uri = hub_uri
        keys = keys_dir()
        for name in names or self.names:
            log = (self.workdir / f"{name}.log").open("a")
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "node", "--data", str(self.data / name), "--name", name,
                 "--key", str(keys / f"{key or name}.key"), "--hub", hub_uri,
                 "--hub-key", str(hub_key or keys / "hub.pub"), "--peer-keys", str(members_folder(self.members)),
                 "--threads", "1", *(["--once"] if once else []), *(extra or [])],
                stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
            )

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def output(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text()

    def wait_for_output(self, name: str, text: str, timeout: float = 120) -> None:
        """Until ``text`` appears in ``name``'s log (e.g. it has started dialing)."""
        deadline = time.monotonic() + timeout
        while text not in self.output(name):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} never said {text!r}: {self.output(name)[-2000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float = 60) -> dict[str, int]:
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                codes[name] = -999
        return codes

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
    """A ``primia dealer`` process dialing a hub, for ``aggregation.masking = 'dealer'``."""

    def __init__(self, workdir: Path, hub_uri: str, *, key: str = "dealer", once: bool = True,
                 members: tuple[str, ...] = ("alpha", "beta", "gamma")):
        keys = keys_dir()
        self.log = workdir / "dealer.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "dealer", "--key", str(keys / f"{key}.key"), "--hub", hub_uri,
             "--hub-key", str(keys / "hub.pub"), "--node-keys", str(members_folder(members)),
             *(["--once"] if once else [])],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, cwd=ROOT,
        )

    def output(self) -> str:
        return self.log.read_text()

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

