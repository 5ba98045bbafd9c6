"""The inference roles as party programs: model server (party 1) and data owner (party 0).

The crypto provider is the engine's dealer (:func:`mpc.dealer.serve_dealer`);
it only answers party 0's requests for correlated randomness and never sees
an image, a weight or a result.

One session, in order (SPMD: both programs make the same calls), after a
warm-up that loads every process's compiled kernels (:func:`warm_up`; left
out of the figures, as a long-running server has them loaded):

  0. (networked roles only) the model server sends its :class:`ModelCard`;
     the data owner builds and converts the architecture it names.
  1. Both check the plan digests and the fixed-point settings agree (1 round).
  2. The model server opens its masked weights W - B, all at once (1 round).
  3. The data owner announces how many batches follow (1 round).
  4. Per batch: the data owner shares the images (1 round: the shape), both
     run the encrypted forward pass, and the logits are opened to the data
     owner only.

What each party learns: the model server learns the number of batches and
each batch's shape (N, C, H, W); the data owner learns the architecture (the
plan: layer types and shapes) and the outputs; the dealer learns the shapes
of the material it makes.  Everything else each party sees is uniformly
masked.  See docs/inference.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

import mpc
from mpc.errors import ProtocolError

from .card import MAX_CARD_BYTES, ModelCard
from .plaintext import softmax
from .plan import Plan
from .secure import DATA_OWNER, MODEL_OWNER, EncryptedModel, OpProfile, warm_up

__all__ = [
    "DATA_OWNER",
    "MODEL_OWNER",
    "BatchSource",
    "BatchResult",
    "serve_model",
    "query_model",
    "send_card",
    "receive_card",
    "MAX_BATCHES",
    "ArrayBatches",
    "local_party",
]

#: most batches one session may announce (guards the model server's loop)
MAX_BATCHES = 1 << 24


class BatchSource(Protocol):
    """The data owner's inputs, loaded lazily (after the model card arrives)."""

    def __len__(self) -> int: ...

    def load(self, index: int, card: ModelCard | None) -> np.ndarray:
        """Batch ``index`` as float (N, *input_shape), preprocessed for the model."""
        ...


@dataclass(frozen=True)
class BatchResult:
    """What the data owner gets back for one batch."""

    index: int
    logits: np.ndarray
    probabilities: np.ndarray
    seconds: float
    stats: dict[str, int]
    profile: dict[str, dict[str, float]] | None = None


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


# -- small control messages ------------------------------------------------------------
def send_card(ctx: mpc.Context, card: ModelCard) -> None:
    """Model server: send the card to the data owner (2 rounds: length, then bytes)."""
    raw = np.frombuffer(card.to_bytes(), dtype=np.uint8)
    ctx.comm.exchange({DATA_OWNER: np.array([raw.size], dtype=np.int64)}, {})
    ctx.comm.exchange({DATA_OWNER: raw}, {})


def receive_card(ctx: mpc.Context) -> ModelCard:
    """Data owner: receive and check the model server's card."""
    (length,) = ctx.comm.exchange({}, {MODEL_OWNER: ((1,), np.int64)}).values()
    n = int(length[0])
    if not 0 < n <= MAX_CARD_BYTES:
        raise ProtocolError(MODEL_OWNER, f"model card of {n} bytes (at most {MAX_CARD_BYTES})")
    (raw,) = ctx.comm.exchange({}, {MODEL_OWNER: ((n,), np.uint8)}).values()
    return ModelCard.from_bytes(raw.tobytes())


def _announce_batches(ctx: mpc.Context, count: int | None) -> int:
    if ctx.rank == DATA_OWNER:
        ctx.comm.exchange({p: np.array([count], dtype=np.int64) for p in ctx.comm.peers}, {})
        return int(count or 0)
    (got,) = ctx.comm.exchange({}, {DATA_OWNER: ((1,), np.int64)}).values()
    n = int(got[0])
    if not 0 <= n <= MAX_BATCHES:
        raise ProtocolError(DATA_OWNER, f"announced {n} batches (at most {MAX_BATCHES})")
    return n


# -- the two programs ------------------------------------------------------------------------
def serve_model(ctx: mpc.Context, plan: Plan, weights: dict[str, np.ndarray], *,
                card: ModelCard | None = None, **options: Any) -> dict[str, Any]:
    """Model server (party 1): answer every batch the data owner sends; learns no image and no result.

    ``options`` go to :class:`EncryptedModel` (fixed-point settings; the data owner must pass the same).
    Returns this party's statistics: ``setup`` and ``total`` counters and ``seconds``.
    """
    if ctx.rank != MODEL_OWNER:
        raise ValueError(f"serve_model runs as party {MODEL_OWNER}, not {ctx.rank}")
    warm_up(ctx)  # (default settings on both sides: the data owner may learn its settings from the card)
    base = ctx.stats()
    start = time.perf_counter()
    if card is not None:
        send_card(ctx, card)
    model = EncryptedModel(ctx, plan, weights, **options)
    count = _announce_batches(ctx, None)
    setup = _diff(ctx.stats(), base)
    setup_seconds = time.perf_counter() - start
    for _ in range(count):
        model.predict(model.share_input(None), to=DATA_OWNER)
    return {"setup": setup, "total": _diff(ctx.stats(), base), "setup_seconds": setup_seconds,
            "seconds": time.perf_counter() - start}


