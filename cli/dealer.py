"""``primia dealer``: the crypto provider for a federation's dealer-masked secure aggregation.

    primia dealer --port 8790 --token-file dealer.key

Used when the hub's config says ``aggregation.masking = "dealer"`` (with
``federation.dealer_address`` and ``dealer_token``).  The dealer derives one
mask seed per node and round, and sends the hub the sum of the included nodes'
masks once per round; it never sees an update or an image.  Run it where
neither the hub's operator nor a node's can read its memory: the hub and the
dealer together could unmask single updates.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .node import add_listener_arguments, read_token

__all__ = ["register"]

TOKEN_ENV = "PRIMIA_DEALER_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dealer",
        help="serve as the crypto provider for a federation's secure aggregation (aggregation.masking = 'dealer')",
        description="Serve a federation hub as the dealer (crypto provider) of dealer-masked secure aggregation. "
        "It sees only public keys and the list of included nodes, never an update.",
    )
    add_listener_arguments(
        p, port=8790, once_help="exit when the first hub connection ends",
        token_help=f"file holding the secret shared with the hub (federation.dealer_token; or set ${TOKEN_ENV})",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    token = read_token(args.token_file, env=TOKEN_ENV, what="federation.dealer_token")
    from fl.dealer import run_dealer

    logging.getLogger("primia").setLevel(logging.INFO)
    try:
        run_dealer(token=token, host=args.host, port=args.port, port_file=args.port_file,
                   max_message_mib=args.max_message_mib, once=args.once,
                   tls_cert=args.tls_cert, tls_key=args.tls_key)
    except KeyboardInterrupt:
        print("primia dealer: stopped", file=sys.stderr)
    return 0
