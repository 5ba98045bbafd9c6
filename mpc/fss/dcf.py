"""Distributed comparison functions (DCF): two-party function secret sharing of x -> [x < alpha].

Boyle, Chandran, Gilboa, Gupta, Ishai, Kohli, Sharma, "Function Secret
Sharing for Mixed-Mode and Fixed-Point Secure Computation", EUROCRYPT 2021,
§3 (Fig. 3, DCF Gen/Eval), with output group Z_2 (beta = 1), and the early
termination of Boyle, Gilboa, Ishai, "Function Secret Sharing: Improvements and
Extensions", CCS 2016, §3.2.2: the last ``LEAF_BITS`` = 7 levels are replaced by
one 128-bit table per leaf, the largest table one AES block fills.

For a D-bit domain the tree has L = max(D - 7, 0) levels.  Key of party b:
  - its root seed (126 random bits, the two low bits kept 0) and t = b — both
    drawn from the party's own dealer stream, so they never cross the network;
  - per level a 128-bit correction word: the seed correction in bits 2..127,
    t_cw^L in bit 0, t_cw^R in bit 1 (the seed's low bits are free for them);
  - per level one output-correction bit V_cw, packed into one word per element;
  - one 128-bit leaf correction (the table of [x_low < alpha_low]).
The correction words are the same in both keys: 16 L + 16 + L/8 (rounded up to
a 4- or 8-byte word) bytes per element, sent to each party.

PRG: G_c(s) = AES_K(s | c) XOR (s | c) with fixed-key AES (:mod:`mmo`), c = 0
for the left child, 1 for the right, 2 for the leaf table.  A child block
holds t in bit 0, v in bit 1 and the child seed in bits 2..127.

Evaluation of one point costs one AES block per level plus one for the leaf;
key generation four per level plus two.  Both run level by level over all
elements at once: one ECB call and one fused numba pass per level.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np

from .mmo import BlockBuffer

__all__ = ["LEAF_BITS", "DcfKey", "tree_levels", "key_bytes", "vcw_dtype", "random_seeds", "gen", "evaluate"]

LEAF_BITS = 7
_CLEAR = np.uint64(0xFFFFFFFFFFFFFFFC)  # clears the two low (control) bits of a seed word
_builtin_min = min


def tree_levels(domain_bits: int) -> int:
    """Levels of the tree for a ``domain_bits``-bit input (the rest is the leaf table)."""
    return max(domain_bits - LEAF_BITS, 0)


def vcw_dtype(domain_bits: int) -> type:
    return np.uint32 if tree_levels(domain_bits) <= 32 else np.uint64


def key_bytes(domain_bits: int) -> int:
    """Correction-word bytes per element that each party receives."""
    levels = tree_levels(domain_bits)
    return 16 * levels + np.dtype(vcw_dtype(domain_bits)).itemsize + 16


@dataclass(frozen=True)
class DcfKey:
    """The correction words of a batch of DCF keys (identical for both parties).

    ``cw``: (L, N, 2) uint64; ``vcw``: (N,) uint32/uint64, bit i = V_cw of level i;
    ``leaf``: (N, 2) uint64, the 128-bit leaf correction.
    """

    cw: np.ndarray
    vcw: np.ndarray
    leaf: np.ndarray


def random_seeds(raw: np.ndarray) -> np.ndarray:
    """Root seeds from uniform (N, 2) uint64 words: the two control bits cleared."""
    seeds = np.ascontiguousarray(raw, dtype=np.uint64).copy()
    seeds[:, 0] &= _CLEAR
    return seeds


# -- key generation ------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _gen_first(s0, s1, inp, leaf):  # pragma: no cover - compiled
    n = s0.shape[0]
    for i in range(n):
        if leaf:
            inp[0, i, 0] = s0[i, 0] | np.uint64(2)
            inp[0, i, 1] = s0[i, 1]
            inp[1, i, 0] = s1[i, 0] | np.uint64(2)
            inp[1, i, 1] = s1[i, 1]
        else:
            inp[0, i, 0] = s0[i, 0]
            inp[0, i, 1] = s0[i, 1]
            inp[1, i, 0] = s0[i, 0] | np.uint64(1)
            inp[1, i, 1] = s0[i, 1]
            inp[2, i, 0] = s1[i, 0]
            inp[2, i, 1] = s1[i, 1]
            inp[3, i, 0] = s1[i, 0] | np.uint64(1)
            inp[3, i, 1] = s1[i, 1]


@numba.njit(cache=True, nogil=True)
def _gen_level(enc, inp, alpha, shift, level, t0, t1, valpha, cw, vcw, leaf):  # pragma: no cover - compiled
    # Branch-free: alpha's bits and the control bits are random, so every
    # choice is a mask select (x ^ ((x ^ y) & mask)) rather than a mispredicted jump.
    one = np.uint64(1)
    zero = np.uint64(0)
    clear = np.uint64(0xFFFFFFFFFFFFFFFC)
    n = alpha.shape[0]
    for i in range(n):
        a = (alpha[i] >> shift) & one
        am = zero - a  # all ones when alpha's bit is 1: keep right, lose left
        l0a = enc[0, i, 0] ^ inp[0, i, 0]
        l0b = enc[0, i, 1] ^ inp[0, i, 1]
        r0a = enc[1, i, 0] ^ inp[1, i, 0]
        r0b = enc[1, i, 1] ^ inp[1, i, 1]
        l1a = enc[2, i, 0] ^ inp[2, i, 0]
        l1b = enc[2, i, 1] ^ inp[2, i, 1]
        r1a = enc[3, i, 0] ^ inp[3, i, 0]
        r1b = enc[3, i, 1] ^ inp[3, i, 1]
        k0a = l0a ^ ((l0a ^ r0a) & am)
        k0b = l0b ^ ((l0b ^ r0b) & am)
        k1a = l1a ^ ((l1a ^ r1a) & am)
        k1b = l1b ^ ((l1b ^ r1b) & am)
        x0a = r0a ^ ((r0a ^ l0a) & am)
        x0b = r0b ^ ((r0b ^ l0b) & am)
        x1a = r1a ^ ((r1a ^ l1a) & am)
        x1b = r1b ^ ((r1b ^ l1b) & am)
        scw_a = (x0a ^ x1a) & clear
        scw_b = x0b ^ x1b
        tcw_l = (l0a ^ l1a ^ a ^ one) & one
        tcw_r = (r0a ^ r1a ^ a) & one
        cw[level, i, 0] = scw_a | tcw_l | (tcw_r << one)
        cw[level, i, 1] = scw_b
        # [lose = left] is a: going left where alpha goes right means x < alpha
        v_cw = (((x0a ^ x1a) >> one) & one) ^ valpha[i] ^ a
        valpha[i] = valpha[i] ^ (((k0a ^ k1a) >> one) & one) ^ v_cw
        vcw[i] |= v_cw << level
        tcw_keep = tcw_l ^ ((tcw_l ^ tcw_r) & a)
        p0 = t0[i]
        p1 = t1[i]
        m0 = zero - p0
        m1 = zero - p1
        s0a = (k0a & clear) ^ (scw_a & m0)
        s0b = k0b ^ (scw_b & m0)
        s1a = (k1a & clear) ^ (scw_a & m1)
        s1b = k1b ^ (scw_b & m1)
        t0[i] = (k0a & one) ^ (p0 & tcw_keep)
        t1[i] = (k1a & one) ^ (p1 & tcw_keep)
        if leaf:
            inp[0, i, 0] = s0a | np.uint64(2)
            inp[0, i, 1] = s0b
            inp[1, i, 0] = s1a | np.uint64(2)
            inp[1, i, 1] = s1b
        else:
            inp[0, i, 0] = s0a
            inp[0, i, 1] = s0b
            inp[1, i, 0] = s0a | one
            inp[1, i, 1] = s0b
            inp[2, i, 0] = s1a
            inp[2, i, 1] = s1b
            inp[3, i, 0] = s1a | one
            inp[3, i, 1] = s1b


@numba.njit(cache=True, nogil=True)
def _gen_leaf(enc, inp, alpha, leaf_mask, valpha, out):  # pragma: no cover - compiled
    one = np.uint64(1)
    allbits = np.uint64(0xFFFFFFFFFFFFFFFF)
    n = alpha.shape[0]
    for i in range(n):
        ca = enc[0, i, 0] ^ inp[0, i, 0] ^ enc[1, i, 0] ^ inp[1, i, 0]
        cb = enc[0, i, 1] ^ inp[0, i, 1] ^ enc[1, i, 1] ^ inp[1, i, 1]
        low = alpha[i] & leaf_mask
        # the table of [j < low] for j in 0..127: bits 0..low-1 set
        if low >= np.uint64(64):
            ta = allbits
            tb = (one << (low - np.uint64(64))) - one
        else:
            ta = (one << low) - one
            tb = np.uint64(0)
        if valpha[i]:
            ca ^= allbits
            cb ^= allbits
        out[i, 0] = ca ^ ta
        out[i, 1] = cb ^ tb


def gen(alpha: np.ndarray, domain_bits: int, seed0: np.ndarray, seed1: np.ndarray) -> DcfKey:
    """Correction words for keys of x -> [x < alpha] over ``domain_bits``-bit inputs.

    Args:
        alpha: (N,) uint64, each < 2^domain_bits.
        seed0, seed1: (N, 2) uint64 root seeds of parties 0 and 1 (from :func:`random_seeds`).
    """
    alpha = np.ascontiguousarray(alpha, dtype=np.uint64)
    n = alpha.shape[0]
    levels = tree_levels(domain_bits)
    cw = np.empty((levels, n, 2), dtype=np.uint64)
    vcw = np.zeros(n, dtype=np.uint64)
    leaf = np.empty((n, 2), dtype=np.uint64)

    def block(lo: int, hi: int) -> None:
        _gen_block(alpha[lo:hi], domain_bits, seed0[lo:hi], seed1[lo:hi], cw[:, lo:hi], vcw[lo:hi], leaf[lo:hi])

    _in_blocks(n, _GEN_BLOCK, block)
    return DcfKey(cw, vcw.astype(vcw_dtype(domain_bits)), leaf)


def _gen_block(alpha, domain_bits, seed0, seed1, cw, vcw, leaf) -> None:
    n = alpha.shape[0]
    levels = tree_levels(domain_bits)
    t0 = np.zeros(n, dtype=np.uint64)
    t1 = np.ones(n, dtype=np.uint64)
    valpha = np.zeros(n, dtype=np.uint64)
    inp = np.empty((4, n, 2), dtype=np.uint64)
    _gen_first(np.ascontiguousarray(seed0), np.ascontiguousarray(seed1), inp, levels == 0)
    if levels:
        aes = BlockBuffer((4, n))
        for level in range(levels):
            enc = aes.encrypt(inp)
            shift = np.uint64(domain_bits - 1 - level)
            _gen_level(enc, inp, alpha, shift, np.uint64(level), t0, t1, valpha, cw, vcw, level == levels - 1)
    leaf_in = np.ascontiguousarray(inp[:2])
    enc = BlockBuffer((2, n)).encrypt(leaf_in)
    _gen_leaf(enc, leaf_in, alpha, np.uint64((1 << (domain_bits - levels)) - 1), valpha, leaf)


# Elements are processed in blocks whose working set (inputs and AES outputs of
# one level) stays in L2, every level of a block before the next block.
_GEN_BLOCK = 1 << 13
_EVAL_BLOCK = 1 << 14
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _in_blocks(n: int, size: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(lo, hi)`` over blocks of ``size`` elements, on two threads when there are several."""
    bounds = [(lo, _builtin_min(lo + size, n)) for lo in range(0, n, size)]
    if len(bounds) <= 1:
        for lo, hi in bounds:
            work(lo, hi)
        return
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="primia-dcf")
    halves = [bounds[0::2], bounds[1::2]]

    def run(chunk: list[tuple[int, int]]) -> None:
        for lo, hi in chunk:
            work(lo, hi)

    for f in [_pool.submit(run, h) for h in halves]:
        f.result()


