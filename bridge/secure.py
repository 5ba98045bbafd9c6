"""Executing a plan on secret-shared tensors: the encrypted forward pass.

Roles: party ``DATA_OWNER`` (0) holds the image, party ``MODEL_OWNER`` (1) the
weights; both know the plan (the architecture).  Weights never get shared in
the usual sense: they stay the model owner's :class:`~mpc.PrivateTensor`\\ s,
masked once per session (W - B opened in one round for all of them), and each
product with an activation costs one one-way message of the activation's size
(:mod:`mpc.protocols.owned`).

Fixed point.  Activations live at ``act_bits`` fractional bits (default 12),
multiplied parameters at ``weight_bits`` (default 20), independently of the
context's ``frac_bits``; biases are added at the product scale.  Comparisons
(ReLU, clamp, max-pooling) run in a ``comparison_bits`` domain, exact while
every compared value stays below 2^(comparison_bits - 1 - act_bits) in
magnitude: by default 22 bits, i.e. |v| < 512, which normalised image
classifiers stay far inside; :func:`comparison_bits_for` sizes the domain for
a measured peak.  All of these are checked to agree between the parties.

Scales are tracked lazily.  A linear op's result stays at the product scale
``act_bits + weight_bits`` and is truncated only when a consumer needs the
activation scale — a nonlinear op, another product, or the output.  Additions
work at any scale (the lower operand is shifted up, exactly), so a residual
``conv + shortcut`` is truncated once, not twice, and ``avg_pool``'s division
rides on the same truncation.  Each truncation is one round
(:mod:`mpc.protocols.truncation`).

Per op (2 parties; "round" = one message exchange among computing parties):

=====================  =======================================================
conv2d/linear/affine   1 round (x - A to the model owner) + the dealer's C
relu, clamp, max_pool  the nonlinear protocols' rounds (mpc.nonlinear)
avg/adaptive pool      local window sums; the division joins a truncation
add, cat, reshape      local
=====================  =======================================================
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

import numpy as np

import mpc
import mpc.kernels
from mpc.errors import ProtocolError
from mpc.protocols.compare import MAX_BITS, MIN_BITS, check_comparison_options
from mpc.private import PrivateTensor
from mpc.protocols.owned import owned_product, weight_mask
from mpc.ring import encode
from mpc.tensor import SharedTensor

from .fixed import encode_weights, param_layout
from .plan import Op, Plan
from .windows import adaptive_counts, adaptive_sum, avg_pool_divisors, window_sum

__all__ = [
    "DATA_OWNER",
    "MODEL_OWNER",
    "DEFAULT_ACT_BITS",
    "DEFAULT_WEIGHT_BITS",
    "DEFAULT_RANGE_BITS",
    "comparison_bits_for",
    "warm_up",
    "MAX_BATCH",
    "EncryptedModel",
    "OpProfile",
    "SECURE_OPS",
]

DATA_OWNER = 0
MODEL_OWNER = 1
# PrivateTensor ids the bridge uses; disjoint from Context.private()'s counter.
_IDENT_BASE = 1 << 40
#: fractional bits of activations and of multiplied parameters
DEFAULT_ACT_BITS = 12
DEFAULT_WEIGHT_BITS = 20
#: compared values stay below 2^DEFAULT_RANGE_BITS = 512 in magnitude (sets the comparison domain)
DEFAULT_RANGE_BITS = 9
#: most images in one encrypted forward pass
MAX_BATCH = 1024
# fractional bits of the public reciprocals 1/d in average pooling
_RECIPROCAL_BITS = 24


def comparison_bits_for(act_bits: int, peak: float = 2.0**DEFAULT_RANGE_BITS) -> int:
    """The smallest comparison domain exact for compared values below ``peak`` in magnitude.

    A value v at ``act_bits`` is the ring integer v * 2^act_bits; the domain l
    must hold |v| * 2^act_bits < 2^(l - 1).
    """
    need = act_bits + 1 + max(int(np.ceil(np.log2(max(peak, 1.0)))), 0)
    if need > MAX_BITS:
        raise ValueError(f"values up to {peak:g} do not fit any comparison domain at {act_bits} fractional bits")
    return max(need, MIN_BITS)


def warm_up(ctx: mpc.Context, *, act_bits: int = DEFAULT_ACT_BITS, comparison_bits: int | None = None,
            **_other_options: object) -> None:
    """Load the compiled kernels every process of a session needs, before any clock starts.

    Ring products load in this process; a ReLU and a max-pool over a 4x4 sharing
    of zero go through the dealer, so its key generation loads too (a few
    rounds, a few kilobytes; callers leave them out of their figures).  Every
    computing party calls it, in the same place.  Takes the same options as
    :class:`EncryptedModel`.
    """
    mpc.kernels.warmup()
    saved = ctx.comparison_bits
    ctx.comparison_bits = comparison_bits or comparison_bits_for(act_bits)
    try:
        zero = SharedTensor(ctx, np.zeros((1, 1, 4, 4), dtype=np.int64), act_bits)  # shares of 0: no messages
        mpc.max_pool2d(zero.relu(), 3, stride=2, padding=1)
    finally:
        ctx.comparison_bits = saved


class EncryptedModel:
    """A plan and this party's handle on the model owner's weights, ready to run on shared inputs.

    Construction (every computing party, same order):
      1. the parties exchange the plan's digest (1 round) and stop if they differ;
      2. the model owner opens W - B for every multiplied parameter, all in one
         message (1 round, 8 B per weight element, once per session).

    Args:
        ctx: this party's context.
        plan: the architecture (both parties build it, e.g. with :func:`bridge.convert`).
        weights: the float weights (model owner only; ``None`` elsewhere).
        act_bits, weight_bits: fractional bits of activations and of multiplied parameters.
        comparison_bits: the comparison domain (default: compared values below 512).
    """

    def __init__(self, ctx: mpc.Context, plan: Plan, weights: dict[str, np.ndarray] | None, *,
                 owner: int = MODEL_OWNER, act_bits: int = DEFAULT_ACT_BITS,
                 weight_bits: int = DEFAULT_WEIGHT_BITS, comparison_bits: int | None = None):
        self.ctx = ctx
        self.plan = plan
        self.owner = owner
        for name, bits in (("act_bits", act_bits), ("weight_bits", weight_bits)):
            if not isinstance(bits, int) or not 4 <= bits <= 24:
                raise ValueError(f"{name} must be an int in [4, 24], got {bits!r}")
        if act_bits + weight_bits > 40:
            raise ValueError(f"act_bits + weight_bits = {act_bits + weight_bits} leaves too little range (at most 40)")
        self.act_bits = act_bits
        self.weight_bits = weight_bits
        if comparison_bits is None:
            comparison_bits = comparison_bits_for(act_bits)
        _, self.comparison_bits = check_comparison_options(ctx.comparison, comparison_bits, ctx.parties)
        unknown = sorted({op.kind for op in plan.ops} - SECURE_OPS.keys())
        if unknown:
            raise ValueError(f"the plan has ops the encrypted executor cannot run: {unknown}")
        _check_same_setup(ctx, plan, act_bits, weight_bits, self.comparison_bits)
        layout = param_layout(plan)
        ring = None
        if ctx.rank == owner:
            if weights is None:
                raise ValueError(f"party {owner} owns the model but passed no weights")
            ring = encode_weights(plan, weights, act_bits=self.act_bits, weight_bits=self.weight_bits)
        self.weights: dict[str, PrivateTensor] = {}
        self.offsets: dict[str, np.ndarray] = {}
        for i, (name, (shape, role)) in enumerate(layout.items()):
            value = None if ring is None else ring[name]
            if role == "weight":
                self.weights[name] = PrivateTensor(ctx, owner, value, shape, self.weight_bits, _IDENT_BASE + i)
            else:
                # an added parameter is a sharing as it stands: the owner's value, zeros elsewhere
                self.offsets[name] = value if value is not None else np.zeros(shape, dtype=np.int64)
        _prepare_all(ctx, owner, list(self.weights.values()))
        self._requests: dict[tuple[int, ...], list[tuple[str, dict]]] = {}

    def share_input(self, x: np.ndarray | None) -> SharedTensor:
        """Secret-share the data owner's batch at the activation scale (others pass ``None``).

        Raises:
            ProtocolError: (at the other parties) the data owner announced a batch the
                plan does not take, or more than ``MAX_BATCH`` images.
        """
        shared = self.ctx.share(x, owner=DATA_OWNER, frac_bits=self.act_bits)
        shape = tuple(shared.shape)
        if shape[1:] != tuple(self.plan.input_shape) or not 1 <= shape[0] <= MAX_BATCH:
            raise ProtocolError(DATA_OWNER, f"announced a batch of shape {shape}; the model takes "
                                            f"(N, {', '.join(map(str, self.plan.input_shape))}) with N <= {MAX_BATCH}")
        return shared

    def forward(self, x: SharedTensor, *, on_op: Callable[[Op, float], None] | None = None) -> SharedTensor:
        """The plan's output (logits) at the activation scale, as shares.

        ``on_op(op, seconds)`` is called after each op (for profiles: read ``ctx.stats()`` there).
        """
        if tuple(x.shape[1:]) != tuple(self.plan.input_shape):
            expected = ", ".join(map(str, self.plan.input_shape))
            raise ValueError(f"input has shape {x.shape}, the plan expects (N, {expected})")
        saved_bits, self.ctx.comparison_bits = self.ctx.comparison_bits, self.comparison_bits
        try:
            return self._forward(x, on_op)
        finally:
            self.ctx.comparison_bits = saved_bits

    def _forward(self, x: SharedTensor, on_op: Callable[[Op, float], None] | None) -> SharedTensor:
        values: dict[str, SharedTensor] = {self.plan.input_name: x}
        truncated: dict[str, SharedTensor] = {}
        remaining = self.plan.use_counts()

        def need(name: str) -> SharedTensor:
            """The value at the activation scale, truncated once however many ops read it."""
            v = values[name]
            if v.frac_bits == self.act_bits:
                return v
            if name not in truncated:
                truncated[name] = v.rescale(self.act_bits)
            return truncated[name]

        for op in self.plan.ops:
            start = time.perf_counter()
            values[op.name] = SECURE_OPS[op.kind](self, op, values, need)
            if on_op is not None:
                on_op(op, time.perf_counter() - start)
            for i in op.inputs:
                remaining[i] -= 1
                if remaining[i] == 0 and i != self.plan.output:
                    values.pop(i, None)
                    truncated.pop(i, None)
        return need(self.plan.output)

    def predict(self, x: SharedTensor, *, to: int = DATA_OWNER,
                on_op: Callable[[Op, float], None] | None = None) -> np.ndarray | None:
        """The logits opened to party ``to`` only (``None`` elsewhere).

        If the plan ends in a softmax, what is opened is n z - sum(z) over the
        softmax axis (local and exact), and party ``to`` divides by the public
        n: it learns z - mean(z), exactly the information in softmax(z), and
        nothing about the constant the softmax discards.
        """
        out = self._forward_prefetched(x, on_op)
        start = time.perf_counter()
        axis = self.plan.softmax_axis
        if axis is None:
            logits = out.reveal(to=to)
        else:
            n = out.shape[axis]
            total = out.share.sum(axis=axis, keepdims=True, dtype=np.int64)
            scaled = SharedTensor(self.ctx, out.share * np.int64(n) - total, out.frac_bits).reveal(to=to)
            logits = None if scaled is None else scaled / n
        if on_op is not None:
            on_op(_REVEAL, time.perf_counter() - start)
        return logits

    def _forward_prefetched(self, x: SharedTensor, on_op: Callable[[Op, float], None] | None) -> SharedTensor:
        """The forward pass, with the dealer's material asked for ahead when the shape was seen before.

        A pass's dealer requests depend only on the plan and the input shape.
        The first pass of each shape records them; later passes hand the whole
        list to :meth:`~mpc.dealer.DealerClient.prefetch` first, so the dealer
        makes the material while the parties compute instead of between steps.
        Both parties see the same shapes in the same order, so they agree.
        """
        requests = self._requests.get(x.shape)
        if requests is not None:
            self.ctx.dealer.prefetch(requests)
            return self.forward(x, on_op=on_op)
        recorder = _RecordingDealer(self.ctx.dealer)
        self.ctx.dealer = recorder
        try:
            out = self.forward(x, on_op=on_op)
        finally:
            self.ctx.dealer = recorder.inner
        self._requests[x.shape] = recorder.requests
        return out

    # -- products with the owner's parameters ----------------------------------------
    def _product(self, x: SharedTensor, weight: str, op: str, params: dict | None = None) -> SharedTensor:
        w = self.weights[weight]
        z = owned_product(self.ctx, x.share, w, op, params)
        return SharedTensor(self.ctx, z, x.frac_bits + w.frac_bits)

    def _offset(self, y: SharedTensor, name: str) -> SharedTensor:
        return SharedTensor(self.ctx, y.share + self.offsets[name], y.frac_bits)


_REVEAL = Op(name="<reveal>", kind="reveal", inputs=())


class _RecordingDealer:
    """Stands in for a context's dealer client during one pass and notes every request."""

    def __init__(self, inner: object):
        self.inner = inner
        self.requests: list[tuple[str, dict]] = []

    def get(self, kind: str, params: dict) -> tuple:
        self.requests.append((kind, params))
        return self.inner.get(kind, params)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class OpProfile:
    """An ``on_op`` hook adding up seconds, rounds and bytes per op kind (this party's view).

    Create it just before the forward pass: costs are measured from then on.
    """

    def __init__(self, ctx: mpc.Context):
        self.ctx = ctx
        self.last = ctx.stats()
        self.kinds: dict[str, dict[str, float]] = {}

    def __call__(self, op: Op, seconds: float) -> None:
        now = self.ctx.stats()
        row = self.kinds.setdefault(op.kind, {"ops": 0, "seconds": 0.0, "rounds": 0, "online_bytes": 0,
                                              "dealer_bytes": 0})
        row["ops"] += 1
        row["seconds"] += seconds
        row["rounds"] += now["rounds"] - self.last["rounds"]
        row["online_bytes"] += (now["bytes_sent"] + now["bytes_received"]
                                - self.last["bytes_sent"] - self.last["bytes_received"])
        row["dealer_bytes"] += (now["dealer_bytes"] + now["dealer_bytes_sent"]
                                - self.last["dealer_bytes"] - self.last["dealer_bytes_sent"])
        self.last = now


