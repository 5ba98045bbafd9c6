"""pytest-benchmark cases for the non-linear protocols: ReLU, 3x3/2 max pooling, argmax over 10 classes.

    python -m pytest benchmarks/bench_nonlinear.py --benchmark-only

Each case runs the whole computation (sharing, the operation with the dealer's
key generation, reveal) in ``mpc.run_local``; rounds and bytes of the operation
alone are exact and attached as ``extra_info``.  ``benchmarks/nonlinear_table.py``
prints the same figures as a table beside CrypTen's.
"""

import numpy as np
import pytest

import mpc

RNG = np.random.default_rng(0)
RELU_IN = RNG.normal(0, 2, (1, 64, 56, 56))
POOL_IN = RNG.normal(0, 2, (1, 64, 112, 112))
LOGITS = RNG.normal(0, 3, (4096, 10))

CASES = {
    "relu": (RELU_IN, lambda x: x.relu()),
    "maxpool3x3s2": (POOL_IN, lambda x: mpc.max_pool2d(x, 3, 2, 1)),
    "argmax10": (LOGITS, lambda x: x.argmax(axis=1)),
}
PROTOCOLS = [(2, "fss", 64), (2, "fss", 32), (2, "generic", 64), (3, "generic", 64)]


def _program(ctx, data, op):
    x = ctx.share(data if ctx.rank == 0 else None, owner=0)
    before = ctx.stats()
    y = op(x)
    after = ctx.stats()
    y.reveal()
    return {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("parties,comparison,bits", PROTOCOLS, ids=lambda v: str(v))
@pytest.mark.parametrize("case", list(CASES))
def test_nonlinear(benchmark, case, parties, comparison, bits):
    data, op = CASES[case]
    stats = benchmark.pedantic(
        lambda: mpc.run_local(_program, parties=parties, args=(data, op), comparison=comparison, comparison_bits=bits)[0],
        rounds=3,
        warmup_rounds=1,
    )
    benchmark.extra_info.update(stats)
    if case == "relu":
        assert stats["rounds"] == (2 if comparison == "fss" else 6)
        assert stats["bytes_sent"] <= 32 * (parties - 1) * data.size
