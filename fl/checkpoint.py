"""Checkpoints (torch, weights only) and JSON, written atomically (:func:`fl.files.atomic_write`).

Checkpoints are loaded with
``torch.load(..., weights_only=True)``: tensors and plain containers only,
nothing unpickled that could run code.

A hub checkpoint holds: format, run id, configuration digest, the last
completed round, the global model's state dict, the server optimizer state,
the class names and channel count, and the metrics history.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ResumeError
from .files import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "write_json"]

CHECKPOINT_FORMAT = 1


def _to_torch(value: Any) -> Any:
    """numpy arrays become tensors (``weights_only`` loading refuses numpy objects)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_torch(v) for v in value]
    return value


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save ``state`` (tensors, numpy arrays and plain containers) with torch."""
    payload = {"format": CHECKPOINT_FORMAT, **_to_torch(state)}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ResumeError: the file is missing, unreadable, or of another format.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ResumeError(f"no checkpoint at {path}; start the run without --resume") from None
    except Exception as exc:  # torch raises several types for damaged files
        raise ResumeError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path} is not a primia hub checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write ``data`` as indented JSON (NaN becomes null)."""
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False)
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
