"""primia's MPC engine: n-party additive secret sharing over Z_2^64 with a trusted dealer.

Quick start::

    import mpc

    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0)
        w = ctx.share(b if ctx.rank == 1 else None, owner=1)
        return (x @ w).reveal()

    outs = mpc.run_local(program, parties=3)
"""

from .approximations import exp, gelu, hardsigmoid, hardswish, layer_norm, reciprocal, sigmoid, silu, softmax, tanh
from .context import Context
from .errors import (
    ApproximationRangeError,
    ComparisonOverflow,
    EncodingRangeError,
    PeerFailure,
    PeerTimeout,
    PrimiaError,
    ProtocolError,
)
from .functional import conv2d, linear, matmul
from .nonlinear import (
    adaptive_avg_pool2d,
    adaptive_max_pool2d,
    argmax,
    avg_pool2d,
    clamp,
    max_pool2d,
    maximum,
    minimum,
    relu,
    relu6,
)
from .ring import DEFAULT_FRAC_BITS, decode, encode
from .runtime import run_local
from .private import PrivateTensor
from .tensor import SharedTensor, concatenate, pad, stack, where_public

__all__ = [
    "Context",
    "SharedTensor",
    "PrivateTensor",
    "run_local",
    "run_processes",
    "conv2d",
    "linear",
    "matmul",
    "relu",
    "relu6",
    "clamp",
    "maximum",
    "minimum",
    "argmax",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "sigmoid",
    "tanh",
    "silu",
    "gelu",
    "hardsigmoid",
    "hardswish",
    "exp",
    "reciprocal",
    "softmax",
    "layer_norm",
    "concatenate",
    "stack",
    "pad",
    "where_public",
    "encode",
    "decode",
    "DEFAULT_FRAC_BITS",
    "PrimiaError",
    "EncodingRangeError",
    "ComparisonOverflow",
    "ApproximationRangeError",
    "ProtocolError",
    "PeerFailure",
    "PeerTimeout",
]


def __getattr__(name: str):
    # run_processes pulls in websockets; import it only when asked for.
    if name == "run_processes":
        from .net import run_processes

        return run_processes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
