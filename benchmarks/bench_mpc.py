"""pytest-benchmark cases for the engine: PRG throughput, Beaver matmul/conv2d against plaintext.

    python -m pytest benchmarks/bench_mpc.py --benchmark-only

Bytes and rounds are exact and attached to each case as ``extra_info``.
"""

import numpy as np
import pytest
import torch

import mpc
from mpc import prg

RNG = np.random.default_rng(0)
MATMUL = (RNG.uniform(-1, 1, (256, 2304)), RNG.uniform(-1, 1, (2304, 196)))
CONV = (RNG.uniform(-1, 1, (1, 64, 56, 56)), RNG.uniform(-0.1, 0.1, (64, 64, 3, 3)))


def test_prg_aes_ctr_10m(benchmark):
    key = prg.new_seed()
    benchmark(lambda: prg.Stream(key, 0).ring(10_000_000))


def test_plain_matmul_float64(benchmark):
    a, b = MATMUL
    benchmark(lambda: a @ b)


def test_plain_conv_float64(benchmark):
    x, w = (torch.from_numpy(t) for t in CONV)
    benchmark(lambda: torch.nn.functional.conv2d(x, w, padding=1))


def _op_program(ctx, op, a, b):
    x = ctx.share(a if ctx.rank == 0 else None, owner=0)
    y = ctx.share(b if ctx.rank == 1 else None, owner=1)
    before = ctx.stats()
    z = x @ y if op == "matmul" else mpc.conv2d(x, y, padding=1)
    after = ctx.stats()
    return {k: after[k] - before[k] for k in after}, z.shape


@pytest.mark.parametrize("parties", [2, 3])
@pytest.mark.parametrize("op", ["matmul", "conv2d"])
def test_beaver(benchmark, op, parties):
    a, b = MATMUL if op == "matmul" else CONV
    stats, shape = benchmark(lambda: mpc.run_local(_op_program, parties=parties, args=(op, a, b))[0])
    benchmark.extra_info.update(stats)
    assert stats["rounds"] == 2
    assert stats["bytes_sent"] == 8 * (parties - 1) * (a.size + b.size + int(np.prod(shape)))
