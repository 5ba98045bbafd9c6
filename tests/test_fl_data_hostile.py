"""Image folders an outside tester broke: UID-named DICOM, NaN TIFFs, non-UTF-8 names, compressed DICOM.

Each case is checked through :func:`fl.data.scan_folder` (what ``primia node``
runs at start-up) and, where the message reaches a person, through
``primia node --check`` in a real process: exit code, full message, no traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from bridge.images import load_image
from fl.data import load_images, scan_folder
from fl.errors import DataFolderError
from mpc.errors import ConfigError

from .test_fl_data import write_png

ROOT = Path(__file__).resolve().parents[1]
UID_NAME = "1.2.840.113619.2.55.3.604688"


def bundled(name: str) -> Path:
    """A file pydicom ships (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom no longer bundles {name}"
    return Path(path)


def check(folder: Path, *before: str) -> subprocess.CompletedProcess:
    """``primia node --check FOLDER`` in a fresh process, after running ``before`` (Python statements)."""
    code = "\n".join([*before, "import sys", "from cli.main import main",
                      f"sys.exit(main(['node', '--check', '--data', {str(folder)!r}]))"])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _problem(error: DataFolderError, words: str):
    return next(p for p in error.problems if words in p.what)


# -- item 3: a DICOM file named by its UID ---------------------------------------------------------
def test_a_dicom_file_named_by_its_uid_is_an_image(tmp_path):
    root = tmp_path / "data"
    (root / "ct").mkdir(parents=True)
    shutil.copy(bundled("MR_small.dcm"), root / "ct" / UID_NAME)  # its "suffix" is .604688
    write_png(root / "xray" / "a.png", np.zeros((8, 8), np.uint8))
    scan = scan_folder(root)
    assert scan.class_counts() == {"ct": 1, "xray": 1}
    assert not [p for p in scan.problems if "not PNG" in p.what]
    images = load_images(scan, input_size=16, channels=1)
    named = tmp_path / "MR_small.dcm"
    shutil.copy(bundled("MR_small.dcm"), named)
    reference = load_image(named, channels=1, size=16)  # the same file under a DICOM suffix
    assert reference.std() > 0
    np.testing.assert_array_equal(images[0], reference)
    # bridge's images use the same rule
    np.testing.assert_array_equal(load_image(root / "ct" / UID_NAME, channels=1, size=16), reference)


def test_other_dotted_names_without_the_preamble_are_still_not_images(tmp_path):
    root = tmp_path / "data"
    write_png(root / "a" / "x.png", np.zeros((8, 8), np.uint8))
    (root / "a" / "1.2.3.4").write_bytes(b"\0" * 200)
    (root / "a" / "notes.txt").write_text("x" + "DICM" * 50)  # DICM, but not at offset 128
    scan = scan_folder(root)
    assert scan.class_counts() == {"a": 1}
    ignored = next(p for p in scan.problems if "not PNG" in p.what)
    assert set(ignored.paths) == {"a/1.2.3.4", "a/notes.txt"}


# -- item 4: float TIFFs with NaN or infinity ----------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_tiff_with_nan_or_inf_is_refused_naming_the_file(tmp_path, bad):
    root = tmp_path / "data"
    write_png(root / "a" / "ok.png", np.zeros((8, 8), np.uint8))
    good = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(good, mode="F").save(root / "a" / "float_ok.tif")
    broken = good.copy()
    broken[2, 3] = bad
    Image.fromarray(broken, mode="F").save(root / "a" / "scan.tif")
    with pytest.raises(DataFolderError) as info:
        scan_folder(root)
    problem = _problem(info.value, "NaN or infinite")
    assert problem.severity == "error" and problem.paths == ("a/scan.tif (1 of 64 pixel values are NaN or infinite)",)
    assert "float_ok.tif" not in str(info.value)  # a finite float TIFF is fine
    with pytest.raises(ConfigError, match=r"scan\.tif.*NaN or infinite"):
        load_image(root / "a" / "scan.tif", channels=1, size=8)


# -- item 5: names that are not UTF-8 ------------------------------------------------------------
def _bytes_path(*parts: bytes) -> bytes:
    return os.path.join(*parts)


def test_non_utf8_class_and_file_names_are_errors_naming_them(tmp_path):
    root = tmp_path / "data"
    write_png(root / "normal" / "a.png", np.zeros((8, 8), np.uint8))
    raw_root = os.fsencode(root)
    os.mkdir(_bytes_path(raw_root, b"caf\xe9"))  # a Latin-1 class folder name
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.fsdecode(_bytes_path(raw_root, b"caf\xe9", b"x.png")))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.fsdecode(_bytes_path(raw_root, b"normal", b"r\xf6ntgen.png")))
    with pytest.raises(DataFolderError) as info:
        scan_folder(root)
    problem = _problem(info.value, "not valid UTF-8")
    assert set(problem.paths) == {"caf\\xe9/", "normal/r\\xf6ntgen.png"}
    assert "rename" in problem.fix
    str(info.value).encode("utf-8")  # the message itself prints anywhere

    result = check(root)
    assert result.returncode == 1, result
    assert "not valid UTF-8" in result.stderr and "caf\\xe9/" in result.stderr and "rename" in result.stderr
    assert "Traceback" not in result.stderr and "UnicodeEncodeError" not in result.stderr


