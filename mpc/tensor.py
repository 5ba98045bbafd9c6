"""SharedTensor: an additively secret-shared fixed-point tensor with numpy-like semantics.

A SharedTensor is this party's share (an int64 array in Z_2^64) plus its scale
(the number of fractional bits).  Linear operations are local; products use
Beaver triples and are followed by exact truncation back to the larger operand
scale.  Public operands are Python/numpy values: integers join at scale 0
(exact, no truncation), reals are encoded at the context's fractional bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import approximations, bilinear, nonlinear
from .private import PrivateTensor
from .protocols.beaver import beaver
from .protocols.owned import owned_product
from .protocols.truncation import truncate
from .ring import decode, encode

if TYPE_CHECKING:
    from .context import Context

__all__ = ["SharedTensor", "concatenate", "stack", "pad", "where_public"]


def public_operand(value: Any, frac_bits: int) -> tuple[np.ndarray, int]:
    """A public operand as (ring array, scale): integers exact at scale 0, reals at ``frac_bits``."""
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        return encode(arr, 0), 0
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"cannot combine a SharedTensor with {type(value).__name__} of dtype {arr.dtype}")
    return encode(arr, frac_bits), frac_bits


class SharedTensor:
    """This party's additive share of a fixed-point tensor."""

    # Makes ``ndarray <op> SharedTensor`` call our reflected operators.
    __array_priority__ = 1000
    __slots__ = ("ctx", "share", "frac_bits")

    def __init__(self, ctx: "Context", share: np.ndarray, frac_bits: int):
        self.ctx = ctx
        self.share = share if isinstance(share, np.ndarray) else np.asarray(share, dtype=np.int64)
        self.frac_bits = frac_bits

    # -- shape ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.share.shape

    @property
    def ndim(self) -> int:
        return self.share.ndim

    @property
    def size(self) -> int:
        return self.share.size

    def __len__(self) -> int:
        return len(self.share)

    def __repr__(self) -> str:
        return f"SharedTensor(shape={self.shape}, frac_bits={self.frac_bits}, party={self.ctx.rank})"

    def _like(self, share: np.ndarray, frac_bits: int | None = None) -> "SharedTensor":
        return SharedTensor(self.ctx, share, self.frac_bits if frac_bits is None else frac_bits)

    # -- helpers -------------------------------------------------------------------
    def _public(self, value: Any) -> tuple[np.ndarray, int]:
        return public_operand(value, self.ctx.frac_bits)

    def rescale(self, frac_bits: int) -> "SharedTensor":
        """The same value at a higher scale (exact, local) or a lower one (truncation)."""
        if frac_bits == self.frac_bits:
            return self
        if frac_bits > self.frac_bits:
            return self._like(self.share << np.int64(frac_bits - self.frac_bits), frac_bits)
        return self._like(truncate(self.ctx, self.share, self.frac_bits - frac_bits), frac_bits)

    def _finish_product(self, product: np.ndarray, sx: int, sy: int) -> "SharedTensor":
        # A product sits at scale sx + sy; bring it back to the larger operand scale.
        drop = min(sx, sy)
        return self._like(truncate(self.ctx, product, drop), sx + sy - drop)

    # -- linear --------------------------------------------------------------------
    def __add__(self, other: Any) -> "SharedTensor":
        if isinstance(other, PrivateTensor):
            other = other.as_shared()
        if isinstance(other, SharedTensor):
            scale = max(self.frac_bits, other.frac_bits)
            return self._like(self.rescale(scale).share + other.rescale(scale).share, scale)
        ring, scale = self._public(other)
        target = max(self.frac_bits, scale)
        mine = self.rescale(target).share
        if self.ctx.rank != 0:
            return self._like(np.broadcast_to(mine, np.broadcast_shapes(mine.shape, ring.shape)).copy(), target)
        return self._like(mine + (ring << np.int64(target - scale)), target)

    __radd__ = __add__

    def __neg__(self) -> "SharedTensor":
        return self._like(-self.share)

    def __sub__(self, other: Any) -> "SharedTensor":
        if isinstance(other, PrivateTensor):
            other = other.as_shared()
        return self + (-other if isinstance(other, SharedTensor) else -np.asarray(other))

    def __rsub__(self, other: Any) -> "SharedTensor":
        return (-self) + other

    # -- products ------------------------------------------------------------------
    def __mul__(self, other: Any) -> "SharedTensor":
        if isinstance(other, PrivateTensor):
            return self._finish_product(owned_product(self.ctx, self.share, other, "mul"), self.frac_bits, other.frac_bits)
        if isinstance(other, SharedTensor):
            return self._finish_product(beaver(self.ctx, self.share, other.share, "mul"), self.frac_bits, other.frac_bits)
        ring, scale = self._public(other)
        return self._finish_product(self.share * ring, self.frac_bits, scale)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> "SharedTensor":
        if isinstance(other, SharedTensor):
            return self * other.reciprocal()
        return self * (1.0 / np.asarray(other, dtype=np.float64))

    def __matmul__(self, other: Any) -> "SharedTensor":
        if isinstance(other, PrivateTensor):
            return self._finish_product(owned_product(self.ctx, self.share, other, "matmul"), self.frac_bits, other.frac_bits)
        if isinstance(other, SharedTensor):
            z = beaver(self.ctx, self.share, other.share, "matmul")
            return self._finish_product(z, self.frac_bits, other.frac_bits)
        ring, scale = self._public(other)
        return self._finish_product(bilinear.evaluate("matmul", self.share, ring, {}), self.frac_bits, scale)

    def __rmatmul__(self, other: Any) -> "SharedTensor":
        ring, scale = self._public(other)
        return self._finish_product(bilinear.evaluate("matmul", ring, self.share, {}), scale, self.frac_bits)

    def square(self) -> "SharedTensor":
        return self * self

    # -- reductions ----------------------------------------------------------------
    def sum(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> "SharedTensor":
        return self._like(np.sum(self.share, axis=axis, keepdims=keepdims, dtype=np.int64))

    def mean(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> "SharedTensor":
        total = self.sum(axis=axis, keepdims=keepdims)
        count = self.size // max(total.size, 1) if self.size else 1
        return total * (1.0 / count)

    # -- shape manipulation (all local) -------------------------------------------
    def reshape(self, *shape: Any) -> "SharedTensor":
        return self._like(self.share.reshape(*shape))

    def flatten(self) -> "SharedTensor":
        return self._like(self.share.reshape(-1))

    def transpose(self, *axes: Any) -> "SharedTensor":
        return self._like(self.share.transpose(*axes))

    @property
    def T(self) -> "SharedTensor":
        return self._like(self.share.T)

    def swapaxes(self, a: int, b: int) -> "SharedTensor":
        return self._like(self.share.swapaxes(a, b))

    def squeeze(self, axis: int | tuple[int, ...] | None = None) -> "SharedTensor":
        return self._like(self.share.squeeze(axis))

    def expand_dims(self, axis: int) -> "SharedTensor":
        return self._like(np.expand_dims(self.share, axis))

    def broadcast_to(self, shape: tuple[int, ...]) -> "SharedTensor":
        return self._like(np.broadcast_to(self.share, shape).copy())

    def __getitem__(self, index: Any) -> "SharedTensor":
        if isinstance(index, SharedTensor):
            raise TypeError("indexing with a secret index is not supported; use a public index")
        return self._like(self.share[index])

    def copy(self) -> "SharedTensor":
        return self._like(self.share.copy())

    # -- opening -------------------------------------------------------------------
    def reveal(self, to: int | None = None) -> np.ndarray | None:
        """The plaintext as float64: to every party (one round), or to party ``to`` only.

        Parties other than ``to`` get ``None``.  Pending comparisons are checked
        first (``ctx.check_comparisons``: 2 rounds if any are pending), so a
        result whose comparisons left their domain is never revealed.

        Raises:
            ComparisonOverflow, ApproximationRangeError: from the check.
        """
        self.ctx.check_comparisons()
        if to is None:
            (ring,) = self.ctx.comm.open([self.share])
            return decode(ring, self.frac_bits)
        opened = self.ctx.comm.open_to(to, [self.share])
        return None if opened is None else decode(opened[0], self.frac_bits)

    # -- non-linear operations (mpc.nonlinear; comparisons return 0/1 at scale 0) ------
    # Everything below delegates to mpc.nonlinear or mpc.approximations; see docs/nonlinear.md for costs.
    __hash__ = None  # elementwise == makes SharedTensor unhashable, as numpy arrays

    def __lt__(self, other: Any) -> "SharedTensor":
        return nonlinear.less(self, other)

    def __le__(self, other: Any) -> "SharedTensor":
        return nonlinear.less_equal(self, other)

    def __gt__(self, other: Any) -> "SharedTensor":
        return nonlinear.greater(self, other)

    def __ge__(self, other: Any) -> "SharedTensor":
        return nonlinear.greater_equal(self, other)

    def __eq__(self, other: Any) -> "SharedTensor":  # type: ignore[override]
        return nonlinear.equal(self, other)

    def __ne__(self, other: Any) -> "SharedTensor":  # type: ignore[override]
        return nonlinear.not_equal(self, other)

    def __abs__(self) -> "SharedTensor":
        return nonlinear.absolute(self)

    def relu(self) -> "SharedTensor":
        return nonlinear.relu(self)

    def relu6(self) -> "SharedTensor":
        return nonlinear.relu6(self)

    def sign(self) -> "SharedTensor":
        return nonlinear.sign(self)

    def abs(self) -> "SharedTensor":
        return nonlinear.absolute(self)

    def clamp(self, lo: Any = None, hi: Any = None) -> "SharedTensor":
        return nonlinear.clamp(self, lo, hi)

    clip = clamp

    def maximum(self, other: Any) -> "SharedTensor":
        return nonlinear.maximum(self, other)

    def minimum(self, other: Any) -> "SharedTensor":
        return nonlinear.minimum(self, other)

    def max(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> "SharedTensor":
        return nonlinear.max(self, axis=axis, keepdims=keepdims)

    def min(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> "SharedTensor":
        return nonlinear.min(self, axis=axis, keepdims=keepdims)

    def argmax(self, axis: int | None = None, keepdims: bool = False, *, one_hot: bool = False) -> "SharedTensor":
        return nonlinear.argmax(self, axis=axis, keepdims=keepdims, one_hot=one_hot)

    def argmin(self, axis: int | None = None, keepdims: bool = False, *, one_hot: bool = False) -> "SharedTensor":
        return nonlinear.argmin(self, axis=axis, keepdims=keepdims, one_hot=one_hot)

    def exp(self) -> "SharedTensor":
        return approximations.exp(self)

    def reciprocal(self, **options: Any) -> "SharedTensor":
        return approximations.reciprocal(self, **options)

    def inv_sqrt(self, **options: Any) -> "SharedTensor":
        return approximations.inv_sqrt(self, **options)

    def sqrt(self, **options: Any) -> "SharedTensor":
        return approximations.sqrt(self, **options)

    def sigmoid(self) -> "SharedTensor":
        return approximations.sigmoid(self)

    def tanh(self) -> "SharedTensor":
        return approximations.tanh(self)

    def softmax(self, axis: int = -1) -> "SharedTensor":
        return approximations.softmax(self, axis=axis)

    def silu(self) -> "SharedTensor":
        return approximations.silu(self)

    def gelu(self, approximate: str = "none") -> "SharedTensor":
        return approximations.gelu(self, approximate)

    def hardsigmoid(self) -> "SharedTensor":
        return approximations.hardsigmoid(self)

    def hardswish(self) -> "SharedTensor":
        return approximations.hardswish(self)

    def layer_norm(self, axis: int | tuple[int, ...] = -1, eps: float = 1e-5, **options: Any) -> "SharedTensor":
        return approximations.layer_norm(self, axis, eps, **options)


def _same_ctx(tensors: Sequence[SharedTensor]) -> "Context":
    if not tensors:
        raise ValueError("need at least one SharedTensor")
    return tensors[0].ctx


def _aligned(tensors: Sequence[SharedTensor]) -> tuple[list[np.ndarray], int]:
    scale = max(t.frac_bits for t in tensors)
    return [t.rescale(scale).share for t in tensors], scale


def concatenate(tensors: Sequence[SharedTensor], axis: int = 0) -> SharedTensor:
    shares, scale = _aligned(tensors)
    return SharedTensor(_same_ctx(tensors), np.concatenate(shares, axis=axis), scale)


def stack(tensors: Sequence[SharedTensor], axis: int = 0) -> SharedTensor:
    shares, scale = _aligned(tensors)
    return SharedTensor(_same_ctx(tensors), np.stack(shares, axis=axis), scale)


def pad(x: SharedTensor, pad_width: Any, value: float = 0.0) -> SharedTensor:
    """Constant padding with a public value (numpy ``pad_width`` semantics)."""
    padded = np.pad(x.share, pad_width, mode="constant", constant_values=0)
    out = SharedTensor(x.ctx, padded, x.frac_bits)
    if value:
        interior = np.zeros(x.shape, dtype=bool)
        border = ~np.pad(~interior, pad_width, mode="constant", constant_values=False)
        out = out + np.where(border, value, 0.0)
    return out


def where_public(condition: np.ndarray, x: SharedTensor, y: SharedTensor) -> SharedTensor:
    """Select elementwise by a *public* condition (local)."""
    shares, scale = _aligned([x, y])
    return SharedTensor(x.ctx, np.where(condition, shares[0], shares[1]), scale)
