"""``primia infer`` with clumsy input: same-named files in two folders, broken weights, bad addresses.

Each test is a regression test for a defect an outside tester found (issue 14).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bridge.images import collect_images
from cli.main import main
from fl.models import build_model
from mpc.errors import ConfigError

from .test_bridge_local import _expected, clinic  # noqa: F401 - clinic is a fixture


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)).save(path)


# -- results keyed so that nothing is lost -----------------------------------------------------
def test_result_names_are_relative_to_the_inputs_common_folder(tmp_path):
    for site in ("siteA", "siteB"):
        _png(tmp_path / site / "x.png", 1)
        _png(tmp_path / site / "sub" / "y.png", 2)
    names = lambda inputs: sorted(name for _, name in collect_images(inputs))  # noqa: E731
    assert names([tmp_path / "siteA"]) == ["sub/y.png", "x.png"]  # a lone folder: relative to itself
    assert names([tmp_path / "siteA", tmp_path / "siteB"]) == [
        "siteA/sub/y.png", "siteA/x.png", "siteB/sub/y.png", "siteB/x.png"]
    assert names([tmp_path / "siteA" / "x.png", tmp_path / "siteB" / "x.png"]) == ["siteA/x.png", "siteB/x.png"]
    assert names([tmp_path / "siteA" / "x.png"]) == ["x.png"]
    # the same file reached twice is one image
    assert names([tmp_path / "siteA", tmp_path / "siteA" / "x.png"]) == ["sub/y.png", "x.png"]
    _png(tmp_path / "siteA" / "X.png", 3)
    with pytest.raises(ConfigError, match="differ only in case"):
        collect_images([tmp_path / "siteA"])
    with pytest.raises(ConfigError, match="give the images"):
        collect_images([])


def _run_folder(tmp_path: Path, model) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "model.pt")
    report = {"config": {"model": {"name": "simple_cnn", "width": 8},
                         "data": {"input_size": 16, "channels": 1, "mean": [0.5], "std": [0.25]}},
              "classes": ["normal", "viral", "bacterial"]}
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_same_named_files_in_two_folders_each_get_their_result(clinic, tmp_path, monkeypatch):  # noqa: F811
    model, weights, _ = clinic
    _run_folder(tmp_path, model)
    _png(tmp_path / "siteA" / "x.png", 10)
    _png(tmp_path / "siteB" / "x.png", 11)
    monkeypatch.chdir(tmp_path)  # relative arguments, as typed
    code = main(["infer", "--local", "--run", "run", "siteA", "siteB", "--out", "out", "--no-progress"])
    assert code == 0
    out = tmp_path / "out"
    records = sorted(out.rglob("*.png.json"))
    assert [r.relative_to(out).as_posix() for r in records] == ["siteA/x.png.json", "siteB/x.png.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == len(records) == 2
    for site in ("siteA", "siteB"):
        record = json.loads((out / site / "x.png.json").read_text())
        source = tmp_path / site / "x.png"
        assert Path(record["image"]) == source
        want = _expected(model, weights, [source], mean=(0.5,), std=(0.25,))[0]
        np.testing.assert_allclose(list(record["probabilities"].values()), want, atol=1e-2)
    a, b = (json.loads((out / s / "x.png.json").read_text())["logits"] for s in ("siteA", "siteB"))
    assert a != b  # two different images, two different results


# -- weights that do not fit, and files that are not weights -------------------------------------
MODEL_ARGS = ["--model", "simple_cnn", "--input-size", "16", "--mean", "0.5", "--std", "0.25"]


def _infer(tmp_path: Path, weights: Path, capsys) -> tuple[int, str]:
    _png(tmp_path / "img" / "x.png", 0)
    code = main(["infer", "--local", "--weights", str(weights), *MODEL_ARGS, str(tmp_path / "img"),
                 "--out", str(tmp_path / "out"), "--no-progress"])
    return code, capsys.readouterr().err


def _simple_state(width: int = 16) -> dict[str, torch.Tensor]:
    return build_model("simple_cnn", num_classes=3, in_channels=1, input_size=16, width=width).state_dict()


def test_a_renamed_key_is_named_not_blamed_on_the_channels(tmp_path, capsys):
    state = _simple_state()
    state["conv_in.weight"] = state.pop("conv1.weight")  # renamed: now last in the dict
    torch.save(state, tmp_path / "renamed.pt")
    code, err = _infer(tmp_path, tmp_path / "renamed.pt", capsys)
    assert code == 1
    assert "missing keys conv1.weight" in err and "unexpected keys conv_in.weight" in err, err
    assert "renamed key" in err and "'channels'" not in err
    assert not (tmp_path / "out").exists()


def test_a_wrong_shape_tensor_is_named_with_both_shapes(tmp_path, capsys):
    state = _simple_state()
    state["conv1.weight"] = torch.zeros(16, 16, 3, 3)  # 16 input channels: no image has that many
    torch.save(state, tmp_path / "wide.pt")
    code, err = _infer(tmp_path, tmp_path / "wide.pt", capsys)
    assert code == 1
    assert "conv1.weight has shape (16, 16, 3, 3)" in err and "16 input channels" in err, err
    state = _simple_state()
    state["fc.weight"] = torch.zeros(3, 40)  # the classifier takes 64 features at width 16
    torch.save(state, tmp_path / "fc.pt")
    code, err = _infer(tmp_path, tmp_path / "fc.pt", capsys)
    assert code == 1
    assert "wrong shapes: fc.weight: weights (3, 40), model (3, 64)" in err, err


@pytest.mark.parametrize("content, words", [
    (b"", "the file is empty (0 bytes)"),
    (b"epoch 3, loss 0.12\n", "it holds text, not tensors (it starts with 'epoch 3, loss 0.12\\n')"),
    (bytes(range(200, 256)), "not a torch.save file (it starts with c8c9"),
    (b"PK\x03\x04" + b"\0" * 40, "looks like a torch.save file of 44 bytes but cannot be read"),
], ids=["empty", "text", "binary", "broken-zip"])
def test_a_file_that_is_not_weights_says_what_it_holds_and_what_was_expected(tmp_path, capsys, content, words):
    (tmp_path / "model.pt").write_bytes(content)
    code, err = _infer(tmp_path, tmp_path / "model.pt", capsys)
    assert code == 1
    assert words in err, err
    if content[:2] != b"PK":
        assert "expected a file written by torch.save(model.state_dict(), path)" in err
    assert not err.rstrip().endswith(":") and not err.rstrip().endswith(": 101")


# -- addresses -------------------------------------------------------------------------------------
def _party_list(path: Path, hosts: list[str], ports: list[object]) -> Path:
    (path.parent / "federation.key").write_text("k" * 64)
    (path.parent / "federation.key").chmod(0o600)
    lines = ['session = "s"', 'secret_file = "federation.key"', "allow_plaintext = true"]
    for i, (host, port) in enumerate(zip(hosts, ports)):
        lines += ["[[party]]", f"id = {i}", f"host = {json.dumps(host)}", f"port = {port}"]
        lines += ['role = "dealer"'] if i == 2 else []
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("hosts, ports, words", [
    (["127.0.0.1"] * 3, [7000, 99999, 7002], "port must be an integer in 1..65535, got 99999"),
    (["127.0.0.1"] * 3, [7000, '"None"', 7002], "port must be an integer in 1..65535, got 'None'"),
    (["127.0.0.1:99999", "127.0.0.1", "127.0.0.1"], [7000, 7001, 7002], "give the port separately"),
    (["127.0.0.1:None", "127.0.0.1", "127.0.0.1"], [7000, 7001, 7002], "give the port separately"),
    (["ws://10.0.0.1", "127.0.0.1", "127.0.0.1"], [7000, 7001, 7002], "without a scheme"),
    (["[::1]", "127.0.0.1", "127.0.0.1"], [7000, 7001, 7002], "without brackets"),
    (["None host", "127.0.0.1", "127.0.0.1"], [7000, 7001, 7002], "is not a host name or IP address"),
], ids=["port-99999", "port-None", "host-with-port", "host-with-None-port", "scheme", "brackets", "space"])
def test_a_bad_address_is_a_named_error_in_every_inference_role(tmp_path, capsys, hosts, ports, words):
    parties = _party_list(tmp_path / "parties.toml", hosts, ports)
    for role in ("dealer", "model-server", "data-owner"):
        extra = {"dealer": [], "model-server": ["--weights", "w.pt", "--model", "simple_cnn"],
                 "data-owner": [str(tmp_path)]}[role]
        # in-process: a raw ValueError would escape main() and fail the test
        assert main(["infer", "--role", role, "--network", str(parties), *extra]) == 1
        err = capsys.readouterr().err
        assert words in err, err


def test_a_bad_data_owner_port_is_a_named_error(tmp_path, capsys):
    parties = _party_list(tmp_path / "parties.toml", ["127.0.0.1"] * 3, [7000, 7001, 7002])
    for port in ("99999", "-1"):
        assert main(["infer", "--role", "data-owner", "--network", str(parties), "--port", port, str(tmp_path)]) == 1
        assert f"--port must be an integer in 0..65535 (0: any free port), got {port}" in capsys.readouterr().err