# -- item 6: compressed DICOM ------------------------------------------------------------------------
COMPRESSED = {
    "JPEG-LS lossless": ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    "JPEG-LS near-lossless": ("JPEGLSNearLossless_16.dcm", None),
    "JPEG lossless": ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"),
    "12-bit JPEG": ("JPGExtended.dcm", None),
    "JPEG 2000": ("JPEG2000.dcm", None),
    "JPEG 2000 lossless": ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
}


def test_compressed_dicom_decodes_with_the_installed_plugins(tmp_path):
    root = tmp_path / "data"
    for label, (name, _) in COMPRESSED.items():
        target = root / label.replace(" ", "_") / name
        target.parent.mkdir(parents=True)
        shutil.copy(bundled(name), target)
    scan = scan_folder(root)
    assert sum(scan.class_counts().values()) == len(COMPRESSED)
    assert not [p for p in scan.problems if p.severity == "error"]
    for label, (name, lossless_twin) in COMPRESSED.items():
        if lossless_twin is not None:  # decoded exactly like its uncompressed twin
            ours = load_image(root / label.replace(" ", "_") / name, channels=3, size=32)
            twin = tmp_path / "twin" / label / lossless_twin
            twin.parent.mkdir(parents=True)
            shutil.copy(bundled(lossless_twin), twin)
            np.testing.assert_array_equal(ours, load_image(twin, channels=3, size=32))


_WITHOUT_PYLIBJPEG = (
    "from pydicom.pixels import get_decoder",
    "from pydicom.uid import JPEGLSNearLossless, JPEGExtended12Bit, JPEGLosslessSV1",
    "for uid in (JPEGLSNearLossless, JPEGExtended12Bit, JPEGLosslessSV1):",
    "    get_decoder(uid).remove_plugin('pylibjpeg')  # as if the plugin were not installed",
)


def test_a_missing_decoder_is_named_with_its_install_command_and_no_traceback(tmp_path):
    root = tmp_path / "data"
    for cls, name in (("a", "JPEGLSNearLossless_16.dcm"), ("b", "JPGExtended.dcm"), ("c", "SC_rgb_jpeg_gdcm.dcm")):
        (root / cls).mkdir(parents=True)
        shutil.copy(bundled(name), root / cls / name)
    write_png(root / "d" / "ok.png", np.zeros((8, 8), np.uint8))
    result = check(root, *_WITHOUT_PYLIBJPEG)
    assert result.returncode == 1, result
    err = result.stderr
    assert "Traceback" not in err, err
    assert "compressed in a format no installed decoder reads" in err
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in err
    assert "delete" not in err and "corrupt" not in err
    for name, syntax in (("JPEGLSNearLossless_16.dcm", "JPEG-LS Lossy (Near-Lossless)"),
                         ("JPGExtended.dcm", "JPEG Extended"), ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless")):
        assert name in err and syntax in err
    # the whole of pydicom's explanation is kept, not cut at 80 characters
    assert "Pillow does not support 'JPEG Extended' for samples with 12-bit precision" in err
