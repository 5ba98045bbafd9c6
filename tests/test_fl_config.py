"""The federation TOML: every key checked, unknown keys and bad values named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fl.config import all_keys, load_config, parse_config, parse_node_spec
from mpc.errors import ConfigError

from .fl_helpers import TOKEN, base_config, to_toml

ROOT = Path(__file__).resolve().parent.parent


def test_a_full_config_file_parses_with_defaults(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_text(to_toml(base_config(["a", "b"])))
    cfg = load_config(path)
    assert [n.name for n in cfg.federation.nodes] == ["a", "b"]
    assert cfg.training.local_steps == 3 and cfg.training.optimizer == "sgd"
    assert cfg.aggregation.secure and cfg.aggregation.frac_bits == 16 and cfg.aggregation.ring_bits == 32
    assert cfg.min_nodes == 2 and cfg.data.mean == (0.3,)
    assert str(cfg.output_dir) == "runs/test"


def test_the_node_spec_round_trips_and_leaves_out_the_secrets():
    cfg = parse_config(base_config(["a", "b"]))
    spec = cfg.node_spec()
    assert "federation" not in spec and TOKEN not in repr(spec)
    again = parse_node_spec(spec)
    assert again.node_spec() == spec and again.digest() == cfg.digest()
    longer = parse_config(base_config(["a", "b"], run={"rounds": 50}))
    assert longer.digest() == cfg.digest()  # more rounds may be added on --resume
    other = parse_config(base_config(["a", "b"], training={"lr": 0.5}))
    assert other.digest() != cfg.digest()


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("training", {"lrr": 0.1}, "training.lrr: unknown key (did you mean training.lr?)"),
        ("trainig", {"lr": 0.1}, "trainig: unknown key (did you mean training?)"),
        ("aggregation", {"secure": "yes"}, "aggregation.secure: expected true or false"),
        ("training", {"lr": -1.0}, "training.lr: -1.0 is below the minimum"),
        ("training", {"batch_size": 2.5}, "training.batch_size: expected an integer"),
        ("training", {"optimizer": "rmsprop"}, "training.optimizer: 'rmsprop' is not allowed"),
        ("training", {"local_epochs": 2}, "training.local_steps: give local_epochs or local_steps, not both"),
        ("training", {"betas": [0.9]}, "training.betas: expected two numbers"),
        ("training", {"nesterov": True, "momentum": 0.0}, "training.nesterov: needs"),
        ("aggregation", {"ring_bits": 48}, "aggregation.ring_bits: 48 is not allowed"),
        ("aggregation", {"frac_bits": 30}, "aggregation.frac_bits: 30 leaves too little"),
        ("aggregation", {"weighting": "median"}, "aggregation.weighting: 'median' is not allowed"),
        ("federation", {"min_nodes": 5}, "federation.min_nodes: 5 is more than the 2 configured nodes"),
        ("federation", {"on_dropout": "retry"}, "federation.on_dropout: 'retry' is not allowed"),
        ("model", {"name": "resnet19"}, "model.name: unknown model 'resnet19'; did you mean resnet18"),
        ("data", {"mean": [0.1, 0.2]}, "data.mean: expected 1 value"),
        ("data", {"std": 0.0}, "data.std: every value must be positive"),
        ("data", {"val_fraction": 0.95}, "data.val_fraction: 0.95 is above the maximum"),
        ("run", {"rounds": 0}, "run.rounds: 0 is below the minimum 1"),
    ],
)
def test_bad_values_are_errors_naming_the_key(section, values, message):
    raw = base_config(["a", "b"])
    raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(raw)


@pytest.mark.parametrize(
    "node, message",
    [
        ({"name": "a", "address": "ws://h:1", "token": TOKEN, "tokn": "x"}, "federation.nodes[0].tokn: unknown key"),
        ({"name": "a", "token": TOKEN}, "federation.nodes[0].address: missing"),
        ({"name": "a", "address": "http://h:1", "token": TOKEN}, "federation.nodes[0].address: 'http://h:1' must look like"),
        ({"name": "a", "address": "ws://h:1"}, "federation.nodes[0].token: missing"),
        ({"name": "a b", "address": "ws://h:1", "token": TOKEN}, "federation.nodes[0].name: 'a b' must be"),
        ({"name": "a", "address": "ws://h:1", "token": "short"}, "federation.nodes[0].token: the secret has 5 bytes"),
        ({"name": "a", "address": "wss://h:1", "token": TOKEN}, "federation.tls_ca: missing; node a is reached over wss"),
    ],
)
def test_bad_node_entries_are_named(node, message):
    raw = base_config(["x"])
    raw["federation"]["nodes"] = [node, {"name": "z", "address": "ws://h:2", "token": TOKEN}]
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(raw)


def test_duplicate_names_and_token_files(tmp_path):
    raw = base_config(["a", "a"])
    with pytest.raises(ConfigError, match=r"federation.nodes\[1\].name: 'a' is used twice"):
        parse_config(raw)
    (tmp_path / "b.key").write_text("s3cret-from-a-file-0123\n")
    raw = base_config(["a", "b"])
    raw["federation"]["nodes"][1] = {"name": "b", "address": "ws://h:2", "token_file": "b.key"}
    cfg = parse_config(raw, base_dir=tmp_path)
    assert cfg.federation.nodes[1].token == "s3cret-from-a-file-0123"
    raw["federation"]["nodes"][1]["token_file"] = "missing.key"
    with pytest.raises(ConfigError, match=r"federation.nodes\[1\].token_file: cannot read"):
        parse_config(raw, base_dir=tmp_path)


def test_secure_aggregation_needs_two_nodes():
    with pytest.raises(ConfigError, match="aggregation.secure: needs at least two nodes"):
        parse_config(base_config(["solo"]))
    assert parse_config(base_config(["solo"], aggregation={"secure": False})).min_nodes == 1


def test_augmentations_are_torchvision_transforms_checked_on_a_dummy_image():
    raw = base_config(["a", "b"], data={"augmentations": [{"name": "RandomRotation", "degrees": 10}]})
    assert parse_config(raw).data.augmentations[0].kwargs == {"degrees": 10}
    raw["data"]["augmentations"] = [{"name": "RandomRotation", "degreez": 10}]
    with pytest.raises(ConfigError, match=r"data.augmentations\[0\]: RandomRotation\(degreez=10\) failed"):
        parse_config(raw)
    raw["data"]["augmentations"] = [{"name": "Lambda"}]
    with pytest.raises(ConfigError, match=r"data.augmentations\[0\].name: 'Lambda' is not an allowed transform"):
        parse_config(raw)
    raw["data"]["augmentations"] = [{"name": "RandomResizedCrop", "size": 4}]
    with pytest.raises(ConfigError, match="changes the image shape"):
        parse_config(raw)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 2")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)


def test_every_key_is_documented():
    doc = (ROOT / "docs" / "federation.md").read_text()
    missing = [key for key, *_ in all_keys() if f"`{key}`" not in doc]
    assert not missing, f"docs/federation.md does not describe {missing}"
