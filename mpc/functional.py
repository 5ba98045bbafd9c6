"""Layer-level operations on shared tensors, with torch.nn.functional semantics."""

from __future__ import annotations


import numpy as np

from . import bilinear
from .private import PrivateTensor
from .protocols.beaver import beaver
from .protocols.owned import owned_product
from .tensor import SharedTensor, public_operand

__all__ = ["conv2d", "linear", "matmul"]


def conv2d(
    x: SharedTensor | np.ndarray,
    weight: SharedTensor | np.ndarray,
    bias: SharedTensor | np.ndarray | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> SharedTensor:
    """2-D convolution, NCHW input and OIHW weight, as ``torch.nn.functional.conv2d``.

    Either operand may be public (then the convolution is local, exact in the
    ring); both shared costs one Beaver round.  Followed by one truncation.
    """
    params = bilinear.conv_params(stride, padding, dilation, groups)
    if isinstance(x, SharedTensor) and isinstance(weight, PrivateTensor):
        z = owned_product(x.ctx, x.share, weight, "conv2d", params)
        out = x._finish_product(z, x.frac_bits, weight.frac_bits)
    elif isinstance(x, SharedTensor) and isinstance(weight, SharedTensor):
        z = beaver(x.ctx, x.share, weight.share, "conv2d", params)
        out = x._finish_product(z, x.frac_bits, weight.frac_bits)
    elif isinstance(x, SharedTensor):
        ring, scale = public_operand(weight, x.ctx.frac_bits)
        out = x._finish_product(bilinear.evaluate("conv2d", x.share, ring, params), x.frac_bits, scale)
    elif isinstance(weight, SharedTensor):
        ring, scale = public_operand(x, weight.ctx.frac_bits)
        out = weight._finish_product(bilinear.evaluate("conv2d", ring, weight.share, params), scale, weight.frac_bits)
    else:
        raise TypeError("conv2d needs at least one SharedTensor operand")
    if isinstance(bias, PrivateTensor):
        bias = bias.as_shared()
    if bias is not None:
        bias_b = bias.reshape(1, -1, 1, 1) if isinstance(bias, SharedTensor) else np.asarray(bias).reshape(1, -1, 1, 1)
        out = out + bias_b
    return out


def matmul(a: SharedTensor | np.ndarray, b: SharedTensor | np.ndarray) -> SharedTensor:
    if isinstance(a, SharedTensor):
        return a @ b
    if isinstance(b, SharedTensor):
        return b.__rmatmul__(a)
    raise TypeError("matmul needs at least one SharedTensor operand")


def linear(
    x: SharedTensor,
    weight: SharedTensor | PrivateTensor | np.ndarray,
    bias: SharedTensor | np.ndarray | None = None,
) -> SharedTensor:
    """``x @ weight.T + bias`` as ``torch.nn.functional.linear`` (weight is (out, in))."""
    if isinstance(weight, PrivateTensor):
        out = x._finish_product(owned_product(x.ctx, x.share, weight, "linear"), x.frac_bits, weight.frac_bits)
    elif isinstance(weight, SharedTensor):
        out = x._finish_product(beaver(x.ctx, x.share, weight.share, "linear"), x.frac_bits, weight.frac_bits)
    else:
        out = matmul(x, np.asarray(weight).T)
    if isinstance(bias, PrivateTensor):
        bias = bias.as_shared()
    return out if bias is None else out + bias
