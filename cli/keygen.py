"""``primia keygen``: a long-term key pair for the hub, a node or the dealer.

    primia keygen --name hospital-a --out keys

writes ``keys/hospital-a.key`` (private, mode 0600: it never leaves this
machine) and ``keys/hospital-a.pub`` (public: give it to the federation's
coordinator, who lists it in the hub's config and shares it with the others).
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "keygen",
        help="make a key pair for the hub, a node or the dealer",
        description="Write NAME.key (private, mode 0600) and NAME.pub (public) into a folder. The hub's config lists "
        "each node's .pub; nodes and the dealer pin hub.pub.",
    )
    p.add_argument("--name", required=True, help="the party's name: hub, dealer, or the node's name")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the key files (created if missing)")
    p.add_argument("--force", action="store_true", help="replace existing key files of that name")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fl.identity import fingerprint_text, generate_keys, load_public_key

    key_path, pub_path = generate_keys(args.name, args.out, force=args.force)
    fp = fingerprint_text(load_public_key(pub_path, what="the new public key"))
    print(f"private key: {key_path} (keep it on this machine; mode 600)")
    print(f"public key:  {pub_path} (share it)  {fp}")
    return 0
