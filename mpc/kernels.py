"""PROVISIONAL exact numpy ring kernels (the numba kernels replace this file)."""

from __future__ import annotations

import numpy as np

__all__ = ["ring_matmul", "ring_conv2d"]


def ring_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(np.asarray(a, np.int64), np.asarray(b, np.int64))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def ring_conv2d(x, w, *, stride=1, padding=0, dilation=1, groups=1):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, ho, wo), np.int64)
    og = o // groups
    for g in range(groups):
        xs = xp[:, g * cg : (g + 1) * cg]
        ws = w[g * og : (g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out
