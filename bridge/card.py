"""Model cards: the public facts about a model, which the model server sends the data owner.

A :class:`ModelCard` names the architecture (``simple_cnn`` or a torchvision
classifier, as in ``fl.models``), the number of classes and input channels,
the training preprocessing (input size, normalisation) and the class names.
The data owner builds the same architecture from it (random weights, nothing
downloaded), converts it, and both parties check that their plans agree.  The
weights never leave the model server.  A card arrives from the network, so
:meth:`ModelCard.from_bytes` checks every field.

A card may carry :class:`Bounds`: the magnitudes the model owner measured on its
own validation images, with the margin it grants.  Both parties size the
fixed-point settings from them (:func:`bridge.sizing.size_fixed_point`), and the
data owner refuses inputs beyond them.  They tell the data owner four numbers
about the model (largest input, compared value, intermediate value and logit
seen on the model owner's data) and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import msgpack
import numpy as np

from mpc.errors import ConfigError

__all__ = ["ModelCard", "Bounds", "MAX_CARD_BYTES", "normalisation"]

#: largest encoded card a data owner accepts
MAX_CARD_BYTES = 1 << 16
_MAX_TEXT = 256


@dataclass(frozen=True)
class Bounds:
    """Magnitudes measured on float64 plaintext runs of a model over ``images`` images.

    Attributes:
        input: largest |preprocessed input value|.
        compared: largest magnitude a comparison met (a ReLU's input, a clamp's
            distance to a bound, the difference of two max-pool inputs).
        values: largest |output| of any op (products sit at act_bits + weight_bits
            fractional bits before truncation: this bounds the ring).
        values_at: the op where ``values`` was met (named in refusals).
        logit: largest |logit|.
        images: how many images were measured.
        margin: the factor granted beyond every measured magnitude: settings hold
            ``margin`` times each, and inputs beyond ``margin * input`` are refused.
    """

    input: float
    compared: float
    values: float
    logit: float
    images: int
    margin: float
    values_at: str = ""

    def __post_init__(self) -> None:
        for key in ("input", "compared", "values", "logit"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"model card bounds: {key!r} must be a finite number >= 0, got {value!r}")
        if isinstance(self.images, bool) or not isinstance(self.images, int) or not 1 <= self.images <= 1 << 31:
            raise ConfigError(f"model card bounds: 'images' must be a positive integer, got {self.images!r}")
        margin = self.margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 1 <= margin <= 1 << 10:
            raise ConfigError(f"model card bounds: 'margin' must be a number in [1, 1024], got {margin!r}")
        if not isinstance(self.values_at, str) or len(self.values_at) > _MAX_TEXT:
            raise ConfigError(f"model card bounds: 'values_at' must be a name of at most {_MAX_TEXT} characters")

    def merged(self, other: "Bounds") -> "Bounds":
        """Bounds over both sets of images (the larger of each magnitude)."""
        at = self.values_at if self.values >= other.values else other.values_at
        return Bounds(max(self.input, other.input), max(self.compared, other.compared),
                      max(self.values, other.values), max(self.logit, other.logit), self.images + other.images,
                      max(self.margin, other.margin), at)

    def describe(self) -> str:
        return (f"measured on {self.images} image(s), margin x{self.margin:g}: inputs up to {self.input:.4g}, "
                f"compared values up to {self.compared:.4g}, values up to {self.values:.4g}"
                f"{f' (at {self.values_at})' if self.values_at else ''}, logits up to {self.logit:.4g}")


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
    bounds: Bounds | None = None

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
        if self.bounds is not None and not isinstance(self.bounds, Bounds):
            raise ConfigError(f"model card: 'bounds' must be Bounds or absent, got {type(self.bounds).__name__}")

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
            if isinstance(values.get("bounds"), Mapping):
                bounds = values["bounds"]
                unknown = sorted(set(bounds) - set(Bounds.__dataclass_fields__))
                if unknown:
                    raise ConfigError(f"model card bounds: unknown keys {unknown}")
                values["bounds"] = Bounds(**bounds)
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"model card: {exc}") from exc


def normalisation(card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std as (1, C, 1, 1) float32 arrays."""
    mean = np.broadcast_to(np.asarray(card.mean, np.float32), (card.channels,)).reshape(1, -1, 1, 1)
    std = np.broadcast_to(np.asarray(card.std, np.float32), (card.channels,)).reshape(1, -1, 1, 1)
    return mean, std