def query_model(
    ctx: mpc.Context,
    batches: BatchSource,
    *,
    plan: Plan | None = None,
    plan_from_card: Callable[[ModelCard], Plan] | None = None,
    options_from_card: Callable[[ModelCard, Plan], dict[str, Any]] | None = None,
    on_result: Callable[[BatchResult, ModelCard | None], None] | None = None,
    profile: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Data owner (party 0): run every batch through the model; only this party sees the outputs.

    Give either ``plan`` (the architecture is known, as in :func:`bridge.infer_local`)
    or ``plan_from_card`` (the model server sends its card first; networked roles).
    If the plan ends in a softmax, the logits opened are centred (see
    :meth:`EncryptedModel.predict`).

    ``options`` go to :class:`EncryptedModel`, as for :func:`serve_model`; with
    ``options_from_card(card, plan)``, they are derived from the card instead (its bounds,
    :func:`bridge.sizing.size_fixed_point`), as the model server derives its own.
    Returns ``results`` (one :class:`BatchResult` per batch unless ``on_result``
    consumes them), the ``card`` if one came, and this party's statistics.
    With ``profile``, each result carries its costs per op kind (:class:`OpProfile`).
    """
    if ctx.rank != DATA_OWNER:
        raise ValueError(f"query_model runs as party {DATA_OWNER}, not {ctx.rank}")
    if (plan is None) == (plan_from_card is None):
        raise ValueError("give exactly one of plan and plan_from_card")
    warm_up(ctx)
    base = ctx.stats()
    start = time.perf_counter()
    card = None
    if plan_from_card is not None:
        card = receive_card(ctx)
        plan = plan_from_card(card)
        if options_from_card is not None:
            options = {**options, **options_from_card(card, plan)}
    assert plan is not None
    model = EncryptedModel(ctx, plan, None, **options)
    _announce_batches(ctx, len(batches))
    setup = _diff(ctx.stats(), base)
    setup_seconds = time.perf_counter() - start
    results: list[BatchResult] = []
    axis = plan.softmax_axis
    for index in range(len(batches)):
        t0 = time.perf_counter()
        before = ctx.stats()
        x = model.share_input(np.asarray(batches.load(index, card), dtype=np.float64))
        hook = OpProfile(ctx) if profile else None
        logits = model.predict(x, to=DATA_OWNER, on_op=hook)
        probs = softmax(logits, axis if axis is not None else 1)  # classes sit on axis 1 (segmentation: N, C, H, W)
        result = BatchResult(index, logits, probs, time.perf_counter() - t0, _diff(ctx.stats(), before),
                             None if hook is None else hook.kinds)
        if on_result is not None:
            on_result(result, card)
        else:
            results.append(result)
    return {"results": results, "card": card, "setup": setup, "total": _diff(ctx.stats(), base),
            "setup_seconds": setup_seconds, "seconds": time.perf_counter() - start}


# -- bridge.infer_local's program ------------------------------------------------------------
class ArrayBatches:
    """The data owner's input as one in-memory batch."""

    def __init__(self, x: np.ndarray):
        self.x = x

    def __len__(self) -> int:
        return 1

    def load(self, index: int, card: Any) -> np.ndarray:
        return self.x


def local_party(ctx: mpc.Context, plan: Plan, paths: dict[str, str], options: dict[str, Any]) -> dict[str, Any]:
    """The program each computing party of :func:`bridge.infer_local` runs (module level: spawned processes import it).

    ``options``: the fixed-point settings for :class:`~bridge.secure.EncryptedModel`, and
    ``profile`` (the data owner's costs per op kind).
    """
    profile = options.pop("profile", False)
    if ctx.rank == DATA_OWNER:
        x = np.load(paths["images"], allow_pickle=False)
        out = query_model(ctx, ArrayBatches(x), plan=plan, profile=profile, **options)
        (result,) = out["results"]
        return {"logits": result.logits, "probabilities": result.probabilities, "setup": out["setup"],
                "total": out["total"], "seconds": out["seconds"], "setup_seconds": out["setup_seconds"],
                "profile": result.profile or {}}
    if ctx.rank == MODEL_OWNER:
        with np.load(paths["weights"], allow_pickle=False) as data:
            weights = {k: data[k] for k in data.files}
        return serve_model(ctx, plan, weights, **options)
    raise ValueError(f"infer_local runs two computing parties, not party {ctx.rank}")
