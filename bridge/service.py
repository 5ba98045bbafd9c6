"""The inference roles as services: plain settings in, result files out.

``primia infer`` runs these programs, over the network runtime (one command
per role, see :mod:`cli.infer`) or all on this machine (``--local``):

- :func:`model_server_program` (party 1): loads the weights, sends the public
  model card, serves every batch.
- :func:`data_owner_program` (party 0): receives the card, preprocesses its
  images as the model was trained, and writes one JSON file per image.
- the crypto provider is the engine's dealer; it needs no program.

Settings are plain JSON-able dicts (they travel as command-line JSON and as
process arguments).  Model settings: ``run`` (a ``primia train`` output
folder), or ``weights`` (a state-dict file) with ``model`` (an architecture
name) and optionally ``config`` (a training TOML); overrides ``input_size``,
``mean``, ``std``, ``classes``.  Data-owner settings: ``images`` (pairs of a
file and the name of its result, from :func:`bridge.images.collect_images`),
``out`` (folder), ``batch_size``, ``progress``.
Both: the fixed-point options ``act_bits``, ``weight_bits``, ``comparison_bits``
(:func:`fixed_point`; both parties must give the same).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

import mpc
from fl.checkpoint import write_json
from mpc.errors import ConfigError

from .images import load_batch
from .card import ModelCard
from .models import build_from_card, card_from_config, card_from_run, card_from_state, load_model, load_state_dict
from .plan import Plan
from .roles import DATA_OWNER, MODEL_OWNER, BatchResult, query_model, serve_model
from .secure import MAX_BATCH
from .trace import convert

__all__ = [
    "load_card_and_weights",
    "fixed_point",
    "plan_for_card",
    "FileBatches",
    "output_path",
    "result_record",
    "model_server_program",
    "data_owner_program",
    "local_program",
]

_OVERRIDES = ("input_size", "mean", "std", "classes", "pooling", "num_classes")


def load_card_and_weights(settings: dict[str, Any]) -> tuple[ModelCard, dict[str, Any]]:
    """The model server's card and state dict from its settings (see the module docstring)."""
    overrides = {k: settings.get(k) for k in _OVERRIDES}
    if overrides["classes"] is not None:
        overrides["classes"] = tuple(overrides["classes"])
    if overrides["mean"] is not None:
        overrides["mean"] = tuple(overrides["mean"])
    if overrides["std"] is not None:
        overrides["std"] = tuple(overrides["std"])
    if settings.get("run"):
        return card_from_run(settings["run"], **overrides)
    if not settings.get("weights"):
        raise ConfigError("the model server needs --run DIR, or --weights FILE with --model NAME (or --config)")
    state, meta = load_state_dict(settings["weights"])
    if settings.get("config"):
        return card_from_config(settings["config"], state, meta, **overrides), state
    if not settings.get("model"):
        raise ConfigError("give the architecture with --model NAME (e.g. resnet18) or --config TRAINING.toml")
    return card_from_state(settings["model"], state, meta, **overrides), state


def fixed_point(settings: dict[str, Any]) -> dict[str, int]:
    """The fixed-point options (``act_bits``, ``weight_bits``, ``comparison_bits``) given in the settings."""
    return {k: int(settings[k]) for k in ("act_bits", "weight_bits", "comparison_bits") if settings.get(k) is not None}


def plan_for_card(card: ModelCard) -> Plan:
    """The data owner's plan: the card's architecture, freshly built (no weights), converted."""
    return convert(build_from_card(card), card.input_shape).plan


class FileBatches:
    """The data owner's image files in batches, decoded and preprocessed when asked for."""

    def __init__(self, paths: list[str | Path], batch_size: int):
        if not 1 <= batch_size <= MAX_BATCH:
            raise ConfigError(f"batch size must be between 1 and {MAX_BATCH}, got {batch_size}")
        self.paths = [Path(p) for p in paths]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def files(self, index: int) -> list[Path]:
        return self.paths[index * self.batch_size:(index + 1) * self.batch_size]

    def load(self, index: int, card: ModelCard | None) -> np.ndarray:
        if card is None:
            raise ConfigError("image files need the model card for their preprocessing")
        return load_batch(self.files(index), card)


