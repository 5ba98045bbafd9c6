"""Running a party program with every party and the dealer in its own OS process.

:func:`run_processes` is :func:`mpc.run_local` over real websockets: it starts
``parties + 1`` fresh Python processes, each of which listens on a free port on
127.0.0.1 and reports it, learns the others' ports, joins the authenticated
mesh (a fresh random secret and session per run) and runs the same
:func:`run_endpoint` code that ``primia party`` runs from a config.

Each process is a new interpreter running ``python -m mpc.net.spawned``, not a
multiprocessing ``spawn`` child, which would import the caller's main script
again in every process: a script without an ``if __name__ == "__main__":``
guard would then run itself once per party.  Here a process imports only the
program's own module (for :func:`bridge.infer_local`, a library module).  Only
a program defined in the main script itself makes the processes import that
script (as ``__mp_main__``, as multiprocessing does); a script that then calls
:func:`run_processes` again while being imported is refused with the fix.

The parent sends each process its start-up arguments over a private pipe
(pickled, as multiprocessing does: they come from the caller).  Results come
back over the same pipe pair, encoded with msgpack (numpy arrays, numpy scalars and tuples as extension
types) -- not pickled.  A party that fails reports its error; the parent
re-raises it (same type where the type is importable, the party named and its
traceback attached), preferring a root cause over the peers' resulting
:class:`~mpc.errors.PeerFailure` s.  Whatever happens, no child outlives the
call: survivors are terminated, then killed.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing.connection
import os
import pickle
import runpy
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
from typing import Any, Callable

import msgpack
import numpy as np

from ..comm import DEFAULT_TIMEOUT_S, Communicator
from ..context import setup_dealer, setup_party
from ..dealer import serve_dealer
from ..protocols.compare import check_comparison_options, check_comparison_slack
from ..errors import ConfigError, PeerFailure, PrimiaError
from .channel import ChannelOptions, Membership
from .connection import NetworkTransport, endpoint_name
from .wire import Limits

__all__ = ["run_processes", "run_endpoint", "RemoteError", "pack_value", "unpack_value", "child_entry"]

log = logging.getLogger("primia.net")

_EXT_NDARRAY, _EXT_TUPLE, _EXT_SCALAR = 1, 2, 3
_RESULT_KINDS = "biufc"  # bool, signed, unsigned, float, complex: plain numbers only
_GRACE_S = 10.0  # after a failure, how long the others get to report theirs before they are stopped
_START_GRACE_S = 2.0  # the same for a failure during start-up, when no computation is under way


class RemoteError(PrimiaError):
    """A party failed with an exception whose type does not exist in this process."""

    def __init__(self, where: str, type_name: str, message: str):
        self.where = where
        self.type_name = type_name
        super().__init__(f"{where} failed with {type_name}: {message}")


# -- running one endpoint --------------------------------------------------------------
def run_endpoint(
    transport: Any,
    rank: int,
    parties: int,
    program: Callable[..., Any] | None,
    args: tuple = (),
    *,
    frac_bits: int = 16,
    truncation: str = "exact",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **context_options: Any,
) -> Any:
    """Run party ``rank`` (``program(ctx, *args)``) or, for ``rank == parties``, the dealer, over ``transport``.

    The very code :func:`mpc.run_local` runs per thread, so results and
    accounting are identical across transports.
    """
    comm = Communicator(rank, parties, transport, timeout_s=timeout_s)
    if rank == parties:
        serve_dealer(comm, setup_dealer(comm))
        return None
    if program is None:
        raise ValueError(f"party {rank} needs a program to run")
    ctx = setup_party(comm, frac_bits=frac_bits, truncation=truncation, **context_options)
    result = program(ctx, *args)
    ctx.close()
    return result


# -- result encoding (msgpack, never pickle) ---------------------------------------------
def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _RESULT_KINDS:
            raise TypeError(f"arrays of dtype {obj.dtype} cannot be returned; use a numeric dtype")
        arr = np.ascontiguousarray(obj)
        return msgpack.ExtType(_EXT_NDARRAY, msgpack.packb([arr.dtype.str, list(arr.shape), arr.tobytes()]))
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in _RESULT_KINDS:
            raise TypeError(f"numpy scalars of dtype {obj.dtype} cannot be returned")
        return msgpack.ExtType(_EXT_SCALAR, msgpack.packb([obj.dtype.str, obj.tobytes()]))
    if isinstance(obj, tuple):
        return msgpack.ExtType(_EXT_TUPLE, pack_value(list(obj)))
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, list):
        return list(obj)
    for base in (bool, int, float, str, bytes):  # subclasses, e.g. an IntEnum, as their builtin base
        if isinstance(obj, base):
            return base(obj)
    hint = "; call .reveal() first" if type(obj).__name__ == "SharedTensor" else ""
    raise TypeError(
        f"a {type(obj).__name__} cannot be returned from a party process{hint}; "
        "return numpy arrays, numbers, strings, bytes, lists, tuples, dicts or None"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        dtype, shape, raw = msgpack.unpackb(data)
        dt = np.dtype(dtype)
        if dt.kind not in _RESULT_KINDS:
            raise ValueError(f"unexpected dtype {dt}")
        return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
    if code == _EXT_SCALAR:
        dtype, raw = msgpack.unpackb(data)
        dt = np.dtype(dtype)
        if dt.kind not in _RESULT_KINDS:
            raise ValueError(f"unexpected dtype {dt}")
        return np.frombuffer(raw, dtype=dt)[0]
    if code == _EXT_TUPLE:
        return tuple(unpack_value(data))
    raise ValueError(f"unknown extension type {code}")


def pack_value(value: Any) -> bytes:
    """msgpack of a return value: numpy arrays/scalars and tuples survive the trip."""
    return msgpack.packb(value, default=_default, strict_types=True, use_bin_type=True)


def unpack_value(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def _describe_error(exc: BaseException) -> dict[str, Any]:
    attrs = {}
    for key in ("peer", "reason", "timeout_s", "clean", "value", "limit", "frac_bits"):
        value = getattr(exc, key, None)
        if isinstance(value, (int, float, str, bool)):
            attrs[key] = value
    return {
        "t": "error",
        "module": type(exc).__module__,
        "type": type(exc).__qualname__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "attrs": attrs,
    }


def _rebuild_error(info: dict[str, Any], where: str) -> BaseException:
    cls: Any = sys.modules.get(str(info.get("module")))
    for part in str(info.get("type")).split("."):
        cls = getattr(cls, part, None)
    exc: BaseException | None = None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            exc = cls.__new__(cls)
            Exception.__init__(exc, info.get("message", ""))
            for key, value in info.get("attrs", {}).items():
                setattr(exc, key, value)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(where, f"{info.get('module')}.{info.get('type')}", str(info.get("message")))
    exc.add_note(f"raised in {where}; its traceback:\n{info.get('traceback', '')}")
    return exc


# -- the child process --------------------------------------------------------------------
class _Pipe:
    """A child's two pipe ends as one duplex connection (length-prefixed messages)."""

    def __init__(self, read_fd: int, write_fd: int):
        self._reader = multiprocessing.connection.Connection(read_fd, writable=False)
        self._writer = multiprocessing.connection.Connection(write_fd, readable=False)

    def send_bytes(self, data: bytes) -> None:
        self._writer.send_bytes(data)

    def recv_bytes(self) -> bytes:
        return self._reader.recv_bytes()

    def poll(self, timeout_s: float = 0.0) -> bool:
        return self._reader.poll(timeout_s)

    def fileno(self) -> int:  # for multiprocessing.connection.wait: readable when a message (or EOF) is there
        return self._reader.fileno()

    def close(self) -> None:
        for end in (self._reader, self._writer):
            if not end.closed:
                end.close()


