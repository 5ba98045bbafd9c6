"""Print the ring-kernel table: ring matmul / conv2d against float64 BLAS and torch, ResNet-18 shapes.

    OMP_WAIT_POLICY=PASSIVE OPENBLAS_THREAD_TIMEOUT=4 python benchmarks/kernels_table.py [--repeat 5]

For a single-core comparison (steadier on a machine shared with other work), also set
``OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1``.

Every ratio is measured in this one run: medians of ``--repeat`` runs after a warm-up call,
the candidates of one row measured alternately so that load from other processes on the
machine hits them alike.  Matmul shapes are M x K x N, the im2col products of ResNet-18 at
224x224; the float64 conv reference is im2col (numpy) + BLAS, the same algorithm as the ring
path with floating-point arithmetic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402

from mpc import kernels  # noqa: E402

MATMUL_SHAPES = [(64, 147, 12544), (64, 576, 3136), (256, 2304, 196), (512, 4608, 49)]

# name, (N, C, H, W), (O, C, kh, kw), conv options
CONV_LAYERS = [
    ("7x7/2, 3->64 @224", (1, 3, 224, 224), (64, 3, 7, 7), {"stride": 2, "padding": 3}),
    ("3x3, 64->64 @56", (1, 64, 56, 56), (64, 64, 3, 3), {"padding": 1}),
    ("3x3, 256->256 @14", (1, 256, 14, 14), (256, 256, 3, 3), {"padding": 1}),
    ("3x3, 512->512 @7", (1, 512, 7, 7), (512, 512, 3, 3), {"padding": 1}),
]


def ring_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform ring elements (benchmark data, not secret material)."""
    info = np.iinfo(np.int64)
    return rng.integers(info.min, info.max, size=shape, dtype=np.int64)


def conv2d_float64_im2col(x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0) -> np.ndarray:
    """float64 conv2d (groups=1, dilation=1) as numpy im2col + one BLAS product."""
    n, c, _, _ = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    h_out, w_out = windows.shape[2:4]
    # (C, kh, kw, N, Hout, Wout): rows match the flattened weight's columns.
    cols = windows.transpose(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * h_out * w_out)
    out = w.reshape(o, -1) @ cols
    return out.reshape(o, n, h_out, w_out).transpose(1, 0, 2, 3)


def median_times(candidates: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds per candidate; one warm-up call each, then rounds over all candidates."""
    for fn in candidates.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def matmul_rows(repeat: int, rng: np.random.Generator) -> list[str]:
    rows = [
        "| matmul M x K x N | float64 BLAS ms | ring kernel ms | ring / BLAS | torch int64 ms |",
        "|---|---|---|---|---|",
    ]
    for m, k, n in MATMUL_SHAPES:
        a, b = ring_values(rng, (m, k)), ring_values(rng, (k, n))
        af, bf = rng.uniform(-1, 1, (m, k)), rng.uniform(-1, 1, (k, n))
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        t = median_times(
            {"blas": lambda: af @ bf, "ring": lambda: kernels.ring_matmul(a, b)}, repeat
        )
        # torch int64 is far slower (no vectorised int64 GEMM); fewer runs keep the table quick.
        t_torch = median_times({"torch": lambda: ta @ tb}, max(1, repeat // 2))["torch"]
        rows.append(
            f"| {m}x{k}x{n} | {t['blas'] * 1e3:.2f} | {t['ring'] * 1e3:.2f} | "
            f"{t['ring'] / t['blas']:.2f} | {t_torch * 1e3:.1f} |"
        )
    return rows


def conv_rows(repeat: int, rng: np.random.Generator) -> list[str]:
    rows = [
        "| conv2d layer | float64 im2col+BLAS ms | ring im2col+kernel ms | ring / BLAS | torch int64 ms | torch float32 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, x_shape, w_shape, options in CONV_LAYERS:
        x, w = ring_values(rng, x_shape), ring_values(rng, w_shape)
        xf, wf = rng.uniform(-1, 1, x_shape), rng.uniform(-1, 1, w_shape)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        tx32, tw32 = torch.from_numpy(xf.astype(np.float32)), torch.from_numpy(wf.astype(np.float32))
        conv = torch.nn.functional.conv2d
        t = median_times(
            {
                "blas": lambda: conv2d_float64_im2col(xf, wf, **options),
                "ring": lambda: kernels.ring_conv2d(x, w, **options),
                "torch32": lambda: conv(tx32, tw32, **options),
            },
            repeat,
        )
        t_torch = median_times({"torch": lambda: conv(tx, tw, **options)}, max(1, repeat // 2))["torch"]
        rows.append(
            f"| {name} | {t['blas'] * 1e3:.2f} | {t['ring'] * 1e3:.2f} | {t['ring'] / t['blas']:.2f} | "
            f"{t_torch * 1e3:.1f} | {t['torch32'] * 1e3:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kernels.warmup()
    rng = np.random.default_rng(0)
    variant = "split-halves (AVX2)" if kernels._SPLIT_HALVES else "plain 64-bit (AVX-512DQ)"
    print(
        f"ring kernel: {variant}; threads: numba {numba.get_num_threads()}, torch {torch.get_num_threads()}, "
        f"OpenBLAS {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}; cores: {os.cpu_count()}\n"
    )
    print("\n".join(matmul_rows(args.repeat, rng)))
    print()
    print("\n".join(conv_rows(args.repeat, rng)))


if __name__ == "__main__":
    main()
