"""Training-image augmentations: torchvision ``transforms.v2`` classes named in the configuration.

Only random image transforms that keep the image's shape are accepted, so that
a configuration cannot make a node run arbitrary code or change tensor sizes.
Each transform is applied per image (not per batch), so every image draws its
own random parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from mpc.errors import ConfigError

__all__ = ["ALLOWED", "build_augmentations"]

#: torchvision.transforms.v2 classes a configuration may name
ALLOWED = frozenset(
    {
        "RandomRotation",
        "RandomAffine",
        "RandomHorizontalFlip",
        "RandomVerticalFlip",
        "RandomResizedCrop",
        "RandomPerspective",
        "RandomErasing",
        "RandomAutocontrast",
        "RandomAdjustSharpness",
        "RandomInvert",
        "ColorJitter",
        "GaussianBlur",
        "GaussianNoise",
        "ElasticTransform",
    }
)


def build_augmentations(
    augmentations: Sequence[Any], *, input_size: int, channels: int, key: str = "data.augmentations"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build the transforms and check each one on a dummy image.

    Args:
        augmentations: items with ``name`` and ``kwargs`` (``fl.config.Augmentation``).
        input_size, channels: the image shape the transforms will see, (channels, size, size), float in [0, 1].

    Returns:
        A function applying every transform, in order, to one (C, H, W) float tensor.

    Raises:
        ConfigError: an unknown or disallowed name, bad arguments, or a transform changing the shape.
    """
    from torchvision.transforms import v2  # seconds to import; only when augmentations are configured

    built = []
    for i, aug in enumerate(augmentations):
        where = f"{key}[{i}]"
        if aug.name not in ALLOWED:
            raise ConfigError(f"{where}.name: {aug.name!r} is not an allowed transform; use one of {sorted(ALLOWED)}")
        cls = getattr(v2, aug.name, None)
        if cls is None:
            raise ConfigError(f"{where}.name: this torchvision has no transforms.v2.{aug.name}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in aug.kwargs.items()}
        try:
            transform = cls(**kwargs)
            probe = torch.rand(channels, input_size, input_size)
            out = transform(probe)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{where}: {aug.name}({_show(kwargs)}) failed: {exc}") from exc
        if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
            raise ConfigError(f"{where}: {aug.name} changes the image shape; augmentations must keep it")
        built.append(transform)

    def apply(image: torch.Tensor) -> torch.Tensor:
        for transform in built:
            image = transform(image)
        return image

    return apply


def _show(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
