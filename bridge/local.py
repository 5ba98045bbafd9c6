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
from .plaintext import value_ranges
from .secure import DEFAULT_WEIGHT_BITS, comparison_bits_for
from .sizing import default_act_bits
from .trace import ConvertedModel, convert

__all__ = ["InferenceResult", "infer_local", "fixed_point_for", "summarise_stats"]

# act_bits + weight_bits must stay within EncryptedModel's limit of 40
_MAX_ACT_BITS = 20


@dataclass
class InferenceResult:
    """Logits (N, classes) as the data owner received them, and what it cost."""

    logits: np.ndarray
    probabilities: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=-1)


def fixed_point_for(converted: ConvertedModel, x: np.ndarray, *, act_bits: int | None = None,
                    comparison_bits: int | None = None) -> tuple[int, int]:
    """Fixed-point settings that hold this batch: (act_bits, comparison_bits).

    The caller of :func:`infer_local` holds both the model and the images, so a
    plaintext run, before any party starts, can size what it does not set:

    - ``act_bits``: the plan's default (:func:`bridge.sizing.default_act_bits`), raised (to at most 20) until one unit is
      below 1e-3 of the largest logit, so that rounding (about one unit at the
      output) stays well inside the documented tolerance of 1e-2 of the largest
      logit for models with small outputs;
    - ``comparison_bits``: the default domain for ``act_bits``, widened when a
      compared value comes within a factor 2 of its limit.

    The networked roles cannot do this (no party holds both) and use the
    configured settings.
    """
    peak, largest_logit = value_ranges(converted.plan, converted.weights, x)
    if act_bits is None:
        wanted = int(np.ceil(np.log2(1e3 / largest_logit))) if largest_logit > 0 else _MAX_ACT_BITS
        act_bits = min(max(wanted, default_act_bits(converted.plan)), _MAX_ACT_BITS)
    if comparison_bits is None:
        comparison_bits = max(comparison_bits_for(act_bits), comparison_bits_for(act_bits, 2 * peak))
    return act_bits, comparison_bits


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
    what is not given is sized by a plaintext run of this batch, here, where
    the model and the images are both at hand (:func:`fixed_point_for`).

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
    """
    x_np = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if x_np.ndim < 2:
        raise ConfigError(f"x must be a batch (N, C, H, W), got shape {x_np.shape}")
    t0 = time.perf_counter()
    converted = convert(model, x_np.shape[1:])
    convert_seconds = time.perf_counter() - t0
    act_bits, comparison_bits = fixed_point_for(converted, x_np, act_bits=act_bits, comparison_bits=comparison_bits)
    with tempfile.TemporaryDirectory(prefix="primia-infer-") as tmp:
        os.chmod(tmp, 0o700)
        paths = {"images": str(Path(tmp) / "images.npy"), "weights": str(Path(tmp) / "weights.npz")}
        np.save(paths["images"], x_np, allow_pickle=False)
        np.savez(paths["weights"], **converted.weights)
        options = {"act_bits": act_bits, "weight_bits": weight_bits, "comparison_bits": comparison_bits,
                   "profile": profile}
        t1 = time.perf_counter()
        outs = mpc.net.run_processes(local_party, parties=2, args=(converted.plan, paths, options),
                                     truncation=truncation, timeout_s=timeout_s)
        wall = time.perf_counter() - t1
    owner = outs[DATA_OWNER]
    seconds = max(float(o["seconds"]) for o in outs)
    stats = summarise_stats(outs)
    stats.update({
        "seconds": seconds,
        "setup_seconds": float(owner["setup_seconds"]),
        "startup_seconds": wall - seconds,
        "convert_seconds": convert_seconds,
        "act_bits": act_bits,
        "weight_bits": weight_bits,
        "comparison_bits": comparison_bits,
        "truncation": truncation,
    })
    if profile:
        stats["profile"] = owner["profile"]
    return InferenceResult(np.asarray(owner["logits"]), np.asarray(owner["probabilities"]), stats)