def result_record(path: Path, row: int, result: BatchResult, card: ModelCard) -> dict[str, Any]:
    """The JSON record of one image: class, probabilities, model, timings, bytes."""
    names = card.class_names
    probs = result.probabilities[row]
    best = int(np.argmax(probs))
    n = result.logits.shape[0]
    s = result.stats
    return {
        "image": str(path),
        "class": names[best],
        "class_index": best,
        "probabilities": {name: float(p) for name, p in zip(names, probs)},
        "logits": [float(v) for v in result.logits[row]],
        "model": card.name,
        "model_id": card.model_id,
        "timings": {"batch_seconds": result.seconds, "seconds_per_image": result.seconds / n, "batch_size": n},
        "bytes": {"sent": s["bytes_sent"], "received": s["bytes_received"],
                  "from_dealer": s["dealer_bytes"], "to_dealer": s["dealer_bytes_sent"],
                  "total": s["bytes_sent"] + s["bytes_received"] + s["dealer_bytes"] + s["dealer_bytes_sent"],
                  "scope": "this data owner's traffic for the batch holding the image"},
        "rounds": s["rounds"],
    }


def output_path(out: Path, name: str) -> Path:
    """Where the result of the image named ``name`` (see :func:`bridge.images.collect_images`) goes."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ConfigError(f"result name {name!r} must be a relative path inside the output folder")
    return out / rel.parent / f"{rel.name}.json"


def model_server_program(ctx: mpc.Context, settings: dict[str, Any]) -> dict[str, Any]:
    """Party 1: load the weights, publish the card, serve every batch; learns no image and no result."""
    if ctx.rank != MODEL_OWNER:
        raise ConfigError(f"the model server must be party {MODEL_OWNER}, not {ctx.rank}")
    card, state = load_card_and_weights(settings)
    converted = convert(load_model(card, state), card.input_shape)
    return serve_model(ctx, converted.plan, converted.weights, card=card, **fixed_point(settings))


def data_owner_program(ctx: mpc.Context, settings: dict[str, Any]) -> dict[str, Any]:
    """Party 0: send the images encrypted, write one JSON per image (atomically); returns a summary."""
    if ctx.rank != DATA_OWNER:
        raise ConfigError(f"the data owner must be party {DATA_OWNER}, not {ctx.rank}")
    images = [(Path(path), str(name)) for path, name in settings["images"]]
    targets = [output_path(Path(settings["out"]), name) for _, name in images]
    if len(set(targets)) != len(targets):
        raise ConfigError("two images would write the same result file; name each image once "
                          "(bridge.images.collect_images does)")
    batches = FileBatches([path for path, _ in images], int(settings.get("batch_size", 1)))
    out = Path(settings["out"])
    bar = None
    if settings.get("progress", False):
        from tqdm import tqdm

        bar = tqdm(total=len(batches.paths), desc="encrypted inference", unit="image")
    written: list[str] = []

    def on_result(result: BatchResult, card: ModelCard | None) -> None:
        assert card is not None
        first = result.index * batches.batch_size
        for row, path in enumerate(batches.files(result.index)):
            target = targets[first + row]
            write_json(target, result_record(path, row, result, card))
            written.append(str(target))
        if bar is not None:
            bar.update(result.logits.shape[0])

    try:
        summary = query_model(ctx, batches, plan_from_card=plan_for_card, on_result=on_result,
                              **fixed_point(settings))
    finally:
        if bar is not None:
            bar.close()
    card = summary["card"]
    report = {"images": len(written), "model": card.name, "model_id": card.model_id,
              "seconds": summary["seconds"], "setup_seconds": summary["setup_seconds"],
              "setup": summary["setup"], "total": summary["total"]}
    write_json(out / "summary.json", report)
    return {**report, "written": written}


def local_program(ctx: mpc.Context, settings: dict[str, Any]) -> dict[str, Any]:
    """``primia infer --local``: each computing party runs its role with its part of the settings."""
    if ctx.rank == MODEL_OWNER:
        return model_server_program(ctx, settings["model_server"])
    return data_owner_program(ctx, settings["data_owner"])