def _check_same_setup(ctx: mpc.Context, plan: Plan, act_bits: int, weight_bits: int, comparison_bits: int) -> None:
    """Both parties must run the same plan with the same fixed-point settings (1 round, 32 bytes)."""
    settings = f"{plan.digest()}/{act_bits}/{weight_bits}/{comparison_bits}/{ctx.truncation}/{ctx.comparison}"
    digest = np.frombuffer(hashlib.sha256(settings.encode()).digest(), dtype=np.uint8)
    peers = ctx.comm.peers
    got = ctx.comm.exchange({p: digest for p in peers}, {p: (digest.shape, np.uint8) for p in peers})
    for peer, theirs in got.items():
        if not np.array_equal(theirs, digest):
            raise ProtocolError(peer, "runs a different model or fixed-point setting (plan and settings digests "
                                      "differ); both parties must convert the same model at the same input size "
                                      "with the same act_bits, weight_bits, comparison bits and truncation")


def _prepare_all(ctx: mpc.Context, owner: int, tensors: list[PrivateTensor]) -> None:
    """Open W - B for every tensor in one message (PrivateTensor.prepare does one round each)."""
    if not tensors:
        return
    others = [p for p in range(ctx.parties) if p != owner]
    sizes = [t.size for t in tensors]
    if ctx.rank == owner:
        flat = np.concatenate([(t.value - weight_mask(ctx, t)).reshape(-1) for t in tensors])
        ctx.comm.exchange({p: flat for p in others}, {})
    else:
        (flat,) = ctx.comm.exchange({}, {owner: ((sum(sizes),), np.int64)}).values()
    start = 0
    for t, n in zip(tensors, sizes):
        t._delta = flat[start:start + n].reshape(t.shape)  # the same W - B prepare() would open
        start += n


