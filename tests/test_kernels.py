"""Bit-exactness of the ring kernels (mpc.kernels) against independent int64 references.

Every kernel result must equal numpy's int64 arithmetic, which wraps modulo 2^64.  Inputs are
full-range random int64 values (test data, not secret material), so every product overflows
and the wrap-around is exercised; the convolution is also checked against torch's float64
conv2d on small integers, where float64 is exact.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from mpc import kernels
from mpc.kernels import (
    fused_mul_add,
    fused_mul_add_shift,
    ring_conv2d,
    ring_matmul,
    ring_matmul_nt,
)

INT64 = np.iinfo(np.int64)


def ring(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(INT64.min, INT64.max, size=shape, dtype=np.int64, endpoint=True)


@pytest.fixture(params=["split", "plain"])
def kernel_variant(request, monkeypatch):
    """Run a test with each matrix-product micro-kernel, whichever one this host would pick.

    The plain 64-bit kernel is the fast one with AVX-512DQ, the split one on AVX2; CI may run
    on either kind of CPU, so both are checked everywhere.
    """
    monkeypatch.setattr(kernels, "_SPLIT_HALVES", request.param == "split")
    return request.param


@pytest.fixture
def no_small_fallback(monkeypatch):
    """Send even tiny products through the numba kernel instead of numpy's ``@``."""
    monkeypatch.setattr(kernels, "_SMALL_PRODUCT", 0)


# --------------------------------------------------------------------------------------------
# Matrix products
# --------------------------------------------------------------------------------------------

ODD_SIZES = [1, 3, 5, 17, 63, 65, 129]


@pytest.mark.parametrize("m", ODD_SIZES)
def test_matmul_odd_shapes(rng, kernel_variant, no_small_fallback, m):
    for k, n in [(1, 65), (17, 3), (63, 129), (129, 5), (65, 63)]:
        a, b = ring(rng, m, k), ring(rng, k, n)
        np.testing.assert_array_equal(ring_matmul(a, b), a @ b, err_msg=f"{m}x{k}x{n}")


@pytest.mark.parametrize(
    "m, k, n",
    [
        (64, 147, 700),  # stem-like: K not a multiple of 4, b transposed
        (256, 300, 49),  # N < K: a used in place, result transposed
        (130, 1100, 67),  # K spans several cache blocks, ragged edges everywhere
        (7, 2048, 9),
    ],
)
def test_matmul_kernel_shapes(rng, kernel_variant, no_small_fallback, m, k, n):
    a, b = ring(rng, m, k), ring(rng, k, n)
    result = ring_matmul(a, b)
    assert result.dtype == np.int64 and result.flags.c_contiguous
    np.testing.assert_array_equal(result, a @ b)


def test_matmul_single_thread(rng):
    a, b = ring(rng, 70, 90), ring(rng, 90, 130)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        np.testing.assert_array_equal(ring_matmul(a, b), a @ b)
    finally:
        numba.set_num_threads(threads)


def test_matmul_small_uses_numpy_path(rng):
    a, b = ring(rng, 3, 4), ring(rng, 4, 5)
    np.testing.assert_array_equal(ring_matmul(a, b), a @ b)


def test_matmul_non_contiguous_operands(rng):
    a = ring(rng, 90, 80)[::2, 1:]  # (45, 79), strided
    b = ring(rng, 100, 79).T  # (79, 100), transposed view
    np.testing.assert_array_equal(ring_matmul(a, b), a @ b)


@pytest.mark.parametrize(
    "a_shape, b_shape",
    [
        ((4, 30, 40), (40, 50)),
        ((2, 1, 30, 40), (3, 40, 50)),  # broadcast batch dimensions
        ((40,), (40, 50)),
        ((3, 30, 40), (40,)),
        ((700,), (700,)),
    ],
)
def test_matmul_batched_and_vectors(rng, no_small_fallback, a_shape, b_shape):
    a, b = ring(rng, *a_shape), ring(rng, *b_shape)
    expected = np.asarray(a @ b)
    result = ring_matmul(a, b)
    assert result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)


def test_matmul_reduces_unsigned_input_mod_2_64(rng):
    a, b = ring(rng, 40, 50), ring(rng, 50, 60)
    np.testing.assert_array_equal(ring_matmul(a.view(np.uint64), b), a @ b)


def test_matmul_rejects_floats_and_mismatched_shapes():
    with pytest.raises(TypeError):
        ring_matmul(np.ones((2, 2)), np.ones((2, 2), dtype=np.int64))
    with pytest.raises(ValueError):
        ring_matmul(np.ones((2, 3), dtype=np.int64), np.ones((2, 3), dtype=np.int64))


