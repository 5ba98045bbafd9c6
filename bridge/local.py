"""``infer_local``: encrypted inference with the three roles as separate processes on 127.0.0.1.

The caller holds both the model and the images (that is what "local" means),
so the conversion runs here, before any party starts: an unsupported model
fails fast with :class:`~mpc.errors.UnsupportedModelError`.  Each role then
gets only its own input — the data owner's process reads the images, the
model server's process reads the weights, each from its own file in a private
temporary folder; the dealer's process reads neither — and the three talk
over authenticated websockets (:func:`mpc.net.run_processes`).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mpc
import mpc.net
from mpc.errors import ConfigError

from .roles import DATA_OWNER, local_party
from .card import Bounds
from .plaintext import measure_ranges
from .sizing import (DEFAULT_WEIGHT_BITS, LOCAL_MARGIN, FixedPoint, bounds_from_ranges, check_weights,
                     comparison_bits_for, default_act_bits, run_with_retry, size_fixed_point)
from .trace import ConvertedModel, convert

__all__ = ["InferenceResult", "infer_local", "fixed_point_for", "summarise_stats"]


@dataclass
class InferenceResult:
    """Logits (N, classes), or (N, classes, H, W) for segmentation, as the data owner received them, and
    what it cost; ``probabilities`` are their softmax over the class axis (1)."""

    logits: np.ndarray
    probabilities: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def predictions(self) -> np.ndarray:
        """The most likely class of every image (every pixel, for segmentation)."""
        return self.logits.argmax(axis=1)


def fixed_point_for(converted: ConvertedModel, x: np.ndarray, *, act_bits: int | None = None,
                    comparison_bits: int | None = None) -> tuple[int, int]:
    """Fixed-point settings that hold this batch: (act_bits, comparison_bits).

    The caller of :func:`infer_local` holds both the model and the images, so a
    plaintext run of this very batch, before any party starts, measures the
    bounds (margin :data:`~bridge.sizing.LOCAL_MARGIN`) and
    :func:`bridge.sizing.size_fixed_point` sizes what is not given.
    """
    fixed = _sized(converted, x, act_bits=act_bits, comparison_bits=comparison_bits)[0]
    return fixed.act_bits, fixed.comparison_bits


def _sized(converted: ConvertedModel, x: np.ndarray, **explicit: int | None) -> tuple[FixedPoint, Bounds, dict]:
    """The settings for this batch, its bounds, and every value's bound (margin x measured).

    Refuses, naming the layer, weights whose products leave the ring for these
    very values (:class:`~bridge.errors.RingOverflowError`), then values no
    setting holds (:class:`~mpc.errors.ConfigError`).
    """
    plan, weights = converted.plan, converted.weights
    ranges = measure_ranges(plan, weights, x)
    bounds = bounds_from_ranges(plan, ranges, images=int(x.shape[0]), margin=LOCAL_MARGIN)
    reach = {name: LOCAL_MARGIN * value for name, value in ranges.items()}
    # with the fewest fractional bits any setting uses: a layer refused here is refused by every setting
    least = explicit.get("act_bits") or default_act_bits(plan)
    weight_bits = explicit.get("weight_bits") or DEFAULT_WEIGHT_BITS
    check_weights(plan, weights, FixedPoint(least, weight_bits, comparison_bits_for(least)), reach)
    fixed = size_fixed_point(bounds, plan=plan, **explicit)
    return fixed, bounds, reach


def summarise_stats(per_party: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals as CrypTen counts them: the busiest computing party's traffic, dealer included."""
    def traffic(s: dict[str, int]) -> int:
        return s["bytes_sent"] + s["bytes_received"] + s["dealer_bytes"] + s["dealer_bytes_sent"]

    totals = [p["total"] for p in per_party]
    setups = [p["setup"] for p in per_party]
    busiest = max(range(len(totals)), key=lambda r: traffic(totals[r]))
    t = totals[busiest]
    return {
        "rounds": max(s["rounds"] for s in totals),
        "bytes": traffic(t),
        "busiest_party": busiest,
        "online_bytes": t["bytes_sent"] + t["bytes_received"],
        "dealer_bytes": t["dealer_bytes"] + t["dealer_bytes_sent"],
        "setup_rounds": max(s["rounds"] for s in setups),
        "setup_bytes": max(traffic(s) for s in setups),
        "inference_rounds": max(a["rounds"] - b["rounds"] for a, b in zip(totals, setups)),
        "per_party": totals,
    }


