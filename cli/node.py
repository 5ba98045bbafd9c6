"""``primia node``: a data owner's node in one command.

    primia node --data /data/xrays --name hospital-a --key keys/hospital-a.key \\
                --hub wss://hub.example.org:8780 --hub-key keys/hub.pub

The folder holds one sub-folder per class (PNG, JPEG, DICOM).  The node checks
it, names every problem, then connects out to the hub (no inbound port): it
proves itself with its key, checks the hub's against the pinned ``hub.pub``,
trains when asked and sends only model updates (masked, with secure
aggregation), never images or labels.  It reconnects on its own after a fault
or a restart.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mpc.errors import ConfigError

__all__ = ["register", "add_client_arguments", "member_setup"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "node",
        help="serve a folder of images to a federation (data owner)",
        description="Check a folder of images (one sub-folder per class) and take part in a federation: connect "
        "out to the hub, train when asked. Only model updates leave this machine.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="folder with one sub-folder of images per class")
    p.add_argument("--name", help="this node's name, as in the hub's federation.nodes (default: the key file's name)")
    p.add_argument("--key", metavar="FILE", help="this node's private key (NAME.key from `primia keygen`)")
    add_client_arguments(p, once_help="exit when the run ends instead of waiting for the next one")
    p.add_argument("--peer-keys", metavar="DIR",
                   help="folder of the other nodes' .pub files, checked in secure aggregation (default: the folder "
                        "of --hub-key)")
    p.add_argument("--dealer-key", metavar="FILE",
                   help="the dealer's public key, for aggregation.masking = 'dealer' (default: dealer.pub beside "
                        "--hub-key, if there is one)")
    p.add_argument("--allow-plain-aggregation", action="store_true",
                   help="take part in runs without secure aggregation (the hub then sees this node's update in the "
                        "clear); by default such a run is refused")
    p.add_argument("--min-nodes", type=int, default=2, metavar="N",
                   help="never let this node's update be summed with fewer than N nodes in all (default 2; the hub's "
                        "min_nodes can only raise it)")
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--strict", action="store_true", help="treat mixed image sizes or channels as errors")
    p.add_argument("--check", action="store_true", help="only check the data folder, print the findings and exit")
    p.set_defaults(func=main)


def add_client_arguments(p: argparse.ArgumentParser, *, once_help: str) -> None:
    """The options of a party that dials the hub (``primia node``, ``primia dealer``)."""
    p.add_argument("--hub", metavar="URL", help="the hub's address: wss://HOST:PORT (ws:// on this machine)")
    p.add_argument("--hub-key", metavar="FILE", help="the hub's public key (hub.pub): the only hub this side talks to")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate that signed the hub's TLS certificate (for wss:// "
                                                    "with your own CA; default: the system's CAs)")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="allow ws:// to another machine (unencrypted: only on a network you trust)")
    p.add_argument("--max-message-mib", type=int, default=1024, help="largest message accepted (MiB)")
    p.add_argument("--reconnect-max-s", type=float, default=30.0, metavar="S",
                   help="longest wait between attempts to reach the hub (backoff from 0.5 s; default 30)")
    p.add_argument("--once", action="store_true", help=once_help)


def member_setup(args: argparse.Namespace, name: str):
    """(identity, hub uri, TLS context) for a party that dials the hub, every input checked."""
    from fl.identity import check_name, load_private_key, load_public_key
    from fl.transport import client_tls, hub_uri, member_identity

    if not args.key:
        raise ConfigError("--key: give this party's private key (make one with `primia keygen --name NAME --out keys`)")
    if not args.hub_key:
        raise ConfigError("--hub-key: give the hub's public key (hub.pub from the federation's coordinator); this "
                          "side talks to no other hub")
    check_name(name, "--name")
    uri = hub_uri(args.hub, allow_plaintext=args.allow_plaintext)
    identity = member_identity(name, load_private_key(args.key, what="--key"),
                               load_public_key(args.hub_key, what="--hub-key"))
    if args.max_message_mib < 1:
        raise ConfigError(f"--max-message-mib: {args.max_message_mib} must be at least 1")
    if not 0.1 <= args.reconnect_max_s <= 3600:
        raise ConfigError(f"--reconnect-max-s: {args.reconnect_max_s:g} must be between 0.1 and 3600")
    return identity, uri, client_tls(uri, args.tls_ca)


def main(args: argparse.Namespace) -> int:
    from fl.data import scan_folder

    if args.check:
        scan = scan_folder(args.data, strict=args.strict)
        counts = ", ".join(f"{c}: {n}" for c, n in scan.class_counts().items())
        print(f"{args.data}: {len(scan.files)} images in {len(scan.classes)} classes ({counts})")
        for problem in scan.problems:
            print(f"  - {problem}")
        return 0
    from fl.identity import KEY_SUFFIX, Directory, load_public_key

    name = args.name or (Path(args.key).name.removesuffix(KEY_SUFFIX) if args.key else None)
    if not name:
        raise ConfigError("--name: give this node's name (as in the hub's federation.nodes)")
    identity, uri, tls = member_setup(args, name)
    if args.min_nodes < 2:
        raise ConfigError(f"--min-nodes: {args.min_nodes} must be at least 2 (a sum of one update is that update)")
    keys_dir = Path(args.peer_keys) if args.peer_keys else Path(args.hub_key).parent
    dealer_path = Path(args.dealer_key) if args.dealer_key else keys_dir / "dealer.pub"
    dealer_key = load_public_key(dealer_path, what="--dealer-key") if args.dealer_key or dealer_path.is_file() \
        else None
    # only the federation's nodes: neither the hub nor the dealer may pose as a member
    directory = Directory.from_folder(keys_dir, what="--peer-keys").nodes(
        not_keys=[identity.peers["hub"], *([dealer_key] if dealer_key is not None else [])]) \
        if keys_dir.is_dir() else None
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fl.node import run_node

    logging.getLogger("primia").setLevel(logging.INFO)
    try:
        ended = run_node(args.data, hub=uri, identity=identity, directory=directory, dealer_key=dealer_key, name=name,
                         tls=tls, device=args.device, strict=args.strict, max_message_mib=args.max_message_mib,
                         once=args.once, reconnect_max_s=args.reconnect_max_s,
                         allow_plain=args.allow_plain_aggregation, min_nodes=args.min_nodes)
    except KeyboardInterrupt:
        print("primia node: stopped", file=sys.stderr)
        return 0
    print(f"primia node: {ended}")
    return 0 if ended.startswith("the hub ended the run") else 1
