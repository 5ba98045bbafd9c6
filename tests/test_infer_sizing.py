"""Fixed point sized from measured bounds in every entry point: right results, or a clear refusal.

Regression tests for issue 13 item 1: ``primia infer --local ... --std 0.0005``
exited 0 with wrong classes because the command line never sized its fixed
point.  Now ``bridge.infer_local``, ``primia infer --local`` and the networked
roles all size from bounds someone measured (:mod:`bridge.sizing`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bridge
from bridge.card import Bounds, ModelCard
from bridge.images import load_batch
from bridge.models import card_from_state, load_model, load_state_dict
from bridge.sizing import (
    WIDEN_BITS,
    InferenceOverflow,
    check_inputs,
    run_with_retry,
    size_fixed_point,
)
from cli.main import main
from fl.models import build_model
from mpc.errors import ConfigError, EncodingRangeError, PeerFailure

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-2  # of the largest logit, as documented


@pytest.fixture(scope="module")
def issue_model(tmp_path_factory):
    """The issue's setting: simple_cnn, 10 classes, 32x32 RGB, six images."""
    root = tmp_path_factory.mktemp("issue13")
    torch.manual_seed(5)
    model = build_model("simple_cnn", num_classes=10, in_channels=3, input_size=32).eval()
    with torch.no_grad():  # trained-looking BatchNorm statistics, so that the classes differ between images
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), root / "model.pt")
    rng = np.random.default_rng(0)
    (root / "DIR").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "DIR" / f"img{i}.png")
    return root


def _reference(root: Path, std: float) -> dict[str, np.ndarray]:
    state, meta = load_state_dict(root / "model.pt")
    card = card_from_state("simple_cnn", state, meta, num_classes=10, input_size=32, std=(std,))
    files = sorted((root / "DIR").glob("*.png"))
    with torch.no_grad():
        logits = load_model(card, state)(torch.from_numpy(load_batch(files, card))).double().numpy()
    return {f.name: row for f, row in zip(files, logits)}


@pytest.mark.parametrize("std", [0.0005, 0.005])
def test_the_issue_command_gives_the_plaintext_classes(issue_model, tmp_path, std):
    out = tmp_path / "out"
    code = main(["infer", "--local", "--weights", str(issue_model / "model.pt"), "--model", "simple_cnn",
                 "--num-classes", "10", "--input-size", "32", "--std", str(std), str(issue_model / "DIR"),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    reference = _reference(issue_model, std)
    for name, want in reference.items():
        record = json.loads((out / f"{name}.json").read_text())
        got = np.array(record["logits"])
        assert record["class_index"] == int(want.argmax()), name
        assert np.abs(got - want).max() <= REL_TOL * np.abs(want).max(), name


def test_explicit_settings_the_images_would_overflow_are_refused(issue_model, tmp_path, capsys):
    code = main(["infer", "--local", "--weights", str(issue_model / "model.pt"), "--model", "simple_cnn",
                 "--num-classes", "10", "--input-size", "32", "--std", "0.0005", str(issue_model / "DIR"),
                 "--out", str(tmp_path / "out"), "--act-bits", "12", "--comparison-bits", "22"])
    assert code == 1
    err = capsys.readouterr().err
    assert "--comparison-bits 22 holds compared values below 512" in err and "use at least" in err
    assert not (tmp_path / "out").exists()


def test_infer_local_refuses_a_model_beyond_the_ring_naming_the_op():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 4 * 4, 3)).eval()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = 1e12
    # the caller holds the weights: the layer itself is named, with its largest parameter
    with pytest.raises(ConfigError, match=r"layer 0 \(conv2d _0\) can reach 2\^7\d\.\d in the 64-bit ring.*1e\+12"):
        bridge.infer_local(model, torch.ones(1, 1, 6, 6))