def infer_local(
    model: torch.nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    act_bits: int | None = None,
    weight_bits: int = DEFAULT_WEIGHT_BITS,
    comparison_bits: int | None = None,
    truncation: str = "exact",
    timeout_s: float = 600.0,
    profile: bool = False,
) -> InferenceResult:
    """Encrypted inference of ``model`` on the batch ``x`` (N, C, H, W), three processes on 127.0.0.1.

    Party 0 (data owner) secret-shares ``x``; party 1 (model server) keeps the
    weights private; a dealer process provides correlated randomness.  Only
    party 0 receives the logits.

    Fixed point (see :mod:`bridge.secure`): activations at ``act_bits``,
    weights at ``weight_bits``, comparisons in a ``comparison_bits`` domain;
    what is not given is sized from the bounds a plaintext run of this batch
    measures, here, where the model and the images are both at hand
    (:mod:`bridge.sizing`).  An overflow detected inside the protocol is
    answered by one run with a wider comparison domain
    (:func:`bridge.sizing.run_with_retry`).

    Returns:
        ``.logits`` (N, classes) float64 and ``.stats`` with ``seconds`` (wall
        time of the whole inference in the parties — weight masking, sharing,
        every layer, the dealer's work, opening the result — from the moment
        the three processes are connected), ``rounds`` (rounds among the
        computing parties), ``bytes`` (sent + received by the busiest
        computing party, dealer traffic included), their split into setup
        (once per model) and inference, and ``startup_seconds`` (process
        start-up and connection), ``convert_seconds`` (tracing).  With
        ``profile``, ``stats["profile"]`` has the data owner's seconds, rounds
        and bytes per op kind.  ``comparison_bits`` and ``act_bits`` are the settings used.

    Raises:
        UnsupportedModelError: before any process starts.
        ConfigError: values no fixed-point setting holds (naming the op), before any process starts.
        InferenceOverflow: an overflow detected in the protocol, again after the retry.
    """
    x_np = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if x_np.ndim < 2:
        raise ConfigError(f"x must be a batch (N, C, H, W), got shape {x_np.shape}")
    t0 = time.perf_counter()
    converted = convert(model, x_np.shape[1:])
    convert_seconds = time.perf_counter() - t0
    explicit = {"act_bits": act_bits, "weight_bits": weight_bits, "comparison_bits": comparison_bits}
    _, bounds, reach = _sized(converted, x_np, **explicit)  # refused here, before any process starts
    with tempfile.TemporaryDirectory(prefix="primia-infer-") as tmp:
        os.chmod(tmp, 0o700)
        paths = {"images": str(Path(tmp) / "images.npy"), "weights": str(Path(tmp) / "weights.npz")}
        np.save(paths["images"], x_np, allow_pickle=False)
        np.savez(paths["weights"], **converted.weights)

        def run(widen_bits: int) -> tuple[list[Any], FixedPoint, float]:
            t1 = time.perf_counter()
            settings = size_fixed_point(bounds, plan=converted.plan, **explicit, widen_bits=widen_bits)
            options = {**settings.options(), "activation_bound": reach, "profile": profile}
            outs = mpc.net.run_processes(local_party, parties=2, args=(converted.plan, paths, options),
                                         truncation=truncation, timeout_s=timeout_s)
            return outs, settings, time.perf_counter() - t1

        outs, fixed, wall = run_with_retry(run)
    owner = outs[DATA_OWNER]
    seconds = max(float(o["seconds"]) for o in outs)
    stats = summarise_stats(outs)
    stats.update({
        "seconds": seconds,
        "setup_seconds": float(owner["setup_seconds"]),
        "startup_seconds": wall - seconds,
        "convert_seconds": convert_seconds,
        "act_bits": fixed.act_bits,
        "weight_bits": fixed.weight_bits,
        "comparison_bits": fixed.comparison_bits,
        "bounds": bounds.describe(),
        "truncation": truncation,
    })
    if profile:
        stats["profile"] = owner["profile"]
    return InferenceResult(np.asarray(owner["logits"]), np.asarray(owner["probabilities"]), stats)
