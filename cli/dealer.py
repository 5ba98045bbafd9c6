"""``primia dealer``: the crypto provider for a federation's dealer-masked secure aggregation.

    primia dealer --key keys/dealer.key --hub wss://hub.example.org:8780 --hub-key keys/hub.pub \\
                  --node-keys keys

Used when the hub's config says ``aggregation.masking = "dealer"`` (with
``federation.dealer_public_key_file``).  The dealer connects out to the hub,
derives one mask seed per node and round, and sends the hub the sum of the
included nodes' masks once per round; it never sees an update or an image.
It accepts only the nodes whose public keys are in ``--node-keys``.  Run it
where neither the hub's operator nor a node's can read its memory: the hub and
the dealer together could unmask single updates.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .node import add_client_arguments, member_setup

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dealer",
        help="serve as the crypto provider for a federation's secure aggregation (aggregation.masking = 'dealer')",
        description="Connect to a federation hub as the dealer (crypto provider) of dealer-masked secure "
        "aggregation. It sees only public keys and the list of included nodes, never an update.",
    )
    p.add_argument("--key", metavar="FILE", help="the dealer's private key (dealer.key from `primia keygen --name "
                                                 "dealer`)")
    p.add_argument("--node-keys", metavar="DIR",
                   help="folder of the nodes' .pub files: the only members the dealer accepts (default: the folder "
                        "of --hub-key)")
    add_client_arguments(p, once_help="exit when the run ends instead of waiting for the next one")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fl.identity import Directory
    from fl.transport import DEALER_ID, HUB_ID

    identity, uri, tls = member_setup(args, DEALER_ID)
    folder = Path(args.node_keys) if args.node_keys else Path(args.hub_key).parent
    directory = Directory.from_folder(folder, what="--node-keys").nodes(
        not_keys=[identity.peers[HUB_ID], identity.public_key])
    from fl.dealer import run_dealer

    logging.getLogger("primia").setLevel(logging.INFO)
    try:
        ended = run_dealer(hub=uri, identity=identity, directory=directory, tls=tls,
                           max_message_mib=args.max_message_mib, once=args.once, reconnect_max_s=args.reconnect_max_s)
    except KeyboardInterrupt:
        print("primia dealer: stopped", file=sys.stderr)
        return 0
    print(f"primia dealer: {ended}")
    return 0
