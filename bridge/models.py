"""The model server's weights and the cards that describe them (:class:`bridge.card.ModelCard`).

Weights are a state dict read with ``torch.load(..., weights_only=True)``: a
plain state dict, or a dict holding one under ``"state_dict"`` or ``"model"``
(with optional ``"classes"``).  Missing facts (number of classes, channels)
are read off the tensors' shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from fl.models import SIMPLE_CNN, build_model
from mpc.errors import ConfigError

from .card import ModelCard

__all__ = [
    "ModelCard", "load_state_dict", "card_from_state", "card_from_config", "card_from_run", "build_from_card",
    "load_model",
]


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read weights with ``torch.load(weights_only=True)``: (state dict, other top-level entries)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle/runtime errors for foreign or unsafe files
        raise ConfigError(f"cannot read weights from {path} (torch.load with weights_only=True): {exc}") from exc
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                meta = {k: v for k, v in obj.items() if k != key}
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj), meta


def card_from_state(name: str, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None,
                    **overrides: Any) -> ModelCard:
    """A card for architecture ``name`` whose class and channel counts are read from the weights."""
    floats = [(k, v) for k, v in state.items() if v.is_floating_point()]
    convs = [v for _, v in floats if v.dim() == 4]
    layers = [v for _, v in floats if v.dim() in (2, 4)]
    values: dict[str, Any] = {"name": name}
    if layers:  # the classifier comes last in state-dict order: its rows are the classes
        values["num_classes"] = int(layers[-1].shape[0])
    if convs:
        values["channels"] = int(convs[0].shape[1])
        if name == SIMPLE_CNN:  # its width is the first convolution's output channels
            values["width"] = int(convs[0].shape[0])
    classes = (meta or {}).get("classes")
    if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
        values["classes"] = tuple(classes)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "classes" in values and "num_classes" not in overrides:
        values["num_classes"] = len(values["classes"])
    if "num_classes" not in values:
        raise ConfigError(f"cannot tell the number of classes of {name} from its weights; give --num-classes")
    values.setdefault("model_id", _weights_id(name, state))
    return ModelCard.from_dict(values)


def _weights_id(name: str, state: Mapping[str, torch.Tensor]) -> str:
    """A short fingerprint of the weights (SHA-256 over names, shapes and bytes)."""
    h = hashlib.sha256(name.encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return f"{name}-{h.hexdigest()[:12]}"


def _card_from_training(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None,
                        overrides: Mapping[str, Any]) -> ModelCard:
    """A card from a training configuration (the tables of ``fl.config``) plus the weights."""
    from fl.config import parse_node_spec

    cfg = parse_node_spec({k: v for k, v in config.items() if k != "federation"})
    values: dict[str, Any] = {
        "input_size": cfg.data.input_size, "mean": cfg.data.mean, "std": cfg.data.std,
        "width": cfg.model.width, "pooling": cfg.model.pooling,
    }
    if cfg.data.channels:
        values["channels"] = cfg.data.channels
    values.update({k: v for k, v in overrides.items() if v is not None})
    return card_from_state(cfg.model.name, state, meta, **values)


def card_from_config(path: str | os.PathLike, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None,
                     **overrides: Any) -> ModelCard:
    """A card from a training configuration file (``fl`` TOML: [model] and [data]) plus the weights."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read training configuration {path}: {exc}") from exc
    return _card_from_training(raw, state, meta, overrides)


def card_from_run(run_dir: str | os.PathLike, **overrides: Any) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """The card and weights of a finished ``primia train`` run (its ``report.json`` and ``model.pt``)."""
    run_dir = Path(run_dir)
    try:
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{run_dir} is not a finished training run (report.json unreadable: {exc})") from exc
    config = report.get("config") if isinstance(report, dict) else None
    if not isinstance(config, dict):
        raise ConfigError(f"{run_dir / 'report.json'} holds no training configuration")
    state, meta = load_state_dict(run_dir / "model.pt")
    if isinstance(report.get("classes"), list):
        meta = {**meta, "classes": report["classes"]}
    return _card_from_training(config, state, meta, overrides), state


def build_from_card(card: ModelCard) -> nn.Module:
    """The card's architecture with fresh weights (no download), in eval mode."""
    model = build_model(card.name, num_classes=card.num_classes, in_channels=card.channels,
                        input_size=card.input_size, width=card.width, pooling=card.pooling)
    return model.eval()


def load_model(card: ModelCard, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The card's architecture with the given weights loaded (strictly), in eval mode."""
    model = build_from_card(card)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"the weights do not fit {card.name} with {card.num_classes} classes and "
                          f"{card.channels} channels: {exc}") from exc
    return model.eval()
