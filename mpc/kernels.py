"""Compute kernels for the ring Z_2^64: matrix products, 2-D convolution, fused elementwise ops.

Ring elements are stored as ``int64`` arrays; every sum and product wraps modulo 2^64, so
results are bit-identical to numpy's int64 arithmetic (``a @ b`` on int64 wraps the same way).
Inside the jitted code all arithmetic runs on ``uint64`` views, because signed overflow is
undefined in LLVM while unsigned wrap-around is defined.

Two matrix-product micro-kernels exist; the one that suits the host CPU is picked at import:

* CPUs with AVX-512DQ multiply 64-bit lanes in one instruction (``vpmullq``), so the plain
  kernel (4x4 output tile of 64-bit multiply-adds) is the fast one there.
* AVX2-only CPUs (e.g. AMD Zen 3) have no 64-bit vector multiply; LLVM emulates it with three
  32-bit multiplies plus shifts.  The "split-halves" kernel instead uses
  ``a*b mod 2^64 = al*bl + 2^32 * (al*bh + ah*bl mod 2^32)`` (``al``/``ah``: low/high 32-bit
  halves) and accumulates the two parts in separate loops, each a single multiply-add per
  vector: ``al*bl`` with ``vpmuludq`` (4 lanes of 32x32->64) and both cross products at once
  with ``vpmulld`` (8 lanes of 32x32->32) against a left operand whose halves are swapped.

Both read the right operand as (N, K) rows, i.e. the layout im2col produces, so every output
element is a dot product along contiguous memory.
"""

from __future__ import annotations

__all__ = [
    "ring_matmul",
    "ring_matmul_nt",
    "ring_conv2d",
    "fused_mul_add",
    "fused_mul_add_shift",
    "warmup",
]

import os

# Both must be in the environment before numpy (OpenBLAS) and numba/torch (OpenMP) load their
# thread pools, so they are set here rather than by callers.  On a 2-core host the pools
# otherwise busy-wait after every call and steal the cores from each other (measured ~2x
# slowdowns when BLAS and ring kernels alternate).  setdefault keeps any explicit user choice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from collections.abc import Sequence  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import binding as _llvm  # noqa: E402
from numba import njit, prange  # noqa: E402

_U32_MASK = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)

# Below this many multiply-adds numpy's int64 ``@`` is faster: the kernel path's fixed cost
# (packing, waking the thread pool) is ~50-70 us, the measured crossover ~1.3e5 on 2 cores.
_SMALL_PRODUCT = 131_072

# K is zero-padded to a multiple of 4 so the split kernel's 32-bit loop (2K long) is a whole
# number of 8-lane vectors: no scalar remainder loop, which cost ~15% at K=147.
_K_ALIGN = 4

# Output tiles are this many left-operand rows by 4 right-operand rows.  Each of the split
# kernel's loops holds a vector accumulator per output plus the loaded rows in AVX2's 16
# registers: 2x4 (8 + 6) fits, 4x4 spills (3x3 measured the same as 2x4, but channel counts are
# even far more often than multiples of 3).  The plain kernel targets AVX-512's 32 registers.
_SPLIT_TILE_ROWS = 2
_PLAIN_TILE_ROWS = 4

# Cache blocking: a kb-long slice of a tile's right-operand rows stays in L1 while the
# macro-block's left-operand rows (mb * kb * 8 bytes) come from L2.
_KB = 512
_MB = 64
_NB = 64


def _host_has_vector_mul64() -> bool:
    """Whether the host CPU has AVX-512DQ (a 64-bit lane multiply instruction)."""
    features = _llvm.get_host_cpu_features()
    return bool(features.get("avx512dq", False))


_SPLIT_HALVES = not _host_has_vector_mul64()


