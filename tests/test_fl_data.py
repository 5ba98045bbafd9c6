"""Data folders: PNG, JPEG and DICOM loading, every problem named, stratified splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl.data import load_images, scan_folder, split_indices
from fl.errors import DataFolderError


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", frames: int = 1) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def folder(tmp_path, rng):
    """Two classes: grayscale PNGs, a JPEG and DICOM files (one without an extension)."""
    root = tmp_path / "data"
    for i in range(4):
        write_png(root / "normal" / f"n{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "normal" / "n9.jpg", quality=95)
    ramp = (np.arange(16 * 16).reshape(16, 16) * 16).astype(np.uint16)  # 0 .. 4080, 12 bits
    for i in range(3):
        write_dicom(root / "pneumonia" / f"p{i}.dcm", ramp)
    write_dicom(root / "pneumonia" / "nested" / "IM0001", ramp)
    return root


def test_a_good_folder_loads_every_format(folder):
    scan = scan_folder(folder)
    assert scan.classes == ["normal", "pneumonia"]
    assert scan.class_counts() == {"normal": 5, "pneumonia": 4}
    assert not scan.problems
    images = load_images(scan, input_size=16, channels=1)
    assert images.shape == (9, 1, 16, 16) and images.dtype == np.uint8
    dicom = images[[i for i, p in enumerate(scan.files) if p.suffix == ".dcm"][0], 0]
    # the 12-bit ramp is stretched onto 0..255 in order
    assert dicom[0, 0] == 0 and dicom[-1, -1] == 255 and (np.diff(dicom.reshape(-1).astype(int)) >= 0).all()
    png = np.asarray(Image.open(scan.files[0]))
    assert np.array_equal(images[0, 0], png)
    assert load_images(scan, input_size=8, channels=3).shape == (9, 3, 8, 8)
    summary = scan.summary()
    assert summary == {"classes": ["normal", "pneumonia"], "counts": [5, 4], "channels": [1],
                       "min_size": [16, 16], "max_size": [16, 16]}


def test_monochrome1_dicom_is_inverted(tmp_path):
    ramp = (np.arange(64).reshape(8, 8) * 60).astype(np.uint16)
    write_dicom(tmp_path / "d" / "a" / "m1.dcm", ramp, photometric="MONOCHROME1")
    write_dicom(tmp_path / "d" / "b" / "m2.dcm", ramp)
    images = load_images(scan_folder(tmp_path / "d"), input_size=8, channels=1)
    assert np.array_equal(images[0, 0], 255 - images[1, 0])


def test_every_error_is_named_at_once(folder, rng):
    (folder / "viral").mkdir()
    (folder / "viral" / "notes.txt").write_text("not an image")
    (folder / "normal" / "truncated.png").write_bytes((folder / "normal" / "n0.png").read_bytes()[:60])
    (folder / "normal" / "noise.jpg").write_bytes(bytes(rng.integers(0, 256, 300, dtype=np.uint8)))
    write_dicom(folder / "pneumonia" / "cine.dcm", np.zeros((2, 8, 8)), frames=2)
    with pytest.raises(DataFolderError) as info:
        scan_folder(folder)
    problems = {p.what: p for p in info.value.problems}
    text = str(info.value)
    assert any("hold no readable images" in w and "viral/" in p.paths for w, p in problems.items())
    corrupt = next(p for w, p in problems.items() if "unreadable or corrupt" in w)
    assert {p.split(" (")[0] for p in corrupt.paths} == {"normal/truncated.png", "normal/noise.jpg"}
    assert any("multi-frame DICOM" in w for w in problems)
    assert "notes.txt" in text and "ignored" in text  # a warning, listed with the errors
    assert all(p.fix for p in info.value.problems)


def test_mixed_sizes_and_channels_are_warnings_or_strict_errors(folder, rng):
    write_png(folder / "normal" / "big.png", rng.integers(0, 256, (40, 30), dtype=np.uint8))
    write_png(folder / "normal" / "colour.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    scan = scan_folder(folder)
    kinds = {p.what.split(" (")[0]: p for p in scan.warnings}
    sizes = next(p for w, p in kinds.items() if "different sizes" in w)
    assert sizes.paths == ("normal/big.png",)
    channels = next(p for w, p in kinds.items() if "grayscale and" in w)
    assert "1 colour" in channels.what and channels.paths == ("normal/colour.png",)
    assert load_images(scan, input_size=16, channels=1).shape == (len(scan.files), 1, 16, 16)
    with pytest.raises(DataFolderError) as info:
        scan_folder(folder, strict=True)
    assert {p.severity for p in info.value.problems} == {"error"}


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no class folders"),
    (lambda root: (root.mkdir(), (root / "x.png").write_bytes(b"")), "no class folders"),
])
def test_unusable_folders(tmp_path, setup, message):
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(DataFolderError, match=message):
        scan_folder(root)


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), [10, 20, 1, 5])
    train, val = split_indices(labels, 0.2, seed=7)
    assert set(train) | set(val) == set(range(len(labels))) and not set(train) & set(val)
    assert [int((labels[val] == c).sum()) for c in range(4)] == [2, 4, 0, 1]
    again = split_indices(labels, 0.2, seed=7)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, split_indices(labels, 0.2, seed=8)[1])