# -- evaluation -----------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _eval_first(seed, x, shift, inp, leaf):  # pragma: no cover - compiled
    one = np.uint64(1)
    for i in range(x.shape[0]):
        if leaf:
            inp[i, 0] = seed[i, 0] | np.uint64(2)
        else:
            inp[i, 0] = seed[i, 0] | ((x[i] >> shift) & one)
        inp[i, 1] = seed[i, 1]


@numba.njit(cache=True, nogil=True)
def _eval_level(enc, inp, x, level, next_shift, t, v, cw, vcw, leaf):  # pragma: no cover - compiled
    one = np.uint64(1)
    zero = np.uint64(0)
    clear = np.uint64(0xFFFFFFFFFFFFFFFC)
    for i in range(x.shape[0]):
        b = inp[i, 0] & one  # this level's direction, put there as the tweak
        tm = zero - t[i]  # all ones when this party applies the correction (branch-free)
        w = cw[level, i, 0]
        ca = enc[i, 0] ^ inp[i, 0] ^ (((w & clear) | ((w >> b) & one)) & tm)
        cb = enc[i, 1] ^ inp[i, 1] ^ (cw[level, i, 1] & tm)
        v[i] ^= ((ca >> one) & one) ^ ((vcw[i] >> level) & t[i])
        t[i] = ca & one
        if leaf:
            inp[i, 0] = (ca & clear) | np.uint64(2)
        else:
            inp[i, 0] = (ca & clear) | ((x[i] >> next_shift) & one)
        inp[i, 1] = cb


