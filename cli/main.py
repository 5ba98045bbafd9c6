"""The ``primia`` command: one sub-command per module in this package.

Each command module exposes ``register(subparsers)``, which adds its parser and
sets ``func`` (a callable taking the parsed arguments and returning an exit
code).  Modules are imported lazily so that ``primia --help`` stays fast and a
broken optional component cannot take the whole command down.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mpc.errors import PrimiaError

__all__ = ["main", "COMMANDS"]

#: sub-command module names under ``cli``, in help order
COMMANDS = ("demo", "keygen", "node", "dealer", "train", "infer", "party")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="primia",
        description="Privacy-preserving deep learning for medical imaging: secure federated training "
        "and encrypted inference.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cli.{name}":
                continue  # that component is not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if not args.verbose:  # a line per connection opened or closed drowns what matters
        logging.getLogger("websockets").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PrimiaError as exc:
        print(f"primia {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"primia {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
