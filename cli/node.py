"""``primia node``: a data owner's node in one command.

    primia node --data /data/xrays --name hospital-a --port 8781 --token-file node.key

The folder holds one sub-folder per class (PNG, JPEG, DICOM).  The node checks
it, names every problem, and then serves the hub named in the federation
config: it trains when asked and sends only model updates (masked, with secure
aggregation), never images or labels.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mpc.errors import ConfigError

__all__ = ["register", "TOKEN_ENV"]

TOKEN_ENV = "PRIMIA_NODE_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "node",
        help="serve a folder of images to a federation (data owner)",
        description="Check a folder of images (one sub-folder per class) and serve it to a federation hub. "
        "Only model updates leave this machine.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="folder with one sub-folder of images per class")
    p.add_argument("--name", help="this node's name, as in the hub's federation.nodes (default: the folder's name)")
    add_listener_arguments(p, port=8781, token_help=f"file holding the secret shared with the hub (or set ${TOKEN_ENV})",
                           once_help="exit when the first run ends")
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--strict", action="store_true", help="treat mixed image sizes or channels as errors")
    p.add_argument("--check", action="store_true", help="only check the data folder, print the findings and exit")
    p.set_defaults(func=main)


def add_listener_arguments(p: argparse.ArgumentParser, *, port: int, token_help: str, once_help: str) -> None:
    """The options of a server the hub dials (``primia node``, ``primia dealer``)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=port, help=f"port to listen on (0: any free port; default {port})")
    p.add_argument("--token-file", metavar="FILE", help=token_help)
    p.add_argument("--port-file", metavar="FILE", help="write the port actually bound to this file (JSON)")
    p.add_argument("--max-message-mib", type=int, default=1024, help="largest message accepted (MiB)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve wss:// with this certificate (PEM; needs --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")
    p.add_argument("--once", action="store_true", help=once_help)


def read_token(token_file: str | None, *, env: str = TOKEN_ENV, what: str = "federation.nodes[].token for this node") -> str:
    if token_file:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--token-file: cannot read {token_file}: {exc.strerror or exc}") from None
        token = lines[0].strip() if lines else ""
    else:
        token = os.environ.get(env, "").strip()
    if not token:
        raise ConfigError(
            f"no secret: pass --token-file FILE or set ${env} (the same secret as the hub's "
            f"{what}; make one with `openssl rand -hex 32`)"
        )
    return token


def main(args: argparse.Namespace) -> int:
    from fl.data import scan_folder

    if args.check:
        scan = scan_folder(args.data, strict=args.strict)
        counts = ", ".join(f"{c}: {n}" for c, n in scan.class_counts().items())
        print(f"{args.data}: {len(scan.files)} images in {len(scan.classes)} classes ({counts})")
        for problem in scan.problems:
            print(f"  - {problem}")
        return 0
    token = read_token(args.token_file)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fl.node import run_node

    logging.getLogger("primia").setLevel(logging.INFO)
    try:
        run_node(
            args.data,
            token=token,
            name=args.name,
            host=args.host,
            port=args.port,
            port_file=args.port_file,
            device=args.device,
            strict=args.strict,
            max_message_mib=args.max_message_mib,
            once=args.once,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except KeyboardInterrupt:
        print("primia node: stopped", file=sys.stderr)
    return 0