# --------------------------------------------------------------------------------------------
# Matrix-product micro-kernels
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _split_tile_2x4(xl0, xl1, xh0, xh1, yl, yh):
    """One 2x4 output tile of the split kernel over a slice of K.

    xl0, xl1: two left rows as uint64 whose low 32 bits are al (see ``_split_matmul``);
    xh0, xh1: the same rows as uint32 pairs (ah, al); yl: four right rows as uint64;
    yh: the same four rows as uint32 pairs (bl, bh).  Returns the eight sums
    sum_k al*bl + 2^32 * (al*bh + ah*bl) mod 2^64, row-major.
    """
    y0, y1, y2, y3 = yl
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.uint64(0)
    for k in range(xl0.shape[0]):
        # vpmuludq multiplies the low 32 bits of each 64-bit lane: the masks cost nothing.
        a0 = xl0[k] & _U32_MASK
        a1 = xl1[k] & _U32_MASK
        b0 = y0[k] & _U32_MASK
        b1 = y1[k] & _U32_MASK
        b2 = y2[k] & _U32_MASK
        b3 = y3[k] & _U32_MASK
        s00 += a0 * b0
        s01 += a0 * b1
        s02 += a0 * b2
        s03 += a0 * b3
        s10 += a1 * b0
        s11 += a1 * b1
        s12 += a1 * b2
        s13 += a1 * b3

    h0, h1, h2, h3 = yh
    # Lane pairs (ah*bl, al*bh) are summed together at the end; numba widens uint32
    # arithmetic to 64 bits, and truncating every step lets LLVM keep 8 lanes per vector.
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = np.uint32(0)
    for t in range(xh0.shape[0]):
        a0 = xh0[t]
        a1 = xh1[t]
        b0 = h0[t]
        b1 = h1[t]
        b2 = h2[t]
        b3 = h3[t]
        c00 = np.uint32(c00 + a0 * b0)
        c01 = np.uint32(c01 + a0 * b1)
        c02 = np.uint32(c02 + a0 * b2)
        c03 = np.uint32(c03 + a0 * b3)
        c10 = np.uint32(c10 + a1 * b0)
        c11 = np.uint32(c11 + a1 * b1)
        c12 = np.uint32(c12 + a1 * b2)
        c13 = np.uint32(c13 + a1 * b3)

    return (
        s00 + (np.uint64(c00) << _SHIFT32),
        s01 + (np.uint64(c01) << _SHIFT32),
        s02 + (np.uint64(c02) << _SHIFT32),
        s03 + (np.uint64(c03) << _SHIFT32),
        s10 + (np.uint64(c10) << _SHIFT32),
        s11 + (np.uint64(c11) << _SHIFT32),
        s12 + (np.uint64(c12) << _SHIFT32),
        s13 + (np.uint64(c13) << _SHIFT32),
    )


@njit(cache=True, inline="always")
def _add_tile(out, i0, j0, rows, values):
    """out[i0:i0+rows, j0:j0+4] += values (row-major), dropping columns past out's last."""
    n = out.shape[1]
    if j0 + 4 <= n:
        for di in range(rows):
            out[i0 + di, j0] += values[4 * di]
            out[i0 + di, j0 + 1] += values[4 * di + 1]
            out[i0 + di, j0 + 2] += values[4 * di + 2]
            out[i0 + di, j0 + 3] += values[4 * di + 3]
    else:
        for di in range(rows):
            for dj in range(n - j0):
                out[i0 + di, j0 + dj] += values[4 * di + dj]


