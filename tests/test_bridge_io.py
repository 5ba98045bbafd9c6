"""Fixed point, model cards, weights files and images: the bridge's inputs, and what it refuses."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bridge.card import MAX_CARD_BYTES, ModelCard
from bridge.fixed import encode_weights, from_fixed, param_layout, quantisation_error, to_fixed
from bridge.images import find_images, load_image, preprocess
from bridge.models import card_from_run, card_from_state, load_model, load_state_dict
from bridge.trace import convert
from fl.models import build_model
from mpc.errors import ConfigError, EncodingRangeError

from .bridge_models import EveryOp, realistic


def test_fixed_point_round_trip_within_half_an_ulp():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)) * 100
    ring = to_fixed(x, 16)
    assert ring.dtype == np.int64
    assert np.abs(from_fixed(ring, 16) - x.double().numpy()).max() <= 2.0**-17
    with pytest.raises(EncodingRangeError):
        to_fixed(np.array([2.0**47]), 16)
    with pytest.raises(EncodingRangeError):
        to_fixed(np.array([np.nan]), 16)


def test_weights_encode_in_the_executor_layout_and_name_a_bad_parameter():
    converted = convert(realistic(EveryOp()), (3, 12, 12))
    layout = param_layout(converted.plan)
    ring = encode_weights(converted.plan, converted.weights, act_bits=16, weight_bits=16)
    for name, (shape, role) in layout.items():
        assert ring[name].shape == shape
        scale = 16 if role == "weight" else 32  # offsets are added at the product scale
        np.testing.assert_allclose(from_fixed(ring[name], scale).reshape(-1),
                                   converted.weights[name].reshape(-1), atol=2.0**-scale)
    bad = dict(converted.weights)
    key = next(k for k, (_, role) in layout.items() if role == "offset")
    bad[key] = bad[key] + 1e12
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        encode_weights(converted.plan, bad, act_bits=16, weight_bits=16)
    errors = quantisation_error(converted.weights, 16)
    assert max(errors.values()) < 1e-3


def test_model_card_round_trip_and_validation():
    card = ModelCard(name="resnet18", num_classes=2, channels=1, input_size=64, mean=(0.5,), std=(0.25,),
                     classes=("normal", "pneumonia"), model_id="resnet18-abc")
    assert ModelCard.from_bytes(card.to_bytes()) == card
    assert card.input_shape == (1, 64, 64) and card.class_names == ("normal", "pneumonia")
    for bad in ({"name": "x", "num_classes": 0}, {"name": "x", "num_classes": 2, "std": [0.0]},
                {"name": "x", "num_classes": 2, "classes": ["a"]}, {"name": "x", "num_classes": 2, "evil": 1},
                {"name": "x", "num_classes": 2, "mean": [1, 2]}, {"name": 3, "num_classes": 2}):
        with pytest.raises(ConfigError):
            ModelCard.from_dict(bad)
    with pytest.raises(ConfigError):
        ModelCard.from_bytes(b"\xc1not msgpack")
    with pytest.raises(ConfigError):
        ModelCard.from_bytes(b"x" * (MAX_CARD_BYTES + 1))


def test_state_dict_loading_is_weights_only_and_reads_classes(tmp_path):
    model = build_model("simple_cnn", num_classes=3, in_channels=1, input_size=16, width=8)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "classes": ["a", "b", "c"], "round": 4}, path)
    state, meta = load_state_dict(path)
    card = card_from_state("simple_cnn", state, meta, input_size=16)
    assert (card.num_classes, card.channels, card.width, card.classes) == (3, 1, 8, ("a", "b", "c"))
    assert card.model_id.startswith("simple_cnn-")
    load_model(card, state)  # fits strictly
    # a pickled object that is not plain tensors is refused, not executed
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"x": object()}, fh, protocol=2)
    with pytest.raises(ConfigError, match="weights_only"):
        load_state_dict(evil)
    with pytest.raises(ConfigError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pt")
    torch.save({"not": "tensors"}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="state dict"):
        load_state_dict(tmp_path / "plain.pt")


def test_card_from_a_training_run_folder(tmp_path):
    model = build_model("simple_cnn", num_classes=2, in_channels=1, input_size=20, width=4, pooling="avg")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    report = {"config": {"model": {"name": "simple_cnn", "width": 4, "pooling": "avg"},
                         "data": {"input_size": 20, "channels": 1, "mean": [0.4], "std": [0.2]}},
              "classes": ["normal", "pneumonia"]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    card, state = card_from_run(tmp_path)
    assert (card.input_size, card.pooling, card.mean, card.std) == (20, "avg", (0.4,), (0.2,))
    assert card.classes == ("normal", "pneumonia")
    load_model(card, state)
    with pytest.raises(ConfigError, match="not a finished training run"):
        card_from_run(tmp_path / "nowhere")


def test_images_are_found_decoded_and_normalised(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((10, 6), 128, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "sub" / "rgb.jpg")
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    found = find_images(tmp_path)
    assert [p.name for p in found] == ["broken.png", "gray.png", "rgb.jpg"]
    gray = load_image(tmp_path / "gray.png", channels=3, size=8)
    assert gray.shape == (3, 8, 8) and gray.dtype == np.uint8 and (gray == 128).all()
    card = ModelCard(name="simple_cnn", num_classes=2, channels=3, input_size=8, mean=(0.5,), std=(0.25,))
    x = preprocess(gray[None], card)
    np.testing.assert_allclose(x, (128 / 255 - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(ConfigError, match="broken.png"):
        load_image(tmp_path / "broken.png", channels=1, size=8)
    with pytest.raises(ConfigError, match="not a PNG"):
        find_images(tmp_path / "readme.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        find_images(tmp_path / "empty")