@pytest.mark.parametrize("m, k, n", [(64, 147, 300), (600, 200, 8), (5, 129, 17)])
def test_matmul_nt(rng, kernel_variant, no_small_fallback, m, k, n):
    a, bt = ring(rng, m, k), ring(rng, n, k)
    np.testing.assert_array_equal(ring_matmul_nt(a, bt), a @ bt.T)


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d_reference(x, w, stride=1, padding=0, dilation=1, groups=1):
    """Direct convolution in uint64 (defined wrap-around), one kernel tap at a time."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x.view(np.uint64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    wu = w.view(np.uint64)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, ho, wo), dtype=np.uint64)
    og = o // groups
    for g in range(groups):
        xs = xp[:, g * cg : (g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", patch, wu[g * og : (g + 1) * og, :, i, j])
    return out.view(np.int64)


CONV_CASES = [
    # x shape, w shape, options
    ((1, 3, 32, 32), (64, 3, 7, 7), {"stride": 2, "padding": 3}),  # ResNet-18 stem, small image
    ((2, 5, 11, 13), (6, 5, 3, 3), {"padding": 1}),
    ((1, 4, 12, 12), (8, 4, 3, 3), {"stride": 2, "padding": 1}),
    ((1, 3, 10, 9), (4, 3, 3, 3), {"dilation": 2, "padding": 2}),
    ((2, 4, 9, 10), (6, 2, 3, 2), {"groups": 2, "stride": (2, 1), "padding": (1, 0)}),
    ((1, 6, 8, 8), (6, 1, 3, 3), {"groups": 6, "padding": 1}),  # depthwise
    ((1, 3, 9, 14), (5, 3, 1, 5), {"padding": (0, 3), "dilation": (1, 2)}),  # non-square
    ((1, 64, 4, 4), (32, 64, 3, 3), {"padding": 1}),  # fewer patches than K: patches packed
    ((1, 2, 5, 5), (3, 2, 5, 5), {}),  # kernel covers the whole input
]


@pytest.mark.parametrize("x_shape, w_shape, options", CONV_CASES)
def test_conv2d_matches_torch_float64(rng, x_shape, w_shape, options):
    # |sum| <= C*kh*kw*2^10*2^10 < 2^53: exact in float64.
    x = rng.integers(-1024, 1024, size=x_shape, dtype=np.int64)
    w = rng.integers(-1024, 1024, size=w_shape, dtype=np.int64)
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)), **options
    ).numpy()
    result = ring_conv2d(x, w, **options)
    assert result.dtype == np.int64 and result.shape == expected.shape
    np.testing.assert_array_equal(result, expected.astype(np.int64))


@pytest.mark.parametrize("x_shape, w_shape, options", CONV_CASES)
def test_conv2d_full_range_wraps(rng, kernel_variant, x_shape, w_shape, options):
    x, w = ring(rng, *x_shape), ring(rng, *w_shape)
    np.testing.assert_array_equal(ring_conv2d(x, w, **options), conv2d_reference(x, w, **options))


def test_conv2d_rejects_inconsistent_shapes():
    x = np.zeros((1, 4, 8, 8), dtype=np.int64)
    with pytest.raises(ValueError):
        ring_conv2d(x, np.zeros((6, 3, 3, 3), dtype=np.int64))
    with pytest.raises(ValueError):
        ring_conv2d(x, np.zeros((6, 2, 3, 3), dtype=np.int64), groups=4)  # 6 % 4 != 0
    with pytest.raises(ValueError):
        ring_conv2d(x, np.zeros((6, 4, 9, 9), dtype=np.int64))


# --------------------------------------------------------------------------------------------
# Fused elementwise operations
# --------------------------------------------------------------------------------------------


def test_fused_mul_add(rng):
    z, x, y = (ring(rng, 3, 1001) for _ in range(3))
    np.testing.assert_array_equal(fused_mul_add(z, x, y), z + x * y)


def test_fused_mul_add_in_place(rng):
    z, x, y = (ring(rng, 4097) for _ in range(3))
    expected = z + x * y
    result = fused_mul_add(z, x, y, out=z)
    assert result is z
    np.testing.assert_array_equal(z, expected)


@pytest.mark.parametrize("shift", [0, 1, 13, 63])
def test_fused_mul_add_shift_is_arithmetic(rng, shift):
    z, x, y = (ring(rng, 2, 5, 99) for _ in range(3))
    np.testing.assert_array_equal(fused_mul_add_shift(z, x, y, shift), (z + x * y) >> shift)


def test_fused_mul_add_shift_into_buffer_and_strided_input(rng):
    z, x, y = ring(rng, 50, 40), ring(rng, 40, 50).T, ring(rng, 50, 40)
    out = np.empty((50, 40), dtype=np.int64)
    assert fused_mul_add_shift(z, x, y, 16, out=out) is out
    np.testing.assert_array_equal(out, (z + x * y) >> 16)


def test_fused_ops_validate_arguments(rng):
    a = ring(rng, 10)
    with pytest.raises(ValueError):
        fused_mul_add(a, a, ring(rng, 11))
    with pytest.raises(ValueError):
        fused_mul_add_shift(a, a, a, 64)
    with pytest.raises(ValueError):
        fused_mul_add(a, a, a, out=np.empty(10, dtype=np.int32))


def test_warmup_runs():
    kernels.warmup()
