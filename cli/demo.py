"""``primia demo``: a local demonstration (provisional: the MPC engine; the federation replaces it)."""

from __future__ import annotations

import argparse
import time

import numpy as np


def _program(ctx, image, kernel):
    import mpc

    x = ctx.share(image if ctx.rank == 0 else None, owner=0)
    w = ctx.share(kernel if ctx.rank == 1 else None, owner=1)
    y = mpc.conv2d(x, w, stride=2, padding=1)
    return y.reveal(to=0), ctx.stats()


def run(args: argparse.Namespace) -> int:
    import torch

    import mpc

    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, size=(1, 3, 32, 32))
    kernel = rng.uniform(-0.5, 0.5, size=(8, 3, 3, 3))
    start = time.perf_counter()
    outs = mpc.run_local(_program, parties=3, args=(image, kernel))
    seconds = time.perf_counter() - start
    result, stats = outs[0]
    ref = torch.nn.functional.conv2d(torch.from_numpy(image), torch.from_numpy(kernel), stride=2, padding=1).numpy()
    print("primia demo: a private image (party 0) convolved with a private kernel (party 1), 3 parties + dealer")
    print(f"  max |MPC - torch| = {np.abs(result - ref).max():.2e}   time {seconds:.2f} s")
    print(f"  party 0: {stats['rounds']} rounds, {stats['bytes_sent']} B sent, {stats['dealer_bytes']} B from the dealer")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run a local demonstration")
    parser.set_defaults(func=run)
