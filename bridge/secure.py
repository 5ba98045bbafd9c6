"""Executing a plan on secret-shared tensors: the encrypted forward pass.

Roles: party ``DATA_OWNER`` (0) holds the image, party ``MODEL_OWNER`` (1) the
weights; both know the plan (the architecture).  Weights never get shared in
the usual sense: they stay the model owner's :class:`~mpc.PrivateTensor`\\ s,
masked once per session (W - B opened in one round for all of them), and each
product with an activation costs one one-way message of the activation's size
(:mod:`mpc.protocols.owned`).

Fixed point.  Activations live at ``act_bits`` fractional bits (default 12,
or more when the plan approximates smooth functions:
:func:`bridge.sizing.default_act_bits`), multiplied parameters at
``weight_bits`` (default 20), independently of the context's ``frac_bits``
(which the pass sets to ``act_bits`` while it runs, so that the engine's
approximations work at the same scale); biases are added at the product scale.
Comparisons run in a ``comparison_bits`` domain, exact while every compared
magnitude — differences included — stays below 2^(comparison_bits - 1 -
act_bits): by default |v| < 512; :func:`bridge.sizing.comparison_bound` and
:func:`comparison_bits_for` size it for measured ranges.  All of these are
checked to agree between the parties.

Each op runs its record's encrypted rule (:mod:`bridge.ops`) in the
interpreter loop the plaintext executor shares (:mod:`bridge.interpret`); an
engine error inside an op (e.g. a comparison outside its domain) comes out as
an :class:`~bridge.errors.EncryptedOpError` naming the layer.

Scales are tracked lazily.  A linear op's result stays at the product scale
``act_bits + weight_bits`` and is truncated only when a consumer needs the
activation scale — a nonlinear op, another product, or the output.  Additions
work at any scale (the lower operand is shifted up, exactly), so a residual
``conv + shortcut`` is truncated once, not twice, and ``avg_pool``'s division
rides on the same truncation.  Each truncation is one round
(:mod:`mpc.protocols.truncation`).

Per op (2 parties; "round" = one message exchange among computing parties):

======================  ======================================================
conv2d/linear/affine    1 round (x - A to the model owner) + the dealer's C
mul, matmul             1 Beaver round (two encrypted operands)
relu, clamp, max_pool   the comparison protocols' rounds (mpc.nonlinear)
sigmoid, gelu, ...      approximations (bridge.ops.activations, mpc.nonlinear)
avg pool, mean, resize  local window sums; the division joins a truncation
add, cat, reshape, ...  local
======================  ======================================================
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

import numpy as np

import mpc
import mpc.kernels
from mpc.errors import (ApproximationRangeError, AuthenticationError, ComparisonOverflow, PeerFailure, PrimiaError,
                        ProtocolError)
from mpc.private import PrivateTensor
from mpc.protocols.compare import check_comparison_options
from mpc.protocols.owned import owned_product, weight_mask
from mpc.tensor import SharedTensor

from .errors import EncryptedOpError
from .fixed import encode_weights, param_layout
from .interpret import check_kinds, interpret
from .ops import KINDS
from .plan import Op, Plan
from .registry import Fixed, Operand
from .sizing import (DEFAULT_ACT_BITS, DEFAULT_RANGE_BITS, DEFAULT_WEIGHT_BITS, check_weights, comparison_bits_for,
                     default_act_bits)

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
]

DATA_OWNER = 0
MODEL_OWNER = 1
#: most images in one encrypted forward pass
MAX_BATCH = 1024


def warm_up(ctx: mpc.Context, *, act_bits: int | None = None, comparison_bits: int | None = None,
            **_other_options: object) -> None:
    """Load the compiled kernels every process of a session needs, before any clock starts.

    Ring products load in this process; a ReLU and a max-pool over a 4x4 sharing
    of zero go through the dealer, so its key generation loads too (a few
    rounds, a few kilobytes; callers leave them out of their figures).  Every
    computing party calls it, in the same place.  Takes the same options as
    :class:`EncryptedModel`.
    """
    mpc.kernels.warmup()
    act_bits = act_bits or DEFAULT_ACT_BITS
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
      2. the model owner checks that no layer can leave the ring for activations
         within the comparison domain (:func:`bridge.sizing.check_weights`; it
         alone holds the weights) and refuses otherwise, naming the layer;
      3. the model owner opens W - B for every multiplied parameter, all in one
         message (1 round, 8 B per weight element, once per model).  Every
         parameter gets a fresh mask id from the context
         (:meth:`mpc.Context.private_ids`): two models, or one model loaded
         twice, in one context never share a mask B.

    Args:
        ctx: this party's context.
        plan: the architecture (both parties build it, e.g. with :func:`bridge.convert`).
        weights: the float weights (model owner only; ``None`` elsewhere).
        act_bits, weight_bits: fractional bits of activations (default: :func:`bridge.sizing.default_act_bits`)
            and of multiplied parameters.
        comparison_bits: the comparison domain (default: compared magnitudes below 512).
        activation_bound: (model owner) largest activation magnitude for the ring check, one for all
            values or one per value name; default: what the comparison domain holds.

    Raises:
        RingOverflowError: (model owner) a layer's products can overflow the ring.
        ProtocolError: the parties run different plans or settings.
    """

    def __init__(self, ctx: mpc.Context, plan: Plan, weights: dict[str, np.ndarray] | None, *,
                 owner: int = MODEL_OWNER, act_bits: int | None = None,
                 weight_bits: int = DEFAULT_WEIGHT_BITS, comparison_bits: int | None = None,
                 activation_bound: float | dict[str, float] | None = None):
        self.ctx = ctx
        self.plan = plan
        self.owner = owner
        if act_bits is None:
            act_bits = default_act_bits(plan)
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
        self.fixed = Fixed(act_bits, weight_bits, self.comparison_bits)
        check_kinds(plan)
        layout = param_layout(plan)
        multiplied = [name for name, (_, role) in layout.items() if role == "weight"]
        idents = dict(zip(multiplied, ctx.private_ids(len(multiplied))))
        # the mask ids are in the check: parties that drew different ids would combine different masks
        _check_same_setup(ctx, plan, act_bits, weight_bits, self.comparison_bits, list(idents.values())[:1])
        ring = None
        if ctx.rank == owner:
            if weights is None:
                raise ValueError(f"party {owner} owns the model but passed no weights")
            check_weights(plan, weights, self.fixed, activation_bound)
            ring = encode_weights(plan, weights, act_bits=self.act_bits, weight_bits=self.weight_bits)
        self.weights: dict[str, PrivateTensor] = {}
        self.offsets: dict[str, np.ndarray] = {}
        for name, (shape, role) in layout.items():
            value = None if ring is None else ring[name]
            if role == "weight":
                self.weights[name] = PrivateTensor(ctx, owner, value, shape, self.weight_bits, idents[name])
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

        Raises:
            EncryptedOpError: an op failed in the engine (e.g. a comparison left its
                domain); names the layer, with the engine's error as the cause.
        """
        if tuple(x.shape[1:]) != tuple(self.plan.input_shape):
            expected = ", ".join(map(str, self.plan.input_shape))
            raise ValueError(f"input has shape {x.shape}, the plan expects (N, {expected})")
        saved = self.ctx.comparison_bits, self.ctx.frac_bits
        self.ctx.comparison_bits, self.ctx.frac_bits = self.comparison_bits, self.act_bits
        try:
            return interpret(self.plan, Operand(x, self.act_bits), self._step(on_op)).act
        finally:
            self.ctx.comparison_bits, self.ctx.frac_bits = saved

    def _step(self, on_op: Callable[[Op, float], None] | None) -> Callable[[Op, list[Operand]], Operand]:
        def step(op: Op, operands: list[Operand]) -> Operand:
            start = time.perf_counter()
            try:
                # an overflow found by the deferred check (at reveal) names the layers whose comparisons failed
                with self.ctx.comparison_scope(op.source or op.name):
                    out = KINDS[op.kind].encrypted(self, op, operands)
            except (ProtocolError, PeerFailure, AuthenticationError, ComparisonOverflow, ApproximationRangeError):
                raise  # about a peer, not this op's values; or an overflow, which names its layers and is retried
            except (PrimiaError, ArithmeticError) as exc:
                raise EncryptedOpError(op.name, op.kind, op.source, exc) from exc
            if on_op is not None:
                on_op(op, time.perf_counter() - start)
            return Operand(out, self.act_bits)
        return step

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

    # -- the owner's parameters, for the ops' encrypted rules ---------------------------------
    def product(self, x: SharedTensor, weight: str, op: str, params: dict | None = None) -> SharedTensor:
        """x times the owner's parameter ``weight`` (bilinear ``op``), left at the product scale (1 round)."""
        w = self.weights[weight]
        z = owned_product(self.ctx, x.share, w, op, params)
        return SharedTensor(self.ctx, z, x.frac_bits + w.frac_bits)

    def offset(self, y: SharedTensor, name: str) -> SharedTensor:
        """y plus the owner's offset ``name``, encoded at the product scale y must be at (local)."""
        if y.frac_bits != self.act_bits + self.weight_bits:
            raise ValueError(f"offset {name!r} is added at the product scale, not at {y.frac_bits} bits")
        return SharedTensor(self.ctx, y.share + self.offsets[name], y.frac_bits)

    def value(self, name: str) -> SharedTensor:
        """The owner's value parameter ``name`` as a sharing at the activation scale (local)."""
        return SharedTensor(self.ctx, self.offsets[name], self.act_bits)


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


def _check_same_setup(ctx: mpc.Context, plan: Plan, act_bits: int, weight_bits: int, comparison_bits: int,
                      mask_ids: list[int]) -> None:
    """Both parties must run the same plan with the same settings and mask ids (1 round, 32 bytes)."""
    settings = (f"{plan.digest()}/{act_bits}/{weight_bits}/{comparison_bits}/{ctx.truncation}/{ctx.comparison}/"
                f"{mask_ids}")
    digest = np.frombuffer(hashlib.sha256(settings.encode()).digest(), dtype=np.uint8)
    peers = ctx.comm.peers
    got = ctx.comm.exchange({p: digest for p in peers}, {p: (digest.shape, np.uint8) for p in peers})
    for peer, theirs in got.items():
        if not np.array_equal(theirs, digest):
            raise ProtocolError(peer, "runs a different model or fixed-point setting (plan and settings digests "
                                      "differ); both parties must convert the same model at the same input size "
                                      "with the same act_bits, weight_bits, comparison bits and truncation, "
                                      "and load their models in the same order")


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