def test_calibrated_bounds_refuse_inputs_beyond_them(tmp_path, capsys):
    """The model owner calibrated on dim images; bright ones reach beyond: refused, naming them."""
    torch.manual_seed(0)
    torch.save(build_model("simple_cnn", num_classes=2, in_channels=1, input_size=16, width=4).state_dict(),
               tmp_path / "model.pt")
    for folder, level in (("dim", 130), ("bright", 255)):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.fromarray(np.full((16, 16), level - i, np.uint8)).save(tmp_path / folder / f"{folder}{i}.png")
    code = main(["infer", "--local", "--weights", str(tmp_path / "model.pt"), "--model", "simple_cnn",
                 "--input-size", "16", "--mean", "0.5", "--std", "0.01", "--calibrate", str(tmp_path / "dim"),
                 str(tmp_path / "bright"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "reach beyond the range the model was calibrated for" in err and "bright0.png" in err, err[-2000:]
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_model_server_without_bounds_or_settings_refuses_to_start(tmp_path):
    torch.save(build_model("simple_cnn", num_classes=2, in_channels=1, input_size=16, width=4).state_dict(),
               tmp_path / "model.pt")
    (tmp_path / "k").write_text("k" * 64)
    (tmp_path / "k").chmod(0o600)
    lines = ['session = "s"', 'secret_file = "k"']
    for i in range(3):
        lines += ["[[party]]", f"id = {i}", 'host = "127.0.0.1"', f"port = {7300 + i}"] + (
            ['role = "dealer"'] if i == 2 else [])
    (tmp_path / "p.toml").write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "cli.main", "infer", "--role", "model-server", "--network",
                             str(tmp_path / "p.toml"), "--weights", str(tmp_path / "model.pt"), "--model",
                             "simple_cnn", "--input-size", "16"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "no measured value ranges" in result.stderr and "--calibrate DIR" in result.stderr
    assert "Traceback" not in result.stderr


# -- the one sizing function -----------------------------------------------------------------------
def _bounds(**over) -> Bounds:
    values = dict(input=2.0, compared=100.0, values=100.0, logit=5.0, images=10, margin=4.0, values_at="conv1")
    values.update(over)
    return Bounds(**values)


def test_sizing_holds_the_margin_times_every_measured_magnitude():
    for compared in (1.0, 100.0, 3000.0, 1e6):
        fixed = size_fixed_point(_bounds(compared=compared, values=compared))
        # the domain holds every compared difference up to margin x the measured one
        assert 4.0 * compared < 2.0 ** (fixed.comparison_bits - 1 - fixed.act_bits)
        # and products of values up to margin x the measured ones fit the ring
        assert 4.0 * compared * 2.0 ** (fixed.act_bits + fixed.weight_bits) < 2.0**62
    small = size_fixed_point(_bounds(logit=0.01, compared=0.5, values=0.5))
    assert small.act_bits > 12 and 2.0**-small.act_bits <= 1e-3 * 0.01 * 2  # a unit well below the logits
    assert size_fixed_point(_bounds(), act_bits=14, comparison_bits=40).options() == {
        "act_bits": 14, "weight_bits": 20, "comparison_bits": 40}
    assert size_fixed_point(_bounds(), widen_bits=WIDEN_BITS).comparison_bits == (
        size_fixed_point(_bounds()).comparison_bits + WIDEN_BITS)
    assert size_fixed_point(None, act_bits=12, comparison_bits=30).comparison_bits == 30
    with pytest.raises(ConfigError, match="--calibrate DIR"):
        size_fixed_point(None)
    with pytest.raises(ConfigError, match="64-bit ring"):
        size_fixed_point(_bounds(values=1e13))
    with pytest.raises(ConfigError, match="use at least"):
        size_fixed_point(_bounds(compared=3000.0), comparison_bits=22)


def test_bounds_travel_in_the_card_and_are_checked():
    card = ModelCard(name="simple_cnn", num_classes=2, bounds=_bounds())
    assert ModelCard.from_bytes(card.to_bytes()) == card
    for bad in ({"margin": 0.5}, {"compared": float("nan")}, {"images": 0}, {"input": -1.0}):
        with pytest.raises(ConfigError, match="bounds"):
            _bounds(**bad)
    raw = dict(name="simple_cnn", num_classes=2, bounds={"input": 1.0, "compared": 1.0, "values": 1.0, "logit": 1.0,
                                                          "images": 1, "margin": 2.0, "evil": 1})
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelCard.from_dict(raw)


def test_inputs_beyond_the_calibrated_range_are_refused_by_name():
    bounds = _bounds(input=2.0, margin=4.0)
    check_inputs(np.full((2, 1, 4, 4), 7.9), bounds, ["a.png", "b.png"])
    x = np.zeros((3, 1, 4, 4))
    x[1, 0, 0, 0] = -8.5
    x[2, 0, 1, 1] = np.nan
    with pytest.raises(ConfigError, match=r"2 input\(s\).*b\.png \(up to 8\.5\), c\.png \(up to nan\)"):
        check_inputs(x, bounds, ["a.png", "b.png", "c.png"])
    check_inputs(x, None, ["a.png", "b.png", "c.png"])  # no bounds (explicit settings): nothing to check against


def test_an_overflow_is_retried_once_wider_then_refused():
    calls = []

    def overflowing_once(widen_bits):
        calls.append(widen_bits)
        if len(calls) == 1:
            raise EncodingRangeError(1e20, 2.0**50, 12)
        return "logits"

    assert run_with_retry(overflowing_once) == "logits" and calls == [0, WIDEN_BITS]

    def always(widen_bits):
        raise EncodingRangeError(1e20, 2.0**50, 12)

    with pytest.raises(InferenceOverflow, match="calibrate on images like these"):
        run_with_retry(always)
    calls.clear()

    def other(widen_bits):
        calls.append(widen_bits)
        raise PeerFailure("party 1", "gone")

    with pytest.raises(PeerFailure):
        run_with_retry(other)
    assert calls == [0]  # only overflows are retried
