"""Every op kind the bridge runs, one record each (:class:`bridge.registry.OpKind`), by family.

=================  ==============================================================
family             kinds
=================  ==============================================================
:mod:`.products`   conv2d, conv_transpose2d, linear, affine, mul, matmul
:mod:`.arith`      add, add_const, scale_const, bias, param
:mod:`.activations`  relu, clamp, sigmoid, tanh, silu, hardsigmoid, hardswish, gelu, softmax
:mod:`.pooling`    max_pool2d, adaptive_max_pool2d, avg_pool2d, adaptive_avg_pool2d, mean, sum, resize
:mod:`.shape`      reshape, permute, index, cat, expand, pad, roll
:mod:`.norm`       layer_norm (and BatchNorm's rules, which emit affine)
=================  ==============================================================

Trace rules that emit no kind of their own: attention (:mod:`.attention`), the
identities of eval mode (:data:`.shape.IDENTITY_RULES`), and refusals by
name (:mod:`.refusals`).
"""

from __future__ import annotations

from types import MappingProxyType

from ..registry import OpKind, TorchRule, records_table
from . import activations, arith, attention, norm, pooling, products, refusals, shape

__all__ = ["KINDS", "TORCH_RULES", "SUPPORTED"]

#: kind -> its record
KINDS: MappingProxyType[str, OpKind] = MappingProxyType(records_table(
    products.RECORDS, arith.RECORDS, activations.RECORDS, pooling.RECORDS, shape.RECORDS, norm.RECORDS,
))

#: every trace rule, with the torch names it handles
TORCH_RULES: tuple[TorchRule, ...] = (
    *(rule for record in KINDS.values() for rule in record.torch),
    *norm.BATCHNORM_RULES, *attention.RULES, *shape.IDENTITY_RULES, *refusals.RULES,
)

#: what converts, for error messages and the docs
SUPPORTED = "; ".join(record.summary for record in KINDS.values()) + \
    "; multi-head attention (nn.MultiheadAttention with batch_first=True, F.scaled_dot_product_attention, " \
    "torchvision's Swin window attention); Dropout, stochastic depth and Identity (eval mode)"
