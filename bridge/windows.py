"""Sliding windows and pooling geometry shared by the plaintext and the encrypted executors.

Everything here acts on plain numpy arrays of any dtype — floats in the
plaintext executor, int64 ring shares in the encrypted one — so the two
executors agree on geometry by construction.  Window sums are linear, hence
exact on additive shares.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["pool_windows", "window_sum", "avg_pool_divisors", "adaptive_bins", "adaptive_sum", "adaptive_counts"]


def pool_windows(
    x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], fill: float | int = 0
) -> np.ndarray:
    """A read-only (N, C, Ho, Wo, kh, kw) view of every pooling window of an NCHW array."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="constant", constant_values=fill)
    if x.shape[2] < kh or x.shape[3] < kw:
        raise ValueError(f"pooling kernel {kernel} is larger than the padded input {x.shape[2:]}")
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]


def window_sum(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
    """Sum of each pooling window (zero padding); exact on int64 shares."""
    return pool_windows(x, kernel, stride, padding, 0).sum(axis=(4, 5), dtype=x.dtype)


def avg_pool_divisors(
    in_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    count_include_pad: bool, divisor: int | None,
) -> np.ndarray:
    """Each output position's divisor as ``torch.nn.functional.avg_pool2d`` uses it, shape (Ho, Wo)."""
    ones = np.ones((1, 1) + tuple(in_hw), dtype=np.int64)
    counts = window_sum(ones, kernel, stride, padding)[0, 0]
    if divisor is not None:
        return np.full(counts.shape, divisor, dtype=np.int64)
    if count_include_pad:
        return np.full(counts.shape, kernel[0] * kernel[1], dtype=np.int64)
    return counts


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling bins: [floor(i*size/out), ceil((i+1)*size/out))."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def adaptive_sum(x: np.ndarray, output: tuple[int, int]) -> np.ndarray:
    """Sum over each adaptive-pooling bin of an NCHW array (bins may overlap or repeat)."""
    rows = adaptive_bins(x.shape[2], output[0])
    cols = adaptive_bins(x.shape[3], output[1])
    # cumulative sums turn every bin into four lookups; exact in the ring (wrapping adds)
    c = np.zeros((x.shape[0], x.shape[1], x.shape[2] + 1, x.shape[3] + 1), dtype=x.dtype)
    c[:, :, 1:, 1:] = x.cumsum(axis=2, dtype=x.dtype).cumsum(axis=3, dtype=x.dtype)
    r0 = np.array([a for a, _ in rows]); r1 = np.array([b for _, b in rows])
    c0 = np.array([a for a, _ in cols]); c1 = np.array([b for _, b in cols])
    return (c[:, :, r1][:, :, :, c1] - c[:, :, r0][:, :, :, c1]
            - c[:, :, r1][:, :, :, c0] + c[:, :, r0][:, :, :, c0])


def adaptive_counts(in_hw: tuple[int, int], output: tuple[int, int]) -> np.ndarray:
    """Number of inputs in each adaptive-pooling bin, shape (oh, ow)."""
    rows = adaptive_bins(in_hw[0], output[0])
    cols = adaptive_bins(in_hw[1], output[1])
    return np.array([[(b - a) * (d - c) for c, d in cols] for a, b in rows], dtype=np.int64)