# -- the op table --------------------------------------------------------------------------
Need = Callable[[str], SharedTensor]
Values = dict[str, SharedTensor]


def _conv(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    a = op.attrs
    params = {"stride": list(a["stride"]), "padding": list(a["padding"]),
              "dilation": list(a["dilation"]), "groups": int(a["groups"])}
    return m._offset(m._product(need(op.inputs[0]), op.params[0], "conv2d", params), op.params[1])


def _linear(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    return m._offset(m._product(need(op.inputs[0]), op.params[0], "linear"), op.params[1])


def _affine(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    return m._offset(m._product(need(op.inputs[0]), op.params[0], "mul"), op.params[1])


def _relu(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    return need(op.inputs[0]).relu()


def _clamp(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    x = need(op.inputs[0])
    return x.clamp(*(None if b is None else _constant(x, b) for b in (op.attrs["low"], op.attrs["high"])))


def _constant(x: SharedTensor, value: float) -> int | SharedTensor:
    """A public bound at x's own scale: an exact integer, or a trivial sharing (the context's
    scale would otherwise lift x to it and change the comparison domain)."""
    if float(value).is_integer():
        return int(value)
    share = encode(value, x.frac_bits) if x.ctx.rank == 0 else np.int64(0)
    return SharedTensor(x.ctx, np.broadcast_to(share, x.shape).copy(), x.frac_bits)


def _max_pool(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    a = op.attrs
    return mpc.max_pool2d(need(op.inputs[0]), tuple(a["kernel"]), stride=tuple(a["stride"]),
                          padding=tuple(a["padding"]))


def _divide(m: EncryptedModel, sums: SharedTensor, divisors: np.ndarray) -> SharedTensor:
    """Window sums divided by public counts, with the truncation left pending.

    A power-of-two count only moves the scale; any other is a multiplication
    by 1/d encoded at ``_RECIPROCAL_BITS`` (relative error below 2^-24 d).
    """
    d = np.unique(divisors)
    if d.size == 1 and int(d[0]) & (int(d[0]) - 1) == 0:
        return SharedTensor(m.ctx, sums.share, sums.frac_bits + int(d[0]).bit_length() - 1)
    recip = encode(1.0 / divisors.astype(np.float64), _RECIPROCAL_BITS)
    return SharedTensor(m.ctx, sums.share * recip, sums.frac_bits + _RECIPROCAL_BITS)


def _pool_input(m: EncryptedModel, name: str, divisors: np.ndarray, values: Values, need: Need) -> SharedTensor:
    # Sums of a pending product may take a power-of-two division before truncating;
    # any other division multiplies, so it starts from the activation scale.
    d = np.unique(divisors)
    if d.size == 1 and int(d[0]) & (int(d[0]) - 1) == 0:
        return values[name]
    return need(name)


def _avg_pool(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    a = op.attrs
    kernel, stride, padding = tuple(a["kernel"]), tuple(a["stride"]), tuple(a["padding"])
    div = avg_pool_divisors(values[op.inputs[0]].shape[2:], kernel, stride, padding,
                            a["count_include_pad"], a["divisor"])
    x = _pool_input(m, op.inputs[0], div, values, need)
    return _divide(m, SharedTensor(m.ctx, window_sum(x.share, kernel, stride, padding), x.frac_bits), div)


def _adaptive(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    out = tuple(op.attrs["output"])
    div = adaptive_counts(values[op.inputs[0]].shape[2:], out)
    x = _pool_input(m, op.inputs[0], div, values, need)
    return _divide(m, SharedTensor(m.ctx, adaptive_sum(x.share, out), x.frac_bits), div)


def _mean(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    axes = tuple(op.attrs["axes"])
    src = values[op.inputs[0]]
    div = np.array([int(np.prod([src.shape[i] for i in axes]))])
    x = _pool_input(m, op.inputs[0], div, values, need)
    sums = x.share.sum(axis=axes, keepdims=op.attrs["keepdim"], dtype=np.int64)
    return _divide(m, SharedTensor(m.ctx, sums, x.frac_bits), div)


def _reshape(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    x = values[op.inputs[0]]
    return x.reshape((x.shape[0],) + tuple(op.attrs["shape"]))


def _add(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    return values[op.inputs[0]] + values[op.inputs[1]]


def _add_const(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    x = values[op.inputs[0]]
    return x + _constant(x, float(op.attrs["value"]))


def _cat(m: EncryptedModel, op: Op, values: Values, need: Need) -> SharedTensor:
    return mpc.concatenate([values[i] for i in op.inputs], axis=op.attrs["axis"])


#: kind -> f(model, op, values, need) returning the op's shared result
SECURE_OPS: dict[str, Callable[[EncryptedModel, Op, Values, Need], SharedTensor]] = {
    "conv2d": _conv,
    "linear": _linear,
    "affine": _affine,
    "relu": _relu,
    "clamp": _clamp,
    "max_pool2d": _max_pool,
    "avg_pool2d": _avg_pool,
    "adaptive_avg_pool2d": _adaptive,
    "mean": _mean,
    "reshape": _reshape,
    "add": _add,
    "add_const": _add_const,
    "cat": _cat,
}
