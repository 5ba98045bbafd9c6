"""primia's MPC engine: n-party additive secret sharing over Z_2^64 with a trusted dealer.

Quick start::

    import mpc

    def program(ctx):
        x = ctx.share(a if ctx.rank == 0 else None, owner=0)
        w = ctx.share(b if ctx.rank == 1 else None, owner=1)
        return (x @ w).reveal()

    outs = mpc.run_local(program, parties=3)
"""

from .context import Context
from .errors import EncodingRangeError, PeerFailure, PeerTimeout, PrimiaError, ProtocolError
from .functional import conv2d, linear, matmul
from .ring import DEFAULT_FRAC_BITS, decode, encode
from .runtime import run_local
from .private import PrivateTensor
from .tensor import SharedTensor, concatenate, pad, stack, where_public

__all__ = [
    "Context",
    "SharedTensor",
    "PrivateTensor",
    "run_local",
    "conv2d",
    "linear",
    "matmul",
    "concatenate",
    "stack",
    "pad",
    "where_public",
    "encode",
    "decode",
    "DEFAULT_FRAC_BITS",
    "PrimiaError",
    "EncodingRangeError",
    "ProtocolError",
    "PeerFailure",
    "PeerTimeout",
]
