"""Fixed-key AES over whole batches of 128-bit blocks, for the DCF trees.

The DCF's pseudo-random generator expands one 128-bit seed into the next
level's seed, control bit and output bit as H(x) = AES_K(x) XOR x (the
Matyas-Meyer-Oseas construction) with a *fixed, public* key K.  The key
schedule is done once and the expansion of a whole tree level — one block per
element — is a single AES-ECB call over a contiguous buffer, which OpenSSL runs
with AES-NI at several GB/s.  With AES modelled as a random permutation, MMO is
a correlation-robust hash (Guo, Katz, Wang, Yu, "Efficient and secure
multiparty computation from fixed-key block ciphers", S&P 2020, §4); DCF seeds
are secret and uniform, so every input is unpredictable to the other party.

Blocks are stored as (..., 2) uint64 arrays (two little-endian words).  The
XOR with the input is left to the caller's fused kernel; this module only runs
the cipher.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["FIXED_KEY", "BLOCK_BYTES", "BlockBuffer"]

BLOCK_BYTES = 16
#: public and fixed: the protocol's secrecy rests on the seeds, not on this key
FIXED_KEY = hashlib.sha256(b"primia/fss/dcf/fixed-key-aes/v1").digest()[:16]


class BlockBuffer:
    """A reusable output buffer for AES_K over arrays of ``shape + (2,)`` uint64 blocks.

    ``update_into`` insists on one block of slack past the output, so the
    buffer is 16 bytes longer than the blocks it holds.  Callers keep batches
    cache-sized and parallelise over batches (:mod:`mpc.fss.dcf`).
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape) + (2,)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * 8
        self._raw = np.empty(self.nbytes + BLOCK_BYTES, dtype=np.uint8)
        self.blocks = self._raw[: self.nbytes].view(np.uint64).reshape(self.shape)
        # ECB keeps no state between calls, so one encryptor serves every call (~5 us to make)
        self._encryptor = Cipher(algorithms.AES(FIXED_KEY), modes.ECB()).encryptor()

    def encrypt(self, src: np.ndarray) -> np.ndarray:
        """``self.blocks = AES_K(src)`` block by block; returns ``self.blocks``."""
        if src.dtype != np.uint64 or src.shape != self.shape or not src.flags.c_contiguous:
            raise ValueError(f"expected C-contiguous uint64 blocks of shape {self.shape}, got {src.dtype} {src.shape}")
        if self.nbytes:
            self._encryptor.update_into(memoryview(src.reshape(-1)).cast("B"), memoryview(self._raw))
        return self.blocks