@njit(parallel=True, cache=True, nogil=True)
def _split_matmul(xr, xs, y, out, mb, nb, kb):
    """out[i, j] += sum_k x[i, k] * y[j, k] mod 2^64 for zero-initialised ``out`` (split kernel).

    xr: (M, K) left rows with 32-bit halves swapped, M even, so an 8-lane 32-bit product
    with ``y`` gives (ah*bl, al*bh) per 64-bit lane.  xs: ``xr`` viewed 4 bytes further on,
    whose 64-bit lanes carry al in their low half: a 32x32->64 product with ``y`` gives
    al*bl without a shift per load.  y: (N, K) right rows.  Work is split into mb x nb
    macro-blocks, one per parallel iteration, each swept in kb-long slices of K; a tile's
    four right rows stay in L1 while the block's left rows stream from L2.
    """
    m, kdim = xr.shape
    n = y.shape[0]
    xr32 = xr.view(np.uint32)
    y32 = y.view(np.uint32)
    blocks_m = (m + mb - 1) // mb
    blocks_n = (n + nb - 1) // nb
    for block in prange(blocks_m * blocks_n):
        i_lo = (block % blocks_m) * mb
        j_lo = (block // blocks_m) * nb
        i_hi = min(i_lo + mb, m)
        j_hi = min(j_lo + nb, n)
        for k0 in range(0, kdim, kb):
            k1 = min(k0 + kb, kdim)
            for j0 in range(j_lo, j_hi, 4):
                # Past the last row, repeat it; _add_tile drops those columns.
                j1, j2, j3 = min(j0 + 1, n - 1), min(j0 + 2, n - 1), min(j0 + 3, n - 1)
                yl = (y[j0, k0:k1], y[j1, k0:k1], y[j2, k0:k1], y[j3, k0:k1])
                yh = (y32[j0, 2 * k0 : 2 * k1], y32[j1, 2 * k0 : 2 * k1],
                      y32[j2, 2 * k0 : 2 * k1], y32[j3, 2 * k0 : 2 * k1])
                for i0 in range(i_lo, i_hi, 2):
                    r = _split_tile_2x4(
                        xs[i0, k0:k1], xs[i0 + 1, k0:k1],
                        xr32[i0, 2 * k0 : 2 * k1], xr32[i0 + 1, 2 * k0 : 2 * k1], yl, yh,
                    )
                    _add_tile(out, i0, j0, 2, r)


@njit(cache=True, inline="always")
def _plain_tile_4x4(x0, x1, x2, x3, yl):
    """One 4x4 output tile of the plain kernel: sums of x_r[k] * y_c[k] mod 2^64, row-major."""
    y0, y1, y2, y3 = yl
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.uint64(0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.uint64(0)
    for k in range(x0.shape[0]):
        a0 = x0[k]
        a1 = x1[k]
        a2 = x2[k]
        a3 = x3[k]
        b0 = y0[k]
        b1 = y1[k]
        b2 = y2[k]
        b3 = y3[k]
        s00 += a0 * b0
        s01 += a0 * b1
        s02 += a0 * b2
        s03 += a0 * b3
        s10 += a1 * b0
        s11 += a1 * b1
        s12 += a1 * b2
        s13 += a1 * b3
        s20 += a2 * b0
        s21 += a2 * b1
        s22 += a2 * b2
        s23 += a2 * b3
        s30 += a3 * b0
        s31 += a3 * b1
        s32 += a3 * b2
        s33 += a3 * b3
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


@njit(parallel=True, cache=True, nogil=True)
def _plain_matmul(x, y, out, mb, nb, kb):
    """out[i, j] += sum_k x[i, k] * y[j, k] mod 2^64 for zero-initialised ``out`` (plain kernel).

    x: (M, K) left rows, M divisible by 4; y: (N, K) right rows.  Blocking as in
    ``_split_matmul``.
    """
    m, kdim = x.shape
    n = y.shape[0]
    blocks_m = (m + mb - 1) // mb
    blocks_n = (n + nb - 1) // nb
    for block in prange(blocks_m * blocks_n):
        i_lo = (block % blocks_m) * mb
        j_lo = (block // blocks_m) * nb
        i_hi = min(i_lo + mb, m)
        j_hi = min(j_lo + nb, n)
        for k0 in range(0, kdim, kb):
            k1 = min(k0 + kb, kdim)
            for j0 in range(j_lo, j_hi, 4):
                j1, j2, j3 = min(j0 + 1, n - 1), min(j0 + 2, n - 1), min(j0 + 3, n - 1)
                yl = (y[j0, k0:k1], y[j1, k0:k1], y[j2, k0:k1], y[j3, k0:k1])
                for i0 in range(i_lo, i_hi, 4):
                    r = _plain_tile_4x4(
                        x[i0, k0:k1], x[i0 + 1, k0:k1], x[i0 + 2, k0:k1], x[i0 + 3, k0:k1], yl
                    )
                    _add_tile(out, i0, j0, 4, r)


# --------------------------------------------------------------------------------------------
# Operand packing and the product of row-major operands
# --------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, nogil=True)
def _pack_rows(src, dst, swap_halves):
    """dst[j, k] = src[j, k] (32-bit halves swapped if ``swap_halves``), zero outside ``src``.

    ``src`` may be any strided 2-D view, e.g. ``b.T`` of a (K, N) matrix ``b``.  Copying in
    blocks of 128 rows x 8 columns writes whole 64-byte lines of ``dst`` while, for ``b.T``,
    reading 1 KiB runs of 8 rows of ``b``: 1.6x faster than square 32x64 blocks (and than
    numpy's own transposing copy) on the stem's 147x12544 operand.
    """
    rows, cols = src.shape
    dst_rows = dst.shape[0]
    for g in prange((dst_rows + 127) // 128):
        j_lo = g * 128
        j_hi = min(j_lo + 128, rows)
        for k_lo in range(0, cols, 8):
            k_hi = min(k_lo + 8, cols)
            for j in range(j_lo, j_hi):
                for k in range(k_lo, k_hi):
                    v = src[j, k]
                    if swap_halves:
                        v = (v >> _SHIFT32) | (v << _SHIFT32)
                    dst[j, k] = v
        for j in range(j_lo, j_hi):
            dst[j, cols:] = 0
        for j in range(max(j_lo, rows), min(j_lo + 128, dst_rows)):
            dst[j, :] = 0


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _tile_rows() -> int:
    return _SPLIT_TILE_ROWS if _SPLIT_HALVES else _PLAIN_TILE_ROWS


def _block_sizes(m: int, n: int, tile_rows: int) -> tuple[int, int]:
    """Macro-block sizes, shrunk until every thread gets at least two blocks."""
    threads = numba.get_num_threads()
    mb, nb = min(_MB, m), min(_NB, _round_up(n, 4))
    while -(-m // mb) * -(-n // nb) < 2 * threads:
        if mb >= nb and mb > tile_rows:
            mb = _round_up(mb // 2, tile_rows)
        elif nb > 4:
            nb = _round_up(nb // 2, 4)
        else:
            break
    return mb, nb


class _LeftOperand:
    """Rows of a product's left operand in the kernel's layout, padded with zero rows.

    For the split kernel the rows hold values with their 32-bit halves swapped, and the
    buffer has one spare element so that the view 4 bytes further on stays inside it.  That
    view's 64-bit elements sit at 4-byte offsets, which x86-64 and AArch64 load without
    faulting (numba does not track alignment; its vector loads are unaligned ones).
    """

    def __init__(self, m: int, k: int) -> None:
        self.m = m
        rows = _round_up(m, _tile_rows())
        self._buffer = np.empty(rows * k + 1, dtype=np.uint64)
        self._buffer[-1] = 0
        self.rows = self._buffer[:-1].reshape(rows, k)

    @classmethod
    def pack(cls, src: np.ndarray, k: int) -> _LeftOperand:
        """Pack ``src`` (M, K) int64, any strides, with columns zero-padded to ``k``."""
        operand = cls(src.shape[0], k)
        _pack_rows(src.view(np.uint64), operand.rows, _SPLIT_HALVES)
        return operand

    def times_rows(self, right: np.ndarray) -> np.ndarray:
        """``left @ right.T`` over Z_2^64 as int64 (M, N).

        ``right``: uint64 (N, K) C-contiguous rows with K equal to this operand's K.
        """
        rows, k = self.rows.shape
        n = right.shape[0]
        out = np.zeros((rows, n), dtype=np.uint64)
        mb, nb = _block_sizes(rows, n, _tile_rows())
        # Hand out macro-blocks one at a time rather than in equal static shares, so a thread
        # that loses its core to another process (other parties, BLAS) does not hold up the
        # rest; even the smallest block (one tile over all of K) outweighs a scheduling step.
        with numba.parallel_chunksize(1):
            if _SPLIT_HALVES:
                shifted = self._buffer.view(np.uint8)[4 : 4 + 8 * rows * k].view(np.uint64)
                _split_matmul(self.rows, shifted.reshape(rows, k), right, out, mb, nb, _KB)
            else:
                _plain_matmul(self.rows, right, out, mb, nb, _KB)
        return out[: self.m].view(np.int64)


def _row_major(a: np.ndarray) -> np.ndarray:
    """``a`` (int64) as a C-contiguous uint64 array, copying only when needed."""
    return np.ascontiguousarray(a).view(np.uint64)


def _transposed_rows(b: np.ndarray) -> np.ndarray:
    """The rows of ``b.T`` for b (K, N) int64: uint64 (N, K'), K' = K rounded up to _K_ALIGN."""
    k, n = b.shape
    rows = np.empty((n, _round_up(k, _K_ALIGN)), dtype=np.uint64)
    _pack_rows(b.T.view(np.uint64), rows, False)
    return rows


# --------------------------------------------------------------------------------------------
# Public matrix products
# --------------------------------------------------------------------------------------------


def _as_ring(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` as an int64 array; integer inputs are reduced mod 2^64, others are rejected."""
    a = np.asarray(a)
    if a.dtype == np.int64:
        return a
    if a.dtype.kind not in "biu":
        raise TypeError(f"{name} must hold ring elements (integers), got dtype {a.dtype}")
    return a.astype(np.int64)


def _matmul_2d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m, k = a.shape
    n = b.shape[1]
    if m * n * k < _SMALL_PRODUCT:
        return a @ b
    # The kernel wants both operands as rows along K.  Either b is transposed (N*K copies)
    # and a packed (M*K), or b is packed, a used in place and the result transposed (M*N).
    if n < k:
        return np.ascontiguousarray(_LeftOperand.pack(b.T, k).times_rows(_row_major(a)).T)
    right = _transposed_rows(b)
    return _LeftOperand.pack(a, right.shape[1]).times_rows(right)


def ring_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product over Z_2^64 with numpy ``@`` semantics.

    Args:
        a: int64 array, shape (..., M, K) or (K,).
        b: int64 array, shape (..., K, N) or (K,).  Leading batch dimensions broadcast as in
            ``np.matmul``; a 1-D operand gets a dimension prepended (``a``) or appended
            (``b``) that is removed again from the result.

    Returns:
        int64 array of shape (..., M, N), equal to ``a @ b`` computed in int64 with
        wrap-around; a 0-d array when both operands are 1-D.
    """
    a = _as_ring(a, "a")
    b = _as_ring(b, "b")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("ring_matmul: operands must be at least 1-D")
    a2 = a[np.newaxis, :] if a.ndim == 1 else a
    b2 = b[:, np.newaxis] if b.ndim == 1 else b
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(f"ring_matmul: shapes {a.shape} and {b.shape} do not align")

    if a2.ndim == 2 and b2.ndim == 2:
        result = _matmul_2d(a2, b2)
    else:
        batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        a_b = np.broadcast_to(a2, batch + a2.shape[-2:])
        b_b = np.broadcast_to(b2, batch + b2.shape[-2:])
        result = np.empty(batch + (a2.shape[-2], b2.shape[-1]), dtype=np.int64)
        for index in np.ndindex(*batch):
            result[index] = _matmul_2d(a_b[index], b_b[index])

    if b.ndim == 1:
        result = result[..., 0]
    if a.ndim == 1:
        result = result[..., 0, :] if b.ndim > 1 else result[..., 0]
    return result


def ring_matmul_nt(a: np.ndarray, bt: np.ndarray) -> np.ndarray:
    """``a @ bt.T`` over Z_2^64 for a right operand already stored as rows (im2col layout).

    Args:
        a: int64 array, shape (M, K).
        bt: int64 array, shape (N, K).

    Returns:
        int64 array of shape (M, N).
    """
    a = _as_ring(a, "a")
    bt = _as_ring(bt, "bt")
    if a.ndim != 2 or bt.ndim != 2 or a.shape[1] != bt.shape[1]:
        raise ValueError(f"ring_matmul_nt: need (M, K) and (N, K), got {a.shape} and {bt.shape}")
    m, k = a.shape
    n = bt.shape[0]
    if m * n * k < _SMALL_PRODUCT:
        return a @ bt.T
    # Pack the operand whose copy (plus, if it is bt, the transpose of the result) is cheaper.
    if n * (k + m) < m * k:
        return np.ascontiguousarray(_LeftOperand.pack(bt, k).times_rows(_row_major(a)).T)
    return _LeftOperand.pack(a, k).times_rows(_row_major(bt))


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, nogil=True)
def _im2col(x_padded, c_lo, channels, kh, kw, sh, sw, dh, dw, h_out, w_out, swap_halves, dst):
    """Write the receptive fields of ``x_padded`` (N, C, H, W) uint64 as the rows of ``dst``.

    ``x_padded`` already carries the convolution's zero padding.  Row
    ``(n * h_out + oh) * w_out + ow`` holds channels c_lo..c_lo+channels-1 x kernel rows x
    kernel columns, in that order (the order of a flattened conv weight), with 32-bit halves
    swapped if ``swap_halves``; columns and rows of ``dst`` past the patches are zeroed.
    """
    k = channels * kh * kw
    for r in prange(x_padded.shape[0] * h_out):
        image = r // h_out
        oh = r % h_out
        for ow in range(w_out):
            row = dst[r * w_out + ow]
            col = 0
            for c in range(channels):
                plane = x_padded[image, c_lo + c]
                for i in range(kh):
                    line = plane[oh * sh + i * dh, ow * sw :]
                    for j in range(kw):
                        v = line[j * dw]
                        if swap_halves:
                            v = (v >> _SHIFT32) | (v << _SHIFT32)
                        row[col + j] = v
                    col += kw
            row[k:] = 0
    dst[x_padded.shape[0] * h_out * w_out :] = 0


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    if len(value) != 2:
        raise ValueError(f"ring_conv2d: {name} must be an int or a pair, got {value!r}")
    return int(value[0]), int(value[1])


def ring_conv2d(
    x: np.ndarray,
    w: np.ndarray,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> np.ndarray:
    """2-D convolution over Z_2^64 with ``torch.nn.functional.conv2d`` semantics (no bias).

    Computed per group as im2col (patches as rows of length C/groups*kh*kw) followed by one
    ring matrix product with the flattened (O/groups, C/groups*kh*kw) weights; im2col
    writes the patches straight into the layout the product kernel reads.

    Args:
        x: int64 input, shape (N, C, H, W).
        w: int64 weights, shape (O, C // groups, kh, kw).
        stride, padding, dilation: an int or an (h, w) pair each; padding is with zeros.
        groups: number of channel groups; C and O must be divisible by it.

    Returns:
        int64 array of shape (N, O, H_out, W_out).
    """
    x = _as_ring(x, "x")
    w = _as_ring(w, "w")
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"ring_conv2d: need 4-D input and weight, got {x.shape} and {w.shape}")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    batch, channels, height, width = x.shape
    out_channels, group_channels, kh, kw = w.shape
    if groups < 1 or channels != group_channels * groups or out_channels % groups:
        raise ValueError(
            f"ring_conv2d: input {x.shape}, weight {w.shape} and groups={groups} do not match"
        )
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("ring_conv2d: stride and dilation must be >= 1, padding >= 0")
    h_out = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"ring_conv2d: kernel larger than padded input {x.shape}")

    x_padded = np.pad(x.view(np.uint64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    group_out = out_channels // groups
    patches = batch * h_out * w_out
    k = group_channels * kh * kw
    blocks = []
    for g in range(groups):
        weights = w[g * group_out : (g + 1) * group_out].reshape(group_out, k)
        # As in _matmul_2d: with fewer patches than the patch length (late layers), the
        # patches are the packed operand and the weights are used in place.
        patches_left = patches < k
        if patches_left:
            left = _LeftOperand(patches, k)
            dst = left.rows
        else:
            dst = np.empty((patches, _round_up(k, _K_ALIGN)), dtype=np.uint64)
        _im2col(
            x_padded, g * group_channels, group_channels, kh, kw, sh, sw, dh, dw, h_out, w_out,
            patches_left and _SPLIT_HALVES, dst,
        )
        if patches_left:
            out = left.times_rows(_row_major(weights))  # (patches, group_out)
            block = out.reshape(batch, h_out, w_out, group_out).transpose(0, 3, 1, 2)
        else:
            out = _LeftOperand.pack(weights, dst.shape[1]).times_rows(dst)
            block = out.reshape(group_out, batch, h_out, w_out).transpose(1, 0, 2, 3)
        blocks.append(block)
    # For a single image and group the kernel's output already is the result: no copy.
    return np.ascontiguousarray(blocks[0]) if groups == 1 else np.concatenate(blocks, axis=1)


# --------------------------------------------------------------------------------------------
# Fused elementwise operations
# --------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, nogil=True)
def _fused_mul_add(z, x, y, out):
    for i in prange(out.shape[0]):
        out[i] = z[i] + x[i] * y[i]


@njit(parallel=True, cache=True, nogil=True)
def _fused_mul_add_shift(z, x, y, shift, out):
    s = np.int64(shift)
    for i in prange(out.shape[0]):
        # uint64 -> int64 is a bit-preserving cast, so >> below is the arithmetic shift.
        out[i] = np.int64(z[i] + x[i] * y[i]) >> s


def _flat_operands(
    z: np.ndarray, x: np.ndarray, y: np.ndarray, out: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat uint64 views of z, x, y plus the (int64) output array."""
    z, x, y = (_as_ring(v, name) for v, name in ((z, "z"), (x, "x"), (y, "y")))
    if not z.shape == x.shape == y.shape:
        raise ValueError(f"shapes must be equal, got {z.shape}, {x.shape}, {y.shape}")
    if out is None:
        out = np.empty(z.shape, dtype=np.int64)
    elif out.shape != z.shape or out.dtype != np.int64 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous int64 array of the operands' shape")
    flat = [np.ascontiguousarray(v).reshape(-1).view(np.uint64) for v in (z, x, y)]
    return flat[0], flat[1], flat[2], out


def fused_mul_add(
    z: np.ndarray, x: np.ndarray, y: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``z + x * y`` over Z_2^64, elementwise, in one pass over memory.

    Args:
        z, x, y: int64 arrays of one shape (no broadcasting).
        out: optional C-contiguous int64 result array of that shape; may be ``z``, ``x`` or
            ``y`` itself for an in-place update.

    Returns:
        ``out`` (allocated when not given).
    """
    zf, xf, yf, out = _flat_operands(z, x, y, out)
    _fused_mul_add(zf, xf, yf, out.reshape(-1).view(np.uint64))
    return out


def fused_mul_add_shift(
    z: np.ndarray, x: np.ndarray, y: np.ndarray, shift: int, out: np.ndarray | None = None
) -> np.ndarray:
    """``(z + x * y) >> shift`` over Z_2^64, elementwise, with an arithmetic (signed) shift.

    This is the fixed-point truncation step after a multiplication (``shift`` = number of
    fractional bits).

    Args:
        z, x, y: int64 arrays of one shape (no broadcasting).
        shift: shift amount, 0 <= shift < 64.
        out: optional C-contiguous int64 result array of that shape; may alias an input.

    Returns:
        ``out`` (allocated when not given).
    """
    if not 0 <= shift < 64:
        raise ValueError(f"shift must be in [0, 64), got {shift}")
    zf, xf, yf, out = _flat_operands(z, x, y, out)
    _fused_mul_add_shift(zf, xf, yf, shift, out.reshape(-1))
    return out


def warmup() -> None:
    """Compile (or load from numba's on-disk cache) every kernel on small inputs.

    Covers both operand orientations of the matrix products and of the convolution.  A cold
    compile takes tens of seconds, a cached load about a second; calling this at start-up
    keeps that out of the first timed or latency-sensitive operation.
    """
    rng = np.random.default_rng(0)
    # Above _SMALL_PRODUCT, so that the products take the kernel path; C-contiguous like
    # typical inputs, since numba compiles per memory layout.
    short, long = rng.integers(-9, 9, size=(16, 100)), rng.integers(-9, 9, size=(120, 100))
    ring_matmul(short, np.ascontiguousarray(long.T))  # N >= K: b transposed into rows
    ring_matmul(long, np.ascontiguousarray(short.T))  # N < K: b packed, a used in place
    ring_matmul_nt(short, long)
    ring_matmul_nt(long, short)
    ring_conv2d(rng.integers(-9, 9, size=(1, 2, 9, 9)), rng.integers(-9, 9, size=(4, 2, 3, 3)), padding=1)
    ring_conv2d(rng.integers(-9, 9, size=(1, 16, 3, 3)), rng.integers(-9, 9, size=(4, 16, 3, 3)), padding=1)
    v = short[0]
    fused_mul_add(v, v, v)
    fused_mul_add_shift(v, v, v, 3)
