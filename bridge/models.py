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
    "load_model", "fit_report",
]


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read weights with ``torch.load(weights_only=True)``: (state dict, other top-level entries).

    Raises:
        ConfigError: the file is missing, is not a ``torch.save`` file (the message
            says what it holds instead), or holds something other than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip, EOF and key errors for foreign or unsafe files
        raise ConfigError(f"cannot read weights from {path}: {_what_went_wrong(path, exc)}") from exc
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                meta = {k: v for k, v in obj.items() if k != key}
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path} does not hold a state dict (a mapping of names to tensors); "
                          f"{_EXPECTED_WEIGHTS}")
    return dict(obj), meta


_EXPECTED_WEIGHTS = "expected a file written by torch.save(model.state_dict(), path)"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80


def _what_went_wrong(path: Path, exc: Exception) -> str:
    """What the file holds, in words, when torch.load fails (torch's own messages can be empty or '101')."""
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
        size = path.stat().st_size
    except OSError as err:
        return f"{err.strerror or err}"
    detail = " ".join(str(exc).split())
    if size == 0:
        return f"the file is empty (0 bytes); {_EXPECTED_WEIGHTS}"
    if head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_PROTOCOL]):
        if "weights_only" in detail or "Weights only load failed" in detail:
            return (f"it holds Python objects other than tensors, which are never unpickled here "
                    f"(torch.load with weights_only=True: {detail[:300]}); {_EXPECTED_WEIGHTS}")
        what = type(exc).__name__ + (f": {detail[:300]}" if detail else "")
        return f"it looks like a torch.save file of {size} bytes but cannot be read ({what}): truncated or damaged?"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it holds {size} bytes that are not a torch.save file (it starts with {head[:8].hex()}); " \
               f"{_EXPECTED_WEIGHTS}"
    return f"it holds text, not tensors (it starts with {text[:40]!r}); {_EXPECTED_WEIGHTS}"


def _reference_state(name: str, overrides: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of a fresh ``name`` (2 classes, 3 channels): its keys, in module order."""
    size = overrides.get("input_size") or ModelCard.__dataclass_fields__["input_size"].default
    model = build_model(name, num_classes=2, in_channels=3, input_size=size,
                        width=overrides.get("width") or ModelCard.__dataclass_fields__["width"].default,
                        pooling=overrides.get("pooling") or "max")
    return model.state_dict()


def fit_report(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *,
               shapes: bool = True, limit: int = 6) -> str | None:
    """How ``state`` differs from ``expected``: missing and unexpected keys, and (with ``shapes``) shapes.

    None when they fit.  Lists are cut at ``limit`` entries (with a count of the rest).
    """
    def listed(items: list[str]) -> str:
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = []
    if missing:
        parts.append(f"missing keys {listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {listed(unexpected)}")
    if missing and unexpected:
        parts.append("(a renamed key, or weights of another architecture?)")
    if shapes:
        wrong = [f"{k}: weights {tuple(state[k].shape)}, model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if wrong:
            parts.append(f"wrong shapes: {listed(wrong)}")
    return "; ".join(parts) or None


def card_from_state(name: str, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None,
                    **overrides: Any) -> ModelCard:
    """A card for architecture ``name`` whose class and channel counts are read from the weights.

    The weights' keys are checked against the architecture's first, and the
    counts are read from the tensors the architecture names (its first
    convolution, its classifier), so that weights of another model are refused
    naming their keys and shapes rather than as an implausible card.
    """
    reference = _reference_state(name, overrides)
    mismatch = fit_report(reference, state, shapes=False)
    if mismatch:
        raise ConfigError(f"the weights do not fit {name}: {mismatch}")
    layers = [k for k, v in reference.items() if v.is_floating_point() and v.dim() in (2, 4)]
    convs = [k for k in layers if reference[k].dim() == 4]
    values: dict[str, Any] = {"name": name}
    if layers:  # the classifier comes last in module order: its rows are the classes
        values["num_classes"] = int(state[layers[-1]].shape[0])
    if convs:
        first = state[convs[0]]
        if first.dim() != 4:
            raise ConfigError(f"the weights do not fit {name}: {convs[0]} has shape {tuple(first.shape)}, "
                              f"the model's first convolution needs 4 dimensions")
        values["channels"] = int(first.shape[1])
        if not 1 <= values["channels"] <= 4 and "channels" not in overrides:
            raise ConfigError(
                f"the weights do not fit {name}: its first convolution {convs[0]} has shape {tuple(first.shape)}, "
                f"i.e. {values['channels']} input channels, where images have 1 to 4; "
                "are these the weights of another architecture?")
        if name == SIMPLE_CNN:  # its width is the first convolution's output channels
            values["width"] = int(first.shape[0])
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
    mismatch = fit_report(model.state_dict(), state)
    if mismatch:
        raise ConfigError(f"the weights do not fit {card.name} with {card.num_classes} classes and "
                          f"{card.channels} channels: {mismatch}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype torch cannot copy
        raise ConfigError(f"the weights do not fit {card.name}: {' '.join(str(exc).split())}") from exc
    return model.eval()
