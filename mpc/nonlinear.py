"""Comparison-based functions of shared tensors: comparisons, ReLU, clamp, max/argmax, pooling.

Everything here is built on one protocol, DReLU: shares of b = [d >= 0] for a
shared d, optionally with b * d and b * z_k for payload tensors z_k, exactly
and in the same rounds (:mod:`mpc.protocols.drelu`).  ``ctx.comparison``
picks its implementation: ``"fss"`` (2 parties, function secret sharing,
2 rounds, :mod:`mpc.fss`) or ``"generic"`` (any n, bitwise with dealer tables,
2 + ceil(log2 ceil((l-1)/4)) rounds); ``"auto"`` takes FSS for 2 parties.

The domain.  ``ctx.comparison_bits`` (l, default 64) bounds every compared
value d -- for two operands (x < y, maximum, a max/argmax tree, a pooling
window, clamp's bounds) their *difference*: -2^(l-1) <= d < 2^(l-1) ring
units, i.e. |d| < 2^(l-1-f) for values at f fractional bits.  Two operands
each below 2^(l-2-f) always qualify.  At l = 64 every difference of two
representable values does; l = 32 shrinks FSS keys 2.3x.  Below 64 bits a
value outside the domain is *detected*: every comparison leaves a term for
the context's zero check, and ``ctx.check_comparisons()`` (which ``reveal``
runs first) raises :class:`~mpc.errors.ComparisonOverflow` naming the
``ctx.comparison_scope``; nothing is revealed.

Exact (bit-exact on the fixed-point values, no truncation): comparisons,
sign, abs, relu, clamp/relu6, maximum/minimum, max/min/argmax/argmin,
max_pool2d, adaptive_max_pool2d.  Average pooling: one truncation.  The
smooth functions (sigmoid, tanh, silu, gelu, exp, reciprocal, softmax, ...)
are in :mod:`mpc.approximations`.

Costs, in comparisons C (each: the protocol's rounds R and bytes):
relu, abs, max of two: 1 C, R rounds.  ``==``, sign, clamp: 2 C in one batch,
R rounds.  max/argmax over k: k - 1 C in ceil(log2 k) batches.
max_pool2d (kh x kw): separable, ceil(log2 kw) + ceil(log2 kh) batches.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .fss import drelu_fss
from .fss.material import max_batch as fss_max_batch
from .protocols.compare import drelu_bitwise
from .protocols.drelu import MAX_COMPARE_ELEMENTS, DRelu
from .protocols.truncation import truncate

if TYPE_CHECKING:
    from .context import Context
    from .tensor import SharedTensor

__all__ = [
    "drelu",
    "ge_zero",
    "relu",
    "less",
    "less_equal",
    "greater",
    "greater_equal",
    "equal",
    "not_equal",
    "sign",
    "absolute",
    "clamp",
    "relu6",
    "maximum",
    "minimum",
    "max",
    "min",
    "argmax",
    "argmin",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
]

_builtin_max = max
_builtin_min = min


# -- the one protocol everything reduces to ---------------------------------------------
def drelu(ctx: "Context", d: np.ndarray, *, with_x: bool = False, payloads: Sequence[np.ndarray] = ()) -> DRelu:
    """Shares of [d >= 0] (and [d >= 0] * d, * z_k) by ``ctx.comparison``, for flat ring arrays.

    In a domain narrower than 64 bits the overflow terms go to the context's
    zero check (``ctx.check_comparisons``, run by ``reveal``), labelled with
    the current ``ctx.comparison_scope``.  A batch larger than one dealer
    request may hold (8 M comparisons; fewer for 64-bit FSS keys) runs as
    several requests, one after the other.
    """
    d = np.ascontiguousarray(d, dtype=np.int64).reshape(-1)
    flat = [np.ascontiguousarray(z, dtype=np.int64).reshape(-1) for z in payloads]
    if d.size == 0:
        empty = np.zeros(0, np.int64)
        return DRelu(empty, empty if with_x else None, [empty for _ in payloads])
    bits, slack = ctx.comparison_bits, ctx.comparison_slack_bits
    if ctx.comparison == "fss":
        protocol, batch = drelu_fss, fss_max_batch(bits, len(flat), slack)
    else:
        protocol, batch = drelu_bitwise, _builtin_max(1, 2 * MAX_COMPARE_ELEMENTS // (1 + len(flat)))
        batch = _builtin_min(batch, MAX_COMPARE_ELEMENTS)
    parts = [
        protocol(ctx, d[lo : lo + batch], bits=bits, with_x=with_x, payloads=[z[lo : lo + batch] for z in flat], slack=slack)
        for lo in range(0, d.size, batch)
    ]
    for part in parts:
        _defer_overflow(ctx, part)
    if len(parts) == 1:
        return parts[0]
    return DRelu(
        np.concatenate([p.bit for p in parts]),
        np.concatenate([p.relu for p in parts]) if with_x else None,
        [np.concatenate([p.products[k] for p in parts]) for k in range(len(flat))],
        None,
        parts[0].coins,
    )


def _defer_overflow(ctx: "Context", res: DRelu) -> None:
    terms = res.overflow
    if terms is not None:
        label = ctx.check_label("comparison", terms.bits)
        ctx.checks.add(label, terms.z, max_valuation=terms.max_valuation, coins=res.coins, weak=terms.weak)


def _bits(x: "SharedTensor", share: np.ndarray, shape: tuple[int, ...]) -> "SharedTensor":
    return x._like(share.reshape(shape), 0)


def _diff(x: "SharedTensor", y: Any) -> "SharedTensor":
    return x - y


def _batch(tensors: Sequence["SharedTensor"], *, with_x: bool) -> tuple[DRelu, list[tuple[int, ...]], int]:
    """One DReLU over several same-scale tensors; returns the result, their shapes and the scale."""
    scale = _builtin_max(t.frac_bits for t in tensors)
    shares = [t.rescale(scale).share.reshape(-1) for t in tensors]
    ctx = tensors[0].ctx
    return drelu(ctx, np.concatenate(shares), with_x=with_x), [t.shape for t in tensors], scale


def _split(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    out, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(flat[at : at + size].reshape(shape))
        at += size
    return out


# -- comparisons -----------------------------------------------------------------------
def ge_zero(x: "SharedTensor") -> "SharedTensor":
    """[x >= 0] as shared 0/1 integers (scale 0).  1 comparison."""
    return _bits(x, drelu(x.ctx, x.share).bit, x.shape)


def relu(x: "SharedTensor") -> "SharedTensor":
    """max(x, 0), exact.  1 comparison; the product with the bit is free."""
    return x._like(drelu(x.ctx, x.share, with_x=True).relu.reshape(x.shape))


def greater_equal(x: "SharedTensor", y: Any) -> "SharedTensor":
    """[x >= y] (0/1, scale 0), exact for |x - y| < 2^(l-1) ring units."""
    return ge_zero(_diff(x, y))


def less(x: "SharedTensor", y: Any) -> "SharedTensor":
    """[x < y] = 1 - [x - y >= 0]."""
    return 1 - greater_equal(x, y)


def less_equal(x: "SharedTensor", y: Any) -> "SharedTensor":
    """[x <= y] = [y - x >= 0]."""
    return ge_zero(-_diff(x, y))


def greater(x: "SharedTensor", y: Any) -> "SharedTensor":
    """[x > y] = 1 - [y - x >= 0]."""
    return 1 - less_equal(x, y)


def _both_signs(d: "SharedTensor") -> tuple["SharedTensor", "SharedTensor"]:
    """[d >= 0] and [-d >= 0] in one batch of 2 comparisons."""
    res = drelu(d.ctx, np.concatenate([d.share.reshape(-1), -d.share.reshape(-1)]))
    pos, neg = _split(res.bit, [d.shape, d.shape])
    return _bits(d, pos, d.shape), _bits(d, neg, d.shape)


def equal(x: "SharedTensor", y: Any) -> "SharedTensor":
    """[x == y] = [d >= 0] + [-d >= 0] - 1 for d = x - y.  2 comparisons, one batch."""
    pos, neg = _both_signs(_diff(x, y))
    return pos + neg - 1


def not_equal(x: "SharedTensor", y: Any) -> "SharedTensor":
    return 1 - equal(x, y)


def sign(x: "SharedTensor") -> "SharedTensor":
    """-1, 0 or 1 (numpy's sign; scale 0) = [x >= 0] - [-x >= 0].  2 comparisons, one batch."""
    pos, neg = _both_signs(x)
    return pos - neg


def absolute(x: "SharedTensor") -> "SharedTensor":
    """|x| = 2 relu(x) - x, exact.  1 comparison."""
    return 2 * relu(x) - x


def clamp(x: "SharedTensor", lo: Any = None, hi: Any = None) -> "SharedTensor":
    """min(max(x, lo), hi) with public or shared bounds, exact.

    lo + relu(x - lo) - relu(x - hi): 2 comparisons in one batch (1 with one bound).
    Public bounds must satisfy lo <= hi.
    """
    if lo is None and hi is None:
        return x
    if lo is not None and hi is not None and not _is_shared(lo) and not _is_shared(hi):
        if np.any(np.asarray(lo) > np.asarray(hi)):
            raise ValueError("clamp needs lo <= hi")
    parts = [t for t in ((x - lo) if lo is not None else None, (x - hi) if hi is not None else None) if t is not None]
    res, shapes, scale = _batch(parts, with_x=True)
    relus = [x._like(r, scale) for r in _split(res.relu, shapes)]
    if lo is not None and hi is not None:
        return relus[0] - relus[1] + lo
    if lo is not None:
        return relus[0] + lo
    return x - relus[0]


def relu6(x: "SharedTensor") -> "SharedTensor":
    return clamp(x, 0, 6)


def maximum(x: "SharedTensor", y: Any) -> "SharedTensor":
    """Elementwise max(x, y) = y + relu(x - y), exact.  1 comparison."""
    return relu(_diff(x, y)) + y


def minimum(x: "SharedTensor", y: Any) -> "SharedTensor":
    """Elementwise min(x, y) = x - relu(x - y), exact.  1 comparison."""
    return x - relu(_diff(x, y))


def _is_shared(v: Any) -> bool:
    return hasattr(v, "share") and hasattr(v, "ctx")


# -- max / argmax trees ------------------------------------------------------------------
def _tree(values: np.ndarray, ctx: "Context", index: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Max over the last axis of an (M, k) share array by a pairwise tree (ceil(log2 k) batches).

    ``index``: None, "index" (shared position, scale 0) or "one_hot" ((M, k) shares).
    Each level compares the pairs (0,1), (2,3), ... and keeps an odd last
    element; [a - b >= 0] prefers the earlier element, so ties give the first
    index, as numpy's argmax.
    """
    m, k = values.shape
    cur = values
    pub = ctx.rank == 0  # public starting indices are held by party 0
    if index == "index":
        idx = np.broadcast_to(np.arange(k, dtype=np.int64) if pub else np.zeros(k, np.int64), (m, k)).copy()
        idx = idx[:, :, None]
    elif index == "one_hot":
        eye = np.eye(k, dtype=np.int64) if pub else np.zeros((k, k), np.int64)
        idx = np.broadcast_to(eye, (m, k, k)).copy()
    else:
        idx = None
    while cur.shape[1] > 1:
        half = cur.shape[1] // 2
        a, b, rest = cur[:, 0 : 2 * half : 2], cur[:, 1 : 2 * half : 2], cur[:, 2 * half :]
        payloads = []
        if idx is not None:
            ia, ib = idx[:, 0 : 2 * half : 2], idx[:, 1 : 2 * half : 2]
            payloads = [(ia[:, :, j] - ib[:, :, j]) for j in range(idx.shape[2])]
        res = drelu(ctx, a - b, with_x=True, payloads=payloads)
        best = b + res.relu.reshape(m, half)
        cur = np.concatenate([best, rest], axis=1)
        if idx is not None:
            chosen = ib + np.stack([p.reshape(m, half) for p in res.products], axis=2)
            idx = np.concatenate([chosen, idx[:, 2 * half :]], axis=1)
    if idx is None:
        return cur[:, 0], None
    return cur[:, 0], idx[:, 0, :]


def _axes(ndim: int, axis: int | Sequence[int] | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if any(not -ndim <= int(a) < ndim for a in axes):
        raise ValueError(f"axis {axis!r} is out of range for a tensor with {ndim} dimensions")
    out = tuple(sorted(int(a) % ndim for a in axes))
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {axis!r}")
    return out


def _to_rows(share: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Move ``axes`` last and flatten them: (M, k) rows and the kept shape."""
    keep = [i for i in range(share.ndim) if i not in axes]
    moved = np.transpose(share, keep + list(axes))
    kept_shape = tuple(share.shape[i] for i in keep)
    k = int(np.prod([share.shape[i] for i in axes], dtype=np.int64))
    if k == 0:
        raise ValueError("max/argmax of an empty axis")
    return moved.reshape(-1, k), kept_shape


def _keepdims(shape: tuple[int, ...], axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    out, it = [], iter(shape)
    for i in range(ndim):
        out.append(1 if i in axes else next(it))
    return tuple(out)


def max(x: "SharedTensor", axis: int | Sequence[int] | None = None, keepdims: bool = False) -> "SharedTensor":  # noqa: A001
    """Maximum along ``axis`` (all axes if None), exact.  k - 1 comparisons in ceil(log2 k) batches."""
    axes = _axes(x.ndim, axis)
    rows, kept = _to_rows(x.share, axes)
    best, _ = _tree(rows, x.ctx, None)
    shape = _keepdims(kept, axes, x.ndim) if keepdims else kept
    return x._like(best.reshape(shape))


def min(x: "SharedTensor", axis: int | Sequence[int] | None = None, keepdims: bool = False) -> "SharedTensor":  # noqa: A001
    return -max(-x, axis=axis, keepdims=keepdims)


def argmax(x: "SharedTensor", axis: int | None = None, keepdims: bool = False, *, one_hot: bool = False) -> "SharedTensor":
    """Shared index of the maximum along ``axis`` (first on ties, as numpy), scale 0.

    ``axis=None`` indexes the flattened tensor.  ``one_hot=True`` returns a
    0/1 tensor of x's shape instead (exactly one 1 per reduced row).
    Costs the max tree plus one payload per pair (8 B more per comparison
    online, k payloads with ``one_hot``).
    """
    if axis is not None and not isinstance(axis, (int, np.integer)):
        raise ValueError("argmax takes one axis or None")
    axes = _axes(x.ndim, axis)
    rows, kept = _to_rows(x.share, axes)
    _, idx = _tree(rows, x.ctx, "one_hot" if one_hot else "index")
    if one_hot:
        if axis is None:
            return x._like(idx.reshape(x.shape), 0)
        ax = axes[0]
        moved = idx.reshape(kept + (x.shape[ax],))
        return x._like(np.moveaxis(moved, -1, ax), 0)
    shape = _keepdims(kept, axes, x.ndim) if keepdims else kept
    return x._like(idx[:, 0].reshape(shape), 0)


def argmin(x: "SharedTensor", axis: int | None = None, keepdims: bool = False, *, one_hot: bool = False) -> "SharedTensor":
    return argmax(-x, axis=axis, keepdims=keepdims, one_hot=one_hot)


# -- pooling (NCHW or CHW, torch semantics) -------------------------------------------------
def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, (int, np.integer)) for e in v):
        return int(v[0]), int(v[1])
    if isinstance(v, (tuple, list)) and len(v) == 1 and isinstance(v[0], (int, np.integer)):
        return int(v[0]), int(v[0])
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    if span < 0:
        raise ValueError(f"pooling window (kernel {k}, dilation {d}) does not fit input size {size} with padding {p}")
    out = (-(-span // s) if ceil_mode else span // s) + 1
    # torch: the last window must start inside the input or the left padding
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _windows(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per output position, the k input positions (out-of-range ones replaced) and their validity."""
    out = _out_size(size, k, s, p, d, ceil_mode)
    pos = np.arange(out)[:, None] * s - p + np.arange(k)[None, :] * d
    valid = (pos >= 0) & (pos < size)
    if not valid.any(axis=1).all():
        raise ValueError(f"a pooling window lies entirely in the padding (size {size}, kernel {k}, padding {p})")
    # A padded position takes a valid position of the same window: max is unchanged
    # (max(a, a) = a), so torch's -inf padding needs no out-of-range sentinel.
    first = pos[np.arange(out), valid.argmax(axis=1)]
    return np.where(valid, pos, first[:, None]), valid


def _check_pool_input(x: "SharedTensor") -> tuple["SharedTensor", bool]:
    if x.ndim == 3:
        return x.reshape((1,) + x.shape), True
    if x.ndim != 4:
        raise ValueError(f"pooling expects NCHW or CHW input, got shape {x.shape}")
    return x, False


def _pool_args(kernel_size: Any, stride: Any, padding: Any, dilation: Any) -> tuple[tuple[int, int], ...]:
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else _pair(stride, "stride")
    p = _pair(padding, "padding")
    d = _pair(dilation, "dilation")
    if _builtin_min(k) < 1 or _builtin_min(s) < 1 or _builtin_min(p) < 0 or _builtin_min(d) < 1:
        raise ValueError(f"invalid pooling options kernel {k}, stride {s}, padding {p}, dilation {d}")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"padding {p} must be at most half the kernel {k} (as in torch)")
    return k, s, p, d


def _max_last(x: "SharedTensor", share: np.ndarray) -> np.ndarray:
    lead = share.shape[:-1]
    best, _ = _tree(share.reshape(-1, share.shape[-1]), x.ctx, None)
    return best.reshape(lead)


def max_pool2d(
    x: "SharedTensor",
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
) -> "SharedTensor":
    """``torch.nn.functional.max_pool2d``, exact, separably: rows of kw, then columns of kh.

    Comparisons per channel: (kw - 1) H Wo + (kh - 1) Ho Wo (3x3/2: 0.75x the
    8 Ho Wo of one 9-element tree); batches: ceil(log2 kw) + ceil(log2 kh).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pool_args(kernel_size, stride, padding, dilation)
    x4, squeeze = _check_pool_input(x)
    n, c, h, w = x4.shape
    cols, _ = _windows(w, kw, sw, pw, dw, ceil_mode)
    rows, _ = _windows(h, kh, sh, ph, dh, ceil_mode)
    share = x4.share
    if kw > 1 or cols.shape[0] != w:
        share = _max_last(x, share[:, :, :, cols]) if kw > 1 else share[:, :, :, cols[:, 0]]
    if kh > 1 or rows.shape[0] != h:
        if kh > 1:
            gathered = share[:, :, rows, :]  # (n, c, Ho, kh, Wo)
            share = _max_last(x, np.moveaxis(gathered, 3, 4))
        else:
            share = share[:, :, rows[:, 0], :]
    out = x._like(np.ascontiguousarray(share))
    return out.reshape(out.shape[1:]) if squeeze else out


def avg_pool2d(
    x: "SharedTensor",
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> "SharedTensor":
    """``torch.nn.functional.avg_pool2d``: exact window sums, then one multiplication by 1/divisor.

    No comparison; 1 truncation (1 round with exact truncation, 0 with local).
    Error: below one unit plus |mean| * 2^-(f+1) from encoding 1/divisor.
    """
    (kh, kw), (sh, sw), (ph, pw), _ = _pool_args(kernel_size, stride, padding, 1)
    x4, squeeze = _check_pool_input(x)
    n, c, h, w = x4.shape
    cols, cvalid = _windows(w, kw, sw, pw, 1, ceil_mode)
    rows, rvalid = _windows(h, kh, sh, ph, 1, ceil_mode)
    share = (x4.share[:, :, :, cols] * cvalid).sum(axis=-1, dtype=np.int64)
    share = (share[:, :, rows, :] * rvalid[:, :, None]).sum(axis=3, dtype=np.int64)
    if divisor_override:
        divisor = np.full((rows.shape[0], cols.shape[0]), float(divisor_override))
    else:
        dh_ = _pool_extent(h, kh, sh, ph, rows.shape[0], count_include_pad)
        dw_ = _pool_extent(w, kw, sw, pw, cols.shape[0], count_include_pad)
        divisor = np.outer(dh_, dw_).astype(np.float64)
    out = _divide_public(x._like(share), divisor)
    return out.reshape(out.shape[1:]) if squeeze else out


def _divide_public(total: "SharedTensor", divisor: np.ndarray) -> "SharedTensor":
    """total / divisor for public positive divisors (broadcast over the last two axes), one truncation.

    1/divisor is encoded at f + ceil(log2 max divisor) bits, so its relative
    error stays below 2^-(f+1) whatever the divisor (at f bits it would grow
    with the divisor: 49 for a 7x7 global pool would cost 49 x 2^-17).
    """
    divisor = np.asarray(divisor, dtype=np.float64)
    extra = int(math.ceil(math.log2(_builtin_max(float(divisor.max()), 1.0))))
    bits = total.frac_bits + extra
    coeff = np.rint(2.0**bits / divisor).astype(np.int64)
    return total._like(truncate(total.ctx, total.share * coeff, bits))


def _pool_extent(size: int, k: int, s: int, p: int, out: int, include_pad: bool) -> np.ndarray:
    """torch's per-position divisor factor along one dimension."""
    start = np.arange(out) * s - p
    end = np.minimum(start + k, size + p)
    if include_pad:
        return end - start
    return np.minimum(end, size) - np.maximum(start, 0)


def _adaptive_bins(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's bins [floor(i size / out), ceil((i + 1) size / out)) as padded index rows and validity."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-(-((i + 1) * size) // out) for i in range(out)]
    width = _builtin_max(e - s for s, e in zip(starts, ends))
    pos = np.array([[s + j if s + j < e else s for j in range(width)] for s, e in zip(starts, ends)], dtype=np.intp)
    valid = np.array([[s + j < e for j in range(width)] for s, e in zip(starts, ends)])
    return pos, valid


def _adaptive_size(output_size: Any, h: int, w: int) -> tuple[int, int]:
    if isinstance(output_size, (int, np.integer)):
        return int(output_size), int(output_size)
    oh, ow = output_size
    return (h if oh is None else int(oh)), (w if ow is None else int(ow))


def adaptive_avg_pool2d(x: "SharedTensor", output_size: int | tuple[int | None, int | None]) -> "SharedTensor":
    """``torch.nn.functional.adaptive_avg_pool2d``: exact bin sums, one multiplication by 1/count."""
    x4, squeeze = _check_pool_input(x)
    n, c, h, w = x4.shape
    oh, ow = _adaptive_size(output_size, h, w)
    rows, rvalid = _adaptive_bins(h, oh)
    cols, cvalid = _adaptive_bins(w, ow)
    share = (x4.share[:, :, :, cols] * cvalid).sum(axis=-1, dtype=np.int64)
    share = (share[:, :, rows, :] * rvalid[:, :, None]).sum(axis=3, dtype=np.int64)
    counts = np.outer(rvalid.sum(axis=1), cvalid.sum(axis=1)).astype(np.float64)
    out = _divide_public(x._like(share), counts)
    return out.reshape(out.shape[1:]) if squeeze else out


def adaptive_max_pool2d(x: "SharedTensor", output_size: int | tuple[int | None, int | None]) -> "SharedTensor":
    """``torch.nn.functional.adaptive_max_pool2d`` (values only), exact, separably."""
    x4, squeeze = _check_pool_input(x)
    n, c, h, w = x4.shape
    oh, ow = _adaptive_size(output_size, h, w)
    rows, _ = _adaptive_bins(h, oh)
    cols, _ = _adaptive_bins(w, ow)
    share = x4.share[:, :, :, cols]
    share = _max_last(x, share) if cols.shape[1] > 1 else share[..., 0]
    gathered = np.moveaxis(share[:, :, rows, :], 3, 4)
    share = _max_last(x, gathered) if rows.shape[1] > 1 else gathered[..., 0]
    out = x._like(np.ascontiguousarray(share))
    return out.reshape(out.shape[1:]) if squeeze else out