def _send(conn: _Pipe, message: dict[str, Any]) -> None:
    conn.send_bytes(msgpack.packb(message, use_bin_type=True))


def _recv(conn: _Pipe, timeout_s: float) -> dict[str, Any]:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"the parent process sent nothing within {timeout_s:g} s")
    return msgpack.unpackb(conn.recv_bytes(), raw=False, strict_map_key=False)


def _watch_parent(parent_pid: int) -> None:
    """Exit if the parent dies, so that no party outlives an interrupted run."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="primia-parent-watch", daemon=True).start()


def _child_main(
    rank: int,
    parties: int,
    program: Callable[..., Any] | None,
    args: tuple,
    settings: dict[str, Any],
    secret: bytes,
    session: str,
    conn: _Pipe,
) -> None:
    name = endpoint_name(rank, parties + 1)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [{name}] %(name)s %(levelname)s: %(message)s")
    transport = None
    try:
        transport = NetworkTransport(
            rank,
            parties + 1,
            membership=Membership(rank, secret, session),
            limits=settings["limits"],
            options=settings["options"],
            flush_timeout_s=settings["timeout_s"],
        )
        port = transport.listen("127.0.0.1", 0) if rank < parties else 0
        _send(conn, {"t": "listening", "port": port})
        ports = _recv(conn, settings["start_timeout_s"])["ports"]
        transport.connect({p: ("127.0.0.1", ports[p]) for p in range(rank)})
        value = run_endpoint(
            transport,
            rank,
            parties,
            program,
            args,
            frac_bits=settings["frac_bits"],
            truncation=settings["truncation"],
            timeout_s=settings["timeout_s"],
            **settings["context"],
        )
        transport.close()
        try:
            packed = pack_value(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"{name} returned a value that cannot be sent back: {exc}") from None
        conn.send_bytes(msgpack.packb({"t": "result"}, use_bin_type=True) + packed)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        if transport is not None:
            transport.abort(f"{name} failed: {type(exc).__name__}: {exc}")
        try:
            _send(conn, _describe_error(exc))
        except Exception:
            pass
        conn.close()
        sys.exit(1)
    conn.close()


# -- the parent --------------------------------------------------------------------------
def _check_program(program: Any) -> tuple[str, str]:
    """The (module, qualified name) by which the party processes import ``program``."""
    qualname = getattr(program, "__qualname__", "")
    module = getattr(program, "__module__", None)
    if not callable(program) or not module or "<" in qualname or "." in qualname:
        raise ValueError(
            f"run_processes needs a module-level function (importable by the spawned processes), got {program!r}; "
            "define it at the top level of a module"
        )
    if module == "__main__" and not getattr(sys.modules["__main__"], "__file__", None):
        raise ConfigError(f"{qualname} is defined in an interactive session, which the party processes cannot "
                          "import; define it in a module file and import it from there")
    return module, qualname


# Set in a party process while it imports the caller's main script to find the program.
_IMPORTING_MAIN: str | None = None


def _refuse_reentry() -> None:
    if _IMPORTING_MAIN is not None:
        raise ConfigError(
            f"{_IMPORTING_MAIN} calls run_processes again when a party process imports it to find the program; "
            'put the code that starts the run under `if __name__ == "__main__":` in that script'
        )


def _import_main(path: str) -> types.ModuleType:
    """Run the caller's main script as ``__mp_main__`` (as multiprocessing's spawn does) and alias it ``__main__``."""
    global _IMPORTING_MAIN
    module = types.ModuleType("__mp_main__")
    module.__file__ = path
    sys.modules["__mp_main__"] = module
    _IMPORTING_MAIN = path
    try:
        module.__dict__.update(runpy.run_path(path, run_name="__mp_main__"))
    finally:
        _IMPORTING_MAIN = None
    sys.modules["__main__"] = module  # objects pickled as __main__.X resolve here
    return module


def _load_program(spec: list | None, main_path: str | None) -> Callable[..., Any] | None:
    if spec is None:
        return None
    module_name, qualname = spec
    module = _import_main(str(main_path)) if module_name == "__main__" else importlib.import_module(module_name)
    program = getattr(module, qualname, None)
    if not callable(program):
        raise ConfigError(f"the party process found no function {qualname!r} in {module_name}")
    return program


def child_entry(read_fd: int, write_fd: int) -> None:
    """A party process (``python -m mpc.net.spawned``): read its start-up messages from the parent, then run."""
    conn = _Pipe(read_fd, write_fd)
    boot = msgpack.unpackb(conn.recv_bytes(), raw=False)
    payload = conn.recv_bytes()  # read both messages first: the parent never blocks on a failed child
    _watch_parent(boot["parent_pid"])
    sys.path[:] = boot["sys_path"]
    try:
        program = _load_program(boot["program"], boot["main_path"])
        # From our own parent, over a private pipe: the arguments it passed, as multiprocessing would pickle them.
        args, settings, secret = pickle.loads(payload)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        _send(conn, _describe_error(exc))
        conn.close()
        sys.exit(1)
    _child_main(boot["rank"], boot["parties"], program, args, settings, secret, boot["session"], conn)


def _start_child() -> tuple[subprocess.Popen, _Pipe]:
    """A fresh interpreter running :func:`child_entry`, and the two pipes to it."""
    down_read, down_write = os.pipe()
    up_read, up_write = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mpc.net.spawned", str(down_read), str(up_write)],
                                pass_fds=(down_read, up_write))
    except BaseException:
        for fd in (down_write, up_read):
            os.close(fd)
        raise
    finally:
        os.close(down_read)
        os.close(up_write)
    return proc, _Pipe(up_read, down_write)


class _Run:
    """The parent's view of the children: ports, results, failures."""

    def __init__(self, parties: int):
        self.parties = parties
        self.size = parties + 1
        self.processes: list[subprocess.Popen] = []
        self.pipes: list[_Pipe] = []
        self.ports: dict[int, int] = {}
        self.results: dict[int, Any] = {}
        self.reported: dict[int, BaseException] = {}
        self.died: dict[int, BaseException] = {}
        self.first_failure_at: float | None = None

    def name(self, rank: int) -> str:
        return endpoint_name(rank, self.size)

    def done(self, rank: int) -> bool:
        return rank in self.results or rank in self.reported or rank in self.died

    def pending(self) -> list[int]:
        return [r for r in range(self.size) if not self.done(r)]

    def fail(self, rank: int, exc: BaseException, *, died: bool) -> None:
        (self.died if died else self.reported)[rank] = exc
        if self.first_failure_at is None:
            self.first_failure_at = time.monotonic()

    def handle(self, rank: int) -> None:
        """Read one message from child ``rank`` (or notice that it is gone)."""
        pipe = self.pipes[rank]
        try:
            data = pipe.recv_bytes()
        except (EOFError, OSError):
            self.process_gone(rank)
            return
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(data)
        message = next(unpacker)
        kind = message.get("t")
        if kind == "listening":
            self.ports[rank] = int(message["port"])
        elif kind == "result":
            self.results[rank] = unpack_value(data[unpacker.tell() :])
        elif kind == "error":
            self.fail(rank, _rebuild_error(message, self.name(rank)), died=False)

    def process_gone(self, rank: int) -> None:
        if self.done(rank):
            return
        proc = self.processes[rank]
        try:
            code = proc.wait(1.0)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        self.fail(rank, PeerFailure(self.name(rank), f"its process {how} without reporting a result"), died=True)

    def wait(self, until: Callable[[], bool], deadline: float | None) -> None:
        """Serve messages until ``until()`` holds, every child is done, or the deadline passes."""
        while not until():
            pending = self.pending()
            if not pending:
                return
            now = time.monotonic()
            limit = deadline
            if self.first_failure_at is not None:
                grace_end = self.first_failure_at + _GRACE_S
                limit = grace_end if limit is None else min(limit, grace_end)
            if limit is not None and now >= limit:
                return
            # A child's pipe is readable when it sent a message, and at EOF when it exited
            # (handle() then reads EOFError and marks it gone).
            ready = multiprocessing.connection.wait([self.pipes[r] for r in pending],
                                                    None if limit is None else limit - now)
            for obj in ready:
                for r in pending:
                    if obj is self.pipes[r] and not self.done(r):
                        self.handle(r)

    def root_cause(self) -> BaseException:
        reported = list(self.reported.values())
        for exc in reported:
            if not isinstance(exc, PeerFailure):
                return exc
        if self.died:
            return next(iter(self.died.values()))
        return reported[0]

    def reap(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 3.0
        for proc in self.processes:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.05))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        for pipe in self.pipes:
            pipe.close()


