"""Models by name, and the flat layout their weights travel in.

``simple_cnn`` is a three-block CNN (conv 3x3, BatchNorm, ReLU, pooling) sized
by ``model.width``; any other name is a torchvision classification model built
with ``weights=None`` (nothing is downloaded) and its first convolution adapted
to the data's channel count.

Weights cross the network as one flat float32 vector holding every
floating-point entry of the state dict (parameters and BatchNorm running
statistics) in state-dict order; :class:`Layout` names the pieces.  Integer
buffers (BatchNorm's ``num_batches_tracked``) are counters, not weights: they
stay local.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mpc.errors import ConfigError

__all__ = [
    "SIMPLE_CNN",
    "check_model_name",
    "build_model",
    "SimpleCNN",
    "Entry",
    "Layout",
]

SIMPLE_CNN = "simple_cnn"
# torchvision builders that need extra arguments to build without pretrained weights
_EXTRA_ARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def _torchvision_names() -> list[str]:
    # Imported here, not at the top: torchvision costs seconds to import and simple_cnn does not need it.
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str, *, key: str = "model.name") -> None:
    """Raise :class:`ConfigError` unless ``name`` is ``simple_cnn`` or a torchvision classifier."""
    if name == SIMPLE_CNN:
        return
    known = _torchvision_names()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, [SIMPLE_CNN, *known], n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"use {SIMPLE_CNN} or one of: {', '.join(known)}"
        raise ConfigError(f"{key}: unknown model {name!r}; {hint}")


class SimpleCNN(nn.Sequential):
    """conv-BN-ReLU-pool, twice, then conv-BN-ReLU, global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, pooling: str = "max"):
        pool = nn.MaxPool2d if pooling == "max" else nn.AvgPool2d
        w = width
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
                bn1=nn.BatchNorm2d(w),
                relu1=nn.ReLU(),
                pool1=pool(2),
                conv2=nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
                bn2=nn.BatchNorm2d(2 * w),
                relu2=nn.ReLU(),
                pool2=pool(2),
                conv3=nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
                bn3=nn.BatchNorm2d(4 * w),
                relu3=nn.ReLU(),
                gap=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
                fc=nn.Linear(4 * w, num_classes),
            )
        )


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    input_size: int,
    width: int = 32,
    pooling: str = "max",
    seed: int = 0,
) -> nn.Module:
    """Build a freshly initialised model (seeded) and check it accepts ``input_size`` images.

    Raises:
        ConfigError: unknown name, or the model cannot take inputs of this size.
    """
    check_model_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == SIMPLE_CNN:
            if input_size < 4:
                raise ConfigError(f"data.input_size: {SIMPLE_CNN} needs at least 4x4 inputs, got {input_size}")
            model: nn.Module = SimpleCNN(in_channels, num_classes, width=width, pooling=pooling)
        else:
            import torchvision

            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_EXTRA_ARGS.get(name, {}))
            if in_channels != 3:
                _adapt_first_conv(model, in_channels)
    _check_input_size(model, name, in_channels, input_size, num_classes)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d with one taking ``in_channels`` channels (same geometry)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=1,
                    bias=child.bias is not None,
                )
                setattr(parent, child_name, new)
                return
    raise ConfigError("model.name: the model has no Conv2d layer to adapt to the data's channels")


def _check_input_size(model: nn.Module, name: str, channels: int, size: int, num_classes: int) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, channels, size, size))
    except RuntimeError as exc:
        raise ConfigError(
            f"data.input_size: model {name} cannot take {channels}x{size}x{size} inputs ({exc}); "
            "raise data.input_size or choose a smaller model"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (1, num_classes):
        raise ConfigError(f"model.name: {name} does not return one row of {num_classes} class scores")


@dataclass(frozen=True)
class Entry:
    """One floating-point state-dict entry: its name, shape, and whether it is a trained parameter."""

    name: str
    shape: tuple[int, ...]
    is_param: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class Layout:
    """The floating-point entries of a model's state dict, in order, as one flat vector."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries
        self.offsets = np.cumsum([0] + [e.size for e in entries]).tolist()
        self.size = int(self.offsets[-1])

    @classmethod
    def of(cls, model: nn.Module) -> "Layout":
        params = {n for n, _ in model.named_parameters()}
        entries = [
            Entry(name, tuple(t.shape), name in params)
            for name, t in model.state_dict().items()
            if t.is_floating_point()
        ]
        return cls(entries)

    def as_plain(self) -> list[list[Any]]:
        return [[e.name, list(e.shape), e.is_param] for e in self.entries]

    @classmethod
    def from_plain(cls, plain: Any) -> "Layout":
        return cls([Entry(str(n), tuple(int(s) for s in shape), bool(p)) for n, shape, p in plain])

    def first_difference(self, other: "Layout") -> str | None:
        """Describe the first entry where two layouts differ, or None if they are equal."""
        for mine, theirs in zip(self.entries, other.entries):
            if mine != theirs:
                return f"entry {mine.name} {list(mine.shape)} vs {theirs.name} {list(theirs.shape)}"
        if len(self.entries) != len(other.entries):
            return f"{len(self.entries)} entries vs {len(other.entries)}"
        return None

    def param_mask(self) -> np.ndarray:
        """True for the vector positions that hold trained parameters (not running statistics)."""
        mask = np.zeros(self.size, dtype=bool)
        for e, start in zip(self.entries, self.offsets):
            mask[start : start + e.size] = e.is_param
        return mask

    def flatten(self, model: nn.Module) -> np.ndarray:
        """The model's floating-point state as one float32 vector."""
        state = model.state_dict()
        out = np.empty(self.size, dtype=np.float32)
        for e, start in zip(self.entries, self.offsets):
            out[start : start + e.size] = state[e.name].detach().reshape(-1).to(torch.float32).cpu().numpy()
        return out

    def load(self, model: nn.Module, flat: np.ndarray) -> None:
        """Copy a flat vector into the model's floating-point state, in place."""
        if flat.shape != (self.size,):
            raise ValueError(f"expected a vector of {self.size} values, got shape {flat.shape}")
        state = model.state_dict()
        with torch.no_grad():
            for e, start in zip(self.entries, self.offsets):
                piece = torch.from_numpy(np.array(flat[start : start + e.size])).reshape(e.shape)  # a writable copy
                state[e.name].copy_(piece)

    def entry_at(self, index: int) -> str:
        """The name of the entry holding vector position ``index`` (for error messages)."""
        pos = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.entries[min(pos, len(self.entries) - 1)].name
