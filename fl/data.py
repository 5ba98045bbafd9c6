"""A data owner's image folder: check it, load it, split it.

Layout (as torchvision's ImageFolder)::

    DIR/
      normal/      img001.png  img002.jpg  scan.dcm ...
      pneumonia/   ...

One sub-folder per class (files in nested folders count for their class);
PNG, JPEG, BMP, TIFF and DICOM (``.dcm``, or any other name whose file has the
DICOM preamble, e.g. a file named by its UID ``1.2.840.113619.2.55.3.604688``).

:func:`scan_folder` opens and decodes every file once and names every problem
(:class:`fl.errors.DataProblem`).  Errors stop the node: no class folders, an
empty class, a class folder or file name that is not valid UTF-8, an unreadable
or corrupt file, a compressed DICOM no installed decoder reads (the message names
the decoder plugin and how to install it), pixels that are NaN or infinite, a
multi-frame DICOM.  Warnings are
handled: files that are not images and files outside class folders are
ignored; mixed sizes are resized to ``data.input_size``; mixed channel counts are
converted to ``data.channels``.  ``strict=True`` makes mixed sizes and channels
errors too.

:func:`load_images` decodes, converts and resizes everything into one uint8
array (N, C, S, S); :func:`split_indices` makes a stratified, seeded
train/validation split.  Pixels stay on the node; only model updates leave it.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import DataFolderError, DataProblem

__all__ = [
    "IMAGE_SUFFIXES",
    "DICOM_SUFFIXES",
    "ImageProblem",
    "image_kind",
    "decode_pixels",
    "shown_path",
    "FolderScan",
    "scan_folder",
    "load_images",
    "split_indices",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Refuse decompression bombs with a clear error rather than PIL's warning.
_MAX_PIXELS = 1 << 28
_DICOM_MAGIC_AT = 128

#: what each kind of unusable file means for the scan report, and what to do about it
_PROBLEMS = {
    "corrupt": ("file(s) are unreadable or corrupt", "replace them with a readable copy, or remove them"),
    "no-decoder": ("DICOM file(s) are compressed in a format no installed decoder reads",
                   "the files are fine: install the decoder named for each (pydicom's plugins)"),
    "not-finite": ("file(s) hold NaN or infinite pixel values",
                   "re-export them with finite pixel values (e.g. replace NaN by 0), or remove them"),
    "multi-frame": ("multi-frame DICOM file(s)", "export one frame per file"),
}


class ImageProblem(Exception):
    """Why one file cannot be used: ``category`` (a key of the scan's problem kinds) and ``detail``.

    ``fix``, when given, is specific to this file (e.g. the install command of a missing decoder).
    """

    def __init__(self, category: str, detail: str, fix: str | None = None):
        self.category = category
        self.detail = detail
        self.fix = fix or _PROBLEMS[category][1]
        super().__init__(f"{detail}; {self.fix}")


def shown_path(path: str | os.PathLike) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 appear as ``\\xe9`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    # Undecodable bytes in a file name reach Python as lone surrogates, which UTF-8 cannot encode.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class FolderScan:
    """What :func:`scan_folder` found: the usable files, their classes and properties, and the problems."""

    root: Path
    classes: list[str]
    files: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)

    @property
    def warnings(self) -> list[DataProblem]:
        return [p for p in self.problems if p.severity == "warning"]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def summary(self) -> dict[str, Any]:
        """Plain data for the hub: class names and counts, channel counts, size range (no pixels)."""
        heights = [h for _, h in self.sizes]
        widths = [w for w, _ in self.sizes]
        return {
            "classes": list(self.classes),
            "counts": [int(c) for c in self.class_counts().values()],
            "channels": sorted(set(self.channels)),
            "min_size": [min(widths), min(heights)],
            "max_size": [max(widths), max(heights)],
        }


def scan_folder(root: str | Path, *, strict: bool = False) -> FolderScan:
    """Check an image folder, decoding every file once.

    Raises:
        DataFolderError: listing every error and warning, if there is at least one error.
    """
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataFolderError(
            str(root), [DataProblem("error", f"{root} {what}", "pass the folder holding one sub-folder per class")]
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    bad_names = sorted(shown_path(p.name) + "/" for p in class_dirs if not _is_utf8(p.name))
    class_dirs = [p for p in class_dirs if _is_utf8(p.name)]
    scan = FolderScan(root=root, classes=[p.name for p in class_dirs])
    loose = sorted(shown_path(p.name) for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if loose:
        scan.problems.append(
            DataProblem("warning", f"{len(loose)} file(s) directly in the folder are ignored", "move them into a class folder", tuple(loose))
        )
    if not class_dirs and not bad_names:
        scan.problems.append(
            DataProblem("error", "no class folders", "create one sub-folder per class (e.g. normal/, pneumonia/) holding its images")
        )
        raise DataFolderError(shown_path(root), scan.problems)
    unusable: dict[str, list[str]] = {category: [] for category in _PROBLEMS}
    fixes: dict[str, list[str]] = {category: [] for category in _PROBLEMS}
    not_images: list[str] = []
    empty: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        found = 0
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            rel = str(path.relative_to(root))
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if not _is_utf8(rel):
                bad_names.append(shown_path(rel))
                continue
            kind = image_kind(path)
            if kind is None:
                not_images.append(rel)
                continue
            try:
                size, channels = _probe(path, kind)
            except ImageProblem as problem:
                unusable[problem.category].append(f"{rel} ({problem.detail})")
                if problem.fix not in fixes[problem.category]:
                    fixes[problem.category].append(problem.fix)
                continue
            except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unusable
                unusable["corrupt"].append(f"{rel} ({_one_line(exc)})")
                continue
            found += 1
            scan.files.append(path)
            scan.labels.append(label)
            scan.sizes.append(size)
            scan.channels.append(channels)
        if not found:
            empty.append(class_dir.name + "/")
    if bad_names:
        scan.problems.append(
            DataProblem(
                "error",
                f"{len(bad_names)} class folder or file name(s) are not valid UTF-8 (shown with \\x escapes)",
                "rename them with UTF-8 names (e.g. `convmv -r -f latin1 -t utf8 --notest DIR`): names travel to the "
                "hub as UTF-8 text",
                tuple(bad_names),
            )
        )
    if empty:
        scan.problems.append(
            DataProblem("error", f"{len(empty)} class folder(s) hold no readable images", "add images or remove the folder", tuple(empty))
        )
    for category, (what, fix) in _PROBLEMS.items():
        if unusable[category]:
            fix = "; ".join(fixes[category]) if fixes[category] else fix
            scan.problems.append(DataProblem("error", f"{len(unusable[category])} {what}", fix,
                                             tuple(unusable[category])))
    if not_images:
        scan.problems.append(
            DataProblem(
                "warning",
                f"{len(not_images)} file(s) are not PNG, JPEG, BMP, TIFF or DICOM images and are ignored",
                "convert or remove them",
                tuple(not_images),
            )
        )
    if len(class_dirs) == 1:
        scan.problems.append(
            DataProblem(
                "warning",
                "only one class folder",
                "fine if other nodes hold the other classes; local per-class metrics will be undefined",
            )
        )
    _check_uniformity(scan, strict)
    if any(p.severity == "error" for p in scan.problems):
        raise DataFolderError(shown_path(root), scan.problems)
    return scan


def _check_uniformity(scan: FolderScan, strict: bool) -> None:
    severity = "error" if strict else "warning"
    if len(set(scan.sizes)) > 1:
        by_size = Counter(scan.sizes)
        (common, _), = by_size.most_common(1)
        odd = [str(p.relative_to(scan.root)) for p, s in zip(scan.files, scan.sizes) if s != common]
        scan.problems.append(
            DataProblem(
                severity,
                f"images have {len(by_size)} different sizes (most are {common[0]}x{common[1]})",
                "all images are resized to data.input_size; resize them beforehand to control how",
                tuple(odd),
            )
        )
    if len(set(scan.channels)) > 1:
        counts = Counter(scan.channels)
        odd_channels = min(counts, key=counts.__getitem__)
        odd = [str(p.relative_to(scan.root)) for p, c in zip(scan.files, scan.channels) if c == odd_channels]
        scan.problems.append(
            DataProblem(
                severity,
                f"{counts.get(1, 0)} grayscale and {counts.get(3, 0)} colour images",
                "all images are converted to data.channels; convert them beforehand to be sure",
                tuple(odd),
            )
        )


def image_kind(path: Path) -> str | None:
    """``"image"`` (decoded by PIL), ``"dicom"``, or None for a file that is neither.

    The suffix decides for image and DICOM suffixes; any other name is sniffed
    for the DICOM preamble (``DICM`` at offset 128), since DICOM files are often
    named by their UID, whose last dotted part looks like a suffix.
    """
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    try:
        with path.open("rb") as fh:
            head = fh.read(_DICOM_MAGIC_AT + 4)
    except OSError:
        return None
    return "dicom" if head[_DICOM_MAGIC_AT:] == b"DICM" else None


def _probe(path: Path, kind: str) -> tuple[tuple[int, int], int]:
    """(width, height) and channel count, after fully decoding the file."""
    pixels = decode_pixels(path, kind)
    height, width = pixels.shape[:2]
    return (width, height), (1 if pixels.ndim == 2 else 3)


def decode_pixels(path: Path, kind: str) -> np.ndarray:
    """Pixels as uint8, (H, W) for grayscale or (H, W, 3) for colour.

    Raises:
        ImageProblem: a multi-frame DICOM, a DICOM compression no installed decoder
            reads, or NaN/infinite pixels (the problem says what to do).
        Exception: whatever the decoder raises for a corrupt file.
    """
    if kind == "dicom":
        return _decode_dicom(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.width * im.height > _MAX_PIXELS:
                raise ValueError(f"{im.width}x{im.height} pixels is too large")
            im.load()  # decodes everything: truncated files fail here, not later
            return _pil_to_array(im)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("L", "1"):
        return np.asarray(im.convert("L"))
    if im.mode == "LA":
        return np.asarray(im.convert("L"))
    if im.mode in _GRAY_MODES:  # 16-bit or float grayscale: stretch to 8 bits
        return _stretch(np.asarray(im, dtype=np.float64))
    return np.asarray(im.convert("RGB"))


def _decode_dicom(path: Path) -> np.ndarray:
    import pydicom  # only nodes with DICOM files pay for the import

    _quiet_decoder_tracebacks()
    ds = pydicom.dcmread(path)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageProblem("multi-frame", f"{frames} frames")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    _local.decoding = True
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:
        fix = _missing_decoder(syntax)
        if fix is None:
            raise
        raise ImageProblem("no-decoder", f"{syntax.name}: {_one_line(exc)}", fix) from exc
    finally:
        _local.decoding = False
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    if samples == 3:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"colour DICOM with unexpected pixel shape {arr.shape}")
        return arr.astype(np.uint8) if arr.dtype == np.uint8 else _stretch(arr.astype(np.float64))
    if arr.ndim != 2:
        raise ValueError(f"grayscale DICOM with unexpected pixel shape {arr.shape}")
    arr = arr.astype(np.float64)
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = arr.max() - arr  # MONOCHROME1 stores bright as low values
    return _stretch(arr)


def _missing_decoder(syntax: object) -> str | None:
    """How to install the decoder for a compressed transfer syntax, if pydicom's pylibjpeg plugin lacks it.

    None when the syntax is not compressed, or the plugin is there (then the
    file itself is at fault).  The packages come from pydicom's own table of
    the plugin's dependencies.
    """
    if syntax is None or not getattr(syntax, "is_compressed", False):
        return None
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"pydicom has no decoder for {syntax.name} ({syntax}); convert the files to an uncompressed syntax"
    if "pylibjpeg" in decoder.available_plugins:
        return None
    try:
        from pydicom.pixels.decoders.pylibjpeg import DECODER_DEPENDENCIES
    except ImportError:  # a pydicom without that table
        DECODER_DEPENDENCIES = {}
    packages = [spec.split(">")[0].split("=")[0] for spec in DECODER_DEPENDENCIES.get(syntax, ())]
    if not packages:
        missing = "; ".join(decoder.missing_dependencies) or "none listed"
        return f"no installed decoder reads {syntax.name} (pydicom's plugins and what they need: {missing})"
    return (f"{syntax.name} needs pydicom's pylibjpeg plugin, which is not installed here: "
            f"pip install {' '.join(packages)} (primia depends on them: reinstall primia)")


_local = threading.local()


class _WhileDecoding(logging.Filter):
    """Drops pydicom's tracebacks of failed decoder attempts while this module decodes.

    pydicom logs each plugin's failure with its traceback before raising an error
    that already says what every plugin reported; the scan reports that error,
    by file, so the tracebacks would only bury the report on stderr.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(_local, "decoding", False) and record.exc_info)