def run_processes(
    program: Callable[..., Any],
    parties: int = 2,
    *,
    args: tuple = (),
    frac_bits: int = 16,
    truncation: str = "exact",
    comparison: str = "auto",
    comparison_bits: int = 64,
    comparison_slack_bits: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    start_timeout_s: float = 120.0,
    limits: Limits | None = None,
    options: ChannelOptions | None = None,
) -> list[Any]:
    """Run ``program(ctx, *args)`` in every party, each a separate OS process, with a dealer process.

    Like :func:`mpc.run_local`, but the parties and the dealer talk over
    authenticated websockets on 127.0.0.1.  ``program`` must be a module-level
    function: each process is a fresh interpreter that imports the program's
    module (the caller's script only if the program is defined there, so such a
    script needs its ``if __name__ == "__main__":`` guard); ``args`` are pickled
    to the processes over a private pipe; return values must be
    numpy arrays, numbers, strings, bytes, or lists/tuples/dicts of those.

    Args:
        frac_bits, truncation, comparison, comparison_bits, comparison_slack_bits:
            the context options, as for :func:`mpc.run_local`.
        timeout_s: how long any party waits for any one message.
        start_timeout_s: how long start-up (imports, listening, connecting) may take.
        limits, options: wire limits and channel timing for the mesh.

    Returns:
        Each party's return value, in rank order.

    Raises:
        The root-cause error of a failed party (re-raised with the party named
        and its traceback attached), or :class:`~mpc.errors.PeerFailure` if a
        process died.
    """
    _refuse_reentry()
    if parties < 2:
        raise ValueError(f"secret sharing needs at least 2 parties, got {parties}")
    if truncation not in ("exact", "local"):
        raise ValueError(f"truncation must be 'exact' or 'local', got {truncation!r}")
    spec = _check_program(program)
    check_comparison_slack(comparison_slack_bits, check_comparison_options(comparison, comparison_bits, parties)[1])
    options = options or ChannelOptions(connect_timeout_s=start_timeout_s)
    settings = {
        "frac_bits": frac_bits,
        "truncation": truncation,
        "context": {
            "comparison": comparison,
            "comparison_bits": comparison_bits,
            "comparison_slack_bits": comparison_slack_bits,
        },
        "timeout_s": timeout_s,
        "start_timeout_s": start_timeout_s,
        "limits": limits or Limits(),
        "options": options,
    }
    secret = secrets.token_bytes(32)
    session = secrets.token_hex(8)
    main_path = getattr(sys.modules["__main__"], "__file__", None) if spec[0] == "__main__" else None
    payload = pickle.dumps((args, settings, secret), protocol=pickle.HIGHEST_PROTOCOL)
    run = _Run(parties)
    try:
        for _ in range(parties + 1):
            proc, pipe = _start_child()
            run.processes.append(proc)
            run.pipes.append(pipe)
        # Every child boots in parallel; each start-up message waits only for its own child to read it.
        for rank, pipe in enumerate(run.pipes):
            boot = {"rank": rank, "parties": parties, "program": list(spec) if rank < parties else None,
                    "main_path": main_path if rank < parties else None, "sys_path": list(sys.path),
                    "session": session, "parent_pid": os.getpid()}
            try:
                pipe.send_bytes(msgpack.packb(boot, use_bin_type=True))
                pipe.send_bytes(payload)
            except OSError:
                pass  # it died at once; wait() reads why
        start_deadline = time.monotonic() + start_timeout_s
        run.wait(lambda: len(run.ports) == run.size or run.first_failure_at is not None, start_deadline)
        if run.first_failure_at is None and len(run.ports) < run.size:
            slow = ", ".join(run.name(r) for r in range(run.size) if r not in run.ports)
            raise PeerFailure(slow, f"did not start listening within {start_timeout_s:g} s")
        if run.first_failure_at is None:
            ports = [run.ports[r] for r in range(run.size)]
            for pipe in run.pipes:
                _send(pipe, {"t": "peers", "ports": ports})
            run.wait(lambda: False, None)
        else:  # failed while starting: the others have no peers to wait for, only their own errors to tell
            run.wait(lambda: False, time.monotonic() + _START_GRACE_S)
        if run.reported or run.died:
            root = run.root_cause()
            failures = {**run.reported, **run.died}
            others = [f"{run.name(r)}: {type(e).__name__}: {e}" for r, e in sorted(failures.items()) if e is not root]
            if others:
                root.add_note("other endpoints:\n  " + "\n  ".join(others))
            raise root
        return [run.results[r] for r in range(parties)]
    finally:
        run.reap()
