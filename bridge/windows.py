"""Window geometry shared by the plaintext and the encrypted executors.

Every pooling, resampling and transposed-convolution layout in the bridge is
described here once, as index arrays along one axis ("taps"), and applied by
the same functions to float arrays (plaintext) and to int64 ring shares
(encrypted).  Gathers, masked sums and scatter-adds are linear, hence exact on
additive shares; only the max over a window needs a protocol (the executor
takes it over the last axis of :func:`gather`).  So the two executors agree on
geometry by construction.

Conventions follow torch: ``ceil_mode`` windows must start inside the input or
its left padding; a padded position in a max-pooling window is replaced by a
valid position of the same window (``max(a, a) = a``), which is torch's
``-inf`` padding without a sentinel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Taps",
    "pool_output_size",
    "pool_taps",
    "pool_divisors",
    "adaptive_taps",
    "gather",
    "tap_sum",
    "resample_taps",
    "col2im",
    "transposed_output_size",
]


@dataclass(frozen=True)
class Taps:
    """For each of ``out`` positions along one axis, ``k`` input positions and what they weigh.

    ``index`` (out, k) holds positions that are always inside the input;
    ``weight`` (out, k) is 1/0 validity for pooling windows and the
    interpolation weight for resampling.
    """

    index: np.ndarray
    weight: np.ndarray

    @property
    def size(self) -> int:
        return int(self.index.shape[0])


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling output length along one axis."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if span < 0:
        raise ValueError(f"pooling window (kernel {kernel}, dilation {dilation}) does not fit size {size} "
                         f"with padding {padding}")
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or the left padding
    return out


def pool_taps(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
              ceil_mode: bool = False) -> Taps:
    """Pooling windows along one axis: positions (padding replaced by a valid one) and validity."""
    out = pool_output_size(size, kernel, stride, padding, dilation, ceil_mode)
    pos = np.arange(out)[:, None] * stride - padding + np.arange(kernel)[None, :] * dilation
    valid = (pos >= 0) & (pos < size)
    if not valid.any(axis=1).all():
        raise ValueError(f"a pooling window lies entirely in the padding (size {size}, kernel {kernel}, "
                         f"padding {padding})")
    first = pos[np.arange(out), valid.argmax(axis=1)]
    return Taps(np.where(valid, pos, first[:, None]), valid.astype(np.int64))


def pool_divisors(size: int, kernel: int, stride: int, padding: int, out: int, count_include_pad: bool) -> np.ndarray:
    """torch's average-pooling divisor factor along one axis (the 2-D divisor is the outer product)."""
    start = np.arange(out) * stride - padding
    end = np.minimum(start + kernel, size + padding)
    if count_include_pad:
        return (end - start).astype(np.int64)
    return (np.minimum(end, size) - np.maximum(start, 0)).astype(np.int64)


def adaptive_taps(size: int, out: int) -> Taps:
    """torch's adaptive-pooling bins [floor(i size / out), ceil((i + 1) size / out)) as taps."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-(-((i + 1) * size) // out) for i in range(out)]
    width = max(e - s for s, e in zip(starts, ends))
    pos = np.array([[s + j if s + j < e else s for j in range(width)] for s, e in zip(starts, ends)], dtype=np.intp)
    valid = np.array([[s + j < e for j in range(width)] for s, e in zip(starts, ends)], dtype=np.int64)
    return Taps(pos, valid)


def gather(x: np.ndarray, axis: int, taps: Taps) -> np.ndarray:
    """x with ``axis`` replaced by the taps' output positions and a new last axis of k taps."""
    picked = np.take(x, taps.index, axis=axis)  # axis -> (out, k)
    return np.moveaxis(picked, axis + 1, -1)


def tap_sum(x: np.ndarray, axis: int, taps: Taps, weight: np.ndarray | None = None) -> np.ndarray:
    """Σ_k weight[o, k] x[..., index[o, k], ...] along ``axis``; exact on int64 shares with integer weights."""
    w = taps.weight if weight is None else weight
    picked = gather(x, axis, taps)
    shape = [1] * picked.ndim
    shape[axis], shape[-1] = w.shape
    return (picked * w.reshape(shape).astype(picked.dtype, copy=False)).sum(axis=-1, dtype=picked.dtype)


def resample_taps(size: int, out: int, mode: str, align_corners: bool | None, scale: float | None) -> Taps:
    """torch's upsampling source positions and weights along one axis (``F.interpolate``).

    ``scale`` is the user's scale factor (torch then uses 1/scale, not size/out,
    unless ``recompute_scale_factor``); index arithmetic in float32 as torch does.
    """
    dst = np.arange(out, dtype=np.float64)
    if mode in ("nearest", "nearest-exact"):
        ratio = np.float32(1.0 / scale) if scale else np.float32(size / out)
        shift = 0.5 if mode == "nearest-exact" else 0.0
        src = np.floor((dst.astype(np.float32) + np.float32(shift)) * ratio).astype(np.int64)
        return Taps(np.minimum(src, size - 1)[:, None], np.ones((out, 1)))
    if mode != "bilinear":
        raise ValueError(f"resampling mode {mode!r} is not supported (nearest, nearest-exact, bilinear)")
    if align_corners:
        ratio = (size - 1) / (out - 1) if out > 1 else 0.0
        src = dst * ratio
    else:
        ratio = 1.0 / scale if scale else size / out
        src = np.maximum(ratio * (dst + 0.5) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), size - 1)
    hi = np.minimum(lo + 1, size - 1)
    frac = src - lo
    return Taps(np.stack([lo, hi], axis=1), np.stack([1.0 - frac, frac], axis=1))


def transposed_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int,
                           output_padding: int) -> int:
    """``ConvTranspose2d``'s output length along one axis."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def col2im(cols: np.ndarray, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
           output_padding: tuple[int, int]) -> np.ndarray:
    """Scatter-add (N, H, W, C, kh, kw) patch products into a transposed convolution's (N, C, Ho, Wo) output.

    Input pixel (i, j), tap (a, b) lands at (i s + a d - p, j s + b d - p), as in
    ``torch.nn.functional.conv_transpose2d``; exact on int64 shares.
    """
    n, h, w, c, kh, kw = cols.shape
    (sh, sw), (ph, pw), (dh, dw), (oh, ow) = stride, padding, dilation, output_padding
    full_h = (h - 1) * sh + dh * (kh - 1) + 1 + oh
    full_w = (w - 1) * sw + dw * (kw - 1) + 1 + ow
    out_h = transposed_output_size(h, kh, sh, ph, dh, oh)
    out_w = transposed_output_size(w, kw, sw, pw, dw, ow)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"transposed convolution output would be {out_h}x{out_w}")
    # the full canvas, large enough for every tap and for the padding to crop
    canvas = np.zeros((n, c, max(full_h, ph + out_h), max(full_w, pw + out_w)), dtype=cols.dtype)
    moved = cols.transpose(0, 3, 1, 2, 4, 5)  # (N, C, H, W, kh, kw)
    for a in range(kh):
        for b in range(kw):
            canvas[:, :, a * dh: a * dh + (h - 1) * sh + 1: sh, b * dw: b * dw + (w - 1) * sw + 1: sw] += moved[..., a, b]
    return np.ascontiguousarray(canvas[:, :, ph: ph + out_h, pw: pw + out_w])
