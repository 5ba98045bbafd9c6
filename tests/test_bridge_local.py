"""Encrypted inference across real processes: infer_local, ``primia infer --local`` and the three role commands."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import bridge
from bridge.images import load_batch
from bridge.models import card_from_state
from cli.main import main
from fl.models import build_model
from mpc.errors import UnsupportedModelError

from .bridge_models import resnet18

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-2  # of the largest logit, as documented in docs/inference.md


def test_infer_local_resnet18_api_contract():
    model = resnet18(num_classes=5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    result = bridge.infer_local(model, x)
    with torch.no_grad():
        ref = model(x).double().numpy()
    assert isinstance(result.logits, np.ndarray) and result.logits.shape == (2, 5)
    assert np.abs(result.logits - ref).max() <= REL_TOL * np.abs(ref).max()
    assert (result.logits.argmax(1) == ref.argmax(1)).all()
    stats = result.stats
    assert stats["seconds"] > 0 and 0 < stats["rounds"] <= 100
    # the busiest party's traffic includes the dealer's, and the parts add up
    assert stats["bytes"] == stats["online_bytes"] + stats["dealer_bytes"] > 0
    assert stats["setup_rounds"] + stats["inference_rounds"] == stats["rounds"]


def test_unsupported_model_fails_before_any_process_starts():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(), nn.Flatten()).eval()
    with pytest.raises(UnsupportedModelError, match="Softplus"):
        bridge.infer_local(model, torch.zeros(1, 3, 8, 8))
    assert multiprocessing.active_children() == []


# -- the primia infer command ------------------------------------------------------------------
def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def clinic(tmp_path):
    """A trained-looking small model's weights and a folder of PNG, JPEG and DICOM images."""
    torch.manual_seed(0)
    model = build_model("simple_cnn", num_classes=3, in_channels=1, input_size=16, width=8).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    (images / "ward2").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(images / "ward2" / "b.jpg")
    _write_dicom(images / "c.dcm", rng.integers(0, 4096, (18, 16)))
    (images / "notes.txt").write_text("not an image")
    return model, weights, images


def _expected(model, weights: Path, files: list[Path], **overrides) -> np.ndarray:
    state = torch.load(weights, weights_only=True)
    card = card_from_state("simple_cnn", state, None, input_size=16, width=8, **overrides)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(load_batch(files, card))), 1).numpy()


def _check_results(out: Path, images: Path, model, weights: Path) -> None:
    files = [images / "a.png", images / "c.dcm", images / "ward2" / "b.jpg"]
    expected = _expected(model, weights, files, mean=(0.5,), std=(0.25,))
    for path, probs in zip(files, expected):
        record = json.loads((out / path.relative_to(images).parent / f"{path.name}.json").read_text())
        assert record["class"] == ["normal", "viral", "bacterial"][int(probs.argmax())]
        np.testing.assert_allclose(list(record["probabilities"].values()), probs, atol=1e-2)
        assert record["model"] == "simple_cnn" and record["model_id"].startswith("simple_cnn-")
        assert record["bytes"]["total"] > 0 and record["timings"]["batch_seconds"] > 0
    assert not (out / "notes.txt.json").exists()
    assert not list(out.rglob(".*.tmp"))  # every file was written atomically
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3


def _primia(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "infer", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


MODEL_ARGS = ["--model", "simple_cnn", "--input-size", "16", "--classes", "normal,viral,bacterial",
              "--mean", "0.5", "--std", "0.25"]


def test_primia_infer_local_writes_one_json_per_image(clinic, tmp_path, capsys):
    model, weights, images = clinic
    out = tmp_path / "results"
    code = main(["infer", "--local", "--weights", str(weights), *MODEL_ARGS, str(images), "--out", str(out),
                 "--no-progress"])
    assert code == 0
    assert "3 image(s)" in capsys.readouterr().out
    _check_results(out, images, model, weights)


def test_primia_infer_local_refuses_an_unsupported_model(tmp_path, capsys, monkeypatch):
    # every torchvision classifier converts now: the model server's architecture gets a layer the bridge refuses
    import bridge.models

    def with_softplus(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.relu2 = nn.Softplus()  # same state dict, one layer without an encrypted implementation
        return model

    monkeypatch.setattr(bridge.models, "build_model", with_softplus)
    weights = tmp_path / "cnn.pt"
    torch.save(build_model("simple_cnn", num_classes=2, in_channels=1, input_size=16, width=4).state_dict(), weights)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    code = main(["infer", "--local", "--weights", str(weights), "--model", "simple_cnn", "--input-size", "16",
                 str(tmp_path / "x.png"), "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert code == 1
    assert "cannot convert Softplus at relu2" in stderr and "Supported:" in stderr
    assert not (tmp_path / "out").exists()
    assert multiprocessing.active_children() == []


def _free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_three_role_commands_over_the_network(clinic, tmp_path):
    model, weights, images = clinic
    (tmp_path / "federation.key").write_text(os.urandom(32).hex())
    os.chmod(tmp_path / "federation.key", 0o600)
    lines = ['session = "infer-test"', 'secret_file = "federation.key"', "[timeouts]", "connect_s = 60", "recv_s = 120"]
    for i, port in enumerate(_free_ports(3)):
        lines += ["[[party]]", f"id = {i}", 'host = "127.0.0.1"', f"port = {port}"]
        lines += ['role = "dealer"'] if i == 2 else []
    parties = tmp_path / "parties.toml"
    parties.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results"
    servers = [  # long-lived: they serve until stopped
        _primia("--role", "dealer", "--network", str(parties)),
        _primia("--role", "model-server", "--network", str(parties), "--weights", str(weights), *MODEL_ARGS,
                "--calibrate", str(images)),
    ]
    try:
        owner = _primia("--role", "data-owner", "--network", str(parties), str(images), "--out", str(out),
                        "--no-progress")
        owner_out = owner.communicate(timeout=300)
        assert owner.returncode == 0, owner_out
        _check_results(out, images, model, weights)
        assert "results written" in owner_out[0]
    finally:
        for proc in servers:
            proc.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=60) for p in servers]
    assert [p.returncode for p in servers] == [0, 0], outs
    # only the data owner wrote results; each server served the one session
    assert "results written" not in outs[1][0]
    assert all("stopped: 1 session(s) served, 0 failed" in o[0] for o in outs), outs


def test_infer_local_segmentation_unet_keeps_the_output_shape():
    """A U-Net (ConvTranspose2d and bilinear Upsample decoders, skip concatenations) end to end, three processes."""
    from .bridge_models import unet

    model = unet(in_channels=1, classes=3, width=4)
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    result = bridge.infer_local(model, x)
    with torch.no_grad():
        ref = model(x).double().numpy()
    assert result.logits.shape == ref.shape == (1, 3, 16, 16)
    assert np.abs(result.logits - ref).max() <= REL_TOL * np.abs(ref).max()
    assert result.stats["rounds"] > 0 and result.stats["bytes"] > 0


def test_infer_local_refuses_a_weight_that_would_overflow_the_ring():
    """One weight of 1e12: refused with the layer named, never a wrong class."""
    from bridge.errors import RingOverflowError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with torch.no_grad():
        model[3].weight[0, 0] = 1e12
    with pytest.raises(RingOverflowError, match=r"layer 3 \(linear"):
        bridge.infer_local(model, torch.randn(1, 1, 8, 8))
