"""The federation TOML: every key checked, unknown keys and bad values named, secrets never echoed."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fl.config import all_keys, is_loopback, load_config, parse_config, parse_listen, parse_node_spec
from fl.identity import generate_keys
from mpc.errors import ConfigError

from .fl_helpers import base_config, keys_dir, to_toml

ROOT = Path(__file__).resolve().parent.parent


def test_a_full_config_file_parses_with_defaults_and_paths_relative_to_it(tmp_path):
    keys = tmp_path / "keys"
    for name in ("hub", "a", "b"):
        generate_keys(name, keys)
    raw = base_config(["a", "b"])
    raw["federation"]["key_file"] = "keys/hub.key"
    raw["federation"]["nodes"] = [{"name": n, "public_key_file": f"keys/{n}.pub"} for n in ("a", "b")]
    raw["run"]["output_dir"] = "out"
    path = tmp_path / "federation.toml"
    path.write_text(to_toml(raw))
    cwd = os.getcwd()
    os.chdir(ROOT)  # paths are relative to the file, not to where the hub runs
    try:
        cfg = load_config(path)
    finally:
        os.chdir(cwd)
    assert [n.name for n in cfg.federation.nodes] == ["a", "b"]
    assert cfg.federation.key_file == str(keys / "hub.key")
    assert cfg.federation.nodes[1].public_key_file == str(keys / "b.pub")
    assert cfg.output_dir == tmp_path / "out"
    assert cfg.training.local_steps == 3 and cfg.training.optimizer == "sgd"
    assert cfg.aggregation.secure and cfg.aggregation.frac_bits == 16 and cfg.aggregation.ring_bits == 32
    assert cfg.min_nodes == 2 and cfg.data.mean == (0.3,) and cfg.listen == ("127.0.0.1", 0)
    del raw["run"]["output_dir"]
    assert str(parse_config(raw, base_dir=tmp_path).output_dir) == "runs/test"


def test_the_node_spec_round_trips_and_leaves_out_the_federation():
    cfg = parse_config(base_config(["a", "b"]))
    spec = cfg.node_spec()
    assert "federation" not in spec and "hub.key" not in repr(spec)
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
        ("federation", {"min_nodes": 1}, "federation.min_nodes: 1 is not possible with secure aggregation"),
        ("federation", {"on_dropout": "retry"}, "federation.on_dropout: 'retry' is not allowed"),
        ("federation", {"listen": "127.0.0.1:99999"}, "federation.listen: port 99999 is outside 0..65535"),
        ("federation", {"listen": "127.0.0.1"}, "federation.listen: '127.0.0.1' must look like HOST:PORT"),
        ("federation", {"listen": "127.0.0.1:None"}, "federation.listen: '127.0.0.1:None' must look like HOST:PORT"),
        ("federation", {"listen": 8780}, "federation.listen: expected a string, got 8780"),
        ("federation", {"listen": "0.0.0.0:8780"}, "federation.listen: 0.0.0.0 is reachable from other machines, "
                                                   "so the hub needs TLS"),
        ("federation", {"tls_cert": "x.pem"}, "federation.tls_cert, tls_key: give both"),
        ("federation", {"key_file": ""}, "federation.key_file: missing; make the hub's key pair with `primia keygen"),
        ("federation", {"key_file": "nowhere.key"}, "federation.key_file: cannot read"),
        ("model", {"name": "resnet19"}, "model.name: unknown model 'resnet19'; did you mean resnet18"),
        ("data", {"mean": [0.1, 0.2]}, "data.mean: expected 1 value"),
        ("data", {"mean": [0.1, 0.2, 0.3], "channels": 1}, "data.mean: 3 values (RGB) but data.channels = 1"),
        ("data", {"std": 0.0}, "data.std: every value must be positive"),
        ("data", {"val_fraction": 0.95}, "data.val_fraction: 0.95 is above the maximum"),
        ("run", {"rounds": 0}, "run.rounds: 0 is below the minimum 1"),
        ("run", {"name": "../../x"}, "run.name: '../../x' must be letters, digits"),
        ("run", {"name": ".hidden"}, "run.name: '.hidden' must be"),
    ],
)
def test_bad_values_are_errors_naming_the_key(section, values, message):
    raw = base_config(["a", "b"])
    raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(raw)


def test_plaintext_off_loopback_needs_allow_plaintext():
    raw = base_config(["a", "b"], federation={"listen": "0.0.0.0:8780", "allow_plaintext": True})
    assert parse_config(raw).listen == ("0.0.0.0", 8780)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.5") and not is_loopback("hub.example.org") and not is_loopback("0.0.0.0")
    assert parse_listen("[::1]:80", "k") == ("::1", 80)


@pytest.mark.parametrize(
    "node, message",
    [
        ({"name": "a", "public_key_file": "{keys}/a.pub", "tokn": "x"}, "federation.nodes[0].tokn: unknown key"),
        ({"name": "a"}, "federation.nodes[0].public_key_file: missing"),
        ({"name": "a", "public_key_file": "{keys}/nowhere.pub"}, "federation.nodes[0].public_key_file: cannot read"),
        ({"name": "a", "public_key_file": "{keys}/a.key"},
         "federation.nodes[0].public_key_file: {keys}/a.key is not a public key made by `primia keygen` (that is a "
         "private key: give the .pub file)"),
        ({"name": "a b", "public_key_file": "{keys}/a.pub"}, "federation.nodes[0].name: 'a b' must be"),
        ({"name": "hub", "public_key_file": "{keys}/a.pub"}, "federation.nodes[0].name: 'hub' is reserved"),
        ({"name": "a", "public_key_file": "{keys}/a.pub"}, "federation.nodes[1].public_key_file: the same key as "
                                                            "federation.nodes[0] ('a'): one node is listed twice"),
        ({"name": "a", "address": "ws://h:1", "public_key_file": "{keys}/a.pub"},
         "federation.nodes[0].address: no longer used; nodes dial the hub now"),
        ({"name": "a", "token": "secret-value-0123456789", "public_key_file": "{keys}/a.pub"},
         "federation.nodes[0].token: no longer used"),
    ],
)
def test_bad_node_entries_are_named(node, message):
    keys = str(keys_dir())
    raw = base_config(["x", "z"])
    raw["federation"]["nodes"] = [{k: v.format(keys=keys) for k, v in node.items()},
                                  {"name": "z", "public_key_file": f"{keys}/z.pub"}]
    if "same key" in message:
        raw["federation"]["nodes"][1]["public_key_file"] = f"{keys}/a.pub"
    with pytest.raises(ConfigError, match=re.escape(message.format(keys=keys))):
        parse_config(raw)


def test_duplicate_names_are_refused():
    with pytest.raises(ConfigError, match=r"federation.nodes\[1\].name: 'a' is used twice"):
        parse_config(base_config(["a", "a"]))


@pytest.mark.parametrize("nodes", [
    {"name": "a", "token": "my-secret-token-0123456789"},                   # a single table, not an array
    [{"name": "a", "token": 123456789012345678}],                            # an integer token
    [{"name": "a", "token": ["my-secret-token-0123456789"]}],
])
def test_config_errors_never_echo_a_secret(nodes):
    raw = base_config(["a", "b"])
    raw["federation"]["nodes"] = nodes
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = str(info.value)
    assert "my-secret-token" not in text and "123456789012345678" not in text
    assert "federation.nodes" in text


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


def test_a_private_key_readable_by_others_is_refused(tmp_path):
    key, _ = generate_keys("hub", tmp_path)
    raw = base_config(["a", "b"])
    raw["federation"]["key_file"] = str(key)
    parse_config(raw)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=re.escape(f"can be read by other users (mode 644); run: chmod 600 {key}")):
        parse_config(raw)


def test_every_key_is_documented():
    doc = (ROOT / "docs" / "federation.md").read_text()
    missing = [key for key, *_ in all_keys() if f"`{key}`" not in doc]
    assert not missing, f"docs/federation.md does not describe {missing}"
