"""pytest-benchmark cases for the ring kernels against floating-point and torch baselines.

    OMP_WAIT_POLICY=PASSIVE OPENBLAS_THREAD_TIMEOUT=4 python -m pytest benchmarks/bench_kernels.py --benchmark-only

Cases are grouped per shape, so each group's table compares the ring kernel with float64
BLAS (the target: within a small factor) and with torch.  ``benchmarks/kernels_table.py``
prints the same comparison as one markdown table.
"""

import os

# Before numpy/torch load their thread pools: see mpc/kernels.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from kernels_table import CONV_LAYERS, MATMUL_SHAPES, conv2d_float64_im2col, ring_values  # noqa: E402

from mpc import kernels  # noqa: E402

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    kernels.warmup()


@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["ring", "float64_blas", "torch_int64"])
def test_matmul(benchmark, shape, impl):
    m, k, n = shape
    benchmark.group = f"matmul {m}x{k}x{n}"
    if impl == "ring":
        a, b = ring_values(RNG, (m, k)), ring_values(RNG, (k, n))
        benchmark(kernels.ring_matmul, a, b)
    elif impl == "float64_blas":
        a, b = RNG.uniform(-1, 1, (m, k)), RNG.uniform(-1, 1, (k, n))
        benchmark(np.matmul, a, b)
    else:
        a, b = (torch.from_numpy(ring_values(RNG, s)) for s in ((m, k), (k, n)))
        benchmark(torch.matmul, a, b)


@pytest.mark.parametrize("layer", CONV_LAYERS, ids=lambda layer: layer[0])
@pytest.mark.parametrize("impl", ["ring", "float64_im2col_blas", "torch_float32"])
def test_conv2d(benchmark, layer, impl):
    name, x_shape, w_shape, options = layer
    benchmark.group = f"conv2d {name}"
    if impl == "ring":
        x, w = ring_values(RNG, x_shape), ring_values(RNG, w_shape)
        benchmark(lambda: kernels.ring_conv2d(x, w, **options))
    elif impl == "float64_im2col_blas":
        x, w = RNG.uniform(-1, 1, x_shape), RNG.uniform(-1, 1, w_shape)
        benchmark(lambda: conv2d_float64_im2col(x, w, **options))
    else:
        x, w = (torch.from_numpy(RNG.uniform(-1, 1, s).astype(np.float32)) for s in (x_shape, w_shape))
        benchmark(lambda: torch.nn.functional.conv2d(x, w, **options))
