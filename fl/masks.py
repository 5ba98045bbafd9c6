"""What every masked aggregation shares: updates in fixed point, mask streams, and mask seeds from key agreement.

Fixed point: an update u (float32) is encoded as encode_f(w · u) in the ring
Z_2^k, k = ``ring_bits`` (32 or 64), with f = ``frac_bits`` fractional bits, by
the same float64 operations as :func:`mpc.ring.encode`.  A node checks
max |u| < 2^(k-2-f) (:func:`update_limit`) so that a weighted sum of updates
cannot wrap; the error of a decoded mean is at most |U| · 2^-(f+1) / Σ_U w_i.

Masks: PRG(s) is the keystream of :class:`mpc.prg.Stream` (AES-128-CTR) under
the 16-byte seed s, stream :data:`MASK_STREAM`, read as ring elements.  Masks
are summed a cache-sized piece at a time (:func:`apply_masks`), optionally in
threads that each start their streams at their own offset.

Seeds: two parties that each hold an X25519 key derive the same seed as
HKDF-SHA256(X25519(sk_a, pk_b), info = purpose | context | names) (:func:`agree_seed`);
a party that does not know either private key learns nothing about it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mpc.errors import EncodingRangeError
from mpc.prg import SEED_BYTES, Stream
from mpc.ring import decode

__all__ = [
    "RING_DTYPES",
    "MASK_STREAM",
    "X25519_BYTES",
    "update_limit",
    "encode_update",
    "encode_add",
    "decode_sum",
    "prg_mask",
    "apply_masks",
    "agree_seed",
    "valid_x25519",
    "x25519_public",
    "x25519_from_seed",
]

RING_DTYPES: dict[int, np.dtype] = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
_SIGNED = {32: np.int32, 64: np.int64}
#: the stream id of masks under their seed (each seed is fresh per round and per use)
MASK_STREAM = 0
X25519_BYTES = 32
# Values per piece when decoding: 512 KiB of float64 temporaries stay in cache.
_CHUNK = 1 << 16
# Values per piece when expanding masks (the keystream piece and the accumulator piece, 2 x 512 KiB
# for 32-bit rings, stay in L2/L3): 128 Ki measured ~10 % less CPU than 64 Ki or 1 Mi here.  A multiple
# of 4, so that every piece is whole AES blocks and pieces of a stream equal one long read.
_MASK_CHUNK = 1 << 17


def update_limit(frac_bits: int, ring_bits: int) -> float:
    """Largest |update entry| (exclusive) a node may mask: the weighted sum then cannot wrap."""
    return float(2 ** (ring_bits - 2 - frac_bits))


_ENCODE_ADD = None


def _encode_add_kernel():
    """The numba kernel behind :func:`encode_add`, compiled on first use."""
    global _ENCODE_ADD
    if _ENCODE_ADD is None:
        from numba import njit

        @njit(cache=True, nogil=True)
        def kernel(values, weight, scale, limit, acc):  # pragma: no cover - compiled
            # acc[i] += rint(float64(values[i]) * weight * 2^f) mod 2^k, in one pass; the same float64
            # operations in the same order as mpc.ring.encode(values * weight), so the same ring
            # elements.  Returns the index of the first entry outside (-limit, limit) (or NaN), else -1.
            for i in range(values.size):
                v = np.float64(values[i])
                if not (v < limit and v > -limit):
                    return i
                acc[i] += np.uint64(np.int64(np.rint((v * weight) * scale)))
            return -1

        _ENCODE_ADD = kernel
    return _ENCODE_ADD


def encode_add(update: np.ndarray, weight: float, acc: np.ndarray, frac_bits: int, ring_bits: int) -> None:
    """acc += encode_f(weight · update) (mod 2^ring_bits), checking the range on the way.

    Raises:
        EncodingRangeError: an entry is not finite or |entry| >= :func:`update_limit`; ``acc`` is
            then partly updated (callers discard it).
    """
    values = np.ascontiguousarray(update).reshape(-1)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    if not acc.flags.c_contiguous:
        raise ValueError("the encoding is added in place to a contiguous array")
    limit = update_limit(frac_bits, ring_bits)
    bad = _encode_add_kernel()(values, float(weight), float(2**frac_bits), limit, acc.reshape(-1))
    if bad >= 0:
        raise EncodingRangeError(float(values[bad]), limit, frac_bits)


def encode_update(update: np.ndarray, weight: float, *, frac_bits: int, ring_bits: int) -> np.ndarray:
    """encode_f(weight · update) in Z_2^ring_bits, as unsigned integers.

    Raises:
        EncodingRangeError: an entry is not finite or |entry| >= :func:`update_limit`.
    """
    update = np.asarray(update)
    out = np.zeros(update.shape, dtype=RING_DTYPES[ring_bits])
    encode_add(update, weight, out, frac_bits, ring_bits)
    return out


def decode_sum(total: np.ndarray, *, frac_bits: int, ring_bits: int, scale: float = 1.0) -> np.ndarray:
    """Read a ring sum as signed fixed point and decode it to float64, times ``scale``."""
    signed = total.view(_SIGNED[ring_bits]).reshape(-1)
    out = np.empty(signed.shape, dtype=np.float64)
    for start in range(0, signed.size, _CHUNK):
        stop = start + _CHUNK
        out[start:stop] = decode(signed[start:stop].astype(np.int64), frac_bits)
        out[start:stop] *= scale
    return out.reshape(total.shape)


def _stream(seed: bytes, ring_bits: int, start: int) -> Stream:
    """PRG(seed) positioned at ring element ``start`` (a whole number of AES blocks in)."""
    return Stream(seed, MASK_STREAM).skip(start * (ring_bits // 8))


def prg_mask(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """``length`` uniform elements of Z_2^ring_bits: PRG(seed)."""
    out = np.empty(length, dtype=RING_DTYPES[ring_bits])
    stream = _stream(seed, ring_bits, 0)
    for start in range(0, length, _MASK_CHUNK):
        stream.fill(out[start: start + _MASK_CHUNK])
    return out


def _apply(acc: np.ndarray, mask: np.ndarray, sign: int) -> None:
    if sign > 0:
        acc += mask
    else:
        acc -= mask


def _apply_masks_range(acc: np.ndarray, masks: Sequence[tuple[bytes, int]], ring_bits: int, lo: int, hi: int,
                       overwrite: bool, decode_into: np.ndarray | None, decode_scale: float) -> None:
    """acc[lo:hi] (+)= Σ sign · PRG(seed)[lo:hi], a cache-sized piece at a time: each piece of every
    stream is generated into a scratch buffer and added while both are in cache.  With ``overwrite``
    the first mask (sign +1) is written straight into acc instead of being added; with
    ``decode_into``, each finished piece is also decoded there (signed, times ``decode_scale``)."""
    if hi <= lo:
        return
    streams = [(_stream(seed, ring_bits, lo), sign) for seed, sign in masks]
    scratch = np.empty(min(_MASK_CHUNK, hi - lo), dtype=acc.dtype)
    signed = _SIGNED[ring_bits]
    for start in range(lo, hi, _MASK_CHUNK):
        piece = acc[start: min(start + _MASK_CHUNK, hi)]
        buf = scratch[: piece.size]
        for index, (stream, sign) in enumerate(streams):
            if overwrite and index == 0:
                stream.fill(piece)
                continue
            stream.fill(buf)
            _apply(piece, buf, sign)
        if decode_into is not None:
            out = decode_into[start: start + piece.size]
            np.multiply(piece.view(signed), decode_scale, out=out, dtype=np.float64)


_POOL: ThreadPoolExecutor | None = None


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers < threads:  # noqa: SLF001 - grow on demand
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="primia-masks")
    return _POOL


def apply_masks(acc: np.ndarray, masks: Sequence[tuple[bytes, int]], ring_bits: int, *, overwrite: bool = False,
                threads: int = 1, decode_into: np.ndarray | None = None, decode_scale: float = 1.0) -> None:
    """acc += Σ sign · PRG(seed) over ``masks`` (or acc = ..., with ``overwrite`` and a first sign of +1);
    with ``decode_into``, also decode_into = signed(acc) · decode_scale, piece by piece.

    ``threads`` > 1 splits acc into that many ranges expanded side by side (AES-CTR can start
    anywhere; cryptography and numpy release the GIL for most of the work)."""
    if overwrite and (not masks or masks[0][1] != 1):
        raise ValueError("overwrite needs a first mask with sign +1")
    if not acc.flags.c_contiguous:
        raise ValueError("masks are applied in place to a contiguous array")
    flat = acc.reshape(-1)
    out = None if decode_into is None else decode_into.reshape(-1)
    if threads <= 1 or flat.size < 4 * _MASK_CHUNK:
        _apply_masks_range(flat, masks, ring_bits, 0, flat.size, overwrite, out, decode_scale)
        return
    bounds = [flat.size * t // threads // _MASK_CHUNK * _MASK_CHUNK for t in range(threads)] + [flat.size]
    futures = [_pool(threads).submit(_apply_masks_range, flat, masks, ring_bits, lo, hi, overwrite, out, decode_scale)
               for lo, hi in zip(bounds, bounds[1:])]
    for future in futures:
        future.result()


def x25519_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_from_seed(seed: bytes) -> X25519PrivateKey:
    """An X25519 key that a 16-byte seed determines (so that sharing the seed shares the key)."""
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"primia/secagg/mask-key/v1").derive(seed)
    return X25519PrivateKey.from_private_bytes(raw)


def valid_x25519(public: bytes) -> bool:
    """Whether ``public`` is an X25519 key an agreement can use (not a low-order point, whose shared secret is 0)."""
    if not isinstance(public, bytes) or len(public) != X25519_BYTES:
        return False
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def agree_seed(secret: X25519PrivateKey, peer_public: bytes, purpose: bytes, *labels: bytes) -> bytes:
    """The 16-byte seed both ends of an X25519 agreement derive, bound to ``purpose`` and ``labels``.

    Raises:
        ValueError: ``peer_public`` is not a valid X25519 public key (wrong length or a low-order point).
    """
    if not isinstance(peer_public, bytes) or len(peer_public) != X25519_BYTES:
        raise ValueError(f"an X25519 public key is {X25519_BYTES} bytes")
    shared = secret.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = b"|".join([purpose, *labels])
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)
