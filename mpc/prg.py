"""Cryptographically secure, seed-expandable randomness (AES-128 in counter mode).

Every share, mask and piece of dealer material comes from here.  A 128-bit key
comes from ``os.urandom``; a *stream* is the AES-CTR keystream under that key
whose 128-bit counter block starts at ``stream_id << 64``, so up to 2^64
independent streams per key, each 2^68 bytes long, and two parties holding the
same key derive the same values from the same stream id without talking.

numpy's random module is never used for secret material.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["SEED_BYTES", "new_seed", "Stream", "random_bytes"]

SEED_BYTES = 16
_BLOCK = 16
# update_into works in chunks this size: the zero source stays in L2 cache.
_CHUNK = 1 << 18
# Above this size the keystream is produced by two threads (the GIL is released).
_PARALLEL_MIN = 1 << 21
_ZEROS = bytes(_CHUNK)
_pool: ThreadPoolExecutor | None = None


def new_seed() -> bytes:
    """A fresh 128-bit seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="primia-prg")
    return _pool


def _keystream_into(key: bytes, first_block: int, out: memoryview) -> None:
    """Write the AES-CTR keystream starting at counter ``first_block`` into ``out``."""
    counter = (first_block % (1 << 128)).to_bytes(16, "big")
    enc = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    n = len(out)
    full = n - n % _CHUNK
    for start in range(0, full, _CHUNK):
        enc.update_into(_ZEROS, out[start : start + _CHUNK])
    if full < n:
        enc.update_into(_ZEROS[: n - full], out[full:n])


def random_bytes(key: bytes, first_block: int, nbytes: int) -> np.ndarray:
    """``nbytes`` keystream bytes as a uint8 array (two threads for large requests)."""
    buf = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buf)
    if nbytes < _PARALLEL_MIN:
        _keystream_into(key, first_block, view)
        return buf
    half = (nbytes // 2) // _CHUNK * _CHUNK
    futures = [
        _workers().submit(_keystream_into, key, first_block, view[:half]),
        _workers().submit(_keystream_into, key, first_block + half // _BLOCK, view[half:]),
    ]
    for f in futures:
        f.result()
    return buf


class Stream:
    """A position in one AES-CTR keystream; each draw continues where the last ended."""

    __slots__ = ("_key", "_next_block")

    def __init__(self, key: bytes, stream_id: int):
        if len(key) != SEED_BYTES:
            raise ValueError(f"a stream key must be {SEED_BYTES} bytes, got {len(key)}")
        if not 0 <= stream_id < 1 << 64:
            raise ValueError(f"stream id {stream_id} must fit in 64 bits")
        self._key = key
        self._next_block = stream_id << 64

    def derive(self, stream_id: int) -> "Stream":
        """Another stream under the same key (for material tied to a name, not a request)."""
        return Stream(self._key, stream_id)

    def fill(self, out: np.ndarray) -> None:
        """Overwrite the bytes of ``out`` (C-contiguous) with the next keystream bytes.

        Reading a stream in pieces equals one long read as long as every piece but
        the last is a multiple of 16 bytes (a position is a whole AES block).
        """
        if not out.flags.c_contiguous:
            raise ValueError("a stream fills only C-contiguous arrays")
        view = memoryview(out.reshape(-1)).cast("B")
        _keystream_into(self._key, self._next_block, view)
        self._next_block += -(-len(view) // _BLOCK)

    def skip(self, nbytes: int) -> "Stream":
        """Move ahead ``nbytes`` (a multiple of 16) without producing them; returns the stream."""
        if nbytes < 0 or nbytes % _BLOCK:
            raise ValueError(f"a stream skips whole {_BLOCK}-byte blocks, not {nbytes} bytes")
        self._next_block += nbytes // _BLOCK
        return self

    def _take(self, nbytes: int) -> np.ndarray:
        out = random_bytes(self._key, self._next_block, nbytes)
        self._next_block += -(-nbytes // _BLOCK)
        return out

    def ring(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform elements of Z_2^64 as int64."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        count = int(np.prod(shape, dtype=np.int64))
        return self._take(8 * count).view(np.int64).reshape(shape)

    def bits(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform bits, one per uint8 element (0 or 1)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        count = int(np.prod(shape, dtype=np.int64))
        packed = self._take(-(-count // 8))
        return np.unpackbits(packed, count=count).reshape(shape)

    def seeds(self, count: int) -> np.ndarray:
        """``count`` fresh 128-bit seeds, as a (count, 16) uint8 array."""
        return self._take(SEED_BYTES * count).reshape(count, SEED_BYTES)
