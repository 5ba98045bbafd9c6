"""PrivateTensor: a tensor one party knows in the clear and the others know only the shape of.

The typical case is a model owner's weights in encrypted inference.  A product
of a shared tensor with a private one needs far less than a Beaver product of
two shared tensors (see :mod:`mpc.protocols.owned`): the owner's masked value
W - B is opened once and reused, and each product then costs one message of
the shared operand's size, from the other parties to the owner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:
    from .context import Context
    from .tensor import SharedTensor

__all__ = ["PrivateTensor"]


class PrivateTensor:
    """Party ``owner``'s plaintext tensor (fixed point); ``value`` is None elsewhere."""

    def __init__(self, ctx: "Context", owner: int, value: np.ndarray | None, shape: tuple[int, ...], frac_bits: int, ident: int):
        self.ctx = ctx
        self.owner = owner
        self.value = value
        self.shape = shape
        self.frac_bits = frac_bits
        self.ident = ident
        self._delta: np.ndarray | None = None  # W - B, known to every party once opened

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __repr__(self) -> str:
        return f"PrivateTensor(shape={self.shape}, owner={self.owner}, frac_bits={self.frac_bits})"

    def prepare(self) -> np.ndarray:
        """Open W - B to every party (one round, once); B is this tensor's fixed dealer mask.

        Call it ahead of time (when the model is loaded) to keep it out of the
        per-input cost.  Returns W - B.
        """
        if self._delta is None:
            from .protocols.owned import open_masked_weight

            self._delta = open_masked_weight(self.ctx, self)
        return self._delta

    def as_shared(self) -> "SharedTensor":
        """A sharing of the same value: the owner holds it, the others hold zeros (no communication)."""
        from .tensor import SharedTensor

        share = self.value.copy() if self.ctx.rank == self.owner else np.zeros(self.shape, dtype=np.int64)
        return SharedTensor(self.ctx, share, self.frac_bits)
