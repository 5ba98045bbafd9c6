"""Party programs for the multi-process tests in test_net.py.

Kept apart so that the spawned party processes, which import the program's
module, import only numpy and mpc (not pytest plugins, hypothesis, ...).
"""

from __future__ import annotations

import os
import signal

import numpy as np

import mpc


def layers_program(ctx):
    rng = np.random.default_rng(11)  # test data, identical in every party
    a, b = rng.uniform(-2, 2, (6, 9)), rng.uniform(-2, 2, (9, 4))
    x, w = rng.uniform(-1, 1, (2, 3, 7, 7)), rng.uniform(-0.5, 0.5, (4, 3, 3, 3))
    last = ctx.parties - 1
    A = ctx.share(a if ctx.rank == 0 else None, owner=0)
    B = ctx.share(b if ctx.rank == last else None, owner=last)
    X = ctx.share(x if ctx.rank == 0 else None, owner=0)
    W = ctx.share(w if ctx.rank == last else None, owner=last)
    out = {"matmul": (A @ B).reveal(), "conv2d": mpc.conv2d(X, W, padding=1, stride=2).reveal()}
    out["relu"] = A.relu().reveal()
    out["stats"] = ctx.stats()
    if ctx.rank in (0, 1):  # unaccounted raw traffic: a 24 MB array there and back (many fragments)
        out["round_trip"] = _round_trip(ctx, 3_000_000)
    return out


_ODD = np.int64(0x9E3779B97F4A7C15 - (1 << 64))


def _round_trip(ctx, n: int) -> bool:
    """Party 0 sends n int64 to party 1, which checks them and sends them back; both check."""
    data = np.arange(n, dtype=np.int64) * _ODD
    if ctx.rank == 0:
        ctx.comm.send_raw(1, data)
        return bool(np.array_equal(ctx.comm.recv_raw(1, (n,), np.int64), data))
    got = ctx.comm.recv_raw(0, (n,), np.int64)
    ctx.comm.send_raw(0, got)
    return bool(np.array_equal(got, data))


def failing_program(ctx):
    x = ctx.share(np.ones(3) if ctx.rank == 0 else None, owner=0)
    if ctx.rank == 1:
        raise ValueError("party program bug: boom")
    return (x * x).reveal()


def killed_program(ctx):
    x = ctx.share(np.ones(3) if ctx.rank == 0 else None, owner=0)
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return (x * x).reveal()


def round_trip_program(ctx, nbytes):
    """Party 0 sends a large array to party 1, which sends it back; both check it."""
    return _round_trip(ctx, nbytes // 8)


def cli_program(ctx, scale):
    a = np.arange(6.0).reshape(2, 3) * scale
    x = ctx.share(a if ctx.rank == 0 else None, owner=0)
    y = ctx.share(np.ones((3, 2)) if ctx.rank == 1 else None, owner=1)
    return (x @ y).reveal()


def relu_stats(ctx, x):
    """ReLU of party 0's input: the value revealed to all, and this party's accounting."""
    shared = ctx.share(x if ctx.rank == 0 else None, owner=0)
    before = ctx.stats()
    out = shared.relu()
    after = ctx.stats()
    return out.reveal(), {k: after[k] - before[k] for k in after}


def domain_check_program(ctx, values):
    """maximum(x, -x) in the context's domain; returns the result, or the ComparisonOverflow's fields."""
    x = ctx.share(np.asarray(values) if ctx.rank == 0 else None, owner=0)
    with ctx.comparison_scope("head"):
        y = mpc.maximum(x, -x)
    try:
        return {"value": y.reveal()}
    except mpc.ComparisonOverflow as exc:
        return {"domain_bits": exc.domain_bits, "scopes": list(exc.scopes), "comparisons": exc.comparisons}
