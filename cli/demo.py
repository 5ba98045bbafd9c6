"""``primia demo``: a secure federation of three hospitals-in-miniature, in one command, nothing downloaded.

    primia demo

Writes scikit-learn's bundled digits as PNG files split across three nodes,
starts the nodes and the hub on 127.0.0.1, trains with secure aggregation,
prints the metrics, and classifies held-out images by encrypted inference.
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a 3-node secure federation on bundled digit images (about a minute)",
        description="Build a small real dataset, start three nodes and the hub on 127.0.0.1, train with secure "
        "aggregation, print metrics and run encrypted inference on held-out images.",
    )
    p.add_argument("--out", default="primia-demo", help="output folder, replaced on each run (default ./primia-demo)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    p.add_argument("--masking", choices=("pairwise", "dealer"), default="pairwise",
                   help="secure aggregation with pair masks between the nodes (default), or one mask per node "
                        "removed by a dealer process (aggregation.masking)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fl.demo import run_demo

    return run_demo(args.out, rounds=args.rounds, masking=args.masking)