@numba.njit(cache=True, nogil=True)
def _eval_leaf(enc, inp, x, leaf_mask, t, v, leaf, out):  # pragma: no cover - compiled
    one = np.uint64(1)
    for i in range(x.shape[0]):
        ca = enc[i, 0] ^ inp[i, 0]
        cb = enc[i, 1] ^ inp[i, 1]
        if t[i]:
            ca ^= leaf[i, 0]
            cb ^= leaf[i, 1]
        j = x[i] & leaf_mask
        if j >= np.uint64(64):
            bit = (cb >> (j - np.uint64(64))) & one
        else:
            bit = (ca >> j) & one
        out[i] = np.uint8(v[i] ^ bit)


def evaluate(rank: int, seed: np.ndarray, key: DcfKey, x: np.ndarray, domain_bits: int) -> np.ndarray:
    """Party ``rank``'s XOR share (uint8 0/1) of [x < alpha] at public points x (each < 2^domain_bits)."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    n = x.shape[0]
    vcw = key.vcw.astype(np.uint64)
    out = np.empty(n, dtype=np.uint8)

    def block(lo: int, hi: int) -> None:
        _eval_block(rank, seed[lo:hi], key.cw[:, lo:hi], vcw[lo:hi], key.leaf[lo:hi], x[lo:hi], domain_bits, out[lo:hi])

    _in_blocks(n, _EVAL_BLOCK, block)
    return out


def _eval_block(rank, seed, cw, vcw, leaf, x, domain_bits, out) -> None:
    n = x.shape[0]
    levels = tree_levels(domain_bits)
    t = np.full(n, rank, dtype=np.uint64)
    v = np.zeros(n, dtype=np.uint64)
    inp = np.empty((n, 2), dtype=np.uint64)
    aes = BlockBuffer((n,))
    _eval_first(seed, x, np.uint64(max(domain_bits - 1, 0)), inp, levels == 0)
    for level in range(levels):
        enc = aes.encrypt(inp)
        next_shift = np.uint64(max(domain_bits - 2 - level, 0))
        _eval_level(enc, inp, x, np.uint64(level), next_shift, t, v, cw, vcw, level == levels - 1)
    enc = aes.encrypt(inp)
    _eval_leaf(enc, inp, x, np.uint64((1 << (domain_bits - levels)) - 1), t, v, leaf, out)
