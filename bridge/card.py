"""Model cards: the public facts about a model, which the model server sends the data owner.

A :class:`ModelCard` names the architecture (``simple_cnn`` or a torchvision
classifier, as in ``fl.models``), the number of classes and input channels,
the training preprocessing (input size, normalisation) and the class names.
The data owner builds the same architecture from it (random weights, nothing
downloaded), converts it, and both parties check that their plans agree.  The
weights never leave the model server.  A card arrives from the network, so
:meth:`ModelCard.from_bytes` checks every field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import msgpack
import numpy as np

from mpc.errors import ConfigError

__all__ = ["ModelCard", "MAX_CARD_BYTES", "normalisation"]

#: largest encoded card a data owner accepts
MAX_CARD_BYTES = 1 << 16
_MAX_TEXT = 256


@dataclass(frozen=True)
class ModelCard:
    """The public facts about a model; everything the data owner needs, no weights."""

    name: str
    num_classes: int
    channels: int = 3
    input_size: int = 224
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    width: int = 32
    pooling: str = "max"
    classes: tuple[str, ...] = ()
    model_id: str = ""

    def __post_init__(self) -> None:
        for key in ("name", "model_id"):
            value = getattr(self, key)
            if not isinstance(value, str) or len(value) > _MAX_TEXT or (key == "name" and not value):
                raise ConfigError(f"model card: {key!r} must be a string of at most {_MAX_TEXT} characters")
        if not all(isinstance(c, str) and len(c) <= _MAX_TEXT for c in self.classes):
            raise ConfigError(f"model card: 'classes' must be names of at most {_MAX_TEXT} characters")
        for key, lo, hi in (("num_classes", 1, 1 << 20), ("channels", 1, 4), ("input_size", 4, 4096),
                            ("width", 1, 1024)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"model card: {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if (not isinstance(value, tuple) or len(value) not in (1, self.channels)
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
                raise ConfigError(f"model card: {key!r} must hold 1 or {self.channels} finite numbers, got {value!r}")
        if any(v <= 0 for v in self.std):
            raise ConfigError(f"model card: 'std' must be positive, got {self.std!r}")
        if self.classes and len(self.classes) != self.num_classes:
            raise ConfigError(f"model card: {len(self.classes)} class names for {self.num_classes} classes")
        if self.pooling not in ("max", "avg"):
            raise ConfigError(f"model card: 'pooling' must be 'max' or 'avg', got {self.pooling!r}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes or tuple(str(i) for i in range(self.num_classes))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.input_size, self.input_size)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["mean"], data["std"], data["classes"] = list(self.mean), list(self.std), list(self.classes)
        return msgpack.packb(data, use_bin_type=True)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ModelCard":
        """Decode and check a card received from a model server (never trusted blindly)."""
        if len(raw) > MAX_CARD_BYTES:
            raise ConfigError(f"model card of {len(raw)} bytes exceeds {MAX_CARD_BYTES}")
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ConfigError(f"undecodable model card: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> "ModelCard":
        if not isinstance(data, Mapping):
            raise ConfigError(f"model card must be a table, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model card: unknown keys {unknown}; known: {sorted(known)}")
        values = dict(data)
        for key in ("mean", "std", "classes"):
            if key in values:
                v = values[key]
                values[key] = tuple(v) if isinstance(v, (list, tuple)) else (v,)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"model card: {exc}") from exc


def normalisation(card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std as (1, C, 1, 1) float32 arrays."""
    mean = np.broadcast_to(np.asarray(card.mean, np.float32), (card.channels,)).reshape(1, -1, 1, 1)
    std = np.broadcast_to(np.asarray(card.std, np.float32), (card.channels,)).reshape(1, -1, 1, 1)
    return mean, std

