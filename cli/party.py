"""``primia party``: run one MPC party, or the dealer, from a party list.

    primia party --config parties.toml --id 0 --program mymodule:program --output result.npy
    primia party --config parties.toml --id 1 --program mymodule:program
    primia party --config parties.toml --id 2            # the dealer (role = "dealer")

Every party runs the same ``module:function`` (called as ``function(ctx, *args)``,
as with ``mpc.run_local``); the dealer needs no program.  Start them in any
order: each keeps dialling the others until ``[timeouts] connect_s``.  The
config format, authentication and TLS are described in docs/network.md.

The return value is written with ``--output``: ``.npy`` for an array, otherwise
JSON.  The file is written to a temporary name and renamed, so a failed run
never leaves a half-written output.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["register"]

log = logging.getLogger("primia.party")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "party",
        help="run one MPC party or the dealer over the network, from a party list (TOML)",
        description="Join the MPC mesh described by a party list as one party (or the dealer), run a party "
        "program and write its result. See docs/network.md for the config format, authentication and TLS.",
    )
    p.add_argument("--config", required=True, type=Path, help="the party list (TOML), the same file for everyone")
    p.add_argument("--id", required=True, type=int, help="this endpoint's id in the party list")
    p.add_argument("--program", help="module:function to run as function(ctx, *args); not used by the dealer")
    p.add_argument("--args", default="[]", help="JSON list of extra arguments for the program (default [])")
    p.add_argument("--output", type=Path, help="write the return value here (.npy for an array, else JSON)")
    p.set_defaults(func=main)


def _load_program(spec: str | None) -> Callable[..., Any]:
    from mpc.errors import ConfigError

    if not spec or ":" not in spec:
        raise ConfigError(f"--program must be module:function, got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for --program: {exc}") from None
    program = getattr(module, attr, None)
    if not callable(program):
        raise ConfigError(f"{module_name!r} has no function {attr!r} (from --program {spec!r})")
    return program


def _write_output(value: Any, path: Path) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(value, np.ndarray) and path.suffix == ".npy":
                np.save(f, value, allow_pickle=False)
            else:
                f.write(json.dumps(value, default=_jsonable, indent=1).encode())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON; return arrays, numbers, lists or dicts")


def main(args: argparse.Namespace) -> int:
    from mpc.errors import ConfigError
    from mpc.net.config import load_config
    from mpc.net.connection import NetworkTransport, endpoint_name
    from mpc.net.processes import run_endpoint

    if not getattr(args, "verbose", False):
        logging.getLogger("websockets").setLevel(logging.WARNING)  # one line per connection otherwise
    config = load_config(args.config)
    me = config.endpoint(args.id)
    name = endpoint_name(args.id, len(config.endpoints))
    dealer = args.id == config.dealer_id
    program = None if dealer else _load_program(args.program)
    try:
        program_args = json.loads(args.args)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--args is not valid JSON: {exc}") from None
    if not isinstance(program_args, list):
        raise ConfigError(f"--args must be a JSON list, got {args.args!r}")

    transport = NetworkTransport(
        args.id,
        len(config.endpoints),
        membership=config.membership(args.id),
        limits=config.limits,
        options=config.options,
        server_ssl=config.server_ssl(args.id),
        client_ssl=config.client_ssl(args.id),
        flush_timeout_s=config.recv_timeout_s,
    )
    try:
        if not dealer:
            port = transport.listen(me.listen_host, me.port)
            log.info("%s listening on %s:%d (%s)", name, me.listen_host, port, "wss" if config.tls else "ws")
        transport.connect(config.addresses())
        log.info("%s connected to all %d peers (session %s)", name, len(config.endpoints) - 1, config.session)
        result = run_endpoint(
            transport,
            args.id,
            config.parties,
            program,
            tuple(program_args),
            frac_bits=config.frac_bits,
            truncation=config.truncation,
            timeout_s=config.recv_timeout_s,
            **config.comparison,
        )
        transport.close()
    except BaseException as exc:
        transport.abort(f"{name} failed: {type(exc).__name__}: {exc}")
        raise
    if args.output is not None and not dealer:
        _write_output(result, args.output)
        log.info("%s wrote its result to %s", name, args.output)
    print(f"{name} finished")
    return 0