_FILTER = _WhileDecoding()


def _quiet_decoder_tracebacks() -> None:
    for name in ("pydicom", "pydicom.pixels.decoders.base"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Map the image's own value range onto 0..255 (refusing NaN and infinities, which have no range)."""
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - np.count_nonzero(finite))
        raise ImageProblem("not-finite", f"{bad} of {arr.size} pixel values are NaN or infinite")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape[:2] if arr.ndim == 2 else arr.shape, dtype=np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def load_images(scan: FolderScan, *, input_size: int, channels: int) -> np.ndarray:
    """Decode every file, convert it to ``channels`` channels and resize it to a square.

    Returns:
        uint8 array of shape (N, channels, input_size, input_size), in ``scan.files`` order.
    """
    out = np.empty((len(scan.files), channels, input_size, input_size), dtype=np.uint8)
    for i, path in enumerate(scan.files):
        pixels = decode_pixels(path, image_kind(path) or "image")
        im = Image.fromarray(pixels)
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (input_size, input_size):
            im = im.resize((input_size, input_size), Image.Resampling.BILINEAR)
        arr = np.asarray(im)
        out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return out


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split: about ``val_fraction`` of each class goes to validation.

    A class with a single image keeps it for training.  The shuffle is not
    secret material, so numpy's seeded generator is fine here.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        n_val = min(n_val, len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
