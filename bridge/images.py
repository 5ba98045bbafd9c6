"""The data owner's images: find them, decode them (PNG, JPEG, DICOM...), preprocess them.

Preprocessing is the model's training preprocessing, from its card
(:class:`bridge.models.ModelCard`): convert to the model's channel count,
resize to ``input_size`` x ``input_size`` (bilinear), scale pixels to [0, 1],
subtract ``mean`` and divide by ``std`` per channel — what ``fl`` does to
training images, with the same decoder (``fl.data``), so that an image is
seen at inference exactly as during training.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fl import data as fl_data
from mpc.errors import ConfigError

from .card import ModelCard, normalisation

__all__ = ["find_images", "collect_images", "load_image", "preprocess", "load_batch"]


def find_images(path: str | os.PathLike) -> list[Path]:
    """One image file, or every image/DICOM file under a folder (recursively, sorted).

    Raises:
        ConfigError: the path does not exist, is not an image, or the folder holds none.
    """
    path = Path(path)
    if path.is_file():
        if fl_data.image_kind(path) is None:
            raise ConfigError(f"{path} is not a PNG/JPEG/BMP/TIFF image or a DICOM file")
        return [path]
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist")
    found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and fl_data.image_kind(p))
    if not found:
        raise ConfigError(f"no images (PNG, JPEG, BMP, TIFF or DICOM) under {path}")
    return found


def collect_images(inputs: list[str | os.PathLike]) -> list[tuple[Path, str]]:
    """Every image under the inputs (files or folders), each with the name its result gets.

    Names are paths relative to the inputs' common folder (a lone folder input is
    that folder itself), so ``siteA/x.png`` and ``siteB/x.png`` keep apart as
    ``siteA/x.png`` and ``siteB/x.png``.  A file reached twice counts once.

    Raises:
        ConfigError: no input, an input that is not an image or a folder of
            images, or two files whose names differ only in case (they would
            overwrite each other on a case-insensitive disk).
    """
    if not inputs:
        raise ConfigError("give the images to classify: files or folders (PNG, JPEG, BMP, TIFF, DICOM)")
    anchors, files = [], []
    for item in inputs:
        path = Path(os.path.abspath(item))  # absolute, symlinks kept: names follow what the user typed
        files.extend(Path(os.path.abspath(f)) for f in find_images(path))
        anchors.append(path if path.is_dir() else path.parent)
    root = Path(os.path.commonpath(anchors))
    named: dict[Path, str] = {}
    for f in files:
        named.setdefault(f, f.relative_to(root).as_posix())
    seen: dict[str, str] = {}
    for name in named.values():
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            raise ConfigError(f"{fl_data.shown_path(other)} and {fl_data.shown_path(name)} differ only in case: "
                              "their results would overwrite each other on a case-insensitive disk; rename one")
    return list(named.items())


def load_image(path: str | os.PathLike, *, channels: int, size: int) -> np.ndarray:
    """Decode one file and convert it to uint8 (channels, size, size).

    Raises:
        ConfigError: the file cannot be decoded (the message names it and why).
    """
    path = Path(path)
    kind = fl_data.image_kind(path) or "image"
    try:
        pixels = fl_data.decode_pixels(path, kind)
    except fl_data.ImageProblem as problem:
        raise ConfigError(f"cannot use {fl_data.shown_path(path)}: {problem}") from None
    except Exception as exc:  # PIL and pydicom raise many types for corrupt files
        raise ConfigError(f"cannot decode {fl_data.shown_path(path)}: {exc}") from exc
    im = Image.fromarray(pixels).convert("L" if channels == 1 else "RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(im)
    return arr[None].copy() if channels == 1 else arr.transpose(2, 0, 1).copy()


def preprocess(pixels: np.ndarray, card: ModelCard) -> np.ndarray:
    """uint8 (N, C, S, S) pixels to the model's normalised float32 input."""
    mean, std = normalisation(card)
    return ((pixels.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def load_batch(paths: list[Path], card: ModelCard) -> np.ndarray:
    """Decode and preprocess several files into one (N, C, S, S) float32 batch."""
    pixels = np.stack([load_image(p, channels=card.channels, size=card.input_size) for p in paths])
    return preprocess(pixels, card)
